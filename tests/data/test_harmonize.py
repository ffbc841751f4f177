from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse

import labeltransfer.data._checks as checks_module
from labeltransfer.data import harmonize_genes, load_id_map

REPORT_KEYS = {
    "n_reference_genes",
    "n_query_genes",
    "n_shared",
    "overlap",
    "n_missing",
    "missing_examples",
    "id_type_reference",
    "id_type_query",
    "id_mapping",
    "n_collapsed",
}


@pytest.fixture(scope="module")
def cellbench(shared_data) -> ad.AnnData:
    return ad.read_h5ad(shared_data / "cellbench_3cl.h5ad")


@pytest.fixture(scope="module")
def id_map_path(shared_data) -> Path:
    return shared_data / "hs_ensembl2symbol.tsv.gz"


@pytest.fixture(scope="module")
def id_map(id_map_path) -> pd.DataFrame:
    return load_id_map(id_map_path)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(checks_module, "CHUNK_SIZE", 3)


def _query(X, genes, **kwargs) -> ad.AnnData:
    obs = pd.DataFrame({"cell": [f"c{i}" for i in range(X.shape[0])]})
    obs.index = obs["cell"].to_numpy()
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes), **kwargs)


def _no_warnings(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return func(*args, **kwargs)


X_SMALL = np.array(
    [[1, 0, 2, 3], [0, 5, 0, 1], [4, 0, 0, 0], [0, 0, 7, 8], [9, 1, 0, 2]], dtype=np.float32
)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "int", "csr_backed", "dense_backed"])
def test_reindex_hand_computed(fmt, tmp_path, small_chunks):
    # query genes C, A, X, D ; reference A, B, C, D
    X = X_SMALL
    if fmt.startswith("csr"):
        X = sparse.csr_matrix(X)
    elif fmt == "csc":
        X = sparse.csc_matrix(X)
    elif fmt == "int":
        X = X.astype(np.int32)
    query = _query(X, ["C", "A", "X", "D"])
    if fmt.endswith("backed"):
        query.write_h5ad(tmp_path / "q.h5ad")
        query = ad.read_h5ad(tmp_path / "q.h5ad", backed="r")
    with pytest.warns(UserWarning, match=r"Only 3 of 4 reference genes \(75.0%\)"):
        out, report = harmonize_genes(query, ["A", "B", "C", "D"])
    expected = np.array(
        [[0, 0, 1, 3], [5, 0, 0, 1], [0, 0, 4, 0], [0, 0, 0, 8], [1, 0, 9, 2]], dtype=np.float32
    )
    assert isinstance(out.X, sparse.csr_matrix)
    assert out.X.dtype == np.float32
    np.testing.assert_array_equal(out.X.toarray(), expected)
    assert list(out.var_names) == ["A", "B", "C", "D"]
    assert list(out.obs_names) == [f"c{i}" for i in range(5)]
    assert out.obs["cell"].tolist() == [f"c{i}" for i in range(5)]
    assert report == {
        "n_reference_genes": 4,
        "n_query_genes": 4,
        "n_shared": 3,
        "overlap": 0.75,
        "n_missing": 1,
        "missing_examples": ["B"],
        "id_type_reference": "symbol",
        "id_type_query": "symbol",
        "id_mapping": None,
        "n_collapsed": 0,
    }
    json.dumps(report)


def test_reordered_and_layer():
    query = _query(np.zeros((5, 4), np.float32), ["A", "B", "C", "D"], layers={"counts": X_SMALL})
    out, report = _no_warnings(harmonize_genes, query, ["D", "C", "B", "A"], layer="counts")
    np.testing.assert_array_equal(out.X.toarray(), X_SMALL[:, ::-1])
    assert report["overlap"] == 1.0
    assert report["n_missing"] == 0
    with pytest.raises(KeyError, match=r"Layer 'raw' not found.*available layers: \['counts'\]"):
        harmonize_genes(query, ["A"], layer="raw")


