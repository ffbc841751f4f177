"""Epoch means of a training plan's metrics, logged once per epoch instead of every step."""

from __future__ import annotations

import torch

#: ``(mode, name)`` of the metrics shown in the progress bar.
PROGRESS_BAR = (("train", "loss"), ("validation", "accuracy"))


class EpochMeansMixin:
    """Sum a Lightning module's step metrics per epoch and log their means once.

    Lightning's ``self.log`` costs about 2 ms a call on a CPU (it moves each metric's state
    to the value's device every time): with eight metrics a step, more than the arithmetic of
    a small network's step. :meth:`_add_to_epoch` keeps the sums weighted by the minibatch
    size instead, and after the epoch's last minibatch each mean is logged once as
    ``{mode}_{name}``, with the epoch's cell count as its batch size: the means Lightning
    would log (``on_epoch=True``, weighted by ``batch_size``), across DDP processes too when
    the module's ``use_sync_dist`` is true.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # per mode ("train", "validation"): the sums of metric x minibatch size, and the cells
        self._epoch_sums: dict[str, dict[str, torch.Tensor]] = {}
        self._epoch_counts: dict[str, int] = {}

    def _add_to_epoch(self, mode: str, values: dict[str, object], n_obs: int) -> None:
        """Add one minibatch's ``values`` (scalars) of ``mode`` to the epoch's sums."""
        sums = self._epoch_sums.setdefault(mode, {})
        for name, value in values.items():
            weighted = torch.as_tensor(value).detach().float().mean() * n_obs
            sums[name] = sums[name] + weighted if name in sums else weighted
        self._epoch_counts[mode] = self._epoch_counts.get(mode, 0) + n_obs

    def _flush(self, mode: str) -> None:
        """Log the epoch means of ``mode``, then start the next epoch's sums."""
        sums, n_obs = self._epoch_sums.pop(mode, {}), self._epoch_counts.pop(mode, 0)
        for name, total in sums.items():
            self.log(
                f"{mode}_{name}",
                total / n_obs,
                on_step=False,
                on_epoch=True,
                prog_bar=(mode, name) in PROGRESS_BAR,
                batch_size=n_obs,
                sync_dist=bool(getattr(self, "use_sync_dist", False)),
            )

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """After the epoch's last training minibatch, log the epoch means."""
        super().on_train_batch_end(outputs, batch, batch_idx)
        if batch_idx + 1 >= self.trainer.num_training_batches:
            self._flush("train")

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        """After the epoch's last validation minibatch, log the epoch means."""
        super().on_validation_batch_end(outputs, batch, batch_idx, dataloader_idx)
        if batch_idx + 1 >= self.trainer.num_val_batches[dataloader_idx]:
            self._flush("validation")
