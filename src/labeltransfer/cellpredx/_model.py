"""CellPredX: cross-modality label transfer by domain adaptation and deep metric learning."""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

import numpy as np
from anndata import AnnData
from scvi import settings
from scvi.model.base import BaseModelClass

from labeltransfer._constants import SCVI_UUID_KEY
from labeltransfer.base import AnnotationMixin, read_saved_files, register_anndata
from labeltransfer.dataloaders import labelled_mask
from labeltransfer.train._guards import (
    FIT_RULES,
    INPUT_RULES,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    UNIT_OPEN,
    Number,
    OneOf,
    check_arguments,
)

from ._data import CellPredXDataSplitter, query_knn_graph
from ._losses import CellPredXLossConfig
from ._module import CellPredXModule
from ._mudata import (
    build_training_anndata,
    is_mudata,
    query_from_mudata,
    resolve_modalities,
    write_back,
)
from ._trainingplan import CellPredXTrainingPlan

if TYPE_CHECKING:
    from mudata import MuData
    from torch import nn

logger = logging.getLogger(__name__)

#: Loss weights of the paper's four scenarios ("Training details"): the contrastive weight,
#: the feature-alignment weight, the sparse-center weight and the contrastive temperature, and
#: the maximum number of training iterations (minibatch steps).
PRESETS: dict[str, dict[str, float]] = {
    "rna_atac_matched": {
        "cl_weight": 0.06,
        "fa_weight": 0.05,
        "sc_weight": 0.01,
        "temperature": 0.04,
        "max_iterations": 3000,
    },
    "rna_atac_unmatched": {
        "cl_weight": 1.2,
        "fa_weight": 0.05,
        "sc_weight": 0.01,
        "temperature": 0.8,
        "max_iterations": 3000,
    },
    # co-training: the paper's 0.1 for the sparse center weight pulled a strongly shifted
    # query onto the wrong centers (issue 14: 0.59 on cellbench_c2d_strongshift, 0.94 at
    # 0.01); 0.01 is the cross-modality presets' value. A model trained on the reference
    # alone keeps the paper's 0.1 (REFERENCE_ONLY_SC_WEIGHT; docs/user_guide/cellpredx.md,
    # "Presets and defaults")
    "rna_rna": {
        "cl_weight": 0.1,
        "fa_weight": 0.0,
        "sc_weight": 0.01,
        "temperature": 0.8,
        "max_iterations": 200,
    },
    "atac_atac": {
        "cl_weight": 0.1,
        "fa_weight": 0.0,
        "sc_weight": 0.001,
        "temperature": 0.8,
        "max_iterations": 200,
    },
}
#: The paper's sparse center weight, for a model trained on the reference alone (a reference
#: model for mapping), where the preset's co-training value departs from it. The reason for
#: the departure, the query's pseudo-labels, is absent there, and the paper's weight
#: generalises better: a reference-only model called Kang stim107 0.73 right with 0.01 and 0.89
#: with 0.1 (3 seeds).
REFERENCE_ONLY_SC_WEIGHT: dict[str, float] = {"rna_rna": 0.1}
#: Metrics logged every epoch: the names ``early_stopping_monitor`` accepts.
EARLY_STOPPING_METRICS = (
    "validation_center_loss",
    "validation_loss",
    "validation_accuracy",
    "train_loss",
    "train_ce_loss",
    "train_pr_loss",
    "train_contrastive_loss",
    "train_alignment_loss",
    "train_center_loss",
    "train_accuracy",
    "train_pseudo_labelled_fraction",
)
#: Valid values of :class:`CellPredX`'s arguments, checked when it is created (the loss
#: weights and the temperature by :class:`~labeltransfer.cellpredx.CellPredXLossConfig`).
_INIT_RULES = {
    **INPUT_RULES,
    "preset": OneOf(("auto", *PRESETS)),
    "n_latent": POSITIVE_INT,
    "n_hidden": Number(low=1, integer=True, optional=True),
    "theta": UNIT_OPEN,
}
#: Valid values of :meth:`CellPredX.train`'s arguments, checked before any computation.
_TRAIN_RULES = {
    **FIT_RULES,
    "max_epochs": Number(low=1, integer=True, optional=True),
    "n_neighbors": POSITIVE_INT,
    "n_pcs": POSITIVE_INT,
    "early_stopping_patience": NON_NEGATIVE_INT,
    "early_stopping_monitor": OneOf(EARLY_STOPPING_METRICS),
}
#: ``train(plan_kwargs=...)`` names that set the objective's hyper-parameters.
_LOSS_FIELDS = frozenset(f.name for f in fields(CellPredXLossConfig))
#: Key of ``mdata.uns`` linking a MuData to the training AnnData built by ``setup_mudata``.
_MUDATA_LINK = "_lt_cellpredx_uuid"


