"""Model-level code shared by the four methods."""

from ._annotation_mixin import AnnotationMixin
from ._mapping import ReferenceMappingMixin
from ._module import AnnotationModule
from ._query import fingerprint, prepare_query, register_for_one_call
from ._rejection import fit_temperature, per_type_thresholds
from ._save_load import read_saved_files
from ._setup import register_anndata

__all__ = [
    "AnnotationMixin",
    "AnnotationModule",
    "ReferenceMappingMixin",
    "fingerprint",
    "fit_temperature",
    "per_type_thresholds",
    "prepare_query",
    "read_saved_files",
    "register_anndata",
    "register_for_one_call",
]
