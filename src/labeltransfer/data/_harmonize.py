"""Reindex a query to the reference's genes, mapping Ensembl ids and symbols when needed."""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from ._checks import (
    _csr_from_arrays,
    _get_matrix,
    _is_csr,
    _iter_row_chunks,
    _scan_matrix,
    _stack_csr,
    _strip_versions,
    _to_csr_float32,
)

logger = logging.getLogger(__name__)

IdType = Literal["ensembl", "symbol"]

#: An Ensembl gene id, optionally with a version suffix (``ENSG00000141510.16``).
ENSEMBL_PATTERN = re.compile(r"^ENS[A-Z]*G\d{11}(\.\d+)?$")
#: Number of missing genes listed in the report and in error messages.
N_MISSING_EXAMPLES = 20


def _is_ensembl(names: pd.Index | pd.Series) -> np.ndarray:
    """Whether each name is an Ensembl gene id (only names starting with ``ENS`` are matched)."""
    return np.array(
        [n.startswith("ENS") and ENSEMBL_PATTERN.match(n) is not None for n in map(str, names)],
        dtype=bool,
    )


def _detect_id_type(names: Sequence[str] | pd.Index) -> IdType:
    """``"ensembl"`` if more than half of the names are Ensembl gene ids, else ``"symbol"``."""
    if len(names) == 0:
        return "symbol"
    return "ensembl" if _is_ensembl(pd.Index(names)).mean() > 0.5 else "symbol"


def load_id_map(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an Ensembl id to gene symbol table.

    Parameters
    ----------
    path
        Tab-separated (or ``.csv`` comma-separated, optionally gzipped) table with two columns,
        e.g. ``hs_ensembl2symbol.tsv.gz`` (header ``ensembl_id``, ``symbol``). Files without a
        header and other column names are accepted: the column of Ensembl ids is detected.

    Returns
    -------
    pandas.DataFrame
        Columns ``ensembl_id`` (version suffixes stripped) and ``symbol``, one row per distinct
        pair in file order, rows with a missing value dropped. One id may have several symbols
        and one symbol several ids.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the table has no column of Ensembl ids or no symbol column.

    Examples
    --------
    >>> id_map = load_id_map("hs_ensembl2symbol.tsv.gz")  # doctest: +SKIP
    >>> list(id_map.columns)  # doctest: +SKIP
    ['ensembl_id', 'symbol']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Gene id table {str(path)!r} does not exist; pass the path of a two-column "
            "Ensembl id / symbol table (e.g. `hs_ensembl2symbol.tsv.gz`)."
        )
    sep = "," if ".csv" in path.name.lower() else "\t"
    table = pd.read_csv(path, sep=sep, dtype=str)
    if any(ENSEMBL_PATTERN.match(str(col)) for col in table.columns):  # no header line
        table = pd.read_csv(path, sep=sep, dtype=str, header=None)
    return _normalize_id_map(table, source=str(path))


