"""Bad input at the entry points shared by every model: a clear error, and the input untouched.

One test per case, run for each of the four models (they share ``setup_anndata`` and the query
preparation of :class:`~labeltransfer.base.AnnotationMixin`). Model-specific cases live with
each model's tests (e.g. ``tests/cellpredx`` for MuData, ``tests/data`` for gene activity).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import labeltransfer as lt

MODELS = ["JIND", "SCNYM", "SCDET", "CellPredX"]


@pytest.fixture(scope="module")
def pair():
    return lt.data.synthetic(n_reference=200, n_query=100, n_genes=50, n_types=3, seed=0)


def _dense(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.X = out.X.toarray()
    return out


def _snapshot(adata: ad.AnnData) -> tuple:
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    return x, adata.obs.copy(), adata.var.copy(), set(adata.uns)


def _assert_unchanged(adata: ad.AnnData, before: tuple) -> None:
    x, obs, var, uns = before
    now = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    np.testing.assert_array_equal(now, x)
    pd.testing.assert_frame_equal(adata.obs, obs)
    pd.testing.assert_frame_equal(adata.var, var)
    assert set(adata.uns) == uns


def _setup_fails(model: str, adata, error, match: str, **kwargs) -> None:
    before = _snapshot(adata) if isinstance(adata, ad.AnnData) else None
    with pytest.raises(error, match=match):
        getattr(lt, model).setup_anndata(adata, **{"labels_key": "cell_type", **kwargs})
    if before is not None:
        _assert_unchanged(adata, before)


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_non_anndata(model):
    _setup_fails(model, np.zeros((3, 3)), TypeError, "must be an AnnData")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_a_missing_labels_key(model, pair):
    _setup_fails(model, pair[0].copy(), KeyError, "labels_key 'nope'", labels_key="nope")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_an_empty_anndata(model, pair):
    _setup_fails(model, pair[0][:0].copy(), ValueError, "0 cells")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_all_cells_unlabelled(model, pair):
    ref = pair[0].copy()
    ref.obs["cell_type"] = "Unknown"
    _setup_fails(
        model, ref, ValueError, "at least one labelled cell", unlabeled_category="Unknown"
    )


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_setup_rejects_non_finite_values(model, pair, value):
    ref = _dense(pair[0])
    ref.X[0, 0] = value
    _setup_fails(model, ref, ValueError, "non-finite values")


@pytest.mark.parametrize("model", MODELS)
def test_setup_rejects_negative_values(model, pair):
    ref = _dense(pair[0])
    ref.X[0, 0] = -1.0
    _setup_fails(model, ref, ValueError, "negative values")


# ----------------------------------------------------------------------------- query side
@pytest.fixture(scope="module")
def trained_jind(pair):
    scvi.settings.seed = 0
    ref = pair[0].copy()
    lt.JIND.setup_anndata(ref, labels_key="cell_type")
    model = lt.JIND(ref)
    model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    return model


def _annotate_fails(model, query, error, match: str) -> None:
    before = _snapshot(query) if isinstance(query, ad.AnnData) else None
    with pytest.raises(error, match=match):
        model.annotate(query)
    if before is not None:
        _assert_unchanged(query, before)


def test_annotate_rejects_a_non_anndata(trained_jind):
    _annotate_fails(trained_jind, "query.h5ad", TypeError, "Expected an AnnData")


def test_annotate_rejects_a_query_without_shared_genes(trained_jind, pair):
    query = pair[1].copy()
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    _annotate_fails(trained_jind, query, ValueError, "overlap")


def test_annotate_rejects_a_query_of_another_kind(trained_jind, pair):
    query = pair[1].copy()
    query.X = np.log1p(query.X.toarray() / query.X.sum(axis=1).A * 1e4)
    _annotate_fails(trained_jind, query, ValueError, "trained on 'counts'")


def test_annotate_rejects_an_unknown_rejection_rule(trained_jind, pair):
    query = pair[1].copy()
    before = _snapshot(query)
    with pytest.raises(ValueError, match="Unknown rejection rule"):
        trained_jind.annotate(query, rejection="strict")
    _assert_unchanged(query, before)


def test_annotate_rejects_a_key_that_would_overwrite_registered_fields(trained_jind):
    with pytest.raises(ValueError, match="would overwrite"):
        trained_jind.annotate(key_added="cell_type")
