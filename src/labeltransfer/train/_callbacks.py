"""Lightning callbacks shared by the models."""

from __future__ import annotations

import copy
import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher

logger = logging.getLogger(__name__)

#: Key of ``trainer.callback_metrics`` that carries the training state back from a spawned
#: DDP process (:class:`ReturnTrainingState`).
RETURNED_STATE_KEY = "labeltransfer_training_state"


class BestStateCallback(pl.Callback):
    """Keep the module weights of the best validation epoch and restore them at the end.

    JIND and JIND+ select "the model parameters corresponding to the highest validation
    accuracy across all epochs"; the same rule serves every model of the package. The copy is
    kept in memory (the modules are small), and it is restored when training ends normally or
    is interrupted, so a model is never left at an arbitrary last epoch.

    Parameters
    ----------
    monitor
        Logged metric to track.
    mode
        ``"max"`` or ``"min"``.
    tie_breaker
        Logged metric (lower is better) that decides between epochs with the same ``monitor``
        value. Validation accuracy often saturates at 1.0 in the first epochs of an easy task;
        without it the earliest, least trained of those epochs would be kept.
    warmup_epochs
        Epochs before which no state is kept (scNym selects only after 5% of the epochs).
    """

    def __init__(
        self,
        monitor: str = "validation_accuracy",
        mode: str = "max",
        tie_breaker: str | None = "validation_loss",
        warmup_epochs: int = 0,
    ):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.tie_breaker = tie_breaker
        self.warmup_epochs = warmup_epochs
        self.best_tie: float = float("inf")
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def _improved(self, score: float, tie: float) -> bool:
        if self.best_score is None:
            return True
        if score == self.best_score:
            return tie < self.best_tie
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """Snapshot the module when the monitored metric improves."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.current_epoch < self.warmup_epochs:
            return
        score = float(value)
        tie = trainer.callback_metrics.get(self.tie_breaker) if self.tie_breaker else None
        tie = float(tie) if tie is not None else float("inf")
        if self._improved(score, tie):
            self.best_score = score
            self.best_tie = tie
            self.best_epoch = trainer.current_epoch
            self.best_state = copy.deepcopy(pl_module.module.state_dict())

    def _restore(self, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.module.load_state_dict(self.best_state)
            logger.info(
                "Restored the weights of epoch %s (%s = %.4f).",
                self.best_epoch,
                self.monitor,
                self.best_score,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        """Load the best weights back into the module."""
        self._restore(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception):
        """Leave an interrupted model at its best epoch so far."""
        self._restore(pl_module)

    @property
    def state_key(self) -> str:
        """Identify this callback's state among several best-state callbacks."""
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        """Return the best epoch and its scores (the weights are in the module itself)."""
        return {
            "best_score": self.best_score,
            "best_tie": self.best_tie,
            "best_epoch": self.best_epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Set the best epoch and its scores."""
        self.best_score = state_dict["best_score"]
        self.best_tie = state_dict["best_tie"]
        self.best_epoch = state_dict["best_epoch"]


class ReturnTrainingState(pl.Callback):
    """Bring the epoch count and the callbacks' states back from spawned DDP processes.

    With a spawning or forking launcher (``strategy="ddp_spawn"``, ``"ddp_notebook"``,
    ``"ddp_fork"``) training runs in child processes and Lightning returns only the weights
    and the ``callback_metrics`` of rank 0 to the main process: there ``trainer.current_epoch``
    would read 0 and the package's callbacks (best epoch, scDET's estimations) would keep
    their initial state. At the end of training rank 0 adds them to ``callback_metrics``
    under :data:`RETURNED_STATE_KEY`; :func:`restore_training_state` reads them back in the
    main process. With any other launcher nothing is done (the state is already there).
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On rank 0 of a spawned run, put the state into ``callback_metrics``."""
        launcher = getattr(trainer.strategy, "launcher", None)
        if not trainer.is_global_zero or not isinstance(launcher, _MultiProcessingLauncher):
            return
        states = {
            callback.state_key: callback.state_dict()
            for callback in trainer.callbacks
            if callback is not self and type(callback).__module__.startswith("labeltransfer.")
        }
        trainer.callback_metrics[RETURNED_STATE_KEY] = {  # type: ignore[index]
            "current_epoch": int(trainer.current_epoch),
            "callbacks": states,
        }


def restore_training_state(trainer: pl.Trainer) -> None:
    """Load the state returned by :class:`ReturnTrainingState` into the main process.

    Sets ``trainer.current_epoch`` and calls ``load_state_dict`` on the callbacks of
    ``trainer`` with the returned states. Without a returned state (training ran in this
    process) nothing changes.
    """
    state = trainer.callback_metrics.pop(RETURNED_STATE_KEY, None)
    if state is None:
        return
    trainer.fit_loop.epoch_progress.current.completed = int(state["current_epoch"])
    for callback in trainer.callbacks:
        if callback.state_key in state["callbacks"]:
            callback.load_state_dict(state["callbacks"][callback.state_key])