class CellPredX(AnnotationMixin, BaseModelClass):
    """CellPredX: cross-modality cell-type annotation (Liu et al., PLoS Comput. Biol. 2025).

    A feature extractor (the model's input genes -> 64-d embedding, a linear layer) and a
    linear classifier are trained on the labelled reference and the unlabelled query at once,
    with five losses (Liu et al., "Optimization objectives"): cross-entropy on the reference
    (CE), projection regularisation of both minibatches (PR), feature alignment of the query
    cells to their most similar reference cells (FA, top-``p`` matches), a contrastive loss
    that keeps each query cell next to its neighbours in a kNN graph of the query built on 50
    principal components (CL), and a sparse center loss (SC) on reference labels and query
    pseudo-labels whose per-dimension weights come from an attention network (CE-Unit +
    multi-head inclusion/exclusion scores). ``obsm["X_cellpredx"]`` is the 64-d embedding.

    Two set-ups:

    - :meth:`setup_anndata` for RNA->RNA and ATAC->ATAC (peaks): one AnnData, query cells
      carry ``unlabeled_category`` (e.g. from :func:`~labeltransfer.data.concat_reference_query`).
    - :meth:`setup_mudata` for an RNA reference and an ATAC query, paired (the same cells) or
      unpaired (different cells). scvi-tools' MuData fields require every modality in every
      cell, which an unpaired reference and query are not, so CellPredX builds one AnnData
      over the genes shared by the RNA modality and the ATAC cells' gene activity (built with
      :func:`~labeltransfer.data.gene_activity` from the ATAC peaks and the gene coordinates
      given or found in the RNA ``var['interval']``, or reused from a ``gene_activity``
      modality): labelled RNA cells, then unlabelled ATAC cells, names
      ``"<modality>:<cell>"`` and a ``modality`` column. The model is registered on that
      AnnData (``model.adata``); the MuData set-up is recorded in ``model.mudata_setup_`` (saved
      with the model), so ``annotate(mdata)``/``predict(mdata)`` rebuild the ATAC query from
      any MuData of the same kind and ``annotate`` writes the results into the ATAC modality
      and the MuData's global ``obs``. ``save``/``load`` work with or without data;
      ``load(dir, adata=mdata)`` accepts the MuData.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` or MuData registered with
        :meth:`setup_mudata`.
    preset
        Loss weights of one of the paper's scenarios: ``"rna_atac_matched"``,
        ``"rna_atac_unmatched"``, ``"rna_rna"``, ``"atac_atac"`` (see Notes), or ``"auto"``:
        ``rna_atac_matched``/``rna_atac_unmatched`` for a paired/unpaired MuData, ``rna_rna``
        for an AnnData (pass ``"atac_atac"`` for peaks).
    n_top_genes
        Number of highly variable genes (Seurat flavour, on the labelled cells) used as input;
        ``None`` uses every registered gene (for a MuData: every shared gene).
    features
        Explicit list of genes to use instead.
    input_type
        ``"auto"`` detects raw counts vs log-normalised data; counts are turned into
        log(1 + counts per 10,000) per minibatch (CellPredX log-normalises both sets; 10,000
        as its reference implementation).
        ``"peaks"`` (and ``"auto"`` on counts whose features are genomic intervals): scATAC-seq
        peak counts, read as TF-IDF (user guide, *scATAC-seq peaks*).
    n_latent
        Embedding dimensionality (CellPredX: 64).
    n_hidden
        ``None``: the feature extractor is one linear layer (reference implementation; the
        paper does not give its depth). An integer adds a hidden ReLU layer of that width.
    pr_weight, cl_weight, fa_weight, sc_weight, temperature
        Override the preset's loss weights and contrastive temperature. With the preset they
        make :attr:`loss_config`, a :class:`~labeltransfer.cellpredx.CellPredXLossConfig`
        (which checks them when the model is created).
    confidence_threshold
        The paper's rejection rule, applied with ``annotate(rejection="paper")``: cells whose
        confidence is below it are ``"Unassigned"`` (CellPredX: 0.95, "Unknown" in the
        paper). ``None``: the paper rule rejects nothing.
    theta
        Outlier fraction of the per-type confidence thresholds of the default ``"openset"``
        rule, fitted on the held-out reference.
    calibrate
        Fit a temperature on the held-out reference (on by default, as every model; the
        paper thresholds the raw softmax).

    Notes
    -----
    **Presets.** The paper tunes "three hyper-parameters along with the temperature" per
    scenario; their symbols are lost from the published text. The four values are read, in
    the order of the losses' equations (CL Eq. 3, FA Eq. 5, SC Eq. 6, then ``tau``), as the
    CL, FA and SC weights and the temperature: RNA->ATAC matched 0.06, 0.05, 0.01, 0.04;
    unmatched 1.2, 0.05, 0.01, 0.8; RNA->RNA 0.1, 0, 0.1, 0.8; ATAC->ATAC 0.1, 0, 0.001, 0.8
    (FA off within one modality, consistent with the paper's warning that cross-modal
    alignment over-corrects same-modality data). The PR weight is not among them; 0.1 is the
    reference implementation's. Training lasts at most 3000 iterations across modalities and
    200 within one (converted to epochs); early stopping watches the sparse center loss
    (of the held-out reference cells) with a patience of 20 epochs.

    **Choices where the paper is silent** (documented at each function): Adam with weight
    decay 5e-4; FA's ``p = 0.8``; 10 neighbours; pseudo-labels of the most confident quarter
    of each query minibatch enter the SC loss; the attention CE-Unit has ``m`` units.

    **Rejection.** The default is the package's shared open-set layer (``"openset"``). The
    paper's rule (a cell is ``"Unassigned"`` when its confidence is below 0.95) is available
    as ``annotate(rejection="paper")``; measured on real RNA tasks it rejected 80-100% of
    the cells of types the reference has, which is why it is not the default.

    Examples
    --------
    >>> import labeltransfer as lt
    >>> import mudata as md
    >>> rna, atac = lt.data.synthetic_multiome(paired=False)
    >>> mdata = md.MuData({"rna": rna, "atac": atac})
    >>> lt.CellPredX.setup_mudata(
    ...     mdata, labels_key="cell_type", modalities={"rna_layer": "rna", "atac_layer": "atac"}
    ... )
    >>> model = lt.CellPredX(mdata)  # preset "rna_atac_unmatched"
    >>> model.train()
    >>> model.annotate(mdata)  # mdata["atac"].obs["cellpredx"], mdata.obs["cellpredx"], ...
    >>> model.save("cellpredx_model/")
    """

    _module_cls = CellPredXModule
    _default_key = "cellpredx"
    #: Mapping pulls confident query codes to their type's mean reference code (CellPredX's
    #: center loss): without it the linear extractor drifted under the domain adversary
    #: (Kang ctrl -> stim101: 0.57 instead of 0.89; ``benchmarks --suite mapping``).
    _mapping_plan_kwargs: ClassVar[dict[str, Any]] = {"center_weight": 0.1}
    _default_theta = 0.05
    _splitter_cls = CellPredXDataSplitter
    #: The training AnnData and set-up record of each set-up MuData still alive, by the uuid
    #: written to its ``uns`` (see :meth:`_link_mudata`).
    _mudata_links: ClassVar[dict[str, tuple[AnnData, dict[str, Any]]]] = {}

    def __init__(
        self,
        adata: AnnData | MuData | None = None,
        *,
        preset: Literal[
            "auto", "rna_atac_matched", "rna_atac_unmatched", "rna_rna", "atac_atac"
        ] = "auto",
        n_top_genes: int | None = None,
        features: Sequence[str] | None = None,
        input_type: Literal["auto", "counts", "lognorm", "peaks"] = "auto",
        n_latent: int = 64,
        n_hidden: int | None = None,
        pr_weight: float | None = None,
        cl_weight: float | None = None,
        fa_weight: float | None = None,
        sc_weight: float | None = None,
        temperature: float | None = None,
        confidence_threshold: float | None = 0.95,
        theta: float = 0.05,
        calibrate: bool = True,
    ):
        check_arguments(CellPredX.__init__, locals(), _INIT_RULES)
        record = None
        if is_mudata(adata):
            adata, record = self._linked_anndata(adata)
        if preset == "auto":
            if record is not None:
                preset = "rna_atac_matched" if record["paired"] else "rna_atac_unmatched"
            else:
                preset = "rna_rna"
        overrides = {
            "pr_weight": pr_weight,
            "cl_weight": cl_weight,
            "fa_weight": fa_weight,
            "sc_weight": sc_weight,
            "temperature": temperature,
        }
        tuned = {k: v for k, v in PRESETS[preset].items() if k != "max_iterations"}
        #: The objective's hyper-parameters: the preset's, with the arguments given here.
        self.loss_config = CellPredXLossConfig(
            **{**tuned, **{k: v for k, v in overrides.items() if v is not None}}
        )
        super().__init__(adata)
        self.preset_ = preset
        self.loss_weights_ = {
            **self.loss_config.weights,
            "temperature": float(self.loss_config.temperature),
            "max_iterations": PRESETS[preset]["max_iterations"],
        }
        self.mudata_setup_ = record

        input_type, features, feature_idx, peak_weights = self._select_inputs(
            input_type=input_type, n_top_genes=n_top_genes, features=features
        )
        n_labels = len(self.cell_types)
        self.theta = theta
        self._default_theta = theta
        self.calibrate = calibrate
        self.confidence_threshold = confidence_threshold
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
            n_latent=n_latent,
            n_hidden=n_hidden,
        )
        source = (
            f"MuData ({'paired' if record['paired'] else 'unpaired'} RNA -> ATAC gene activity)"
            if record is not None
            else "AnnData"
        )
        self._model_summary_string = (
            f"CellPredX model: {n_labels} cell types, {len(features)} genes ({input_type} "
            f"input), {n_latent}-d embedding, preset {preset!r}, {source}"
        )
        self.training_summary_: dict[str, Any] = {}
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ set-up
    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        labels_key: str,
        unlabeled_category: str = "Unknown",
        batch_key: str | None = None,
        rna_layer: str | None = None,
        atac_layer: str | None = None,
        modalities: dict[str, str] | None = None,
        gene_activity_key: str = "gene_activity",
        gene_coordinates: Any = None,
        gene_activity_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ) -> None:
        """Set up an RNA reference + ATAC query MuData (paired or unpaired cells).

        Builds the ATAC cells' gene activity (or reuses ``mdata.mod[gene_activity_key]``),
        adds it to ``mdata`` as that modality, and registers the training AnnData described in
        the class docstring: the labelled RNA cells and the ATAC cells over their shared genes.

        Parameters
        ----------
        mdata
            MuData with an RNA modality and an ATAC (peaks) and/or gene-activity modality.
        labels_key
            Cell types of the RNA cells: a column of the RNA modality's ``obs`` (or of
            ``mdata.obs``). RNA cells without a label (missing or ``unlabeled_category``) are
            left out. The ATAC cells' own labels, if any, are never used.
        unlabeled_category
            Label of the query cells in the training AnnData.
        batch_key
            Optional batch column (per modality, or in ``mdata.obs``).
        rna_layer
            Layer of the RNA modality with raw counts (``None``: ``X``).
        atac_layer
            Layer of the ATAC modality with raw peak counts (``None``: ``X``).
        modalities
            Modality of each layer argument, ``{"rna_layer": "rna", "atac_layer": "atac"}`` by
            default (scvi's convention).
        gene_activity_key
            Name of the gene-activity modality (reused when present, else built and added).
        gene_coordinates
            Gene coordinates for gene activity: a GTF/GFF path, a gene table (e.g.
            ``hs_genes_hg38.tsv.gz``) or a DataFrame; ``None`` uses the RNA modality's
            ``var['interval']``.
        gene_activity_kwargs
            Passed to :func:`~labeltransfer.data.gene_activity` (``extend_upstream``,
            ``fragments``, ...).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Raises
        ------
        KeyError
            A modality, layer or obs column is missing.
        ValueError
            No gene coordinates, no shared genes, no labelled RNA cell, or bad input data.
        """
        rna_mod, atac_mod = resolve_modalities(modalities)
        adata, record = build_training_anndata(
            mdata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            batch_key=batch_key,
            rna_mod=rna_mod,
            atac_mod=atac_mod,
            rna_layer=rna_layer,
            atac_layer=atac_layer,
            gene_activity_key=gene_activity_key,
            gene_coordinates=gene_coordinates,
            gene_activity_kwargs=gene_activity_kwargs,
        )
        cls._register_training_anndata(
            adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            batch_key=batch_key,
            **kwargs,
        )
        cls._link_mudata(mdata, adata, record)
        logger.info(
            "CellPredX set up %d RNA reference cells and %d ATAC query cells (%s) over %d "
            "shared genes.",
            record["n_reference"],
            record["n_query"],
            "paired" if record["paired"] else "unpaired",
            len(record["genes"]),
        )

    @classmethod
    def _register_training_anndata(
        cls,
        adata: AnnData,
        *,
        labels_key: str,
        unlabeled_category: str,
        batch_key: str | None,
        **kwargs,
    ) -> None:
        """Register the AnnData built from a MuData as if by :meth:`setup_anndata`.

        The registry then names ``setup_anndata``, so :meth:`load` re-registers the saved
        AnnData (or one rebuilt from a MuData) without the MuData.
        """
        setup_method_args = cls._get_setup_method_args(
            cls=cls,
            adata=adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            batch_key=batch_key,
            layer=None,
        )
        register_anndata(
            cls,
            adata,
            labels_key=labels_key,
            unlabeled_category=unlabeled_category,
            batch_key=batch_key,
            layer=None,
            setup_method_args=setup_method_args,
            **kwargs,
        )

    @classmethod
    def _link_mudata(cls, mdata: MuData, adata: AnnData, record: dict[str, Any]) -> None:
        """Link ``mdata`` to the training AnnData built from it, while ``mdata`` lives.

        ``CellPredX(mdata)`` finds the AnnData (registered with the class) through this
        link; a model keeps its own (``model.adata``, ``model.mudata_setup_``). When the
        MuData is collected, the link and the class's registration go: the AnnData, which no
        user holds, lives only as long as its MuData or a model built on it.
        """
        uuid = adata.uns[SCVI_UUID_KEY]
        cls._mudata_links[uuid] = (adata, record)
        mdata.uns[_MUDATA_LINK] = uuid
        weakref.finalize(mdata, cls._unlink_mudata, uuid)

    @classmethod
    def _unlink_mudata(cls, uuid: str) -> None:
        cls._mudata_links.pop(uuid, None)
        # scvi's deregister_manager needs a model instance; this runs when the MuData goes
        cls._setup_adata_manager_store.pop(uuid, None)

    @classmethod
    def _linked_anndata(cls, mdata: MuData) -> tuple[AnnData, dict[str, Any]]:
        uuid = mdata.uns.get(_MUDATA_LINK)
        if uuid is None or uuid not in cls._mudata_links:
            raise ValueError(
                "This MuData is not set up for CellPredX. Call "
                "lt.CellPredX.setup_mudata(mdata, labels_key=...) first."
            )
        return cls._mudata_links[uuid]

    def _mudata_record(self) -> dict[str, Any]:
        if getattr(self, "mudata_setup_", None) is None:
            raise TypeError(
                "This CellPredX model was set up with setup_anndata: pass an AnnData with its "
                "genes. MuData queries need a model set up with setup_mudata."
            )
        return self.mudata_setup_

    def _prepare(self, adata, **harmonize_kwargs):
        if is_mudata(adata):
            adata, _ = query_from_mudata(adata, self._mudata_record())
        return super()._prepare(adata, **harmonize_kwargs)

    # ------------------------------------------------------------------ training
    _train_arguments = {
        "max_epochs": (int | None, None),
        "train_size": (float, 0.9),
        "batch_size": (int, 512),
        "lr": (float, 1e-3),
        "weight_decay": (float, 5e-4),
        "n_neighbors": (int, 10),
        "n_pcs": (int, 50),
        "early_stopping": (bool, True),
        "early_stopping_patience": (int, 20),
        "early_stopping_monitor": (str, "validation_center_loss"),
    }
    _train_rules = _TRAIN_RULES
    _plan_cls = CellPredXTrainingPlan
    _plan_extra = _LOSS_FIELDS
    _no_query_message = (
        "No unlabelled query cells are registered: training CellPredX on the reference "
        "only (CE, PR and SC on reference cells). Register reference and query together "
        "(lt.data.concat_reference_query or setup_mudata) for domain adaptation."
    )
    _train_doc = """Train on the labelled reference and the unlabelled query cells together.

        The query's kNN graph (``n_neighbors`` neighbours on ``n_pcs`` principal components
        of its log-normalised input genes) is built first; it lives only for this training
        (it is not part of the saved model). Every step takes a reference and a query
        minibatch of ``batch_size`` cells, each query cell with one random neighbour, and
        minimises the preset's weighted sum of the five losses
        (:class:`~labeltransfer.cellpredx.CellPredXTrainingPlan`). Validation uses a
        stratified 10%% of the reference; the weights of the epoch with the best validation
        accuracy are kept, then the rejection thresholds are fitted.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs; ``None`` converts the preset's maximum iterations
            (3000 across modalities, 200 within one) into epochs of
            ``ceil(max(reference, query cells) / batch_size)`` steps.
        train_size
            Fraction of the labelled cells used for training.
        batch_size
            Cells of each of the reference and query minibatches (CellPredX: 512).
        lr
            Initial Adam learning rate (CellPredX: 0.001).
        weight_decay
            Weight decay (reference implementation: 5e-4).
        n_neighbors
            Neighbours per query cell in the kNN graph (reference implementation: 10).
        n_pcs
            Principal components of the query for the kNN graph (CellPredX: 50).
        early_stopping
            Stop when ``early_stopping_monitor`` has not decreased for
            ``early_stopping_patience`` epochs.
        early_stopping_patience
            Patience in epochs (CellPredX: the sparse loss unchanged over 20 rounds).
        early_stopping_monitor
            Logged metric, one of :data:`EARLY_STOPPING_METRICS` (lower is better unless it
            contains ``"accuracy"``). The default, the sparse center loss of the held-out
            reference cells, becomes the validation cross-entropy when the SC loss is
            switched off (``sc_weight=0``).
        %(param_accelerator)s
        %(param_devices)s
        plan_kwargs
            Hyper-parameters of the objective for this training, fields of
            :class:`~labeltransfer.cellpredx.CellPredXLossConfig` overriding
            :attr:`loss_config` (the preset's weights, ``top_p``,
            ``pseudo_label_quantile``, ...), and arguments of
            :class:`~labeltransfer.cellpredx.CellPredXTrainingPlan`.
        datasplitter_kwargs
            Passed to :class:`~labeltransfer.cellpredx.CellPredXDataSplitter`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar``).

        Raises
        ------
        ValueError
            An argument (or a ``plan_kwargs`` value) is out of its range, checked before
            any computation.
        TypeError
            ``plan_kwargs`` or ``trainer_kwargs`` has a name nothing accepts.
        """

    def _plan_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Return the plan's arguments with :attr:`loss_config` updated by ``plan_kwargs``."""
        plan_kwargs = super()._plan_options(arguments)
        loss_options = {k: plan_kwargs.pop(k) for k in _LOSS_FIELDS & set(plan_kwargs)}
        config = replace(plan_kwargs.pop("config", None) or self.loss_config, **loss_options)
        return {**plan_kwargs, "config": config}

    def _prepare_training(self, arguments: dict[str, Any], options: dict[str, Any]) -> None:
        """Build the query's kNN graph; convert the preset's iterations into epochs."""
        mask = labelled_mask(self.adata_manager)
        use_query, n_query = arguments["use_query"], arguments["n_query"]
        knn = None
        if use_query and options["config"].cl_weight > 0:
            setup_args = self.adata_manager.registry["setup_args"]
            knn = query_knn_graph(
                self.adata,
                np.flatnonzero(~mask),
                feature_idx=self.module.feature_idx.cpu().numpy(),
                layer=setup_args.get("layer"),
                input_type=self.module.input_type,
                n_neighbors=arguments["n_neighbors"],
                n_pcs=arguments["n_pcs"],
                seed=settings.seed,
            )
        arguments["knn"] = knn
        if not use_query:
            options["config"] = self._reference_only_config(options["config"], arguments)
        if arguments["max_epochs"] is None:
            batch_size = arguments["batch_size"]
            n_ref_train = int(mask.sum() * arguments["train_size"])
            steps = math.ceil(max(n_ref_train, n_query if use_query else 0, 1) / batch_size)
            arguments["max_epochs"] = max(
                1, math.ceil(self.loss_weights_["max_iterations"] / steps)
            )

    def _reference_only_config(
        self, config: CellPredXLossConfig, arguments: dict[str, Any]
    ) -> CellPredXLossConfig:
        """Return ``config`` with the paper's sparse center weight, unless one was given."""
        paper = REFERENCE_ONLY_SC_WEIGHT.get(self.preset_)
        given = self.init_params_["non_kwargs"].get("sc_weight") is not None or "sc_weight" in (
            arguments["plan_kwargs"] or {}
        )
        return config if paper is None or given else replace(config, sc_weight=paper)

    def _splitter_kwargs(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return {"knn": arguments["knn"]}

    def _early_stopping_monitor(self, arguments: dict[str, Any], plan: Any) -> str:
        monitor = arguments["early_stopping_monitor"]
        if monitor == "validation_center_loss" and plan.config.sc_weight == 0:
            # the center loss is not optimised (an ablation): watch the cross-entropy
            return "validation_loss"
        return monitor

    def _after_training(self, arguments: dict[str, Any], plan: Any) -> dict[str, Any]:
        config, knn = plan.config, arguments["knn"]
        self.loss_weights_ = {**self.loss_weights_, **config.weights}  # as trained
        return {
            "preset": self.preset_,
            "loss_weights": config.weights,
            "temperature": float(config.temperature),
            "top_p": float(config.top_p),
            "n_neighbors": int(arguments["n_neighbors"]) if knn is not None else 0,
            "n_pcs": int(arguments["n_pcs"]) if knn is not None else 0,
        }

    # ------------------------------------------------------------------ outputs
    def _mapping_encoder(self) -> nn.Module:
        """Return the feature extractor, fine-tuned per query; classifier and centers stay."""
        return self.module.encoder

    def _extra_uns(self, adata: AnnData, inference_kwargs: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "preset": self.preset_,
            "loss_weights": {k: float(v) for k, v in self.loss_weights_.items()},
            **self._mapping_uns(),
        }
        record = getattr(self, "mudata_setup_", None)
        if record is not None:
            extra["mudata"] = {
                "rna_mod": record["rna_mod"],
                "atac_mod": record["atac_mod"],
                "gene_activity_key": record["gene_activity_key"],
                "gene_activity_source": record["gene_activity_source"],
                "paired": bool(record["paired"]),
                "n_genes": len(record["genes"]),
            }
        return extra

    def annotate(
        self,
        adata: AnnData | MuData | None = None,
        *,
        key_added: str | None = None,
        rejection: Any = "default",
        novel: str | bool = "auto",
        copy: bool = False,
        batch_size: int | None = None,
        gene_symbols: str | None = None,
        id_map: Any = None,
        layer: str | None = None,
    ) -> AnnData | MuData | None:
        """Annotate cells and write the standard output fields.

        With an AnnData (or ``None``: the registered AnnData) this is
        :meth:`~labeltransfer.base.AnnotationMixin.annotate`. With a MuData (for a model set up
        with :meth:`setup_mudata`) the ATAC cells are annotated from their gene activity (the
        ``gene_activity`` modality, or computed from the ATAC peaks with the recorded gene
        coordinates) and the fields are written to

        - the ATAC modality (the gene-activity modality if there is no ATAC modality):
          ``obs[K]``, ``obs[K_prediction]``, ``obs[K_confidence]``, ``obs[K_rejected]``,
          ``obs[K_novelty]``, ``obsm[K_probabilities]``, ``obsm[X_K]`` and ``uns[K]``;
        - the MuData: the five ``obs`` columns (cells without an ATAC profile get missing
          values; ``K_rejected`` is then a nullable boolean) and ``uns[K]``.

        Parameters
        ----------
        adata
            AnnData, MuData or ``None``.
        key_added
            Prefix of the written fields (``"cellpredx"`` by default).
        rejection
            ``"default"`` (the shared ``"openset"`` rule), ``"openset"``, ``"per_type"``,
            ``"paper"`` (confidence < 0.95), a float or ``None``; see
            :meth:`~labeltransfer.base.AnnotationMixin.annotate`.
        novel
            ``"auto"`` (uncovered groups become ``novel_<i>``) or ``False``.
        copy
            Write into a copy and return it.
        batch_size
            Minibatch size for inference.
        gene_symbols
            Column of ``adata.var`` with gene names (AnnData queries).
        id_map
            Ensembl-to-symbol table (AnnData queries).
        layer
            Layer of an AnnData query holding its expression data (the set-up layer by
            default; ``"X"`` for ``X``). A MuData is read as the model was set up.

        Returns
        -------
        ``None``, or the annotated copy with ``copy=True``.
        """
        if not is_mudata(adata):
            return super().annotate(
                adata,
                key_added=key_added,
                rejection=rejection,
                novel=novel,
                copy=copy,
                batch_size=batch_size,
                gene_symbols=gene_symbols,
                id_map=id_map,
                layer=layer,
            )
        if layer is not None:
            raise ValueError(
                f"layer={layer!r} is for an AnnData query; a MuData is read from the modalities "
                "the model was set up with. Leave layer= out."
            )
        record = self._mudata_record()
        mdata = adata.copy() if copy else adata
        key = key_added or self._default_key
        query, target = query_from_mudata(mdata, record)
        self._check_output_key(mdata.mod[target], key)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Overwriting the previous annotation")
            super().annotate(
                query, key_added=key, rejection=rejection, novel=novel, batch_size=batch_size
            )
        write_back(mdata, query, key, target)
        return mdata if copy else None

    # ------------------------------------------------------------------ persistence
    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | MuData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> Self:
        """Load a saved model, with or without data.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            ``None`` (the model is restored without data, or with its saved AnnData), an
            AnnData with the model's genes, or, for a model set up with :meth:`setup_mudata`,
            a MuData of the same kind: its training AnnData is rebuilt with the model's genes
            (the ``gene_activity`` modality is computed from the ATAC peaks with the recorded
            gene coordinates and added to it when absent).
        accelerator
            Accelerator to load onto.
        device
            Device index or ``"auto"``.
        prefix
            Prefix of the file names.
        **kwargs
            Passed to :meth:`~labeltransfer.base.AnnotationMixin.load`.

        Returns
        -------
        The trained model.
        """
        if not is_mudata(adata):
            return super().load(
                dir_path,
                adata=adata,
                accelerator=accelerator,
                device=device,
                prefix=prefix,
                **kwargs,
            )
        attr_dict, _, _ = read_saved_files(dir_path, prefix)
        record = attr_dict.get("mudata_setup_")
        if record is None:
            raise TypeError(
                "This model was set up with setup_anndata; load it with an AnnData (or none)."
            )
        training, _ = build_training_anndata(
            adata,
            labels_key=record["labels_key"],
            unlabeled_category=record["unlabeled_category"],
            batch_key=record["batch_key"],
            rna_mod=record["rna_mod"],
            atac_mod=record["atac_mod"],
            rna_layer=record["rna_layer"],
            atac_layer=record["atac_layer"],
            gene_activity_key=record["gene_activity_key"],
            gene_coordinates=(
                None if record.get("coordinates") is None else _coordinates_frame(record)
            ),
            gene_activity_kwargs={
                "gene_types": None,
                **{
                    k: (None if k == "max_width" and v < 0 else v)
                    for k, v in record.get("gene_activity_params", {}).items()
                },
            },
            genes=record["genes"],
        )
        model = super().load(
            dir_path,
            adata=training,
            accelerator=accelerator,
            device=device,
            prefix=prefix,
            **kwargs,
        )
        cls._link_mudata(adata, training, model.mudata_setup_)
        return model


def _coordinates_frame(record: dict[str, Any]):
    import pandas as pd

    return pd.DataFrame(record["coordinates"])
