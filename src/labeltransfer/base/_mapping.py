"""Reference mapping (scArches style): ``prepare_query_anndata`` and ``load_query_data``.

A reference model is trained once on the labelled reference alone and saved; each new query
is then mapped without the reference data: ``load_query_data`` loads a *copy* of the
reference model (a saved folder or a model object, which is never modified) with the query
as its data, and ``train()`` fits what the method fits per query (:meth:`_fit_query`):

- JIND: its GAN alignment of that query (:meth:`~labeltransfer.JIND.align`);
- scNym, scDET, CellPredX: the encoder is fine-tuned on the query alone, the classifier
  frozen, with the *reference codes* saved with the model (the encoder's embedding of a
  stratified bank of at most :data:`N_REFERENCE_CODES` labelled reference cells, with their
  types) standing in for the reference cells in the domain adversary, and the query's own
  pseudo-labels in the consistency (and, for CellPredX, class-center) loss; see
  :class:`~labeltransfer.train.QueryAdaptationPlan`.

The open-set layer (calibration, per-type thresholds, coverage space) is the reference
model's, kept unchanged: it is fitted on reference cells, which mapping does not see.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi import settings
from torch.utils.data import DataLoader, TensorDataset

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.data import harmonize_genes
from labeltransfer.dataloaders import PairedDataLoader, labelled_mask
from labeltransfer.nn import frozen
from labeltransfer.train._query_plan import QueryAdaptationPlan
from labeltransfer.train._runner import fit_stage, record_stage_history

from ._query import fingerprint
from ._reference_space import bank_rows
from ._save_load import read_saved_files

if TYPE_CHECKING:
    from torch import nn

#: Most reference codes saved with a model for mapping (stratified by type).
N_REFERENCE_CODES = 2_000
#: Optimiser steps of a query fine-tuning when ``max_epochs`` is not given ...
MAPPING_STEPS = 1_000
#: ... clipped to this many epochs.
MAPPING_EPOCHS = (10, 200)
#: Most query cells drawn to choose the safeguard's anchors from ...
N_ANCHOR_CANDIDATES = 2_000
#: ... of which this most confidently called fraction are the anchors.
ANCHOR_FRACTION = 0.5
#: ``train()`` arguments that apply to the per-query fit after ``load_query_data``.
MAPPING_ARGUMENTS = ("max_epochs", "batch_size", "accelerator", "devices", "plan_kwargs")


class ReferenceMappingMixin:
    """Map a query onto a saved reference model without the reference data."""

    #: Keyword arguments of :class:`~labeltransfer.train.QueryAdaptationPlan` for this model.
    _mapping_plan_kwargs: ClassVar[dict[str, Any]] = {}
    #: Fraction of the drawn query cells that are the safeguard's anchors.
    _mapping_anchor_fraction: ClassVar[float] = ANCHOR_FRACTION

    # ------------------------------------------------------------------ public API
    @classmethod
    def prepare_query_anndata(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | Any,
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ) -> AnnData | pd.Index | None:
        """Reindex a query to the reference model's genes, as scvi-tools' ``ArchesMixin``.

        Reference genes missing from the query are zero-filled and query genes the model
        does not know are dropped, in ``X`` and in every layer; ``obs``, ``obsm``, ``obsp``
        and ``uns`` are kept. The gene-overlap report (``n_shared``, ``overlap``,
        ``n_missing``, ...) goes to ``uns["lt_gene_overlap"]``; an overlap under 50% raises
        and under 90% warns. :meth:`load_query_data`, ``annotate`` and ``predict`` reindex
        by themselves, so this step is optional.

        Parameters
        ----------
        adata
            The query.
        reference_model
            A saved model's folder or a model object of this class.
        return_reference_var_names
            Return only the reference model's genes (a :class:`pandas.Index`).
        inplace
            Reindex ``adata`` itself (scvi-tools' default); ``False`` returns a new AnnData.

        Returns
        -------
        The reference genes, the new AnnData (``inplace=False``) or ``None``.
        """
        genes = pd.Index(cls._reference_genes(reference_model)).astype(str)
        if return_reference_var_names:
            return genes
        if not isinstance(adata, AnnData):
            raise TypeError(
                f"Expected an AnnData, got {type(adata).__name__}. Read your data with "
                "`anndata.read_h5ad` first."
            )
        matrix, report = harmonize_genes(adata, list(genes), name="query")
        layers = {
            name: harmonize_genes(adata, list(genes), layer=name, name="query")[0].X
            for name in adata.layers
        }
        uns = {**adata.uns, "lt_gene_overlap": report}
        var = pd.DataFrame(index=genes)
        if not inplace:
            return AnnData(
                X=matrix.X,
                obs=adata.obs.copy(),
                var=var,
                uns=uns,
                obsm=dict(adata.obsm),
                obsp=dict(adata.obsp),
                layers=layers,
            )
        # as scvi-tools' prepare_query_anndata: the object keeps its identity
        adata._init_as_actual(
            X=matrix.X,
            obs=adata.obs,
            var=var,
            uns=uns,
            obsm=dict(adata.obsm),
            obsp=dict(adata.obsp),
            layers=layers,
        )
        return None

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: str | os.PathLike | Any,
        *,
        accelerator: str = "auto",
        device: int | str = "auto",
        **harmonize_kwargs,
    ) -> Self:
        """Return a copy of the reference model with the query as its data, ready to map it.

        No reference data are needed: the saved model holds what mapping uses. The
        reference model (folder or object) is not modified. The query is reindexed to the
        reference genes (zero-filled, overlap reported in ``query_mapping_["gene_overlap"]``)
        and may carry batch categories the reference never saw; the query itself is not
        modified. Then ``model.train()`` fits what the method fits per query (JIND: the GAN
        alignment of the query; scNym, scDET, CellPredX: the encoder, fine-tuned on the
        query with the saved reference codes standing in for the reference; see the
        *Reference mapping* guide) and ``model.annotate(query)`` writes the usual fields.
        Annotating before ``train()`` gives the reference model's calls.

        Parameters
        ----------
        adata
            The query (any gene order; no labels needed).
        reference_model
            A saved model's folder (``model.save(...)``) or a trained model of this class.
        accelerator
            Accelerator to load onto.
        device
            Device index or ``"auto"``.
        **harmonize_kwargs
            ``gene_symbols``, ``id_map`` or ``layer``, as in ``annotate``.

        Returns
        -------
        The model for this query.

        Raises
        ------
        ValueError
            If ``reference_model`` is a model (or folder) of another class, or untrained.
        """
        model = cls._reference_copy(reference_model, accelerator=accelerator, device=device)
        registered, overlap = model._prepare(adata, **harmonize_kwargs)
        registered.uns.pop("_lt_query", None)  # the model's own data from now on
        model.adata = registered
        model._query_source = adata
        model.query_mapping_ = {
            "fingerprint": fingerprint(adata),
            "n_cells": int(adata.n_obs),
            "gene_overlap": overlap,
            "reference": (
                str(reference_model)
                if isinstance(reference_model, str | os.PathLike)
                else "model object"
            ),
            "fitted": False,
        }
        return model

    def _mapping_uns(self) -> dict[str, Any]:
        """``uns[key]["query_mapping"]`` of a model from :meth:`load_query_data`, else nothing.

        The per-query fit's summary and the safeguard's decision (entries that are ``None``
        are left out: h5ad cannot store them).
        """
        summary = getattr(self, "query_mapping_", None)
        if summary is None:
            return {}
        keep = ("reference", "n_cells", "fitted", "method", "max_epochs", "safeguard")
        return {"query_mapping": {k: summary[k] for k in keep if summary.get(k) is not None}}

    # ------------------------------------------------------------------ helpers
    @classmethod
    def _reference_copy(cls, reference_model: Any, *, accelerator: str, device: int | str) -> Self:
        """Load the reference model (a folder, or a copy of a model object) without data."""
        if isinstance(reference_model, str | os.PathLike):
            attr_dict, _, _ = read_saved_files(str(reference_model), None)
            saved_cls = attr_dict.get("registry_", {}).get("model_name")
            if saved_cls is not None and saved_cls != cls.__name__:
                raise ValueError(
                    f"{str(reference_model)!r} holds a {saved_cls} model, not a {cls.__name__} "
                    f"one; map with `lt.{saved_cls}.load_query_data(query, "
                    f"{str(reference_model)!r})`."
                )
            model = cls.load(str(reference_model), accelerator=accelerator, device=device)
        else:
            if type(reference_model) is not cls:
                raise ValueError(
                    f"reference_model is a {type(reference_model).__name__}, not a "
                    f"{cls.__name__}; map with `lt.{type(reference_model).__name__}"
                    ".load_query_data(query, reference_model)`."
                )
            reference_model._check_if_trained(warn=False)
            had_version = "package_version_" in vars(reference_model)
            previous = getattr(reference_model, "package_version_", None)
            with tempfile.TemporaryDirectory() as folder:
                path = os.path.join(folder, "model")
                try:
                    reference_model.save(path)
                finally:  # save() stamps the version: the reference stays as it was
                    if had_version:
                        reference_model.package_version_ = previous
                    else:
                        del reference_model.package_version_
                model = cls.load(path, accelerator=accelerator, device=device)
        model.query_mapping_ = None
        return model

    @classmethod
    def _reference_genes(cls, reference_model: Any) -> np.ndarray:
        """Genes of a saved model's folder or of a model object."""
        if isinstance(reference_model, str | os.PathLike):
            attr_dict, var_names, _ = read_saved_files(str(reference_model), None)
            return np.asarray(var_names)
        state = reference_model.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY)
        return np.asarray(state.column_names)

    # ------------------------------------------------------------------ fitting
    def _mapping_encoder(self) -> nn.Module | None:
        """Return the part of the module fine-tuned per query (``None``: mapped otherwise)."""
        return None

    def _fit_reference_codes(self) -> None:
        """Save the encoder's codes of a stratified bank of labelled reference cells."""
        if self._mapping_encoder() is None:
            return
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        labelled = np.flatnonzero(labelled_mask(self.adata_manager))
        rows = labelled[
            bank_rows(codes[labelled], size=N_REFERENCE_CODES, seed=settings.seed or 0)
        ]
        latent = self._forward(self.adata, indices=rows, return_latent=True).latent
        self.reference_codes_ = {
            "codes": np.asarray(latent, dtype=np.float32),
            "labels": codes[rows].astype(np.int64),
        }

    def _mapping_anchors(self, batch_size: int) -> torch.Tensor:
        """Return the query cells the reference model calls most confidently (the anchors).

        At most :data:`N_ANCHOR_CANDIDATES` query cells are drawn; the fraction
        ``_mapping_anchor_fraction`` (:data:`ANCHOR_FRACTION` unless the model sets another)
        of them with the highest confidence among the reference types are the anchors (a
        fraction, not a confidence cut: the models' confidences are not on one scale).
        """
        n_cells = self.adata.n_obs
        rng = np.random.default_rng(settings.seed or 0)
        rows = np.sort(rng.permutation(n_cells)[:N_ANCHOR_CANDIDATES])
        logits = self._forward(self.adata, indices=rows, return_latent=False).logits
        seen = torch.as_tensor(logits[:, : self.module.n_labels])
        confidence = torch.softmax(seen, dim=1).max(dim=1).values.numpy()
        n_anchors = max(1, math.ceil(self._mapping_anchor_fraction * len(rows)))
        anchors = np.sort(rows[np.argsort(-confidence, kind="stable")[:n_anchors]])
        loader = self._make_data_loader(
            self.adata, indices=anchors, batch_size=batch_size, shuffle=False
        )
        return torch.cat([tensors[REGISTRY_KEYS.X_KEY].cpu() for tensors in loader])

    def _train_mapped(
        self, arguments: dict[str, Any], explicit: set[str], trainer_kwargs: dict[str, Any]
    ) -> None:
        """``train()`` of a model from :meth:`load_query_data`: fit this query (:meth:`_fit_query`)."""
        ignored = sorted(explicit - set(MAPPING_ARGUMENTS))
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} apply to training a reference model, not to mapping a "
                f"query (which takes {', '.join(MAPPING_ARGUMENTS)}); they are ignored.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
        summary = self._fit_query(
            max_epochs=arguments["max_epochs"] if "max_epochs" in explicit else None,
            batch_size=arguments["batch_size"],
            accelerator=arguments["accelerator"],
            devices=arguments["devices"],
            plan_kwargs=dict(arguments.get("plan_kwargs") or {}),
            trainer_kwargs=trainer_kwargs,
        )
        self.query_mapping_ = {**self.query_mapping_, "fitted": True, **summary}

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
        """Fine-tune the encoder on the query against the saved reference codes."""
        # the query's own batch-norm statistics first (base/_domain_stats.py): the anchors'
        # calls are then the reference model's calls as annotate() makes them, and the fit
        # keeps updating the query's statistics
        self._fit_statistics(np.arange(self.adata.n_obs), query=True)
        encoder = self._mapping_encoder()
        bank = getattr(self, "reference_codes_", None)
        if bank is None:
            raise ValueError(
                f"This {type(self).__name__} model was saved without reference codes (by an "
                "earlier version of labeltransfer), so it cannot be fine-tuned on a query. "
                "Train and save the reference model again with this version."
            )
        codes = torch.as_tensor(bank["codes"])
        labels = torch.as_tensor(bank["labels"])
        reference = DataLoader(
            TensorDataset(codes, labels),
            batch_size=min(batch_size, len(codes)),
            shuffle=True,
            drop_last=len(codes) > batch_size,
        )
        query = self._make_data_loader(
            self.adata,
            batch_size=batch_size,
            shuffle=True,
            drop_last=self.adata.n_obs > batch_size,
        )
        loader = PairedDataLoader(reference, query)
        if max_epochs is None:
            max_epochs = int(np.clip(math.ceil(MAPPING_STEPS / len(loader)), *MAPPING_EPOCHS))
        plan = QueryAdaptationPlan(
            self.module,
            encoder,
            codes,
            labels,
            anchors=self._mapping_anchors(batch_size),
            **{**self._mapping_plan_kwargs, **plan_kwargs},
        )
        others = [m for m in self.module.children() if m is not encoder]
        with frozen(*others):
            history = fit_stage(
                self,
                plan,
                loader,
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                **trainer_kwargs,
            )
        record_stage_history(self, history, "map_")
        last = {k: float(v.iloc[-1, -1]) for k, v in history.items() if len(v)}
        return {
            "method": "encoder fine-tuning",
            "max_epochs": int(max_epochs),
            "batch_size": int(batch_size),
            "adversary_accuracy": last.get("train_adversary_accuracy"),
            "confident_fraction": last.get("train_confident_fraction"),
            "safeguard": self._apply_safeguard(plan, encoder),
        }

    def _apply_safeguard(self, plan: QueryAdaptationPlan, encoder: nn.Module) -> dict[str, Any]:
        """Load the encoder the safeguard kept; return its decision (warn when reverted)."""
        agreement = plan.anchor_agreement
        decision = {
            "n_anchors": len(plan.anchors),
            "tolerance": float(plan.anchor_tolerance),
            "epochs_run": len(agreement),
            "kept_epoch": int(plan.kept_epoch),
            "stopped_early": plan.kept_epoch < len(agreement),
            "reverted": plan.kept_epoch == 0,
            "final_agreement": agreement[plan.kept_epoch - 1] if plan.kept_epoch else 1.0,
            "agreement": [round(a, 4) for a in agreement],
        }
        encoder.load_state_dict(plan.kept_state)
        if decision["reverted"]:
            warnings.warn(
                f"Mapping changed the reference model's calls on {1 - agreement[0]:.0%} of the "
                "safeguard's anchor cells of the query after its first epoch (more than "
                f"the tolerance, {plan.anchor_tolerance:.0%}), so the fit was undone: this "
                "model makes the reference model's calls. The query may be too far from the "
                "reference for this model; see query_mapping_['safeguard'], or try a lower "
                "`plan_kwargs={'lr': ...}`.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
        return decision
