"""Rejection thresholds and temperature scaling fitted on the held-out reference split."""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_softmax


def per_type_thresholds(
    confidence: np.ndarray, prediction: np.ndarray, n_types: int, *, theta: float
) -> np.ndarray:
    """JIND's per-cell-type confidence thresholds.

    For each type ``k``, the threshold is the ``theta``-quantile of the confidences of the
    held-out cells *predicted* as ``k`` (JIND, "Filtering"). A cell predicted as ``k`` is
    rejected when its confidence falls below ``tau_k``, so about a fraction ``theta`` of
    each type is rejected on data like the held-out split.

    Parameters
    ----------
    confidence
        Probability of the predicted type, one per held-out cell.
    prediction
        Predicted type codes (``0..n_types-1``).
    n_types
        Number of reference types.
    theta
        Outlier fraction in ``[0, 1)``; JIND uses 0.05 (0.3 to pick JIND+ pseudo-labels).

    Returns
    -------
    Array of ``n_types`` thresholds; types never predicted on the held-out split get 0
    (never rejected).
    """
    if not 0.0 <= theta < 1.0:
        raise ValueError(f"theta (outlier fraction) must be in [0, 1), got {theta}.")
    thresholds = np.zeros(n_types, dtype=np.float64)
    for k in range(n_types):
        conf_k = confidence[prediction == k]
        if conf_k.size:
            thresholds[k] = float(np.quantile(conf_k, theta))
    return thresholds


#: Fewest covered query cells of a predicted type for :func:`query_thresholds` to use them.
MIN_QUERY_CELLS = 10


def query_thresholds(
    thresholds: np.ndarray,
    confidence: np.ndarray,
    prediction: np.ndarray,
    covered: np.ndarray,
    *,
    theta: float,
) -> np.ndarray:
    """Lower each type's threshold to the ``theta``-quantile of the query's covered cells.

    A batch shift lowers the confidence of every query cell, so thresholds fitted on the
    held-out reference cells alone reject far more than ``theta`` of a shifted seen type
    (measured: 10-35% of the seen cells of the shifted held-out tasks). The query cells the
    reference covers (:mod:`labeltransfer.base._openset`) are, but for a few, cells of seen
    types; the ``theta``-quantile of their confidences, per predicted type, is what the
    reference threshold would be on the shifted data. Taking the lower of the two keeps the
    reference's threshold on a query without shift and rejects about ``theta`` of a shifted
    seen type. A type with fewer than :data:`MIN_QUERY_CELLS` covered cells keeps its
    reference threshold.

    Parameters
    ----------
    thresholds
        Per-type thresholds from :func:`per_type_thresholds`.
    confidence
        Calibrated confidence of each query cell.
    prediction
        Predicted type code of each query cell.
    covered
        Query cells the reference covers (and that are query cells, not reference cells).
    theta
        Outlier fraction.

    Returns
    -------
    Array like ``thresholds``, no value above it.
    """
    out = np.array(thresholds, dtype=np.float64, copy=True)
    for k in range(out.size):
        conf_k = confidence[covered & (prediction == k)]
        if conf_k.size >= MIN_QUERY_CELLS:
            out[k] = min(out[k], float(np.quantile(conf_k, theta)))
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017) by minimising the held-out negative log-likelihood.

    Parameters
    ----------
    logits
        Held-out logits, cells x types.
    labels
        True type codes of those cells.

    Returns
    -------
    The temperature ``T``; calibrated probabilities are ``softmax(logits / T)``. It does not
    change the argmax.

    Notes
    -----
    ``T`` is searched in ``[T_min, 20]``. Below 1 the model is sharpened, which an
    under-confident model needs (CellPredX's bounded prototype logits give a mean confidence of
    0.66-0.83 at 92-100% accuracy). But when the held-out cells are all classified correctly
    (common on easy references such as CellBench) the likelihood keeps rising as ``T -> 0``,
    which would saturate every confidence at 1.0. So ``T_min`` is the temperature at which
    the mean held-out confidence equals the held-out accuracy with Laplace's rule of succession,
    ``(n_correct + 1) / (n + 2)``: calibration never claims more than the held-out cells can
    show. ``T_min = 1`` when the model is already that confident (it is then only softened).
    """
    if logits.shape[0] == 0:
        return 1.0
    rows = np.arange(labels.size)
    logits = np.asarray(logits, dtype=np.float64)

    def nll(log_t: float) -> float:
        return -float(log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    low = np.log(_sharpest_temperature(logits, labels))
    result = minimize_scalar(nll, bounds=(low, np.log(20.0)), method="bounded")
    # the bounded search never returns its end point exactly: snap to it within its tolerance
    return float(np.exp(low if result.x - low < 1e-4 else result.x))


def _mean_confidence(logits: np.ndarray, temperature: float) -> float:
    return float(np.exp(log_softmax(logits / temperature, axis=1).max(axis=1)).mean())


def _sharpest_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Lowest temperature allowed: mean confidence at most the smoothed held-out accuracy."""
    n_correct = int((logits.argmax(axis=1) == labels).sum())
    target = (n_correct + 1) / (labels.size + 2)
    if _mean_confidence(logits, 1.0) >= target:
        return 1.0
    floor = 0.01
    if _mean_confidence(logits, floor) <= target:
        return floor
    return float(
        np.exp(
            brentq(
                lambda log_t: _mean_confidence(logits, np.exp(log_t)) - target,
                np.log(floor),
                0.0,
                xtol=1e-6,
            )
        )
    )
