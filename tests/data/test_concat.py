from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from labeltransfer.data import concat_reference_query, synthetic


@pytest.fixture(scope="module")
def pair() -> tuple[ad.AnnData, ad.AnnData]:
    return synthetic(n_reference=60, n_query=40, n_genes=50, n_types=3, n_markers=5, seed=1)


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return func(*args, **kwargs)


def test_concat_fields(pair):
    reference, query = pair
    query = query[:, ::-1].copy()  # reversed gene order
    ref_X, query_X = reference.X.copy(), query.X.copy()
    adata = _quiet(
        concat_reference_query, reference, query, labels_key="cell_type", batch_key="batch"
    )
    assert adata.shape == (100, 50)
    assert isinstance(adata.X, sparse.csr_matrix)
    assert adata.X.dtype == np.float32
    assert list(adata.var_names) == list(reference.var_names)
    np.testing.assert_array_equal(adata.X[:60].toarray(), reference.X.toarray())
    np.testing.assert_array_equal(adata.X[60:].toarray(), query.X.toarray()[:, ::-1])
    assert list(adata.obs_names) == [*reference.obs_names, *query.obs_names]

    labels = adata.obs["cell_type"]
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    assert list(labels.cat.categories) == ["type_0", "type_1", "type_2", "Unknown"]
    assert labels.iloc[:60].astype(str).tolist() == reference.obs["cell_type"].astype(str).tolist()
    assert (labels.iloc[60:] == "Unknown").all()

    original = adata.obs["cell_type_original"]
    assert original.iloc[60:].astype(str).tolist() == query.obs["cell_type"].astype(str).tolist()
    assert original.iloc[:60].astype(str).tolist() == labels.iloc[:60].astype(str).tolist()

    role = adata.obs["lt_role"]
    assert list(role.cat.categories) == ["reference", "query"]
    assert role.value_counts().to_dict() == {"reference": 60, "query": 40}
    assert adata.obs["batch"].astype(str).tolist() == ["reference"] * 60 + ["query"] * 40

    assert adata.uns["lt_overlap"]["overlap"] == 1.0
    assert adata.uns["lt_input"]["reference"]["input_type"] == "counts"
    assert adata.uns["lt_input"]["query"]["input_type"] == "counts"
    json.dumps(adata.uns["lt_overlap"])
    # inputs untouched
    assert (reference.X != ref_X).nnz == 0
    assert (query.X != query_X).nnz == 0
    assert "lt_role" not in reference.obs
    assert "lt_role" not in query.obs


def test_concat_query_without_labels_or_batch(pair):
    reference, query = pair
    query = query.copy()
    del query.obs["cell_type"], query.obs["batch"]
    query.obs["batch"] = pd.Categorical(["q1", None] * 20)
    adata = concat_reference_query(
        reference, query, labels_key="cell_type", batch_key="batch", role_key="role"
    )
    assert "cell_type_original" not in adata.obs
    assert adata.obs["batch"].iloc[60:].astype(str).tolist() == ["q1", "query"] * 20
    assert "role" in adata.obs
    assert "lt_role" not in adata.obs
    del query.obs["batch"]
    adata = concat_reference_query(
        reference, query, labels_key="cell_type", batch_key="batch", unlabeled_category="?"
    )
    assert (adata.obs["batch"].iloc[60:] == "query").all()
    assert (adata.obs["cell_type"].iloc[60:] == "?").all()


def test_concat_reindexes_query_genes(pair):
    reference, query = pair
    subset = query[:, query.var_names[10:]].copy()  # 40 of 50 genes
    with pytest.warns(UserWarning, match=r"Only 40 of 50 reference genes"):
        adata = concat_reference_query(reference, subset, labels_key="cell_type")
    assert adata.X[60:, :10].nnz == 0
    np.testing.assert_array_equal(adata.X[60:, 10:].toarray(), subset.X.toarray())
    assert adata.uns["lt_overlap"]["n_missing"] == 10


def test_concat_duplicate_obs_names_warn(pair):
    reference, query = pair
    query = query.copy()
    query.obs_names = reference.obs_names[:40]
    with pytest.warns(UserWarning, match=r"40 obs names were duplicated"):
        adata = concat_reference_query(reference, query, labels_key="cell_type")
    assert adata.obs_names.is_unique
    assert list(reference.obs_names[:3]) == ["ref_0", "ref_1", "ref_2"]


