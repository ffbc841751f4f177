from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

from labeltransfer.data import select_features, synthetic


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.datasets.pbmc68k_reduced().raw.to_adata()


@pytest.fixture(scope="module")
def counts() -> ad.AnnData:
    reference, _ = synthetic(n_reference=400, n_query=10, n_genes=300, seed=3)
    return reference


def _scanpy_top(adata: ad.AnnData, n: int) -> set[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n, inplace=False)
    return set(np.flatnonzero(df["highly_variable"].to_numpy()))


@pytest.mark.parametrize("n_top", [200, 500])
def test_lognorm_agrees_with_scanpy(pbmc, n_top):
    selected = select_features(pbmc, n_top_genes=n_top, input_type="lognorm", chunk_size=128)
    assert selected.dtype == np.int64
    assert len(selected) == n_top
    assert np.all(np.diff(selected) > 0)
    overlap = len(set(selected) & _scanpy_top(pbmc, n_top)) / n_top
    assert overlap >= 0.9
    assert overlap >= 0.99  # in practice identical


def test_counts_agree_with_scanpy_on_log_cpm(counts):
    lognorm = counts.copy()
    sc.pp.normalize_total(lognorm, target_sum=1e6)
    sc.pp.log1p(lognorm)
    selected = select_features(counts, n_top_genes=100, input_type="counts", chunk_size=64)
    assert len(set(selected) & _scanpy_top(lognorm, 100)) / 100 >= 0.97


@pytest.mark.parametrize("fmt", ["dense", "csc", "backed_csr", "backed_dense"])
def test_formats_and_chunks_agree(counts, fmt, tmp_path):
    expected = select_features(counts, n_top_genes=60)
    X = counts.X
    adata = ad.AnnData(X=X.toarray() if "dense" in fmt else X.tocsc() if fmt == "csc" else X)
    if fmt.startswith("backed"):
        adata.write_h5ad(tmp_path / "a.h5ad")
        adata = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    np.testing.assert_array_equal(select_features(adata, n_top_genes=60, chunk_size=37), expected)


def test_layer_and_mask(counts):
    mask = np.zeros(counts.n_obs, dtype=bool)
    mask[::3] = True
    adata = ad.AnnData(X=sparse.csr_matrix(counts.shape, dtype=np.float32))
    adata.layers["counts"] = counts.X
    on_subset = select_features(counts[mask].copy(), n_top_genes=50)
    masked = select_features(adata, n_top_genes=50, layer="counts", mask=mask, chunk_size=50)
    np.testing.assert_array_equal(masked, on_subset)
    assert not np.array_equal(masked, select_features(counts, n_top_genes=50))


def test_all_genes_when_few(counts):
    np.testing.assert_array_equal(
        select_features(counts, n_top_genes=300), np.arange(300, dtype=np.int64)
    )
    assert select_features(counts, n_top_genes=5000).dtype == np.int64


def test_input_not_modified(counts):
    adata = counts.copy()
    before = adata.X.copy()
    select_features(adata, n_top_genes=20)
    assert (adata.X != before).nnz == 0


def test_errors(counts):
    with pytest.raises(ValueError, match="n_top_genes must be a positive integer"):
        select_features(counts, n_top_genes=0)
    with pytest.raises(ValueError, match="input_type must be 'counts' or 'lognorm'"):
        select_features(counts, input_type="raw")
    with pytest.raises(ValueError, match="mask must be a boolean array with one entry per cell"):
        select_features(counts, mask=np.ones(3, dtype=bool))
    mask = np.zeros(counts.n_obs, dtype=bool)
    mask[0] = True
    with pytest.raises(ValueError, match="needs at least 2 cells, got 1"):
        select_features(counts, mask=mask)
    with pytest.raises(KeyError, match="Layer 'x' not found"):
        select_features(counts, layer="x")
    with pytest.raises(TypeError, match="must be an AnnData"):
        select_features(counts.X)
