"""Calibration of confidence scores: ECE, overconfidence error, reliability table, Brier score.

Definitions follow scNym (Kimmel & Kelley 2021, Methods, "Model calibration analysis"), which
takes the expected calibration error from Thulasidasan et al. (2019).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ._classification import _as_bool, _as_float, _check_lengths

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "brier_score",
    "ece_noise_floor",
    "expected_calibration_error",
    "overconfidence_error",
    "reliability_table",
]


def _checked(
    confidence: ArrayLike, n_bins: int, correct: ArrayLike | None = None
) -> tuple[NDArray[np.float64], NDArray[np.bool_] | None]:
    """Validate ``n_bins``, ``confidence`` (in [0, 1]) and, if given, ``correct``."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"`n_bins` must be a positive integer, got {n_bins!r}.")
    conf = _as_float(confidence, name="confidence")
    corr = None
    if correct is not None:
        corr = _as_bool(correct, name="correct")
        _check_lengths(confidence=conf, correct=corr)
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(
            f"`confidence` must lie in [0, 1], got values in "
            f"[{conf.min():.3g}, {conf.max():.3g}]; "
            "pass probabilities (e.g. the softmax of the logits), not logits."
        )
    return conf, corr


def _bins(
    conf: NDArray[np.float64], n_bins: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Each confidence's bin, the number of cells and the mean confidence per bin.

    Bins are ``[e_0, e_1), [e_1, e_2), ..., [e_{M-1}, e_M]`` on [0, 1]: the last bin is closed
    so that a confidence of exactly 1 falls into it (``nan`` mean for empty bins).
    """
    # the tiny offset keeps k / M in bin k despite rounding (e.g. 0.29 * 100 = 28.999...)
    idx = np.clip(np.floor(conf * n_bins + 1e-9).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
    return idx, counts, mean_conf


def _binned(
    confidence: ArrayLike, correct: ArrayLike, n_bins: int
) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Equal-width binning of ``confidence`` on [0, 1] (:func:`_bins`).

    Returns the bin edges, the number of cells, the mean confidence and the accuracy per bin
    (``nan`` for empty bins).
    """
    conf, corr = _checked(confidence, n_bins, correct)
    idx, counts, mean_conf = _bins(conf, n_bins)
    corr_sum = np.bincount(idx, weights=corr.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(counts > 0, corr_sum / np.maximum(counts, 1), np.nan)
    return np.linspace(0.0, 1.0, n_bins + 1), counts, mean_conf, acc


def reliability_table(
    confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = 10
) -> pd.DataFrame:
    r"""Per-bin accuracy and confidence, the data of a reliability diagram.

    Parameters
    ----------
    confidence
        Confidence of each cell's prediction (probability of the predicted type), in ``[0, 1]``.
    correct
        Boolean mask, ``True`` where the prediction is correct.
    n_bins
        Number of equal-width bins on ``[0, 1]``; scNym uses :math:`M = 10`.

    Returns
    -------
    DataFrame with one row per bin and columns ``bin_lower``, ``bin_upper``, ``n`` (cells in the
    bin), ``confidence`` (mean confidence, ``nan`` if empty), ``accuracy`` (``nan`` if empty),
    ``gap`` (``confidence - accuracy``) and ``weight`` (``n / N``).

    Notes
    -----
    :math:`acc(B_m) = \langle 1(\hat y \equiv y) \rangle`,
    :math:`conf(B_m) = \langle \max \hat p_i \rangle` over the cells of bin :math:`B_m`
    (scNym, Kimmel & Kelley 2021, "Model calibration analysis"). Bin :math:`m` is
    :math:`[\frac{m-1}{M}, \frac{m}{M})`, the last one closed at 1.
    """
    edges, counts, mean_conf, acc = _binned(confidence, correct, n_bins)
    return pd.DataFrame(
        {
            "bin_lower": edges[:-1],
            "bin_upper": edges[1:],
            "n": counts,
            "confidence": mean_conf,
            "accuracy": acc,
            "gap": mean_conf - acc,
            "weight": counts / counts.sum(),
        }
    )


def expected_calibration_error(
    confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = 10
) -> float:
    r"""Compute the expected calibration error (ECE).

    Parameters
    ----------
    confidence
        Confidence of each cell's prediction, in ``[0, 1]``.
    correct
        Boolean mask, ``True`` where the prediction is correct.
    n_bins
        Number of equal-width bins on ``[0, 1]`` (scNym: 10).

    Returns
    -------
    ECE in ``[0, 1]``; 0 for a perfectly calibrated classifier.

    Notes
    -----
    .. math::

        ECE = \sum_{m=1}^{M} \frac{|B_m|}{N} |acc(B_m) - conf(B_m)|

    with equal-width bins on ``[0, 1]`` (scNym, Kimmel & Kelley 2021, "Model calibration
    analysis", after Thulasidasan et al. 2019). Empty bins contribute 0.
    """
    _, counts, mean_conf, acc = _binned(confidence, correct, n_bins)
    w = counts / counts.sum()
    gap = np.where(counts > 0, np.abs(acc - mean_conf), 0.0)
    return float(np.sum(w * gap))


#: Simulated outcomes drawn at once by :func:`ece_noise_floor` (draws x cells booleans).
_FLOOR_BLOCK = 4_000_000


def ece_noise_floor(
    confidence: ArrayLike, *, n_bins: int = 10, n_draws: int = 200, seed: int = 0
) -> float:
    r"""Compute the ECE a perfectly calibrated classifier would score with these confidences.

    The ECE of :math:`N` cells is estimated from the cells' outcomes, so it stays above 0 even
    for a classifier whose confidences are exactly right: each bin's accuracy is a mean of
    Bernoulli draws. This is the ECE such a classifier would score on average: a cell with
    confidence :math:`c` is drawn correct with probability :math:`c`, ``n_draws`` times, and
    the ECE of each draw is averaged. An ECE at or below it is within the sampling noise of
    the cells scored.

    Parameters
    ----------
    confidence
        Confidence of each cell's prediction, in ``[0, 1]``.
    n_bins
        Number of equal-width bins on ``[0, 1]``, as in
        :func:`expected_calibration_error`.
    n_draws
        Simulated outcome vectors.
    seed
        Seed of the simulation.

    Returns
    -------
    The mean ECE of the draws, in ``[0, 1]``.

    Notes
    -----
    With one bin of :math:`n` cells at confidence :math:`c` it is
    :math:`E|\bar y - c|` for :math:`\bar y \sim \mathrm{Bin}(n, c) / n`, about
    :math:`\sqrt{2 c (1 - c) / (\pi n)}`: 0.040 for 100 cells at 0.5, 0.008 for 1,000 cells
    at 0.9. The ECE's upward bias on small samples is discussed by Kumar et al. (2019),
    *Verified uncertainty calibration*, NeurIPS; this simulation measures it for the cells at
    hand instead of correcting the estimate.
    """
    if isinstance(n_draws, bool) or not isinstance(n_draws, int | np.integer) or n_draws < 1:
        raise ValueError(f"`n_draws` must be a positive integer, got {n_draws!r}.")
    conf, _ = _checked(confidence, n_bins)
    idx, counts, mean_conf = _bins(conf, n_bins)
    filled = counts > 0
    weight = counts[filled] / counts.sum()
    rng = np.random.default_rng(seed)
    block = max(1, _FLOOR_BLOCK // conf.size)
    total = 0.0
    for start in range(0, n_draws, block):
        size = min(block, n_draws - start)
        correct = rng.random((size, conf.size)) < conf
        offsets = (np.arange(size)[:, None] * n_bins + idx[None, :]).ravel()
        hits = np.bincount(offsets, weights=correct.ravel(), minlength=size * n_bins)
        accuracy = hits.reshape(size, n_bins)[:, filled] / counts[filled]
        total += float(np.abs(accuracy - mean_conf[filled]).dot(weight).sum())
    return total / n_draws


def overconfidence_error(confidence: ArrayLike, correct: ArrayLike, *, n_bins: int = 10) -> float:
    r"""Overconfidence error (OE): penalises confident but wrong predictions.

    Parameters
    ----------
    confidence
        Confidence of each cell's prediction, in ``[0, 1]``.
    correct
        Boolean mask, ``True`` where the prediction is correct.
    n_bins
        Number of equal-width bins on ``[0, 1]`` (scNym: 10).

    Returns
    -------
    OE in ``[0, 1]``; 0 when no bin is more confident than it is accurate.

    Notes
    -----
    .. math::

        oe(B_m) = conf(B_m) \max(conf(B_m) - acc(B_m), 0), \qquad
        OE = \sum_{m=1}^{M} \frac{|B_m|}{N} oe(B_m)

    (scNym, Kimmel & Kelley 2021, "Model calibration analysis"). Empty bins contribute 0.
    """
    _, counts, mean_conf, acc = _binned(confidence, correct, n_bins)
    w = counts / counts.sum()
    oe = np.where(counts > 0, mean_conf * np.maximum(mean_conf - acc, 0.0), 0.0)
    return float(np.sum(w * oe))


def brier_score(probabilities: ArrayLike, y_true_onehot: ArrayLike) -> float:
    r"""Multi-class Brier score.

    Parameters
    ----------
    probabilities
        Cells x types matrix of predicted probabilities (rows sum to 1), e.g.
        ``adata.obsm[f"{key}_probabilities"]``.
    y_true_onehot
        Cells x types one-hot matrix of the true types, columns in the same order.

    Returns
    -------
    Brier score in ``[0, 2]``; 0 for perfect, confident predictions.

    Notes
    -----
    :math:`BS = \frac{1}{N}\sum_i \sum_k (\hat p_{ik} - y_{ik})^2` (Brier 1950), the
    original multi-class definition (not divided by the number of types).
    """
    prob = np.asarray(probabilities, dtype=float)
    onehot = np.asarray(y_true_onehot, dtype=float)
    if prob.ndim != 2 or onehot.ndim != 2:
        raise ValueError(
            "`probabilities` and `y_true_onehot` must be 2-d (cells x types), got shapes "
            f"{prob.shape} and {onehot.shape}."
        )
    if prob.shape != onehot.shape:
        raise ValueError(
            f"Shape mismatch: `probabilities` is {prob.shape} but `y_true_onehot` is "
            f"{onehot.shape}; both need one row per cell and the same type columns."
        )
    if prob.shape[0] == 0:
        raise ValueError("Empty input: `probabilities` has no cells.")
    if not np.isfinite(prob).all():
        raise ValueError("`probabilities` contains NaN/inf; drop those cells first.")
    return float(np.mean(np.sum((prob - onehot) ** 2, axis=1)))
