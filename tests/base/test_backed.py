"""Annotating a query opened in backed mode, chunk by chunk."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi

import labeltransfer as lt
from labeltransfer.base import _inference, _openset_mixin


def test_backed_query_gives_the_in_memory_annotation(model_and_query, tmp_path, monkeypatch):
    model, query = model_and_query
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    expected = model.annotate(ad.read_h5ad(path), key_added="jind", copy=True)

    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 37)  # several uneven chunks
    backed = ad.read_h5ad(path, backed="r+")
    model.annotate(backed, key_added="jind")
    assert backed.isbacked  # X was never loaded into the object
    for column in ("jind", "jind_prediction", "jind_confidence", "jind_rejected"):
        pd.testing.assert_series_equal(backed.obs[column], expected.obs[column])
    np.testing.assert_allclose(backed.obsm["X_jind"], expected.obsm["X_jind"], rtol=1e-5)
    pd.testing.assert_frame_equal(
        backed.obsm["jind_probabilities"], expected.obsm["jind_probabilities"]
    )
    np.testing.assert_array_equal(
        model.predict(backed, indices=[5, 80, 3]), model.predict(query, indices=[5, 80, 3])
    )
    np.testing.assert_allclose(
        model.get_latent_representation(backed), expected.obsm["X_jind"], rtol=1e-5
    )

    backed.write()  # in place: obs/obsm/uns are written, X stays as it is on disk
    backed.file.close()
    back = ad.read_h5ad(path)
    pd.testing.assert_series_equal(back.obs["jind"], expected.obs["jind"])
    assert back.uns["jind"]["n_cells"] == query.n_obs
    assert (back.X != query.X).nnz == 0


def test_a_large_query_in_memory_is_annotated_chunk_by_chunk(model_and_query, monkeypatch):
    model, query = model_and_query
    # the query's residual axes are fitted on a sample of 30 cells, read at once
    monkeypatch.setattr(_openset_mixin, "MIN_FIT", 30)
    monkeypatch.setattr(_openset_mixin, "FIT_VALUES", 30 * model.module.n_features)
    reordered = query[:, query.var_names[::-1]].copy()  # genes in another order: reindexed
    expected = model.annotate(reordered, key_added="jind", copy=True)
    in_order = query.copy()  # the model's gene order: chunks share the query's CSR arrays
    expected_in_order = model.annotate(in_order, key_added="jind", copy=True)
    seen = []
    original = model._prepare

    def prepare(adata, **kwargs):
        seen.append(adata.n_obs)
        return original(adata, **kwargs)

    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 37)
    monkeypatch.setattr(model, "_prepare", prepare)
    out = model.annotate(reordered, key_added="jind", copy=True)
    assert seen[0] == 30  # the sample
    assert max(seen[1:]) == 37  # then never the whole query at once
    assert sum(seen[1:]) == query.n_obs
    for column in ("jind", "jind_prediction", "jind_confidence", "jind_novelty"):
        pd.testing.assert_series_equal(out.obs[column], expected.obs[column])
    np.testing.assert_allclose(out.obsm["X_jind"], expected.obsm["X_jind"], rtol=1e-5)

    matrix = in_order.X.copy()
    model.annotate(in_order, key_added="jind")
    for column in ("jind", "jind_prediction", "jind_confidence", "jind_novelty"):
        pd.testing.assert_series_equal(in_order.obs[column], expected_in_order.obs[column])
    for part in ("data", "indices", "indptr"):  # read in place, never written
        np.testing.assert_array_equal(getattr(in_order.X, part), getattr(matrix, part))


def test_backed_query_refuses_copy(model_and_query, tmp_path):
    model, query = model_and_query
    query.write_h5ad(tmp_path / "q.h5ad")
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    with pytest.raises(ValueError, match="backed"):
        model.annotate(backed, copy=True)


def test_annotated_queries_are_not_kept_by_the_model(model_and_query):
    """scvi keeps every registered AnnData; a query registered for one call is released."""
    model, query = model_and_query
    store = model._per_instance_manager_store[model.id]
    class_store = type(model)._setup_adata_manager_store
    before, class_before = set(store), set(class_store)
    for _ in range(3):
        model.annotate(query, key_added="jind", copy=True)
        model.predict(query)
        model.get_latent_representation(query)
    lt.tl.integrated_gradients(model, query, target="type_0", n_steps=5, indices=[0, 1])
    lt.tl.marker_genes(model, query, groupby="cell_type", n_cells=5, n_steps=5, n_top=3)
    assert set(store) == before
    assert set(class_store) == class_before
    assert model.adata_manager.adata_uuid in store
    model.align(query, max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    assert set(store) == before  # the model's own data stays registered
    assert set(class_store) == class_before


def test_a_query_is_released_when_inference_fails(model_and_query, monkeypatch):
    model, query = model_and_query
    store = model._per_instance_manager_store[model.id]
    class_store = type(model)._setup_adata_manager_store
    before, class_before = set(store), set(class_store)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.predict(query)
    assert (set(store), set(class_store)) == (before, class_before)


def test_backed_query_warns_once_about_cells_without_counts(
    model_and_query, tmp_path, monkeypatch
):
    model, query = model_and_query
    query = query[:100].copy()
    matrix = query.X.tolil()
    matrix[[3, 50, 90], :] = 0  # one empty cell in each of three chunks
    query.X = matrix.tocsr()
    query.write_h5ad(tmp_path / "q.h5ad")
    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 37)
    backed = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    with pytest.warns(UserWarning, match="query cells have no counts") as record:
        model.annotate(backed, key_added="jind")
    messages = [str(w.message) for w in record if "have no counts" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("3 of 100 query cells")
    assert backed.obs["jind_rejected"].iloc[[3, 50, 90]].all()


def test_the_registered_data_opened_backed_keep_their_reference_cells(
    synthetic_pair, tmp_path, monkeypatch
):
    """Passed explicitly and read chunk by chunk, the model's own data are annotated as its own.

    Its labelled cells stay reference cells in the coverage test (read from each chunk's
    registry): counted as query cells they changed 8% of the calls and the novelty by up to
    0.56 on this set.
    """
    scvi.settings.seed = 0
    ref, query = synthetic_pair
    query = query.copy()
    query.obs["cell_type"] = "Unknown"
    both = ad.concat([ref, query], merge="same")
    both.obs_names_make_unique()
    both.write_h5ad(tmp_path / "both.h5ad")
    backed = ad.read_h5ad(tmp_path / "both.h5ad", backed="r")
    lt.JIND.setup_anndata(backed, labels_key="cell_type", unlabeled_category="Unknown")
    model = lt.JIND(backed, n_top_genes=100)
    model.train(max_epochs=5, enable_progress_bar=False, accelerator="cpu")
    model.annotate(key_added="own")
    monkeypatch.setattr(_inference, "BACKED_CHUNK_SIZE", 301)  # several chunks
    model.annotate(backed, key_added="passed")
    obs = model.adata.obs
    np.testing.assert_array_equal(obs["passed"].to_numpy(), obs["own"].to_numpy())
    np.testing.assert_array_equal(obs["passed_novelty"].to_numpy(), obs["own_novelty"].to_numpy())
