"""scDET: distribution-independent, open-world cell-type identification (Zhai, Chen & Deng)."""

from ._callbacks import DistributionEstimation
from ._estimation import estimate_distribution, estimate_n_novel, match_clusters
from ._losses import (
    SCDETLossConfig,
    contrastive_loss,
    logit_adjust,
    sample_pseudo_labels,
    sampling_rates,
    soft_contrastive_loss,
)
from ._model import SCDET
from ._module import SCDETModule
from ._trainingplan import SCDETTrainingPlan

__all__ = [
    "SCDET",
    "DistributionEstimation",
    "SCDETLossConfig",
    "SCDETModule",
    "SCDETTrainingPlan",
    "contrastive_loss",
    "estimate_distribution",
    "estimate_n_novel",
    "logit_adjust",
    "match_clusters",
    "sample_pseudo_labels",
    "sampling_rates",
    "soft_contrastive_loss",
]
