"""Run a Lightning fit for the extra training stages (alignment, self-training)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from scvi.model._utils import parse_device_args
from scvi.train import Trainer

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from scvi.model.base import BaseModelClass


def fit_stage(
    model: BaseModelClass,
    plan: pl.LightningModule,
    train_dataloader: Any,
    *,
    val_dataloader: Any = None,
    max_epochs: int,
    accelerator: str = "auto",
    devices: int | list[int] | str = "auto",
    **trainer_kwargs,
) -> dict[str, pd.DataFrame]:
    """Fit ``plan`` with scvi's :class:`~scvi.train.Trainer` and return the logged history.

    scvi's ``TrainRunner`` would merge this stage's metrics into ``model.history`` (dropping
    the metric names it has not seen before) and overwrite the reference split indices, so
    stages after the main training use this helper. Device arguments behave as in
    ``model.train``; the module ends in eval mode on the training device.
    """
    accelerator, lightning_devices, device = parse_device_args(
        accelerator=accelerator, devices=devices, return_device="torch"
    )
    trainer = Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=lightning_devices,
        **trainer_kwargs,
    )
    # Lightning keeps the modules' current mode; a trained model sits in eval mode, which
    # would silently disable dropout in a later fine-tuning stage
    plan.train()
    trainer.fit(plan, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)
    model.module.eval()
    model.to_device(device)
    history = getattr(trainer.logger, "history", None)
    return dict(history) if history else {}