def _normalize_id_map(table: pd.DataFrame, *, source: str = "id_map") -> pd.DataFrame:
    """Bring a user table to columns ``ensembl_id`` / ``symbol`` with versions stripped."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"id_map must be a DataFrame or a path, got {type(table).__name__}; pass e.g. "
            "`load_id_map('hs_ensembl2symbol.tsv.gz')` or the path itself."
        )
    if {"ensembl_id", "symbol"} <= set(table.columns):
        id_col, symbol_col = "ensembl_id", "symbol"
    elif table.shape[1] == 2:
        fractions = [_is_ensembl(table.iloc[:, i].dropna()).mean() for i in range(2)]
        if max(fractions) <= 0.5:
            raise ValueError(
                f"Neither column of the gene id table ({source}) holds Ensembl gene ids; pass a "
                "table with columns 'ensembl_id' and 'symbol'."
            )
        id_col, symbol_col = (
            (table.columns[0], table.columns[1])
            if fractions[0] >= fractions[1]
            else (table.columns[1], table.columns[0])
        )
    else:
        raise ValueError(
            f"The gene id table ({source}) has columns {list(table.columns)}; pass a table "
            "with exactly two columns or with columns 'ensembl_id' and 'symbol'."
        )
    out = pd.DataFrame(
        {
            "ensembl_id": table[id_col].astype(object),
            "symbol": table[symbol_col].astype(object),
        }
    ).dropna()
    out["ensembl_id"] = np.asarray(_strip_versions(out["ensembl_id"].astype(str)))
    out["symbol"] = out["symbol"].astype(str)
    return out.drop_duplicates().reset_index(drop=True)


def _resolve_id_map(id_map: pd.DataFrame | str | os.PathLike[str]) -> pd.DataFrame:
    if isinstance(id_map, str | os.PathLike):
        return load_id_map(id_map)
    return _normalize_id_map(id_map)


def _query_names(query: AnnData, gene_symbols: str | None, name: str) -> pd.Index:
    if gene_symbols is None:
        return pd.Index(query.var_names.astype(str), dtype=object)
    if gene_symbols not in query.var.columns:
        raise KeyError(
            f"Column {gene_symbols!r} not found in the {name}'s var; available columns: "
            f"{list(query.var.columns)}. Pass one of them as `gene_symbols=`, or "
            "`gene_symbols=None` to use var_names."
        )
    column = query.var[gene_symbols]
    return pd.Index(column.astype(object).where(column.notna(), None), dtype=object)


def _match_genes(
    query_names: pd.Index,
    reference_keys: pd.Index,
    *,
    query_type: IdType,
    reference_type: IdType,
    id_map: pd.DataFrame | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query gene index, reference gene index) of matching genes."""
    ref_position = pd.Series(np.arange(len(reference_keys)), index=reference_keys)
    ref_position = ref_position[~ref_position.index.duplicated()]
    valid = np.array([n is not None for n in query_names], dtype=bool)
    query_keys = pd.Index(np.where(valid, query_names, ""), dtype=object)
    query_keys = _strip_versions(query_keys)
    targets = pd.Series(query_keys).map(ref_position).to_numpy(dtype=float)
    targets[~valid] = np.nan
    if query_type != reference_type and id_map is not None:
        source, target = (
            ("ensembl_id", "symbol") if query_type == "ensembl" else ("symbol", "ensembl_id")
        )
        table = id_map[id_map[target].isin(ref_position.index)]
        lookup = table.drop_duplicates(subset=source, keep="first").set_index(source)[target]
        mapped = pd.Series(query_keys).map(lookup).map(ref_position).to_numpy(dtype=float)
        need = np.isnan(targets) & valid
        targets[need] = mapped[need]
    query_idx = np.flatnonzero(~np.isnan(targets))
    return query_idx, targets[query_idx].astype(np.int64)


