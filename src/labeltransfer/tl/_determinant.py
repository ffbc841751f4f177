"""Determinant genes of each predicted cell type (CellPredX's interpreter).

References
----------
Liu Y, Xia Y, Yan H, et al. 2025. CellPredX, a computational framework for cross-data type,
cross-sample, and cross-protocol cell type annotation through domain adaptation and deep metric
learning. PLoS Comput Biol. doi:10.1371/journal.pcbi.1013824 ("Obtaining determinant features
for each cell type").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ._interpret import _attributions, _feature_names, _logits_network

__all__ = ["determinant_genes"]


def _top_per_row(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values of each row (unordered), vectorised."""
    if k >= values.shape[1]:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    return np.argpartition(-values, k - 1, axis=1)[:, :k]


def determinant_genes(
    model: Any,
    adata: Any,
    *,
    groupby: str | None = None,
    n_features: int = 100,
    n_top: int = 50,
    absolute: bool = False,
    max_cells: int | None = None,
    n_steps: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    key_added: str | None = None,
) -> pd.DataFrame:
    """CellPredX's determinant genes: the genes most often among each cell's top attributions.

    For every cell, the integrated gradients (:func:`integrated_gradients`, zero baseline) of
    the logit of the cell's predicted type are computed; the ``n_features`` genes with the
    largest attributions are the cell's *determinant features*. For each cell type, the
    genes are counted over the determinant features of the cells annotated as that type, and
    the ``n_top`` most frequent are the type's determinant genes (Liu et al. 2025: top 100
    per cell, top 50 per type).

    Parameters
    ----------
    model
        A trained model whose module has ``encoder``/``embedder`` and ``classifier`` (e.g.
        :class:`~labeltransfer.CellPredX`, :class:`~labeltransfer.SCNYM`).
    adata
        Cells to explain: an AnnData (any gene order, harmonised as in ``annotate``), or a
        MuData for a CellPredX model set up with ``setup_mudata`` (its ATAC cells).
    groupby
        ``None`` (default): cells are grouped by the model's prediction (argmax). Otherwise a
        column of ``adata.obs`` with an annotation (e.g. ``"cellpredx"`` after ``annotate``);
        values that are not reference types (``"Unassigned"``) are skipped, and each cell is
        explained towards its group.
    n_features
        Determinant features per cell (CellPredX: 100).
    n_top
        Determinant genes per type (CellPredX: 50).
    absolute
        Rank a cell's genes by the absolute attribution (the reference implementation) instead
        of the signed contribution towards the type (the paper's "descending contribution").
    max_cells
        Explain at most this many cells per type (a seeded random sample); ``None``: all.
    n_steps
        Integration steps (captum's default, 50, as CellPredX uses captum's defaults).
    batch_size
        Cells per minibatch.
    seed
        Seed of the cell sampling.
    key_added
        If given, ``adata.uns[key_added]`` (a dict, e.g. written by ``annotate``) receives
        ``"determinant_genes"``: the table as a dict of plain lists.

    Returns
    -------
    Tidy DataFrame with columns ``group`` (cell type), ``rank`` (1 = most frequent), ``gene``,
    ``count`` (cells whose determinant features include the gene), ``fraction`` (count /
    explained cells of the type) and ``n_cells`` (explained cells of the type). Ties in the
    count keep the gene with the larger mean attribution first.

    Raises
    ------
    KeyError
        If ``groupby`` is not a column of ``adata.obs``, or ``adata.uns[key_added]`` is not a
        dict.
    ValueError
        If ``n_features`` or ``n_top`` is not positive.
    """
    if n_features < 1 or n_top < 1:
        raise ValueError("n_features and n_top must be positive integers.")
    _logits_network(model.module)
    model._check_if_trained(warn=False)
    obs = adata.obs
    if groupby is not None and groupby not in obs:
        raise KeyError(
            f"{groupby!r} is not a column of adata.obs; pass an annotation column or None "
            "(the model's predictions)."
        )
    if key_added is not None and not isinstance(adata.uns.get(key_added), dict):
        raise KeyError(
            f"adata.uns[{key_added!r}] is not a dict; annotate the data with this key first or "
            "leave key_added=None."
        )
    registered, _ = model._prepare(adata)
    cell_types = list(model.cell_types)
    if groupby is None:
        groups = np.asarray(model.predict(adata), dtype=str)
    else:
        groups = obs[groupby].reindex(registered.obs_names).astype(str).to_numpy()
    genes = _feature_names(model)
    rng = np.random.default_rng(seed)
    rows = []
    for group in cell_types:
        members = np.flatnonzero(groups == group)
        if members.size == 0:
            continue
        if max_cells is not None and members.size > max_cells:
            members = np.sort(rng.choice(members, size=max_cells, replace=False))
        values = _attributions(
            model,
            registered,
            target_idx=cell_types.index(group),
            indices=members,
            n_steps=n_steps,
            baseline="zero",
            batch_size=batch_size,
        )
        score = np.abs(values) if absolute else values
        top = _top_per_row(score, min(n_features, values.shape[1]))
        counts = np.bincount(top.ravel(), minlength=values.shape[1])
        mean = score.mean(axis=0)
        order = np.lexsort((-mean, -counts))[: min(n_top, values.shape[1])]
        rows.append(
            pd.DataFrame(
                {
                    "group": group,
                    "rank": np.arange(1, len(order) + 1),
                    "gene": genes[order],
                    "count": counts[order].astype(np.int64),
                    "fraction": counts[order] / members.size,
                    "n_cells": int(members.size),
                }
            )
        )
    model._release(registered)
    columns = ["group", "rank", "gene", "count", "fraction", "n_cells"]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    if key_added is not None:
        adata.uns[key_added]["determinant_genes"] = {
            "group": [str(v) for v in table["group"]],
            "rank": [int(v) for v in table["rank"]],
            "gene": [str(v) for v in table["gene"]],
            "count": [int(v) for v in table["count"]],
            "fraction": [float(v) for v in table["fraction"]],
        }
    return table
