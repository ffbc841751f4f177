"""scanpy's :class:`~scanpy.pl.DotPlot` with each marker group's own block shaded.

Imported by :func:`labeltransfer.pl.marker_dotplot` when called (scanpy is not imported with
``labeltransfer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matplotlib.patches import Rectangle
from scanpy.pl import DotPlot

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes

__all__ = ["MarkerDotPlot"]

#: Fill of the cells where a marker group's row meets its own block of genes.
SHADE = "#ededed"
#: Approximate width of one character of a group label, in inches (matplotlib's 10 pt).
CHAR_WIDTH = 0.075


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
        # scanpy turns every group label by 90 degrees once one is over 12 characters; the
        # turned labels then run into the title. Keep them level wherever each fits its block.
        if self.blocks and all(
            len(group) * CHAR_WIDTH <= (stop - start) * self.DEFAULT_CATEGORY_WIDTH
            for group, start, stop in self.blocks
        ):
            self.var_group_rotation = 0

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
