"""Classification metrics of a label transfer: raw/effective accuracy, rejection, F1, kappa.

The accuracy triple follows JIND (Goyal et al. 2022, "Evaluation Metrics"): *raw* accuracy
before any rejection, the *rejection* rate, and the *effective* accuracy on the cells that were
not rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "cohen_kappa",
    "effective_accuracy",
    "macro_f1",
    "per_type_table",
    "raw_accuracy",
    "rejection_rate",
]


# --------------------------------------------------------------------------------------------
# input checks shared by every metric module
# --------------------------------------------------------------------------------------------
def _as_labels(values: ArrayLike, *, name: str) -> NDArray[np.str_]:
    """Return ``values`` as a 1-d array of strings, refusing missing labels."""
    if isinstance(values, str):
        raise TypeError(f"`{name}` must be an array of labels, got the single string {values!r}.")
    if isinstance(getattr(values, "dtype", None), pd.CategoricalDtype):
        cat = pd.Categorical(values)
        if (cat.codes < 0).any():
            raise ValueError(
                f"`{name}` contains {int((cat.codes < 0).sum())} missing label(s) (NaN/None); "
                "drop those cells or fill them with an explicit category before computing metrics."
            )
        return np.asarray(cat.categories.astype(str), dtype=str)[cat.codes]
    if isinstance(values, pd.Series | pd.Index):
        series = pd.Series(values)
    else:
        arr = np.asarray(values, dtype=object)
        if arr.ndim != 1:
            raise ValueError(f"`{name}` must be 1-d (one label per cell), got shape {arr.shape}.")
        series = pd.Series(arr)
    missing = int(series.isna().sum())
    if missing:
        raise ValueError(
            f"`{name}` contains {missing} missing label(s) (NaN/None); drop those cells or fill "
            "them with an explicit category before computing metrics."
        )
    return series.astype(str).to_numpy(dtype=str)


def _as_bool(values: ArrayLike, *, name: str) -> NDArray[np.bool_]:
    """Return ``values`` as a 1-d boolean array, refusing anything that is not 0/1-like."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-d (one flag per cell), got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in "iuf":
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise ValueError(
                f"`{name}` contains {int(np.isnan(arr).sum())} missing value(s); it must be a "
                "boolean mask without NaN."
            )
        if not np.isin(arr, (0, 1)).all():
            bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5].tolist()
            raise ValueError(
                f"`{name}` must be a boolean mask (True/False or 0/1), got values such as {bad}."
            )
        return arr.astype(bool)
    series = pd.Series(arr, dtype=object)
    if series.isna().any():
        raise ValueError(
            f"`{name}` contains {int(series.isna().sum())} missing value(s); it must be a "
            "boolean mask without NaN."
        )
    ok = series.map(
        lambda v: (
            isinstance(v, bool | np.bool_ | int | np.integer | float | np.floating) and v in (0, 1)
        )
    )
    if not ok.all():
        bad = series[~ok].unique()[:5].tolist()
        raise ValueError(
            f"`{name}` must be a boolean mask (True/False or 0/1), got values such as {bad}."
        )
    return arr.astype(bool)


def _as_float(values: ArrayLike, *, name: str) -> NDArray[np.float64]:
    """Return ``values`` as a finite 1-d float array."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-d (one value per cell), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(
            f"`{name}` contains {int((~np.isfinite(arr)).sum())} NaN/inf value(s); "
            "drop those cells first."
        )
    return arr


def _isin(values: NDArray[np.str_], allowed: Iterable[str]) -> NDArray[np.bool_]:
    """Hash-based ``np.isin`` for label arrays (much faster on millions of strings)."""
    index = pd.Index(pd.unique(np.asarray(list(allowed), dtype=object)))
    return index.get_indexer(values) >= 0 if len(values) else np.zeros(0, dtype=bool)


def _encode(
    *arrays: NDArray[np.str_], labels: NDArray[np.str_] | None = None
) -> tuple[list[NDArray[np.int64]], NDArray[np.str_]]:
    """Integer codes of ``arrays`` over ``labels`` (default: their sorted union; others -> -1)."""
    if labels is None:
        labels = np.unique(np.concatenate([np.unique(a) for a in arrays]))
    index = pd.Index(labels)
    return [index.get_indexer(a).astype(np.int64) for a in arrays], labels


def _check_lengths(**arrays: Sequence[Any] | NDArray[Any]) -> int:
    """Check that every array has the same, non-zero length and return it."""
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"`{k}` has {v}" for k, v in lengths.items())
        raise ValueError(f"Length mismatch: {desc} elements; pass one value per cell to each.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(
            f"Empty input: {', '.join(f'`{k}`' for k in lengths)} has no cells; "
            "metrics need at least one cell."
        )
    return n


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def raw_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    r"""Accuracy of the predictions before any rejection.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell (the argmax reference type, before rejection).

    Returns
    -------
    Fraction of cells whose prediction equals the truth, in ``[0, 1]``.

    Notes
    -----
    :math:`\mathrm{raw} = \frac{1}{N}\sum_i 1(\hat y_i = y_i)`; "the accuracy of the
    classifier on the target batch prior to any rejection" (JIND, Goyal et al. 2022,
    "Evaluation Metrics").
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    _check_lengths(y_true=t, y_pred=p)
    return float(np.mean(t == p))


