"""Training plan of CellPredX: the five-loss objective in one automatic-optimisation step."""

from __future__ import annotations

from labeltransfer.train import AnnotationTrainingPlan

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
    lr
        Initial learning rate (CellPredX: 0.001).
    weight_decay
        Weight decay. The paper gives none; 5e-4 is the reference implementation's.
    pr_weight
        Weight of the projection regularisation (not among the paper's tuned
        hyper-parameters; 0.1 as the reference implementation's ``ortho_w``).
    cl_weight
        Weight of the kNN contrastive loss.
    fa_weight
        Weight of the feature alignment loss.
    sc_weight
        Weight of the sparse center loss.
    temperature
        Temperature of the contrastive loss.
    top_p
        Fraction of query cells aligned by the FA loss (0.8).
    pseudo_label_quantile
        Query cells above this quantile of the minibatch's confidences enter the sparse
        center loss with their pseudo-label (0.75).
    **kwargs
        Passed to :class:`~labeltransfer.train.AnnotationTrainingPlan` (``optimizer``, ...).
    """

    def __init__(
        self,
        module: CellPredXModule,
        *,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        pr_weight: float = 0.1,
        cl_weight: float = 1.2,
        fa_weight: float = 0.05,
        sc_weight: float = 0.01,
        temperature: float = 0.8,
        top_p: float = 0.8,
        pseudo_label_quantile: float = 0.75,
        **kwargs,
    ):
        kwargs.setdefault("eps", 1e-8)  # PyTorch's Adam default (scvi's plans use 0.01)
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        for name, value in (
            ("pr_weight", pr_weight),
            ("cl_weight", cl_weight),
            ("fa_weight", fa_weight),
            ("sc_weight", sc_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if not 0.0 <= pseudo_label_quantile <= 1.0:
            raise ValueError(
                f"pseudo_label_quantile must be in [0, 1], got {pseudo_label_quantile}."
            )
        self.loss_weights = {
            "pr_weight": float(pr_weight),
            "cl_weight": float(cl_weight),
            "fa_weight": float(fa_weight),
            "sc_weight": float(sc_weight),
        }
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.pseudo_label_quantile = float(pseudo_label_quantile)

    def training_step(self, batch, batch_idx):
        """One step of the CellPredX objective on a ``(reference, query)`` pair."""
        if isinstance(batch, tuple | list):
            reference, query = batch
        else:
            reference, query = batch, None
        output = self.module.training_loss(
            reference,
            query,
            **self.loss_weights,
            temperature=self.temperature,
            top_p=self.top_p,
            pseudo_label_quantile=self.pseudo_label_quantile,
        )
        self._log_loss_output(output, "train")
        return output.loss
