from __future__ import annotations

import numpy as np
import pytest
from anndata import AnnData
from scipy import sparse
from sklearn.linear_model import LogisticRegression

from labeltransfer.data import strong_shift, synthetic


@pytest.fixture(scope="module")
def pair() -> tuple[AnnData, AnnData]:
    """A labelled reference and an unshifted query of the same four types."""
    return synthetic(
        n_reference=300, n_query=300, n_genes=200, n_types=4, n_markers=5, batch_shift=0.0
    )


def _log_cpm(adata: AnnData) -> np.ndarray:
    dense = adata.X.toarray()
    return np.log1p(dense / np.maximum(dense.sum(axis=1, keepdims=True), 1) * 1e4)


def _gene_log_ratio(shifted: AnnData, original: AnnData) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene log ratio of the mean counts over genes with a mean above 0.5, and the mask."""
    before = np.asarray(original.X.mean(axis=0)).ravel()
    after = np.asarray(shifted.X.mean(axis=0)).ravel()
    kept = before > 0.5
    return np.log(after[kept] / before[kept]), kept


def test_shape_obs_var_kept_and_counts_stay_integers(pair):
    _, query = pair
    query = query.copy()
    query.layers["counts"] = query.X.copy()
    query.obsm["X_pca"] = np.zeros((query.n_obs, 2))
    X_before, obs_before, var_before = query.X.copy(), query.obs.copy(), query.var.copy()
    uns_keys = set(query.uns)

    shifted = strong_shift(query, seed=3)

    assert shifted.shape == query.shape
    assert shifted.obs.equals(query.obs)
    assert shifted.var.equals(query.var)
    assert shifted.uns["markers"] == query.uns["markers"]
    assert isinstance(shifted.X, sparse.csr_matrix)
    assert shifted.X.dtype == np.float32
    assert shifted.X.data.min() > 0
    assert np.array_equal(shifted.X.data, np.round(shifted.X.data))
    assert list(shifted.layers) == []
    assert list(shifted.obsm) == []
    # the input is not modified
    assert (query.X != X_before).nnz == 0
    assert query.obs.equals(obs_before)
    assert query.var.equals(var_before)
    assert set(query.uns) == uns_keys
    # zeros stay zero: the shifted matrix is a subset of the original's non-zero pattern
    assert (abs(shifted.X).sign() - abs(shifted.X).sign().multiply(query.X.sign())).nnz == 0


def test_records_the_draws_and_zeroes_the_absent_genes(pair):
    _, query = pair
    shifted = strong_shift(query, gene_overlap=0.75, seed=1)
    record = shifted.uns["strong_shift"]
    assert {k: record[k] for k in ("gene_factor_sd", "dropout", "library_factor", "seed")} == {
        "gene_factor_sd": 3.0,
        "dropout": 0.3,
        "library_factor": 0.5,
        "seed": 1,
    }
    assert record["gene_overlap"] == 0.75
    assert record["gene_log_factor"].shape == record["gene_dropout"].shape == (200,)
    assert len(record["absent_genes"]) == 50
    absent = query.var_names.get_indexer(record["absent_genes"])
    assert shifted.X[:, absent].nnz == 0
    assert query.X[:, absent].nnz > 0
    assert record["gene_dropout"].min() >= 0
    assert record["gene_dropout"].max() < 1
    assert record["gene_dropout"].mean() == pytest.approx(0.3, abs=0.08)


def test_seeded_reproducible_and_dense_input_gives_the_same_result(pair):
    _, query = pair
    first = strong_shift(query, seed=7)
    again = strong_shift(query, seed=7)
    other = strong_shift(query, seed=8)
    dense = strong_shift(AnnData(query.X.toarray(), obs=query.obs, var=query.var), seed=7)
    assert (first.X != again.X).nnz == 0
    assert (first.X != dense.X).nnz == 0
    assert (first.X != other.X).nnz > 0
    assert first.uns["strong_shift"]["absent_genes"] == again.uns["strong_shift"]["absent_genes"]


def test_shifts_each_gene_by_its_own_factor_and_dropout(pair):
    _, query = pair
    shifted = strong_shift(query, gene_factor_sd=1.0, dropout=0.0, gene_overlap=1.0, seed=0)
    ratio, kept = _gene_log_ratio(shifted, query)
    assert kept.sum() > 150
    assert ratio.std() > 0.8
    # the change is the recorded factor, up to the rescaling that keeps the total count
    factor = shifted.uns["strong_shift"]["gene_log_factor"][kept]
    assert np.corrcoef(ratio, factor)[0, 1] > 0.95
    assert shifted.X.sum() / query.X.sum() == pytest.approx(0.5, rel=0.05)
    # dropout alone removes the share p_g of each gene's counts
    dropped = strong_shift(query, gene_factor_sd=0.0, library_factor=1.0, gene_overlap=1.0)
    kept_share = np.exp(_gene_log_ratio(dropped, query)[0])
    p_drop = dropped.uns["strong_shift"]["gene_dropout"][kept]
    assert np.corrcoef(kept_share, 1 - p_drop)[0, 1] > 0.95
    # without a shift, only the Poisson redraw remains
    plain = strong_shift(query, gene_factor_sd=0, dropout=0, library_factor=1, gene_overlap=1)
    assert _gene_log_ratio(plain, query)[0].std() < 0.1


def test_a_classifier_of_the_original_loses_accuracy_on_the_shifted_copy(pair):
    reference, query = pair
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    classifier = LogisticRegression(max_iter=1000).fit(_log_cpm(reference), labels)
    unshifted = (classifier.predict(_log_cpm(query)) == truth).mean()
    shifted = (classifier.predict(_log_cpm(strong_shift(query, seed=0))) == truth).mean()
    assert unshifted > 0.95
    assert shifted < unshifted - 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gene_factor_sd": -1.0}, "gene_factor_sd is a standard deviation and must be >= 0"),
        ({"dropout": 1.0}, r"dropout is a mean probability and must be in \[0, 1\)"),
        ({"library_factor": 0.0}, "library_factor must be positive, got 0.0; use 1"),
        ({"gene_overlap": 0.0}, r"gene_overlap is the fraction of genes kept .* use 1"),
    ],
)
def test_bad_parameters_raise(pair, kwargs, message):
    with pytest.raises(ValueError, match=message):
        strong_shift(pair[1], **kwargs)


def test_non_count_input_raises(pair):
    lognorm = AnnData(_log_cpm(pair[1]).astype(np.float32))
    with pytest.raises(ValueError, match="expect='counts' but the input data"):
        strong_shift(lognorm)
