"""Training shared by every model: scvi's TrainRunner around the model's plan and splitter."""

from __future__ import annotations

from typing import Any

from scvi import settings
from scvi.model._utils import use_distributed_sampler
from scvi.train import TrainRunner

from labeltransfer.dataloaders import RefQueryDataSplitter
from labeltransfer.train import BestStateCallback
from labeltransfer.train._callbacks import ReturnTrainingState, restore_training_state
from labeltransfer.train._guards import check_fit_args, interruptible

#: Message of the ``KeyboardInterrupt`` raised when ``train()`` is interrupted.
_INTERRUPTED = (
    "Training was interrupted; the model is left untrained (annotate() and predict() refuse "
    "it). Call model.train() again."
)


class TrainingMixin:
    """Fit a model's training plan with scvi's runner, then its open-set layer."""

    #: Splitter built by :meth:`_run_training`; a model may use a subclass (CellPredX adds
    #: the query cells' kNN neighbours to its query minibatches).
    _splitter_cls: type[RefQueryDataSplitter] = RefQueryDataSplitter

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
