"""Open-set and open-world metrics: novelty AUROC, OSCR, Hungarian matching, seen/novel accuracy.

* AUROC and OSCR of novel-cell detection are the metrics of CellPredX (Liu et al., PLoS Comput.
  Biol., "CellPredX can reliably detect novel cell types", Fig 5A); OSCR is defined by Dhamija
  et al. (2018, "Reducing Network Agnostophobia", NeurIPS).
* Seen / novel / overall accuracy with Hungarian matching are those of scDET (Zhai, Chen & Deng,
  "Distribution-Independent Cell Type Identification for Single-Cell RNA-seq Data", "Evaluation
  metrics"), following scGAD.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from labeltransfer._constants import UNASSIGNED

from ._classification import _as_bool, _as_float, _as_labels, _check_lengths, _encode, _isin

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["hungarian_match", "novel_auroc", "open_world_report", "oscr"]


def _check_both_groups(novel: NDArray[np.bool_], *, metric: str) -> None:
    n_novel = int(novel.sum())
    if n_novel == 0 or n_novel == len(novel):
        which = "novel" if n_novel == 0 else "known"
        raise ValueError(
            f"{metric} needs both known and novel cells, but `is_novel` has no {which} cells; "
            "evaluate on a query that contains both."
        )


def novel_auroc(is_novel: ArrayLike, confidence: ArrayLike) -> float:
    r"""AUROC of separating novel from known cells with the novelty score ``1 - confidence``.

    Parameters
    ----------
    is_novel
        Boolean mask, ``True`` for a cell whose true type is absent from the reference.
    confidence
        Confidence of each cell's prediction (probability of the predicted type).

    Returns
    -------
    AUROC in ``[0, 1]``: 1 when every novel cell is less confident than every known cell, 0.5
    for a score that carries no information.

    Notes
    -----
    With novelty score :math:`s_i = 1 - c_i`, known cells :math:`K` and novel cells :math:`U`,

    .. math::

        \mathrm{AUROC} = \frac{1}{|U||K|}\sum_{u \in U}\sum_{k \in K}
        \left[1(s_u > s_k) + \tfrac12 1(s_u = s_k)\right],

    computed through the Mann-Whitney rank statistic (ties get average ranks). CellPredX
    (Liu et al., PLoS Comput. Biol., Fig 5A) reports AUROC for novel-type detection.
    """
    novel = _as_bool(is_novel, name="is_novel")
    conf = _as_float(confidence, name="confidence")
    _check_lengths(is_novel=novel, confidence=conf)
    _check_both_groups(novel, metric="novel_auroc")
    ranks = rankdata(1.0 - conf)  # average ranks for ties
    n_u = int(novel.sum())
    n_k = len(novel) - n_u
    u_stat = ranks[novel].sum() - n_u * (n_u + 1) / 2.0
    return float(u_stat / (n_u * n_k))


@overload
def oscr(
    is_novel: ArrayLike,
    correct: ArrayLike,
    confidence: ArrayLike,
    *,
    return_curve: Literal[False] = ...,
) -> float: ...
@overload
def oscr(
    is_novel: ArrayLike,
    correct: ArrayLike,
    confidence: ArrayLike,
    *,
    return_curve: Literal[True],
) -> tuple[float, pd.DataFrame]: ...
def oscr(
    is_novel: ArrayLike,
    correct: ArrayLike,
    confidence: ArrayLike,
    *,
    return_curve: bool = False,
) -> float | tuple[float, pd.DataFrame]:
    r"""Open-set classification rate: area under the CCR vs FPR curve.

    Parameters
    ----------
    is_novel
        Boolean mask, ``True`` for a cell whose true type is absent from the reference.
    correct
        Boolean mask, ``True`` where the (argmax) prediction equals the true type; only read for
        known cells (a novel cell can never be correctly classified).
    confidence
        Confidence of each cell's prediction (probability of the predicted type).
    return_curve
        Also return the curve as a DataFrame with columns ``threshold``, ``fpr``, ``ccr``,
        ordered by increasing FPR (first row: threshold ``inf``, FPR = CCR = 0).

    Returns
    -------
    OSCR in ``[0, 1]`` (and the curve when ``return_curve``). It is bounded by the closed-set
    accuracy on the known cells, and reaches it when every known cell is more confident than
    every novel cell.

    Notes
    -----
    For a threshold :math:`\delta` on the confidence (Dhamija et al. 2018, eqs. for FPR and
    CCR), with known cells :math:`\mathcal D_K` and novel (unknown) cells :math:`\mathcal D_U`,

    .. math::

        FPR(\delta) = \frac{|\{x \in \mathcal D_U : \max_c P(c|x) \ge \delta\}|}
                            {|\mathcal D_U|}, \qquad
        CCR(\delta) = \frac{|\{x \in \mathcal D_K : \arg\max_c P(c|x) = \hat c
                       \wedge P(\hat c|x) \ge \delta\}|}{|\mathcal D_K|}.

    :math:`\delta` sweeps every distinct confidence value, from :math:`+\infty` (point (0, 0))
    down to the smallest (FPR = 1, CCR = closed-set accuracy), and OSCR is the trapezoidal
    area under CCR as a function of FPR. Cells with tied confidences enter at the same
    threshold, so the result does not depend on the cell order. CellPredX (Liu et al., PLoS
    Comput. Biol., Fig 5A) reports it for novel-type detection.
    """
    novel = _as_bool(is_novel, name="is_novel")
    corr = _as_bool(correct, name="correct")
    conf = _as_float(confidence, name="confidence")
    _check_lengths(is_novel=novel, correct=corr, confidence=conf)
    _check_both_groups(novel, metric="oscr")
    n_u = int(novel.sum())
    n_k = len(novel) - n_u

    thresholds, inverse = np.unique(
        -conf, return_inverse=True
    )  # increasing -conf = decreasing conf
    n_thr = len(thresholds)
    fp = np.bincount(inverse, weights=novel.astype(float), minlength=n_thr)
    cc = np.bincount(inverse, weights=(~novel & corr).astype(float), minlength=n_thr)
    fpr = np.concatenate([[0.0], np.cumsum(fp) / n_u])
    ccr = np.concatenate([[0.0], np.cumsum(cc) / n_k])
    area = float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2.0))
    if not return_curve:
        return area
    curve = pd.DataFrame(
        {"threshold": np.concatenate([[np.inf], -thresholds]), "fpr": fpr, "ccr": ccr}
    )
    return area, curve


def hungarian_match(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, str]:
    r"""One-to-one matching of predicted groups to true types that maximises the agreement.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label or cluster name of each cell.

    Returns
    -------
    Dict ``predicted group -> true type``. With more predicted groups than true types the
    surplus groups (those whose best assignment is left over) are absent from the dict; with
    fewer, some true types receive no group.

    Notes
    -----
    With the contingency table :math:`W_{gc} = |\{i : \hat y_i = g, y_i = c\}|`, the matching
    :math:`\pi` solves :math:`\max_\pi \sum_g W_{g\pi(g)}` over one-to-one maps (the
    Hungarian algorithm, Kuhn 1955, as used by scDET for clustering accuracy). The clustering
    accuracy is then :math:`\frac1N\sum_i 1(\pi(\hat y_i) = y_i)`. The optimum is invariant to
    renaming the predicted groups; with tied optima the chosen map may differ but the accuracy
    does not.
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    _check_lengths(y_true=t, y_pred=p)
    return _hungarian(t, p)


