"""Bring a query AnnData into the feature space and registry of a trained model."""

from __future__ import annotations

import hashlib
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from anndata import AnnData

from labeltransfer._constants import REGISTRY_KEYS, SCVI_UUID_KEY
from labeltransfer.data import harmonize_genes
from labeltransfer.data._checks import (
    _iter_row_chunks,
    _matrix_label,
    _nonzero_rows,
    _validate_matrix,
)

from ._setup import _INPUT_TYPE_NAMES, _warn_duplicated_obs_names, check_registered_input_type

if TYPE_CHECKING:
    from collections.abc import Sequence

    from scvi.data import AnnDataManager
    from scvi.model.base import BaseModelClass


def fingerprint(adata: AnnData) -> str:
    """Identify an AnnData by its cell names and size (used to match a query to its alignment)."""
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(str(adata.n_obs).encode())
    for name in adata.obs_names:
        digest.update(name.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def is_registered(model: BaseModelClass, adata: AnnData) -> bool:
    """Whether ``adata`` is read as the AnnData the model was set up with.

    That AnnData itself, or a copy or view of it with the model's genes in the model's order:
    they carry its scvi-tools id, and their reference and query cells keep their roles. A
    copy whose genes were reordered or subset is a query, reindexed by gene name: scvi's
    lookup by id would transfer the setup to it unchecked and read its genes in their new
    order (a copy with its genes reversed was called at random: 0.12 of a synthetic query
    right instead of 0.90).
    """
    registered = model.adata
    if registered is None:
        return False
    if adata is registered:
        return True
    same_id = adata.uns.get(SCVI_UUID_KEY) == registered.uns.get(SCVI_UUID_KEY)
    return same_id and adata.var_names.equals(registered.var_names)


def prepare_query(
    model: BaseModelClass,
    adata: AnnData,
    *,
    input_type: str,
    gene_symbols: str | None = None,
    id_map: Any = None,
    layer: str | None = None,
) -> tuple[AnnData, dict | None]:
    """Return an AnnData registered with ``model`` whose genes are the reference genes.

    The AnnData the model was set up with, or a copy of it with the model's genes in order
    (:func:`is_registered`), is validated, checked to still hold the model's input type, and
    returned as is. Any other AnnData is checked (same expression type as the reference),
    reindexed to the reference genes with zero-filling (overlap under 50% raises, under 90%
    warns) and wrapped in a light AnnData that shares its matrix; the user's object is never
    modified. Cells without any count in the model's genes and duplicated cell names
    warn (see :func:`empty_cells`).

    ``layer`` names the query's layer holding the expression data; ``None`` reads the layer
    the model was set up with (``X`` if none) and ``"X"`` reads ``X``.

    Returns
    -------
    The registered AnnData and the gene-overlap report (``None`` for registered data).
    """
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"Expected an AnnData, got {type(adata).__name__}. Read your data with "
            "`anndata.read_h5ad` (or build an AnnData) first."
        )
    setup_args = model.adata_manager.registry["setup_args"]
    model_layer = setup_args.get("layer")
    if is_registered(model, adata):
        if layer is not None:
            raise ValueError(
                f"layer={layer!r} selects the data of a query, but this AnnData is registered "
                f"with the model, which reads its {_matrix_label(model_layer)} as set up. "
                "Leave layer= out."
            )
        check_registered_input_type(adata, layer=model_layer, input_type=input_type)
        if adata is model.adata:
            return model._validate_anndata(adata), None
        return _registered_copy(model, adata), None

    query_layer = model_layer if layer is None else (None if layer == "X" else layer)
    where = _matrix_label(query_layer)
    if query_layer is not None and query_layer not in adata.layers:
        given = "the layer the model was set up with" if layer is None else "given as layer="
        raise KeyError(
            f"The query has no layer {query_layer!r} ({given}; its layers: "
            f"{list(adata.layers.keys())}). Name the query's layer that holds "
            f"{_INPUT_TYPE_NAMES[input_type]} with `layer=` (e.g. "
            "`model.annotate(query, layer='counts')`), or pass layer='X' to read its X."
        )
    genes = model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
    harmonized, overlap = harmonize_genes(
        adata,
        list(genes),
        gene_symbols=gene_symbols,
        id_map=id_map,
        layer=query_layer,
        name="query",
    )
    # checked after harmonisation, so duplicated names resolved by gene_symbols/id_map pass;
    # check_input's warning about empty cells is replaced by the one below
    detected, stats = _validate_matrix(harmonized, layer=None, name="query")
    if detected != input_type:
        raise ValueError(
            f"The query ({where}) looks {detected!r} but the model was trained on "
            f"{input_type!r} data. Give the query in the same form as the reference "
            f"({_INPUT_TYPE_NAMES[input_type]}): name the layer that holds them with `layer=` "
            f"(e.g. `model.annotate(query, layer='counts')`), or put them in {where}."
        )
    if stats["n_zero_rows"]:
        warn_empty_cells(stats["n_zero_rows"], harmonized.n_obs, len(genes))
    _warn_duplicated_obs_names(adata, "query")
    obs = pd.DataFrame(index=adata.obs_names.copy())
    batch_key = setup_args.get("batch_key")
    if batch_key is not None:
        obs[batch_key] = (
            adata.obs[batch_key].astype(str).values if batch_key in adata.obs else "query"
        )
    with warnings.catch_warnings():
        # a query has no labels by design: scvi's "Missing labels key" warning is noise here
        warnings.filterwarnings("ignore", message="Missing labels key")
        light = _light_registered(
            model, harmonized.X, obs, genes, extend_categories=True, allow_missing_labels=True
        )
    return light, overlap


