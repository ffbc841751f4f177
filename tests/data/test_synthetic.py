from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from labeltransfer.data import check_input, synthetic


def _log_cpm(X: sparse.csr_matrix) -> np.ndarray:
    dense = X.toarray()
    return np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)


def test_shapes_types_and_fields():
    reference, query = synthetic(n_reference=120, n_query=90, n_genes=80, n_types=3, n_markers=6)
    assert reference.shape == (120, 80)
    assert query.shape == (90, 80)
    for adata, batch in ((reference, "reference"), (query, "query")):
        assert isinstance(adata.X, sparse.csr_matrix)
        assert adata.X.dtype == np.float32
        assert np.array_equal(adata.X.data, np.round(adata.X.data))
        assert adata.X.data.min() > 0
        assert list(adata.var_names[:3]) == ["gene_0", "gene_1", "gene_2"]
        assert isinstance(adata.obs["cell_type"].dtype, pd.CategoricalDtype)
        assert (adata.obs["batch"] == batch).all()
        assert set(adata.uns["markers"]) == {"type_0", "type_1", "type_2"}
        assert all(len(v) == 6 for v in adata.uns["markers"].values())
        assert adata.uns["novel_types"] == []
        assert check_input(adata, name=batch)["input_type"] == "counts"
    assert reference.obs_names[0] == "ref_0"
    assert query.obs_names[0] == "query_0"
    assert not set(reference.obs_names) & set(query.obs_names)
    # disjoint marker sets
    markers = [g for genes in reference.uns["markers"].values() for g in genes]
    assert len(set(markers)) == len(markers)
    # library sizes around library_size
    totals = np.asarray(reference.X.sum(axis=1)).ravel()
    assert 1600 < np.median(totals) < 2500


def test_composition_imbalance_and_novel_types():
    reference, query = synthetic(
        n_reference=700, n_query=300, n_genes=100, n_types=4, n_markers=5, n_novel=2,
        imbalance=8.0, seed=5,
    )  # fmt: skip
    ref_counts = reference.obs["cell_type"].value_counts()
    assert list(reference.obs["cell_type"].cat.categories) == [f"type_{i}" for i in range(4)]
    assert ref_counts.sum() == 700
    assert ref_counts["type_0"] / ref_counts["type_3"] == pytest.approx(8.0, rel=0.1)
    sizes = [ref_counts[f"type_{i}"] for i in range(4)]
    assert sizes == sorted(sizes, reverse=True)
    query_counts = query.obs["cell_type"].value_counts()
    assert query_counts.to_dict() == {f"type_{i}": 50 for i in range(6)}
    assert query.uns["novel_types"] == ["type_4", "type_5"]
    assert set(query.uns["markers"]) == {f"type_{i}" for i in range(6)}
    balanced, _ = synthetic(n_reference=100, n_query=10, n_genes=50, n_types=5, n_markers=3)
    assert set(balanced.obs["cell_type"].value_counts()) == {20}


def test_markers_are_raised():
    reference, _ = synthetic(n_reference=500, n_query=10, n_genes=200, seed=2, n_markers=10)
    expr = _log_cpm(reference.X)
    labels = reference.obs["cell_type"].to_numpy()
    names = list(reference.var_names)
    for cell_type, genes in reference.uns["markers"].items():
        cols = [names.index(g) for g in genes]
        inside = expr[labels == cell_type][:, cols].mean()
        outside = expr[labels != cell_type][:, cols].mean()
        assert inside > outside + 1.0


def test_batch_shift():
    def shift(batch_shift: float) -> float:
        reference, query = synthetic(
            n_reference=400, n_query=400, n_genes=150, batch_shift=batch_shift, seed=4
        )
        ref_mean = np.log(np.asarray(reference.X.mean(axis=0)).ravel() + 1e-3)
        query_mean = np.log(np.asarray(query.X.mean(axis=0)).ravel() + 1e-3)
        return float(np.std(query_mean - ref_mean))

    assert shift(1.0) > 2 * shift(0.0)