def _hungarian(
    t: NDArray[np.str_], p: NDArray[np.str_], *, targets: Iterable[str] | None = None
) -> dict[str, str]:
    """Hungarian matching of the labels of ``p`` to ``targets`` (default: the labels of ``t``)."""
    groups, gi = np.unique(p, return_inverse=True)
    types = np.unique(t) if targets is None else np.asarray(sorted(set(targets)), dtype=str)
    if len(groups) == 0 or len(types) == 0:
        return {}
    ti = pd.Index(types).get_indexer(t)
    ok = ti >= 0
    k = len(types)
    w = np.bincount(gi[ok] * k + ti[ok], minlength=len(groups) * k).reshape(len(groups), k)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return {str(groups[r]): str(types[c]) for r, c in zip(rows, cols, strict=True)}


def open_world_report(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    seen_types: Iterable[str],
    *,
    unassigned: str = UNASSIGNED,
) -> dict[str, Any]:
    r"""Seen, novel and overall accuracy of an open-world annotation (scDET).

    Parameters
    ----------
    y_true
        True type of each cell; types absent from ``seen_types`` are the novel types.
    y_pred
        Final call of each cell: a seen (reference) type, ``unassigned``, or the name of a
        discovered novel group (e.g. ``"novel_0"``; any label that is not a seen type and not
        ``unassigned`` is treated as a novel group, whatever its name).
    seen_types
        The reference types.
    unassigned
        Label of cells that were rejected without being grouped; they are never matched and
        always count as wrong.

    Returns
    -------
    Dict with ``seen_accuracy`` (over cells of seen types), ``novel_accuracy`` (over cells of
    novel types), ``overall_accuracy`` (all cells), each ``nan`` when it has no cells;
    ``n_seen_cells``, ``n_novel_cells``, ``n_novel_clusters`` (distinct novel groups predicted),
    ``n_novel_types`` (distinct novel types in the truth), and ``mapping`` (novel group ->
    matched true novel type).

    Notes
    -----
    scDET (Zhai, Chen & Deng, "Evaluation metrics"): "our study presents the classification
    accuracy for recognized cell types, denoted as C_s, alongside the clustering accuracy for
    previously unidentified cell types, symbolized as C_n ... the Hungarian algorithm is
    employed to address the optimal assignment problem ... In scenarios where accuracy across the
    collective set of cell types, C_s ∪ C_n, is being evaluated, the Hungarian algorithm is
    applied to ascertain the best assignment strategy for both seen and novel cell categories."

    The rule implemented here, one map :math:`\pi` used for all three numbers:

    1. a prediction that is a seen type is matched by name: :math:`\pi(c) = c` (seen types are
       *classified*, so their names must be right);
    2. the novel groups :math:`G` are matched one-to-one to the true novel types :math:`C_n`
       by the Hungarian algorithm maximising :math:`\sum_g |\{i : \hat y_i = g,
       y_i = \pi(g)\}|`, counted over all cells; unmatched surplus groups and ``unassigned``
       map to nothing and are wrong;
    3. :math:`acc(S) = \frac{1}{|S|}\sum_{i \in S} 1(\pi(\hat y_i) = y_i)` for
       :math:`S` = cells of seen types (seen accuracy), cells of novel types (novel accuracy)
       and all cells (overall accuracy).

    This differs from a Hungarian match over *all* labels (the clustering-baseline reading of
    the quote) only in that a novel group can never be credited as a seen type, nor a seen-type
    prediction as a novel type: an annotation that names a seen type wrongly is wrong.
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    _check_lengths(y_true=t, y_pred=p)
    seen = {str(s) for s in seen_types}
    if not seen:
        raise ValueError("`seen_types` is empty; pass the reference cell types.")
    is_seen_true = _isin(t, seen)
    is_group = ~_isin(p, seen) & (p != unassigned)
    novel_types = sorted(set(t[~is_seen_true].tolist()))
    groups = sorted(set(p[is_group].tolist()))

    mapping = _hungarian(t[is_group], p[is_group], targets=novel_types) if groups else {}
    # target of each distinct prediction: itself for a seen type, the matched novel type for a
    # group, nothing (-1) for unassigned and unmatched groups
    uniq, inv = np.unique(p, return_inverse=True)
    target = np.array(
        [u if u in seen else mapping.get(u, "") if u != unassigned else "" for u in uniq.tolist()],
        dtype=object,
    )
    (true_codes, target_codes), _ = _encode(t, target.astype(str))
    target_codes = np.where(target == "", -1, target_codes)
    hit = target_codes[inv] == true_codes

    def _acc(mask: NDArray[np.bool_]) -> float:
        return float(hit[mask].mean()) if mask.any() else float("nan")

    return {
        "seen_accuracy": _acc(is_seen_true),
        "novel_accuracy": _acc(~is_seen_true),
        "overall_accuracy": _acc(np.ones_like(hit)),
        "n_seen_cells": int(is_seen_true.sum()),
        "n_novel_cells": int((~is_seen_true).sum()),
        "n_novel_clusters": len(groups),
        "n_novel_types": len(novel_types),
        "mapping": mapping,
    }
