"""Register a reference (+ query) AnnData for the models of the package."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data import check_input, check_labels
from labeltransfer.data._checks import _iter_row_chunks, _nonzero_rows

if TYPE_CHECKING:
    from anndata import AnnData


def register_anndata(
    model_cls,
    adata: AnnData,
    *,
    labels_key: str,
    unlabeled_category: str,
    batch_key: str | None,
    layer: str | None,
    setup_method_args: dict,
    **kwargs,
) -> None:
    """Validate ``adata`` and register the expression, label and batch fields.

    On a first setup the input is checked (NaN/inf, negative values, duplicated genes, empty
    data, label column problems, fewer than two cell types) with errors that name the fix;
    duplicated cell names only warn (cells are handled by position). When scvi re-runs the setup
    for a saved model or a query (``source_registry`` in ``kwargs``) the label column may be
    absent and new batch categories are accepted.
    """
    if "source_registry" in kwargs:
        kwargs.setdefault("extend_categories", True)
        kwargs.setdefault("allow_missing_labels", True)
    else:
        check_input(adata, layer=layer, name="reference")
        if labels_key not in adata.obs:
            raise KeyError(
                f"labels_key {labels_key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)}). Pass the column that holds the reference cell types."
            )
        counts = check_labels(adata.obs[labels_key], unlabeled_category=unlabeled_category)
        if len(counts) < 2:
            raise ValueError(
                f"The reference has a single cell type ({counts.index[0]!r}) in "
                f"obs[{labels_key!r}]: a classifier needs at least two. Check labels_key and "
                "unlabeled_category, or add reference cells of other types."
            )
        _warn_duplicated_obs_names(adata, "reference")
        if batch_key is not None and batch_key not in adata.obs:
            raise KeyError(
                f"batch_key {batch_key!r} is not a column of adata.obs (columns: "
                f"{list(adata.obs.columns)}). Pass an existing column or batch_key=None."
            )
    fields = [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
        CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        LabelsWithUnlabeledObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
    ]
    manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    manager.register_fields(adata, **kwargs)
    model_cls.register_manager(manager)


def _warn_duplicated_obs_names(adata: AnnData, name: str) -> None:
    """Warn (once, with examples and the fix) when ``adata.obs_names`` are not unique."""
    if adata.obs_names.is_unique:
        return
    duplicated = adata.obs_names[adata.obs_names.duplicated()].unique()
    examples = ", ".join(map(str, duplicated[:5]))
    warnings.warn(
        f"The {name} has {len(duplicated)} duplicated obs_names (e.g. {examples}); cells are "
        "handled by position, so this works, but the names are ambiguous downstream. Make "
        "them unique with `adata.obs_names_make_unique()`.",
        UserWarning,
        stacklevel=3,
    )


def resolve_input_type(adata: AnnData, *, layer: str | None, input_type: str) -> str:
    """Return the reference's input type: detected for ``"auto"``, else checked on the data.

    Raises
    ------
    ValueError
        If ``input_type`` is not ``"auto"``, ``"counts"`` or ``"lognorm"``, or declares the
        data as something they are not (e.g. ``"counts"`` for non-integer values).
    """
    if input_type not in ("auto", "counts", "lognorm"):
        raise ValueError(f"input_type must be 'auto', 'counts' or 'lognorm', got {input_type!r}.")
    matrix = adata.layers[layer] if layer is not None else adata.X
    if input_type != "auto" and not _has_nonzero(matrix):
        # nothing to check: e.g. the all-zero placeholder of a model loaded without data
        return input_type
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no non-zero value")  # setup said it
        detected = check_input(adata, layer=layer, name="reference")["input_type"]
    if input_type == "counts" and detected != "counts":
        raise ValueError(
            "input_type='counts' but the reference data are not all whole numbers (they look "
            "log-normalised). Register the raw counts (setup_anndata(..., layer='counts')) or "
            "pass input_type='lognorm' (or 'auto')."
        )
    if input_type == "lognorm" and detected != "lognorm":
        raise ValueError(
            "input_type='lognorm' but the reference data are all whole numbers (they look like "
            "raw counts). Register the log-normalised layer (setup_anndata(..., layer=...)) or "
            "pass input_type='counts' (or 'auto')."
        )
    return detected


def _has_nonzero(matrix) -> bool:
    """Whether a dense or sparse matrix holds any non-zero value (read in row chunks)."""
    return any(_nonzero_rows(block).any() for _, _, block in _iter_row_chunks(matrix))
