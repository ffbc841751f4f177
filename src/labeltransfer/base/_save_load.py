"""Saving and loading a model.

Saves are atomic and never delete a user's file; loads work with or without data.

A damaged ``model.pt`` is named, not passed on as torch's unpickling error, and a local load
does not log scvi's ``File ... already downloaded`` lines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi import settings
from scvi.model.base._save_load import _load_saved_files

from labeltransfer._constants import LOADED_WITHOUT_DATA_KEY, REGISTRY_KEYS
from labeltransfer._model_folder import check_save_target, model_files, save_atomically

if TYPE_CHECKING:
    from collections.abc import Iterator


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
            reason = " ".join(str(err).split())  # torch's messages span several lines
            raise ValueError(
                f"{model_file!r} is damaged and cannot be read ({type(err).__name__}: {reason}). "
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


#: Error of a call that needs the model's data (``adata=None``) on a model loaded without it.
NO_DATA_MESSAGE = (
    "This model was loaded without data: pass the query, e.g. `model.annotate(query)` or "
    "`model.predict(query)`. To use the reference itself, load the model with it: "
    "`{cls}.load(dir_path, adata=reference)`."
)


class SaveLoadMixin:
    """Save atomically without touching a user's files; load with or without data."""

    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model atomically (written to a temporary folder, then renamed).

        Saving never deletes a file it did not write: ``dir_path`` must be new, an empty
        folder, or (with ``overwrite=True``) a folder holding only a saved model's own files
        (``model.pt`` and ``adata.h5ad``/``mdata.h5mu``). A failure while writing leaves no
        partial folder, and a replaced model is kept until the new one is complete.

        Parameters
        ----------
        dir_path
            Folder to create (or an empty folder, or a saved model to replace).
        prefix
            Prefix of the file names.
        overwrite
            Replace a model saved in ``dir_path`` before.
        save_anndata
            Also save the registered AnnData.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.

        Raises
        ------
        ValueError
            If ``dir_path`` is a file, a folder holding other files than a saved model's, or
            a saved model and ``overwrite`` is ``False``.
        """
        if save_anndata and self.adata is None:
            raise ValueError(
                "This model was loaded without data, so save_anndata=True has no AnnData to "
                "save. Save without it, or load the model with its reference "
                f"(`{type(self).__name__}.load(dir_path, adata=reference)`) first."
            )
        dir_path = os.path.realpath(dir_path)
        check_save_target(dir_path, prefix, overwrite)
        self.package_version_ = version("labeltransfer")
        write = super().save
        save_atomically(
            dir_path,
            lambda folder: write(
                folder,
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                **anndata_write_kwargs,
            ),
        )

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> Self:
        """Load a saved model, with or without its reference data.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData with exactly the model's genes to register, or ``None``: the model is
            then restored with the AnnData saved with it (``save_anndata=True``) or, as
            scvi-tools does, without data: ``model.adata`` is ``None``, queries passed to
            :meth:`annotate`/:meth:`predict` are mapped, and calls that need the model's
            own data (``adata=None``, ``train``, ``save(save_anndata=True)``) raise.
            ``model.adata = reference`` attaches data later.
        accelerator
            Accelerator to load onto (``"auto"``, ``"cpu"``, ``"gpu"``).
        device
            Device index or ``"auto"``.
        prefix
            Prefix of the file names.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Returns
        -------
        The trained model.

        Raises
        ------
        FileNotFoundError
            If ``dir_path`` holds no ``model.pt``.
        ValueError
            If ``model.pt`` is damaged (truncated, empty, not a model file), or holds a model
            of another class.
        """
        attr_dict, var_names, saved = read_saved_files(dir_path, prefix, load_adata=adata is None)
        saved_cls = attr_dict.get("registry_", {}).get("model_name")
        if saved_cls is not None and saved_cls != cls.__name__:
            raise ValueError(
                f"{str(dir_path)!r} holds a {saved_cls} model, not a {cls.__name__} one; load "
                f"it with `lt.{saved_cls}.load(...)`."
            )
        saved_version = attr_dict.get("package_version_")
        current = version("labeltransfer")
        if saved_version is not None and saved_version != current:
            warnings.warn(
                f"This model was saved with labeltransfer {saved_version} and is loaded with "
                f"{current}. Check the changelog; if loading fails, install {saved_version}.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
        placeholder = None
        if adata is None:
            if saved is None:
                saved = placeholder = _placeholder_adata(attr_dict["registry_"], var_names)
            adata = saved
        elif list(adata.var_names) != list(var_names):
            raise ValueError(
                "The AnnData passed to load() does not have the model's genes in the model's "
                "order. Load without data (`Model.load(dir_path)`) and pass the query to "
                "`annotate`/`predict`, which reindex and zero-fill genes."
            )
        try:
            with warnings.catch_warnings(), quiet_local_load():
                # the placeholder has one cell per type by construction
                warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
                model = super().load(
                    dir_path,
                    adata=adata,
                    accelerator=accelerator,
                    device=device,
                    prefix=prefix,
                    **kwargs,
                )
        except Exception as err:
            if saved_version is None or saved_version == current:
                raise
            raise RuntimeError(
                f"Loading this model, saved with labeltransfer {saved_version}, failed with "
                f"labeltransfer {current} ({type(err).__name__}: {err}). Install the version "
                f"that saved it (`pip install labeltransfer=={saved_version}`), or train and "
                "save the model again with this one."
            ) from err
        if placeholder is not None:
            # the placeholder only carries the registry (kept by model.adata_manager, which
            # maps queries): it leaves scvi's stores, and model.adata is None as after
            # scvi's own load without data
            model.deregister_manager(placeholder)
            model._adata = None
        return model


def _placeholder_adata(registry: dict, var_names: np.ndarray) -> AnnData:
    """One empty cell per reference type, so a saved model can be rebuilt without data.

    The models' ``__init__`` need an AnnData; :meth:`SaveLoadMixin.load` detaches this one
    from the model once built (``model.adata`` is ``None``).
    """
    args = registry["setup_args"]
    labels_state = registry["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
    mapping = [str(c) for c in labels_state["categorical_mapping"]]
    obs = pd.DataFrame(index=[f"placeholder_{i}" for i in range(len(mapping))])
    obs[args["labels_key"]] = mapping
    if args.get("batch_key") is not None:
        batch_state = registry["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        obs[args["batch_key"]] = str(batch_state["categorical_mapping"][0])
    # dense zeros: scvi takes an all-zero *sparse* X for "minified" data and refuses it
    matrix = np.zeros((len(mapping), len(var_names)), dtype=np.float32)
    adata = AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
    adata.uns[LOADED_WITHOUT_DATA_KEY] = True
    if args.get("layer") is not None:
        adata.layers[args["layer"]] = matrix
    return adata
