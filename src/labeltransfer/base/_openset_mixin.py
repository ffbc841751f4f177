"""Calibration, rejection and novelty: the open-set layer every model ends in."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from scvi import settings

from labeltransfer._constants import NOVEL_PREFIX, REGISTRY_KEYS
from labeltransfer.dataloaders import labelled_mask
from labeltransfer.metrics import expected_calibration_error

from ._batches import COVERAGE_KEY
from ._openset import (
    NOVEL_CUT,
    RESCALE_CUT,
    centre_by_group,
    novel_groups,
    scale_groups,
    uncovered_apart,
)
from ._reference_space import FIT_VALUES, MIN_FIT, ReferenceSpace, bank_rows, expression_features
from ._rejection import fit_temperature, per_type_thresholds, query_thresholds

if TYPE_CHECKING:
    from anndata import AnnData

Rejection = str | float | None

#: Rules :meth:`OpenSetMixin._reject` accepts by name.
RULES = ("openset", "per_type", "paper", "default", "none")
#: Fewest cells of a novel group; smaller groups of uncovered cells stay ``Unassigned``.
MIN_NOVEL_GROUP = 10
#: Fraction of rejected cells above which annotate() warns.
WARN_REJECTED = 0.5


class OpenSetMixin:
    """Fit and apply the shared open-set layer (``DESIGN.md``, *Calls a user can trust*).

    After training, :meth:`_fit_rejection` fits on the held-out reference cells a temperature
    (every model, ECE before and after reported), the per-type confidence thresholds that
    reject a fraction ``theta`` of them, and the reference's coverage space
    (:mod:`labeltransfer.base._openset`). Everything is stored in attributes saved with the
    model, so a loaded model applies the layer without the reference data.
    """

    _default_theta: float = 0.05
    calibrate: bool = True

    def _paper_rule(self) -> Rejection:
        """Return the rejection rule of the model's paper.

        A model with a ``confidence_threshold`` (scNym 0.5, CellPredX 0.95, scDET none unless
        set) cuts the confidence globally ("none" when it is ``None``); JIND's rule is its
        per-type thresholds.
        """
        if not hasattr(self, "confidence_threshold"):
            return "per_type"
        cut = self.confidence_threshold
        return "none" if cut is None else float(cut)

    # ------------------------------------------------------------------ fitting
    def _fit_rejection(self, validation_indices: np.ndarray) -> None:
        """Fit calibration, per-type thresholds and the coverage space after training."""
        codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        val = np.asarray(validation_indices, dtype=int)
        labelled = np.flatnonzero(labelled_mask(self.adata_manager))
        self._fit_reference_space(np.setdiff1d(labelled, val), codes)
        n_classes = len(self.output_classes)
        rule = {"rule": "openset", "theta": self._default_theta, "paper": self._paper_rule()}
        if val.size == 0:
            warnings.warn(
                "No held-out reference cells: the confidence thresholds cannot be learned, so "
                "only cells the reference does not cover are rejected. Train with "
                "train_size < 1.",
                UserWarning,
                stacklevel=settings.warnings_stacklevel,
            )
            self.calibration_ = {"temperature": 1.0}
            self.validation_ = {"confidence": np.zeros(0), "prediction": np.zeros(0, int)}
            self.rejection_ = {**rule, "thresholds": np.zeros(n_classes)}
            return
        logits = self._forward(self.adata, indices=val, return_latent=False).logits
        if not np.isfinite(logits).all():
            raise RuntimeError(
                f"Training diverged: the {type(self).__name__} model's outputs on held-out "
                "reference cells are not finite (NaN or inf), so nothing it would call can be "
                "trusted. Train again with a lower learning rate (`plan_kwargs={'lr': ...}`) "
                "and check the input for extreme values (e.g. data scaled after "
                "normalisation)."
            )
        truth = codes[val]
        temperature = fit_temperature(logits, truth) if self.calibrate else 1.0
        raw = self._probabilities(logits, temperature=1.0)
        self.calibration_ = {"temperature": temperature}
        probs = self._probabilities(logits)
        prediction = probs.argmax(axis=1)
        confidence = probs.max(axis=1)
        correct = prediction == truth
        self.calibration_.update(
            ece_before=expected_calibration_error(raw.max(axis=1), correct),
            ece_after=expected_calibration_error(confidence, correct),
            n_cells=int(val.size),
        )
        self.validation_ = {
            "confidence": confidence,
            "prediction": prediction,
            "truth": truth,
            "accuracy": float(correct.mean()),
        }
        thresholds = per_type_thresholds(
            confidence, prediction, n_classes, theta=self._default_theta
        )
        self.rejection_ = {**rule, "thresholds": thresholds}

    @torch.inference_mode()
    def _fit_reference_space(self, rows: np.ndarray, codes: np.ndarray) -> None:
        """Fit the coverage space on a stratified bank of the labelled training cells.

        The PCA is fitted on a few hundred of the bank's cells (:data:`FIT_VALUES` values at
        most); the bank is then projected
        minibatch by minibatch, so memory never holds the bank's expression.
        """
        seed = settings.seed or 0
        rows = rows[bank_rows(codes[rows], seed=seed)]
        fit_rows = rows[bank_rows(codes[rows], size=self._fit_cells, seed=seed)]
        space = ReferenceSpace.fit(self._features(self.adata, fit_rows), seed=seed)
        self.reference_space_ = space.state()  # _coords projects with it from here on
        bank = self._forward(
            self.adata, indices=rows, batch_size=256, return_latent=False, return_coords=True
        )
        self.reference_space_.update(bank=bank.coords, bank_labels=codes[rows].astype(np.int64))

    def _features(self, registered: AnnData, rows: np.ndarray) -> np.ndarray:
        """Log-normalised model genes of ``rows`` of a registered AnnData (cells x genes)."""
        module = self.module
        features = np.empty((rows.size, module.n_features), dtype=np.float32)
        start = 0
        for tensors in self._batches(registered, rows):
            x = tensors[REGISTRY_KEYS.X_KEY].to(module.feature_idx.device)
            part = expression_features(x, module).cpu().numpy()
            features[start : start + part.shape[0]] = part
            start += part.shape[0]
        return features

    @property
    def _reference_space(self) -> ReferenceSpace | None:
        state = getattr(self, "reference_space_", None)
        return None if state is None else ReferenceSpace(**state)

    def _coords(
        self, tensors: dict[str, torch.Tensor], residual_axes: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Coverage-space coordinates of a minibatch (``None`` before the space is fitted).

        The reference's components, then the query's ``residual_axes`` when given.
        """
        space = self._reference_space
        if space is None:
            return None
        if COVERAGE_KEY in tensors:  # normalised as the minibatch was read
            return space.project(tensors[COVERAGE_KEY], residual_axes)
        module = self.module
        x = tensors[REGISTRY_KEYS.X_KEY].to(module.feature_idx.device)
        return space.project(expression_features(x, module), residual_axes)

    def _query_residual_axes(
        self, registered: AnnData, indices: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Return the residual axes of the query cells among ``indices`` of registered data.

        Fitted on as many evenly spaced cells as the reference's components (at most
        :data:`FIT_VALUES` values). Why: the reference's components hold no axis for a type
        the reference lacks, so such a type lands among seen cells in them (Kang, B cells held
        out: B cells shared query communities and novel groups with T cells); its own genes
        make the query's largest residual axes. The registered reference cells of a
        co-trained model are left out.
        """
        space = self._reference_space
        if space is None:
            return None
        rows = np.arange(registered.n_obs) if indices is None else np.asarray(indices)
        query = ~labelled_mask(self.get_anndata_manager(registered))[rows]
        rows = rows[query] if query.any() else rows
        if rows.size < 3:
            return None
        return space.residual_axes(self._features(registered, self._residual_sample(rows)))

    @property
    def _fit_cells(self) -> int:
        """Cells the coverage space's PCAs are fitted on: :data:`FIT_VALUES` values, >= MIN_FIT."""
        return max(MIN_FIT, FIT_VALUES // self.module.n_features)

    def _residual_sample(self, rows: np.ndarray) -> np.ndarray:
        """Evenly spaced ``rows``, as many as the reference's components were fitted on."""
        n = min(rows.size, self._fit_cells)
        return rows[np.linspace(0, rows.size - 1, n).round().astype(int)]

    def _chunked_residual_axes(
        self, adata: AnnData, positions: np.ndarray, harmonize_kwargs: dict[str, Any]
    ) -> np.ndarray | None:
        """:meth:`_query_residual_axes` of a query read by chunks: its sample is read at once."""
        if self._reference_space is None or positions.size < 3:
            return None
        rows = self._residual_sample(positions)
        with self._registered_sample(adata, rows, harmonize_kwargs) as registered:
            return self._query_residual_axes(registered)

    # ------------------------------------------------------------------ applying
    def rejection_thresholds(self, theta: float | None = None) -> pd.Series:
        """Per-type confidence thresholds for outlier fraction ``theta`` (the fitted ones by default).

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

    def _resolve_rule(self, rejection: Rejection) -> Rejection:
        if rejection == "default":
            rejection = self.rejection_["rule"]
        if rejection == "paper":
            rejection = self.rejection_.get("paper", "per_type")
        if rejection is None or rejection in RULES:
            return rejection
        if isinstance(rejection, int | float) and not isinstance(rejection, bool):
            if not 0.0 <= rejection <= 1.0:
                raise ValueError(
                    f"A global rejection threshold must be in [0, 1], got {rejection}."
                )
            return float(rejection)
        raise ValueError(
            f"Unknown rejection rule {rejection!r}. Use 'openset' (the default: per-type "
            "confidence thresholds and cells the reference does not cover), 'per_type' "
            "(confidence thresholds only), 'paper' (the rule of the model's paper), a float in "
            "[0, 1] (one global cut on the confidence), None (no rejection) or 'default'."
        )

    def _reject(
        self,
        confidence: np.ndarray,
        prediction: np.ndarray,
        rejection: Rejection,
        uncovered: np.ndarray | None = None,
        query: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Rejected cells and the rule's description for ``uns[key]["rejection"]``.

        ``query`` marks the query cells among them (all by default; annotating the registered
        data, its reference cells are not), on which the ``"openset"`` rule's thresholds adapt
        to a shift (:func:`~labeltransfer.base._rejection.query_thresholds`).
        """
        rejection = self._resolve_rule(rejection)
        if rejection is None or rejection == "none":
            return np.zeros(confidence.size, dtype=bool), {"rule": "none"}
        if isinstance(rejection, float):
            return confidence < rejection, {"rule": "global", "threshold": rejection}
        thresholds = np.asarray(self.rejection_["thresholds"])
        # parallel lists, not a dict: a type name with "/" as a key becomes nested groups
        # in h5ad and is refused by zarr
        rule = {
            "rule": rejection,
            "paper": self.rejection_.get("paper", "per_type"),
            "theta": self.rejection_["theta"],
            "types": list(self.output_classes),
            "thresholds": [float(t) for t in thresholds],
        }
        # a model's own novel classes (scDET) are novel by design: only calls of reference
        # types are rejected
        seen = prediction < len(self.cell_types)
        if rejection != "openset" or uncovered is None:
            return seen & (confidence < thresholds[prediction]), rule
        not_covered = seen & (uncovered > NOVEL_CUT)
        query = np.ones(seen.size, dtype=bool) if query is None else np.asarray(query, bool)
        applied = query_thresholds(
            thresholds, confidence, prediction, query & seen & ~not_covered, theta=rule["theta"]
        )
        rule.update(
            query_thresholds=[float(t) for t in applied],
            novel_cut=NOVEL_CUT,
            n_uncovered=int(not_covered.sum()),
        )
        return (seen & (confidence < applied[prediction])) | not_covered, rule

    def _coverage_groups(self, adata: AnnData | None, query: np.ndarray) -> np.ndarray:
        """Return the domain of each annotated cell, each centred on its own mean.

        ``-1`` (not centred) for the cells that are not ``query`` cells (the reference cells
        of the registered AnnData, ``None``, or of a copy or view of it: the same calls either
        way), else the cell's batch when the data have the registered batch column, else one
        domain.
        """
        batch_key = self.adata_manager.registry["setup_args"].get("batch_key")
        source = self.adata if adata is None else adata
        groups = np.zeros(query.size, dtype=np.int64)
        if batch_key is not None and batch_key in source.obs:
            groups = pd.factorize(source.obs[batch_key].astype(str))[0].astype(np.int64)
        groups[~query] = -1
        return groups

    def _coverage(
        self, coords: np.ndarray | None, domains: np.ndarray, prediction: np.ndarray
    ) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any] | None]:
        """Centred coverage coordinates, each cell's uncovered fraction and the record.

        ``None`` for a model saved before the layer. Each query domain is centred on its own
        mean. A domain most of whose cells come out novel (more than :data:`RESCALE_CUT`) is
        shifted beyond a translation, e.g. another platform or species, where every cell of
        it would otherwise be rejected: its components are scaled to the spread of the
        reference bank and the coverage is tested again, with a warning (issue 14: on
        ``cellbench_c2d_strongshift``, scNym seed 0, 93% of correctly called cells were
        rejected, 8% after scaling). Scaling every domain always would hide held-out types
        (Kang, B cells held out: 52% caught, 26% with every domain scaled).
        """
        space = self._reference_space
        if space is None or coords is None:
            return None, None, None
        centred = centre_by_group(coords, domains)
        seed = settings.seed or 0
        query = domains >= 0
        uncovered = uncovered_apart(space, centred, prediction, query, seed=seed)
        novel = uncovered > NOVEL_CUT
        shifted = [
            int(g) for g in np.unique(domains[query]) if novel[domains == g].mean() > RESCALE_CUT
        ]
        if not shifted:
            return centred, uncovered, None
        shared = space.bank.shape[1]  # the residual axes are the query's own: not scaled
        centred[:, :shared] = scale_groups(
            centred[:, :shared], domains, shifted, space.bank.std(axis=0)
        )
        rescaled = uncovered_apart(space, centred, prediction, query, seed=seed)
        before = float(novel[query].mean())
        record = {
            "rescaled_domains": shifted,
            "novel_fraction_before": before,
            "novel_fraction_after": float((rescaled[query] > NOVEL_CUT).mean()),
        }
        warnings.warn(
            f"{before:.0%} of the query had no mutual nearest neighbour in the reference's "
            "coverage space: it is shifted beyond a translation (another platform, protocol "
            "or species?). Its principal components were scaled to the reference's spread "
            f"before the novelty test, which then found {record['novel_fraction_after']:.0%} "
            "novel (uns[key]['rejection']['coverage']). Held-out types are harder to tell "
            "from such a shift, and the confidences, calibrated on reference cells, do not "
            "follow it (they can be far too low or too high): check the calls with marker "
            "genes.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )
        return centred, rescaled, record

    def _open_set_calls(
        self,
        calls: np.ndarray,
        rejected: np.ndarray,
        centred: np.ndarray | None,
        uncovered: np.ndarray | None,
        novel: str | bool,
    ) -> tuple[np.ndarray, int]:
        """Turn uncovered rejected cells in large enough groups into ``novel_<i>`` calls."""
        if novel is False or uncovered is None or not self._forms_novel_groups:
            return calls, 0
        candidates = rejected & (uncovered > NOVEL_CUT)
        numbers = novel_groups(
            centred, candidates, min_cells=MIN_NOVEL_GROUP, seed=settings.seed or 0
        )
        rows = np.flatnonzero(candidates)[numbers >= 0]
        calls[rows] = [f"{NOVEL_PREFIX}{n}" for n in numbers[numbers >= 0]]
        return calls, int(numbers.max() + 1) if numbers.size else 0

    #: Whether the layer forms ``novel_<i>`` groups (scDET has novel classes of its own).
    _forms_novel_groups: bool = True

    @staticmethod
    def _check_novel(novel: str | bool) -> None:
        if not (novel == "auto" or novel is False):
            raise ValueError(
                f"novel must be 'auto' (group uncovered cells into novel_<i>) or False (call "
                f"them Unassigned), got {novel!r}."
            )

    def _warn_if_most_rejected(self, rejected: np.ndarray, rule: dict[str, Any]) -> None:
        rate = float(rejected.mean()) if rejected.size else 0.0
        if rate <= WARN_REJECTED:
            return
        warnings.warn(
            f"{type(self).__name__} rejected {rate:.0%} of the {rejected.size} cells with the "
            f"{rule['rule']!r} rule. Check that the query shares the reference's genes and "
            "types (uns[key]['gene_overlap']); to see the calls anyway, read "
            "obs[key + '_prediction'] or annotate with rejection='per_type' (confidence "
            "only) or None.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )
