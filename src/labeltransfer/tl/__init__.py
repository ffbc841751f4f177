"""Tools on a trained model or an annotated query: saliency, new-identity discovery, embeddings.

Importing this module does not import torch or scvi-tools; the functions that need them
import them when called.
"""

from ._determinant import determinant_genes
from ._discover import discover_novel
from ._embedding import embedding
from ._interpret import integrated_gradients, marker_genes

__all__ = [
    "determinant_genes",
    "discover_novel",
    "embedding",
    "integrated_gradients",
    "marker_genes",
]