def test_concat_errors(pair):
    reference, query = pair
    with pytest.raises(KeyError, match=r"labels_key 'label' not found in reference.obs"):
        concat_reference_query(reference, query, labels_key="label")
    with pytest.raises(KeyError, match=r"batch_key 'sample' not found in reference.obs"):
        concat_reference_query(reference, query, labels_key="cell_type", batch_key="sample")
    with pytest.raises(TypeError, match="query must be an AnnData"):
        concat_reference_query(reference, query.X, labels_key="cell_type")
    with pytest.raises(ValueError, match="reference AnnData has 0 cells"):
        concat_reference_query(reference[:0], query, labels_key="cell_type")
    with pytest.raises(ValueError, match="query AnnData has 0 cells"):
        concat_reference_query(reference, query[:0], labels_key="cell_type")

    bad = reference.copy()
    bad.obs["cell_type"] = bad.obs["cell_type"].astype(str)
    bad.obs.iloc[:3, bad.obs.columns.get_loc("cell_type")] = "Unknown"
    with pytest.raises(ValueError, match=r"3 reference cells are labelled 'Unknown'.*another"):
        concat_reference_query(bad, query, labels_key="cell_type")
    bad.obs.iloc[:2, bad.obs.columns.get_loc("cell_type")] = None
    with pytest.raises(ValueError, match=r"2 of 60 reference labels are NaN"):
        concat_reference_query(bad, query, labels_key="cell_type")
    bad = reference.copy()
    bad.obs["batch"] = bad.obs["batch"].astype(object)
    bad.obs.iloc[0, bad.obs.columns.get_loc("batch")] = None
    with pytest.raises(ValueError, match=r"1 reference cells have a NaN 'batch'"):
        concat_reference_query(bad, query, labels_key="cell_type", batch_key="batch")


def test_concat_input_type_mismatch(pair):
    reference, query = pair
    lognorm = query.copy()
    X = lognorm.X.toarray()
    lognorm.X = sparse.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    with pytest.raises(
        ValueError, match=r"reference holds counts data but the query holds lognorm"
    ):
        concat_reference_query(reference, lognorm, labels_key="cell_type")


def test_concat_real_data_writes(tmp_path, shared_data):
    kang = ad.read_h5ad(shared_data / "kang_ifnb_small.h5ad")
    kang.obs_names_make_unique()
    kang.obs["flag"] = kang.obs["donor"].astype(str) == "101"  # bool column, only in reference
    reference = kang[kang.obs["batch"] == "ctrl"].copy()
    query = kang[kang.obs["batch"] == "stim"].copy()
    del query.obs["flag"]
    adata = _quiet(
        concat_reference_query, reference, query, labels_key="cell_type", batch_key="sample"
    )
    assert adata.n_obs == 1556
    assert adata.obs["lt_role"].value_counts().to_dict() == {"query": 806, "reference": 750}
    assert (adata.obs["cell_type"].iloc[750:] == "Unknown").all()
    adata.write_h5ad(tmp_path / "c.h5ad")
    back = ad.read_h5ad(tmp_path / "c.h5ad")
    assert back.uns["lt_overlap"]["n_shared"] == 1267
    assert (
        back.obs["cell_type_original"].astype(str).tolist()
        == kang.obs["cell_type"].astype(str).loc[[*reference.obs_names, *query.obs_names]].tolist()
    )


def test_concat_backed_inputs(pair, tmp_path):
    reference, query = pair
    reference.write_h5ad(tmp_path / "r.h5ad")
    query[:, ::-1].copy().write_h5ad(tmp_path / "q.h5ad")
    backed = concat_reference_query(
        ad.read_h5ad(tmp_path / "r.h5ad", backed="r"),
        ad.read_h5ad(tmp_path / "q.h5ad", backed="r"),
        labels_key="cell_type",
        batch_key="batch",
    )
    in_memory = concat_reference_query(reference, query, labels_key="cell_type", batch_key="batch")
    assert (backed.X != in_memory.X).nnz == 0
    pd.testing.assert_frame_equal(backed.obs, in_memory.obs)
