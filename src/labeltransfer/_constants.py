"""Registry keys and output-field names shared by every model of the package."""

from __future__ import annotations

from typing import NamedTuple


class _REGISTRY_KEYS_NT(NamedTuple):
    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    BATCH_KEY: str = "batch"
    INDICES_KEY: str = "ind_x"


class _OUTPUT_KEYS_NT(NamedTuple):
    """Suffixes of the fields written by ``annotate(adata, key_added=K)``."""

    PREDICTION: str = "_prediction"
    CONFIDENCE: str = "_confidence"
    REJECTED: str = "_rejected"
    NOVELTY: str = "_novelty"
    PROBABILITIES: str = "_probabilities"
    EMBEDDING_PREFIX: str = "X_"


REGISTRY_KEYS = _REGISTRY_KEYS_NT()
OUTPUT_KEYS = _OUTPUT_KEYS_NT()

#: Label written to ``obs[K]`` for cells that the rejection rule rejects.
UNASSIGNED = "Unassigned"
#: Prefix of the names of novel groups found by discovery (``novel_0``, ``novel_1``, ...).
NOVEL_PREFIX = "novel_"

#: ``uns`` flag of the AnnData a model loaded without data is built on: scvi builds a model
#: on an AnnData, so ``load(dir_path)`` builds it on one empty cell per type, which carries
#: only the registry and is never the model's ``adata``; training refuses it.
LOADED_WITHOUT_DATA_KEY = "_lt_loaded_without_data"

#: ``uns`` key under which scvi-tools stores the id of an AnnData set up with a model (copied
#: with the AnnData, so a copy or view of it carries the same id).
SCVI_UUID_KEY = "_scvi_uuid"
