"""Confusion matrix of an annotation: true types x (reference types, novel groups, Unassigned)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from labeltransfer._constants import UNASSIGNED
from labeltransfer.metrics._classification import _isin
from labeltransfer.metrics._report import _annotation_fields

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure, SubFigure

__all__ = ["confusion"]


# --------------------------------------------------------------------------------------------
# helpers shared by the plotting functions
# --------------------------------------------------------------------------------------------
def _natural_key(label: str) -> tuple[str, int, str]:
    """Sort ``novel_2`` before ``novel_10``."""
    m = re.match(r"^(.*?)(\d+)$", label)
    return (m.group(1), int(m.group(2)), label) if m else (label, -1, label)


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    """Return ``ax``, or the axes of a new figure of size ``figsize``."""
    if ax is not None:
        return ax
    _, new_ax = plt.subplots(figsize=figsize, layout="constrained")
    return new_ax


def _axes_size_pt(ax: Axes) -> tuple[float, float]:
    """Width and height of ``ax`` in points (before any layout engine runs)."""
    fig = ax.figure
    pos = ax.get_position()
    return (
        pos.width * fig.get_figwidth() * 72.0,
        pos.height * fig.get_figheight() * 72.0,
    )


def _savefig(fig: Figure | SubFigure, save: str | Path | None) -> None:
    """Write ``fig`` to ``save`` (format from the suffix) when a path is given."""
    if save is None:
        return
    path = Path(save)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(
            f"Cannot save the figure to {str(path)!r}: folder {str(path.parent)!r} does not "
            "exist; create it first or pass another path."
        )
    fig.figure.savefig(path, dpi=150, bbox_inches="tight")


def _column_order(final: np.ndarray, reference_types: list[str]) -> tuple[list[str], list[str]]:
    """Novel groups found in ``final`` (natural order), and the full column order."""
    ref = set(reference_types)
    groups = sorted(
        {c for c in final.tolist() if c not in ref and c != UNASSIGNED}, key=_natural_key
    )
    return groups, [*reference_types, *groups, UNASSIGNED]


def _row_order(truth: np.ndarray, reference_types: list[str]) -> list[str]:
    """Order the true types: reference types present (reference order), then the others."""
    present = set(truth.tolist())
    ref = [c for c in reference_types if c in present]
    return ref + sorted(present - set(ref), key=_natural_key)


# --------------------------------------------------------------------------------------------
def confusion(
    adata: AnnData,
    true_key: str,
    key: str,
    *,
    normalize: bool = True,
    show_counts: bool = True,
    ax: Axes | None = None,
    save: str | Path | None = None,
) -> Axes:
    """Confusion matrix of the final calls against the true types.

    Rows are the true types (reference types first, in reference order, then the types absent
    from the reference); columns are the reference types, then the novel groups found by
    discovery (``novel_0``, ...), then ``"Unassigned"`` (rejected cells) as the last column.
    A dashed line separates the reference types from the other columns.

    Parameters
    ----------
    adata
        Query annotated by ``model.annotate(adata, key_added=key)``.
    true_key
        Column of ``adata.obs`` with the true types.
    key
        The ``key_added`` used when annotating.
    normalize
        Colour and annotate by the fraction of each true type (rows sum to 1); otherwise by
        counts.
    show_counts
        Add the cell count under each non-zero fraction (only with ``normalize``).
    ax
        Axes to draw into; default: a new figure sized to the matrix.
    save
        Path to write the figure to (format from the suffix, e.g. ``.png``, ``.pdf``).

    Returns
    -------
    The axes of the matrix.
    """
    f = _annotation_fields(adata, true_key, key)
    final = np.where(f.withheld & _isin(f.final, f.reference_types), UNASSIGNED, f.final)
    groups, cols = _column_order(final, f.reference_types)
    rows = _row_order(f.truth, f.reference_types)
    ri = {c: i for i, c in enumerate(rows)}
    ci = {c: j for j, c in enumerate(cols)}
    counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
    np.add.at(counts, (np.array([ri[t] for t in f.truth]), np.array([ci[p] for p in final])), 1)
    row_sum = counts.sum(axis=1, keepdims=True)
    values = counts / np.maximum(row_sum, 1) if normalize else counts.astype(float)
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)

    n_r, n_c = counts.shape
    longest = max(len(s) for s in [*rows, *cols])
    ax = _new_axes(
        ax,
        (min(2.2 + 0.62 * n_c + 0.07 * longest, 30), min(1.6 + 0.48 * n_r + 0.05 * longest, 30)),
    )
    im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, aspect="auto", interpolation="none")
    cbar = ax.figure.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    cbar.set_label("fraction of true type" if normalize else "cells")

    # font from the size of one cell in points: "0.00" is about 2.4 font sizes wide
    cell_pt = _axes_size_pt(ax)
    cell_w, cell_h = cell_pt[0] / n_c, cell_pt[1] / n_r
    fontsize = float(min(9.0, cell_w / 2.9, cell_h / 1.6))
    two_lines = normalize and show_counts and cell_h / 2.7 >= 4.0
    if two_lines:
        fontsize = min(fontsize, cell_h / 2.7)
    if fontsize >= 3.5:
        for i in range(n_r):
            for j in range(n_c):
                if counts[i, j] == 0:
                    continue
                v = values[i, j]
                text = f"{v:.2f}" if normalize else f"{counts[i, j]:d}"
                if two_lines:
                    text += f"\n({counts[i, j]:d})"
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if v > 0.55 * vmax else "#1b1b1b",
                )

    ax.set_xticks(np.arange(n_c), labels=cols)
    ax.set_yticks(np.arange(n_r), labels=rows)
    ax.tick_params(axis="x", labelrotation=45, length=0)
    ax.tick_params(axis="y", length=0)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
        label.set_rotation_mode("anchor")
    ax.set_xticks(np.arange(n_c + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_r + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="minor", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    n_ref = len(f.reference_types)
    ax.axvline(n_ref - 0.5, color="#555555", linestyle="--", linewidth=1.0)
    ax.set_xlabel(f"Predicted ({key})")
    ax.set_ylabel(f"True ({true_key})")
    title = "Confusion matrix" + (" (row-normalised)" if normalize else "")
    ax.set_title(title)
    _savefig(ax.figure, save)
    return ax
