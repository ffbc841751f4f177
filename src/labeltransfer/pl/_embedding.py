"""Confidence of an annotation on a 2-D embedding (UMAP of the model's embedding)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from labeltransfer._constants import NOVEL_PREFIX, OUTPUT_KEYS, UNASSIGNED
from labeltransfer.metrics._classification import _as_bool
from labeltransfer.tl._embedding import embedding_keys

from ._confusion import _natural_key, _savefig
from ._sankey import _GREY, _palette

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from numpy.typing import ArrayLike, NDArray

__all__ = ["embedding_confidence"]

#: Colour of the cells left out by ``mask`` / ``groups`` (lighter than "Unassigned").
_BACKGROUND = "#e4e4e4"
#: Edge colour of the rings drawn around rejected cells.
_REJECTED = "#d62728"


def _annotation_column(adata: AnnData, column: str, key: str, what: str) -> pd.Series:
    """Return ``adata.obs[column]``, or raise a KeyError naming the ``annotate`` fix."""
    if column not in adata.obs.columns:
        raise KeyError(
            f"adata.obs has no {column!r} ({what}). Run `model.annotate(adata, "
            f"key_added={key!r})` first, or pass the `key` used when annotating."
        )
    return adata.obs[column]


def _coordinates(adata: AnnData, key: str, basis: str | None) -> tuple[NDArray[np.float64], str]:
    """Return the 2-D coordinates to draw and the axis-label stem (``"UMAP"``, ``"PC"``, ...)."""
    if basis is None:
        umap_key = embedding_keys(key)["umap"]
        if umap_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm has no {umap_key!r} (the UMAP of the model's embedding "
                f"obsm['X_{key}']). Compute it first with `lt.tl.embedding(adata, {key!r})`, "
                "or pass `basis=` with an existing 2-D embedding (obsm keys: "
                f"{list(adata.obsm.keys())})."
            )
        coords = np.asarray(adata.obsm[umap_key])
        stem = "UMAP"
    else:
        if basis not in adata.obsm and f"X_{basis}" in adata.obsm:
            basis = f"X_{basis}"
        if basis not in adata.obsm:
            raise KeyError(
                f"basis {basis!r} is not a key of adata.obsm (available: "
                f"{list(adata.obsm.keys())}); pass one of them, or basis=None to draw the UMAP "
                f"of the model's embedding obsm['X_{key}_umap'] (computed by "
                f"`lt.tl.embedding(adata, {key!r})`)."
            )
        coords = np.asarray(adata.obsm[basis])
        name = basis.removeprefix("X_")
        stem = "UMAP" if name.lower().endswith("umap") else name
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise ValueError(
            f"The embedding to draw must have at least 2 columns, got shape {coords.shape}."
        )
    return np.asarray(coords[:, :2], dtype=np.float64), stem


def _category_order(column: pd.Series) -> list[str]:
    """Categories of the final calls: reference types, then novel groups, ``Unassigned`` last."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str).unique())
        cats = [str(c) for c in column.cat.categories if str(c) in present]
    else:
        cats = sorted(set(column.dropna().astype(str)), key=_natural_key)
    novel = sorted((c for c in cats if c.startswith(NOVEL_PREFIX)), key=_natural_key)
    ref = [c for c in cats if c not in set(novel) and c != UNASSIGNED]
    return ref + novel + ([UNASSIGNED] if UNASSIGNED in cats else [])


def _category_colors(order: list[str]) -> dict[str, Any]:
    """Colour the reference types (sankey palette), novel groups (Set2) and ``Unassigned``."""
    ref = [c for c in order if not c.startswith(NOVEL_PREFIX) and c != UNASSIGNED]
    colors: dict[str, Any] = dict(zip(ref, _palette(len(ref)), strict=True))
    novel = [c for c in order if c.startswith(NOVEL_PREFIX)]
    for i, c in enumerate(novel):
        colors[c] = mpl.colormaps["Set2"](i % 8)
    colors[UNASSIGNED] = _GREY
    return colors


def _selection(
    adata: AnnData,
    key: str,
    mask: ArrayLike | None,
    groups: Sequence[str] | None,
) -> NDArray[np.bool_]:
    """Cells to colour: ``mask`` and final call in ``groups``."""
    selected = np.ones(adata.n_obs, dtype=bool)
    if mask is not None:
        if isinstance(mask, str):
            raise TypeError(
                f"mask must be a boolean array (e.g. `adata.obs['lt_role'] == 'query'`), got "
                f"the string {mask!r}."
            )
        if isinstance(mask, pd.Series) and not mask.index.equals(adata.obs_names):
            mask = mask.reindex(adata.obs_names)
        values = _as_bool(np.asarray(mask), name="mask")
        if len(values) != adata.n_obs:
            raise ValueError(
                f"mask has {len(values)} values but `adata` has {adata.n_obs} cells; pass one "
                "flag per cell."
            )
        selected &= values
    if groups is not None:
        if isinstance(groups, str):
            groups = [groups]
        calls = _annotation_column(adata, key, key, "final calls written by annotate")
        calls = calls.astype(str).to_numpy()
        unknown = [g for g in groups if g not in set(calls)]
        if unknown:
            raise ValueError(
                f"groups {unknown} are not calls of obs[{key!r}]; choose among "
                f"{_category_order(adata.obs[key])}."
            )
        selected &= np.isin(calls, list(groups))
    return selected


