"""Epoch means logged once per epoch (``EpochMeansMixin``) equal Lightning's weighted means."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from labeltransfer.train._epoch_means import EpochMeansMixin


class _Plan(EpochMeansMixin, pl.LightningModule):
    """Logs each minibatch's mean input as ``value`` and its size as ``size``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logged_steps = 0

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self._add_to_epoch("train", {"value": x.mean(), "size": float(len(x))}, len(x))
        self.logged_steps += 1
        return (self.weight * x).sum()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self._add_to_epoch("validation", {"value": x.mean()}, len(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("batch_size", [4, 10, 3])
def test_epoch_means_are_the_cell_weighted_means_of_the_steps(batch_size):
    x = torch.arange(10, dtype=torch.float32)  # batches of unequal size when 10 % b != 0
    loader = DataLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)
    plan = _Plan()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(plan, loader, loader)
    metrics = trainer.callback_metrics
    # the weighted mean of the batch means is the mean over cells: 4.5
    np.testing.assert_allclose(float(metrics["train_value"]), 4.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["validation_value"]), 4.5, rtol=1e-6)
    sizes = [len(x[i : i + batch_size]) for i in range(0, 10, batch_size)]
    expected_size = sum(s * s for s in sizes) / 10
    np.testing.assert_allclose(float(metrics["train_size"]), expected_size, rtol=1e-6)
    assert plan.logged_steps == 2 * len(sizes)
    # reset after every epoch
    assert plan._epoch_sums == {}
    assert plan._epoch_counts == {}