def rejection_rate(rejected: ArrayLike) -> float:
    r"""Fraction of cells rejected by the classifier.

    Parameters
    ----------
    rejected
        Boolean mask, ``True`` for a rejected cell.

    Returns
    -------
    Fraction of rejected cells, in ``[0, 1]``.

    Notes
    -----
    :math:`\mathrm{rej} = \frac{1}{N}\sum_i r_i`; "the percentage of cells rejected by the
    classification method" (JIND, Goyal et al. 2022, "Evaluation Metrics"), returned here as a
    fraction.
    """
    r = _as_bool(rejected, name="rejected")
    _check_lengths(rejected=r)
    return float(np.mean(r))


def effective_accuracy(y_true: ArrayLike, y_pred: ArrayLike, rejected: ArrayLike) -> float:
    r"""Accuracy on the cells that were not rejected.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell (before rejection).
    rejected
        Boolean mask, ``True`` for a rejected cell.

    Returns
    -------
    Accuracy over the non-rejected cells, or ``nan`` when every cell is rejected.

    Notes
    -----
    :math:`\mathrm{eff} = \sum_i (1-r_i)\,1(\hat y_i = y_i) / \sum_i (1-r_i)`; "the accuracy
    of the classifier on the cells that were not rejected by the method" (JIND, Goyal et al.
    2022, "Evaluation Metrics"). With nothing rejected it equals :func:`raw_accuracy`.
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    r = _as_bool(rejected, name="rejected")
    _check_lengths(y_true=t, y_pred=p, rejected=r)
    keep = ~r
    if not keep.any():
        return float("nan")
    return float(np.mean(t[keep] == p[keep]))


def _confusion_counts(
    t: NDArray[np.str_], p: NDArray[np.str_], labels: NDArray[np.str_]
) -> NDArray[np.int64]:
    """Confusion matrix (rows = true, columns = predicted) over ``labels``; others are dropped."""
    k = len(labels)
    (ti, pi), _ = _encode(t, p, labels=labels)
    ok = (ti >= 0) & (pi >= 0)
    return np.bincount(ti[ok] * k + pi[ok], minlength=k * k).reshape(k, k)


def _f1_per_label(
    t: NDArray[np.str_], p: NDArray[np.str_], labels: NDArray[np.str_]
) -> NDArray[np.float64]:
    """Per-label F1 = 2 TP / (2 TP + FP + FN); 0 where the label never occurs in either."""
    k = len(labels)
    (ti, pi), _ = _encode(t, p, labels=labels)
    tp = np.bincount(ti[(ti >= 0) & (ti == pi)], minlength=k).astype(float)
    n_true = np.bincount(ti[ti >= 0], minlength=k).astype(float)
    n_pred = np.bincount(pi[pi >= 0], minlength=k).astype(float)
    denom = n_true + n_pred  # = 2 TP + FP + FN
    return np.divide(2.0 * tp, denom, out=np.zeros(k), where=denom > 0)


def macro_f1(
    y_true: ArrayLike, y_pred: ArrayLike, *, labels: Sequence[str] | None = None
) -> float:
    r"""Unweighted mean of the per-type F1 scores.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell.
    labels
        Types to average over. Default: the union of the labels in ``y_true`` and ``y_pred``
        (the scikit-learn convention), so a predicted label that never occurs in the truth
        (e.g. ``"Unassigned"``) counts with F1 = 0. Pass the true types to average over them
        only.

    Returns
    -------
    Macro F1 in ``[0, 1]``.

    Notes
    -----
    For each type :math:`c`, :math:`F1_c = 2TP_c / (2TP_c + FP_c + FN_c)` (0 when :math:`c`
    occurs in neither array), and :math:`\mathrm{macroF1} = \frac{1}{|C|}\sum_c F1_c`.
    CellPredX (Liu et al., PLoS Comput. Biol.) reports macro-F1 next to accuracy because it
    weights rare types as much as common ones.
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    _check_lengths(y_true=t, y_pred=p)
    if labels is None:
        labs = np.union1d(t, p)
    else:
        labs = _as_labels(list(labels), name="labels")
        if labs.size == 0:
            raise ValueError("`labels` is empty; pass at least one type or leave it as None.")
    return float(np.mean(_f1_per_label(t, p, labs)))


