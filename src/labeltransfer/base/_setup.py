"""Register a reference (+ query) AnnData for the models of the package."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pandas.api.types import CategoricalDtype, infer_dtype
from scvi.data import AnnDataManager
from scvi.data._utils import _make_column_categorical
from scvi.data.fields import CategoricalObsField, LabelsWithUnlabeledObsField, LayerField

from labeltransfer._constants import NOVEL_PREFIX, REGISTRY_KEYS, UNASSIGNED
from labeltransfer.data import check_input, check_labels
from labeltransfer.data._checks import (
    _iter_row_chunks,
    _matrix_label,
    _nonzero_rows,
    _validate_matrix,
)

if TYPE_CHECKING:
    from anndata import AnnData

#: Labels that ``annotate`` writes itself, so a reference type may not carry them.
_RESERVED_LABEL = re.compile(rf"^(?:{re.escape(UNASSIGNED)}|{re.escape(NOVEL_PREFIX)}\d+)$")


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

    On a first setup the input is checked (NaN/inf, negative values, duplicated genes or
    Ensembl ids in several versions, empty data, label column problems, fewer than two cell
    types) with errors that name the fix. Labels must be strings and no reference type may be
    named like an output label (``"Unassigned"``, ``"novel_<i>"``). Duplicated cell names,
    categories of the label column without cells (left out of the model's cell types) and
    cells marked ``unlabeled_category`` that do not look like query cells only warn. When scvi
    re-runs the setup for a saved model or a query (``source_registry`` in ``kwargs``) the
    label column may be absent and new batch categories are accepted.

    A failed registration leaves ``adata`` as it was: the ``_scvi_*`` entries that scvi-tools
    wrote into ``obs`` and ``uns`` before failing are removed (or restored, on a re-setup).
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
        labels = adata.obs[labels_key]
        _check_label_values(labels, labels_key, unlabeled_category)
        counts = check_labels(labels, unlabeled_category=unlabeled_category)
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
        _warn_unused_categories(labels, labels_key, unlabeled_category)
        _warn_unlabelled_reference_cells(adata, labels_key, unlabeled_category, batch_key)
    fields = [
        LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
        CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        _PresentLabelsField(REGISTRY_KEYS.LABELS_KEY, labels_key, unlabeled_category),
    ]
    manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
    with _restored_on_failure(adata):
        manager.register_fields(adata, **kwargs)
    model_cls.register_manager(manager)


class _PresentLabelsField(LabelsWithUnlabeledObsField):
    """Labels field whose cell types are the labels present in the data.

    scvi-tools keeps every category of a categorical column, so a category without cells
    would become a cell type the model can predict but never saw. The registered mapping
    leaves such categories out; the user's column is not changed.
    """

    def register_field(self, adata: AnnData) -> dict:
        """Register the field, without the categories that no cell carries."""
        state = super().register_field(adata)
        mapping = state[self.CATEGORICAL_MAPPING_KEY]
        present = {
            *pd.unique(adata.obs[self._original_attr_key].dropna()),
            self._unlabeled_category,
        }
        kept = [c for c in mapping if c in present]
        if len(kept) < len(mapping):
            state[self.CATEGORICAL_MAPPING_KEY] = _make_column_categorical(
                adata.obs,
                self._original_attr_key,
                self.attr_key,
                categorical_dtype=CategoricalDtype(kept, ordered=True),
            )
        return state


@contextmanager
def _restored_on_failure(adata: AnnData) -> Iterator[None]:
    """On an exception, put ``adata.obs`` and ``adata.uns`` back as they were, and re-raise.

    Only what scvi-tools may write is saved (its ``_scvi_*`` columns and keys); columns and
    keys added by the failed call are removed.
    """
    obs, uns = adata.obs, adata.uns
    columns, keys = list(obs.columns), set(uns.keys())
    saved_obs = {c: obs[c].copy() for c in columns if str(c).startswith("_scvi")}
    saved_uns = {k: uns[k] for k in keys if str(k).startswith("_scvi")}
    try:
        yield
    except BaseException:
        obs, uns = adata.obs, adata.uns
        obs.drop(columns=[c for c in obs.columns if c not in columns], inplace=True)
        for column, values in saved_obs.items():
            obs[column] = values
        for key in [k for k in uns.keys() if k not in keys]:
            del uns[key]
        uns.update(saved_uns)
        raise


def _check_label_values(labels: pd.Series, labels_key: str, unlabeled_category: Any) -> None:
    """Raise unless the labels are strings and no reference type is named like an output."""
    if not isinstance(unlabeled_category, str):
        raise TypeError(
            f"unlabeled_category must be a string, got {unlabeled_category!r} "
            f"({type(unlabeled_category).__name__}). Pass the label of the unlabelled cells as "
            f"a string (e.g. unlabeled_category={str(unlabeled_category)!r} after converting "
            f"the column with `adata.obs[{labels_key!r}].astype(str)`)."
        )
    values = labels.cat.categories if isinstance(labels.dtype, CategoricalDtype) else labels
    kind = infer_dtype(values, skipna=True)
    if kind not in ("string", "empty"):
        examples = ", ".join(map(str, pd.unique(labels.dropna())[:3]))
        raise TypeError(
            f"obs[{labels_key!r}] holds {kind} labels (e.g. {examples}), but cell types must be "
            "strings. Convert the column first: "
            f"`adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}].astype(str)`."
        )
    named = labels[labels != unlabeled_category].astype(str)
    reserved = named[named.str.match(_RESERVED_LABEL)]
    if len(reserved):
        names = sorted(pd.unique(reserved))
        raise ValueError(
            f"obs[{labels_key!r}] has reference cell types named {names} ({len(reserved)} "
            f"cells), but annotate() writes {UNASSIGNED!r} for rejected cells and "
            f"'{NOVEL_PREFIX}<i>' for novel groups, so the calls would be ambiguous. Rename "
            f"them first, e.g. `adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}]"
            f".astype(str).replace({{{names[0]!r}: {names[0] + '_reference'!r}}})`."
        )


def _warn_unused_categories(labels: pd.Series, labels_key: str, unlabeled_category: str) -> None:
    """Warn about categories of the label column that no cell carries (they are not types)."""
    if not isinstance(labels.dtype, CategoricalDtype):
        return
    present = set(pd.unique(labels.dropna()))
    unused = [c for c in labels.cat.categories if c not in present and c != unlabeled_category]
    if not unused:
        return
    shown = ", ".join(map(repr, unused[:10]))
    more = "" if len(unused) <= 10 else f" and {len(unused) - 10} more"
    warnings.warn(
        f"{len(unused)} categories of obs[{labels_key!r}] have no cell ({shown}{more}); they "
        "are left out of the model's cell types (the column itself is not changed). Drop them "
        f"with `adata.obs[{labels_key!r}] = adata.obs[{labels_key!r}]"
        ".cat.remove_unused_categories()` to silence this.",
        UserWarning,
        stacklevel=4,
    )


def _warn_unlabelled_reference_cells(
    adata: AnnData, labels_key: str, unlabeled_category: str, batch_key: str | None
) -> None:
    """Warn when cells labelled ``unlabeled_category`` may be a reference type, not a query.

    They are taken for query cells without a warning when a column separates them from the
    labelled cells: the registered batch, or the ``"reference"``/``"query"`` role column of
    :func:`~labeltransfer.data.concat_reference_query`.
    """
    unlabelled = np.asarray(adata.obs[labels_key] == unlabeled_category)
    if not unlabelled.any():
        return
    columns = [batch_key] if batch_key is not None else []
    columns += [
        c
        for c in adata.obs.columns
        if isinstance(adata.obs[c].dtype, CategoricalDtype)
        and set(adata.obs[c].cat.categories) == {"reference", "query"}
    ]
    for column in columns:
        values = adata.obs[column].astype(str).to_numpy()
        if not set(values[unlabelled]) & set(values[~unlabelled]):
            return
    warnings.warn(
        f"{int(unlabelled.sum())} of {adata.n_obs} cells in obs[{labels_key!r}] are labelled "
        f"{unlabeled_category!r}, the unlabeled_category: they are treated as unlabelled query "
        "cells and left out of the supervised training. If they are a reference cell type, "
        "pass another unlabeled_category (e.g. unlabeled_category='lt_unlabeled'); if they "
        "are query cells, register the column that separates them with batch_key= (or build "
        "the AnnData with lt.data.concat_reference_query) to silence this.",
        UserWarning,
        stacklevel=4,
    )


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
    detected = _detect_input_type(adata, layer=layer, name="reference")
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


def check_registered_input_type(adata: AnnData, *, layer: str | None, input_type: str) -> None:
    """Raise if the data registered with a model no longer hold the model's input type.

    The registered AnnData belongs to the user, who may normalise it in place after training
    (``sc.pp.normalize_total``, ``sc.pp.log1p``); it is then checked as any query would be.
    An all-zero matrix (the placeholder of a model loaded without data) is not checked.
    """
    matrix = adata.layers[layer] if layer is not None else adata.X
    if not _has_nonzero(matrix):
        return
    detected = _detect_input_type(adata, layer=layer, name="registered")
    if detected != input_type:
        where = _matrix_label(layer)
        raise ValueError(
            f"The data registered with the model ({where}) now look {detected!r}, but the "
            f"model was trained on {input_type!r} data: they were changed after setup (e.g. "
            "normalised in place with `sc.pp.normalize_total` / `sc.pp.log1p`). Put the "
            f"{_INPUT_TYPE_NAMES[input_type]} back into {where} (e.g. from a copy or "
            f"`adata.layers`), or pass an AnnData holding them: `model.annotate(adata)`."
        )


#: How the two input types are called in messages.
_INPUT_TYPE_NAMES = {"counts": "raw counts", "lognorm": "log-normalised data"}


def _detect_input_type(adata: AnnData, *, layer: str | None, name: str) -> str:
    """Return ``check_input``'s input type, without its warning and log line (setup gave them).

    No warning filter or logger is changed, so concurrent calls (threads) do not interfere.
    """
    return _validate_matrix(adata, layer=layer, name=name)[0]


def _has_nonzero(matrix) -> bool:
    """Whether a dense or sparse matrix holds any non-zero value (read in row chunks)."""
    return any(_nonzero_rows(block).any() for _, _, block in _iter_row_chunks(matrix))
