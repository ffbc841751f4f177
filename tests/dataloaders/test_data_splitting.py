from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import scvi
import torch

import labeltransfer as lt
from labeltransfer.dataloaders import PairedDataLoader, RefQueryDataSplitter


@pytest.fixture
def concat_manager(synthetic_pair):
    ref, query = synthetic_pair
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    model = lt.JIND(adata, n_top_genes=50)
    return adata, model.adata_manager


def test_splitter_yields_reference_query_pairs(concat_manager):
    adata, manager = concat_manager
    splitter = RefQueryDataSplitter(manager, train_size=0.8, use_query=True, batch_size=64)
    splitter.setup()
    is_ref = (adata.obs["lt_role"] == "reference").to_numpy()
    assert set(splitter.val_idx) | set(splitter.ref_train_idx) == set(np.flatnonzero(is_ref))
    assert not set(splitter.val_idx) & set(splitter.ref_train_idx)
    np.testing.assert_array_equal(splitter.query_idx, np.flatnonzero(~is_ref))
    loader = splitter.train_dataloader()
    assert isinstance(loader, PairedDataLoader)
    batches = list(loader)
    assert (
        len(batches)
        == len(loader)
        == max(
            int(np.ceil(splitter.ref_train_idx.size / 64)),
            int(np.ceil(splitter.query_idx.size / 64)),
        )
    )
    unlabeled_code = len(lt.JIND(adata, n_top_genes=50).cell_types)
    ref_batch, query_batch = batches[0]
    assert (ref_batch["labels"] < unlabeled_code).all()
    assert (query_batch["labels"] == unlabeled_code).all()
    for batch in splitter.val_dataloader():
        assert (batch["labels"] < unlabeled_code).all()


@pytest.mark.parametrize("load_sparse_tensor", [True, False])
def test_csr_minibatches_stay_sparse_by_default(concat_manager, load_sparse_tensor):
    """CSR data are read as torch CSR minibatches (the modules normalise them), and stay so."""
    adata, manager = concat_manager
    splitter = RefQueryDataSplitter(
        manager, use_query=True, batch_size=64, load_sparse_tensor=load_sparse_tensor
    )
    splitter.setup()
    layout = torch.sparse_csr if load_sparse_tensor else torch.strided
    ref_batch, query_batch = next(iter(splitter.train_dataloader()))
    val_batch = next(iter(splitter.val_dataloader()))
    for batch in (ref_batch, query_batch, val_batch):
        assert batch["X"].layout == layout
    # Lightning's hook after the device transfer keeps the paired batch as it is
    pair = (ref_batch, query_batch)
    assert splitter.on_after_batch_transfer(pair, 0) is pair
    rows = splitter.val_idx[: val_batch["X"].shape[0]]
    np.testing.assert_array_equal(val_batch["X"].to_dense().numpy(), adata.X[rows].toarray())


def test_validation_cells_join_the_query_stream(concat_manager):
    adata, manager = concat_manager
    splitter = RefQueryDataSplitter(
        manager, train_size=0.8, use_query=True, validation_in_query_stream=True, batch_size=64
    )
    splitter.setup()
    query_loader = splitter.train_dataloader().loader_b
    unlabelled = np.sort(np.asarray(query_loader.indices))
    expected = np.sort(np.concatenate([splitter.query_idx, splitter.val_idx]))
    np.testing.assert_array_equal(unlabelled, expected)
    # the labelled stream and the validation set are unchanged
    assert not set(splitter.ref_train_idx) & set(splitter.val_idx)
    default = RefQueryDataSplitter(manager, train_size=0.8, use_query=True, batch_size=64)
    default.setup()
    np.testing.assert_array_equal(default.val_idx, splitter.val_idx)
    np.testing.assert_array_equal(
        np.sort(np.asarray(default.train_dataloader().loader_b.indices)), splitter.query_idx
    )


