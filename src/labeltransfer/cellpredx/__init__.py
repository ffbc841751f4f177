"""CellPredX: cross-modality label transfer with domain adaptation and metric learning (Liu et al., 2025)."""

from ._data import CellPredXDataSplitter, NeighbourQueryLoader, query_knn_graph
from ._losses import (
    CellPredXLossConfig,
    feature_alignment_loss,
    knn_contrastive_loss,
    projection_regularization,
    pseudo_label_selection,
    sparse_center_loss,
)
from ._model import PRESETS, CellPredX
from ._module import AttentionNetwork, CellPredXModule
from ._trainingplan import CellPredXTrainingPlan

__all__ = [
    "PRESETS",
    "AttentionNetwork",
    "CellPredX",
    "CellPredXDataSplitter",
    "CellPredXLossConfig",
    "CellPredXModule",
    "CellPredXTrainingPlan",
    "NeighbourQueryLoader",
    "feature_alignment_loss",
    "knn_contrastive_loss",
    "projection_regularization",
    "pseudo_label_selection",
    "query_knn_graph",
    "sparse_center_loss",
]
