"""Queries stored as zarr (``AnnData.write_zarr``): read lazily, results written in place.

:func:`open_zarr` gives an AnnData whose ``obs`` and ``var`` are in memory and whose ``X``
(and layers) stay on disk as anndata's lazy sparse datasets (or zarr arrays when dense): a
model reads it :data:`~labeltransfer.base._annotation_mixin.BACKED_CHUNK_SIZE` cells at a
time, as an h5ad opened in backed mode. :func:`write_annotation` then writes ``obs``, the new
``obsm`` entries and ``uns[key]`` into the store without touching ``X``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anndata import AnnData

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


def write_annotation(
    path: str | os.PathLike[str], adata: AnnData, key: str, obsm_keys: list[str]
) -> None:
    """Write ``adata.obs``, ``adata.obsm[obsm_keys]`` and ``adata.uns[key]`` into a zarr store.

    ``X`` and the other entries of the store are left as they are; the store's consolidated
    metadata, if any, is rebuilt so that :func:`anndata.read_zarr` sees the new entries.
    """
    import zarr
    from anndata.io import write_elem

    group = _open_group(path, mode="r+")
    write_elem(group, "obs", adata.obs)
    obsm = group["obsm"] if "obsm" in group else group.create_group("obsm")
    for name in obsm_keys:
        write_elem(obsm, name, adata.obsm[name])
    uns = group["uns"] if "uns" in group else group.create_group("uns")
    write_elem(uns, key, adata.uns[key])
    zarr.consolidate_metadata(os.fspath(path))
