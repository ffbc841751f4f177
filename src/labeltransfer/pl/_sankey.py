"""Sankey (alluvial) plot between two categorical columns of ``adata.obs``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import PathPatch, Rectangle
from matplotlib.path import Path as MplPath

from labeltransfer._constants import UNASSIGNED
from labeltransfer.metrics._classification import _as_labels
from labeltransfer.metrics._report import _obs_column

from ._confusion import _axes_size_pt, _natural_key, _savefig

if TYPE_CHECKING:
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.text import Text

__all__ = ["sankey"]

_GREY = "#b0b0b0"
_NODE_WIDTH = 0.035


def _order(series: pd.Series, labels: np.ndarray) -> list[str]:
    """Categories present in ``labels``: categorical order if any, else by decreasing count."""
    present = pd.Series(labels).value_counts()
    if isinstance(series.dtype, pd.CategoricalDtype):
        return [str(c) for c in series.cat.categories if str(c) in present.index]
    return sorted(present.index, key=lambda c: (-present[c], _natural_key(c)))


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours without the greys (grey is kept for ``"Unassigned"``).

    The dark tab20 colours come first, then their light partners, so that neighbouring
    categories never get two shades of one hue.
    """
    cmap = mpl.colormaps["tab20"]
    order = [i for i in (*range(0, 20, 2), *range(1, 20, 2)) if i not in (14, 15)]
    return [cmap(order[i % len(order)]) for i in range(n)]


def _ribbon(x0: float, x1: float, top0: float, bot0: float, top1: float, bot1: float) -> MplPath:
    """Return the band from ``[bot0, top0]`` at ``x0`` to ``[bot1, top1]`` at ``x1``."""
    xm = (x0 + x1) / 2.0
    verts = [
        (x0, top0),
        (xm, top0),
        (xm, top1),
        (x1, top1),
        (x1, bot1),
        (xm, bot1),
        (xm, bot0),
        (x0, bot0),
        (x0, top0),
    ]
    codes = [
        MplPath.MOVETO,
        MplPath.CURVE4,
        MplPath.CURVE4,
        MplPath.CURVE4,
        MplPath.LINETO,
        MplPath.CURVE4,
        MplPath.CURVE4,
        MplPath.CURVE4,
        MplPath.CLOSEPOLY,
    ]
    return MplPath(verts, codes)


def _blocks(order: list[str], sizes: pd.Series, scale: float, gap: float) -> dict[str, float]:
    """Top y of each block, stacked from y = 1 downwards and centred vertically."""
    total = float(sizes.sum()) * scale + gap * (len(order) - 1)
    top = 1.0 - (1.0 - total) / 2.0
    tops: dict[str, float] = {}
    for c in order:
        tops[c] = top
        top -= sizes[c] * scale + gap
    return tops


