"""Prediction, rejection and write-back shared by every model of the package."""

from __future__ import annotations

import logging
import os
import warnings
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy.special import softmax
from scvi import settings
from scvi.model._utils import use_distributed_sampler
from scvi.train import TrainRunner
from scvi.utils import setup_anndata_dsp

from labeltransfer._constants import OUTPUT_KEYS, REGISTRY_KEYS, UNASSIGNED
from labeltransfer._model_folder import check_save_target, save_atomically
from labeltransfer.data import select_features
from labeltransfer.dataloaders import RefQueryDataSplitter, labelled_mask
from labeltransfer.train import BestStateCallback
from labeltransfer.train._callbacks import ReturnTrainingState, restore_training_state
from labeltransfer.train._guards import check_fit_args, interruptible

from ._query import EMPTY_CELLS_WARNING, empty_cells, prepare_query, warn_empty_cells
from ._rejection import fit_temperature, per_type_thresholds
from ._save_load import quiet_local_load, read_saved_files
from ._setup import register_anndata, resolve_input_type
from ._uns import h5ad_safe
from ._zarr import is_lazy, is_zarr_path, open_zarr, write_annotation

if TYPE_CHECKING:
    from collections.abc import Sequence

logger = logging.getLogger(__name__)

Rejection = str | float | None

#: Cells per inference minibatch: memory stays bounded by the batch, not the data set.
INFERENCE_BATCH_SIZE = 1024
#: Cells read at a time from an AnnData opened in backed mode or a zarr store.
BACKED_CHUNK_SIZE = 50_000
#: Message of the ``KeyboardInterrupt`` raised when ``train()`` is interrupted.
_INTERRUPTED = (
    "Training was interrupted; the model is left untrained (annotate() and predict() refuse "
    "it). Call model.train() again."
)


