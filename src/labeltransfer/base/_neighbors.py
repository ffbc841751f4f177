"""Nearest neighbours of cells in an embedding, memory- and time-bounded for millions of cells.

Up to :data:`EXACT_MAX_CELLS` points, neighbours are exact (scikit-learn, which computes the
distances in row chunks). Above, an inverted-file index is used (as FAISS's ``IndexIVFFlat``,
Jégou et al. 2011): mini-batch k-means splits the points into lists of about 512 points, and
each point is compared only with the points of the ``n_probe`` lists whose centroids are
nearest to its own list's centroid. Memory holds the points, the list assignment and one
block of distances (at most :data:`BLOCK_CELLS` query points x candidates); no ``n x n``
array is ever formed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EXACT_MAX_CELLS", "knn"]

#: Largest number of indexed points searched exactly; above, the inverted-file search is used.
EXACT_MAX_CELLS = 50_000
#: Lists searched per point by the approximate search (its own list and the nearest others).
N_PROBE = 8
#: Query points whose distances are computed at once in the approximate search.
BLOCK_CELLS = 1024
#: Mean number of points per list of the approximate search.
LIST_CELLS = 512
#: Points sampled to fit the mini-batch k-means of the approximate search (per list).
SAMPLE_PER_LIST = 64


def _drop_self(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Drop each row's own index (or, if it is not among the hits, the farthest hit)."""
    own = neighbours == rows[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(neighbours, order, axis=1)


def _exact(x: np.ndarray, k: int, rows: np.ndarray) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1).fit(x)
    return index.kneighbors(x[rows], return_distance=False)


def _inverted_file(
    x: np.ndarray, k: int, rows: np.ndarray, *, n_probe: int, seed: int
) -> np.ndarray:
    """``k`` approximate nearest neighbours (self included) of ``x[rows]`` among ``x``."""
    import torch
    from sklearn.cluster import MiniBatchKMeans

    n = x.shape[0]
    n_lists = max(1, n // LIST_CELLS)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, min(n, SAMPLE_PER_LIST * n_lists), replace=False)
    kmeans = MiniBatchKMeans(
        n_clusters=n_lists, batch_size=4096, n_init=1, random_state=seed, max_no_improvement=5
    ).fit(x[sample])
    lists = kmeans.predict(x)
    centroids = kmeans.cluster_centers_.astype(x.dtype)
    sq = np.einsum("ij,ij->i", centroids, centroids)
    probes = np.empty((n_lists, min(n_probe, n_lists)), dtype=np.int64)
    for start in range(0, n_lists, BLOCK_CELLS):  # blocks: no n_lists x n_lists matrix
        block = slice(start, start + BLOCK_CELLS)
        between = sq[block, None] - 2 * centroids[block] @ centroids.T + sq[None, :]
        probes[block] = np.argsort(between, axis=1, kind="stable")[:, : probes.shape[1]]
    members = np.argsort(lists, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=n_lists))])
    norms = np.einsum("ij,ij->i", x, x)
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
        points = torch.from_numpy(x[candidates])
        points_sq = torch.from_numpy(norms[candidates])
        for start in range(0, wanted.size, BLOCK_CELLS):
            block = rows[wanted[start : start + BLOCK_CELLS]]
            query = torch.from_numpy(x[block])
            dist = torch.from_numpy(norms[block])[:, None] - 2 * query @ points.T + points_sq
            top = torch.topk(dist, k, dim=1, largest=False, sorted=True).indices.numpy()
            out[wanted[start : start + BLOCK_CELLS]] = candidates[top]
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
    n_probe: int = N_PROBE,
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
        Random state of the approximate search's k-means.
    exact_max
        Exact search up to this many points, the inverted-file search above
        (:data:`EXACT_MAX_CELLS` by default).
    n_probe
        Lists searched per point by the approximate search.

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
        hits = _inverted_file(x, k + 1, rows, n_probe=n_probe, seed=seed)
    return _drop_self(hits, rows, k).astype(np.int64)