def _registered_copy(model: BaseModelClass, adata: AnnData) -> AnnData:
    """Return a light AnnData over a copy or view of the registered data, for one call.

    It shares the matrix the model reads and the registered columns (labels, batch), so its
    reference and query cells keep their roles. scvi's own lookup by id would transfer the
    setup to the copy itself: it writes a new id into the user's ``uns`` and keeps the copy
    registered, so in memory, for the model's lifetime.
    """
    setup_args = model.adata_manager.registry["setup_args"]
    layer = setup_args.get("layer")
    columns = [setup_args[k] for k in ("labels_key", "batch_key") if setup_args.get(k)]
    matrix = adata.X if layer is None else adata.layers[layer]
    return _light_registered(model, matrix, adata.obs[columns].copy(), adata.var_names)


def _light_registered(
    model: BaseModelClass, matrix: Any, obs: pd.DataFrame, genes: Sequence[str], **transfer
) -> AnnData:
    """Return an AnnData of ``matrix`` (where the model reads it), registered for one call.

    ``transfer``: keyword arguments of scvi's ``transfer_fields``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Observation names are not unique")  # warned
        light = AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(genes).copy()))
    layer = model.adata_manager.registry["setup_args"].get("layer")
    if layer is not None:
        light.layers[layer] = matrix
    register_for_one_call(model, model.adata_manager.transfer_fields(light, **transfer))
    return light


def register_for_one_call(model: BaseModelClass, manager: AnnDataManager) -> None:
    """Register the manager of an AnnData built for one call, so the model can release it.

    It is registered with the model's class and with the model, as ``setup_anndata`` and a
    model's ``__init__`` register the reference: scvi's public
    :meth:`~scvi.model.base.BaseModelClass.deregister_manager`, which the model's ``_release``
    calls when the call is done, looks the AnnData up in the class's store and removes it
    from both. The AnnData is marked (``uns["_lt_query"]``) as one ``_release`` may forget.
    """
    manager.adata.uns["_lt_query"] = True
    type(model).register_manager(manager)
    model._register_manager_for_instance(manager)


#: Start of the warning about query cells without counts (filtered per chunk of a backed query).
EMPTY_CELLS_WARNING = "query cells have no counts in the model's"


def warn_empty_cells(n_empty: int, n_obs: int, n_genes: int, stacklevel: int = 6) -> None:
    """Warn that ``n_empty`` of ``n_obs`` query cells have no counts in the model's genes."""
    warnings.warn(
        f"{n_empty} of {n_obs} {EMPTY_CELLS_WARNING} {n_genes} genes: their calls would rest "
        "on the model's biases alone, so annotate() marks them rejected ('Unassigned'). "
        "Remove them first (e.g. `sc.pp.filter_cells(adata, min_counts=1)`) to silence this.",
        UserWarning,
        stacklevel=stacklevel,
    )


def empty_cells(model: BaseModelClass, adata: AnnData) -> np.ndarray:
    """Boolean mask of the cells of a registered ``adata`` without any count in its genes.

    Such cells carry no information: their logits only reflect the network's biases.
    """
    matrix = model.get_anndata_manager(adata, required=True).get_from_registry(REGISTRY_KEYS.X_KEY)
    mask = np.zeros(adata.n_obs, dtype=bool)
    for start, stop, block in _iter_row_chunks(matrix):
        mask[start:stop] = ~_nonzero_rows(block)
    return mask
