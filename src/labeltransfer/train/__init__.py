"""Training plans, callbacks and runners shared by the models."""

from ._callbacks import BestStateCallback
from ._query_plan import QueryAdaptationPlan
from ._runner import fit_stage, record_stage_history
from ._trainingplan import AnnotationTrainingPlan

__all__ = [
    "AnnotationTrainingPlan",
    "BestStateCallback",
    "QueryAdaptationPlan",
    "fit_stage",
    "record_stage_history",
]
