"""Annotating a query stored as zarr, chunk by chunk, with the results written into the store."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.abc import CSRDataset

from labeltransfer.base import _inference, _openset_mixin
from labeltransfer.base._zarr import is_lazy, open_zarr

FIELDS = ("jind", "jind_prediction", "jind_confidence", "jind_rejected")


def test_zarr_query_is_annotated_in_chunks_and_written_back(
    model_and_query, tmp_path, monkeypatch
):
    model, query = model_and_query
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    # the query's residual axes are fitted on a sample of 30 cells, read at once
    monkeypatch.setattr(_openset_mixin, "MIN_FIT", 30)
    monkeypatch.setattr(_openset_mixin, "FIT_VALUES", 30 * model.module.n_features)
    expected = model.annotate(query, key_added="jind", copy=True)

    reads = []
    original = type(open_zarr(path).X).__getitem__

    def spy(self, index):
        out = original(self, index)
        reads.append(out.shape[0])
        return out

    monkeypatch.setattr(type(open_zarr(path).X), "__getitem__", spy)
    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 37)  # several uneven chunks
    assert model.annotate(path, key_added="jind") is None
    assert reads[0] == 30  # the sample
    assert max(reads[1:]) <= 37  # then X was read 37 cells at a time, never whole

    back = ad.read_zarr(path)
    for column in FIELDS:
        pd.testing.assert_series_equal(back.obs[column], expected.obs[column])
    pd.testing.assert_series_equal(back.obs["cell_type"], query.obs["cell_type"])
    np.testing.assert_allclose(back.obsm["X_jind"], expected.obsm["X_jind"], rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(back.obsm["jind_probabilities"]),
        np.asarray(expected.obsm["jind_probabilities"]),
        rtol=1e-5,
    )
    assert back.uns["jind"]["n_cells"] == query.n_obs
    assert (back.X != query.X).nnz == 0  # X untouched

    # a second annotation under another key keeps the first one
    model.annotate(str(path), key_added="again")
    back = ad.read_zarr(path)
    assert {"jind", "again"} <= set(back.obs.columns)
    assert {"X_jind", "X_again"} <= set(back.obsm)


def test_predict_and_latent_read_a_zarr_path(model_and_query, tmp_path):
    model, query = model_and_query
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    lazy = open_zarr(path)
    assert isinstance(lazy.X, CSRDataset)
    assert is_lazy(lazy)
    np.testing.assert_array_equal(model.predict(path), model.predict(query))
    np.testing.assert_array_equal(
        model.predict(path, indices=[5, 80, 3]), model.predict(query, indices=[5, 80, 3])
    )
    np.testing.assert_allclose(
        model.get_latent_representation(path), model.get_latent_representation(query), rtol=1e-5
    )


def test_dense_zarr_query(model_and_query, tmp_path):
    model, query = model_and_query
    dense = query.copy()
    dense.X = dense.X.toarray()
    path = tmp_path / "dense.zarr"
    dense.write_zarr(path)
    assert is_lazy(open_zarr(path))
    model.annotate(path, key_added="jind")
    expected = model.annotate(query, key_added="jind", copy=True)
    pd.testing.assert_series_equal(ad.read_zarr(path).obs["jind"], expected.obs["jind"])


def test_zarr_errors(model_and_query, tmp_path):
    model, query = model_and_query
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    with pytest.raises(ValueError, match="copy=True"):
        model.annotate(path, copy=True)
    with pytest.raises(FileNotFoundError, match="write_zarr"):
        model.annotate(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="write_zarr"):
        model.annotate(tmp_path / "empty")
    with pytest.raises(ValueError, match="backed"):
        model.annotate(open_zarr(path), copy=True)
