"""Lightning callback running scDET's distribution estimation every ``m`` epochs."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from scvi import settings
from scvi.dataloaders import AnnDataLoader

from labeltransfer._constants import REGISTRY_KEYS

from ._estimation import estimate_distribution

logger = logging.getLogger(__name__)

#: Fewer changed predictions than this are stable on any number of cells (see
#: :class:`DistributionEstimation`).
STOP_MIN_CELLS = 5


class DistributionEstimation(pl.Callback):
    r"""Re-estimate the class distribution on the contrastive branch every ``m`` epochs.

    scDET (section 3.3): k-means with :math:`|\mathcal C_r \cup \mathcal C_t|` clusters on
    the contrastive features of all training cells (reference training split and target),
    Hungarian matching of clusters to the seen types and of the remaining clusters, by size,
    to the novel classes (:func:`~labeltransfer.scdet.estimate_distribution`). The aligned
    frequencies are copied into the module's ``class_distribution`` buffer, which the loss
    reads (:math:`\mathcal L_{reg}`, logit adjustment, sampling rates).

    The estimate used during epochs ``e, ..., e + m - 1`` (``e = 0, m, 2m, ...``) is computed
    from the network as it is at the start of epoch ``e``: before the first epoch, then at the
    end of epochs ``m - 1, 2m - 1, ...`` (a later epoch must follow). The epochs are recorded
    in :attr:`epochs`.

    Label stability stopping: at every estimation, the fraction of training cells whose
    predicted class (argmax of the classifier) changed since the previous estimation is
    recorded in :attr:`changed`. With ``stop_tol`` set, training stops when fewer than
    ``stop_tol`` of the cells, or fewer than ``stop_min_cells`` cells, changed at
    ``stop_patience`` consecutive estimations after ``stop_min_epochs`` epochs (the stopping
    rule of DEC-style clustering, e.g. scziDesk; the held-out reference accuracy says nothing
    about the novel types, so it does not decide). The count matters on a small set: on the
    Granja scATAC task (about 550 training cells) 0 to 8 cells, mostly 1 to 4, changed at
    every estimation from epoch 60 to 500, so 0.5% (2.75 cells) was met by chance, at epoch
    100 in one run and 380 in another, while the query's accuracy fell from 0.63-0.67 at
    epoch 100 to 0.48-0.61 at 500.

    Under DDP the estimation runs on the global-zero process, on all training cells (the
    training shards of every process), and its result is broadcast: every process gets the
    same distribution, history and stopping decision.

    Parameters
    ----------
    every_n_epochs
        :math:`m` (scDET: 10).
    batch_size
        Cells per inference minibatch.
    n_init
        k-means restarts.
    stop_tol
        Fraction of changed predictions under which the labels are stable; ``None`` never
        stops.
    stop_patience
        Consecutive stable estimations needed to stop.
    stop_min_cells
        Fewer changed cells than this are stable whatever their fraction.
    stop_min_epochs
        No stopping before this epoch.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        *,
        batch_size: int = 1024,
        n_init: int = 3,
        stop_tol: float | None = None,
        stop_patience: int = 2,
        stop_min_cells: int = STOP_MIN_CELLS,
        stop_min_epochs: int = 0,
        cells: str = "target",
    ):
        super().__init__()
        if cells not in ("target", "all"):
            raise ValueError(f"cells must be 'target' or 'all', got {cells!r}.")
        self.cells = cells
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
        if stop_tol is not None and not 0.0 <= stop_tol < 1.0:
            raise ValueError(f"stop_tol must be in [0, 1) or None, got {stop_tol}.")
        self.every_n_epochs = int(every_n_epochs)
        self.batch_size = batch_size
        self.n_init = n_init
        self.stop_tol = stop_tol
        self.stop_patience = stop_patience
        self.stop_min_cells = stop_min_cells
        self.stop_min_epochs = stop_min_epochs
        self.epochs: list[int] = []
        self.distributions: list[np.ndarray] = []
        self.changed: list[float | None] = []
        self.stopped_epoch: int | None = None
        self._previous: np.ndarray | None = None
        self._stable = 0

    # ------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Estimate from the initial network, for the first ``m`` epochs."""
        if trainer.current_epoch % self.every_n_epochs == 0:
            self._estimate(trainer, pl_module, trainer.current_epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Estimate for the next epoch when it starts a new period of ``m`` epochs."""
        upcoming = trainer.current_epoch + 1
        if upcoming % self.every_n_epochs or upcoming >= trainer.max_epochs:
            return
        changed = self._estimate(trainer, pl_module, upcoming)
        if self.stop_tol is None or changed is None:
            return
        n_cells = self._training_cells(trainer)[1].size  # the same sets on every process
        limit = max(self.stop_tol, self.stop_min_cells / n_cells)
        self._stable = self._stable + 1 if changed < limit else 0
        if self._stable >= self.stop_patience and upcoming >= self.stop_min_epochs:
            self.stopped_epoch = upcoming
            trainer.should_stop = True
            logger.info(
                "scDET: predictions stable (< %.2f%% changed at %d estimations): stopping "
                "before epoch %d.",
                100 * limit,
                self.stop_patience,
                upcoming,
            )

    # ------------------------------------------------------------- work
    def _training_cells(self, trainer: pl.Trainer) -> tuple[Any, np.ndarray, int]:
        splitter = trainer.datamodule
        if splitter is None or not hasattr(splitter, "ref_train_idx"):
            raise RuntimeError(
                "DistributionEstimation needs the RefQueryDataSplitter as the trainer's "
                "datamodule (train through SCDET.train)."
            )
        indices = np.concatenate([splitter.ref_train_idx, splitter.query_idx]).astype(int)
        return splitter.adata_manager, indices, int(splitter.ref_train_idx.size)

    @torch.no_grad()
    def _embed(self, module, manager, indices: np.ndarray) -> tuple[np.ndarray, ...]:
        loader = AnnDataLoader(manager, indices=indices, shuffle=False, batch_size=self.batch_size)
        was_training = module.training
        module.eval()
        # filled batch by batch (concatenating per-batch lists held every feature twice)
        features = np.empty((indices.size, module.n_head), dtype=np.float32)
        predictions = np.empty(indices.size, dtype=np.int64)
        labels = np.empty(indices.size, dtype=np.int64)
        start = 0
        try:
            for tensors in loader:
                out = module.inference(**module._get_inference_input(tensors))
                stop = start + out["v"].shape[0]
                features[start:stop] = out["v"].float().cpu().numpy()
                predictions[start:stop] = out["logits"].argmax(dim=1).cpu().numpy()
                labels[start:stop] = tensors[REGISTRY_KEYS.LABELS_KEY].long().ravel().numpy()
                start = stop
        finally:
            module.train(was_training)
        return features, predictions, labels

    def _estimate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int
    ) -> float | None:
        module = pl_module.module
        estimate = None
        if trainer.is_global_zero:
            manager, indices, _ = self._training_cells(trainer)
            features, prediction, labels = self._embed(module, manager, indices)
            labels = np.where(labels < module.n_labels, labels, -1)
            result = estimate_distribution(
                features,
                labels,
                module.n_labels,
                module.n_classes,
                seed=(settings.seed or 0) + epoch,
                n_init=self.n_init,
                cells=self.cells,
            )
            changed = (
                None if self._previous is None else float((prediction != self._previous).mean())
            )
            self._previous = prediction
            estimate = (result["distribution"], result["target_distribution"], changed)
        # identical state on every DDP process (a no-op on one device)
        distribution, target_distribution, changed = trainer.strategy.broadcast(estimate, src=0)
        dtype = module.class_distribution.dtype
        module.class_distribution.copy_(torch.as_tensor(distribution, dtype=dtype))
        module.target_distribution.copy_(torch.as_tensor(target_distribution, dtype=dtype))
        self.epochs.append(int(epoch))
        self.distributions.append(distribution)
        self.changed.append(changed)
        logger.debug("scDET distribution at epoch %d: %s", epoch, np.round(distribution, 3))
        return changed

    @property
    def state_key(self) -> str:
        """Identify this callback's state among several estimation callbacks."""
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs, cells=self.cells, stop_tol=self.stop_tol
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the estimations so far (also sent back from spawned DDP processes)."""
        return self.summary()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set the estimations from :meth:`state_dict`."""
        self.epochs = [int(e) for e in state_dict["epochs"]]
        self.distributions = [np.asarray(d, dtype=float) for d in state_dict["distributions"]]
        self.changed = list(state_dict["changed"])
        self.stopped_epoch = state_dict["stopped_epoch"]

    def summary(self) -> dict[str, Any]:
        """Epochs, distributions and changed fractions of the estimations so far."""
        return {
            "epochs": list(self.epochs),
            "distributions": [d.tolist() for d in self.distributions],
            "changed": list(self.changed),
            "stopped_epoch": self.stopped_epoch,
        }
