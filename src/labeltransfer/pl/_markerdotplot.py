"""scanpy's :class:`~scanpy.pl.DotPlot` with each marker group's own block shaded.

Imported by :func:`labeltransfer.pl.marker_dotplot` when called (scanpy is not imported with
``labeltransfer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matplotlib import rcParams
from matplotlib.patches import Rectangle
from scanpy.pl import DotPlot

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes

__all__ = ["MarkerDotPlot"]

#: Fill of the cells where a marker group's row meets its own block of genes.
SHADE = "#ededed"
#: Mean width of a character of a group label, as a fraction of the font size.
CHAR_EM = 0.62


class MarkerDotPlot(DotPlot):
    """A :class:`~scanpy.pl.DotPlot` that shades where a group's row meets its own genes.

    Parameters
    ----------
    *args, **kwargs
        Those of :class:`scanpy.pl.DotPlot`.
    blocks
        ``(group, first column, end column)`` of each marker group's block of genes; the
        cells of that group's row (when it is a row) in those columns are shaded.
    group_label
        Label of the axis of the groups (``None``: no label).
    """

    def __init__(
        self,
        *args: Any,
        blocks: Sequence[tuple[str, int, int]],
        group_label: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.blocks = list(blocks)
        self.group_label = group_label
        # scanpy turns every group label by 90 degrees once one is over 4 characters, and the
        # turned labels run into the title: keep them level wherever each fits its block
        # (otherwise make_figure lifts the title above them).
        inches_per_char = CHAR_EM * rcParams["font.size"] / 72
        if self.blocks and all(
            len(group) * inches_per_char <= (stop - start) * self.DEFAULT_CATEGORY_WIDTH
            for group, start, stop in self.blocks
        ):
            self.var_group_rotation = 0

    def make_figure(self) -> None:
        """Draw as scanpy does, then lift the title clear of the group labels."""
        super().make_figure()
        groups_ax = self.ax_dict.get("gene_group_ax")
        if groups_ax is None or not self.fig_title:
            return
        renderer = self.fig.canvas.get_renderer()
        top = max((t.get_window_extent(renderer).y1 for t in groups_ax.texts), default=None)
        for ax in self.fig.axes:
            title = ax.title
            if top is None or title.get_text() != self.fig_title:
                continue
            overlap = top - title.get_window_extent(renderer).y0
            if overlap > 0:  # pixels -> points, plus a small gap
                pad = rcParams["axes.titlepad"] + (overlap * 72 / self.fig.dpi) + 4
                ax.set_title(self.fig_title, pad=pad)

    def _mainplot(self, ax: Axes) -> Any:
        normalize = super()._mainplot(ax)
        rows = [str(r) for r in (self.categories_order or self.dot_color_df.index)]
        if self.var_names_idx_order is None:  # columns in block order
            for group, start, stop in self.blocks:
                if group not in rows:
                    continue
                row = rows.index(group)
                # dots sit at (column + 0.5, row + 0.5); swapped axes put the groups on x
                xy, width, height = (start, row), stop - start, 1.0
                if self.are_axes_swapped:
                    xy, width, height = (row, start), 1.0, stop - start
                ax.add_patch(
                    Rectangle(xy, width, height, facecolor=SHADE, edgecolor="none", zorder=0)
                )
        if self.group_label is not None:
            (ax.set_xlabel if self.are_axes_swapped else ax.set_ylabel)(self.group_label)
        return normalize
