"""Annotating refuses data and keys that would give a silently wrong or destructive result.

Issue 15, families 6 (the registered reference changed after training), 9 (``key_added``
over the user's fields) and 10 (a query whose data are in another layer). Every refusal is
checked for its message and for an input left as it was.
"""

from __future__ import annotations

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scvi

import labeltransfer as lt

OUTPUTS = ("jind", "jind_prediction", "jind_confidence", "jind_rejected")


@pytest.fixture(scope="module")
def pair():
    return lt.data.synthetic(n_reference=200, n_query=100, n_genes=50, n_types=3, seed=0)


def _train(ref: ad.AnnData, **setup) -> lt.JIND:
    scvi.settings.seed = 0
    lt.JIND.setup_anndata(ref, labels_key="cell_type", **setup)
    model = lt.JIND(ref, n_top_genes=None)
    model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
    return model


@pytest.fixture(scope="module")
def trained(pair):
    """JIND on the reference's counts in X, with the batch column registered."""
    return _train(pair[0].copy(), batch_key="batch")


@pytest.fixture(scope="module")
def trained_on_layer(pair):
    """JIND set up with ``layer="counts"`` (X holds log-normalised data)."""
    ref = pair[0].copy()
    ref.layers["counts"] = ref.X.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    return _train(ref, layer="counts")


def _state(adata: ad.AnnData) -> tuple:
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.array(adata.X)
    obsm = {k: np.array(v) for k, v in adata.obsm.items()}
    return x, adata.obs.copy(), obsm, copy.deepcopy(dict(adata.uns)), dict(adata.layers)


def _assert_same(adata: ad.AnnData, before: tuple) -> None:
    x, obs, obsm, uns, layers = before
    now = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    np.testing.assert_array_equal(now, x)
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.obsm) == set(obsm)
    for key, value in obsm.items():
        np.testing.assert_array_equal(np.asarray(adata.obsm[key]), value)
    assert set(adata.uns) == set(uns)
    assert set(adata.layers) == set(layers)


def _log_normalise(adata: ad.AnnData) -> None:
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)


# ------------------------------------------------------- registered data changed in place
def test_registered_reference_normalised_after_training_is_refused(pair):
    ref = pair[0].copy()
    model = _train(ref)
    model.annotate()  # the counts it was trained on: fine
    calls = ref.obs["jind_prediction"].astype(str)
    assert (calls == ref.obs["cell_type"].astype(str)).mean() > 0.5  # chance: 1/3
    _log_normalise(ref)
    before = _state(ref)
    message = (
        r"The data registered with the model \(X\) now look 'lognorm', but the model was "
        r"trained on 'counts' data: they were changed after setup \(e.g. normalised in place "
        r"with `sc.pp.normalize_total` / `sc.pp.log1p`\). Put the raw counts back into X"
    )
    with pytest.raises(ValueError, match=message):
        model.annotate(key_added="again")
    with pytest.raises(ValueError, match=message):
        model.predict()
    with pytest.raises(ValueError, match=message):
        model.get_latent_representation()
    with pytest.raises(ValueError, match=message):
        model.annotate(ref, key_added="again")  # the registered AnnData passed explicitly
    _assert_same(ref, before)


def test_registered_layer_normalised_after_training_is_refused(trained_on_layer):
    ref = trained_on_layer.adata
    counts = ref.layers["counts"]
    ref.layers["counts"] = ref.X.copy()  # e.g. the log-normalised data written over the counts
    try:
        with pytest.raises(ValueError, match=r"registered with the model \(layers\['counts'\]\)"):
            trained_on_layer.predict()
    finally:
        ref.layers["counts"] = counts
    assert len(trained_on_layer.predict()) == ref.n_obs


def test_a_registered_copy_that_holds_the_counts_is_accepted(pair):
    ref = pair[0].copy()
    model = _train(ref)
    expected = model.predict(soft=True)
    counts = ref.copy()
    _log_normalise(ref)
    pd.testing.assert_frame_equal(model.predict(counts, soft=True), expected)


