"""scNym: semi-supervised adversarial neural networks for cell-type annotation."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from anndata import AnnData
from scvi.model.base import BaseModelClass

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base import AnnotationMixin
from labeltransfer.base._training import scaled_epochs, size_scaled_budget
from labeltransfer.train._guards import (
    FIT_RULES,
    INPUT_RULES,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
    UNIT_OPEN,
    Flag,
    Number,
    OneOf,
    check_arguments,
)

from ._module import SCNYMModule
from ._trainingplan import SCNYMTrainingPlan

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

#: Domain names when the adversary separates reference from query cells.
ROLE_DOMAINS = ("reference", "query")
#: Metrics logged every epoch: the names ``early_stopping_monitor`` accepts.
EARLY_STOPPING_METRICS = (
    "validation_loss",
    "validation_accuracy",
    "train_loss",
    "train_supervised_loss",
    "train_consistency_loss",
    "train_adversary_loss",
    "train_adversary_accuracy",
    "train_confident_fraction",
    "train_consistency_weight",
    "train_adversary_weight",
)
#: Valid values of :class:`SCNYM`'s arguments, checked when it is created.
_INIT_RULES = {
    **INPUT_RULES,
    "n_hidden": POSITIVE_INT,
    "n_layers": POSITIVE_INT,
    "dropout_rate": UNIT_OPEN,
    "new_identity_discovery": Flag(),
    "pseudolabel_threshold": UNIT,
    "theta": UNIT_OPEN,
}
#: scNym's epoch budget (400) and patience (40). Above 20,000 registered cells (reference
#: and query) the default budget shrinks as scvi-tools' models' does
#: (:func:`scvi.model._utils.get_max_epochs_heuristic`: ``min(round(20,000 / n x 400), 400)``,
#: at least 1), so a large set runs about as many steps as one of 20,000 cells instead of
#: hours more; the schedules counted in epochs (the ramps, the patience) shrink with it.
PAPER_EPOCHS, PAPER_PATIENCE = 400, 40
#: Valid values of :meth:`SCNYM.train`'s arguments, checked before any computation.
_TRAIN_RULES = {
    **FIT_RULES,
    "max_epochs": Number(low=1, integer=True, optional=True),
    "early_stopping_patience": Number(low=0, integer=True, optional=True),
    "early_stopping_monitor": OneOf(EARLY_STOPPING_METRICS),
    "warmup_fraction": UNIT,
}
#: Valid values of the :class:`~labeltransfer.scnym.SCNYMTrainingPlan` options of
#: ``train(plan_kwargs=...)`` (their defaults are the plan's).
_PLAN_RULES = {
    "mixup_alpha": POSITIVE,
    "temperature": POSITIVE,
    "consistency_max_weight": NON_NEGATIVE,
    "consistency_ramp_epochs": NON_NEGATIVE,
    "adversary_max_weight": NON_NEGATIVE,
    "adversary_ramp_epochs": NON_NEGATIVE,
    "pseudolabel_threshold": UNIT,
    "mask_rate": UNIT_OPEN,
    "mixmatch": Flag(),
}


class SCNYM(AnnotationMixin, BaseModelClass):
    """scNym: semi-supervised adversarial neural networks for cell-type annotation :cite:p:`Kimmel21`.

    A classifier (input -> 256 -> 256 -> types, batch norm, ReLU, dropout) is trained on
    the labelled reference *and* the unlabelled query cells of the registered AnnData at once
    (see :meth:`train`): MixMatch mixes reference cells and sharpened query pseudolabels and
    penalises the classifier's inconsistency on the mixed query cells, and a domain adversary
    on the penultimate embedding, trained through gradient reversal, makes reference and query
    cells indistinguishable there. Every ``batch_key`` category is a domain (multi-domain
    training, e.g. several references and several queries); without ``batch_key`` the domains
    are reference and query. ``obsm["X_scnym"]`` is the penultimate (256-d) embedding.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`: reference cells carry their type,
        query cells the ``unlabeled_category`` (e.g. from
        :func:`~labeltransfer.data.concat_reference_query`).
    n_top_genes
        Number of highly variable genes (Seurat flavour, on the labelled cells) used as
        input; ``None`` (scNym) uses every registered gene.
    features
        Explicit list of genes to use instead.
    input_type
        ``"auto"`` detects raw counts vs log-normalised data; counts are turned into
        log(CPM + 1) per minibatch (scNym).
        ``"peaks"`` (and ``"auto"`` on counts whose features are genomic intervals): scATAC-seq
        peak counts, read as TF-IDF (user guide, *scATAC-seq peaks*).
    n_hidden
        Width of the hidden layers (scNym: 256).
    n_layers
        Number of hidden layers (scNym: 2).
    dropout_rate
        Dropout after each hidden layer. The paper gives no rate; 0.5 is that of the
        reference implementation (``torch.nn.Dropout()``).
    new_identity_discovery
        scNym's pseudolabel thresholding (FixMatch-style): query cells whose pseudolabel
        confidence is below ``pseudolabel_threshold`` are excluded from MixUp and from the
        adversary, so that cell types absent from the reference keep low confidence. Enable
        it when the query may contain new types; it modestly lowers accuracy otherwise
        (scNym: off by default).
    pseudolabel_threshold
        Minimum pseudolabel confidence with ``new_identity_discovery`` (scNym: 0.9).
    confidence_threshold
        The paper's rejection rule, applied with ``annotate(rejection="paper")``: cells whose
        confidence is below this value are ``"Unassigned"`` (scNym flags candidate new cell
        types with confidence <= 0.5). ``None``: the paper rule rejects nothing.
    theta
        Outlier fraction of the per-type confidence thresholds of the default ``"openset"``
        rule, fitted on the held-out reference; 0.05 as for every model of the package.
    calibrate
        Fit a temperature on the held-out reference (on by default, as every model, so that
        confidences mean the same for all; scNym itself reads its raw softmax).

    Notes
    -----
    **Rejection.** The default is the package's shared open-set layer (``"openset"``:
    calibrated per-type confidence thresholds and cells the reference does not cover; see
    the *Calls a user can trust* guide). The paper reads the softmax confidence directly and
    flags cells with confidence <= 0.5 as candidate new types; that rule stays available as
    ``annotate(rejection="paper")`` (confidences equal to the threshold are kept). Measured
    on held-out types, the softmax alone misses them (0% of held-out CD14+ monocytes on
    Kang), which is why it is not the default.

    Examples
    --------
    >>> import labeltransfer as lt
    >>> adata = lt.data.concat_reference_query(
    ...     ref, query, labels_key="cell_type", batch_key="batch"
    ... )
    >>> lt.SCNYM.setup_anndata(
    ...     adata, labels_key="cell_type", unlabeled_category="Unknown", batch_key="batch"
    ... )
    >>> model = lt.SCNYM(adata)
    >>> model.train()
    >>> model.annotate(key_added="scnym")  # all cells; query cells: obs["lt_role"] == "query"
    >>> model.save("scnym_model/")
    """

    _module_cls = SCNYMModule
    _default_key = "scnym"
    _default_theta = 0.05

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_top_genes: int | None = None,
        features: Sequence[str] | None = None,
        input_type: Literal["auto", "counts", "lognorm", "peaks"] = "auto",
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.5,
        new_identity_discovery: bool = False,
        pseudolabel_threshold: float = 0.9,
        confidence_threshold: float | None = 0.5,
        theta: float = 0.05,
        calibrate: bool = True,
    ):
        check_arguments(SCNYM.__init__, locals(), _INIT_RULES)
        super().__init__(adata)
        input_type, features, feature_idx, peak_weights = self._select_inputs(
            input_type=input_type, n_top_genes=n_top_genes, features=features
        )

        batch_key = self.adata_manager.registry["setup_args"].get("batch_key")
        batches = [
            str(b)
            for b in self.adata_manager.get_state_registry(
                REGISTRY_KEYS.BATCH_KEY
            ).categorical_mapping
        ]
        if batch_key is not None and len(batches) >= 2:
            domain_source, self.domains_ = "batch", batches
        else:
            domain_source, self.domains_ = "role", list(ROLE_DOMAINS)

        n_labels = len(self.cell_types)
        self.theta = theta
        self._default_theta = theta
        self.calibrate = calibrate
        self.confidence_threshold = confidence_threshold
        self.new_identity_discovery = new_identity_discovery
        self.pseudolabel_threshold = pseudolabel_threshold
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            n_domains=len(self.domains_),
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
            domain_source=domain_source,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
        )
        cut = self._paper_rule()
        rule = "none" if cut == "none" else f"confidence < {cut}"
        self._model_summary_string = (
            f"scNym model: {n_labels} cell types, {len(features)} genes ({input_type} input), "
            f"{len(self.domains_)} domains ({domain_source}), new identity discovery "
            f"{'on' if new_identity_discovery else 'off'}, paper's rejection rule {rule}"
        )
        self.training_summary_: dict[str, Any] = {}
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------- training
    _train_arguments = {
        "max_epochs": (int | None, None),
        "train_size": (float, 0.9),
        "batch_size": (int, 256),
        "lr": (float, 1.0),
        "weight_decay": (float, 1e-4),
        "early_stopping": (bool, True),
        "early_stopping_patience": (int | None, None),
        "early_stopping_monitor": (str, "validation_loss"),
        "warmup_fraction": (float, 0.05),
    }
    _train_rules = _TRAIN_RULES
    _plan_cls = SCNYMTrainingPlan
    # MixMatch raises the query's confidence: thresholds come from cells trained like the query
    _validation_in_query_stream = True
    _plan_rules = _PLAN_RULES
    _no_query_message = (
        "No unlabelled query cells are registered: training scNym on the reference "
        "only (supervised MixUp, no MixMatch). Concatenate reference and query with "
        "lt.data.concat_reference_query for semi-supervised training."
    )
    _train_doc = """Train on the labelled reference and the unlabelled query cells together.

        Every step takes a reference minibatch and a query minibatch
        (:class:`~labeltransfer.dataloaders.RefQueryDataSplitter`) and minimises
        ``L_CE + lambda_SSL(t) L_SSL + L_adv`` (:class:`~labeltransfer.scnym.SCNYMTrainingPlan`):
        10%% gene masking, MixMatch with pseudolabels sharpened at T = 0.5 and MixUp
        alpha = 0.3 across both sets, the consistency weight ramped to 1 over 100 epochs and the
        reversed adversarial gradient to 0.1 over 20 epochs. Without query cells it is
        supervised MixUp training. Validation uses a stratified 10%% of the reference; the
        weights of the epoch with the best validation accuracy (ties: lowest validation
        loss) after the warm-up are kept, then the rejection thresholds are fitted on the
        validation cells.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs. By default scNym's 400 up to 20,000 registered cells
            (reference and query), then ``round(20,000 / n_cells x 400)`` as scvi-tools'
            models (40 epochs for 200,000 cells; a departure: the paper's 400 would take
            hours on a CPU), with the consistency and adversary ramps and the patience
            scaled by the same factor. Given explicitly, the schedules keep the paper's
            lengths.
        train_size
            Fraction of the labelled cells used for training; the rest is the validation
            split (scNym: 0.9).
        batch_size
            Minibatch size of each of the reference and query minibatches (scNym: 256).
        lr
            Adadelta learning rate (scNym: 1.0).
        weight_decay
            Weight decay (scNym: 1e-4).
        early_stopping
            Stop when ``early_stopping_monitor`` has not improved for
            ``early_stopping_patience`` epochs (scNym).
        early_stopping_patience
            Patience in epochs. The paper gives none; by default the reference
            implementation's 40 (scaled with a default ``max_epochs`` below 400).
        early_stopping_monitor
            Logged metric, one of :data:`EARLY_STOPPING_METRICS` (lower is better unless it
            contains ``"accuracy"``); the reference implementation monitors the validation
            loss.
        warmup_fraction
            Early stopping and best-epoch selection start after this fraction of
            ``max_epochs`` (scNym: 5%%, i.e. 20 of 400 epochs).
        %(param_accelerator)s
        %(param_devices)s
        plan_kwargs
            Passed to :class:`~labeltransfer.scnym.SCNYMTrainingPlan` (``mixup_alpha``,
            ``temperature``, ``consistency_ramp_epochs``, ``adversary_max_weight``, ...).
        datasplitter_kwargs
            Passed to :class:`~labeltransfer.dataloaders.RefQueryDataSplitter`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``callbacks``,
            ``enable_progress_bar``).

        Raises
        ------
        ValueError
            An argument (or a ``plan_kwargs`` value) is out of its range, checked before
            any computation.
        TypeError
            ``plan_kwargs`` or ``trainer_kwargs`` has a name nothing accepts.
        """

    def _check_training(self, arguments: dict[str, Any]) -> None:
        if self.module.domain_source == "batch":
            n_batches = len(
                self.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
            )
            if n_batches > self.module.n_domains:
                raise ValueError(
                    f"The registered AnnData has {n_batches} batch categories but the model's "
                    f"adversary knows {self.module.n_domains} domains ({self.domains_}). Train "
                    "a new model on this AnnData instead."
                )

    def _plan_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return {
            "lr": arguments["lr"],
            "weight_decay": arguments["weight_decay"],
            "pseudolabel_threshold": (
                self.pseudolabel_threshold if self.new_identity_discovery else 0.0
            ),
            **(arguments["plan_kwargs"] or {}),
        }

    def _prepare_training(self, arguments: dict[str, Any], options: dict[str, Any]) -> None:
        """Set the default budget for the number of cells, and the schedules scaled with it."""
        default_budget = arguments["max_epochs"] is None
        scale = size_scaled_budget(arguments, self.adata.n_obs, PAPER_EPOCHS)
        if default_budget:
            plan_defaults = inspect.signature(SCNYMTrainingPlan).parameters
            for ramp in ("consistency_ramp_epochs", "adversary_ramp_epochs"):
                options.setdefault(ramp, plan_defaults[ramp].default * scale)
        if arguments["early_stopping_patience"] is None:
            arguments["early_stopping_patience"] = scaled_epochs(PAPER_PATIENCE, scale)

    def _warmup_epochs(self, arguments: dict[str, Any]) -> int:
        return math.ceil(arguments["warmup_fraction"] * arguments["max_epochs"])

    def _after_training(self, arguments: dict[str, Any], plan: Any) -> dict[str, Any]:
        return {
            "new_identity_discovery": bool(self.new_identity_discovery),
            "pseudolabel_threshold": float(plan.pseudolabel_threshold),
            "domains": list(self.domains_),
            "domain_source": self.module.domain_source,
            "early_stopping_patience": arguments["early_stopping_patience"],
            "consistency_ramp_epochs": float(plan.consistency_ramp_epochs),
            "adversary_ramp_epochs": float(plan.adversary_ramp_epochs),
        }

    def _mapping_encoder(self) -> nn.Module:
        """Return the embedder, fine-tuned per query; the classifier stays."""
        return self.module.embedder

    def _extra_uns(self, adata: AnnData, inference_kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "new_identity_discovery": bool(self.new_identity_discovery),
            "domains": list(self.domains_),
            **self._mapping_uns(),
        }