def harmonize_genes(
    query: AnnData,
    reference_genes: Sequence[str],
    *,
    gene_symbols: str | None = None,
    id_map: pd.DataFrame | str | os.PathLike[str] | None = None,
    layer: str | None = None,
    min_overlap: float = 0.5,
    warn_overlap: float = 0.9,
    name: str = "query",
) -> tuple[AnnData, dict[str, Any]]:
    """Reindex a query AnnData to the reference's genes.

    A CSR matrix in memory is reindexed whole by renumbering its column indices; dense and
    backed input are read in row chunks (10,000 cells) and reindexed chunk by chunk, so no
    input is densified. Query genes merged into one reference gene are summed by a sparse
    selection matrix. Reference genes absent from the query are zero-filled. Values are not
    validated here; see :func:`check_input`.

    Parameters
    ----------
    query
        AnnData to reindex; it is not modified.
    reference_genes
        Gene identifiers of the reference, in order; they become the output's ``var_names``.
    gene_symbols
        Column of ``query.var`` to use as gene names instead of ``query.var_names``.
    id_map
        Ensembl id to symbol table (a DataFrame with columns ``ensembl_id`` and ``symbol``,
        or a path read with :func:`load_id_map`), used when the query and the reference use
        different identifier types. Each query gene is mapped to the first reference gene the
        table gives for it; a query name that equals a reference name is kept as is.
    layer
        Layer of the query holding the data; ``None`` uses ``query.X``.
    min_overlap
        Smallest accepted fraction of reference genes found in the query.
    warn_overlap
        Fraction of reference genes found under which a warning is issued.
    name
        How the query is called in messages.

    Returns
    -------
    adata
        New AnnData with ``var_names`` equal to ``reference_genes``, ``X`` a CSR float32
        matrix (zeros for missing genes) and a copy of ``query.obs``. If the query already has
        exactly the reference genes in order and a CSR float32 matrix, that matrix is shared
        rather than copied; if it has them in another order, its values array may be shared
        (only the column indices are renumbered). Copy ``X`` before modifying it in place.
    report
        JSON-serialisable dict: ``n_reference_genes``, ``n_query_genes``, ``n_shared``,
        ``overlap`` (``n_shared / n_reference_genes``), ``n_missing``, ``missing_examples``
        (up to 20, reference order), ``id_type_reference``, ``id_type_query`` (``"ensembl"``
        or ``"symbol"``), ``id_mapping`` (``None``, ``"ensembl->symbol"`` or
        ``"symbol->ensembl"``) and ``n_collapsed`` (query genes merged into a reference gene
        that another query gene already matched: summed for integer data, otherwise only the
        gene with the largest total is kept).

    Raises
    ------
    TypeError
        If ``query`` is not an AnnData.
    KeyError
        If ``layer`` or ``gene_symbols`` is missing.
    ValueError
        If ``reference_genes`` is empty or has duplicates, if identifier types differ and no
        ``id_map`` is given, or if the overlap is below ``min_overlap``.

    Warns
    -----
    UserWarning
        If the overlap is below ``warn_overlap``, or if several query genes share one name.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> query = ad.AnnData(
    ...     np.array([[1.0, 2.0]], dtype=np.float32), var=pd.DataFrame(index=["B", "A"])
    ... )
    >>> out, report = harmonize_genes(query, ["A", "B", "C"], min_overlap=0.5, warn_overlap=0.5)
    >>> out.X.toarray()
    array([[2., 1., 0.]], dtype=float32)
    """
    if not isinstance(query, AnnData):
        raise TypeError(
            f"The {name} must be an AnnData object, got {type(query).__name__}; load it with "
            "`anndata.read_h5ad(path)` or wrap a matrix with `anndata.AnnData(X)`."
        )
    if not 0.0 <= min_overlap <= 1.0 or not 0.0 <= warn_overlap <= 1.0:
        raise ValueError(
            f"min_overlap ({min_overlap}) and warn_overlap ({warn_overlap}) must lie in [0, 1]."
        )
    ref_genes = pd.Index([str(g) for g in reference_genes], dtype=object)
    n_ref = len(reference_genes)
    if n_ref == 0:
        raise ValueError(
            "reference_genes is empty; pass the reference's gene names (e.g. "
            "`reference.var_names`)."
        )
    reference_keys = _strip_versions(ref_genes)
    if reference_keys.has_duplicates:
        dup = reference_keys[reference_keys.duplicated()].unique()
        if ref_genes.has_duplicates:
            fix = "make them unique first (e.g. `reference.var_names_make_unique()`)"
        else:
            versions = ", ".join(ref_genes[reference_keys == dup[0]])
            fix = (
                f"they differ only in their version suffix ({versions}), which genes are "
                "matched without: keep one version of each gene in the reference"
            )
        raise ValueError(
            f"reference_genes has {len(dup)} duplicated identifiers (ignoring Ensembl version "
            f"suffixes), e.g. {', '.join(map(str, dup[:5]))}; {fix}."
        )
    matrix = _get_matrix(query, layer, name)
    query_names = _query_names(query, gene_symbols, name)

    reference_type = _detect_id_type(ref_genes)
    query_type = _detect_id_type(pd.Index([n for n in query_names if n is not None]))
    id_mapping: str | None = None
    table: pd.DataFrame | None = None
    if query_type != reference_type:
        if id_map is None:
            raise ValueError(
                f"The {name} genes look like {query_type} identifiers but the reference genes "
                f"look like {reference_type} identifiers. Pass `id_map=` (a path or DataFrame "
                "mapping Ensembl ids to symbols, e.g. the shipped `hs_ensembl2symbol.tsv.gz`) "
                f"or `gene_symbols=` (a column of the {name}'s var with the reference's "
                "identifier type)."
            )
        table = _resolve_id_map(id_map)
        id_mapping = f"{query_type}->{reference_type}"

    query_idx, ref_idx = _match_genes(
        query_names,
        reference_keys,
        query_type=query_type,
        reference_type=reference_type,
        id_map=table,
    )

    # many query genes -> one reference gene
    hits = np.bincount(ref_idx, minlength=n_ref)
    n_collapsed = int(np.maximum(hits - 1, 0).sum())
    if n_collapsed:
        stats = _scan_matrix(matrix, column_sums=True)
        if stats["is_integer"]:
            how = "summed"
        else:
            how = "kept the one with the largest total"
            totals = stats["column_sums"][query_idx]
            order = np.lexsort((np.arange(len(query_idx)), -totals, ref_idx))
            first = np.r_[True, ref_idx[order][1:] != ref_idx[order][:-1]]
            keep = np.sort(order[first])
            query_idx, ref_idx = query_idx[keep], ref_idx[keep]
        message = (
            f"{n_collapsed} {name} genes matched a reference gene already matched by another "
            f"{name} gene; {how}."
        )
        if id_mapping is None:
            warnings.warn(
                message + " Make the query gene names unique to avoid this.",
                UserWarning,
                stacklevel=2,
            )
        else:
            logger.info(message)

    n_shared = int((hits > 0).sum())
    overlap = n_shared / n_ref
    missing = ref_genes[hits == 0]
    report: dict[str, Any] = {
        "n_reference_genes": int(n_ref),
        "n_query_genes": int(query.n_vars),
        "n_shared": n_shared,
        "overlap": float(overlap),
        "n_missing": int(len(missing)),
        "missing_examples": [str(g) for g in missing[:N_MISSING_EXAMPLES]],
        "id_type_reference": reference_type,
        "id_type_query": query_type,
        "id_mapping": id_mapping,
        "n_collapsed": n_collapsed,
    }
    if overlap < min_overlap:
        raise ValueError(
            f"Only {n_shared} of {n_ref} reference genes ({overlap:.1%}) were found in the "
            f"{name} (min_overlap={min_overlap:.0%}); first missing: "
            f"{', '.join(report['missing_examples'][:10])}. The {name} genes look like "
            f"{query_type} identifiers, the reference genes like {reference_type} identifiers. "
            "Check that both come from the same species and annotation, pass `gene_symbols=` "
            "or `id_map=` to match identifiers, or lower `min_overlap=`."
        )
    if overlap < warn_overlap:
        warnings.warn(
            f"Only {n_shared} of {n_ref} reference genes ({overlap:.1%}) were found in the "
            f"{name}; the {len(missing)} missing genes are filled with zeros (first missing: "
            f"{', '.join(report['missing_examples'][:5])}). Predictions may degrade; check the "
            "gene identifiers (`gene_symbols=`, `id_map=`).",
            UserWarning,
            stacklevel=2,
        )

    identity = (
        len(query_idx) == n_ref == query.n_vars
        and np.array_equal(query_idx, np.arange(n_ref))
        and np.array_equal(ref_idx, np.arange(n_ref))
    )
    if identity:
        if type(matrix) is sparse.csr_matrix and matrix.dtype == np.float32:
            X = matrix
        else:
            X = _to_csr_float32(matrix)
    else:
        X = _reindex(matrix, query_idx, ref_idx, n_ref)
    obs = query.obs.copy()
    var = pd.DataFrame(index=ref_genes)
    logger.info(
        "%s: %d of %d reference genes found (%.1f%%)", name, n_shared, n_ref, 100 * overlap
    )
    return AnnData(X=X, obs=obs, var=var), report


