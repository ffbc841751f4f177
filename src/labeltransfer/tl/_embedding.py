"""Neighbour graph and UMAP of a model's embedding, under keys of their own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from labeltransfer._constants import OUTPUT_KEYS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anndata import AnnData

__all__ = ["embedding"]


def embedding_keys(key: str) -> dict[str, str]:
    """Names of the fields :func:`embedding` writes for the annotation ``key``.

    ``"embedding"`` (read), ``"umap"`` (``obsm`` and ``uns``), ``"neighbors"`` (``uns``),
    ``"distances"`` and ``"connectivities"`` (``obsp``).
    """
    rep = f"{OUTPUT_KEYS.EMBEDDING_PREFIX}{key}"
    return {
        "embedding": rep,
        "umap": f"{rep}_umap",
        "neighbors": f"{key}_neighbors",
        "distances": f"{key}_neighbors_distances",
        "connectivities": f"{key}_neighbors_connectivities",
    }


def _checked_embedding(adata: AnnData, key: str) -> np.ndarray:
    """Return ``obsm[f"X_{key}"]``, or raise naming the ``annotate`` call that writes it."""
    rep = embedding_keys(key)["embedding"]
    if rep not in adata.obsm:
        raise KeyError(
            f"adata.obsm has no {rep!r} (the model's embedding) to compute a UMAP from. Run "
            f"`model.annotate(adata, key_added={key!r})` first, or pass the `key` used when "
            f"annotating (obsm keys: {list(adata.obsm.keys())})."
        )
    z = np.asarray(adata.obsm[rep])
    if z.ndim != 2 or z.shape[0] != adata.n_obs:
        raise ValueError(f"obsm[{rep!r}] must be a cells x dimensions array, got {z.shape}.")
    if not np.isfinite(z).all():
        n_bad = int((~np.isfinite(z).all(axis=1)).sum())
        raise ValueError(
            f"obsm[{rep!r}] has {n_bad} cell(s) with NaN/inf values; annotate those cells or "
            "subset `adata` to the annotated cells first."
        )
    if adata.n_obs < 3:
        raise ValueError(f"A UMAP needs at least 3 cells, `adata` has {adata.n_obs}.")
    return z


def embedding(
    adata: AnnData,
    key: str,
    *,
    n_neighbors: int = 15,
    neighbors_kwargs: Mapping[str, Any] | None = None,
    random_state: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """Compute the neighbour graph and the UMAP of a model's embedding ``obsm[f"X_{key}"]``.

    The graph is :func:`scanpy.pp.neighbors` with ``use_rep=f"X_{key}"``, the layout
    :func:`scanpy.tl.umap` of that graph. They are written under keys named after ``key``, so
    scanpy's default fields (``obsm["X_umap"]``, ``obsp["distances"]``,
    ``obsp["connectivities"]``, ``uns["neighbors"]``), the fields of other annotations and
    ``uns[key]`` are left untouched; calling it again overwrites them.
    :func:`~labeltransfer.pl.embedding_confidence` draws ``obsm[f"X_{key}_umap"]``.

    ======================================================  ===================================
    field                                                   content
    ======================================================  ===================================
    ``obsm[f"X_{key}_umap"]``                               UMAP coordinates, cells x 2
    ``uns[f"X_{key}_umap"]``                                UMAP parameters (``{"params": ...}``)
    ``obsp[f"{key}_neighbors_distances"]``                  kNN distances (sparse, cells x cells)
    ``obsp[f"{key}_neighbors_connectivities"]``             kNN graph weights (sparse)
    ``uns[f"{key}_neighbors"]``                             scanpy's neighbour parameters and
                                                            the two ``obsp`` keys
    ======================================================  ===================================

    Parameters
    ----------
    adata
        AnnData annotated by ``model.annotate(adata, key_added=key)``.
    key
        The ``key_added`` used when annotating.
    n_neighbors
        Neighbours of the kNN graph (scanpy's default; at most ``n_obs - 1``).
    neighbors_kwargs
        Further arguments of :func:`scanpy.pp.neighbors`, e.g. ``{"metric": "cosine"}``;
        not ``use_rep``, ``key_added``, ``copy`` or ``n_pcs``.
    random_state
        Seed of the neighbour search and of the UMAP layout.
    copy
        Write into a copy of ``adata`` and return it.

    Returns
    -------
    ``None`` (the fields are written into ``adata``), or the annotated copy when ``copy``.

    Raises
    ------
    KeyError
        If ``obsm[f"X_{key}"]`` is missing; the message names the ``annotate`` call that
        writes it.
    ValueError
        If the embedding has NaN/inf values or fewer than 3 cells, or ``neighbors_kwargs``
        sets a fixed argument.

    Examples
    --------
    >>> model.annotate(adata, key_added="scnym")  # doctest: +SKIP
    >>> lt.tl.embedding(adata, "scnym")  # doctest: +SKIP
    >>> lt.pl.embedding_confidence(adata, "scnym")  # doctest: +SKIP
    """
    import scanpy as sc
    from anndata import AnnData

    keys = embedding_keys(key)
    rep = keys["embedding"]
    extra = dict(neighbors_kwargs or {})
    fixed = sorted(set(extra) & {"use_rep", "key_added", "copy", "n_pcs"})
    if fixed:
        raise ValueError(
            f"neighbors_kwargs cannot set {fixed}: the graph is always built on "
            f"obsm[{rep!r}] and stored under {keys['neighbors']!r}."
        )
    z = _checked_embedding(adata, key)
    adata = adata.copy() if copy else adata
    # scanpy runs on an AnnData holding only the embedding (no copy of X): sc.pp.neighbors
    # reads an existing uns["neighbors"] even with key_added, so the user's graph can neither
    # interfere nor be touched
    light = AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    light.obsm[rep] = z
    kwargs = {"n_neighbors": min(n_neighbors, adata.n_obs - 1), "random_state": random_state}
    sc.pp.neighbors(light, use_rep=rep, key_added=keys["neighbors"], **{**kwargs, **extra})
    sc.tl.umap(
        light, neighbors_key=keys["neighbors"], key_added=keys["umap"], random_state=random_state
    )
    for name in (keys["distances"], keys["connectivities"]):
        adata.obsp[name] = light.obsp[name]
    adata.uns[keys["neighbors"]] = light.uns[keys["neighbors"]]
    adata.uns[keys["umap"]] = light.uns[keys["umap"]]
    adata.obsm[keys["umap"]] = light.obsm[keys["umap"]]
    return adata if copy else None
