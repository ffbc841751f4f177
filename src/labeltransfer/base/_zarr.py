"""Queries stored as zarr (``AnnData.write_zarr``): read lazily, results written in place.

:func:`open_zarr` gives an AnnData whose ``obs`` and ``var`` are in memory and whose ``X``
(and layers) stay on disk as anndata's lazy sparse datasets (or zarr arrays when dense): a
model reads it :data:`~labeltransfer.base._inference.BACKED_CHUNK_SIZE` cells at a
time, as an h5ad opened in backed mode. :func:`write_annotation` then writes ``obs``, the new
``obsm`` entries and ``uns[key]`` into the store without touching ``X``, all or nothing: the
new elements are written to a staging folder next to the store and swapped in only once all
of them are written; any failure puts back what was there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
from anndata import AnnData
from scvi import settings

__all__ = ["is_lazy", "is_zarr_path", "open_zarr", "write_annotation"]


def is_zarr_path(value: Any) -> bool:
    """Whether ``value`` is a path (``str`` or path-like) rather than an in-memory object."""
    return isinstance(value, str | os.PathLike)


def _open_group(path: str | os.PathLike[str], mode: str):
    import zarr

    if not Path(path).exists():
        raise FileNotFoundError(
            f"No zarr store at {os.fspath(path)!r}. Write the query with "
            "`adata.write_zarr(path)` or pass an AnnData."
        )
    try:
        # consolidated metadata would hide the entries written here: read the plain metadata
        group = zarr.open_group(path, mode=mode, use_consolidated=False)
    except Exception as err:  # zarr raises several types for a folder that is not a store
        raise ValueError(
            f"{os.fspath(path)!r} is not a zarr store written by `AnnData.write_zarr` ({err}). "
            "Pass an AnnData, or an h5ad read with `anndata.read_h5ad(path, backed='r+')`."
        ) from err
    missing = [k for k in ("X", "obs", "var") if k not in group]
    if missing:
        raise ValueError(
            f"The zarr store {os.fspath(path)!r} has no {missing}: it was not written by "
            "`AnnData.write_zarr`."
        )
    return group


def _lazy_matrix(element):
    """Return a lazy row-sliceable view of a stored matrix (sparse dataset or zarr array)."""
    from anndata.io import sparse_dataset

    encoding = element.attrs.get("encoding-type")
    if encoding in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(element)
    if encoding in ("array", None) and hasattr(element, "shape"):
        return element
    raise ValueError(
        f"Cannot read a matrix stored with encoding {encoding!r} in chunks; store X as a CSR "
        "or dense array."
    )


def open_zarr(path: str | os.PathLike[str]) -> AnnData:
    """Open a zarr AnnData store with ``obs``/``var`` in memory and ``X``/layers on disk.

    Parameters
    ----------
    path
        Folder written by :meth:`anndata.AnnData.write_zarr`.

    Returns
    -------
    An AnnData whose ``X`` and ``layers`` are lazy (read when sliced); ``obsm``, ``uns`` and
    the rest of the store are not loaded.
    """
    from anndata.io import read_elem

    group = _open_group(path, mode="r")
    layers = {}
    if "layers" in group:
        layers = {name: _lazy_matrix(group["layers"][name]) for name in group["layers"]}
    return AnnData(
        X=_lazy_matrix(group["X"]),
        obs=read_elem(group["obs"]),
        var=read_elem(group["var"]),
        layers=layers,
    )


def is_lazy(adata: AnnData) -> bool:
    """Whether ``adata``'s expression is on disk (backed h5ad or a store from :func:`open_zarr`)."""
    if adata.isbacked:
        return True
    from anndata.abc import CSCDataset, CSRDataset

    return adata.X is not None and (
        isinstance(adata.X, CSRDataset | CSCDataset) or type(adata.X).__module__.startswith("zarr")
    )


def storable_obsm(value: Any, name: str, key: str) -> Any:
    """Return ``value`` in a form a zarr store can hold.

    zarr refuses ``"/"`` in a node name, and anndata stores each column of a DataFrame as a
    node named after the column: a DataFrame with such column names (cell types like
    ``"CD4+/CD25 T Reg"``) is stored as a plain array instead, with a warning saying where
    the column names are.
    """
    if not isinstance(value, pd.DataFrame):
        return value
    slashed = [str(c) for c in value.columns if "/" in str(c)]
    if not slashed:
        return value
    warnings.warn(
        f"Type names with '/' ({slashed[:3]}) cannot be column names in a zarr store, so "
        f"obsm[{name!r}] is stored there as an array; its columns are uns[{key!r}]['classes'], "
        "in that order.",
        UserWarning,
        stacklevel=settings.warnings_stacklevel,
    )
    return value.to_numpy()


#: Root files holding the store's own (and consolidated) metadata: zarr v2 and v3.
_ROOT_METADATA = (".zmetadata", ".zattrs", ".zgroup", "zarr.json")


def write_annotation(
    path: str | os.PathLike[str], adata: AnnData, key: str, obsm_keys: list[str]
) -> None:
    """Write ``adata.obs``, ``adata.obsm[obsm_keys]`` and ``adata.uns[key]`` into a zarr store.

    ``X`` and the other entries of the store are left as they are; the store's consolidated
    metadata is rebuilt so that :func:`anndata.read_zarr` sees the new entries. The write is
    all or nothing: everything is first written to a staging folder next to the store, then
    each element is swapped in by a rename; if anything fails, the renamed elements and the
    root metadata are put back, so the store is left exactly as it was.
    """
    import zarr
    from anndata.io import write_elem

    root = Path(path)
    group = _open_group(path, mode="r+")
    obsm = {name: storable_obsm(adata.obsm[name], name, key) for name in obsm_keys}
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.labeltransfer-", dir=root.parent))
    except OSError as err:
        raise OSError(
            f"Cannot create a staging folder in {os.fspath(root.parent)!r} ({err}): the "
            "annotation is written there first, so that a failure leaves the store unchanged. "
            "Make that folder writable, or read the store with `anndata.read_zarr` and "
            "annotate the AnnData."
        ) from err
    try:
        staged = zarr.open_group(staging / "new", mode="w", zarr_format=group.metadata.zarr_format)
        write_elem(staged, "obs", adata.obs)
        write_elem(staged, "obsm", obsm)
        write_elem(staged, "uns", {key: adata.uns[key]})
        moves = ["obs"]
        for parent, names in (("obsm", list(obsm)), ("uns", [key])):
            moves += [f"{parent}/{n}" for n in names] if parent in group else [parent]
        _swap_in(root, staging, moves)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(root: Path, staging: Path, moves: list[str]) -> None:
    """Rename ``staging/new/<m>`` to ``root/<m>`` for each ``m``, then consolidate; or undo."""
    import zarr

    old = staging / "old"
    (old / "root").mkdir(parents=True)
    for name in _ROOT_METADATA:
        if (root / name).exists():
            shutil.copy2(root / name, old / "root" / name)
    done: list[tuple[Path, Path]] = []
    try:
        for i, relative in enumerate(moves):
            target, aside = root / relative, old / str(i)
            if target.exists():
                os.replace(target, aside)
            done.append((target, aside))
            os.replace(staging / "new" / relative, target)
        zarr.consolidate_metadata(os.fspath(root))
    except BaseException:
        for target, aside in reversed(done):
            if target.exists():
                shutil.rmtree(target)
            if aside.exists():
                os.replace(aside, target)
        for name in _ROOT_METADATA:
            saved = old / "root" / name
            if saved.exists():
                os.replace(saved, root / name)
            elif (root / name).exists():  # created by the failed consolidation
                (root / name).unlink()
        raise
