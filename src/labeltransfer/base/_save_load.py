"""Reading a saved model folder.

A damaged ``model.pt`` is named, not passed on as torch's unpickling error, and a local load
does not log scvi's ``File ... already downloaded`` lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

from scvi.model.base._save_load import _load_saved_files

from labeltransfer._model_folder import model_files

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from anndata import AnnData


class _DropAlreadyDownloaded(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "already downloaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_local_load() -> Iterator[None]:
    """Silence scvi's ``File ... already downloaded`` line, meaningless for a local folder."""
    download_logger = logging.getLogger("scvi.data._download")
    drop = _DropAlreadyDownloaded()
    download_logger.addFilter(drop)
    try:
        yield
    finally:
        download_logger.removeFilter(drop)


def read_saved_files(
    dir_path: str, prefix: str | None, load_adata: bool = False
) -> tuple[dict[str, Any], np.ndarray, AnnData | None]:
    """Read a saved model's attributes, genes and (``load_adata``) saved AnnData.

    Raises
    ------
    FileNotFoundError
        If ``dir_path`` holds no ``{prefix}model.pt``.
    ValueError
        If ``model.pt`` is damaged (truncated, empty, not a model file): it names the file
        and says to copy or save it again.
    """
    model_file = os.path.join(dir_path, model_files(prefix)[0])
    if not os.path.isfile(model_file):
        raise FileNotFoundError(
            f"{str(dir_path)!r} is not a saved model: {model_file!r} does not exist. Pass "
            "the folder written by `model.save(...)` (and its `prefix=`, if one was used)."
        )
    with quiet_local_load():
        try:
            attr_dict, var_names, _, _ = _load_saved_files(
                dir_path, load_adata=False, prefix=prefix, map_location="cpu"
            )
            if not isinstance(attr_dict, dict) or "registry_" not in attr_dict:
                raise TypeError("the file holds no model attributes and registry")
        except (MemoryError, OSError):
            raise
        except Exception as err:  # torch/pickle raise EOFError, RuntimeError, UnpicklingError...
            raise ValueError(
                f"{model_file!r} is damaged and cannot be read ({type(err).__name__}: {err}). "
                "It was probably cut short by an interrupted copy, download or save: copy the "
                "model folder again, or train the model and save it again with "
                "`model.save(...)`."
            ) from err
        saved = None
        if load_adata:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Save path contains no saved anndata")
                saved = _load_saved_files(
                    dir_path, load_adata=True, prefix=prefix, map_location="cpu"
                )[3]
    return attr_dict, var_names, None if saved is False else saved
