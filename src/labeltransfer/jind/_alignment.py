"""Which stored JIND alignment a query gets: content fingerprints and the explicit choice.

:meth:`JIND.align <labeltransfer.JIND.align>` stores each alignment with a fingerprint of the
query's content (:func:`content_fingerprint`), the hash of its cell names and a hash per cell
name. ``alignment="auto"`` uses the alignment whose fingerprint equals the query's; a query
that only shares cell names with an aligned one (a subset, or other data under the same
names) is predicted without alignment, with a warning that names the alignment to pass
explicitly.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse
from scvi import settings

from labeltransfer.base import fingerprint as names_fingerprint

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData

logger = logging.getLogger(__name__)

#: Cells (evenly spaced) whose expression enters the content fingerprint.
FINGERPRINT_CELLS = 256


def cell_hashes(adata: AnnData) -> np.ndarray:
    """Sorted 64-bit hashes of the cell names (to count the cells two queries share)."""
    return np.sort(pd.util.hash_array(np.asarray(adata.obs_names, dtype=object)))


def content_fingerprint(adata: AnnData, genes: Sequence[str]) -> str:
    """Identify a query by its content: shape, cell and gene names, and sampled expression.

    The expression part is the values of :data:`FINGERPRINT_CELLS` evenly spaced cells in
    the model's ``genes`` (all genes when the query names none of them), read as float32
    sparse rows, so the same data give the same fingerprint whether dense or sparse, float32
    or float64, in memory or on disk. Only those rows are read from a backed AnnData or a
    zarr store.

    Parameters
    ----------
    adata
        The query: its ``X`` is read (the first layer, by name, when ``X`` is ``None``).
    genes
        The model's input genes.

    Returns
    -------
    A hexadecimal SHA-1 digest.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(f"{adata.n_obs}x{adata.n_vars}".encode())
    digest.update(cell_hashes(adata).tobytes())
    digest.update(pd.util.hash_array(np.asarray(adata.var_names, dtype=object)).tobytes())
    matrix = adata.X
    if matrix is None and len(adata.layers):
        matrix = adata.layers[sorted(adata.layers)[0]]
    if matrix is None or adata.n_obs == 0:
        return digest.hexdigest()
    rows = np.unique(np.linspace(0, adata.n_obs - 1, min(adata.n_obs, FINGERPRINT_CELLS)))
    block = sparse.csr_matrix(matrix[rows.astype(int)], dtype=np.float32)
    columns = adata.var_names.get_indexer(pd.Index(genes))
    columns = columns[columns >= 0]
    if columns.size:
        block = block[:, columns]
    block.sum_duplicates()
    block.eliminate_zeros()
    block.sort_indices()
    for part in (block.indptr, block.indices):
        digest.update(part.astype(np.int64).tobytes())
    digest.update(block.data.tobytes())
    return digest.hexdigest()


def alignment_record(adata: AnnData, genes: Sequence[str]) -> dict[str, Any]:
    """Return the identifying part of a stored alignment of ``adata``."""
    return {
        "fingerprint": content_fingerprint(adata, genes),
        "names_fingerprint": names_fingerprint(adata),
        "cell_hashes": cell_hashes(adata),
        "n_cells": int(adata.n_obs),
    }


def select_alignment(
    alignments: Mapping[str, Mapping[str, Any]],
    adata: AnnData,
    choice: str | None,
    genes: Sequence[str],
) -> tuple[str | None, str | None]:
    """Return the name of the alignment to use for ``adata`` and how it was matched.

    Parameters
    ----------
    alignments
        The model's stored alignments (``JIND.alignments_``).
    adata
        The query.
    choice
        ``"auto"`` (the alignment learned on this very AnnData, by content fingerprint), the
        name of a stored alignment, or ``None`` (no alignment).
    genes
        The model's input genes.

    Returns
    -------
    ``(name, matched_by)``: ``matched_by`` is ``"fingerprint"``, ``"requested"`` or, for an
    alignment saved before fingerprints existed, ``"cell names"``; ``(None, None)`` without
    alignment.
    """
    if choice is None:
        return None, None
    if choice != "auto":
        if not isinstance(choice, str) or choice not in alignments:
            raise ValueError(
                f"alignment={choice!r} is not a stored alignment of this model (it has "
                f"{sorted(alignments) or 'none'}). Pass one of those names, 'auto' (the "
                "alignment learned on this AnnData, if any) or None (no alignment), or align "
                f"the query first with `model.align(adata, name={choice!r})`."
            )
        return choice, "requested"
    if not alignments:
        return None, None
    content = content_fingerprint(adata, genes)
    for name, record in alignments.items():
        if "names_fingerprint" in record and record["fingerprint"] == content:
            return name, "fingerprint"
    names = names_fingerprint(adata)
    for name, record in alignments.items():
        if "names_fingerprint" not in record and record.get("fingerprint") == names:
            _warn(
                f"Alignment {name!r} was saved by an older labeltransfer, without a content "
                "fingerprint, and is used because this AnnData has the cell names of its "
                f"query. Pass alignment={name!r} to choose it explicitly (this silences the "
                "warning), or align the query again and save the model to store a fingerprint."
            )
            return name, "cell names"
    for name, record in alignments.items():
        if record.get("names_fingerprint") == names:
            _warn(
                f"This AnnData has the cell names of the query aligned as {name!r} but other "
                "expression values, so that alignment is not used: predicting without "
                f"alignment. If it is the same data in another form, pass alignment={name!r}; "
                "if it is another query, align it with `model.align(adata, name=...)`; "
                "alignment=None silences this warning."
            )
            return None, None
    hashes = cell_hashes(adata)
    for name, record in alignments.items():
        stored = record.get("cell_hashes")
        shared = 0 if stored is None else int(np.isin(hashes, stored).sum())
        if shared:
            _warn(
                f"This AnnData shares {shared} of its {adata.n_obs} cell names with the query "
                f"aligned as {name!r} ({record['n_cells']} cells) but is not that AnnData (a "
                "subset, another selection, or other data with the same names), so the "
                f"alignment is not used: predicting without alignment. Pass alignment={name!r} "
                "to apply it to these cells (the alignment maps each cell on its own), or "
                "align this AnnData with `model.align(adata, name=...)`; alignment=None "
                "silences this warning."
            )
            return None, None
    logger.info(
        "No alignment was learned for this AnnData; predicting without alignment. Call "
        "model.align(adata) first to correct its batch effect."
    )
    return None, None


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=settings.warnings_stacklevel)
