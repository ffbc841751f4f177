"""Fail the docs build when a public name is missing from ``api.md``.

Every name in the ``__all__`` of the top-level package and of its public subpackages must be
listed in an ``autosummary`` directive of ``docs/api.md`` (as ``name``, ``module.name`` or
``labeltransfer.module.name``). A missing name is reported as a Sphinx warning, which
``sphinx-build -W`` turns into an error, so new public API cannot go undocumented.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)

PACKAGE = "labeltransfer"
SUBPACKAGES = ("base", "data", "dataloaders", "jind", "metrics", "nn", "pl", "train")


def _documented(api: str) -> set[str]:
    """Fully qualified names listed in the autosummary blocks of ``api``."""
    names: set[str] = set()
    module = PACKAGE
    in_block = False
    for line in api.splitlines():
        stripped = line.strip()
        match = re.match(r"\.\. currentmodule::\s*(\S+)", stripped) or re.match(
            r"```\{currentmodule\}\s*(\S+)", stripped
        )
        if match:
            module = match.group(1)
            continue
        if stripped.startswith(("```{autosummary}", ".. autosummary::")):
            in_block = True
            continue
        if in_block and stripped.startswith("```"):
            in_block = False
            continue
        if in_block and stripped and not stripped.startswith((":", "..")):
            name = stripped
            full = name if name.startswith(PACKAGE + ".") else f"{module}.{name}"
            names.add(full)
    return names


def _public() -> dict[str, str]:
    """Fully qualified public name -> the ``__all__`` it comes from."""
    public: dict[str, str] = {}
    top = importlib.import_module(PACKAGE)
    for name in getattr(top, "__all__", []):
        obj = getattr(top, name)
        if getattr(obj, "__name__", "").startswith(PACKAGE + ".") and isinstance(obj, type(top)):
            continue  # a subpackage: its own names are checked below
        public[f"{PACKAGE}.{name}"] = f"{PACKAGE}.__all__"
    for sub in SUBPACKAGES:
        module = importlib.import_module(f"{PACKAGE}.{sub}")
        for name in getattr(module, "__all__", []):
            public[f"{PACKAGE}.{sub}.{name}"] = f"{PACKAGE}.{sub}.__all__"
    return public


def check_api(app) -> None:
    """Warn about public names that ``api.md`` does not list."""
    api = Path(app.srcdir, "api.md").read_text()
    documented = _documented(api)
    # The top-level re-exports (lt.JIND) may be documented under their subpackage (lt.jind.JIND).
    top = importlib.import_module(PACKAGE)
    for full, origin in sorted(_public().items()):
        if full in documented:
            continue
        obj_name = full.rsplit(".", 1)[1]
        obj = getattr(top, obj_name, None)
        if origin == f"{PACKAGE}.__all__" and obj is not None:
            alias = f"{obj.__module__.rsplit('.', 1)[0]}.{obj_name}"
            if alias in documented:
                continue
        # ... and a subpackage's name re-exported at the top (lt.jind.JIND) under lt.JIND.
        sub_obj = getattr(importlib.import_module(full.rsplit(".", 1)[0]), obj_name, None)
        if sub_obj is not None and obj is sub_obj and f"{PACKAGE}.{obj_name}" in documented:
            continue
        logger.warning(
            "%s (in %s) is not listed in docs/api.md; add it to an autosummary block.",
            full,
            origin,
        )


def setup(app):
    """Register the check."""
    app.connect("builder-inited", check_api)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
