"""Training plan of scDET: one automatic-optimisation step on a (reference, target) pair."""

from __future__ import annotations

from labeltransfer.train import AnnotationTrainingPlan

from ._losses import SCDETLossConfig
from ._module import SCDETModule


class SCDETTrainingPlan(AnnotationTrainingPlan):
    r"""Optimise scDET's objective (eq. 11) with Adam.

    Training batches are ``(reference, target)`` pairs from
    :class:`~labeltransfer.dataloaders.RefQueryDataSplitter` (``use_query=True``); validation
    batches are held-out reference cells (cross-entropy and accuracy over all classes, logged
    as ``validation_loss`` and ``validation_accuracy``). The class distribution used by
    :math:`\mathcal L_{reg}`, the logit adjustment and the sampling is the module's
    ``class_distribution``, updated by :class:`~labeltransfer.scdet.DistributionEstimation`.

    Parameters
    ----------
    module
        The scDET module.
    config
        The objective's hyper-parameters; ``None`` takes the defaults of
        :class:`~labeltransfer.scdet.SCDETLossConfig`, where their values (the paper's, or
        documented departures) and their checks live.
    lr
        Adam learning rate (scDET: 1e-4).
    weight_decay
        Weight decay (not in the paper: 0).
    **kwargs
        Passed to :class:`~labeltransfer.train.AnnotationTrainingPlan`.
    """

    def __init__(
        self,
        module: SCDETModule,
        *,
        config: SCDETLossConfig | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        **kwargs,
    ):
        if "optimizer" not in kwargs:  # scDET's Adam at PyTorch's eps (scvi's plans use 0.01)
            kwargs.update(optimizer="Adam", eps=kwargs.get("eps", 1e-8))
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        self.config = SCDETLossConfig() if config is None else config

    def on_train_start(self) -> None:
        """Predictions of the trained model use the logit adjustment of training (eq. 7)."""
        super().on_train_start()
        self.module.logit_adjustment.fill_(self.config.gamma)

    def training_step(self, batch, batch_idx):
        """One scDET step on a ``(reference, target)`` minibatch pair."""
        if isinstance(batch, tuple | list):
            reference, query = batch
        elif self.config.warmup:  # a reference model: the warm-up objective on its cells
            # no target cells: empty tensors of the batch's kinds (a CSR one cannot be sliced)
            reference = batch
            query = {k: v.new_zeros((0, *v.shape[1:])) for k, v in batch.items()}
        else:
            raise ValueError(
                "scDET trains on reference and target cells together: the training batches "
                "must be (reference, query) pairs (RefQueryDataSplitter(use_query=True)), or "
                "reference batches with the warm-up objective (config.warmup=True)."
            )
        output = self.module.loss(reference, query=query, config=self.config)
        self._log_loss_output(output, "train")
        return output.loss
