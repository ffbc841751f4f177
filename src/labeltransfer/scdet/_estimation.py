"""Class-distribution estimation (k-means + Hungarian matching) and novel-type counting.

Pure numpy / scikit-learn functions on embeddings; the Lightning callback that runs them
during training is :class:`~labeltransfer.scdet.DistributionEstimation`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from labeltransfer.base._neighbors import knn

__all__ = ["estimate_distribution", "estimate_n_novel", "match_clusters"]

#: Silhouette at or below which a partition shows "no substantial structure"
#: (Kaufman & Rousseeuw 1990, "Finding Groups in Data", ch. 2).
NO_STRUCTURE_SILHOUETTE = 0.25
#: Neighbours of an outlying query cell looked at to call it a boundary cell of a seen type
#: (as :func:`labeltransfer.tl.discover_novel`, k = 15).
BOUNDARY_NEIGHBOURS = 15
#: A group of unexplained query cells whose centre is closer than this times its median
#: radius to the centre of a seen type's explained query cells is an outlying part of that
#: type, not a novel type. Measured: seen-type parts pushed out by the warm-up embedding
#: 0.41-0.45 (synthetic) and 0.67-0.73 (CellBench H1975); novel types 0.96-2.1 (synthetic),
#: 0.84 (Kang B cells, next to the seen T cells) and 1.55-2.1 (Kang monocytes, CellBench).
SEEN_PART_RATIO = 0.78
#: Cells scored by the silhouette when choosing the number of novel types (a seeded subsample).
SILHOUETTE_SAMPLE = 3000
#: Largest number of cells clustered by exact k-means (float64); above, mini-batch k-means
#: (Sculley 2010) on float32 features, whose time and memory do not grow with n x k per
#: iteration.
KMEANS_EXACT_MAX = 100_000
#: Cells per step of the mini-batch k-means.
KMEANS_BATCH_SIZE = 4096


def match_clusters(
    clusters: np.ndarray, labels: np.ndarray, n_seen: int, n_clusters: int
) -> np.ndarray:
    """Map k-means clusters to classes as scDET does (section 3.3).

    The Hungarian algorithm (Kuhn 1955) assigns ``n_seen`` clusters one-to-one to the seen
    types, maximising the number of labelled cells of each type in its cluster; the remaining
    clusters are sorted by decreasing size and given to the novel classes ``n_seen``,
    ``n_seen + 1``, ... in that order.

    Parameters
    ----------
    clusters
        Cluster of every cell (``0 .. n_clusters - 1``).
    labels
        Class code of every cell: ``0 .. n_seen - 1`` for labelled (reference) cells, any
        other value (e.g. ``-1``) for unlabelled cells, which only count in the sizes.
    n_seen
        Number of seen (reference) types.
    n_clusters
        Number of clusters, ``|C_r U C_t|`` (at least ``n_seen``).

    Returns
    -------
    ``class_of_cluster``: array of ``n_clusters`` class codes, a permutation of
    ``0 .. n_clusters - 1``. Size ties among the novel clusters are broken by cluster index.
    """
    if n_clusters < n_seen:
        raise ValueError(f"n_clusters ({n_clusters}) must be at least n_seen ({n_seen}).")
    clusters = np.asarray(clusters, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if clusters.shape != labels.shape:
        raise ValueError("clusters and labels must have one entry per cell.")
    if clusters.size and (clusters.min() < 0 or clusters.max() >= n_clusters):
        raise ValueError(f"cluster ids must be in [0, {n_clusters}).")
    labelled = (labels >= 0) & (labels < n_seen)
    contingency = np.zeros((n_clusters, max(n_seen, 1)), dtype=np.int64)
    np.add.at(contingency, (clusters[labelled], labels[labelled]), 1)
    sizes = np.bincount(clusters, minlength=n_clusters)
    class_of_cluster = np.full(n_clusters, -1, dtype=np.int64)
    if n_seen > 0:
        rows, cols = linear_sum_assignment(contingency[:, :n_seen], maximize=True)
        class_of_cluster[rows] = cols
    rest = np.flatnonzero(class_of_cluster < 0)
    rest = rest[np.argsort(-sizes[rest], kind="stable")]
    class_of_cluster[rest] = n_seen + np.arange(rest.size)
    return class_of_cluster


def _unit_rows(features: np.ndarray) -> np.ndarray:
    """L2-normalised rows: float64 up to :data:`KMEANS_EXACT_MAX` cells, float32 above."""
    x = np.asarray(features)
    dtype = np.float64 if x.shape[0] <= KMEANS_EXACT_MAX else np.float32
    x = x.astype(dtype, copy=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def _kmeans(x: np.ndarray, n_clusters: int, *, n_init: int, seed: int) -> np.ndarray:
    """Cluster of each row: k-means up to :data:`KMEANS_EXACT_MAX` rows, mini-batch above."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if x.shape[0] <= KMEANS_EXACT_MAX:
        return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(x)
    kmeans = MiniBatchKMeans(
        n_clusters=n_clusters, n_init=n_init, random_state=seed, batch_size=KMEANS_BATCH_SIZE
    )
    return kmeans.fit_predict(x)