def _reindex(
    matrix: Any, query_idx: np.ndarray, ref_idx: np.ndarray, n_ref: int
) -> sparse.csr_matrix:
    """Columns ``query_idx`` of ``matrix`` moved to ``ref_idx`` of ``n_ref``: CSR float32.

    Where every reference gene takes at most one query gene, each stored value keeps its
    place and its column index is renumbered (``col_map[indices]``), dropping the query's
    other genes: no arithmetic, and an in-memory CSR is done in one piece (no chunks to
    stack). Query genes merged into one reference gene are summed by ``matrix @ selection``.
    Either way the rows' indices come out sorted and the values are exactly the query's.
    """
    n_query = matrix.shape[1]
    merged = np.unique(ref_idx).size < ref_idx.size
    whole = _is_csr(matrix) and matrix.shape[0] > 0
    if merged:
        selection = sparse.csr_matrix(
            (np.ones(len(query_idx), dtype=np.float32), (query_idx, ref_idx)),
            shape=(n_query, n_ref),
        )
    else:
        col_map = np.full(n_query, -1, dtype=np.int32 if n_ref < 2**31 else np.int64)
        col_map[query_idx] = ref_idx
        kept = col_map[col_map >= 0]
        in_order = bool(np.all(kept[1:] > kept[:-1]))
    blocks = []
    for _, _, block in _iter_row_chunks(matrix, chunk_size=matrix.shape[0] if whole else None):
        block = _as_csr_float32(block)
        if merged:
            out = sparse.csr_matrix(block @ selection, dtype=np.float32)
            out.sort_indices()
        else:
            out = _renumber_columns(block, col_map, n_ref, sorted_out=in_order)
        blocks.append(out)
    return _stack_csr(blocks, n_ref, consume=True)