def test_identity_shares_csr_float32_and_copies_obs():
    X = sparse.csr_matrix(X_SMALL)
    query = _query(X, ["A", "B", "C", "D"])
    out, report = _no_warnings(harmonize_genes, query, ["A", "B", "C", "D"])
    assert out is not query
    assert out.X is query.X  # no copy needed
    assert out.obs is not query.obs
    out.obs["new"] = 1
    assert "new" not in query.obs
    # other dtypes are converted to a new CSR float32
    query64 = _query(X_SMALL.astype(np.float64), ["A", "B", "C", "D"])
    out64, _ = harmonize_genes(query64, ["A", "B", "C", "D"])
    assert isinstance(out64.X, sparse.csr_matrix)
    assert out64.X.dtype == np.float32
    np.testing.assert_array_equal(out64.X.toarray(), X_SMALL)


def test_input_not_modified():
    X = sparse.csr_matrix(X_SMALL)
    query = _query(X.copy(), ["C", "A", "X", "D"])
    harmonize_genes(query, ["A", "C", "D"], warn_overlap=0.0)
    assert (query.X != X).nnz == 0
    assert list(query.var_names) == ["C", "A", "X", "D"]


def test_gene_symbols_column_and_duplicates():
    var = pd.DataFrame({"symbol": ["A", "B", "A", None]}, index=["id0", "id1", "id2", "id3"])
    counts = ad.AnnData(X=sparse.csr_matrix(X_SMALL), var=var)
    with pytest.warns(UserWarning, match=r"1 query genes matched .* summed"):
        out, report = harmonize_genes(counts, ["A", "B"], gene_symbols="symbol")
    np.testing.assert_array_equal(
        out.X.toarray(), np.c_[X_SMALL[:, 0] + X_SMALL[:, 2], X_SMALL[:, 1]]
    )
    assert report["n_collapsed"] == 1
    # non-integer data: only the gene with the largest total (column 2) is kept
    lognorm = X_SMALL * np.array([0.1, 1.0, 1.0, 1.0], dtype=np.float32) + 0.5 * (X_SMALL > 0)
    query = ad.AnnData(X=lognorm, var=var)
    with pytest.warns(UserWarning, match=r"kept the one with the largest total"):
        out, report = harmonize_genes(query, ["A", "B"], gene_symbols="symbol")
    assert lognorm[:, 2].sum() > lognorm[:, 0].sum()
    np.testing.assert_allclose(out.X.toarray(), lognorm[:, [2, 1]])
    with pytest.raises(
        KeyError, match=r"Column 'gene' not found in the query's var.*\['symbol'\]"
    ):
        harmonize_genes(query, ["A"], gene_symbols="gene")


def test_min_overlap_error():
    query = _query(X_SMALL, ["A", "B", "C", "D"])
    reference = ["A"] + [f"G{i}" for i in range(9)]
    with pytest.raises(
        ValueError,
        match=r"Only 1 of 10 reference genes \(10.0%\) were found in the query "
        r"\(min_overlap=50%\); first missing: G0, G1.*lower `min_overlap=`",
    ):
        harmonize_genes(query, reference)
    with pytest.warns(UserWarning, match="Only 1 of 10"):
        out, report = harmonize_genes(query, reference, min_overlap=0.1)
    assert report["missing_examples"] == [f"G{i}" for i in range(9)]
    assert out.X[:, 1:].nnz == 0


def test_bad_arguments():
    query = _query(X_SMALL, ["A", "B", "C", "D"])
    with pytest.raises(TypeError, match="must be an AnnData"):
        harmonize_genes(X_SMALL, ["A"])
    with pytest.raises(ValueError, match="reference_genes is empty"):
        harmonize_genes(query, [])
    with pytest.raises(ValueError, match=r"1 duplicated identifiers.*e.g. A"):
        harmonize_genes(query, ["A", "B", "A"])
    with pytest.raises(ValueError, match="must lie in"):
        harmonize_genes(query, ["A"], min_overlap=2.0)


def test_type_mismatch_needs_id_map():
    query = _query(X_SMALL[:, :2], ["ENSG00000000003", "ENSG00000000419"])
    with pytest.raises(
        ValueError, match=r"look like ensembl identifiers.*Pass `id_map=`.*`gene_symbols=`"
    ):
        harmonize_genes(query, ["TSPAN6", "DPM1"])


