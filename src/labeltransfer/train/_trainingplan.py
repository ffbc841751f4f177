"""Training plan for classifier modules: real metrics only, no ELBO bookkeeping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scvi.train import TrainingPlan

if TYPE_CHECKING:
    from scvi.module.base import BaseModuleClass, LossOutput


class AnnotationTrainingPlan(TrainingPlan):
    """Automatic-optimisation plan for the annotation modules.

    Logs ``train_loss``/``validation_loss`` and every scalar of ``LossOutput.extra_metrics``
    as ``{mode}_{name}`` (e.g. ``validation_accuracy``), each averaged over the epoch and
    weighted by the minibatch size. scvi's default plan would also log meaningless zero ELBO
    terms for non-generative modules.

    Parameters
    ----------
    module
        The module to train.
    inference_kwargs
        Passed to ``module.inference`` at every step (e.g. ``{"aligned": True}``).
    **kwargs
        Passed to :class:`scvi.train.TrainingPlan` (``lr``, ``weight_decay``, ``optimizer``,
        ``reduce_lr_on_plateau``, ...). Unknown names become ``module.loss`` keyword arguments.
    """

    def __init__(
        self,
        module: BaseModuleClass,
        *,
        inference_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.inference_kwargs = inference_kwargs or {}

    def forward(self, *args, **kwargs):
        """Run the module with this plan's inference keyword arguments."""
        return self.module(*args, inference_kwargs=self.inference_kwargs, **kwargs)

    def _log_loss_output(self, output: LossOutput, mode: str) -> None:
        n_obs = output.n_obs_minibatch
        self.log(
            f"{mode}_loss",
            output.loss,
            on_step=False,
            on_epoch=True,
            prog_bar=mode == "train",
            batch_size=n_obs,
            sync_dist=self.use_sync_dist,
        )
        for name, value in output.extra_metrics.items():
            self.log(
                f"{mode}_{name}",
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=mode == "validation" and name == "accuracy",
                batch_size=n_obs,
                sync_dist=self.use_sync_dist,
            )

    def training_step(self, batch, batch_idx):
        """Compute the loss on one minibatch and log it."""
        _, _, output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._log_loss_output(output, "train")
        return output.loss

    def validation_step(self, batch, batch_idx):
        """Log the validation loss and metrics of one minibatch."""
        _, _, output = self.forward(batch, loss_kwargs=self.loss_kwargs)
        self._log_loss_output(output, "validation")