def _as_csr_float32(block: Any) -> sparse.csr_matrix:
    """Return a row block as a CSR float32 matrix (may share the block's arrays)."""
    if type(block) is sparse.csr_matrix and block.dtype == np.float32:
        return block  # scipy's constructor would copy a block viewing a larger matrix (prune)
    if sparse.issparse(block):
        return sparse.csr_matrix(block.astype(np.float32, copy=False))
    return sparse.csr_matrix(np.asarray(block, dtype=np.float32))


def _renumber_columns(
    block: sparse.csr_matrix, col_map: np.ndarray, n_cols: int, *, sorted_out: bool
) -> sparse.csr_matrix:
    """``block`` with column ``j`` moved to ``col_map[j]`` (dropped where negative).

    ``sorted_out``: the map keeps the columns' order, so sorted rows stay sorted. Where no
    column is dropped and no row needs sorting, the result shares ``block``'s values and row
    pointers (only the column indices are new); otherwise all its arrays are new.
    """
    columns = col_map[block.indices]
    keep = columns >= 0
    needs_sort = not (sorted_out and block.has_sorted_indices)
    if keep.all():
        data, indptr = block.data, block.indptr
        if needs_sort:  # sorting permutes the values in place (the row pointers stay)
            data = data.copy()
    else:
        counts = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        data, columns = block.data[keep], columns[keep]
        indptr = counts[block.indptr].astype(block.indptr.dtype)
    out = _csr_from_arrays(data, columns, indptr, (block.shape[0], n_cols))
    if needs_sort:
        out.sort_indices()
    return out
