"""Make nested metadata writable to h5ad."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def h5ad_safe(value: Any) -> Any:
    """Convert ``value`` into types that :func:`anndata.AnnData.write_h5ad` accepts.

    ``None`` becomes the string ``"None"``, tuples become lists, numpy scalars become Python
    scalars, and mappings are converted recursively with string keys.
    """
    if value is None:
        return "None"
    if isinstance(value, Mapping):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        converted = [h5ad_safe(v) for v in value]
        if all(isinstance(v, str) for v in converted) or all(
            isinstance(v, int | float | bool) for v in converted
        ):
            return np.asarray(converted) if converted else np.asarray([], dtype=str)
        return {str(i): v for i, v in enumerate(converted)}
    if isinstance(value, np.generic):
        return value.item()
    return value