def test_determinism():
    a_ref, a_query = synthetic(n_reference=50, n_query=40, n_genes=30, n_markers=3, seed=7)
    b_ref, b_query = synthetic(n_reference=50, n_query=40, n_genes=30, n_markers=3, seed=7)
    c_ref, _ = synthetic(n_reference=50, n_query=40, n_genes=30, n_markers=3, seed=8)
    assert (a_ref.X != b_ref.X).nnz == 0
    assert (a_query.X != b_query.X).nnz == 0
    assert a_ref.obs.equals(b_ref.obs)
    assert a_ref.uns["markers"] == b_ref.uns["markers"]
    assert (a_ref.X != c_ref.X).nnz > 0
    # small chunks give the same distribution and shapes
    d_ref, _ = synthetic(n_reference=50, n_query=40, n_genes=30, n_markers=3, seed=7, chunk_size=7)
    assert d_ref.shape == a_ref.shape
    assert d_ref.obs.equals(a_ref.obs)


def test_query_seed_draws_independent_parts_of_one_query():
    kwargs = {"n_reference": 300, "n_genes": 60, "n_markers": 6, "n_types": 3, "seed": 7}
    ref_a, part_a = synthetic(n_query=300, query_seed=1, **kwargs)
    ref_b, part_b = synthetic(n_query=300, query_seed=2, **kwargs)
    ref, whole = synthetic(n_query=300, **kwargs)
    # one reference, one set of programmes; other cells in each part
    assert (ref_a.X != ref.X).nnz == 0
    assert (ref_b.X != ref.X).nnz == 0
    assert part_a.uns["markers"] == whole.uns["markers"]
    assert (part_a.X != part_b.X).nnz > 0
    again = synthetic(n_query=300, query_seed=1, **kwargs)[1]
    assert (again.X != part_a.X).nnz == 0

    def type_means(adata):
        x = np.log1p(adata.X.toarray())
        labels = adata.obs["cell_type"].to_numpy()
        return np.stack([x[labels == t].mean(axis=0) for t in sorted(set(labels))])

    # the parts share the query's shift and programmes: their type means are far closer to
    # each other than to those of another seed's query
    other = synthetic(n_query=300, **{**kwargs, "seed": 8})[1]
    gap = np.abs(type_means(part_a) - type_means(part_b)).mean()
    assert gap < 0.5 * np.abs(type_means(part_a) - type_means(other)).mean()


def test_negative_binomial_moments():
    reference, _ = synthetic(
        n_reference=4000, n_query=5, n_genes=20, n_types=1, n_markers=0, library_size=200.0,
        seed=9,
    )  # fmt: skip
    X = reference.X.toarray()
    mean, var = X.mean(axis=0), X.var(axis=0)
    # over-dispersed: variance above the Poisson variance for the larger means
    big = mean > 5
    assert big.any()
    assert np.all(var[big] > 1.1 * mean[big])


def test_simple_classifier_transfers():
    from sklearn.linear_model import LogisticRegression

    reference, query = synthetic(batch_shift=0.5)
    clf = LogisticRegression(max_iter=200).fit(
        _log_cpm(reference.X), reference.obs["cell_type"].astype(str)
    )
    accuracy = np.mean(clf.predict(_log_cpm(query.X)) == query.obs["cell_type"].astype(str))
    assert accuracy > 0.9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_reference": 3, "n_types": 5}, "n_reference=3 is smaller than n_types=5"),
        ({"n_query": 5, "n_novel": 1}, r"n_query=5 is smaller than n_types \+ n_novel = 6"),
        ({"n_markers": 600}, "0 <= n_markers <= n_genes"),
        ({"imbalance": 0.5}, "imbalance .* must be >= 1"),
        ({"batch_shift": -1.0}, "batch_shift .* must be >= 0"),
        ({"library_size": 0.0}, "library_size must be positive"),
        ({"n_types": 0}, "n_types must be >= 1"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic(**kwargs)
