"""Register a reference (+ query) AnnData for the models of the package."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data import check_input, check_labels

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
    data, label column problems) with errors that name the fix. When scvi re-runs the setup
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
        check_labels(adata.obs[labels_key], unlabeled_category=unlabeled_category)
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
