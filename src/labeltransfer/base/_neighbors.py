"""Nearest neighbours of cells in an embedding, memory- and time-bounded for millions of cells.

Three regimes by the number of points ``n``; memory holds the points, the index and the
``n x k`` neighbour graph, never an ``n x n`` array:

- up to :data:`EXACT_MAX_CELLS` (20,000): exact (scikit-learn, distances in row chunks);
- up to :data:`IVF_MAX_CELLS` (100,000): an inverted file (:func:`_inverted_file`,
  mini-batch k-means lists of about 512 points, 8 lists probed per point, as FAISS's
  ``IndexIVFFlat``);
- above: NN-descent (Dong et al. 2011) from pynndescent, the library behind umap-learn and
  :func:`scanpy.pp.neighbors`, with their parameters.

Measured side by side (``benchmarks/neighbors.py``, ``benchmarks/results/neighbors.md``,
2026-12-06: Gaussian mixtures of 30 components, one thread, recall@10 over 2,000 points), once
both are warm: at 100,000 points the two approximate searches are alike (recall 0.967 / 0.971
for the inverted file against 0.983 / 0.973 for pynndescent in 32 / 64 dimensions; 3.0 / 4.0 s
against 3.0 / 3.5 s); at 200,000 the inverted file loses recall (0.883 / 0.894 against 0.977
/ 0.964), its probed lists covering a shrinking share of each component. But pynndescent's
first call in a process compiles its ``nn_descent`` with numba, which cannot cache it (the
distance function is an argument): 31.6 s against 0.2 s for the inverted file. While
NN-descent began at 50,000 points, every process searching more did pay it (JIND annotating
100,000 cells: 52 s, most of it that compilation; 65.8 s -> 37.7 s with the inverted file, one
fresh process each). Hence
the inverted file up to 100,000 points, the largest measured size where it costs no recall,
and NN-descent beyond, where its recall matters and the compilation is a smaller share.

The exact search grows as ``n**2``: at 50,000 points it took 10.4 / 13.9 s in 32 / 64
dimensions against 1.7 s for the inverted file at recall 0.9998 / 0.9986; at 20,000 points
2.0 / 2.2 s against 0.7 s at recall 0.9995 / 0.9998; at 10,000 0.4 / 0.6 s against 0.4 / 0.3
s (``benchmarks/results/neighbors.md``, 2026-12-07). Hence exact up to 20,000 points, at most
about 2 s. With exact search up to 50,000 points, JIND's default ``annotate`` of a
50,000-cell query took 20.1 s (10.7 s of it two exact searches) and CellPredX's one-epoch
``train`` with 50,000 query cells 28.7 s (12.5 s the search of its query graph); with the
inverted file 11.5 s and 15.5 s (single runs, one thread).
"""

from __future__ import annotations

import random

import numpy as np

__all__ = ["EXACT_MAX_CELLS", "IVF_MAX_CELLS", "knn", "nearest"]

#: Largest number of indexed points searched exactly; above, an approximate search is used.
EXACT_MAX_CELLS = 20_000
#: Largest number of points searched with the inverted file; above, NN-descent.
IVF_MAX_CELLS = 100_000
#: Inverted file: lists probed per point, mean points per list, k-means sample per list.
N_PROBE, LIST_CELLS, SAMPLE_PER_LIST = 8, 512, 64
#: Points per block of the exact distance computations (:func:`nearest`, the open-set layer's
#: bank searches): a block of distances to a bank of 5,000 rows is 5,000 x 4,096 float32
#: values, 80 MB (16 times that was 1.3 GB, the whole extra memory of annotating 200,000
#: cells).
_BLOCK = 4096


