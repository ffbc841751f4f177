from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import labeltransfer.data._checks as checks_module
from labeltransfer.data import check_input, check_labels


def _counts(n_obs: int = 30, n_vars: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(n_obs, n_vars)).astype(np.float32)
    X[:, 0] += 1  # no all-zero cell
    return X


def _adata(X, **kwargs) -> ad.AnnData:
    return ad.AnnData(X=X, **kwargs)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks on tiny matrices."""
    monkeypatch.setattr(checks_module, "CHUNK_SIZE", 7)


@pytest.mark.parametrize(
    "fmt", ["dense", "csr", "csc", "int64", "dense_backed", "csr_backed", "csc_backed"]
)
def test_check_input_counts_all_formats(fmt, tmp_path, small_chunks):
    X = _counts()
    if fmt.startswith("csr"):
        X = sparse.csr_matrix(X)
    elif fmt.startswith("csc"):
        X = sparse.csc_matrix(X)
    elif fmt == "int64":
        X = X.astype(np.int64)
    adata = _adata(X)
    if fmt.endswith("backed"):
        adata.write_h5ad(tmp_path / "a.h5ad")
        adata = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    info = check_input(adata, name="reference")
    assert info == {
        "name": "reference",
        "input_type": "counts",
        "n_obs": 30,
        "n_vars": 12,
        "n_zero_cells": 0,
        "layer": None,
    }


def test_check_input_lognorm_and_layer(small_chunks):
    counts = _counts()
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    adata = _adata(sparse.csr_matrix(lognorm), layers={"counts": sparse.csr_matrix(counts)})
    assert check_input(adata)["input_type"] == "lognorm"
    info = check_input(adata, layer="counts", name="query", expect="counts")
    assert (info["input_type"], info["layer"], info["name"]) == ("counts", "counts", "query")
    assert check_input(adata, expect="lognorm")["input_type"] == "lognorm"


def test_check_input_does_not_modify():
    X = sparse.csr_matrix(_counts())
    adata = _adata(X.copy())
    before = adata.X.copy()
    check_input(adata)
    assert (adata.X != before).nnz == 0
    assert adata.obs.shape[1] == 0
    assert len(adata.uns) == 0


def test_check_input_not_anndata():
    with pytest.raises(TypeError, match="must be an AnnData object, got ndarray"):
        check_input(np.zeros((3, 3)))


def test_check_input_empty():
    with pytest.raises(ValueError, match="0 cells; pass a non-empty AnnData"):
        check_input(_adata(np.zeros((0, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match="0 genes"):
        check_input(_adata(np.zeros((4, 0), dtype=np.float32)))


def test_check_input_missing_layer():
    adata = _adata(_counts(), layers={"raw": _counts()})
    with pytest.raises(KeyError, match=r"Layer 'counts' not found.*available layers: \['raw'\]"):
        check_input(adata, layer="counts")


def test_check_input_nan_inf(small_chunks):
    X = _counts()
    X[3, 2] = np.nan
    X[20, 5] = np.nan
    X[10, 1] = np.inf
    with pytest.raises(
        ValueError, match=r"3 non-finite values \(2 NaN, 1 inf\); remove or impute"
    ):
        check_input(_adata(sparse.csr_matrix(X)))
    with pytest.raises(ValueError, match=r"3 non-finite values"):
        check_input(_adata(X))


def test_check_input_negative():
    X = _counts()
    X[0, 0] = -1.5
    with pytest.raises(ValueError, match=r"1 negative values.*scaled or z-scored.*layer="):
        check_input(_adata(sparse.csr_matrix(X)))


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_check_input_duplicated_var_names():
    adata = _adata(_counts(n_vars=4), var=pd.DataFrame(index=["A", "B", "A", "C"]))
    with pytest.raises(
        ValueError, match=r"1 duplicated var_names \(e.g. A\).*var_names_make_unique"
    ):
        check_input(adata)


def test_check_input_cpm_rejected():
    counts = _counts()
    cpm = counts / counts.sum(1, keepdims=True) * 1e6
    with pytest.raises(ValueError, match=r"not log-transformed.*sc.pp.log1p"):
        check_input(_adata(sparse.csr_matrix(cpm)))


def test_check_input_expect_mismatch():
    counts = _counts()
    lognorm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    with pytest.raises(
        ValueError, match=r"expect='counts' but the query data \(X\) are not integers"
    ):
        check_input(_adata(lognorm), expect="counts", name="query")
    with pytest.raises(ValueError, match=r"expect='lognorm'.*looks like raw counts"):
        check_input(_adata(counts), expect="lognorm")
    with pytest.raises(ValueError, match="expect must be"):
        check_input(_adata(counts), expect="raw")


def test_check_input_zero_cells_warns(small_chunks):
    X = _counts()
    X[[4, 17]] = 0
    X = sparse.csr_matrix(X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparse.SparseEfficiencyWarning)
        X[4, 3] = 0.0  # an explicitly stored zero does not count as a value
    assert X.nnz > sparse.csr_matrix(X.toarray()).nnz
    with pytest.warns(UserWarning, match=r"2 of 30 reference cells have no non-zero value"):
        info = check_input(_adata(X))
    assert info["n_zero_cells"] == 2


def test_check_labels_counts_and_unlabeled():
    labels = pd.Series(["T", "B", "T", "Unknown", "B", "T"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counts = check_labels(labels, unlabeled_category="Unknown")
    assert counts.to_dict() == {"T": 3, "B": 2}
    categorical = pd.Series(pd.Categorical(["a", "a", "b", "b"], categories=["a", "b", "c"]))
    assert check_labels(categorical).to_dict() == {"a": 2, "b": 2}


def test_check_labels_nan():
    with pytest.raises(ValueError, match=r"1 of 3 reference labels are NaN; fill them"):
        check_labels(pd.Series(["a", None, "a"]))


def test_check_labels_all_unlabeled():
    with pytest.raises(ValueError, match=r"All 2 query cells are labelled 'Unknown'"):
        check_labels(pd.Series(["Unknown", "Unknown"]), unlabeled_category="Unknown", name="query")
    with pytest.raises(ValueError, match="labels are empty"):
        check_labels(pd.Series([], dtype=object))


def test_check_labels_singletons_warn():
    with pytest.warns(UserWarning, match=r"2 reference classes have a single cell \(b, c\)"):
        counts = check_labels(pd.Series(["a", "a", "b", "c"]))
    assert counts.to_dict() == {"a": 2, "b": 1, "c": 1}


@pytest.mark.parametrize(("start", "stop"), [(0, 100), (10, 20), (99, 100), (40, 40)])
def test_csr_rows_shares_the_arrays(start, stop):
    """A row range of a CSR matrix views its arrays (no copy, however small) and equals the slice."""
    from labeltransfer.data._checks import _csr_rows

    matrix = sparse.random(100, 30, density=0.2, format="csr", dtype=np.float32, random_state=0)
    block = _csr_rows(matrix, start, stop)
    assert type(block) is sparse.csr_matrix
    assert block.shape == (stop - start, 30)
    np.testing.assert_array_equal(block.toarray(), matrix[start:stop].toarray())
    if block.nnz:
        assert np.shares_memory(block.data, matrix.data)
        assert np.shares_memory(block.indices, matrix.indices)
