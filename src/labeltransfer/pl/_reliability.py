"""Reliability diagram of the confidence scores of an annotation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from mpl_toolkits.axes_grid1 import make_axes_locatable

from labeltransfer.metrics import (
    expected_calibration_error,
    overconfidence_error,
    reliability_table,
)
from labeltransfer.metrics._report import _annotation_fields

from ._confusion import _new_axes, _savefig

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["reliability"]


def reliability(
    adata: AnnData,
    true_key: str,
    key: str,
    *,
    n_bins: int = 10,
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    r"""Reliability diagram: accuracy per confidence bin against the diagonal.

    Cells are binned by ``obs[f"{key}_confidence"]`` into ``n_bins`` equal-width bins on
    ``[0, 1]``; a bar shows the accuracy of ``obs[f"{key}_prediction"]`` in each bin, a hatched
    red box the gap to the bin's mean confidence, and a short panel underneath the number of
    cells per bin. The title gives the ECE and the overconfidence error. Only cells whose true
    type is a reference type are used (a novel cell can never be correct).

    Parameters
    ----------
    adata
        Query annotated by ``model.annotate(adata, key_added=key)``.
    true_key
        Column of ``adata.obs`` with the true types.
    key
        The ``key_added`` used when annotating.
    n_bins
        Number of confidence bins (scNym uses 10).
    ax
        Axes to draw into; default: a new figure.
    save
        Path to write the figure to.

    Returns
    -------
    The axes of the diagram (the histogram panel is appended below it, sharing its x axis).

    Notes
    -----
    :math:`ECE = \sum_m \frac{|B_m|}{N}|acc(B_m) - conf(B_m)|` and
    :math:`OE = \sum_m \frac{|B_m|}{N} conf(B_m)\max(conf(B_m) - acc(B_m), 0)` (scNym, Kimmel &
    Kelley 2021, "Model calibration analysis"; see
    :func:`~labeltransfer.metrics.reliability_table`).
    """
    f = _annotation_fields(adata, true_key, key)
    known = ~f.is_novel
    if not known.any():
        raise ValueError(
            f"No cell of obs[{true_key!r}] has a reference type ({f.reference_types[:5]} ...); "
            "calibration needs cells whose true type the model could predict."
        )
    conf = f.confidence[known]
    correct = f.truth[known] == f.prediction[known]
    table = reliability_table(conf, correct, n_bins=n_bins)
    ece = expected_calibration_error(conf, correct, n_bins=n_bins)
    oe = overconfidence_error(conf, correct, n_bins=n_bins)

    ax = _new_axes(ax, (5.0, 5.6))
    width = 1.0 / n_bins
    centers = (table["bin_lower"] + table["bin_upper"]).to_numpy() / 2.0
    counts = table["n"].to_numpy()
    filled = counts > 0
    acc = table["accuracy"].to_numpy()
    mean_conf = table["confidence"].to_numpy()

    ax.bar(
        centers[filled],
        acc[filled],
        width=width,
        color="#4c84bf",
        edgecolor="white",
        linewidth=0.8,
        label="accuracy",
    )
    ax.bar(
        centers[filled],
        np.abs(mean_conf - acc)[filled],
        bottom=np.minimum(acc, mean_conf)[filled],
        width=width,
        facecolor="none",
        edgecolor="#c62828",
        hatch="///",
        linewidth=1.0,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="#333333", linewidth=1.2, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability ({key}): ECE = {ece:.3f}, OE = {oe:.3f}")
    ax.legend(loc="upper left", frameon=False, fontsize="small")

    # histogram of the confidences in a short panel under the diagram, sharing its x axis
    hist_ax = make_axes_locatable(ax).append_axes("bottom", size="24%", pad=0.12, sharex=ax)
    hist_ax.bar(centers, counts, width=width, color="#9e9e9e", edgecolor="white", linewidth=0.8)
    hist_ax.set_ylim(0, max(int(counts.max()), 1) * 1.1)
    hist_ax.set_ylabel("cells", color="#555555")
    hist_ax.tick_params(axis="y", labelsize="small", colors="#555555")
    hist_ax.spines[["top", "right"]].set_visible(False)
    hist_ax.set_xlabel("Confidence")
    ax.tick_params(axis="x", labelbottom=False)
    _savefig(ax.figure, save)
    return ax
