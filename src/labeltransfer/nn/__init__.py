"""Layers and losses shared by the models."""

from ._mlp import mlp
from ._preprocess import normalize_input
from ._utils import frozen

__all__ = ["frozen", "mlp", "normalize_input"]
