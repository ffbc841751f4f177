"""scNym: semi-supervised adversarial neural networks (Kimmel & Kelley, 2021)."""

from ._model import SCNYM
from ._module import SCNYMModule
from ._trainingplan import SCNYMTrainingPlan

__all__ = ["SCNYM", "SCNYMModule", "SCNYMTrainingPlan"]