def test_symbols_to_ensembl_real_table(cellbench, id_map, id_map_path):
    genes = ["TSPAN6", "DPM1", "SCYL3", "CFH", "GAPDH", "ACTB", "EGFR", "KRAS", "VIM"]
    query = cellbench[:40, genes[::-1]].copy()
    ids = cellbench.var.loc[genes, "gene_ids"].tolist()
    # reference ids carry version suffixes, which are ignored for matching
    extra = ["ENSG00000000005", "ENSG00000001084"]  # TNMD, GCLC: not in the query
    reference = [f"{g}.{i + 1}" for i, g in enumerate(ids)] + extra
    with pytest.warns(UserWarning, match="Only 9 of 11"):
        out, report = harmonize_genes(query, reference, id_map=id_map_path)
    assert list(out.var_names) == reference
    expected = cellbench[:40, genes].X.toarray()
    np.testing.assert_array_equal(out.X.toarray()[:, :9], expected)
    assert out.X[:, 9:].nnz == 0
    assert report["id_mapping"] == "symbol->ensembl"
    assert (report["id_type_query"], report["id_type_reference"]) == ("symbol", "ensembl")
    assert report["missing_examples"] == extra
    # CFH has two ids in the table; the one in the reference is used
    assert (id_map["symbol"] == "CFH").sum() == 2


def test_ensembl_to_symbols_real_table_with_collapse(cellbench, id_map):
    # RGS5 has two Ensembl ids in the data (var_names RGS5 and RGS5-1): summed for counts
    cols = ["RGS5", "RGS5-1", "TSPAN6", "VIM", "KRAS"]
    query = cellbench[:, cols].copy()
    query.var_names = query.var["gene_ids"].astype(str).to_numpy()
    out, report = _no_warnings(
        harmonize_genes, query, ["VIM", "RGS5", "TSPAN6", "KRAS"], id_map=id_map
    )
    X = cellbench[:, cols].X.toarray()
    expected = np.c_[X[:, 3], X[:, 0] + X[:, 1], X[:, 2], X[:, 4]]
    np.testing.assert_array_equal(out.X.toarray(), expected)
    assert report["id_mapping"] == "ensembl->symbol"
    assert report["n_collapsed"] == 1
    # gene_symbols= avoids the mapping altogether
    out2, report2 = harmonize_genes(
        cellbench[:, cols], ["VIM", "TSPAN6"], gene_symbols="gene_symbol"
    )
    assert report2["id_mapping"] is None
    np.testing.assert_array_equal(out2.X.toarray(), X[:, [3, 2]])


def test_load_id_map_formats(tmp_path, id_map):
    assert list(id_map.columns) == ["ensembl_id", "symbol"]
    assert len(id_map) > 40_000
    assert not id_map["ensembl_id"].str.contains(r"\.").any()
    assert id_map.iloc[0].tolist() == ["ENSG00000000003", "TSPAN6"]
    # no header, reversed columns, versions, csv
    rows = "TSPAN6\tENSG00000000003.15\nDPM1\tENSG00000000419.12\n"
    (tmp_path / "m.tsv").write_text(rows)
    table = load_id_map(tmp_path / "m.tsv")
    assert table.values.tolist() == [["ENSG00000000003", "TSPAN6"], ["ENSG00000000419", "DPM1"]]
    with gzip.open(tmp_path / "m.csv.gz", "wt") as fh:
        fh.write("gene,name\nENSG00000000003,TSPAN6\n")
    assert load_id_map(tmp_path / "m.csv.gz").values.tolist() == [["ENSG00000000003", "TSPAN6"]]
    with pytest.raises(FileNotFoundError, match="does not exist; pass the path"):
        load_id_map(tmp_path / "missing.tsv")
    (tmp_path / "bad.tsv").write_text("a\tb\nx\ty\n")
    with pytest.raises(ValueError, match="Neither column .* holds Ensembl gene ids"):
        load_id_map(tmp_path / "bad.tsv")


gene_pool = [f"g{i}" for i in range(12)]


