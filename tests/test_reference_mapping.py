"""Reference mapping with every model: prepare_query_anndata / load_query_data (issue 17)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import scvi
import torch

import labeltransfer as lt

MODELS = ["JIND", "SCNYM", "SCDET", "CellPredX"]
FAST = {"enable_progress_bar": False, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def pair():
    """A reference and a batch-shifted query (different genes order, same types)."""
    return lt.data.synthetic(
        n_reference=600, n_query=300, n_genes=200, n_types=4, batch_shift=0.5, seed=3
    )


@pytest.fixture(scope="module")
def references(pair, tmp_path_factory):
    """One reference model of each class, trained on the labelled reference alone and saved."""
    folder = tmp_path_factory.mktemp("references")
    saved = {}
    for name in MODELS:
        scvi.settings.seed = 0
        ref = pair[0].copy()
        ref.obs["batch"] = "ref"
        cls = getattr(lt, name)
        cls.setup_anndata(ref, labels_key="cell_type", batch_key="batch")
        model = cls(ref, **({"n_top_genes": None} if name == "SCDET" else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=30, **FAST)
        model.save(folder / name)
        saved[name] = (model, folder / name)
    return saved


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _accuracy(model, query) -> float:
    truth = query.obs["cell_type"].astype(str).to_numpy()
    return float(np.mean(np.asarray(model.predict(query)).astype(str) == truth))


@pytest.mark.parametrize("name", MODELS)
def test_load_query_data_round_trip(references, pair, tmp_path, name):
    """Load a saved reference with a query, fit it, annotate, save and load it back."""
    _, folder = references[name]
    query = pair[1].copy()
    query.obs["batch"] = "stim"  # a batch category the reference never saw
    before = query.copy()
    cls = getattr(lt, name)
    model = cls.load_query_data(query, folder)
    assert model.adata is not None
    assert model.adata.n_obs == query.n_obs
    assert model.query_mapping_["fitted"] is False
    assert model.query_mapping_["gene_overlap"]["overlap"] == 1.0
    model.train(max_epochs=3, **FAST)
    assert model.query_mapping_["fitted"] is True
    expected = "alignment" if name == "JIND" else "encoder fine-tuning"
    assert model.query_mapping_["method"] == expected
    assert _accuracy(model, query) >= 0.85
    model.annotate(query, key_added="mapped")
    assert {"mapped", "mapped_prediction", "mapped_confidence", "mapped_rejected"} <= set(
        query.obs
    )
    if name == "JIND":
        assert query.uns["mapped"]["aligned"]
    # the query's own data are unchanged (annotate only adds fields)
    np.testing.assert_array_equal(query.X.toarray(), before.X.toarray())
    assert list(query.var_names) == list(before.var_names)

    model.save(tmp_path / "mapped")
    loaded = cls.load(tmp_path / "mapped")
    assert loaded.adata is None
    np.testing.assert_array_equal(
        np.asarray(loaded.predict(query)), np.asarray(model.predict(query))
    )


@pytest.mark.parametrize("name", MODELS)
def test_reference_model_is_not_modified(references, pair, name):
    """Mapping from the model object or its folder changes neither the object nor the files."""
    model, folder = references[name]
    files = _digest(folder)
    state = {k: v.clone() for k, v in model.module.state_dict().items()}
    attributes = set(vars(model))
    predictions = model.predict(pair[1], soft=True)
    cls = getattr(lt, name)
    for reference in (model, folder):
        mapped = cls.load_query_data(pair[1], reference)
        mapped.train(max_epochs=2, **FAST)
        assert mapped.module is not model.module
    assert _digest(folder) == files
    assert set(vars(model)) == attributes
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    np.testing.assert_array_equal(model.predict(pair[1], soft=True), predictions)
    assert model.adata is not None  # still the reference's model


def test_query_with_missing_and_extra_genes(references, pair):
    """Missing genes are zero-filled and counted; extra genes are dropped."""
    _, folder = references["SCNYM"]
    query = pair[1].copy()
    keep = query.var_names[20:]
    query = query[:, keep].copy()
    query.var_names = list(query.var_names[:-5]) + [f"extra_{i}" for i in range(5)]
    model = lt.SCNYM.load_query_data(query, folder)
    overlap = model.query_mapping_["gene_overlap"]
    assert overlap["n_missing"] == 25
    assert overlap["n_shared"] == 175
    assert list(model.adata.var_names) == list(pair[0].var_names)
    model.train(max_epochs=2, **FAST)
    model.annotate(query, key_added="m")
    assert query.uns["m"]["gene_overlap"]["n_missing"] == 25

    genes = lt.SCNYM.prepare_query_anndata(query, folder, return_reference_var_names=True)
    assert list(genes) == list(pair[0].var_names)
    prepared = lt.SCNYM.prepare_query_anndata(query, folder, inplace=False)
    assert list(prepared.var_names) == list(pair[0].var_names)
    assert prepared.uns["lt_gene_overlap"]["n_missing"] == 25
    assert prepared.X[:, :20].nnz == 0
    assert query.n_vars == 180  # inplace=False leaves the query as it was
    assert lt.SCNYM.prepare_query_anndata(query, folder) is None
    assert list(query.var_names) == list(pair[0].var_names)


def test_loading_needs_no_reference_data(references, pair, tmp_path):
    """A saved model's folder holds model.pt only; mapping reads nothing else."""
    _, folder = references["CellPredX"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.pt"]
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.pt").write_bytes((folder / "model.pt").read_bytes())
    model = lt.CellPredX.load_query_data(pair[1], copy)
    codes = model.reference_codes_
    assert codes["codes"].shape == (600, model.module.n_latent)
    assert codes["labels"].shape == (600,)
    model.train(max_epochs=2, **FAST)
    assert _accuracy(model, pair[1]) >= 0.85


def test_a_model_of_another_class_names_the_right_call(references, pair):
    _, folder = references["SCNYM"]
    with pytest.raises(ValueError, match=r"holds a SCNYM model, not a JIND one; map with "):
        lt.JIND.load_query_data(pair[1], folder)
    model, _ = references["SCDET"]
    with pytest.raises(ValueError, match=r"is a SCDET, not a SCNYM; map with `lt.SCDET"):
        lt.SCNYM.load_query_data(pair[1], model)


def test_mapping_train_warns_about_reference_only_arguments(references, pair):
    _, folder = references["SCNYM"]
    model = lt.SCNYM.load_query_data(pair[1], folder)
    with pytest.warns(UserWarning, match=r"train_size apply to training a reference model"):
        model.train(max_epochs=1, train_size=0.5, **FAST)


def test_safeguard_reverts_a_fit_that_breaks_the_anchors(references, pair):
    """A fit that changes the reference model's confident calls is undone, and says so."""
    model, folder = references["SCNYM"]
    query = pair[1].copy()
    mapped = lt.SCNYM.load_query_data(query, folder)
    start = {k: v.clone() for k, v in mapped.module.embedder.state_dict().items()}
    # an absurd learning rate scrambles the embedder in one epoch
    with pytest.warns(UserWarning, match=r"so the fit was undone: this model makes the refer"):
        mapped.train(max_epochs=5, plan_kwargs={"lr": 10.0, "adversary_weight": 10.0}, **FAST)
    decision = mapped.query_mapping_["safeguard"]
    assert decision["reverted"] is True
    assert decision["kept_epoch"] == 0
    assert decision["stopped_early"] is True
    assert decision["epochs_run"] == 1  # stopped at the first epoch below the tolerance
    assert decision["agreement"][0] < 1 - decision["tolerance"]
    assert decision["n_anchors"] == int(np.ceil(query.n_obs / 2))
    assert list(mapped.history["map_train_anchor_agreement"].iloc[:, 0]) == pytest.approx(
        decision["agreement"],
        abs=5e-5,  # the decision keeps 4 decimals
    )
    # the weights are the reference model's; the batch norms' running statistics are the
    # query's, fitted before the fit (annotate() uses the query's statistics for it anyway)
    for key, value in mapped.module.embedder.named_parameters():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    np.testing.assert_array_equal(
        np.asarray(mapped.predict(query, soft=True)), np.asarray(model.predict(query, soft=True))
    )
    mapped.annotate(query, key_added="mapped")
    recorded = query.uns["mapped"]["query_mapping"]
    assert recorded["safeguard"]["reverted"] is True
    assert recorded["method"] == "encoder fine-tuning"


def test_safeguard_keeps_a_fit_that_keeps_the_anchors(references, pair):
    _, folder = references["SCNYM"]
    mapped = lt.SCNYM.load_query_data(pair[1], folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped.train(max_epochs=3, **FAST)
    assert not [w for w in caught if "the fit was undone" in str(w.message)]
    decision = mapped.query_mapping_["safeguard"]
    assert decision["reverted"] is False
    assert decision["epochs_run"] == 3
    assert decision["kept_epoch"] == 3
    assert min(decision["agreement"]) >= 1 - decision["tolerance"]