def _boundary(
    x: np.ndarray, labels: np.ndarray, n_seen: int, cells: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Flag ``cells`` most of whose nearest neighbours are labelled cells of one seen type."""
    k = min(BOUNDARY_NEIGHBOURS, x.shape[0] - 1)
    if k < 1:
        return np.zeros(cells.size, dtype=bool)
    neighbours = knn(x, k, rows=cells, seed=seed)
    codes = labels[neighbours]
    valid = (codes >= 0) & (codes < n_seen)
    counts = np.zeros((cells.size, max(n_seen, 1)), dtype=np.int64)
    rows = np.broadcast_to(np.arange(cells.size)[:, None], codes.shape)
    np.add.at(counts, (rows[valid], codes[valid]), 1)
    return counts.max(axis=1) > k / 2


def _match_by_centroids(
    x: np.ndarray, clusters: np.ndarray, labels: np.ndarray, n_seen: int, n_clusters: int
) -> np.ndarray:
    r"""Map clusters of unlabelled cells to classes by centroid similarity (Hungarian).

    ``clusters`` is the cluster of each clustered (unlabelled) cell and negative for the
    labelled cells, whose type centroids the clusters are compared to. The ``n_seen``
    clusters whose (L2-normalised) centroids are most similar, one-to-one, to the centroids
    of the labelled cells of the seen types get those types; the remaining clusters go to
    the novel classes by decreasing size, as in :func:`match_clusters`.

    A cluster matched to a seen type whose centroid is more similar to *another* seen type is
    given to that type instead (many-to-one): k-means with :math:`|\mathcal C_r \cup
    \mathcal C_t|` clusters does not resolve a rare type (the 15 target cells of a
    subtype among 1,585) but splits a large one, and the one-to-one matching then hands half
    of the large type to the rare one, whose estimated frequency (0.15 for a true 0.01 on
    the long-tail benchmark) the regulariser then enforces on the predictions. The
    unresolved type gets no cluster; :func:`estimate_distribution` gives it its reference
    proportion.
    """
    labelled = (labels >= 0) & (labels < n_seen)
    clustered = clusters >= 0
    sizes = np.bincount(clusters[clustered], minlength=n_clusters)
    centroids = np.zeros((n_clusters, x.shape[1]))
    np.add.at(centroids, clusters[clustered], x[clustered])
    types = np.zeros((n_seen, x.shape[1]))
    np.add.at(types, labels[labelled], x[labelled])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    types /= np.maximum(np.linalg.norm(types, axis=1, keepdims=True), 1e-12)
    class_of_cluster = np.full(n_clusters, -1, dtype=np.int64)
    if n_seen > 0:
        similarity = centroids @ types.T
        rows, cols = linear_sum_assignment(similarity, maximize=True)
        class_of_cluster[rows] = similarity[rows].argmax(axis=1)
    rest = np.flatnonzero(class_of_cluster < 0)
    rest = rest[np.argsort(-sizes[rest], kind="stable")]
    class_of_cluster[rest] = n_seen + np.arange(rest.size)
    return class_of_cluster


def _fill_unresolved(seen_sizes: np.ndarray, reference: np.ndarray, n_seen: int) -> np.ndarray:
    """Give the seen types that no target cluster was matched to their reference proportion.

    A type k-means did not resolve is estimated at its share of the reference times the
    number of target cells given to seen types, instead of zero (which the regulariser would
    enforce by never predicting the type in the target).
    """
    reference_sizes = np.bincount(reference, minlength=n_seen).astype(np.float64)
    missing = (seen_sizes == 0) & (reference_sizes > 0)
    if not missing.any() or reference_sizes.sum() == 0:
        return seen_sizes
    filled = seen_sizes.copy()
    filled[missing] = reference_sizes[missing] / reference_sizes.sum() * seen_sizes.sum()
    return filled


def estimate_distribution(
    features: np.ndarray,
    labels: np.ndarray,
    n_seen: int,
    n_classes: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    cells: str = "target",
) -> dict[str, np.ndarray]:
    r"""ScDET's dynamic distribution estimation (section 3.3).

    k-means with ``n_classes`` = :math:`|\mathcal C_r \cup \mathcal C_t|` clusters on the
    L2-normalised contrastive features, cluster frequencies
    :math:`\pi_i = s_i / \sum_j s_j`, Hungarian matching of clusters to the seen types and
    of the remaining clusters, by decreasing size, to the novel classes.

    ``cells="all"`` is the paper's procedure: k-means on all cells (labelled and
    unlabelled) and the matching of :func:`match_clusters` (number of labelled cells of each
    type in each cluster). ``cells="target"`` (the default) clusters the unlabelled
    (target) cells only, matches their clusters to the seen types by the cosine similarity
    of the cluster centroids to the centroids of the labelled cells of each type
    (Hungarian), and counts the labelled cells under their own label. Under a domain shift
    (e.g. Kang et al. control -> IFN-stimulated PBMC), k-means on all cells splits seen
    types by domain: the target part of a seen type becomes an unmatched cluster, is
    counted as a novel class, and the regulariser then pushes seen target cells to the
    novel classes (measured: seen accuracy 0.48 instead of 0.9). The reference part of
    :math:`\pi` is known exactly from the labels, and within the target the clusters
    cannot split by domain.

    Above 100,000 clustered cells, mini-batch k-means (batches of 4,096 cells) on float32
    features replaces k-means, so that time and memory stay bounded for millions of cells.

    Parameters
    ----------
    features
        Cells x dimensions (the contrastive-branch features).
    labels
        Seen-type code of the labelled cells, a negative value for the others (target).
    n_seen
        Number of seen types.
    n_classes
        Number of classes (seen + novel).
    seed
        Random state of k-means.
    n_init
        k-means restarts (k-means++ initialisation); the paper does not say.
    cells
        ``"target"`` or ``"all"`` (see above). ``"target"`` falls back to ``"all"`` when
        there are fewer unlabelled cells than classes.

    Returns
    -------
    Dict with ``distribution`` (:math:`\pi` over all cells, in class order, sums to 1),
    ``target_distribution`` (the class frequencies among the unlabelled cells),
    ``clusters`` (cluster of each clustered cell, ``-1`` for the others),
    ``class_of_cluster`` and ``assignment`` (class of each cell).
    """
    if cells not in ("target", "all"):
        raise ValueError(f"cells must be 'target' or 'all', got {cells!r}.")
    x = _unit_rows(features)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    if x.shape[0] < n_classes:
        raise ValueError(
            f"k-means needs at least {n_classes} cells for {n_classes} classes, got {x.shape[0]}."
        )
    labelled = (labels >= 0) & (labels < n_seen)
    target = ~labelled
    clusters = np.full(x.shape[0], -1, dtype=np.int64)
    if cells == "target" and target.sum() >= n_classes:
        clusters[target] = _kmeans(x[target], n_classes, n_init=n_init, seed=seed)
        class_of_cluster = _match_by_centroids(x, clusters, labels, n_seen, n_classes)
        assignment = np.where(target, class_of_cluster[np.maximum(clusters, 0)], labels)
    else:
        clusters = _kmeans(x, n_classes, n_init=n_init, seed=seed)
        class_of_cluster = match_clusters(clusters, labels, n_seen, n_classes)
        assignment = class_of_cluster[clusters]
    sizes = np.bincount(assignment, minlength=n_classes).astype(np.float64)
    target_sizes = np.bincount(assignment[target], minlength=n_classes).astype(np.float64)
    if cells == "target":
        target_sizes[:n_seen] = _fill_unresolved(target_sizes[:n_seen], labels[labelled], n_seen)
    if target_sizes.sum() == 0:
        target_sizes = sizes
    return {
        "distribution": sizes / sizes.sum(),
        "target_distribution": target_sizes / target_sizes.sum(),
        "clusters": clusters,
        "class_of_cluster": class_of_cluster,
        "assignment": assignment,
    }


def estimate_n_novel(
    embedding: np.ndarray,
    labels: np.ndarray,
    is_query: np.ndarray,
    n_seen: int,
    *,
    expression: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
    theta: float = 0.05,
    max_novel: int = 10,
    min_cells: int = 10,
    seed: int = 0,
) -> tuple[int, dict[str, Any], np.ndarray]:
    """Estimate the number of novel types among the query cells of a trained embedding.

    scDET assumes the total number of types is known. When it is not, this estimate is used:

    1. **Unexplained query cells.** Each seen type gets the centroid of its labelled cells in
       the L2-normalised embedding. A query cell is *unexplained* when its cosine similarity
       to the nearest seen centroid is below that type's threshold: the ``theta``-quantile of
       the similarities of the ``calibration`` cells of the type (held-out reference cells)
       to their own centroid, so that about a fraction ``theta`` of the cells of a seen type
       would be flagged (the package's per-type rejection rule, applied in the embedding).
       Outlying cells on the edge of a seen type, whose 15 nearest neighbours are mostly
       labelled cells of one seen type, are not counted (the boundary rule of
       :func:`labeltransfer.tl.discover_novel`).
    2. **Is there a novel type?** Seen query cells alone would give about ``theta`` of the
       query as unexplained. With fewer than ``max(min_cells, 2 * theta * n_query)``
       unexplained cells the estimate is 0.
    3. **Counted where novel types stay apart.** An embedding trained to separate the seen
       types pulls novel types together (on the synthetic tasks the silhouette of the true
       novel types is about 0 in scDET's warm-up embedding and 0.4 in the PCs of the
       log-normalised input), so the unexplained cells are grouped in ``expression``, a
       representation that never saw a label (the embedding when it is not given). There,
       an unexplained cell whose 15 nearest query cells are mostly explained is an outlier
       of a seen type and is left out.
    4. **How many?** k-means (``k = 2 .. max_novel``) on the remaining cells, each ``k``
       scored by the silhouette (on a seeded subsample of at most 3,000 cells), as
       :func:`labeltransfer.tl.discover_novel` scores partitions of low-confidence cells.
       Partitions with a cluster smaller than ``min_cells`` are skipped. The best ``k`` is
       kept when its silhouette exceeds 0.25; at or below, the cells show "no substantial
       structure" (Kaufman & Rousseeuw 1990) and form one novel type.

    Parameters
    ----------
    embedding
        Cells x dimensions: the trained embedding (compared by cosine).
    labels
        Seen-type code of labelled cells (``0 .. n_seen - 1``), negative for the others.
    is_query
        Boolean mask of the query (unlabelled) cells.
    n_seen
        Number of seen types.
    expression
        Cells x dimensions (Euclidean), e.g. principal components of the log-normalised
        expression, in which the unexplained query cells are grouped; only its query rows
        are read. The embedding by default.
    calibration
        Boolean mask of the labelled cells that calibrate the thresholds (e.g. held-out
        reference cells); all labelled cells by default.
    theta
        Fraction of seen cells allowed below the threshold (0.05 as the package's rejection).
    max_novel
        Largest number of novel types considered.
    min_cells
        Smallest novel type.
    seed
        Random state of k-means and of the silhouette subsample.

    Returns
    -------
    n_novel
        The estimate.
    report
        ``n_query``, ``n_outlying`` (below their threshold), ``n_unexplained`` (after the
        boundary rule), ``n_grouped`` (after the query-neighbour rule), ``noise_level``,
        ``theta``, the scan (``k``, ``silhouette``) over the partitions tried and the
        ``reason`` of the choice.
    groups
        For every cell, the novel type (``0 .. n_novel - 1``) of the chosen partition,
        ``-1`` for the other cells.
    """
    x = _unit_rows(embedding)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    is_query = np.asarray(is_query, dtype=bool).ravel()
    if expression is not None and len(expression) != x.shape[0]:
        raise ValueError(
            f"expression has {len(expression)} rows but the embedding has {x.shape[0]} cells; "
            "pass one row per cell (only the query rows are read)."
        )
    labelled = (labels >= 0) & (labels < n_seen)
    calib = labelled if calibration is None else (np.asarray(calibration, bool) & labelled)
    if not calib.any():
        calib = labelled
    centroids = np.zeros((n_seen, x.shape[1]))
    for c in range(n_seen):
        members = labelled & (labels == c)
        if members.any():
            centroids[c] = x[members].mean(axis=0)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    thresholds = np.full(n_seen, -np.inf)
    for c in range(n_seen):
        members = calib & (labels == c)
        if members.any():
            thresholds[c] = np.quantile(x[members] @ centroids[c], theta)
    query_idx = np.flatnonzero(is_query)
    sim = x[query_idx] @ centroids.T
    nearest = sim.argmax(axis=1)
    outlying = sim[np.arange(sim.shape[0]), nearest] < thresholds[nearest]
    unexplained = outlying.copy()
    if outlying.any():
        unexplained[outlying] = ~_boundary(x, labels, n_seen, query_idx[outlying], seed=seed)
    n_query = int(query_idx.size)
    noise = max(min_cells, int(np.ceil(2 * theta * n_query)))
    report: dict[str, Any] = {
        "n_query": n_query,
        "n_outlying": int(outlying.sum()),
        "n_unexplained": int(unexplained.sum()),
        "noise_level": noise,
        "theta": theta,
    }
    groups = np.full(x.shape[0], -1, dtype=np.int64)
    if unexplained.sum() < noise:
        report.update(n_grouped=0, k=[], silhouette=[])
        report["reason"] = "too few unexplained query cells"
        return 0, report, groups
    space = np.asarray(x[query_idx] if expression is None else expression[query_idx])
    grouped = unexplained & _mostly_among(space, unexplained, seed=seed)
    # where each seen type's explained query cells lie in the same space
    seen_centres = (
        np.stack(
            [space[~outlying & (nearest == c)].mean(axis=0) for c in np.unique(nearest[~outlying])]
        )
        if (~outlying).any()
        else np.empty((0, space.shape[1]))
    )
    report["n_seen_part"] = 0
    while True:
        report["n_grouped"] = int(grouped.sum())
        if grouped.sum() < min_cells:
            report.update(k=[], silhouette=[])
            report["reason"] = "unexplained query cells are outliers of seen types"
            return 0, report, groups
        k, clusters, scan = _choose_k(space[grouped], max_novel, min_cells, seed)
        report.update(scan)
        seen_part = _on_seen_types(space[grouped], clusters, seen_centres)
        if not seen_part.any():
            break
        report["n_seen_part"] += int(seen_part.sum())
        grouped[np.flatnonzero(grouped)[seen_part]] = False
    report["reason"] = (
        "best silhouette" if k > 1 else "no partition with substantial structure: one type"
    )
    groups[query_idx[grouped]] = clusters
    return k, report, groups


def _choose_k(
    candidates: np.ndarray, max_novel: int, min_cells: int, seed: int
) -> tuple[int, np.ndarray, dict[str, list]]:
    """Best k-means partition of ``candidates`` by the silhouette (1 without structure)."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    sample = (
        rng.choice(candidates.shape[0], SILHOUETTE_SAMPLE, replace=False)
        if candidates.shape[0] > SILHOUETTE_SAMPLE
        else np.arange(candidates.shape[0])
    )
    scan: dict[str, list] = {"k": [], "silhouette": []}
    best: tuple[int, float, np.ndarray] = (1, NO_STRUCTURE_SILHOUETTE, np.zeros(0))
    for k in range(2, max_novel + 1):
        if k * min_cells > candidates.shape[0]:
            break
        clusters = _kmeans(candidates, k, n_init=3, seed=seed)
        if np.bincount(clusters, minlength=k).min() < min_cells:
            continue
        sub = clusters[sample]
        if len(np.unique(sub)) < 2:
            continue
        score = float(silhouette_score(candidates[sample], sub))
        scan["k"].append(k)
        scan["silhouette"].append(score)
        if score > best[1]:
            best = (k, score, clusters)
    k, _, clusters = best
    if k == 1:
        clusters = np.zeros(candidates.shape[0], dtype=np.int64)
    return k, clusters, scan


def _on_seen_types(
    candidates: np.ndarray, clusters: np.ndarray, seen_centres: np.ndarray
) -> np.ndarray:
    """Flag the cells of groups whose centre lies on the explained cells of a seen type.

    A group is part of a seen type when its centre is closer to the centre of that type's
    explained query cells than :data:`SEEN_PART_RATIO` times its median radius.
    """
    out = np.zeros(candidates.shape[0], dtype=bool)
    if seen_centres.shape[0] == 0:
        return out
    for g in np.unique(clusters):
        members = clusters == g
        centre = candidates[members].mean(axis=0)
        radius = np.median(np.linalg.norm(candidates[members] - centre, axis=1))
        gap = np.linalg.norm(seen_centres - centre, axis=1).min()
        out[members] = gap < SEEN_PART_RATIO * radius
    return out


def _mostly_among(space: np.ndarray, flagged: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flag the points of ``space`` most of whose nearest neighbours are ``flagged`` points."""
    k = min(BOUNDARY_NEIGHBOURS, space.shape[0] - 1)
    if k < 1:
        return flagged.copy()
    neighbours = knn(space, k, rows=np.flatnonzero(flagged), seed=seed)
    out = np.zeros(space.shape[0], dtype=bool)
    out[flagged] = flagged[neighbours].sum(axis=1) > k / 2
    return out
