"""Plots of an annotation: confusion matrix, reliability diagram, sankey (matplotlib only)."""

from ._confusion import confusion
from ._reliability import reliability
from ._sankey import sankey

__all__ = ["confusion", "reliability", "sankey"]
