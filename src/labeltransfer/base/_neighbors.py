"""Nearest neighbours of cells in an embedding, memory- and time-bounded for millions of cells.

Up to :data:`EXACT_MAX_CELLS` points, neighbours are exact (scikit-learn, which computes the
distances in row chunks). Above, NN-descent (Dong et al. 2011) from pynndescent, the library
behind umap-learn and :func:`scanpy.pp.neighbors`, with their parameters. Memory holds the
points, the random-projection trees and the ``n x k`` neighbour graph; no ``n x n`` array is
ever formed.

pynndescent replaced a hand-written inverted-file index (mini-batch k-means lists of about 512
points, 8 lists probed per point, as FAISS's ``IndexIVFFlat``) after a side-by-side
measurement (``benchmarks/neighbors.py``, ``benchmarks/results/neighbors.md``: Gaussian
mixtures of 30 components, one thread, 2,000 points checked against exact neighbours).
Recall@10 of pynndescent vs the inverted file: 0.983 vs 0.967 and 0.973 vs 0.971 at 100,000
points (32 and 64 dimensions), 0.977 vs 0.883 and 0.964 vs 0.894 at 200,000, 0.796 vs 0.718
with isotropic components (200,000 x 64); CPU seconds (the shared machine was loaded, so CPU
rather than wall time) 4.2 vs 3.9, 5.0 vs 4.9, 9.2 vs 7.8, 12.0 vs 10.6 and 13.0 vs 14.2. The
inverted file took up to 15% less time but lost recall as the data grew (its probed lists
cover a shrinking share of each component), so it was not better on both counts. At 50,000
points, the largest exact size, it had the better recall (0.9998 and 0.9986 vs 0.988 and
0.983) and took more time (1.9 and 2.1 vs 1.6 and 1.8 CPU seconds).

That comparison was made after a warm-up. pynndescent's first call in a process compiles its
``nn_descent`` with numba, which cannot cache it (the distance function is an argument): 31.6 s
on 5,000 points against 0.2 s for the inverted file (``benchmarks/results/neighbors.md``,
2026-12-06), paid once by every process that annotates more than 50,000 cells.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXACT_MAX_CELLS", "knn"]

#: Largest number of indexed points searched exactly; above, NN-descent is used.
EXACT_MAX_CELLS = 50_000


def _drop_self(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Drop each row's own index (or, if it is not among the hits, the farthest hit)."""
    own = neighbours == rows[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(neighbours, order, axis=1)


def _exact(x: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(x)
    return index.kneighbors(x[rows], return_distance=False)


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
        Exact search up to this many points, NN-descent above (:data:`EXACT_MAX_CELLS` by
        default).

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
    else:
        hits = _nndescent(x, k + 1, rows, seed=seed)
    return _drop_self(hits, rows, k).astype(np.int64)


def leiden(neighbours: np.ndarray, resolution: float, seed: int) -> np.ndarray:
    """Leiden communities (RB configuration, :mod:`leidenalg`) of a kNN graph.

    Parameters
    ----------
    neighbours
        ``(n, k)`` neighbour positions from :func:`knn`; the graph is undirected, without
        loops or multiple edges.
    resolution
        Resolution parameter.
    seed
        Seed of the optimisation.

    Returns
    -------
    One community number per cell.
    """
    import igraph as ig
    import leidenalg

    n, k = neighbours.shape
    edges = np.column_stack([np.repeat(np.arange(n), k), neighbours.ravel()])
    graph = ig.Graph(n=n, edges=edges, directed=False)
    graph.simplify(multiple=True, loops=True)
    partition = leidenalg.find_partition(
        graph, leidenalg.RBConfigurationVertexPartition, resolution_parameter=resolution, seed=seed
    )
    return np.asarray(partition.membership)