def _panel_axes(
    ax: Axes | Sequence[Axes] | None, n_panels: int, legend_width: float
) -> list[Axes]:
    """Return ``n_panels`` axes: the given ones, or those of a new figure."""
    if ax is None:
        width = 4.8 * n_panels + 0.9 + legend_width
        _, axes = plt.subplots(1, n_panels, figsize=(width, 4.4), layout="constrained")
        return list(np.atleast_1d(axes))
    axes = [ax] if not isinstance(ax, list | tuple | np.ndarray) else list(np.ravel(ax))
    if len(axes) != n_panels:
        raise ValueError(
            f"ax must hold {n_panels} axes (one per panel: "
            f"{'labels and confidence' if n_panels == 2 else 'confidence'}), got {len(axes)}; "
            "pass matching axes, or set show_labels accordingly."
        )
    return axes


def _style(ax: Axes, stem: str) -> None:
    """Hide the ticks of an embedding panel and name its axes ``stem1``, ``stem2``."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{stem}1")
    ax.set_ylabel(f"{stem}2")
    for spine in ax.spines.values():
        spine.set_color("#888888")


def _legend_marker(color: Any, label: str, *, edge: Any = "none", size: float = 6.0) -> Line2D:
    """Return a round legend handle of ``color`` (edge colour ``edge``)."""
    return Line2D(
        [],
        [],
        linestyle="none",
        marker="o",
        markersize=size,
        markerfacecolor=color,
        markeredgecolor=edge,
        label=label,
    )


def embedding_confidence(
    adata: AnnData,
    key: str,
    *,
    basis: str | None = None,
    show_labels: bool = True,
    show_rejected: bool = True,
    mask: ArrayLike | None = None,
    groups: Sequence[str] | None = None,
    background: bool = True,
    size: float | None = None,
    cmap: str = "viridis",
    ax: Axes | Sequence[Axes] | None = None,
    save: str | Path | None = None,
) -> list[Axes]:
    """Plot the final calls and confidence of an annotation on a UMAP of the model's embedding.

    Two panels by default: the final call ``obs[key]`` (reference types, then novel groups,
    ``"Unassigned"`` in grey) and the confidence ``obs[f"{key}_confidence"]`` on a ``[0, 1]``
    colour bar, with the rejected cells (``obs[f"{key}_rejected"]``) ringed in red. In the
    confidence panel the least confident cells are drawn last, on top.

    The coordinates are ``obsm[basis]`` when ``basis`` is given; otherwise the UMAP of the
    model's embedding ``obsm[f"X_{key}_umap"]``, computed beforehand by
    :func:`lt.tl.embedding(adata, key) <labeltransfer.tl.embedding>`. Like every ``lt.pl``
    function, it only draws: ``adata`` is not changed.

    Parameters
    ----------
    adata
        AnnData annotated by ``model.annotate(adata, key_added=key)``.
    key
        The ``key_added`` used when annotating.
    basis
        Key of ``adata.obsm`` with 2-D coordinates to draw instead (e.g. ``"X_umap"``; the
        ``X_`` prefix may be left out; only the first two columns are used).
    show_labels
        Draw the panel of final calls; ``False`` draws the confidence panel only.
    show_rejected
        Ring the rejected cells (``obs[f"{key}_rejected"]``) in the confidence panel.
    mask
        Boolean flags, one per cell, of the cells to colour, e.g.
        ``adata.obs["lt_role"] == "query"`` to show the query cells of a concatenated
        reference + query AnnData. Other cells are drawn in light grey (see ``background``).
    groups
        Final calls (categories of ``obs[key]``) to colour; other cells are drawn in light
        grey. Combined with ``mask`` by "and".
    background
        Draw the cells left out by ``mask``/``groups`` in light grey under the coloured ones.
    size
        Marker area in points²; default ``120000 / n_cells`` (scanpy's rule), clipped to
        ``[0.5, 50]``.
    cmap
        Colour map of the confidence.
    ax
        Axes to draw into, one per panel (two with ``show_labels``, else one); default: a
        new figure.
    save
        Path to write the figure to (format from the suffix).

    Returns
    -------
    The axes of the panels: ``[labels, confidence]``, or ``[confidence]`` when
    ``show_labels=False``.

    Raises
    ------
    KeyError
        If a field of the annotation, the UMAP or ``basis`` is missing; the message names the
        call that writes it (``model.annotate(adata, key_added=key)``,
        ``lt.tl.embedding(adata, key)``).
    ValueError
        If ``mask``/``groups`` leave no cell.

    Examples
    --------
    >>> model.annotate(adata, key_added="scnym")  # doctest: +SKIP
    >>> lt.tl.embedding(adata, "scnym")  # doctest: +SKIP
    >>> lt.pl.embedding_confidence(  # doctest: +SKIP
    ...     adata, "scnym", mask=adata.obs["lt_role"] == "query"
    ... )
    """
    conf_col = _annotation_column(
        adata, f"{key}{OUTPUT_KEYS.CONFIDENCE}", key, "confidence written by annotate"
    )
    calls_col = (
        _annotation_column(adata, key, key, "final calls written by annotate")
        if show_labels
        else None
    )
    rej_col = (
        _annotation_column(
            adata, f"{key}{OUTPUT_KEYS.REJECTED}", key, "rejection flags written by annotate"
        )
        if show_rejected
        else None
    )
    if adata.n_obs == 0:
        raise ValueError("Empty input: `adata` has no cells to draw.")
    selected = _selection(adata, key, mask, groups)
    confidence = np.asarray(conf_col, dtype=np.float64)
    selected &= np.isfinite(confidence)  # e.g. cells added after annotating
    if calls_col is not None:
        selected &= calls_col.notna().to_numpy()
    if not selected.any():
        raise ValueError(
            "No cell to colour: `mask`/`groups` select no annotated cell (with a final call "
            "and a finite confidence); "
            "check them (e.g. the `lt_role` values) or leave them out."
        )
    coords, stem = _coordinates(adata, key, basis)

    n_panels = 2 if show_labels else 1
    legend_width = 0.0
    if calls_col is not None:
        entries = [f"{c} ({n:,})" for c, n in calls_col.value_counts().items()]
        legend_width = math.ceil(len(entries) / 18) * (0.075 * max(map(len, entries)) + 0.35)
    axes = _panel_axes(ax, n_panels, legend_width)
    if size is None:
        size = float(np.clip(120_000 / adata.n_obs, 0.5, 50.0))
    rasterized = adata.n_obs > 20_000
    rest = ~selected
    x, y = coords[:, 0], coords[:, 1]

    def _draw_background(panel: Axes) -> list[Line2D]:
        if not (background and rest.any()):
            return []
        panel.scatter(
            x[rest],
            y[rest],
            s=size * 0.7,
            c=_BACKGROUND,
            linewidths=0,
            label="other cells",
            rasterized=rasterized,
        )
        return [_legend_marker(_BACKGROUND, f"other cells ({int(rest.sum()):,})")]

    if calls_col is not None:
        panel = axes[0]
        extra = _draw_background(panel)
        calls = calls_col.astype(str).to_numpy()
        order = _category_order(calls_col)
        colors = _category_colors(order)
        shown = calls[selected]
        panel.scatter(
            x[selected],
            y[selected],
            s=size,
            c=[colors[c] for c in shown],
            linewidths=0,
            label="cells",
            rasterized=rasterized,
        )
        counts = pd.Series(shown).value_counts()
        handles = [
            _legend_marker(colors[c], f"{c} ({int(counts[c]):,})") for c in order if c in counts
        ]
        handles += extra
        panel.legend(
            handles=handles,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize="small",
            ncols=math.ceil(len(handles) / 18),
            handletextpad=0.2,
            borderaxespad=0.0,
        )
        panel.set_title(f"Final call ({key})")
        _style(panel, stem)

    panel = axes[-1]
    extra = _draw_background(panel)
    idx = np.flatnonzero(selected)
    idx = idx[np.argsort(-confidence[idx], kind="stable")]  # least confident on top
    points = panel.scatter(
        x[idx],
        y[idx],
        s=size,
        c=confidence[idx],
        cmap=cmap,
        vmin=0.0,
        vmax=1.0,
        linewidths=0,
        label="cells",
        rasterized=rasterized,
    )
    cbar = panel.figure.colorbar(points, ax=panel, fraction=0.05, pad=0.02)
    cbar.set_label(f"confidence ({key}{OUTPUT_KEYS.CONFIDENCE})")
    handles = extra
    if rej_col is not None:
        rejected = _as_bool(rej_col.to_numpy(), name=f"obs[{rej_col.name!r}]") & selected
        if rejected.any():
            panel.scatter(
                x[rejected],
                y[rejected],
                s=max(size * 2.2, 6.0),
                facecolors="none",
                edgecolors=_REJECTED,
                linewidths=0.5,
                label="rejected",
                rasterized=rasterized,
            )
        handles = [
            _legend_marker(
                "none", f"rejected ({int(rejected.sum()):,})", edge=_REJECTED, size=7.0
            ),
            *handles,
        ]
    if handles:
        panel.legend(
            handles=handles,
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize="small",
            ncols=1,
            handletextpad=0.2,
            borderaxespad=0.1,
        )
    median = float(np.median(confidence[selected]))
    panel.set_title(f"Confidence (median {median:.2f})", loc="left")
    _style(panel, stem)
    _savefig(axes[0].figure, save)
    return axes