def test_a_registered_copy_with_its_genes_reordered_is_read_by_gene_name(pair):
    """A copy or view of the registered AnnData carries its scvi-tools id; with its genes
    reordered it is a query, its genes matched by name, and its ``uns`` (the id) is left as
    it was."""
    ref = pair[0].copy()
    model = _train(ref)
    expected = model.predict(soft=True)
    reordered = ref[:, ref.var_names[::-1]].copy()
    uns = copy.deepcopy(dict(reordered.uns))
    pd.testing.assert_frame_equal(model.predict(reordered, soft=True), expected)
    view = ref[:, ref.var_names[::-1]]
    pd.testing.assert_frame_equal(model.predict(view, soft=True), expected)
    assert reordered.uns["_scvi_uuid"] == uns["_scvi_uuid"]
    assert set(reordered.uns) == set(uns)


# ------------------------------------------------------------------ key_added
@pytest.mark.parametrize(
    ("prepare", "key", "shown"),
    [
        (
            lambda q: (
                q.obsm.__setitem__("X_pca", np.ones((q.n_obs, 2))),
                q.uns.__setitem__("pca", {"variance": np.ones(2)}),
            ),
            "pca",
            r"\[\"obsm\['X_pca'\]\", \"uns\['pca'\]\"\]",
        ),
        (lambda q: q.obs.__setitem__("leiden", "0"), "leiden", r"\[\"obs\['leiden'\]\"\]"),
        (
            lambda q: q.obsm.__setitem__("umap_probabilities", np.ones((q.n_obs, 2))),
            "umap",
            r"\[\"obsm\['umap_probabilities'\]\"\]",
        ),
        (
            lambda q: q.uns.__setitem__("jind", {"method": "scANVI"}),
            "jind",
            r"\[\"uns\['jind'\]\"\]",
        ),
    ],
    ids=["pca", "obs-column", "obsm-entry", "uns-of-another-tool"],
)
def test_key_added_over_fields_not_written_by_labeltransfer_is_refused(
    trained, pair, prepare, key, shown
):
    query = pair[1].copy()
    prepare(query)
    before = _state(query)
    with pytest.raises(
        ValueError,
        match=rf"key_added='{key}' would overwrite {shown}, which no labeltransfer model wrote "
        rf"\(uns\['{key}'\]\['method'\] does not name one\). Choose another key_added",
    ):
        trained.annotate(query, key_added=key)
    _assert_same(query, before)


def test_key_added_equal_to_the_registered_batch_column_is_refused(trained, pair):
    query = pair[1].copy()
    before = _state(query)
    with pytest.raises(
        ValueError, match=r"key_added='batch' would overwrite \['batch'\], which the model regi"
    ):
        trained.annotate(query, key_added="batch")
    _assert_same(query, before)


def test_a_previous_annotation_is_overwritten_with_a_warning_also_after_h5ad(
    trained, pair, tmp_path
):
    query = pair[1].copy()
    trained.annotate(query, key_added="jind")
    query.write_h5ad(tmp_path / "annotated.h5ad")
    back = ad.read_h5ad(tmp_path / "annotated.h5ad")
    with pytest.warns(
        UserWarning,
        match=r"Overwriting the previous annotation in \[\"obs\['jind'\]\", .*\"obsm\['X_jind'\]"
        r"\", \"uns\['jind'\]\"\] \(key_added='jind'\)",
    ):
        trained.annotate(back, key_added="jind")
    assert set(OUTPUTS) <= set(back.obs.columns)


def test_key_added_over_a_zarr_store_entry_is_refused(trained, pair, tmp_path):
    query = pair[1].copy()
    query.obsm["X_pca"] = np.ones((query.n_obs, 2), dtype=np.float32)
    path = tmp_path / "query.zarr"
    query.write_zarr(path)
    with pytest.raises(ValueError, match=r"would overwrite \[\"obsm\['X_pca'\]\"\]"):
        trained.annotate(path, key_added="pca")
    back = ad.read_zarr(path)
    assert list(back.obs.columns) == list(query.obs.columns)
    np.testing.assert_array_equal(back.obsm["X_pca"], query.obsm["X_pca"])
    trained.annotate(path, key_added="jind")  # a store annotated before: warns, not refused
    with pytest.warns(UserWarning, match="Overwriting the previous annotation"):
        trained.annotate(path, key_added="jind")