def test_splitter_is_stratified_and_seeded(concat_manager):
    adata, manager = concat_manager
    a = RefQueryDataSplitter(manager, train_size=0.7)
    a.setup()
    b = RefQueryDataSplitter(manager, train_size=0.7)
    b.setup()
    np.testing.assert_array_equal(a.val_idx, b.val_idx)
    labels = adata.obs["cell_type"].to_numpy()
    for cell_type in np.unique(labels[a.labelled_idx]):
        n_type = (labels[a.labelled_idx] == cell_type).sum()
        assert (labels[a.val_idx] == cell_type).sum() == int(np.floor(0.3 * n_type))


def test_splitter_errors(concat_manager, synthetic_pair):
    _, manager = concat_manager
    with pytest.raises(ValueError, match="train_size"):
        RefQueryDataSplitter(manager, train_size=0.0)
    ref = synthetic_pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    ref_manager = lt.JIND(ref, n_top_genes=50).adata_manager
    with pytest.raises(ValueError, match="needs unlabelled query cells"):
        RefQueryDataSplitter(ref_manager, use_query=True)


def test_paired_loader_cycles_the_shorter():
    pairs = list(PairedDataLoader([1, 2], ["a", "b", "c", "d", "e"]))
    assert pairs == [(1, "a"), (2, "b"), (1, "c"), (2, "d"), (1, "e")]
    assert len(PairedDataLoader([1, 2, 3], ["a"])) == 3


#: The split of the synthetic pair for scvi's seed 0, recorded before RefQueryDataSplitter
#: was rebuilt on DataSplitter.__init__: (n_train, n_val) and the first 16 hex digits of the
#: SHA-1 of val_idx, ref_train_idx and train_idx (int64).
SEED_0_SPLITS = [
    (
        {"train_size": 0.8, "use_query": True},
        (884, 116),
        ("5787d85eac8a7518", "f70b2bb3a26ec3a1", "94f51d5e6efc1def"),
    ),
    (
        {"train_size": 0.7},
        (420, 180),
        ("994b71110bc015fb", "b1cc9d3046dd5dcb", "b1cc9d3046dd5dcb"),
    ),
    (
        {"train_size": 0.9, "use_query": True, "shuffle_set_split": False},
        (944, 56),
        ("15833f300027ddc3", "7ce32a8099f4f93b", "0385c5b57b69830f"),
    ),
]


@pytest.mark.parametrize(("kwargs", "sizes", "digests"), SEED_0_SPLITS)
def test_split_for_seed_0_is_unchanged(concat_manager, kwargs, sizes, digests):
    _, manager = concat_manager
    scvi.settings.seed = 0
    splitter = RefQueryDataSplitter(manager, batch_size=64, **kwargs)
    splitter.setup()

    def digest(indices: np.ndarray) -> str:
        return hashlib.sha1(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]

    assert (splitter.n_train, splitter.n_val) == sizes
    found = (splitter.val_idx, splitter.ref_train_idx, splitter.train_idx)
    assert tuple(digest(indices) for indices in found) == digests
    # the cells a reference-only step leaves out are DataSplitter's test set
    unused = [] if kwargs.get("use_query") else splitter.query_idx
    np.testing.assert_array_equal(splitter.test_idx, unused)


def test_sparse_minibatches_print_no_torch_warning():
    """torch's one-time CSR warnings (beta, invariant checks) do not reach the user.

    In a fresh process: within this one an earlier test may already have used them up.
    """
    code = (
        "import labeltransfer as lt\n"
        "r, _ = lt.data.synthetic(n_reference=200, n_query=10, n_genes=60, seed=0)\n"
        "lt.JIND.setup_anndata(r, labels_key='cell_type')\n"
        "lt.JIND(r).train(max_epochs=1, accelerator='cpu', enable_progress_bar=False)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True
    )
    assert "Sparse CSR tensor" not in out.stderr
    assert "invariant checks" not in out.stderr