class AnnotationMixin:
    """Predict, reject and write annotations for a trained model.

    A model using this mixin has a module whose ``inference`` returns ``logits`` (cells x
    reference types) and ``z`` (the embedding). After training, :meth:`_fit_rejection` fits a
    temperature (if the model calibrates) and the per-type thresholds on the held-out
    reference cells; they are saved with the model.
    """

    _default_key: str = "annotation"
    _default_theta: float = 0.05
    #: Splitter built by :meth:`_run_training`; a model may use a subclass (CellPredX adds
    #: the query cells' kNN neighbours to its query minibatches).
    _splitter_cls: type[RefQueryDataSplitter] = RefQueryDataSplitter

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

    def _run_training(
        self,
        plan: Any,
        *,
        max_epochs: int,
        train_size: float,
        batch_size: int,
        use_query: bool = False,
        warmup_epochs: int = 0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> tuple[RefQueryDataSplitter, BestStateCallback]:
        """Fit ``plan`` with scvi's TrainRunner, keeping the best-validation-accuracy epoch.

        Builds the :class:`~labeltransfer.dataloaders.RefQueryDataSplitter` (stratified
        held-out reference split), validates every epoch when there is a validation set,
        records the training summary and fits calibration and rejection thresholds on the
        held-out cells. Returns the splitter and the best-state callback.

        A DDP ``strategy`` in ``trainer_kwargs`` shards every set across the processes
        (``batch_size`` is per process). With a spawning launcher (``"ddp_spawn"``,
        ``"ddp_notebook"``) the epoch count and the callbacks' states come back to this
        process with the weights (``ReturnTrainingState`` in ``labeltransfer.train``).

        An exception or Ctrl+C during the fit leaves the model marked untrained (its module
        holds the best weights seen so far, but no calibration or thresholds were fitted):
        the exception propagates, and Ctrl+C raises a ``KeyboardInterrupt``.
        """
        check_fit_args(max_epochs=max_epochs, batch_size=batch_size)
        splitter = self._splitter_cls(
            self.adata_manager,
            train_size=train_size,
            use_query=use_query,
            batch_size=batch_size,
            distributed_sampler=use_distributed_sampler(trainer_kwargs.get("strategy", "auto")),
            **(datasplitter_kwargs or {}),
        )
        splitter.setup()  # seeded, so the runner's setup gives the same split
        best = BestStateCallback("validation_accuracy", mode="max", warmup_epochs=warmup_epochs)
        trainer_kwargs["callbacks"] = [
            *trainer_kwargs.get("callbacks", []),
            best,
            ReturnTrainingState(),
        ]
        if splitter.val_idx.size > 0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        else:  # nothing to monitor: early stopping would fail on the missing metric
            trainer_kwargs["early_stopping"] = False
        runner = TrainRunner(
            self,
            training_plan=plan,
            data_splitter=splitter,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            **trainer_kwargs,
        )
        try:
            with interruptible(_INTERRUPTED):
                runner()
        except BaseException:
            self.is_trained_ = False  # never half-trained: annotate() asks for train() again
            raise
        restore_training_state(runner.trainer)
        self.training_summary_ = {
            "seed": settings.seed,
            "max_epochs": max_epochs,
            "best_epoch": best.best_epoch,
            "best_validation_accuracy": best.best_score,
            "n_train": int(splitter.ref_train_idx.size),
            "n_validation": int(splitter.val_idx.size),
            "batch_size": batch_size,
        }
        self._fit_rejection(splitter.val_idx)
        return splitter, best

    # ------------------------------------------------------------------ state
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
    ) -> tuple[str, list[str], np.ndarray]:
        """Resolve the input type and the model's genes on the registered reference.

        Returns the input type (detected when ``"auto"``), the feature names (the
        ``n_top_genes`` Seurat HVGs of the labelled cells, all genes for ``None``, or
        ``features`` as given) and their indices among the registered genes.
        """
        layer = self.adata_manager.registry["setup_args"].get("layer")
        input_type = resolve_input_type(self.adata, layer=layer, input_type=input_type)
        genes = pd.Index(self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names)
        if features is None:
            if n_top_genes is None or n_top_genes >= len(genes):
                idx = np.arange(len(genes))
            else:
                idx = select_features(
                    self.adata,
                    n_top_genes=n_top_genes,
                    layer=layer,
                    input_type=input_type,
                    mask=labelled_mask(self.adata_manager),
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
        return input_type, features, genes.get_indexer(features)

    def _inference_kwargs(self, adata: AnnData, **options) -> dict[str, Any]:
        """Extra ``module.inference`` arguments for ``adata`` (JIND selects its alignment).

        ``options`` are the model-specific keyword arguments of :meth:`annotate`,
        :meth:`predict` and :meth:`get_latent_representation` (JIND: ``alignment``); a model
        without any refuses them as Python refuses an unknown keyword.
        """
        if options:
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) {sorted(options)}."
            )
        return {}

    def _inference_for(
        self, adata: AnnData | str | os.PathLike[str] | None, options: dict[str, Any]
    ) -> tuple[AnnData | None, dict[str, Any]]:
        """Open a zarr path, and select the ``module.inference`` arguments for the data."""
        if is_zarr_path(adata):
            adata = open_zarr(adata)
        return adata, self._inference_kwargs(self.adata if adata is None else adata, **options)

    def _query_options(self) -> dict[str, Any]:
        return {"input_type": self.module.input_type}

    def _prepare(self, adata: AnnData | None, **harmonize_kwargs) -> tuple[AnnData, dict | None]:
        """Return ``adata`` registered (``None``: the model's own data, checked like a query)."""
        target = self.adata if adata is None else adata
        return prepare_query(self, target, **self._query_options(), **harmonize_kwargs)

    def _infer(
        self,
        adata: AnnData | None,
        *,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_latent: bool = True,
        inference_kwargs: dict[str, Any] | None = None,
        **harmonize_kwargs,
    ) -> tuple[np.ndarray, np.ndarray | None, dict | None, pd.Index]:
        """Logits, embeddings, gene-overlap report and cell names of a query (or own data).

        ``inference_kwargs`` are passed to ``module.inference``; by default they are
        :meth:`_inference_kwargs` of the data (selected once, before the first minibatch).

        An AnnData opened in backed mode (``anndata.read_h5ad(path, backed="r")``), the path of
        a zarr store, or an AnnData from :func:`~labeltransfer.base._zarr.open_zarr` is read
        :data:`BACKED_CHUNK_SIZE` cells at a time: each chunk is loaded, harmonised and passed
        through the network, so memory holds one chunk of expression plus the outputs.
        """
        if is_zarr_path(adata):
            adata = open_zarr(adata)
        if inference_kwargs is None:
            inference_kwargs = self._inference_kwargs(self.adata if adata is None else adata)
        if adata is None or not is_lazy(adata):
            registered, overlap = self._prepare(adata, **harmonize_kwargs)
            if overlap is not None:  # a query: annotate() rejects its cells without counts
                empty = empty_cells(self, registered)
                overlap = {**overlap, "empty": empty if indices is None else empty[indices]}
            logits, latent = self._forward(
                registered,
                indices=indices,
                batch_size=batch_size,
                inference_kwargs=inference_kwargs,
                return_latent=return_latent,
            )
            names = registered.obs_names
            self._release(registered)
            return logits, latent, overlap, names if indices is None else names[indices]
        positions = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if positions.size == 0:
            raise ValueError("No cells to annotate: the AnnData or the indices are empty.")
        logits = latent = None
        names, overlap, empty = [], None, []
        step = BACKED_CHUNK_SIZE
        for start in range(0, positions.size, step):
            stop = min(start + step, positions.size)
            # a slice reads a contiguous range; an index array is 20-40x slower on zarr
            rows = slice(start, stop) if indices is None else positions[start:stop]
            chunk = adata[rows].to_memory()
            with warnings.catch_warnings():  # one warning for the whole query, below
                warnings.filterwarnings("ignore", message=f".*{EMPTY_CELLS_WARNING}")
                registered, overlap = self._prepare(chunk, **harmonize_kwargs)
            empty.append(empty_cells(self, registered))
            part_logits, part_latent = self._forward(
                registered,
                batch_size=batch_size,
                inference_kwargs=inference_kwargs,
                return_latent=return_latent,
            )
            if logits is None:  # filled in place: no second copy of the outputs
                logits = np.empty((positions.size, part_logits.shape[1]), part_logits.dtype)
                if return_latent:
                    latent = np.empty((positions.size, part_latent.shape[1]), part_latent.dtype)
            logits[start:stop] = part_logits
            if return_latent:
                latent[start:stop] = part_latent
            names.append(registered.obs_names)
            self._release(registered)
            del chunk, registered, part_logits, part_latent  # before the next chunk is read
        empty = np.concatenate(empty)
        if empty.any():
            genes = self.adata_manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
            warn_empty_cells(int(empty.sum()), positions.size, len(genes), stacklevel=4)
        overlap = {**(overlap or {}), "empty": empty}
        return logits, latent, overlap, names[0].append(names[1:])

    def _release(self, registered: AnnData) -> None:
        """Forget a query AnnData registered only for one inference call.

        scvi-tools keeps a manager, and so the data, of every AnnData registered with a
        model; without this, each annotated query (or backed chunk) would stay in memory as
        long as the model.
        """
        if registered is not self.adata and registered.uns.get("_lt_query", False):
            store = self._per_instance_manager_store.get(self.id, {})
            store.pop(registered.uns.get("_scvi_uuid"), None)

    # ------------------------------------------------------------- inference
    @torch.inference_mode()
    def _forward(
        self,
        adata: AnnData,
        *,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        inference_kwargs: dict[str, Any] | None = None,
        return_latent: bool = True,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits and embeddings of ``adata`` (already registered), batch by batch."""
        self._check_if_trained(warn=False)
        self.module.eval()
        loader = self._make_data_loader(
            adata=adata, indices=indices, batch_size=batch_size or INFERENCE_BATCH_SIZE
        )
        n_cells = adata.n_obs if indices is None else len(indices)
        logits = latent = None
        start = 0
        for tensors in loader:
            outputs = self.module.inference(
                **self.module._get_inference_input(tensors), **(inference_kwargs or {})
            )
            part = outputs["logits"].float().cpu().numpy()
            if logits is None:  # filled in place: no list of batches and no concatenated copy
                logits = np.empty((n_cells, part.shape[1]), dtype=np.float32)
                if return_latent:
                    latent = np.empty((n_cells, outputs["z"].shape[1]), dtype=np.float32)
            stop = start + part.shape[0]
            logits[start:stop] = part
            if return_latent:
                latent[start:stop] = outputs["z"].float().cpu().numpy()
            start = stop
        return logits, latent

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        temperature = getattr(self, "calibration_", {}).get("temperature", 1.0)
        # float64: float32 saturates at exactly 1.0 for logit gaps of ~17, which ties confidences
        return softmax(logits.astype(np.float64) / temperature, axis=1)

    def predict(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
        layer: str | None = None,
        **inference_options,
    ) -> np.ndarray | pd.DataFrame:
        """Predict reference cell types (the argmax, before any rejection).

        Parameters
        ----------
        adata
            Query AnnData (any gene order; missing genes are zero-filled; backed or in
            memory), the path of a zarr store (read in chunks) or ``None`` for the AnnData the
            model was set up with.
        indices
            Cells of ``adata`` to use; all by default.
        soft
            Return the probability matrix instead of labels.
        batch_size
            Minibatch size for inference (1024 cells by default).
        layer
            Layer of the query holding its expression data; by default the layer the model
            was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        Labels (``np.ndarray`` of str) or, with ``soft=True``, a DataFrame cells x reference
        types (registry order) whose rows sum to one (temperature-calibrated where the model
        calibrates).
        """
        adata, inference_kwargs = self._inference_for(adata, inference_options)
        logits, _, _, names = self._infer(
            adata,
            indices=indices,
            batch_size=batch_size,
            return_latent=False,
            layer=layer,
            inference_kwargs=inference_kwargs,
        )
        probs = self._probabilities(logits)
        if soft:
            return pd.DataFrame(probs, index=names, columns=self.output_classes)
        return np.asarray(self.output_classes, dtype=object)[probs.argmax(axis=1)]

    def get_latent_representation(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        layer: str | None = None,
        **inference_options,
    ) -> np.ndarray:
        """Return the model's cell embedding (see the model's docstring for which layer).

        Parameters
        ----------
        adata
            Query AnnData, the path of a zarr store (read in chunks) or ``None`` for the
            AnnData the model was set up with.
        indices
            Cells of ``adata`` to use; all by default.
        batch_size
            Minibatch size for inference (1024 cells by default).
        layer
            Layer of the query holding its expression data; by default the layer the model
            was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        Array of shape ``(n_cells, n_latent)``.
        """
        adata, inference_kwargs = self._inference_for(adata, inference_options)
        _, latent, _, _ = self._infer(
            adata,
            indices=indices,
            batch_size=batch_size,
            layer=layer,
            inference_kwargs=inference_kwargs,
        )
        return latent

    # ------------------------------------------------------------- rejection
    def _fit_rejection(self, validation_indices: np.ndarray) -> None:
        """Fit calibration and per-type thresholds on the held-out reference cells."""
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        val = np.asarray(validation_indices, dtype=int)
        if val.size == 0:
            warnings.warn(
                "No held-out reference cells: rejection thresholds cannot be learned and no "
                "cell will be rejected by the 'per_type' rule. Train with train_size < 1.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
            self.calibration_ = {"temperature": 1.0}
            self.validation_ = {"confidence": np.zeros(0), "prediction": np.zeros(0, int)}
            self.rejection_ = {
                "rule": "per_type",
                "theta": self._default_theta,
                "thresholds": np.zeros(len(self.output_classes)),
            }
            return
        logits, _ = self._forward(self.adata, indices=val, return_latent=False)
        truth = codes[val]
        temperature = fit_temperature(logits, truth) if self.calibrate else 1.0
        self.calibration_ = {"temperature": temperature}
        probs = self._probabilities(logits)
        prediction = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        self.validation_ = {
            "confidence": confidence,
            "prediction": prediction,
            "truth": truth,
            "accuracy": float((prediction == truth).mean()),
        }
        self.rejection_ = {
            "rule": "per_type",
            "theta": self._default_theta,
            "thresholds": per_type_thresholds(
                confidence, prediction, len(self.output_classes), theta=self._default_theta
            ),
        }

    def rejection_thresholds(self, theta: float | None = None) -> pd.Series:
        """Per-type thresholds for outlier fraction ``theta`` (the fitted ones by default).

        Parameters
        ----------
        theta
            Outlier fraction; thresholds are recomputed from the stored held-out confidences.

        Returns
        -------
        Series indexed by reference type.
        """
        self._check_if_trained(warn=False)
        if theta is None:
            values = self.rejection_["thresholds"]
        else:
            values = per_type_thresholds(
                self.validation_["confidence"],
                self.validation_["prediction"],
                len(self.output_classes),
                theta=theta,
            )
        return pd.Series(values, index=self.output_classes, name="threshold")

    def _reject(
        self, confidence: np.ndarray, prediction: np.ndarray, rejection: Rejection
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if rejection == "default":
            rejection = self.rejection_["rule"]
        if rejection is None or rejection == "none":
            return np.zeros(confidence.size, dtype=bool), {"rule": "none"}
        if rejection == "per_type":
            thresholds = self.rejection_["thresholds"]
            # parallel lists, not a dict: a type name with "/" as a key becomes nested groups
            # in h5ad and is refused by zarr
            rule = {
                "rule": "per_type",
                "theta": self.rejection_["theta"],
                "types": list(self.output_classes),
                "thresholds": [float(t) for t in thresholds],
            }
            return confidence < thresholds[prediction], rule
        if isinstance(rejection, int | float) and not isinstance(rejection, bool):
            if not 0.0 <= rejection <= 1.0:
                raise ValueError(
                    f"A global rejection threshold must be in [0, 1], got {rejection}."
                )
            return confidence < rejection, {"rule": "global", "threshold": float(rejection)}
        raise ValueError(
            f"Unknown rejection rule {rejection!r}. Use 'per_type' (learned thresholds), "
            "a float in [0, 1] (one global cut on the confidence), None (no rejection) or "
            "'default' (the model's rule)."
        )

    # ------------------------------------------------------------- write-back
    def annotate(
        self,
        adata: AnnData | str | os.PathLike[str] | None = None,
        *,
        key_added: str | None = None,
        rejection: Rejection = "default",
        copy: bool = False,
        batch_size: int | None = None,
        gene_symbols: str | None = None,
        id_map: Any = None,
        layer: str | None = None,
        **inference_options,
    ) -> AnnData | None:
        """Annotate cells and write the standard output fields.

        Parameters
        ----------
        adata
            Query AnnData (any gene order; missing genes are zero-filled and reported), or
            ``None`` for the AnnData the model was set up with. An AnnData opened in backed
            mode (``anndata.read_h5ad(path, backed="r+")``) is read 50,000 cells at a time,
            so its expression is never loaded whole; the results go to its in-memory
            ``obs``/``obsm``/``uns``, and ``adata.write()`` then stores them in the file
            without rewriting ``X``. The path of a zarr store (written by
            ``AnnData.write_zarr``) is read the same way, chunk by chunk, and the results are
            written into the store (``obs``, the two ``obsm`` entries and ``uns[key]``),
            leaving ``X`` untouched.
        key_added
            Prefix of the written fields; the model's name by default (e.g. ``"jind"``).
        rejection
            ``"default"`` (the model's rule), ``"per_type"`` (thresholds learned on the
            held-out reference), a float (global confidence cut) or ``None``.
        copy
            Write into a copy of ``adata`` and return it.
        batch_size
            Minibatch size for inference (1024 cells by default).
        gene_symbols
            Column of ``adata.var`` holding gene names matching the reference's.
        id_map
            Ensembl-to-symbol table (path or DataFrame) used when the query and the reference
            name genes differently.
        layer
            Layer of the query holding its expression data (e.g. ``"counts"`` when the
            model was set up on ``X`` but the query's ``X`` is log-normalised); by default the
            layer the model was set up with (``X`` if none). ``"X"`` reads the query's ``X``.
            Not for the registered AnnData, which is read as it was set up.
        **inference_options
            Model-specific options: JIND's ``alignment`` (which stored alignment to use,
            see :meth:`~labeltransfer.JIND.align`). The other models take none.

        Returns
        -------
        ``None``, or the annotated copy if ``copy=True``. Sets the following fields:

        ``obs[key]``
            final call (categorical): a reference type or ``"Unassigned"`` when rejected.
        ``obs[f"{key}_prediction"]``
            argmax reference type, before rejection.
        ``obs[f"{key}_confidence"]``
            probability of the predicted type.
        ``obs[f"{key}_rejected"]``
            whether the rejection rule rejected the cell (a query cell without any count in
            the model's genes is always rejected, with a warning).
        ``obsm[f"{key}_probabilities"]``
            DataFrame cells x reference types (registry order).
        ``obsm[f"X_{key}"]``
            the model's embedding.
        ``uns[key]``
            method, package version, seed, rejection rule and thresholds, calibration,
            gene-overlap report, input type and training summary.
        """
        key = key_added or self._default_key
        if "/" in key:
            raise ValueError(
                f"key_added={key!r} contains '/', which anndata cannot store in a field name "
                "(h5ad turns it into nested groups, zarr refuses it). Choose a key without '/'."
            )
        zarr_path = adata if is_zarr_path(adata) else None
        if zarr_path is not None:
            if copy:
                raise ValueError(
                    "copy=True needs an AnnData in memory, but a zarr path was given: its "
                    "results are written into the store. Pass copy=False, or read it with "
                    "`anndata.read_zarr(path)` first."
                )
            adata = open_zarr(zarr_path)
        if adata is not None and not isinstance(adata, AnnData):
            raise TypeError(
                f"Expected an AnnData or the path of a zarr store, got {type(adata).__name__}. "
                "Read your data with `anndata.read_h5ad` (or build an AnnData) first."
            )
        target = self.adata if adata is None else adata
        if copy and is_lazy(target):
            raise ValueError(
                "copy=True needs the data in memory, but this AnnData is backed (read with "
                "backed=...). Annotate it in place (results go to obs/obsm in memory) and "
                "store them with `adata.write()` (the file must be opened with backed='r+'), "
                "or load it with `adata.to_memory()` first."
            )
        if copy:
            target = target.copy()
        self._check_output_key(target, key, store=zarr_path)
        inference_kwargs = self._inference_kwargs(target, **inference_options)
        logits, latent, overlap, _ = self._infer(
            target if adata is not None else None,
            batch_size=batch_size,
            gene_symbols=gene_symbols,
            id_map=id_map,
            layer=layer,
            inference_kwargs=inference_kwargs,
        )
        probs = self._probabilities(logits)
        prediction = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        rejected, rule = self._reject(confidence, prediction, rejection)
        empty = overlap.pop("empty") if overlap is not None else np.zeros(0, dtype=bool)
        if empty.any():  # no count in the model's genes: nothing to base a call on
            rejected = rejected | empty
            rule = {**rule, "n_rejected_without_counts": int(empty.sum())}

        types = self.output_classes
        calls = np.asarray(types, dtype=object)[prediction]
        final = calls.copy()
        final[rejected] = UNASSIGNED
        target.obs[key] = pd.Categorical(
            final, categories=list(dict.fromkeys([*types, UNASSIGNED]))
        )
        target.obs[key + OUTPUT_KEYS.PREDICTION] = pd.Categorical(calls, categories=types)
        target.obs[key + OUTPUT_KEYS.CONFIDENCE] = confidence.astype(np.float32)
        target.obs[key + OUTPUT_KEYS.REJECTED] = rejected
        target.obsm[key + OUTPUT_KEYS.PROBABILITIES] = pd.DataFrame(
            probs.astype(np.float32), index=target.obs_names, columns=types
        )
        target.obsm[OUTPUT_KEYS.EMBEDDING_PREFIX + key] = latent.astype(np.float32, copy=False)
        target.uns[key] = h5ad_safe(
            {
                "method": type(self).__name__,
                "package_version": version("labeltransfer"),
                "seed": self.training_summary_.get("seed"),
                "classes": types,
                "rejection": rule,
                "calibration": self.calibration_,
                "input_type": self.module.input_type,
                "gene_overlap": overlap if overlap is not None else {"overlap": 1.0},
                "n_cells": int(target.n_obs),
                "n_rejected": int(rejected.sum()),
                "training": self.training_summary_,
                **self._extra_uns(target, inference_kwargs),
            }
        )
        logger.info(
            "Annotated %d cells with %s: %d rejected (%.1f%%).",
            target.n_obs,
            type(self).__name__,
            rejected.sum(),
            100 * rejected.mean(),
        )
        if zarr_path is not None:
            obsm_keys = [key + OUTPUT_KEYS.PROBABILITIES, OUTPUT_KEYS.EMBEDDING_PREFIX + key]
            write_annotation(zarr_path, target, key, obsm_keys)
        return target if copy else None

    def _extra_uns(self, adata: AnnData, inference_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Model-specific entries of ``uns[key]``."""
        return {}

    def _check_output_key(self, adata: AnnData, key: str, store: str | None = None) -> None:
        """Refuse a ``key_added`` whose fields would overwrite data that are not ours.

        The registered label and batch columns and scvi's ``_scvi_*`` columns are never
        overwritten. Existing ``obs``/``obsm``/``uns`` entries of the written names are
        overwritten (with a warning) only when ``uns[key]`` is a previous annotation by a
        model of this package; anything else (e.g. ``key_added="pca"`` over
        ``obsm["X_pca"]`` and ``uns["pca"]``) is refused. ``store`` is the path of a zarr
        store being annotated, whose ``obsm`` and ``uns`` are not loaded in ``adata``.
        """
        setup_args = self.adata_manager.registry["setup_args"]
        registered = {setup_args["labels_key"], setup_args.get("batch_key")} - {None}
        protected = registered | {c for c in adata.obs.columns if c.startswith("_scvi")}
        written = [
            key + s
            for s in ("", OUTPUT_KEYS.PREDICTION, OUTPUT_KEYS.CONFIDENCE, OUTPUT_KEYS.REJECTED)
        ]
        clash = protected.intersection(written)
        if key.startswith("_scvi") or clash:
            raise ValueError(
                f"key_added={key!r} would overwrite {sorted(clash) or key!r}, which the model "
                "registered. Choose another key_added."
            )
        obsm_names = [key + OUTPUT_KEYS.PROBABILITIES, OUTPUT_KEYS.EMBEDDING_PREFIX + key]
        obsm_keys, previous = set(adata.obsm.keys()), adata.uns.get(key)
        if store is not None:
            obsm_keys, previous = _stored_outputs(store, key)
        existing = [f"obs[{c!r}]" for c in written if c in adata.obs.columns]
        existing += [f"obsm[{n!r}]" for n in obsm_names if n in obsm_keys]
        existing += [f"uns[{key!r}]"] if previous is not None else []
        if not existing:
            return
        if not (isinstance(previous, dict) and previous.get("method") in _model_names()):
            raise ValueError(
                f"key_added={key!r} would overwrite {existing}, which no labeltransfer model "
                f"wrote (uns[{key!r}]['method'] does not name one). Choose another key_added, "
                "or delete those entries first if they may go."
            )
        warnings.warn(
            f"Overwriting the previous annotation in {existing} (key_added={key!r}). Pass "
            "another key_added to keep both.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )

    # ------------------------------------------------------------- persistence
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model atomically (written to a temporary folder, then renamed).

        Saving never deletes a file it did not write: ``dir_path`` must be new, an empty
        folder, or (with ``overwrite=True``) a folder holding only a saved model's own files
        (``model.pt`` and ``adata.h5ad``/``mdata.h5mu``). A failure while writing leaves no
        partial folder, and a replaced model is kept until the new one is complete.

        Parameters
        ----------
        dir_path
            Folder to create (or an empty folder, or a saved model to replace).
        prefix
            Prefix of the file names.
        overwrite
            Replace a model saved in ``dir_path`` before.
        save_anndata
            Also save the registered AnnData.
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.

        Raises
        ------
        ValueError
            If ``dir_path`` is a file, a folder holding other files than a saved model's, or
            a saved model and ``overwrite`` is ``False``.
        """
        dir_path = os.path.realpath(dir_path)
        check_save_target(dir_path, prefix, overwrite)
        self.package_version_ = version("labeltransfer")
        write = super().save
        save_atomically(
            dir_path,
            lambda folder: write(
                folder,
                prefix=prefix,
                overwrite=True,
                save_anndata=save_anndata,
                **anndata_write_kwargs,
            ),
        )

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        **kwargs,
    ) -> Self:
        """Load a saved model, with or without its reference data.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            AnnData with exactly the model's genes to register, or ``None``: the model is
            then restored without any data (from the saved AnnData if ``save_anndata=True``
            was used) and maps queries passed to :meth:`annotate`/:meth:`predict`.
        accelerator
            Accelerator to load onto (``"auto"``, ``"cpu"``, ``"gpu"``).
        device
            Device index or ``"auto"``.
        prefix
            Prefix of the file names.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load`.

        Returns
        -------
        The trained model.

        Raises
        ------
        FileNotFoundError
            If ``dir_path`` holds no ``model.pt``.
        ValueError
            If ``model.pt`` is damaged (truncated, empty, not a model file), or holds a model
            of another class.
        """
        attr_dict, var_names, saved = read_saved_files(dir_path, prefix, load_adata=adata is None)
        saved_cls = attr_dict.get("registry_", {}).get("model_name")
        if saved_cls is not None and saved_cls != cls.__name__:
            raise ValueError(
                f"{str(dir_path)!r} holds a {saved_cls} model, not a {cls.__name__} one; load "
                f"it with `lt.{saved_cls}.load(...)`."
            )
        saved_version = attr_dict.get("package_version_")
        current = version("labeltransfer")
        if saved_version is not None and saved_version != current:
            warnings.warn(
                f"This model was saved with labeltransfer {saved_version} and is loaded with "
                f"{current}. Check the changelog; if loading fails, install {saved_version}.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
        if adata is None:
            if saved is None:
                saved = _placeholder_adata(attr_dict["registry_"], var_names)
            adata = saved
        elif list(adata.var_names) != list(var_names):
            raise ValueError(
                "The AnnData passed to load() does not have the model's genes in the model's "
                "order. Load without data (`Model.load(dir_path)`) and pass the query to "
                "`annotate`/`predict`, which reindex and zero-fill genes."
            )
        try:
            with warnings.catch_warnings(), quiet_local_load():
                # the placeholder has one cell per type by construction
                warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*")
                return super().load(
                    dir_path,
                    adata=adata,
                    accelerator=accelerator,
                    device=device,
                    prefix=prefix,
                    **kwargs,
                )
        except Exception as err:
            if saved_version is None or saved_version == current:
                raise
            raise RuntimeError(
                f"Loading this model, saved with labeltransfer {saved_version}, failed with "
                f"labeltransfer {current} ({type(err).__name__}: {err}). Install the version "
                f"that saved it (`pip install labeltransfer=={saved_version}`), or train and "
                "save the model again with this one."
            ) from err


def _model_names() -> set[str]:
    """Class names of the package's models (every subclass of :class:`AnnotationMixin`)."""
    names, todo = set(), [AnnotationMixin]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names - {AnnotationMixin.__name__}


def _stored_outputs(store: str | os.PathLike[str], key: str) -> tuple[set[str], Any]:
    """Return the ``obsm`` keys and ``uns[key]`` (``None`` if absent) of a zarr store."""
    import zarr
    from anndata.io import read_elem

    group = zarr.open_group(store, mode="r", use_consolidated=False)
    obsm_keys = set(group["obsm"].keys()) if "obsm" in group else set()
    uns = group["uns"] if "uns" in group else None
    return obsm_keys, read_elem(uns[key]) if uns is not None and key in uns else None


def _placeholder_adata(registry: dict, var_names: np.ndarray) -> AnnData:
    """One empty cell per reference type, so a saved model can be rebuilt without data."""
    args = registry["setup_args"]
    labels_state = registry["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
    mapping = [str(c) for c in labels_state["categorical_mapping"]]
    obs = pd.DataFrame(index=[f"placeholder_{i}" for i in range(len(mapping))])
    obs[args["labels_key"]] = mapping
    if args.get("batch_key") is not None:
        batch_state = registry["field_registries"][REGISTRY_KEYS.BATCH_KEY]["state_registry"]
        obs[args["batch_key"]] = str(batch_state["categorical_mapping"][0])
    # dense zeros: scvi takes an all-zero *sparse* X for "minified" data and refuses it
    matrix = np.zeros((len(mapping), len(var_names)), dtype=np.float32)
    adata = AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=pd.Index(var_names).astype(str)))
    if args.get("layer") is not None:
        adata.layers[args["layer"]] = matrix
    return adata
