"""Inference minibatches read straight from the registered matrix equal scvi's data loader's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

import labeltransfer as lt
from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base._batches import NORMALIZED_KEY, ExpressionBatches


@pytest.mark.parametrize("storage", ["csr", "dense_float64"])
@pytest.mark.parametrize("rows", ["all", "shuffled"])
def test_batches_equal_the_data_loader(synthetic_pair, storage, rows):
    adata = synthetic_pair[0][:700].copy()
    if storage == "dense_float64":
        adata.X = adata.X.toarray().astype(np.float64)
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    model = lt.JIND(adata)
    indices = None if rows == "all" else np.random.default_rng(0).permutation(adata.n_obs)[:500]
    batches = model._batches(adata, indices, 128)
    assert isinstance(batches, ExpressionBatches)
    assert batches.matrix is adata.X
    ours = list(batches)
    theirs = list(model._make_data_loader(adata=adata, indices=indices, batch_size=128))
    n_rows = adata.n_obs if indices is None else indices.size
    assert len(ours) == len(theirs) == len(batches) == -(-n_rows // 128)
    for a, b in zip(ours, theirs, strict=True):
        assert a[REGISTRY_KEYS.X_KEY].dtype == torch.float32
        assert torch.equal(a[REGISTRY_KEYS.X_KEY], b[REGISTRY_KEYS.X_KEY])


def test_batches_never_share_the_callers_memory():
    """A module writing into its input cannot reach the caller's matrix."""
    matrix = np.ones((10, 4), dtype=np.float32)
    for batch in ExpressionBatches(matrix, batch_size=4):
        batch[REGISTRY_KEYS.X_KEY].zero_()
    csr = sparse.csr_matrix(matrix)
    for batch in ExpressionBatches(csr, batch_size=4):
        batch[REGISTRY_KEYS.X_KEY].zero_()
    assert matrix.min() == 1
    assert csr.toarray().min() == 1


def test_normalised_batches_give_the_networks_outputs_of_raw_ones(synthetic_pair):
    """CSR minibatches normalised as read: the network's outputs and coverage coordinates of
    the densified minibatches, and the caller's matrix untouched."""
    adata = synthetic_pair[0][:600].copy()
    lt.JIND.setup_anndata(adata, labels_key="cell_type")
    model = lt.JIND(adata)
    model.train(max_epochs=2, enable_progress_bar=False)
    assert model.reference_space_ is not None
    before = adata.X.copy()
    indices = np.random.default_rng(0).permutation(adata.n_obs)[:400]
    raw = model._batches(adata, indices, 128)
    prepared = model._batches(adata, indices, 128, normalized=True, coverage=True)
    module = model.module.eval()
    with torch.inference_mode():
        for a, b in zip(raw, prepared, strict=True):
            assert REGISTRY_KEYS.X_KEY not in b
            out_a = module.inference(**module._get_inference_input(a))
            out_b = module.inference(**module._get_inference_input(b))
            for key in ("z", "logits"):
                torch.testing.assert_close(out_b[key], out_a[key], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(model._coords(b), model._coords(a), rtol=1e-5, atol=1e-5)
            b[NORMALIZED_KEY].zero_()  # a module writing into its input
    assert (adata.X != before).nnz == 0