def cohen_kappa(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    r"""Cohen's kappa: agreement between truth and prediction corrected for chance.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell.

    Returns
    -------
    Kappa in ``[-1, 1]``; 1 for perfect agreement, 0 for chance level. When both arrays hold a
    single identical label (expected agreement 1) the result is 1 if they agree everywhere.

    Notes
    -----
    With observed agreement :math:`p_o = \frac{1}{N}\sum_i 1(\hat y_i = y_i)` and chance
    agreement :math:`p_e = \sum_c \frac{n^{true}_c}{N}\frac{n^{pred}_c}{N}`,
    :math:`\kappa = (p_o - p_e) / (1 - p_e)` (Cohen 1960).
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    n = _check_lengths(y_true=t, y_pred=p)
    labs = np.union1d(t, p)
    cm = _confusion_counts(t, p, labs).astype(float)
    po = np.trace(cm) / n
    pe = float(np.sum(cm.sum(axis=1) * cm.sum(axis=0))) / n**2
    if np.isclose(pe, 1.0):
        return 1.0 if np.isclose(po, 1.0) else 0.0
    return float((po - pe) / (1.0 - pe))


def per_type_table(
    y_true: ArrayLike, y_pred: ArrayLike, rejected: ArrayLike | None = None
) -> pd.DataFrame:
    """Metrics of each true cell type.

    Parameters
    ----------
    y_true
        True label of each cell.
    y_pred
        Predicted label of each cell, before rejection.
    rejected
        Boolean mask of rejected cells; default: nothing rejected.

    Returns
    -------
    DataFrame indexed by the true types (sorted), with columns

    ``n_cells``
        cells of that true type;
    ``raw_accuracy``
        fraction of them predicted as that type (the recall);
    ``rejection_rate``
        fraction of them rejected;
    ``effective_accuracy``
        accuracy on those of them that were not rejected (``nan`` when all were rejected);
    ``precision``
        fraction of the cells predicted as that type that truly are of it (``nan`` when the type
        is never predicted);
    ``f1``
        :math:`2TP/(2TP+FP+FN)` of that type.

    Notes
    -----
    Precision and F1 use the raw prediction ``y_pred`` (before rejection), like
    ``raw_accuracy``; the effective accuracy is JIND's (Goyal et al. 2022) per type.
    """
    t = _as_labels(y_true, name="y_true")
    p = _as_labels(y_pred, name="y_pred")
    r = np.zeros(len(t), dtype=bool) if rejected is None else _as_bool(rejected, name="rejected")
    _check_lengths(y_true=t, y_pred=p, rejected=r)
    types = np.unique(t)
    k = len(types)
    (ti, pi), _ = _encode(t, p, labels=types)
    correct = ti == pi
    n = np.bincount(ti, minlength=k)
    tp = np.bincount(ti[correct], minlength=k)
    n_pred = np.bincount(pi[pi >= 0], minlength=k)
    n_rej = np.bincount(ti[r], minlength=k)
    n_kept = n - n_rej
    tp_kept = np.bincount(ti[correct & ~r], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = {
            "n_cells": n,
            "raw_accuracy": tp / n,
            "rejection_rate": n_rej / n,
            "effective_accuracy": np.where(n_kept > 0, tp_kept / np.maximum(n_kept, 1), np.nan),
            "precision": np.where(n_pred > 0, tp / np.maximum(n_pred, 1), np.nan),
            "f1": 2.0 * tp / (n + n_pred),
        }
    return pd.DataFrame(rows, index=pd.Index(types, name="cell_type"))
