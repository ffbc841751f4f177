"""Where a model is saved: a new, empty or saved-model folder, written atomically.

Saving never deletes a user's file: it writes into a new or empty folder, or replaces a
folder that holds nothing but a saved model's own files. Only the standard library is used, so
the command line checks its ``--save-model`` folder before importing torch.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

#: The files ``BaseModelClass.save`` writes: the model, and the data with ``save_anndata``.
_MODEL_FILES = ("model.pt", "adata.h5ad", "mdata.h5mu")


def model_files(prefix: str | None) -> tuple[str, ...]:
    """Names of the files a saved model with ``prefix`` consists of."""
    return tuple(f"{prefix or ''}{name}" for name in _MODEL_FILES)


def _listing(dir_path: str, names: list[str], shown: int = 5) -> str:
    """``'a.ipynb', 'data/'`` and how many more: what a folder holds, for a message."""
    marked = [f"'{n}/'" if os.path.isdir(os.path.join(dir_path, n)) else f"'{n}'" for n in names]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(marked[:shown]) + more


def check_save_target(dir_path: str, prefix: str | None, overwrite: bool) -> None:
    """Refuse a save that would replace anything but a saved model's own files.

    Parameters
    ----------
    dir_path
        Folder the model is to be saved to.
    prefix
        Prefix of the model's file names.
    overwrite
        Whether a saved model in ``dir_path`` may be replaced.

    Raises
    ------
    ValueError
        If ``dir_path`` is a file, a folder holding anything but a saved model's files, or a
        saved model and ``overwrite`` is ``False``.
    """
    if not os.path.lexists(dir_path):
        return
    if not os.path.isdir(dir_path):
        raise ValueError(
            f"{dir_path} is a file, not a folder: a model is saved as a folder of files "
            f"({model_files(prefix)[0]}, ...) and saving never replaces a file. Pass the path "
            "of a new or empty folder."
        )
    content = sorted(os.listdir(dir_path))
    if not content:
        return
    own = model_files(prefix)
    others = [n for n in content if n not in own or not os.path.isfile(os.path.join(dir_path, n))]
    if others or own[0] not in content:
        raise ValueError(
            f"{dir_path} is not empty and is not a saved model: it contains "
            f"{_listing(dir_path, others or content)}. Saving replaces only a saved model's own "
            f"files ({', '.join(own)}) and never deletes other files: pass a new or empty "
            f"folder, e.g. {os.path.join(dir_path, 'model')}."
        )
    if not overwrite:
        raise ValueError(
            f"{dir_path} already exists and holds a saved model. Pass overwrite=True to "
            "replace it, or choose another folder."
        )


def save_atomically(dir_path: str, write: Callable[[str], None]) -> None:
    """Call ``write(folder)`` on a temporary folder, then move it to ``dir_path``.

    The temporary folder lies next to ``dir_path`` (same file system, so the moves are
    renames). A failure while writing leaves no partial folder; a folder already at
    ``dir_path`` (checked by :func:`check_save_target` to hold only a saved model) is moved
    aside, not deleted, until the new one is in place, and moved back if that fails.
    """
    parent = os.path.dirname(dir_path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=parent)
    try:
        new, old = os.path.join(tmp, "model"), os.path.join(tmp, "old")
        write(new)
        if os.path.exists(dir_path):
            os.replace(dir_path, old)
        try:
            os.replace(new, dir_path)
        except BaseException:
            if os.path.exists(old):
                os.replace(old, dir_path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