def _spread(y: np.ndarray, min_sep: float, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Move the decreasing positions ``y`` apart to at least ``min_sep``, inside [low, high]."""
    out = y.astype(float).copy()
    if len(out) < 2:
        return out
    min_sep = min(min_sep, (high - low) / (len(out) - 1))
    out[0] = min(out[0], high)
    for i in range(1, len(out)):  # push down
        out[i] = min(out[i], out[i - 1] - min_sep)
    out[-1] = max(out[-1], low)
    for i in range(len(out) - 2, -1, -1):  # push back up from the bottom
        out[i] = max(out[i], out[i + 1] + min_sep)
    return out


def _fit_labels(ax: Axes, labels: list[Text]) -> None:
    """Widen the x range so that the category labels lie inside the axes.

    With label widths ``a`` (left) and ``b`` (right) as fractions of the axes width, the x range
    ``[-L, 1 + R]`` with ``T = 1 / (1 - a - b)``, ``L = aT``, ``R = bT`` fits them exactly.
    """
    renderer = ax.figure.canvas.get_renderer()
    width_px = max(ax.get_window_extent(renderer).width, 1.0)
    widths = {"left": 0.0, "right": 0.0}
    for label in labels:
        side = "left" if label.get_ha() == "right" else "right"
        w = label.get_window_extent(renderer).width / width_px
        widths[side] = max(widths[side], w)
    a, b = (1.06 * widths["left"] + 0.015, 1.06 * widths["right"] + 0.015)
    if a + b > 0.8:  # very long labels: keep at least a fifth of the width for the ribbons
        a, b = 0.8 * a / (a + b), 0.8 * b / (a + b)
    total = 1.0 / (1.0 - a - b)
    ax.set_xlim(-a * total, 1.0 + b * total)


def sankey(
    adata: AnnData,
    source_key: str,
    target_key: str,
    *,
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Sankey / alluvial plot of how the cells of one annotation distribute over another.

    Left: the categories of ``obs[source_key]`` (e.g. the true types); right: those of
    ``obs[target_key]`` (e.g. the final calls); each ribbon joins a source and a target
    category and its thickness is proportional to the number of cells they share. Ribbons take
    the colour of their source category; a target category that shares its name with a source
    category takes the same colour, ``"Unassigned"`` is grey.

    Parameters
    ----------
    adata
        AnnData with both columns in ``obs``.
    source_key
        Column of ``adata.obs`` drawn on the left.
    target_key
        Column of ``adata.obs`` drawn on the right.
    ax
        Axes to draw into; default: a new figure sized to the number of categories.
    save
        Path to write the figure to.

    Returns
    -------
    The axes of the plot (axis lines hidden).

    Notes
    -----
    Categories keep their categorical order when the column is categorical, and are otherwise
    sorted by decreasing size. On the right, categories named like a left-hand category come
    first in the left-hand order, then the others, ``"Unassigned"`` last, which keeps ribbons
    of correct calls horizontal.
    """
    src_col = _obs_column(adata, source_key, what="left-hand categories")
    tgt_col = _obs_column(adata, target_key, what="right-hand categories")
    if adata.n_obs == 0:
        raise ValueError("Empty input: `adata` has no cells to draw.")
    src = _as_labels(src_col, name=f"obs[{source_key!r}]")
    tgt = _as_labels(tgt_col, name=f"obs[{target_key!r}]")

    src_order = _order(src_col, src)
    tgt_present = _order(tgt_col, tgt)
    tgt_order = [c for c in src_order if c in set(tgt_present)]
    tgt_order += [c for c in tgt_present if c not in set(tgt_order) and c != UNASSIGNED]
    if UNASSIGNED in tgt_present:
        tgt_order.append(UNASSIGNED)

    flows = pd.crosstab(pd.Series(src, name="src"), pd.Series(tgt, name="tgt"))
    flows = flows.reindex(index=src_order, columns=tgt_order, fill_value=0)
    n_src, n_tgt = len(src_order), len(tgt_order)
    n_max = max(n_src, n_tgt)
    gap = min(0.03, 0.3 / max(n_max - 1, 1))
    scale = (1.0 - gap * (n_max - 1)) / float(flows.to_numpy().sum())
    src_tops = _blocks(src_order, flows.sum(axis=1), scale, gap)
    tgt_tops = _blocks(tgt_order, flows.sum(axis=0), scale, gap)

    colors = dict(zip(src_order, _palette(n_src), strict=True))
    tgt_colors = {c: colors.get(c, _GREY) for c in tgt_order}
    for i, c in enumerate(c for c in tgt_order if c not in colors and c != UNASSIGNED):
        tgt_colors[c] = mpl.colormaps["Set2"](i % 8)

    longest = max(len(f"{c} (000)") for c in [*src_order, *tgt_order])
    if ax is None:
        # no layout engine: the axes keep the extent that _fit_labels measures
        fig = plt.figure(figsize=(5.0 + 0.16 * longest, max(3.5, 0.3 * n_max + 1.2)))
        ax = fig.add_axes((0.01, 0.01, 0.98, 0.98))
    x0, x1 = _NODE_WIDTH, 1.0 - _NODE_WIDTH

    # ribbons: within a source block in target order, within a target block in source order
    src_cursor = dict(src_tops)
    tgt_cursor = dict(tgt_tops)
    for s in src_order:
        for t in tgt_order:
            n = int(flows.at[s, t])
            if n == 0:
                continue
            h = n * scale
            path = _ribbon(
                x0, x1, src_cursor[s], src_cursor[s] - h, tgt_cursor[t], tgt_cursor[t] - h
            )
            ax.add_patch(PathPatch(path, facecolor=colors[s], edgecolor="none", alpha=0.45))
            src_cursor[s] -= h
            tgt_cursor[t] -= h

    # labels as tall as the spacing between blocks allows (4 to 9 pt), nudged apart where
    # small neighbouring blocks would make them overlap
    height_pt = _axes_size_pt(ax)[1]
    fontsize = float(np.clip(0.8 * height_pt / max(n_max, 1), 4.0, 9.0))
    min_sep = 1.2 * fontsize / max(height_pt, 1.0) * 1.06  # in data units (ylim 0 .. 1.06)
    labels = []
    for side, order, tops, sizes, cols in (
        ("left", src_order, src_tops, flows.sum(axis=1), colors),
        ("right", tgt_order, tgt_tops, flows.sum(axis=0), tgt_colors),
    ):
        x = 0.0 if side == "left" else x1
        heights = np.array([sizes[c] * scale for c in order])
        centers = _spread(np.array([tops[c] for c in order]) - heights / 2.0, min_sep)
        for c, h, y in zip(order, heights, centers, strict=True):
            ax.add_patch(
                Rectangle((x, tops[c] - h), _NODE_WIDTH, h, facecolor=cols[c], edgecolor="none")
            )
            label = ax.text(
                -0.015 if side == "left" else 1.015,
                y,
                f"{c} ({int(sizes[c]):,})",
                ha="right" if side == "left" else "left",
                va="center",
                fontsize=fontsize,
            )
            labels.append(label)
    ax.text(0.0, 1.02, source_key, ha="left", va="bottom", fontweight="bold")
    ax.text(1.0, 1.02, target_key, ha="right", va="bottom", fontweight="bold")
    ax.set_ylim(0.0, 1.06)
    ax.set_axis_off()
    _fit_labels(ax, labels)
    _savefig(ax.figure, save)
    return ax