@st.composite
def _case(draw):
    n_obs = draw(st.integers(1, 6))
    query_genes = draw(st.permutations(gene_pool).map(lambda p: p[: draw(st.integers(1, 12))]))
    reference = draw(st.permutations([*gene_pool, "n0", "n1"]))
    reference = reference[: draw(st.integers(1, len(reference)))]
    values = draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(0.5, 1e4, width=32)),
            min_size=n_obs * len(query_genes),
            max_size=n_obs * len(query_genes),
        )
    )
    X = np.array(values, dtype=np.float32).reshape(n_obs, len(query_genes))
    fmt = draw(st.sampled_from(["dense", "csr", "csc"]))
    return X, list(query_genes), list(reference), fmt


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_property_shared_preserved_missing_zero(case):
    X, query_genes, reference, fmt = case
    matrix = {"dense": X, "csr": sparse.csr_matrix(X), "csc": sparse.csc_matrix(X)}[fmt]
    query = _query(matrix, query_genes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out, report = harmonize_genes(query, reference, min_overlap=0.0, warn_overlap=0.0)
    result = out.X.toarray()
    assert result.shape == (X.shape[0], len(reference))
    position = {g: i for i, g in enumerate(query_genes)}
    for j, gene in enumerate(reference):
        if gene in position:
            np.testing.assert_array_equal(result[:, j], X[:, position[gene]])
        else:
            assert not result[:, j].any()
    shared = sum(g in position for g in reference)
    assert report["n_shared"] == shared
    assert report["n_missing"] == len(reference) - shared
    assert set(report) == REPORT_KEYS


def _selection_product(matrix, query_idx, ref_idx, n_ref) -> sparse.csr_matrix:
    """The reindexing as a product with a query-gene x reference-gene selection matrix."""
    selection = sparse.csr_matrix(
        (np.ones(len(query_idx), dtype=np.float32), (query_idx, ref_idx)),
        shape=(matrix.shape[1], n_ref),
    )
    return sparse.csr_matrix(sparse.csr_matrix(matrix, dtype=np.float32) @ selection)


@pytest.mark.parametrize("order", ["kept", "reversed", "random", "merged"])
@pytest.mark.parametrize("fmt", ["csr", "csr_unsorted", "csr_duplicates", "dense", "int", "csc"])
def test_reindex_equals_the_selection_product(order, fmt):
    """Renumbering columns gives the selection product's matrix, canonical, input untouched."""
    from labeltransfer.data._harmonize import _reindex

    rng = np.random.default_rng(0)
    n_query, n_ref = 40, 30
    base = sparse.random(50, n_query, density=0.3, format="csr", random_state=1) * 10
    base = sparse.csr_matrix(np.round(base.toarray()), dtype=np.float32)
    base[7] = 0  # an empty cell
    query_idx = np.sort(rng.choice(n_query, 25, replace=False))  # 15 query genes dropped
    ref_idx = {
        "kept": np.sort(rng.choice(n_ref, 25, replace=False)),
        "reversed": np.sort(rng.choice(n_ref, 25, replace=False))[::-1].copy(),
        "random": rng.choice(n_ref, 25, replace=False),
        "merged": rng.choice(n_ref, 25, replace=True),
    }[order]
    matrix = {"dense": base.toarray(), "int": base.toarray().astype(np.int32)}.get(fmt, base)
    if fmt == "csc":
        matrix = sparse.csc_matrix(base)
    elif fmt in ("csr_unsorted", "csr_duplicates"):
        matrix = base.copy()
        for row in range(matrix.shape[0]):  # each row's entries in reverse order
            lo, hi = matrix.indptr[row], matrix.indptr[row + 1]
            matrix.indices[lo:hi] = matrix.indices[lo:hi][::-1].copy()
            matrix.data[lo:hi] = matrix.data[lo:hi][::-1].copy()
        matrix.has_sorted_indices = False
        if fmt == "csr_duplicates":  # row 0's first value stored as two halves
            lo = matrix.indptr[0]
            matrix = sparse.csr_matrix(
                (
                    np.insert(matrix.data, lo, matrix.data[lo] / 2),
                    np.insert(matrix.indices, lo, matrix.indices[lo]),
                    np.r_[0, matrix.indptr[1:] + 1],
                ),
                shape=matrix.shape,
            )
            matrix.data[lo + 1] /= 2
    before = matrix.copy()

    out = _reindex(matrix, query_idx, ref_idx, n_ref)

    expected = _selection_product(matrix, query_idx, ref_idx, n_ref)
    assert type(out) is sparse.csr_matrix
    assert out.dtype == np.float32
    assert out.shape == (50, n_ref)
    assert all(
        np.all(np.diff(out.indices[out.indptr[r] : out.indptr[r + 1]]) >= 0) for r in range(50)
    )
    np.testing.assert_array_equal(out.toarray(), expected.toarray())
    if sparse.issparse(before):
        assert (matrix != before).nnz == 0
    else:
        np.testing.assert_array_equal(matrix, before)
