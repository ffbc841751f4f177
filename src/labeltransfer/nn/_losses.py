"""Losses shared by the modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput


def labelled_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    n_labels: int,
    class_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Cross-entropy and accuracy on the labelled cells of a minibatch.

    Cells with the unlabeled category (code ``n_labels``, scvi's convention) are left out.
    With ``class_weights`` each cell's cross-entropy is multiplied by the weight of its class
    and averaged over cells (JIND eq. 1), not divided by the sum of the weights as torch's
    weighted mean would.

    Parameters
    ----------
    logits
        Cells x ``n_labels`` logits.
    labels
        Registered label codes, shape ``(n_cells,)`` or ``(n_cells, 1)``.
    n_labels
        Number of reference types.
    class_weights
        Optional weight per type.

    Returns
    -------
    :class:`~scvi.module.base.LossOutput` with the loss, the number of labelled cells and
    ``extra_metrics["accuracy"]``; a zero loss when the minibatch has no labelled cell.
    """
    labels = labels.long().ravel()
    mask = labels < n_labels
    if not mask.any():
        zero = logits.sum() * 0.0
        return LossOutput(loss=zero, n_obs_minibatch=0, extra_metrics={"accuracy": zero})
    logits, target = logits[mask], labels[mask]
    per_cell = F.cross_entropy(logits, target, reduction="none")
    if class_weights is not None:
        per_cell = class_weights[target] * per_cell
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return LossOutput(
        loss=per_cell.mean(), n_obs_minibatch=target.numel(), extra_metrics={"accuracy": accuracy}
    )
