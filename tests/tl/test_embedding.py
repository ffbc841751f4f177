"""Tests of lt.tl.embedding: the neighbour graph and UMAP of a model's embedding."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from anndata.tests.helpers import assert_equal
from scipy import sparse

import labeltransfer as lt

KEY = "lt"
#: Gaussian connectivities skip numba's compilation of UMAP's fuzzy simplicial set (~10 s).
GAUSS = {"method": "gauss"}


@pytest.fixture
def annotated() -> ad.AnnData:
    """120 cells of three separated groups with the embedding `annotate(key_added="lt")` writes."""
    rng = np.random.default_rng(0)
    n = 120
    types = np.repeat(["A", "B", "C"], n // 3)
    centers = {"A": 0.0, "B": 6.0, "C": -6.0}
    z = rng.normal(0, 1, (n, 8)) + np.array([centers[t] for t in types])[:, None]
    adata = ad.AnnData(obs=pd.DataFrame({"type": types}, index=[f"c{i}" for i in range(n)]))
    adata.obsm[f"X_{KEY}"] = z.astype(np.float32)
    adata.uns[KEY] = {"method": "SCNYM"}
    # the user's own scanpy fields, which must stay untouched
    adata.obsm["X_umap"] = np.arange(n * 2, dtype=float).reshape(-1, 2)
    adata.obsp["connectivities"] = sparse.identity(n, format="csr")
    adata.uns["neighbors"] = {"params": {"mine": True}}
    return adata


def test_embedding_writes_its_own_fields_only(annotated):
    adata = annotated
    before = adata.copy()
    assert lt.tl.embedding(adata, KEY, n_neighbors=10, neighbors_kwargs=GAUSS) is None

    umap = adata.obsm[f"X_{KEY}_umap"]
    assert umap.shape == (adata.n_obs, 2)
    assert np.isfinite(umap).all()
    params = adata.uns[f"{KEY}_neighbors"]["params"]
    assert (params["use_rep"], params["method"], params["n_neighbors"]) == ("X_lt", "gauss", 10)
    assert adata.uns[f"{KEY}_neighbors"]["connectivities_key"] == f"{KEY}_neighbors_connectivities"
    assert set(adata.uns[f"X_{KEY}_umap"]["params"]) == {"a", "b"}  # the UMAP curve
    graph = adata.obsp[f"{KEY}_neighbors_distances"]
    assert (graph.getnnz(axis=1) == 9).all()  # n_neighbors - 1 neighbours, self excluded
    # the graph links cells of one group: the groups are 6 standard deviations apart
    rows, cols = graph.nonzero()
    types = adata.obs["type"].to_numpy()
    assert (types[rows] == types[cols]).all()
    # the groups stay apart in the layout
    centres = np.array([umap[types == t].mean(axis=0) for t in ["A", "B", "C"]])
    spread = max(
        np.linalg.norm(umap[types == t] - c, axis=1).mean()
        for t, c in zip("ABC", centres, strict=True)
    )
    gaps = [np.linalg.norm(centres[i] - centres[j]) for i, j in [(0, 1), (0, 2), (1, 2)]]
    assert min(gaps) > 2 * spread

    # everything else is as it was: drop the five new fields and compare
    added = adata.copy()
    del added.obsm[f"X_{KEY}_umap"]
    del added.uns[f"X_{KEY}_umap"], added.uns[f"{KEY}_neighbors"]
    del added.obsp[f"{KEY}_neighbors_distances"], added.obsp[f"{KEY}_neighbors_connectivities"]
    assert_equal(added, before)


def test_embedding_copy_and_seed(annotated):
    before = annotated.copy()
    out = lt.tl.embedding(annotated, KEY, neighbors_kwargs=GAUSS, copy=True)
    assert_equal(annotated, before)  # the input is untouched
    again = lt.tl.embedding(annotated, KEY, neighbors_kwargs=GAUSS, copy=True)
    np.testing.assert_array_equal(out.obsm[f"X_{KEY}_umap"], again.obsm[f"X_{KEY}_umap"])
    other = lt.tl.embedding(annotated, KEY, neighbors_kwargs=GAUSS, random_state=1, copy=True)
    assert not np.allclose(out.obsm[f"X_{KEY}_umap"], other.obsm[f"X_{KEY}_umap"])


def test_embedding_errors(annotated):
    with pytest.raises(KeyError, match=r"obsm has no 'X_other'.*key_added='other'"):
        lt.tl.embedding(annotated, "other")
    nan = annotated.copy()
    nan.obsm[f"X_{KEY}"][3, 0] = np.nan
    with pytest.raises(ValueError, match=r"has 1 cell\(s\) with NaN/inf values"):
        lt.tl.embedding(nan, KEY)
    with pytest.raises(ValueError, match=r"cannot set \['use_rep'\]"):
        lt.tl.embedding(annotated, KEY, neighbors_kwargs={"use_rep": "X_pca"})
    with pytest.raises(ValueError, match="at least 3 cells"):
        lt.tl.embedding(annotated[:2].copy(), KEY)
    flat = annotated.copy()
    flat.obsm[f"X_{KEY}"] = np.zeros((flat.n_obs, 1, 2))
    with pytest.raises(ValueError, match="cells x dimensions array"):
        lt.tl.embedding(flat, KEY)
