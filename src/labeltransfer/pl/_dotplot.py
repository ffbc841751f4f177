"""Dot plot of the top marker genes per cell type (from :func:`labeltransfer.tl.marker_genes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from labeltransfer._constants import NOVEL_PREFIX, UNASSIGNED

from ._confusion import _natural_key, _savefig

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from anndata import AnnData
    from matplotlib.axes import Axes
    from numpy.typing import NDArray

    from ._markerdotplot import MarkerDotPlot

__all__ = ["marker_dotplot"]

_MARKER_COLUMNS = ("group", "gene", "attribution")
#: Column of the groups in the AnnData handed to scanpy's DotPlot (one row per group).
_GROUP_COLUMN = "lt_group"


@dataclass(frozen=True)
class _DotValues:
    """What the dots show: rows x columns colour values and sizes (fraction of the largest)."""

    rows: list[str]
    color: NDArray[np.float64]
    fraction: NDArray[np.float64]
    color_label: str
    size_label: str
    vmin: float | None


def _markers_table(data: AnnData | pd.DataFrame, key: str) -> pd.DataFrame:
    """Return the markers table: ``data`` itself, or ``data.uns[key]["markers"]``."""
    if isinstance(data, pd.DataFrame):
        table, where = data, "the markers table"
    else:
        entry = data.uns.get(key)
        if not isinstance(entry, dict) or "markers" not in entry:
            raise KeyError(
                f"adata.uns[{key!r}]['markers'] not found. Annotate with "
                f"`model.annotate(adata, key_added={key!r})`, then rank the genes with "
                f"`lt.tl.marker_genes(model, adata, groupby=..., key_added={key!r})`; or pass "
                "the DataFrame returned by `lt.tl.marker_genes` instead of `adata`."
            )
        markers = entry["markers"]
        try:
            table = pd.DataFrame({k: np.asarray(v) for k, v in dict(markers).items()})
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"adata.uns[{key!r}]['markers'] must be a dict of equally long lists (as "
                "written by `lt.tl.marker_genes`)."
            ) from err
        where = f"adata.uns[{key!r}]['markers']"
    missing = [c for c in _MARKER_COLUMNS if c not in table.columns]
    if missing:
        raise KeyError(
            f"{where} lacks the column(s) {missing}; it must have the columns 'group', "
            "'gene', 'attribution' (and optionally 'rank') of `lt.tl.marker_genes`."
        )
    if len(table) == 0:
        raise ValueError(f"{where} is empty: no marker genes to plot.")
    table = table.assign(
        group=table["group"].astype(str),
        gene=table["gene"].astype(str),
        attribution=pd.to_numeric(table["attribution"]).astype(np.float64),
    )
    return table


def _top_genes(
    table: pd.DataFrame, n_genes: int, groups: Sequence[str] | None
) -> list[tuple[str, list[str]]]:
    """``(group, genes)`` blocks: the ``n_genes`` best-ranked genes of each group."""
    order = list(pd.unique(table["group"]))
    if groups is not None:
        groups = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in groups if g not in set(order)]
        if unknown:
            raise ValueError(
                f"groups {unknown} have no marker genes; the markers table has the groups {order}."
            )
        order = groups
    sort_by = ["rank"] if "rank" in table.columns else []
    blocks = []
    for group in order:
        rows = table[table["group"] == group]
        if sort_by:
            rows = rows.sort_values("rank", kind="stable")
        else:
            rows = rows.sort_values("attribution", ascending=False, kind="stable")
        genes = list(pd.unique(rows["gene"]))[:n_genes]
        blocks.append((group, genes))
    return blocks


def _expression_matrix(
    adata: AnnData, genes: list[str], layer: str | None, normalize: bool | None
) -> tuple[NDArray[np.float64], NDArray[np.bool_], bool]:
    """Expression (cells x ``genes``, log1p CPM when normalised) and the expressed flags."""
    from labeltransfer.data._checks import _get_matrix

    matrix = _get_matrix(adata, layer, "expression")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        where = "X" if layer is None else f"layers[{layer!r}]"
        raise KeyError(
            f"{len(missing)} marker gene(s) are not in adata.var_names, e.g. {missing[:5]}; "
            f"pass the AnnData the markers were computed on (its {where} must hold every "
            "marker gene), or `adata=None` to plot the attributions only."
        )
    columns = adata.var_names.get_indexer(genes)
    sub = matrix[:, columns]
    values = np.asarray(sub.toarray() if sparse.issparse(sub) else sub, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("The expression of the marker genes contains NaN/inf values.")
    if normalize is None:
        normalize = bool(np.all(values == np.round(values)))
    if normalize:
        if (values < 0).any():
            raise ValueError(
                "Counts must be non-negative for log1p CPM; pass raw counts (e.g. "
                "`layer='counts'`) or `normalize=False` for log-normalised data."
            )
        library = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(1e6, library, out=np.zeros_like(library), where=library > 0)
        expression = np.log1p(values * scale[:, None])
    else:
        expression = values
    return expression, values > 0, normalize


def _row_order(labels: pd.Series, marker_groups: list[str]) -> list[str]:
    """Marker groups first (in block order), then the other groups, ``Unassigned`` last.

    ``Unassigned`` with markers of its own is a marker group: it keeps its block's place.
    """
    present = pd.Series(labels.dropna().astype(str)).unique()
    if isinstance(labels.dtype, pd.CategoricalDtype):
        others = [str(c) for c in labels.cat.categories if str(c) in set(present)]
    else:
        others = sorted(present, key=_natural_key)
    first = [g for g in marker_groups if g in set(present)]
    rest = [c for c in others if c not in set(first) and c != UNASSIGNED]
    novel = [c for c in rest if c.startswith(NOVEL_PREFIX)]
    rest = [c for c in rest if c not in set(novel)] + novel
    last = [UNASSIGNED] if UNASSIGNED in set(present) and UNASSIGNED not in first else []
    return first + rest + last


def _expression_values(
    adata: AnnData,
    key: str,
    groupby: str | None,
    columns: list[str],
    marker_groups: list[str],
    layer: str | None,
    normalize: bool | None,
    standard_scale: str | None,
) -> _DotValues:
    """Mean expression and fraction of expressing cells per group (rows) and gene (columns)."""
    column = key if groupby is None else groupby
    if column not in adata.obs.columns:
        fix = (
            f"run `model.annotate(adata, key_added={key!r})` first, or pass `groupby=` with a "
            "column of adata.obs"
            if groupby is None
            else "pass `groupby=` with a column of adata.obs"
        )
        raise KeyError(
            f"adata.obs has no {column!r} to group the cells by; {fix} (available: "
            f"{list(adata.obs.columns[:20])})."
        )
    labels = adata.obs[column]
    rows = _row_order(labels, marker_groups)
    genes = list(pd.unique(pd.Series(columns)))
    expression, expressed, normalized = _expression_matrix(adata, genes, layer, normalize)
    codes = pd.Index(rows).get_indexer(labels.astype(str).where(labels.notna(), None))
    keep = codes >= 0
    onehot = sparse.csr_matrix(
        (np.ones(int(keep.sum())), (codes[keep], np.flatnonzero(keep))),
        shape=(len(rows), adata.n_obs),
    )
    n_cells = np.asarray(onehot.sum(axis=1)).ravel()
    mean = np.asarray(onehot @ expression) / n_cells[:, None]
    frac = np.asarray(onehot @ expressed.astype(np.float64)) / n_cells[:, None]
    where = pd.Index(genes).get_indexer(columns)
    mean, frac = mean[:, where], frac[:, where]
    label = "mean log1p CPM" if normalized else "mean expression"
    if standard_scale == "gene":
        low, high = mean.min(axis=0), mean.max(axis=0)
        mean = np.divide(mean - low, high - low, out=np.zeros_like(mean), where=(high - low) > 0)
        label += "\n(scaled per gene)"
    return _DotValues(
        rows=rows,
        color=mean,
        fraction=frac,
        color_label=label,
        size_label="cells expressing (%)",
        vmin=0.0,
    )


def _attribution_values(
    table: pd.DataFrame, columns: list[str], marker_groups: list[str]
) -> _DotValues:
    """Attribution of each gene for each marker group (NaN where the table has none)."""
    lookup = table.drop_duplicates(["group", "gene"]).set_index(["group", "gene"])["attribution"]
    color = np.full((len(marker_groups), len(columns)), np.nan)
    for i, group in enumerate(marker_groups):
        for j, gene in enumerate(columns):
            color[i, j] = lookup.get((group, gene), np.nan)
    largest = np.nanmax(np.abs(color)) if np.isfinite(color).any() else 1.0
    fraction = np.nan_to_num(np.abs(color) / (largest if largest > 0 else 1.0), nan=0.0)
    return _DotValues(
        rows=list(marker_groups),
        color=color,
        fraction=fraction,
        color_label="attribution\n(mean integrated gradient)",
        size_label="|attribution| (% of max)",
        vmin=None,
    )


def _dot_plot(
    values: _DotValues,
    blocks: list[tuple[str, list[str]]],
    *,
    title: str,
    group_label: str | None,
    cmap: str,
    largest_dot: float,
    ax: Axes | None,
) -> MarkerDotPlot:
    """Draw ``values`` with scanpy's DotPlot: colour and size frames given, a block per group.

    scanpy reads an AnnData and cleans its ``obs`` in place (``sanitize_anndata``), so it is
    handed a small one of its own (one observation per row, no expression): the dots come
    from the two frames, never from the user's AnnData.
    """
    from anndata import AnnData

    from ._markerdotplot import MarkerDotPlot

    columns = [gene for _, genes in blocks for gene in genes]
    genes = list(pd.unique(pd.Series(columns)))
    light = AnnData(
        X=np.zeros((len(values.rows), len(genes)), dtype=np.float32),
        obs=pd.DataFrame(
            {_GROUP_COLUMN: pd.Categorical(values.rows, categories=values.rows)},
            index=[f"row{i}" for i in range(len(values.rows))],
        ),
        var=pd.DataFrame(index=genes),
    )
    finite = values.color[np.isfinite(values.color)]
    vmin = values.vmin if values.vmin is not None else min(float(finite.min()), 0.0)
    vmax = max(float(finite.max()), vmin + 1e-9)
    spans, start = [], 0
    for group, block in blocks:
        spans.append((group, start, start + len(block)))
        start += len(block)
    plot = MarkerDotPlot(
        light,
        dict(blocks),
        _GROUP_COLUMN,
        blocks=spans,
        group_label=group_label,
        title=title,
        dot_color_df=pd.DataFrame(values.color, index=values.rows, columns=columns),
        dot_size_df=pd.DataFrame(values.fraction, index=values.rows, columns=columns),
        vmin=vmin,
        vmax=vmax,
        ax=ax,
    )
    # dot area proportional to the fraction, a full dot = 100% (scanpy's default scales to
    # the largest fraction with exponent 1.5)
    plot.style(cmap=cmap, largest_dot=largest_dot, dot_min=0.0, dot_max=1.0, size_exponent=1.0)
    return plot.legend(colorbar_title=values.color_label, size_title=values.size_label)


def marker_dotplot(
    data: AnnData | pd.DataFrame,
    key: str,
    *,
    n_genes: int = 5,
    groupby: str | None = None,
    adata: AnnData | None = None,
    groups: Sequence[str] | None = None,
    layer: str | None = None,
    normalize: bool | None = None,
    standard_scale: Literal["gene"] | None = None,
    cmap: str = "Reds",
    largest_dot: float = 180.0,
    ax: Axes | None = None,
    save: str | Path | None = None,
    return_fig: bool = False,
) -> Axes | MarkerDotPlot:
    """Dot plot of the top marker genes of each cell type, ordered by their attribution.

    The markers come from ``data.uns[key]["markers"]`` (written by
    ``lt.tl.marker_genes(model, adata, groupby=..., key_added=key)``) or from the DataFrame
    returned by :func:`~labeltransfer.tl.marker_genes`. For each marker group, in the order of
    the table, its ``n_genes`` best-ranked genes (``rank`` 1 first; by decreasing
    ``attribution`` when the table has no ``rank``) form one block of columns, labelled by a
    bracket above; a gene salient for two groups appears in both blocks.

    Rows are the groups of ``obs[groupby]`` (default: the final calls ``obs[key]``): the
    marker groups first, in block order, so the blocks line up with a shaded diagonal, then
    the other groups (novel groups, ``"Unassigned"`` last). The colour of a dot is the mean
    expression of the gene in the cells of the row (``log1p`` of counts per million, the zeros
    included), its area the fraction of those cells with a non-zero value: a dot of area
    ``largest_dot`` means every cell expresses the gene.

    The plot is scanpy's :class:`~scanpy.pl.DotPlot` (layout, brackets, legends), given these
    colour and size frames (``dot_color_df``, ``dot_size_df``) and the marker ranking as the
    gene order; with ``return_fig=True`` it is returned undrawn, to restyle with its methods
    (``.style()``, ``.legend()``, ``.swap_axes()``) before ``.show()`` or ``.savefig()``.
    ``data`` and ``adata`` are not changed.

    A table from ``marker_genes(..., target=t)`` (every group explained towards one type
    ``t``) is drawn the same way; the title then names ``t``.

    Without expression data (a table and no ``adata``) the rows are the marker groups and the
    dots show the attributions themselves: the colour the mean integrated gradient of the
    gene for the row's group, the area its absolute value relative to the largest one; a gene
    without an attribution for a group (not in that group's table) has no dot.

    Parameters
    ----------
    data
        AnnData with ``uns[key]["markers"]`` and the expression, or the markers DataFrame
        (columns ``group``, ``gene``, ``attribution``, optionally ``rank`` and ``target``).
    key
        The ``key_added`` of the annotation and of :func:`~labeltransfer.tl.marker_genes`:
        where the markers are read from and the default ``groupby``.
    n_genes
        Genes per marker group.
    groupby
        Column of ``obs`` with the groups of the rows; default ``key`` (the final calls).
    adata
        AnnData with the expression when ``data`` is a DataFrame; leave ``None`` with a
        DataFrame to plot the attributions.
    groups
        Marker groups to draw (blocks, in this order); default all groups of the table.
    layer
        Layer with the expression instead of ``X``.
    normalize
        Turn the expression into ``log1p`` counts per million (library size over all genes
        of the matrix). ``None``: when the marker genes' values are whole numbers (counts);
        ``False`` for data that are already log-normalised.
    standard_scale
        ``"gene"``: scale each gene's mean expression to ``[0, 1]`` over the rows.
    cmap
        Colour map of the dots.
    largest_dot
        Area (points²) of a dot whose fraction is 1.
    ax
        Axes whose area holds the plot (dots, brackets and legends, as scanpy's ``ax``);
        default: a new figure sized to the number of genes and groups.
    save
        Path to write the figure to (format from the suffix).
    return_fig
        Return the :class:`~scanpy.pl.DotPlot` (a subclass that shades each group's own
        block) without drawing it.

    Returns
    -------
    The axes of the dots (one scatter collection: x = column, y = row; centres at
    ``index + 0.5``); with ``return_fig``, the DotPlot (its ``dot_color_df`` and
    ``dot_size_df`` hold the values drawn).

    Raises
    ------
    KeyError
        If the markers, the grouping column or a marker gene are missing; the message names
        the call that writes them.
    ValueError
        If ``n_genes < 1``, ``groups`` names a group without markers, the markers table is
        empty, or ``save`` is given with ``return_fig``.

    Examples
    --------
    >>> lt.tl.marker_genes(model, adata, groupby="scnym", key_added="scnym")  # doctest: +SKIP
    >>> lt.pl.marker_dotplot(adata, "scnym", n_genes=4)  # doctest: +SKIP
    """
    if n_genes < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
    if return_fig and save is not None:
        raise ValueError(
            "`save` draws the figure, `return_fig=True` returns it undrawn: pass one of them "
            "(with return_fig, call `.savefig(path)` on the returned DotPlot)."
        )
    if standard_scale not in (None, "gene"):
        raise ValueError(f"standard_scale must be None or 'gene', got {standard_scale!r}.")
    if isinstance(data, pd.DataFrame):
        expression = adata
    elif adata is not None:
        raise ValueError(
            "Pass `adata=` only with a markers DataFrame; with an AnnData `data` its own "
            "expression is used."
        )
    else:
        expression = data
    table = _markers_table(data, key)
    blocks = _top_genes(table, n_genes, groups)
    marker_groups = [g for g, _ in blocks]
    columns = [gene for _, genes in blocks for gene in genes]
    if expression is not None:
        values = _expression_values(
            expression,
            key,
            groupby,
            columns,
            marker_groups,
            layer,
            normalize,
            standard_scale,
        )
    else:
        values = _attribution_values(table, columns, marker_groups)

    title = (
        f"Top {n_genes} marker gene{'s' if n_genes > 1 else ''} per type ({key})"
        if expression is not None
        else f"Marker attribution, top {n_genes} per type ({key})"
    )
    if "target" in table.columns:
        targets = table.loc[table["group"].isin(marker_groups), "target"].astype(str).unique()
        if len(targets) == 1 and any(g != targets[0] for g in marker_groups):
            title += f"\nattributed to {targets[0]}"
    plot = _dot_plot(
        values,
        blocks,
        title=title,
        group_label=(key if groupby is None else groupby) if expression is not None else None,
        cmap=cmap,
        largest_dot=largest_dot,
        ax=ax,
    )
    if return_fig:
        return plot
    plot.make_figure()
    dots = plot.get_axes()["mainplot_ax"]
    _savefig(dots.figure, save)
    return dots
