"""JIND: joint integration and discrimination (Goyal et al., 2022)."""

from ._model import JIND
from ._module import JINDGenerator, JINDModule
from ._trainingplan import JINDAlignmentPlan

__all__ = ["JIND", "JINDAlignmentPlan", "JINDGenerator", "JINDModule"]
