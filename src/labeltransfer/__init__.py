"""Cell-type label transfer from an annotated reference to a query.

The models (:class:`JIND`) are imported on first access, so ``labeltransfer.data``,
``labeltransfer.metrics``, ``labeltransfer.pl`` and ``labeltransfer.tl`` load without torch
and scvi-tools.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from . import data, metrics, pl, tl

if TYPE_CHECKING:
    from .cellpredx import CellPredX
    from .jind import JIND
    from .scdet import SCDET
    from .scnym import SCNYM

__all__ = ["CellPredX", "JIND", "SCDET", "SCNYM", "data", "metrics", "pl", "tl"]

__version__ = version("labeltransfer")

_LAZY = {"JIND": ".jind", "SCNYM": ".scnym", "SCDET": ".scdet", "CellPredX": ".cellpredx"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'labeltransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
