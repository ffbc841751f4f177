"""Training plans, callbacks and runners shared by the models."""

from ._callbacks import BestStateCallback
from ._runner import fit_stage, record_stage_history
from ._trainingplan import AnnotationTrainingPlan

__all__ = ["AnnotationTrainingPlan", "BestStateCallback", "fit_stage", "record_stage_history"]
