"""Plots of an annotation (matplotlib only).

Confusion matrix, reliability diagram, sankey, confidence on an embedding and a dot plot of
the marker genes.
"""

from ._confusion import confusion
from ._dotplot import marker_dotplot
from ._embedding import embedding_confidence
from ._reliability import reliability
from ._sankey import sankey

__all__ = ["confusion", "embedding_confidence", "marker_dotplot", "reliability", "sankey"]