def _drop_self(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Drop each row's own index (or, if it is not among the hits, the farthest hit)."""
    own = neighbours == rows[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(neighbours, order, axis=1)


def _exact(x: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(x)
    return index.kneighbors(x[rows], return_distance=False)


def nearest(bank: np.ndarray, points: np.ndarray, k: int) -> np.ndarray:
    """Exact ``k`` nearest rows of ``bank`` for each of ``points`` (nearest first).

    Distances by blocks of :data:`_BLOCK` points (``torch.cdist``), so memory holds one block
    times the bank.
    """
    import torch

    k = min(k, len(bank))
    bank_t = torch.as_tensor(bank, dtype=torch.float32)
    out = np.empty((len(points), k), dtype=np.int64)
    for start in range(0, len(points), _BLOCK):
        block = torch.as_tensor(points[start : start + _BLOCK], dtype=torch.float32)
        out[start : start + len(block)] = torch.cdist(block, bank_t).topk(k, largest=False)[1]
    return out


def _inverted_file(x: np.ndarray, k: int, rows: np.ndarray, *, seed: int) -> np.ndarray:
    """``k`` approximate nearest neighbours (self included) of ``x[rows]`` among ``x``.

    An inverted file (as FAISS's ``IndexIVFFlat``): mini-batch k-means lists of about
    :data:`LIST_CELLS` points; each point's neighbours are searched exactly (:func:`nearest`)
    among the points of the :data:`N_PROBE` lists nearest to its own list's centroid. Memory
    holds the points, the lists and one block of distances.
    """
    from sklearn.cluster import MiniBatchKMeans

    n = x.shape[0]
    n_lists = max(1, n // LIST_CELLS)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, min(n, SAMPLE_PER_LIST * n_lists), replace=False)
    kmeans = MiniBatchKMeans(
        n_clusters=n_lists, batch_size=4096, n_init=1, random_state=seed, max_no_improvement=5
    ).fit(x[sample])
    lists = kmeans.predict(x)
    centroids = kmeans.cluster_centers_
    probes = nearest(centroids, centroids, N_PROBE)
    members = np.argsort(lists, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=n_lists))])
    out = np.empty((rows.size, k), dtype=np.int64)
    row_lists = lists[rows]
    by_list = np.argsort(row_lists, kind="stable")
    row_bounds = np.concatenate([[0], np.cumsum(np.bincount(row_lists, minlength=n_lists))])
    for c in range(n_lists):
        wanted = by_list[row_bounds[c] : row_bounds[c + 1]]
        if wanted.size == 0:
            continue
        candidates = np.concatenate([members[bounds[p] : bounds[p + 1]] for p in probes[c]])
        if candidates.size < k:  # tiny lists: fall back to every point
            candidates = np.arange(n)
        out[wanted] = candidates[nearest(x[candidates], x[rows[wanted]], k)]
    return out


def _nndescent(x: np.ndarray, k: int, rows: np.ndarray, *, seed: int) -> np.ndarray:
    """``k`` approximate nearest neighbours (self included) of ``x[rows]`` among ``x``.

    NN-descent (Dong et al. 2011) with :mod:`pynndescent` and the parameters umap-learn (and so
    :func:`scanpy.pp.neighbors`) uses: ``min(64, 5 + sqrt(n) / 20)`` random-projection trees,
    ``max(5, log2 n)`` iterations, 60 candidates, low-memory mode. The index holds the
    ``n x k`` neighbour graph of every point; the rows asked for are read from it.
    """
    from pynndescent import NNDescent

    n = x.shape[0]
    index = NNDescent(
        x,
        n_neighbors=k,
        metric="euclidean",
        random_state=seed,
        n_trees=min(64, 5 + round(n**0.5 / 20.0)),
        n_iters=max(5, round(np.log2(n))),
        max_candidates=60,
        low_memory=True,
        compressed=True,
        verbose=False,
    )
    neighbours, _ = index.neighbor_graph
    return np.asarray(neighbours[rows], dtype=np.int64)


def knn(
    x: np.ndarray,
    k: int,
    *,
    rows: np.ndarray | None = None,
    seed: int = 0,
    exact_max: int | None = None,
) -> np.ndarray:
    """Find the ``k`` nearest neighbours (Euclidean) of points of ``x``, each itself excluded.

    Parameters
    ----------
    x
        Points x dimensions (an embedding: PCs, a latent space).
    k
        Neighbours per point, each point itself excluded (at most ``len(x) - 1``).
    rows
        Positions of the points whose neighbours are wanted; all points by default.
    seed
        Random state of the approximate search.
    exact_max
        Exact search up to this many points (:data:`EXACT_MAX_CELLS` by default); above, the
        inverted file up to :data:`IVF_MAX_CELLS` points, NN-descent beyond.

    Returns
    -------
    ``(len(rows), k)`` int64 positions in ``x``, nearest first.
    """
    x = np.ascontiguousarray(x, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}.")
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    if n <= (EXACT_MAX_CELLS if exact_max is None else exact_max):
        hits = _exact(x, k, rows)
    elif n <= IVF_MAX_CELLS:
        hits = _inverted_file(x, k + 1, rows, seed=seed)
    else:
        hits = _nndescent(x, k + 1, rows, seed=seed)
    return _drop_self(hits, rows, k).astype(np.int64)


def leiden(neighbours: np.ndarray, resolution: float, seed: int) -> np.ndarray:
    """Leiden communities (modularity at ``resolution``, igraph's Leiden) of a kNN graph.

    The quality is the RB configuration model's (modularity with a resolution), optimised with
    two iterations, as :mod:`leidenalg`'s ``RBConfigurationVertexPartition`` by default; igraph's
    own implementation found partitions of the same quality (adjusted Rand index 0.99-1.00
    against leidenalg's) 13-16x faster (0.5 against 8.9 s on a 50,000-cell graph).

    Parameters
    ----------
    neighbours
        ``(n, k)`` neighbour positions from :func:`knn`; the graph is undirected, without
        loops or multiple edges.
    resolution
        Resolution parameter.
    seed
        Seed of the optimisation (a generator of its own: igraph's is set to it for the call,
        then back to :mod:`random`, igraph's default).

    Returns
    -------
    One community number per cell.
    """
    import igraph as ig

    n, k = neighbours.shape
    source, target = np.repeat(np.arange(n, dtype=np.int64), k), neighbours.ravel()
    low, high = np.minimum(source, target), np.maximum(source, target)
    keys = np.unique((low * n + high)[low != high])  # one edge per pair, no loops
    # pairs as tuples of Python ints: igraph reads them 3x faster than an array's rows
    # (0.27 against 0.81 s for 750,000 edges)
    edges = list(zip((keys // n).tolist(), (keys % n).tolist(), strict=True))
    graph = ig.Graph(n=n, edges=edges, directed=False)
    ig.set_random_number_generator(random.Random(seed))
    try:
        partition = graph.community_leiden(
            objective_function="modularity", resolution=resolution, n_iterations=2
        )
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(partition.membership)
