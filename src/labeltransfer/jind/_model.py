"""JIND: train once on a reference, align each query asymmetrically, reject per cell type."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings
from scvi.model.base import BaseModelClass
from scvi.utils._docstrings import devices_dsp
from torch.utils.data import DataLoader, TensorDataset

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base import AnnotationMixin, fingerprint, register_for_one_call
from labeltransfer.dataloaders import PairedDataLoader, RefQueryDataSplitter, labelled_mask
from labeltransfer.nn import frozen
from labeltransfer.train import (
    AnnotationTrainingPlan,
    BestStateCallback,
    fit_stage,
    record_stage_history,
)
from labeltransfer.train._guards import (
    INPUT_RULES,
    POSITIVE,
    POSITIVE_INT,
    UNIT_OPEN,
    check_arguments,
)

from ._alignment import alignment_record, select_alignment
from ._module import JINDModule
from ._shift import (
    GAP_CELLS,
    GapStopping,
    alignment_failure,
    domain_gap,
    shift_decision,
)
from ._trainingplan import JINDAlignmentPlan

if TYPE_CHECKING:
    from contextlib import AbstractContextManager
    from typing import Any

logger = logging.getLogger(__name__)

#: Valid values of :class:`JIND`'s arguments, checked when it is created.
_INIT_RULES = {
    **INPUT_RULES,
    "n_latent": POSITIVE_INT,
    "n_hidden": POSITIVE_INT,
    "dropout_rate": UNIT_OPEN,
    "class_weight_eps": POSITIVE,
    "theta": UNIT_OPEN,
    "n_reference_codes": POSITIVE_INT,
}


class JIND(AnnotationMixin, BaseModelClass):
    """JIND: Joint Integration and Discrimination for cell-type annotation :cite:p:`Goyal22`.

    A one-layer encoder and a classifier are trained on the labelled reference with a
    class-weighted cross-entropy; per-cell-type rejection thresholds are learned on a held-out
    30% of it. Each query is then aligned *asymmetrically*: a generator shifts and scales the
    query's latent codes until a discriminator cannot tell them from the reference codes,
    while the classifier stays frozen (:meth:`align`). :meth:`self_train` is JIND+.

    Parameters
    ----------
    adata
        Reference AnnData registered with :meth:`setup_anndata`.
    n_top_genes
        Number of highly variable genes (Seurat flavour, computed on the labelled cells) used
        as input (JIND: 5000; all genes when fewer).
    features
        Explicit list of genes to use instead of the highly variable ones.
    input_type
        ``"auto"`` detects raw counts vs log-normalised data; counts are turned into
        log(CPM+1) per minibatch.
        ``"peaks"`` (and ``"auto"`` on counts whose features are genomic intervals): scATAC-seq
        peak counts, read as TF-IDF (user guide, *scATAC-seq peaks*).
    n_latent
        Size of the latent code (JIND: 256).
    n_hidden
        Hidden units of the classifier (JIND: 256).
    dropout_rate
        Dropout of the encoder's hidden layer (JIND: 0.2).
    class_weight_eps
        ``epsilon`` of the class weights ``w_k = 2 / (K (epsilon + n_k))`` (JIND: 0.01).
    theta
        Outlier fraction of the per-type rejection thresholds (JIND: 0.05).
    calibrate
        Fit a temperature on the held-out reference so that confidences are calibrated
        (not in the paper; it does not change any argmax). ``False`` gives the paper's raw
        softmax.
    n_reference_codes
        Number of reference latent codes stored with the model so that :meth:`align` works
        on a loaded model without the reference data.

    Examples
    --------
    >>> import labeltransfer as lt
    >>> lt.JIND.setup_anndata(ref, labels_key="cell_type")
    >>> model = lt.JIND(ref)
    >>> model.train()
    >>> model.align(query, name="donor_2")  # optional: adversarial alignment of this query
    >>> model.annotate(query, key_added="jind")  # uses "donor_2": the same AnnData
    >>> model.annotate(query[:100].copy(), alignment="donor_2")  # a subset: ask for it
    >>> model.save("jind_reference/")

    Notes
    -----
    See the :doc:`user guide </user_guide/jind>` for the losses, defaults and limits, and the
    :doc:`tutorial </tutorials/jind_pbmc68k>`.
    """

    _module_cls = JINDModule
    _default_key = "jind"
    _default_theta = 0.05

    def __init__(
        self,
        adata: AnnData | None = None,
        *,
        n_top_genes: int = 5000,
        features: Sequence[str] | None = None,
        input_type: Literal["auto", "counts", "lognorm", "peaks"] = "auto",
        n_latent: int = 256,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        class_weight_eps: float = 0.01,
        theta: float = 0.05,
        calibrate: bool = True,
        n_reference_codes: int = 10_000,
    ):
        check_arguments(JIND.__init__, locals(), _INIT_RULES)
        super().__init__(adata)
        input_type, features, feature_idx, peak_weights = self._select_inputs(
            input_type=input_type, n_top_genes=n_top_genes, features=features
        )

        labelled = labelled_mask(self.adata_manager)
        n_labels = len(self.cell_types)
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        fractions = np.bincount(codes[labelled], minlength=n_labels)[:n_labels] / max(
            labelled.sum(), 1
        )
        class_weights = 2.0 / (n_labels * (class_weight_eps + fractions))

        self.theta = theta
        self._default_theta = theta
        self.calibrate = calibrate
        self.n_reference_codes = n_reference_codes
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars,
            n_labels=n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
            class_weights=class_weights,
            n_latent=n_latent,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
        )
        self._model_summary_string = (
            f"JIND model: {n_labels} cell types, {len(features)} genes ({input_type} input), "
            f"latent {n_latent}, theta {theta}"
        )
        self.alignments_: dict[str, dict[str, Any]] = {}
        self.self_training_: dict[str, Any] | None = None
        self.training_summary_: dict[str, Any] = {}
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ training
    _train_arguments = {
        "max_epochs": (int, 30),
        "train_size": (float, 0.7),
        "batch_size": (int, 128),
        "lr": (float, 1e-3),
    }
    _plan_cls = AnnotationTrainingPlan
    _uses_query = False
    _train_doc = """Train the encoder and classifier on the labelled reference cells.

        The weights of the epoch with the best validation accuracy are kept (JIND), then a
        temperature and the per-type rejection thresholds are fitted on the validation cells.

        Parameters
        ----------
        max_epochs
            Number of epochs (JIND: 30).
        train_size
            Fraction of the labelled cells used for training; the rest is the validation
            split (JIND: 0.7).
        batch_size
            Minibatch size.
        lr
            Adam learning rate (JIND: 1e-3), halved when the training loss has not improved
            for 5 epochs.
        %(param_accelerator)s
        %(param_devices)s
        plan_kwargs
            Passed to :class:`~labeltransfer.train.AnnotationTrainingPlan`.
        datasplitter_kwargs
            Passed to :class:`~labeltransfer.dataloaders.RefQueryDataSplitter`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``strategy="ddp"``, ``callbacks``).

        Raises
        ------
        ValueError
            An argument is out of its range (checked before any computation).
        TypeError
            ``plan_kwargs`` or ``trainer_kwargs`` has a name nothing accepts.
        """

    def _plan_options(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return self._classifier_plan_kwargs(arguments["lr"], arguments["plan_kwargs"])

    def _training_context(self) -> AbstractContextManager:
        return frozen(self.module.generator, self.module.discriminator)

    def _before_training(
        self,
        splitter: RefQueryDataSplitter,
        arguments: dict[str, Any],
        options: dict[str, Any],
        trainer_kwargs: dict[str, Any],
    ) -> None:
        # the held-out reference cells set the bar of align's stopping rule (``_shift``)
        self._held_out_idx = np.asarray(splitter.val_idx, dtype=int)

    def _after_training(self, arguments: dict[str, Any], plan: Any) -> dict[str, Any]:
        self._store_reference_codes(np.flatnonzero(labelled_mask(self.adata_manager)))
        self.alignments_ = {}
        self.self_training_ = None
        return {}

    @staticmethod
    def _classifier_plan_kwargs(lr: float, plan_kwargs: dict | None) -> dict[str, Any]:
        return {
            "optimizer": "Adam",
            "lr": lr,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "reduce_lr_on_plateau": True,
            "lr_factor": 0.5,
            "lr_patience": 5,
            "lr_scheduler_metric": "train_loss",
            **(plan_kwargs or {}),
        }

    def _store_reference_codes(self, labelled: np.ndarray) -> None:
        rng = np.random.RandomState(settings.seed)
        if labelled.size > self.n_reference_codes:
            labelled = np.sort(rng.choice(labelled, self.n_reference_codes, replace=False))
        codes = self._forward(self.adata, indices=labelled).latent
        self.reference_codes_ = codes.astype(np.float32)
        #: which stored codes are of held-out (validation) reference cells
        self.reference_codes_held_out_ = np.isin(labelled, getattr(self, "_held_out_idx", []))

    # ------------------------------------------------------------------ alignment
    def _fit_query(
        self,
        *,
        max_epochs: int | None,
        batch_size: int,
        accelerator: str,
        devices: int | list[int] | str,
        plan_kwargs: dict[str, Any],
        trainer_kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """After ``load_query_data``: align the query (:meth:`align`; JIND's batch 512)."""
        query = getattr(self, "_query_source", None)
        self.align(
            self.adata if query is None else query,
            name="query",
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            plan_kwargs=plan_kwargs,
            **trainer_kwargs,
        )
        decision = self.alignments_["query"]["decision"]
        return {
            "method": "alignment",
            "alignment": "query",
            "aligned": decision["aligned"],
            "alignment_epochs": decision["epochs"],
        }

    def _feature_names(self) -> list[str]:
        genes = self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
        return [str(g) for g in np.asarray(genes)[self.module.feature_idx.cpu().numpy()]]

    def _inference_kwargs(self, adata: AnnData, alignment: str | None = "auto") -> dict[str, Any]:
        """Select the stored alignment for ``adata`` (see :meth:`align`).

        The alignment goes to ``module.inference`` as a copy of the generator holding its
        weights, so that concurrent calls (threads) with different queries never share one.
        """
        name, matched_by = select_alignment(
            self.alignments_, adata, alignment, self._feature_names()
        )
        if name is None:
            return {}
        generator = copy.deepcopy(self.module.generator)
        generator.load_state_dict(self.alignments_[name]["generator"])
        generator.eval().requires_grad_(False)
        generator.alignment, generator.matched_by = name, matched_by
        return {"generator": generator}

    def _extra_uns(self, adata: AnnData, inference_kwargs: dict[str, Any]) -> dict[str, Any]:
        generator = inference_kwargs.get("generator")
        extra: dict[str, Any] = {"aligned": generator is not None}
        if generator is not None:
            extra["alignment"] = generator.alignment
            extra["alignment_matched_by"] = generator.matched_by
            decision = self.alignments_[generator.alignment].get("decision")
            if decision is not None:  # a skipped alignment is the identity: nothing applied
                extra["aligned"] = decision["aligned"]
                extra["alignment_decision"] = decision
        if self.self_training_ is not None:
            extra["self_training"] = self.self_training_
        return extra

    @devices_dsp.dedent
    def align(
        self,
        adata: AnnData,
        *,
        name: str | None = None,
        max_epochs: int | None = None,
        early_stopping: bool = True,
        batch_size: int = 512,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Align a query onto the reference latent space (JIND's asymmetric integration).

        A generator ``G(x, h) = S(x) * h + B(x)`` starting at the identity is trained
        against a discriminator on the stored reference codes (eq. 3-5, RMSProp, batch 512,
        two discriminator steps per generator step). The encoder and classifier are frozen, so
        the reference model is unchanged and other queries can be aligned later.

        Each alignment is stored (and saved with the model) under ``name``, with a fingerprint
        of the query's content: its shape, cell and gene names and the expression of 256
        evenly spaced cells. :meth:`annotate`, :meth:`predict`,
        :meth:`get_latent_representation` and :meth:`self_train` take ``alignment=``:

        - ``"auto"`` (default): the alignment whose fingerprint is this AnnData's (the same
          data, in memory, backed or as zarr). Another AnnData with the same cell names but
          other values, or a subset of an aligned query, is predicted *without* alignment,
          with a warning naming the alignment to pass explicitly;
        - a name: that alignment, whatever the AnnData (e.g. a subset of the aligned query);
        - ``None``: no alignment.

        With ``early_stopping`` (the default) the alignment goes only as far as the query
        needs: its *domain gap* (the cross-validated AUROC of a logistic regression telling
        the query's codes from the reference's training codes) is measured first and
        compared with that of the held-out reference cells (JIND's 30% validation split).
        A query within 0.05 of that bar is already as close to the reference as unseen
        reference cells are: the alignment is skipped (the stored alignment is the identity
        and ``uns[key]["aligned"]`` is ``False``). Otherwise the aligned query's gap is
        measured every 10 epochs and the alignment stops once it is within 0.05 of the bar.
        An alignment that failed is undone with a warning: one that changed the call of more
        than 30% of the query's cells, or of more than 20% without bringing its gap 0.05
        closer (distribution matching moves whole populations between types when the
        query's types are not in the reference's proportions or when a shift-and-scale
        cannot reach the reference; the measurements are in the user guide, *When to
        align*). The generator is reset to the identity,
        ``aligned`` is ``False`` and the decision's ``reason`` starts with ``"undone"``.
        The decision (gaps, bar, epochs run, whether it stopped early, ``agreement`` and
        ``undone``) is stored in ``alignments_[name]["decision"]`` and written to
        ``uns[key]["alignment_decision"]``.

        The metrics of the last alignment are in ``model.history`` as ``align_<metric>``,
        with ``align_domain_gap`` (epoch 0: before aligning); each alignment's own are in
        ``alignments_[name]["history"]``.

        ``uns[key]`` records ``aligned``, ``alignment`` (the name) and
        ``alignment_matched_by`` (``"fingerprint"`` or ``"requested"``).

        Parameters
        ----------
        adata
            Query AnnData (any gene order).
        name
            Name under which the alignment is stored (``"query_<i>"`` by default); an
            alignment of the same name, or of the same data, is replaced.
        max_epochs
            Passes over the query (the paper gives no number). By default
            ``ceil(2000 / batches per epoch)`` clipped to 20-400, i.e. 2,000 discriminator
            steps for queries of 2,500+ cells and 400 epochs (one step each) for small ones.
        early_stopping
            Skip or stop the alignment when the query is as close to the reference as the
            held-out reference cells are (see above); ``False`` runs ``max_epochs`` always.
        batch_size
            Minibatch size (JIND: 512).
        %(param_accelerator)s
        %(param_devices)s
        plan_kwargs
            Passed to :class:`~labeltransfer.jind.JINDAlignmentPlan`
            (``lr_generator``, ``reg_lambda``, ...).
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer`.
        """
        self._check_if_trained(warn=False)
        if self.self_training_ is not None:
            raise RuntimeError(
                "This model was fine-tuned on a query with self_train (JIND+), so its encoder "
                "no longer matches the stored reference codes. Load the saved reference model "
                "again to align another query."
            )
        registered, overlap = self._prepare(adata)
        name = name or f"query_{len(self.alignments_)}"
        codes = torch.as_tensor(self.reference_codes_)
        reference = DataLoader(
            TensorDataset(codes),
            batch_size=min(batch_size, len(codes)),
            shuffle=True,
            drop_last=len(codes) > batch_size,
        )
        query = self._make_data_loader(
            registered,
            batch_size=batch_size,
            shuffle=True,
            drop_last=registered.n_obs > batch_size,
        )
        loader = PairedDataLoader(reference, query)
        if max_epochs is None:
            max_epochs = int(np.clip(math.ceil(2000 / len(loader)), 20, 400))
        self.module.reset_alignment()
        decision, stopper, agreement = None, None, []
        if early_stopping:
            decision, stopper, agreement = self._alignment_stopping(registered)
        history: dict[str, pd.DataFrame] = {}
        if decision is None or decision["shifted"]:
            plan = JINDAlignmentPlan(self.module, **(plan_kwargs or {}))
            if stopper is not None:
                callbacks = [*trainer_kwargs.pop("callbacks", []), stopper]
                trainer_kwargs["callbacks"] = callbacks
            with frozen(self.module.encoder, self.module.classifier):
                history = fit_stage(
                    self,
                    plan,
                    loader,
                    max_epochs=max_epochs,
                    accelerator=accelerator,
                    devices=devices,
                    **trainer_kwargs,
                )
        if decision is not None:
            decision = self._record_decision(decision, stopper, history, max_epochs)
            if decision["aligned"]:
                decision = self._undo_failed_alignment(decision, agreement, name)
        record = alignment_record(adata, self._feature_names())
        for previous in [
            n for n, a in self.alignments_.items() if a["fingerprint"] == record["fingerprint"]
        ]:
            logger.info("Replacing alignment %r of the same AnnData with %r.", previous, name)
            del self.alignments_[previous]
        self.alignments_[name] = {
            **record,
            "max_epochs": max_epochs,
            "decision": decision,
            "gene_overlap": overlap,
            "generator": {
                k: v.detach().cpu().clone() for k, v in self.module.generator.state_dict().items()
            },
            "history": {k: v.reset_index().to_dict("list") for k, v in history.items()},
        }
        record_stage_history(self, history, "align_")
        self._release(registered)

    def _alignment_stopping(
        self, registered: AnnData
    ) -> tuple[dict[str, Any], GapStopping, list[float]]:
        """Measure the query's gap before aligning; the callback that stops at the bar.

        The callback's measurements also append to the returned list the share of the measured
        cells whose call the alignment left unchanged (for ``_undo_failed_alignment``).
        """
        seed = settings.seed or 0
        held_out = getattr(self, "reference_codes_held_out_", None)
        codes = self.reference_codes_
        if held_out is None or not held_out.any():
            train, held_out_codes = codes, None
        else:
            train, held_out_codes = codes[~held_out], codes[held_out]
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(registered.n_obs, min(GAP_CELLS, registered.n_obs), False))
        unaligned = self._forward(registered, indices=rows)
        decision = shift_decision(train, held_out_codes, unaligned.latent, seed=seed)
        calls, agreement = unaligned.logits.argmax(1), []

        def measure() -> float:
            modes = [(m, m.training) for m in self.module.modules()]
            aligned = self._forward(registered, indices=rows, inference_kwargs={"aligned": True})
            for module, training in modes:
                module.train(training)
            agreement.append(float(np.mean(aligned.logits.argmax(1) == calls)))
            return domain_gap(train, aligned.latent, seed=seed)

        return decision, GapStopping(measure, decision["target"]), agreement

    def _undo_failed_alignment(
        self, decision: dict[str, Any], agreements: list[float], name: str
    ) -> dict[str, Any]:
        """Reset the generator to the identity if the alignment failed (``alignment_failure``).

        ``agreements`` come from the gap measurements, whose last one is the final state (the
        same measurement as ``decision["final_gap"]``); none measured: no call changed.
        """
        agreement = agreements[-1] if agreements else 1.0
        failure = alignment_failure(decision["query_gap"], decision["final_gap"], agreement)
        decision = {**decision, "agreement": agreement, "undone": failure is not None}
        if failure is None:
            return decision
        self.module.reset_alignment()
        decision.update(aligned=False, reason=f"undone: {failure}")
        warnings.warn(
            f"The alignment {name!r} changed the call of {1 - agreement:.0%} of the cells "
            f"(domain gap {decision['query_gap']:.3f} -> {decision['final_gap']:.3f}, the bar "
            f"is {decision['target']:.3f}), so it was undone: the query is predicted without "
            "alignment. Distribution matching fails on a query whose cell types are not in "
            "the reference's proportions, or from another platform or species; a model "
            "trained on reference and query together (SCNYM, CellPredX) may do better. See "
            f"model.alignments_[{name!r}]['decision'].",
            UserWarning,
            stacklevel=settings.warnings_stacklevel + 1,  # the caller of align
        )
        return decision

    @staticmethod
    def _record_decision(
        decision: dict[str, Any],
        stopper: GapStopping,
        history: dict[str, pd.DataFrame],
        max_epochs: int,
    ) -> dict[str, Any]:
        """Complete the alignment's decision; put its gaps into ``history`` (``domain_gap``)."""
        gaps = [(0, decision["query_gap"]), *stopper.gaps]
        epochs = 0 if not decision["shifted"] else (stopper.stopped_epoch or max_epochs)
        history["domain_gap"] = pd.DataFrame(
            {"domain_gap": [g for _, g in gaps]},
            index=pd.Index([e for e, _ in gaps], name="epoch"),
        )
        if not decision["shifted"]:
            reason = "skipped: as close as the held-out reference"
        elif stopper.stopped_epoch is not None:
            reason = "reached the held-out reference's gap"
        else:
            reason = "max_epochs"
        return {
            **decision,
            "aligned": bool(decision["shifted"]),
            "epochs": int(epochs),
            "max_epochs": int(max_epochs),
            "stopped_early": stopper.stopped_epoch is not None,
            "reason": reason,
            "final_gap": float(gaps[-1][1]),
        }

    @devices_dsp.dedent
    def self_train(
        self,
        adata: AnnData,
        *,
        alignment: str | None = "auto",
        theta: float = 0.3,
        max_epochs: int = 10,
        batch_size: int = 32,
        lr: float = 1e-4,
        train_size: float = 0.7,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        **trainer_kwargs,
    ) -> None:
        """JIND+: fine-tune encoder and classifier on the query's confident predictions.

        Query cells whose confidence exceeds the per-type threshold for outlier fraction
        ``theta`` (computed on the held-out reference) become pseudo-labelled training cells;
        the alignment of this query (if any, chosen by ``alignment``) is used and kept fixed. The best epoch on a 30%
        validation part of those cells is kept. The model is then specific to this query.
        If the fine-tuning fails or is interrupted (Ctrl+C), the reference weights are put back.
        The fine-tuning's metrics are in ``model.history`` as ``self_train_<metric>``.

        Parameters
        ----------
        adata
            Query AnnData.
        alignment
            ``"auto"`` (the alignment learned on this AnnData, if any), the name of a stored
            alignment, or ``None``; see :meth:`align`.
        theta
            Outlier fraction selecting confident cells (JIND+: 0.3).
        max_epochs
            Epochs (JIND+: 10).
        batch_size
            Minibatch size (JIND+: 32).
        lr
            Adam learning rate (JIND+: 1e-4).
        train_size
            Fraction of the confident cells used for training (JIND+: 0.7).
        %(param_accelerator)s
        %(param_devices)s
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer`.
        """
        self._check_if_trained(warn=False)
        registered, _ = self._prepare(adata)
        inference_kwargs = self._inference_kwargs(adata, alignment)
        generator = inference_kwargs.pop("generator", None)
        if generator is not None:  # trained on the module's device: its own generator
            self.module.generator.load_state_dict(generator.state_dict())
            inference_kwargs["aligned"] = True
        logits = self._forward(
            registered, inference_kwargs=inference_kwargs, return_latent=False
        ).logits
        probs = self._probabilities(logits)
        prediction = probs.argmax(axis=1)
        thresholds = self.rejection_thresholds(theta).to_numpy()
        confident = probs.max(axis=1) > thresholds[prediction]
        if confident.sum() < 10:
            raise ValueError(
                f"Only {int(confident.sum())} query cells pass the theta={theta} thresholds; "
                "JIND+ needs confident cells. Increase theta or align the query first."
            )
        pseudo = self._pseudo_labelled(registered, prediction, confident)
        splitter = RefQueryDataSplitter(
            self.get_anndata_manager(pseudo, required=True),
            train_size=train_size,
            batch_size=batch_size,
        )
        splitter.setup()
        plan = AnnotationTrainingPlan(
            self.module,
            inference_kwargs=inference_kwargs,
            **self._classifier_plan_kwargs(lr, None),
        )
        best = BestStateCallback("validation_accuracy", mode="max")
        trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), best]
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        reference_state = copy.deepcopy(self.module.state_dict())
        try:
            with frozen(self.module.generator, self.module.discriminator):
                history = fit_stage(
                    self,
                    plan,
                    splitter.train_dataloader(),
                    val_dataloader=splitter.val_dataloader(),
                    max_epochs=max_epochs,
                    accelerator=accelerator,
                    devices=devices,
                    **trainer_kwargs,
                )
        except BaseException:  # interrupted: give back the reference model, not a half-tuned one
            self.module.load_state_dict(reference_state)
            raise
        self.self_training_ = {
            "fingerprint": fingerprint(adata),
            "alignment": None if generator is None else generator.alignment,
            "theta": theta,
            "n_confident": int(confident.sum()),
            "best_epoch": best.best_epoch,
            "best_validation_accuracy": best.best_score,
        }
        record_stage_history(self, history, "self_train_")
        self._release(registered)
        self._release(pseudo)

    def _pseudo_labelled(
        self, registered: AnnData, prediction: np.ndarray, confident: np.ndarray
    ) -> AnnData:
        """Build a light AnnData sharing the query matrix, labelled with confident calls."""
        args = self.adata_manager.registry["setup_args"]
        unlabeled = self.adata_manager.get_state_registry(
            REGISTRY_KEYS.LABELS_KEY
        ).unlabeled_category
        labels = np.asarray(self.cell_types, dtype=object)[prediction]
        labels[~confident] = unlabeled
        obs = pd.DataFrame({args["labels_key"]: labels}, index=registered.obs_names)
        if args.get("batch_key") is not None:
            obs[args["batch_key"]] = registered.obs[args["batch_key"]].astype(str).values
        pseudo = AnnData(X=registered.X, obs=obs, var=registered.var[[]])
        if args.get("layer") is not None:
            pseudo.layers[args["layer"]] = registered.layers[args["layer"]]
        manager = self.adata_manager.transfer_fields(pseudo, extend_categories=True)
        register_for_one_call(self, manager)  # for this fine-tuning only
        return pseudo
