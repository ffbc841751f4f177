"""Metrics of a label transfer: accuracy and rejection, calibration, open-set detection.

Everything here takes plain arrays (or, for :func:`annotation_report`, an AnnData annotated by
``model.annotate(adata, key_added=key)``) and imports nothing else from the package.
"""

from ._calibration import (
    brier_score,
    ece_noise_floor,
    expected_calibration_error,
    overconfidence_error,
    reliability_table,
)
from ._classification import (
    cohen_kappa,
    effective_accuracy,
    macro_f1,
    per_type_table,
    raw_accuracy,
    rejection_rate,
)
from ._kghr import kghr
from ._openset import hungarian_match, novel_auroc, open_world_report, oscr
from ._report import annotation_report, format_report

__all__ = [
    "annotation_report",
    "brier_score",
    "cohen_kappa",
    "ece_noise_floor",
    "effective_accuracy",
    "expected_calibration_error",
    "format_report",
    "hungarian_match",
    "kghr",
    "macro_f1",
    "novel_auroc",
    "open_world_report",
    "oscr",
    "overconfidence_error",
    "per_type_table",
    "raw_accuracy",
    "rejection_rate",
    "reliability_table",
]
