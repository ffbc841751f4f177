"""Seurat-flavour highly variable genes, computed in one chunked streaming pass."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._checks import _check_anndata, _get_matrix, _iter_row_chunks

logger = logging.getLogger(__name__)

#: Number of equal-width bins of log mean expression (as ``scanpy``'s ``n_bins``).
N_BINS = 20
#: Target sum of the per-cell normalisation of counts (CPM, as the papers use).
TARGET_SUM = 1e6


def _linear_chunk(
    block: np.ndarray | sparse.csr_matrix, input_type: str
) -> np.ndarray | sparse.csr_matrix:
    """Values on the linear scale, float64: CPM for counts, ``expm1`` for log-normalised data.

    For counts this equals ``expm1(log1p(CPM))``, i.e. what scanpy's seurat flavour sees after
    ``normalize_total(target_sum=1e6)`` and ``log1p``. Never modifies ``block``.
    """
    if sparse.issparse(block):
        data = block.data.astype(np.float64)
        if input_type == "counts":
            rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
            totals = np.bincount(rows, weights=data, minlength=block.shape[0])
            totals[totals == 0] = 1.0
            data *= np.repeat(TARGET_SUM / totals, np.diff(block.indptr))
        else:
            np.expm1(data, out=data)
        return sparse.csr_matrix((data, block.indices, block.indptr), shape=block.shape)
    dense = np.array(block, dtype=np.float64)
    if input_type == "counts":
        totals = dense.sum(axis=1, keepdims=True)
        totals[totals == 0] = 1.0
        dense *= TARGET_SUM / totals
    else:
        np.expm1(dense, out=dense)
    return dense


def select_features(
    adata: AnnData,
    *,
    n_top_genes: int = 5000,
    layer: str | None = None,
    input_type: Literal["counts", "lognorm"] = "counts",
    mask: np.ndarray | None = None,
    chunk_size: int = 10000,
) -> np.ndarray:
    """Select highly variable genes as ``scanpy.pp.highly_variable_genes(flavor="seurat")``.

    Works on log-normalised values: counts are normalised per cell to ``log1p(CPM)`` (counts
    divided by the cell total times 1e6). For every gene, the mean and the (unbiased) variance
    of the ``expm1`` values are accumulated over row chunks (sparse input stays sparse, so no
    dense copy of the matrix is made); the dispersion ``var / mean`` is log-transformed, genes
    are put in 20 equal-width bins of ``log1p(mean)`` and the dispersion is z-scored within its
    bin (a bin with a single gene gets a normalised dispersion of 1). Genes are ranked by
    normalised dispersion (genes without one come last; ties broken by gene order). The log
    base is taken to be e (``adata.uns["log1p"]["base"]`` is ignored).

    Parameters
    ----------
    adata
        AnnData with raw counts or log-normalised data (dense, sparse or backed); not modified.
    n_top_genes
        Number of genes to select.
    layer
        Layer holding the data; ``None`` uses ``adata.X``.
    input_type
        ``"counts"`` (raw counts, normalised here) or ``"lognorm"`` (natural-log
        ``log1p``-normalised values), e.g. as detected by :func:`check_input`.
    mask
        Boolean array over cells: only these cells are used (e.g. the labelled reference
        cells). ``None`` uses all cells.
    chunk_size
        Number of rows read at once.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices of the selected genes; all genes if ``n_vars <= n_top_genes``.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData.
    ValueError
        If ``n_top_genes`` or ``chunk_size`` is not positive, ``input_type`` is unknown, or
        ``mask`` is not a boolean array over cells selecting at least two cells.
    KeyError
        If ``layer`` is missing.

    Examples
    --------
    >>> from labeltransfer.data import synthetic
    >>> reference, _ = synthetic(n_reference=300, n_query=50, n_genes=200)
    >>> select_features(reference, n_top_genes=50).shape
    (50,)
    """
    _check_anndata(adata, "data")
    if n_top_genes < 1:
        raise ValueError(f"n_top_genes must be a positive integer, got {n_top_genes}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}.")
    if input_type not in ("counts", "lognorm"):
        raise ValueError(
            f"input_type must be 'counts' or 'lognorm', got {input_type!r}; use the "
            "'input_type' returned by `check_input`."
        )
    matrix = _get_matrix(adata, layer, "data")
    n_obs, n_vars = adata.n_obs, adata.n_vars
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (n_obs,):
            raise ValueError(
                f"mask must be a boolean array with one entry per cell ({n_obs}), got dtype "
                f"{mask.dtype} and shape {mask.shape}; build it e.g. as "
                "`(adata.obs['lt_role'] == 'reference').to_numpy()`."
            )
    n_used = n_obs if mask is None else int(mask.sum())
    if n_used < 2:
        raise ValueError(
            f"select_features needs at least 2 cells, got {n_used}; check `mask=` (it selects "
            f"{n_used} of {n_obs} cells)."
        )
    if n_vars <= n_top_genes:
        return np.arange(n_vars, dtype=np.int64)

    # Chan et al. pairwise combination of per-chunk means and sums of squared deviations
    count = 0
    mean = np.zeros(n_vars, dtype=np.float64)
    m2 = np.zeros(n_vars, dtype=np.float64)
    for start, stop, block in _iter_row_chunks(matrix, chunk_size=chunk_size):
        if mask is not None:
            rows = mask[start:stop]
            if not rows.any():
                continue
            if not rows.all():
                block = block[rows]
        values = _linear_chunk(block, input_type)
        n_chunk = values.shape[0]
        chunk_sum = np.asarray(values.sum(axis=0), dtype=np.float64).ravel()
        if sparse.issparse(values):
            chunk_sq = np.asarray(values.multiply(values).sum(axis=0), dtype=np.float64).ravel()
        else:
            chunk_sq = np.einsum("ij,ij->j", values, values)
        chunk_mean = chunk_sum / n_chunk
        chunk_m2 = np.maximum(chunk_sq - n_chunk * chunk_mean**2, 0.0)
        total = count + n_chunk
        delta = chunk_mean - mean
        m2 += chunk_m2 + delta**2 * count * n_chunk / total
        mean += delta * n_chunk / total
        count = total
    variance = m2 / (count - 1)

    mean[mean == 0] = 1e-12
    dispersion = variance / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        dispersion = np.log(dispersion)
    log_mean = np.log1p(mean)

    genes = pd.DataFrame({"means": log_mean, "dispersions": dispersion})
    genes["mean_bin"] = pd.cut(genes["means"], bins=N_BINS)
    stats = genes.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isna()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[genes["mean_bin"]].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = (genes["dispersions"].to_numpy() - per_gene[:, 0]) / per_gene[:, 1]
    score = np.nan_to_num(norm, nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    order = np.argsort(-score, kind="stable")
    selected = np.sort(order[:n_top_genes]).astype(np.int64)
    logger.info("selected %d of %d genes from %d cells", len(selected), n_vars, count)
    return selected
