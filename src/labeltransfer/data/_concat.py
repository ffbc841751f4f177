"""Concatenate an annotated reference and a query into one AnnData for label transfer."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData
from anndata.utils import make_index_unique

from ._checks import (
    _check_anndata,
    _get_matrix,
    _stack_csr,
    _to_csr_float32,
    check_input,
    check_labels,
)
from ._harmonize import harmonize_genes

logger = logging.getLogger(__name__)

REFERENCE = "reference"
QUERY = "query"


def _tidy_column(column: pd.Series) -> pd.Series:
    """Give an outer-joined obs column a dtype that anndata can write."""
    if column.dtype != object:
        return column
    values = column.dropna()
    if len(values) == 0:
        return column.astype("category")
    kinds = {type(v) for v in values}
    if kinds <= {bool, np.bool_}:
        return column.astype("boolean")
    if all(isinstance(v, int | float | np.number) and not isinstance(v, bool) for v in values):
        return pd.to_numeric(column)
    as_str = column.map(lambda v: v if pd.isna(v) else str(v))
    return as_str.astype("category")


def concat_reference_query(
    reference: AnnData,
    query: AnnData,
    *,
    labels_key: str,
    batch_key: str | None = None,
    unlabeled_category: str = "Unknown",
    role_key: str = "lt_role",
    gene_symbols: str | None = None,
    id_map: pd.DataFrame | str | os.PathLike[str] | None = None,
) -> AnnData:
    """Stack a labelled reference and a query into one AnnData.

    Reference cells come first, then the query cells reindexed to the reference genes with
    :func:`~labeltransfer.data.harmonize_genes`. Both ``X`` matrices are used (put the data
    of a layer in ``X``, e.g. on a copy, or reindex with ``harmonize_genes(layer=...)``
    first); both are checked with :func:`~labeltransfer.data.check_input` and must hold the
    same kind of data (raw counts or log-normalised). Neither input is modified.

    Parameters
    ----------
    reference
        Annotated AnnData; its genes (``var_names``, in order) define the output genes.
    query
        AnnData to annotate.
    labels_key
        Column of ``reference.obs`` with the cell-type labels.
    batch_key
        Column of ``reference.obs`` with the batch; query cells take the query's column of
        the same name when present and ``"query"`` otherwise (and where it is NaN).
    unlabeled_category
        Label given to the query cells; it must not occur among the reference labels.
    role_key
        obs column telling ``"reference"`` from ``"query"`` cells.
    gene_symbols
        Column of ``query.var`` to use as the query's gene names (see ``harmonize_genes``).
    id_map
        Ensembl id to symbol table or path (see ``harmonize_genes``).

    Returns
    -------
    AnnData
        ``X`` is CSR float32 (reference then query cells), ``var`` is a copy of
        ``reference.var``, ``obs`` the outer-joined obs of both with
        ``obs[labels_key]`` (categorical: reference labels as strings, then
        ``unlabeled_category``; categories in the reference's categorical order, or sorted,
        then ``unlabeled_category`` last), ``obs[labels_key + "_original"]`` (only if the query has a
        ``labels_key`` column: the reference labels and the query's own labels, for later
        evaluation), ``obs[role_key]`` (categorical ``"reference"`` / ``"query"``) and, with
        ``batch_key``, ``obs[batch_key]`` (categorical strings). ``uns["lt_overlap"]`` holds
        the ``harmonize_genes`` report and ``uns["lt_input"]`` the ``check_input`` results
        of the reference and of the reindexed query. obs names are made unique if needed.

    Raises
    ------
    TypeError
        If an input is not an AnnData.
    KeyError
        If ``labels_key`` or ``batch_key`` is not in ``reference.obs``.
    ValueError
        On empty inputs, NaN reference labels or batches, reference labels equal to
        ``unlabeled_category``, a reference and a query holding different kinds of data, or
        any error of ``check_input`` / ``harmonize_genes``.

    Warns
    -----
    UserWarning
        If obs names had to be made unique, if ``role_key`` or the ``_original`` column
        already existed (they are overwritten), and the warnings of ``check_input``,
        ``check_labels`` and ``harmonize_genes``.

    Examples
    --------
    >>> from labeltransfer.data import synthetic
    >>> reference, query = synthetic(n_reference=200, n_query=100, n_genes=100)
    >>> adata = concat_reference_query(reference, query, labels_key="cell_type")
    >>> adata.obs["lt_role"].value_counts().to_dict()
    {'reference': 200, 'query': 100}
    """
    _check_anndata(reference, REFERENCE)
    _check_anndata(query, QUERY)
    if labels_key not in reference.obs.columns:
        raise KeyError(
            f"labels_key {labels_key!r} not found in reference.obs; available columns: "
            f"{list(reference.obs.columns)}. Pass the column holding the cell-type labels."
        )
    if batch_key is not None and batch_key not in reference.obs.columns:
        raise KeyError(
            f"batch_key {batch_key!r} not found in reference.obs; available columns: "
            f"{list(reference.obs.columns)}. Pass an existing column or `batch_key=None`."
        )
    ref_labels_raw = reference.obs[labels_key]
    check_labels(ref_labels_raw, unlabeled_category=None, name=REFERENCE)
    ref_labels = ref_labels_raw.astype(str)
    n_unlabeled = int((ref_labels == str(unlabeled_category)).sum())
    if n_unlabeled:
        raise ValueError(
            f"{n_unlabeled} reference cells are labelled {unlabeled_category!r}, which is the "
            "token given to query cells; pass another `unlabeled_category=` (e.g. "
            "'lt_unlabeled') or rename/drop those reference cells."
        )
    if batch_key is not None and reference.obs[batch_key].isna().any():
        n_nan = int(reference.obs[batch_key].isna().sum())
        raise ValueError(
            f"{n_nan} reference cells have a NaN {batch_key!r}; fill them (e.g. "
            f"`reference.obs[{batch_key!r}] = reference.obs[{batch_key!r}].astype(str)` on a "
            "copy) or drop those cells."
        )

    ref_info = check_input(reference, name=REFERENCE)
    query_h, overlap = harmonize_genes(
        query,
        reference.var_names,
        gene_symbols=gene_symbols,
        id_map=id_map,
        name=QUERY,
    )
    query_info = check_input(query_h, name=QUERY)
    if ref_info["input_type"] != query_info["input_type"]:
        raise ValueError(
            f"The reference holds {ref_info['input_type']} data but the query holds "
            f"{query_info['input_type']} data; pass the same kind of data in X of both (raw "
            "counts, e.g. `adata.X = adata.layers['counts']` on a copy, or log-normalised "
            "data for both)."
        )

    ref_matrix = _to_csr_float32(_get_matrix(reference, None, REFERENCE))
    X = _stack_csr([ref_matrix, query_h.X], reference.n_vars)

    n_ref, n_query = reference.n_obs, query.n_obs
    obs = pd.concat([reference.obs, query.obs], axis=0, join="outer", sort=False)
    obs = obs.apply(_tidy_column) if obs.shape[1] else obs

    categories = sorted(pd.unique(ref_labels))
    if isinstance(ref_labels_raw.dtype, pd.CategoricalDtype):
        used = set(categories)
        categories = [str(c) for c in ref_labels_raw.cat.categories if str(c) in used]
    obs[labels_key] = pd.Categorical(
        np.r_[ref_labels.to_numpy(dtype=object), np.full(n_query, unlabeled_category, object)],
        categories=[*categories, unlabeled_category],
    )
    if labels_key in query.obs.columns:
        original_key = f"{labels_key}_original"
        if original_key in reference.obs.columns or original_key in query.obs.columns:
            warnings.warn(
                f"obs column {original_key!r} already exists and is overwritten.",
                UserWarning,
                stacklevel=2,
            )
        query_labels = query.obs[labels_key]
        query_labels = query_labels.astype(str).where(query_labels.notna(), np.nan)
        obs[original_key] = pd.Categorical(
            np.r_[ref_labels.to_numpy(dtype=object), query_labels.to_numpy(dtype=object)]
        )
    if role_key in reference.obs.columns or role_key in query.obs.columns:
        warnings.warn(
            f"obs column {role_key!r} already exists and is overwritten; pass another "
            "`role_key=` to keep it.",
            UserWarning,
            stacklevel=2,
        )
    obs[role_key] = pd.Categorical(
        np.r_[np.full(n_ref, REFERENCE, object), np.full(n_query, QUERY, object)],
        categories=[REFERENCE, QUERY],
    )
    if batch_key is not None:
        ref_batch = reference.obs[batch_key].astype(str).to_numpy(dtype=object)
        if batch_key in query.obs.columns:
            column = query.obs[batch_key]
            query_batch = np.where(column.isna(), QUERY, column.astype(str)).astype(object)
        else:
            query_batch = np.full(n_query, QUERY, object)
        obs[batch_key] = pd.Categorical(np.r_[ref_batch, query_batch])

    if not obs.index.is_unique:
        n_dup = int(obs.index.duplicated().sum())
        obs.index = make_index_unique(pd.Index(obs.index.astype(str)))
        warnings.warn(
            f"{n_dup} obs names were duplicated (e.g. shared by reference and query) and were "
            "made unique by appending '-1', '-2', ...; set unique names beforehand to keep "
            "control over them.",
            UserWarning,
            stacklevel=2,
        )
    adata = AnnData(X=X, obs=obs, var=reference.var.copy())
    adata.uns["lt_overlap"] = overlap
    adata.uns["lt_input"] = {REFERENCE: ref_info, QUERY: query_info}
    logger.info("concatenated %d reference and %d query cells", n_ref, n_query)
    return adata
