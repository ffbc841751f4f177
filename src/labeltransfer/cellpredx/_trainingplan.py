"""Training plan of CellPredX: the five-loss objective in one automatic-optimisation step."""

from __future__ import annotations

from labeltransfer.train import AnnotationTrainingPlan

from ._losses import CellPredXLossConfig
from ._module import CellPredXModule


class CellPredXTrainingPlan(AnnotationTrainingPlan):
    """Optimise ``L_CE + w_PR L_PR + w_CL L_CL + w_FA L_FA + w_SC L_SC`` with Adam.

    Training batches are ``(reference, query)`` pairs from the CellPredX splitter, whose query
    batches carry a kNN neighbour of each cell; or reference batches alone. Validation
    batches are reference batches: cross-entropy and accuracy, logged as ``validation_loss``
    and ``validation_accuracy``.

    Parameters
    ----------
    module
        The CellPredX module.
    config
        The objective's hyper-parameters (:class:`~labeltransfer.cellpredx.CellPredXLossConfig`,
        e.g. ``model.loss_config``: the model's preset with its overrides).
    lr
        Initial learning rate (CellPredX: 0.001).
    weight_decay
        Weight decay. The paper gives none; 5e-4 is the reference implementation's.
    **kwargs
        Passed to :class:`~labeltransfer.train.AnnotationTrainingPlan` (``optimizer``, ...).
    """

    def __init__(
        self,
        module: CellPredXModule,
        *,
        config: CellPredXLossConfig,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        **kwargs,
    ):
        kwargs.setdefault("eps", 1e-8)  # PyTorch's Adam default (scvi's plans use 0.01)
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        self.config = config

    def training_step(self, batch, batch_idx):
        """One step of the CellPredX objective on a ``(reference, query)`` pair."""
        if isinstance(batch, tuple | list):
            reference, query = batch
        else:
            reference, query = batch, None
        output = self.module.loss(reference, query=query, config=self.config)
        self._log_loss_output(output, "train")
        return output.loss
