"""Layers and losses shared by the models."""

from ._augment import GeneMasking, mask_genes
from ._grl import GradientReversal, GradientReversalFunction, grad_reverse
from ._losses import labelled_cross_entropy
from ._mixmatch import mixup, mixup_weights, sharpen, sigmoid_ramp
from ._mlp import mlp
from ._preprocess import normalize_input
from ._utils import frozen

__all__ = [
    "GeneMasking",
    "GradientReversal",
    "GradientReversalFunction",
    "frozen",
    "grad_reverse",
    "labelled_cross_entropy",
    "mask_genes",
    "mixup",
    "mixup_weights",
    "mlp",
    "normalize_input",
    "sharpen",
    "sigmoid_ramp",
]