# ------------------------------------------------------------------ layer=
def test_a_query_without_the_registered_layer_gets_a_fix_that_exists(trained_on_layer, pair):
    query = pair[1].copy()
    query.layers["raw"] = query.X.copy()
    before = _state(query)
    with pytest.raises(
        KeyError,
        match=r"The query has no layer 'counts' \(the layer the model was set up with; its "
        r"layers: \['raw'\]\). Name the query's layer that holds raw counts with `layer=` "
        r"\(e.g. `model.annotate\(query, layer='counts'\)`\), or pass layer='X' to read its X.",
    ):
        trained_on_layer.annotate(query)
    _assert_same(query, before)
    # both suggested fixes work, and give the calls of a query laid out as the model's data
    laid_out = pair[1].copy()
    laid_out.layers["counts"] = laid_out.X.copy()
    _log_normalise(laid_out)
    expected = trained_on_layer.predict(laid_out, soft=True)
    pd.testing.assert_frame_equal(trained_on_layer.predict(query, soft=True, layer="X"), expected)
    pd.testing.assert_frame_equal(
        trained_on_layer.predict(query, soft=True, layer="raw"), expected
    )
    trained_on_layer.annotate(query, layer="raw")
    assert set(OUTPUTS) <= set(query.obs.columns)
    np.testing.assert_allclose(
        trained_on_layer.get_latent_representation(query, layer="raw"), query.obsm["X_jind"]
    )


def test_a_lognormalised_query_with_counts_in_a_layer_uses_layer(trained, pair):
    query = pair[1].copy()
    query.layers["counts"] = query.X.copy()
    _log_normalise(query)
    with pytest.raises(
        ValueError,
        match=r"The query \(X\) looks 'lognorm' but the model was trained on 'counts' data. "
        r"Give the query in the same form as the reference \(raw counts\): name the layer "
        r"that holds them with `layer=`",
    ):
        trained.annotate(query)
    expected = trained.predict(pair[1].copy(), soft=True)
    pd.testing.assert_frame_equal(trained.predict(query, soft=True, layer="counts"), expected)


def test_layer_for_the_registered_data_is_refused(trained):
    with pytest.raises(ValueError, match=r"layer='counts' selects the data of a query.*Leave"):
        trained.predict(layer="counts")


def test_the_registered_data_passed_or_copied_are_annotated_as_the_model_own(pair):
    """A co-trained model's registered AnnData gives the same calls, confidences and novelty
    whether it is left out, passed itself, or passed as a copy with its genes in order: its
    reference cells stay reference cells in the coverage test. The copy's ``uns`` keeps its
    id and the model keeps no manager of it after the call."""
    reference, query = pair
    data = lt.data.concat_reference_query(reference.copy(), query.copy(), labels_key="cell_type")
    scvi.settings.seed = 0
    lt.SCNYM.setup_anndata(data, labels_key="cell_type")
    model = lt.SCNYM(data)
    model.train(max_epochs=3, enable_progress_bar=False, accelerator="cpu")
    store = type(model)._per_instance_manager_store[model.id]
    n_managers = len(store)
    model.annotate(key_added="own")
    model.annotate(data, key_added="passed")
    copied = data.copy()
    uns = copy.deepcopy(dict(copied.uns))
    model.annotate(copied, key_added="own")
    columns = ["own", "own_prediction", "own_confidence", "own_rejected", "own_novelty"]
    pd.testing.assert_frame_equal(copied.obs[columns], data.obs[columns])
    passed = data.obs[[c.replace("own", "passed") for c in columns]]
    passed.columns = columns
    pd.testing.assert_frame_equal(passed, data.obs[columns])
    assert data.obs["own_rejected"].any()  # the coverage test and the rule ran on something
    assert copied.uns["_scvi_uuid"] == uns["_scvi_uuid"]
    assert len(store) == n_managers
