"""The base class of every model.

Setup, the registered reference's types and genes, and the concerns it combines: training,
inference, the open-set layer, write-back and save/load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.utils import setup_anndata_dsp

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data import select_features
from labeltransfer.data._peaks import looks_like_peaks, most_open_peaks, peak_weights
from labeltransfer.dataloaders import labelled_mask

from ._annotate import AnnotateMixin
from ._inference import InferenceMixin
from ._mapping import ReferenceMappingMixin
from ._openset_mixin import OpenSetMixin
from ._save_load import SaveLoadMixin
from ._setup import register_anndata, resolve_input_type
from ._training import TrainingMixin

if TYPE_CHECKING:
    from collections.abc import Sequence


class AnnotationMixin(
    TrainingMixin,
    InferenceMixin,
    OpenSetMixin,
    AnnotateMixin,
    SaveLoadMixin,
    ReferenceMappingMixin,
):
    """Set up, train, predict, reject and write annotations: what every model shares.

    A model using this mixin has a module whose ``inference`` returns ``logits`` (cells x
    reference types) and ``z`` (the embedding). Each concern lives in its own mixin, as in
    ``scvi.model.base``: :class:`~labeltransfer.base._training.TrainingMixin`,
    :class:`~labeltransfer.base._inference.InferenceMixin`,
    :class:`~labeltransfer.base._openset_mixin.OpenSetMixin` (calibration, rejection,
    novelty), :class:`~labeltransfer.base._annotate.AnnotateMixin`,
    :class:`~labeltransfer.base._save_load.SaveLoadMixin` and
    :class:`~labeltransfer.base._mapping.ReferenceMappingMixin` (``prepare_query_anndata``,
    ``load_query_data``).
    """

    _default_key: str = "annotation"

    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        layer: str | None = None,
        **kwargs,
    ) -> None:
        """%(summary)s.

        Cells whose label is ``unlabeled_category`` are query cells (used by the
        semi-supervised models, ignored by the supervised loss); the others are the labelled
        reference. The input is checked first (NaN/inf, negative values, duplicated genes,
        empty data, label problems) with errors that name the fix.

        Parameters
        ----------
        %(param_adata)s
        %(param_labels_key)s
        %(param_unlabeled_category)s
        %(param_batch_key)s
        %(param_layer)s
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        register_anndata(
            cls,
            adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            batch_key=batch_key,
            layer=layer,
            setup_method_args=setup_method_args,
            **kwargs,
        )

    @property
    def cell_types(self) -> list[str]:
        """Reference cell types in registry order (the columns of ``predict(soft=True)``)."""
        state = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
        mapping = list(state.categorical_mapping)
        return [c for c in mapping if c != state.unlabeled_category]

    @property
    def output_classes(self) -> list[str]:
        """Classes the model predicts: the columns of ``predict(soft=True)``.

        The reference types (:attr:`cell_types`) for closed-set models; open-world models
        (SCDET) append their novel groups.
        """
        return self.cell_types

    @property
    def labels_key(self) -> str:
        """The ``obs`` column registered as reference labels."""
        return self.adata_manager.registry["setup_args"]["labels_key"]

    def _select_inputs(
        self,
        *,
        input_type: str,
        n_top_genes: int | None,
        features: Sequence[str] | None,
        feature_cells: Literal["reference", "all"] = "reference",
    ) -> tuple[str, list[str], np.ndarray, np.ndarray | None]:
        """Resolve the input type and the model's features on the registered data.

        Returns the input type (detected when ``"auto"``: ``"counts"``, ``"lognorm"`` or
        ``"peaks"``, peak counts read as TF-IDF), the feature names (``features`` as given; else all features for ``None``,
        otherwise the ``n_top_genes`` Seurat HVGs of ``feature_cells`` or, for peaks, the
        peaks open in most of them), their indices among the registered features, and the
        peaks' TF-IDF weights (``None`` unless the input is scATAC-seq peaks:
        ``input_type="peaks"``, or ``"auto"`` on counts whose features are genomic intervals,
        see :mod:`labeltransfer.data._peaks`).
        """
        layer = self.adata_manager.registry["setup_args"].get("layer")
        declared = "auto" if input_type == "peaks" else input_type
        data_type = resolve_input_type(self.adata, layer=layer, input_type=declared)
        if input_type == "peaks" and data_type != "counts":
            raise ValueError(
                "input_type='peaks' needs the peak counts (whole numbers), but the registered "
                "data look log-normalised. Register the raw peak counts "
                "(setup_anndata(..., layer=...)) or pass input_type='lognorm'."
            )
        peaks = input_type == "peaks" or (
            input_type == "auto" and data_type == "counts" and looks_like_peaks(self.adata.var)
        )
        genes = pd.Index(self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names)
        if features is None:
            mask = labelled_mask(self.adata_manager) if feature_cells == "reference" else None
            if n_top_genes is None or n_top_genes >= len(genes):
                idx = np.arange(len(genes))
            elif peaks:
                idx = most_open_peaks(self.adata, layer, n_top_genes, mask)
            else:
                idx = select_features(
                    self.adata,
                    n_top_genes=n_top_genes,
                    layer=layer,
                    input_type=data_type,
                    mask=mask,
                )
            features = [str(g) for g in genes[idx]]
        else:
            features = [str(g) for g in features]
            missing = [g for g in features if g not in genes]
            if missing:
                raise ValueError(
                    f"{len(missing)} requested features are not genes of the AnnData (e.g. "
                    f"{missing[:5]}). Pass names from adata.var_names."
                )
        idx = genes.get_indexer(features)
        if peaks:
            return "peaks", features, idx, peak_weights(self.adata, layer, idx)
        return data_type, features, idx, None
