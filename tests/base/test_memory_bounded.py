"""Memory bounded by the minibatch: no dense cells x genes copy, approximate kNN, k-means."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import scvi

import labeltransfer as lt
from labeltransfer.base import _inference, _neighbors
from labeltransfer.base._neighbors import knn
from labeltransfer.scdet import _estimation

N_CELLS, N_GENES = 10_000, 5_000
#: A dense float32 copy of the whole matrix; half of it is the query, a quarter the budget.
DENSE_BYTES = N_CELLS * N_GENES * 4
#: Small minibatches (a dense batch is 2.5 MB), so that what grows with the data dominates.
BATCH_SIZE = 128


@pytest.fixture(scope="module")
def sparse_data():
    ref, query = lt.data.synthetic(
        n_reference=N_CELLS // 2,
        n_query=N_CELLS // 2,
        n_genes=N_GENES,
        n_types=4,
        n_novel=1,
        library_size=100.0,
        seed=0,
    )
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    assert adata.X.data.nbytes < DENSE_BYTES / 20  # the sparse matrix itself is small
    return adata


@pytest.mark.parametrize("name", ["JIND", "SCNYM", "SCDET", "CellPredX"])
def test_training_and_annotation_make_no_dense_copy(sparse_data, name, monkeypatch):
    """Numpy allocations (tracemalloc) stay far below one dense copy of the data."""
    # the passes after training (calibration, coverage, reference codes) read 1,024 cells at
    # a time: a dense float64 batch of 41 MB, which would not grow with the data
    monkeypatch.setattr(_inference, "INFERENCE_BATCH_SIZE", BATCH_SIZE)
    scvi.settings.seed = 0
    adata = sparse_data.copy()
    cls = getattr(lt, name)
    tracemalloc.start()
    try:
        cls.setup_anndata(adata, labels_key="cell_type")
        model = cls(adata, n_novel=1) if name == "SCDET" else cls(adata)
        extra = {"early_stopping": False} if name in ("SCNYM", "SCDET") else {}
        model.train(
            max_epochs=1,
            batch_size=BATCH_SIZE,
            limit_train_batches=2,
            accelerator="cpu",
            enable_progress_bar=False,
            **extra,
        )
        _, peak_train = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        model.annotate(key_added="out", batch_size=BATCH_SIZE)
        _, peak_annotate = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adata.obs["out"].notna().all()
    assert peak_train < DENSE_BYTES / 4, f"training allocated {peak_train / 1e6:.0f} MB"
    assert peak_annotate < DENSE_BYTES / 4, f"annotate allocated {peak_annotate / 1e6:.0f} MB"


def _manifold(n: int, dims: int = 20, seed: int = 0) -> np.ndarray:
    """Points of 6 groups on a curved 4-d manifold in ``dims`` dimensions."""
    rng = np.random.default_rng(seed)
    centres = 4 * rng.normal(size=(6, dims))
    latent = rng.normal(size=(n, 4))
    mix = rng.normal(size=(4, dims))
    noise = 0.05 * rng.normal(size=(n, dims))
    return (centres[rng.integers(0, 6, n)] + np.tanh(latent @ mix) + noise).astype(np.float32)


@pytest.mark.parametrize(
    ("method", "ivf_max", "n"),
    # the inverted file on enough points that its 8 probed lists are not all of them
    [("nndescent", 0, 4000), ("inverted file", 10**9, 20_000)],
)
def test_approximate_neighbours_match_the_exact_ones(monkeypatch, method, ivf_max, n):
    monkeypatch.setattr(_neighbors, "IVF_MAX_CELLS", ivf_max)
    called = []
    for name in ("_inverted_file", "_nndescent"):
        original = getattr(_neighbors, name)
        monkeypatch.setattr(
            _neighbors,
            name,
            lambda *a, _f=original, _n=name, **kw: called.append(_n) or _f(*a, **kw),
        )
    x = _manifold(n)
    exact = knn(x, 10, exact_max=10**9)
    approx = knn(x, 10, exact_max=0, seed=1)
    assert called == ["_inverted_file" if method == "inverted file" else "_nndescent"]
    assert approx.shape == exact.shape == (n, 10)
    assert not (approx == np.arange(n)[:, None]).any()  # each point itself excluded
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.95
    rows = np.array([5, 17, n - 1])
    np.testing.assert_array_equal(knn(x, 10, rows=rows, exact_max=0, seed=1), approx[rows])


def test_knn_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        knn(np.zeros((5, 2)), 5)


def test_query_knn_graph_uses_the_approximate_search_above_the_threshold(monkeypatch):
    from labeltransfer.cellpredx._data import query_knn_graph

    ref, query = lt.data.synthetic(n_reference=10, n_query=1500, n_genes=200, n_types=3, seed=2)
    adata = lt.data.concat_reference_query(ref, query, labels_key="cell_type")
    query_idx = np.flatnonzero(adata.obs["lt_role"] == "query")
    args = {"feature_idx": np.arange(200), "layer": None, "input_type": "counts", "n_pcs": 20}
    exact = query_knn_graph(adata, query_idx, **args)
    monkeypatch.setattr(_neighbors, "EXACT_MAX_CELLS", 100)
    approx = query_knn_graph(adata, query_idx, **args)
    assert approx.shape == exact.shape == (1500, 10)
    assert np.isin(approx, query_idx).all()
    same_type = adata.obs["cell_type_original"].to_numpy()
    rows = adata.obs["cell_type_original"].to_numpy()[query_idx][:, None]
    assert (same_type[approx] == rows).mean() > 0.95  # neighbours are of the cell's own type
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall > 0.8


def test_distribution_estimation_uses_minibatch_kmeans_on_large_data(monkeypatch):
    from sklearn import cluster

    rng = np.random.default_rng(0)
    centres = 5 * np.eye(4, 16)
    truth = np.repeat(np.arange(4), 500)
    features = (centres[truth] + 0.3 * rng.normal(size=(2000, 16))).astype(np.float32)
    labels = np.where((truth < 3) & (rng.random(2000) < 0.5), truth, -1)
    calls = []
    original = cluster.MiniBatchKMeans.fit_predict

    def spy(self, x, *args, **kwargs):
        calls.append(x.shape)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(cluster.MiniBatchKMeans, "fit_predict", spy)
    exact = _estimation.estimate_distribution(features, labels, 3, 4)
    assert not calls
    monkeypatch.setattr(_estimation, "KMEANS_EXACT_MAX", 500)
    large = _estimation.estimate_distribution(features, labels, 3, 4)
    assert calls  # mini-batch k-means ran
    np.testing.assert_allclose(large["distribution"], exact["distribution"], atol=0.01)
    np.testing.assert_array_equal(large["assignment"], truth)
