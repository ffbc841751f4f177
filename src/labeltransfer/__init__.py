"""Cell-type label transfer from an annotated reference to a query.

The models (:class:`JIND`) and the submodules are imported on first access:
``labeltransfer.data``, ``labeltransfer.metrics``, ``labeltransfer.pl`` and
``labeltransfer.tl`` load without torch and scvi-tools, and the command line
(``labeltransfer.cli``) starts without any of them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import data, metrics, pl, tl
    from .cellpredx import CellPredX
    from .jind import JIND
    from .scdet import SCDET
    from .scnym import SCNYM

__all__ = ["CellPredX", "JIND", "SCDET", "SCNYM", "data", "metrics", "pl", "tl"]

__version__ = version("labeltransfer")

_LAZY = {"JIND": ".jind", "SCNYM": ".scnym", "SCDET": ".scdet", "CellPredX": ".cellpredx"}
_SUBMODULES = ("data", "metrics", "pl", "tl")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'labeltransfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})
