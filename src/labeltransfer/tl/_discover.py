"""Propose new cell identities among low-confidence cells (scNym's discovery heuristic).

References
----------
Kimmel JC, Kelley DR. 2021. Semisupervised adversarial neural networks for single-cell
classification. Genome Res 31: 1781-1793. doi:10.1101/gr.268581.120
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from labeltransfer._constants import NOVEL_PREFIX

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData

__all__ = ["discover_novel"]

#: Neighbours per cell of the kNN graphs (scNym: k = 15).
N_NEIGHBORS = 15


def _boundary(
    z: np.ndarray, confident: np.ndarray, prediction: np.ndarray, candidates: np.ndarray
) -> np.ndarray:
    """Boundary flags of ``candidates``: most kNN neighbours are confident cells of one type."""
    from labeltransfer.base._neighbors import knn

    if not candidates.any() or len(z) < 2:
        return np.zeros(int(candidates.sum()), dtype=bool)
    k = min(N_NEIGHBORS, len(z) - 1)
    neighbours = knn(z, k, rows=np.flatnonzero(candidates))
    _, codes = np.unique(prediction, return_inverse=True)
    calls = np.where(confident[neighbours], codes[neighbours], -1)
    counts = np.zeros((len(neighbours), codes.max() + 2), dtype=np.int64)
    rows = np.broadcast_to(np.arange(len(neighbours))[:, None], calls.shape)
    np.add.at(counts, (rows, calls + 1), 1)
    return counts[:, 1:].max(axis=1) > k / 2


def discover_novel(
    adata: AnnData,
    *,
    key: str,
    confidence: float = 0.5,
    resolutions: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 1.0),
    min_cells: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Group low-confidence cells into putative new cell identities.

    Implements the community-detection heuristic of scNym (Kimmel and Kelley 2021, Methods
    "Proposing new cell identities"): cells with a confidence below ``confidence`` are taken,
    a kNN graph (``k = 15``) is built on their embedding ``obsm[f"X_{key}"]`` (scNym's
    penultimate activations), Leiden partitions are computed at each resolution, and the
    partition with the highest Calinski-Harabasz score is kept. Partitions with a single
    community have no score and are chosen only when no resolution splits the cells.

    Boundary cells. The paper separates low-confidence cells on a cell-type boundary from
    putative new types by whether they sit in an otherwise high-confidence region of the
    embedding. Here a low-confidence cell is a *boundary* cell when, among its 15 nearest
    neighbours in the embedding of **all** cells, more than half are confident cells
    (confidence >= ``confidence``) with the same predicted reference type. Boundary cells
    are excluded from the graph and keep their current ``obs[key]`` (reference call or
    ``"Unassigned"``). Neighbours are exact up to 20,000 cells and approximate (an inverted
    file, NN-descent above 100,000 cells) above, so millions of cells fit in memory and time.

    The remaining low-confidence cells in communities of at least ``min_cells`` cells are
    relabelled ``obs[key] = "novel_<i>"`` (``i`` by decreasing size, numbered after the
    ``novel_<i>`` groups ``obs[key]`` already holds, such as those of ``annotate``'s open-set
    layer); cells in smaller communities keep their current label.

    Parameters
    ----------
    adata
        Query annotated by a model's ``annotate`` with prefix ``key``.
    key
        Prefix of the annotation: reads ``obs[f"{key}_confidence"]``,
        ``obs[f"{key}_prediction"]`` and ``obsm[f"X_{key}"]``; writes ``obs[key]`` and
        ``uns[key]["novel"]``.
    confidence
        Cells with a lower confidence are candidates (scNym's ``t_conf``).
    resolutions
        Leiden resolutions scanned (scNym: 0.1, 0.2, 0.3, 0.5, 1.0).
    min_cells
        Smallest community reported as a new identity.
    seed
        Seed of the Leiden optimisation.

    Returns
    -------
    DataFrame indexed by the new group names with ``n_cells``, ``mean_confidence`` and
    ``top_prediction`` (the most frequent reference prediction of its cells). The same
    summary is stored, as plain lists, in ``uns[key]["novel"]["groups"]`` together with the
    chosen ``resolution`` and ``calinski_harabasz`` score, the scan over resolutions, the
    threshold and the number of boundary cells.

    Raises
    ------
    KeyError
        If the annotation fields of ``key`` are missing.

    References
    ----------
    Kimmel JC, Kelley DR. 2021. Semisupervised adversarial neural networks for single-cell
    classification. Genome Res 31: 1781-1793.
    """
    from sklearn.metrics import calinski_harabasz_score

    from labeltransfer.base._neighbors import knn, leiden

    needed = [f"{key}_confidence", f"{key}_prediction", key]
    missing = [c for c in needed if c not in adata.obs]
    if missing or f"X_{key}" not in adata.obsm:
        raise KeyError(
            f"annotation {key!r} not found (missing obs {missing} or obsm 'X_{key}'); run "
            "annotate first."
        )
    conf = np.asarray(adata.obs[f"{key}_confidence"], dtype=np.float64)
    prediction = np.asarray(adata.obs[f"{key}_prediction"]).astype(str)
    z = np.asarray(adata.obsm[f"X_{key}"], dtype=np.float32)
    confident = conf >= confidence
    low = ~confident

    boundary = np.zeros(adata.n_obs, dtype=bool)
    boundary[low] = _boundary(z, confident, prediction, low)
    candidates = np.flatnonzero(low & ~boundary)

    best_labels = np.zeros(len(candidates), dtype=np.int64)
    best_resolution, best_score = float("nan"), float("nan")
    scan = {"resolution": [], "n_groups": [], "calinski_harabasz": []}
    if len(candidates) > 2:
        neighbours = knn(z[candidates], min(N_NEIGHBORS, len(candidates) - 1), seed=seed)
        chosen = False
        for resolution in resolutions:
            labels = leiden(neighbours, float(resolution), seed)
            n_groups = len(np.unique(labels))
            score = (
                float(calinski_harabasz_score(z[candidates], labels))
                if 1 < n_groups < len(candidates)
                else float("nan")
            )
            scan["resolution"].append(float(resolution))
            scan["n_groups"].append(int(n_groups))
            scan["calinski_harabasz"].append(score)
            better = not np.isnan(score) and (np.isnan(best_score) or score > best_score)
            if better or (not chosen and np.isnan(best_score)):
                best_labels, best_resolution, best_score = labels, float(resolution), score
                chosen = True

    # name the communities with enough cells by decreasing size
    ids, sizes = np.unique(best_labels, return_counts=True) if len(candidates) else ([], [])
    kept = [
        i for i, s in sorted(zip(ids, sizes, strict=True), key=lambda t: -t[1]) if s >= min_cells
    ]
    column = adata.obs[key]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    # numbered after the groups obs[key] already has (annotate's open-set layer forms some):
    # another group must never take an existing group's name
    taken = [
        int(name[len(NOVEL_PREFIX) :])
        for name in map(str, column.cat.categories)
        if name.startswith(NOVEL_PREFIX) and name[len(NOVEL_PREFIX) :].isdigit()
    ]
    first = max(taken, default=-1) + 1
    names = [f"{NOVEL_PREFIX}{first + i}" for i in range(len(kept))]
    rows = []
    new = [n for n in names if n not in column.cat.categories]
    column = column.cat.add_categories(new)
    values = column.to_numpy().copy()
    for name, community in zip(names, kept, strict=True):
        cells = candidates[best_labels == community]
        values[cells] = name
        calls, counts = np.unique(prediction[cells], return_counts=True)
        rows.append(
            {
                "group": name,
                "n_cells": len(cells),
                "mean_confidence": float(conf[cells].mean()),
                "top_prediction": str(calls[np.argmax(counts)]),
            }
        )
    adata.obs[key] = pd.Categorical(values, categories=column.cat.categories)

    summary = pd.DataFrame(rows, columns=["group", "n_cells", "mean_confidence", "top_prediction"])
    summary = summary.set_index("group")
    if not isinstance(adata.uns.get(key), dict):
        adata.uns[key] = {}
    adata.uns[key]["novel"] = {
        "confidence": float(confidence),
        "resolution": best_resolution,
        "calinski_harabasz": best_score,
        "n_low_confidence": int(low.sum()),
        "n_boundary": int(boundary.sum()),
        "scan": scan,
        "groups": {
            "group": [str(g) for g in summary.index],
            "n_cells": [int(v) for v in summary["n_cells"]],
            "mean_confidence": [float(v) for v in summary["mean_confidence"]],
            "top_prediction": [str(v) for v in summary["top_prediction"]],
        },
    }
    return summary
