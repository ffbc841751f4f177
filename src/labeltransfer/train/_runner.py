"""Run a Lightning fit for the extra training stages (alignment, self-training)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
from scvi.model._utils import parse_device_args, use_distributed_sampler
from scvi.train import Trainer

from ._guards import check_fit_args, interruptible

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
    ``model.train``; the module ends in eval mode on the training device. A stage runs on
    one device: its loaders are not sharded, so DDP (several devices or a ``"ddp"``
    strategy) raises.
    """
    check_fit_args(max_epochs=max_epochs)
    accelerator, lightning_devices, device = parse_device_args(
        accelerator=accelerator, devices=devices, return_device="torch"
    )
    strategy = trainer_kwargs.get("strategy", "auto")
    n_devices = (
        len(lightning_devices)
        if isinstance(lightning_devices, list | tuple)
        else lightning_devices
    )
    if use_distributed_sampler(strategy) or (isinstance(n_devices, int) and n_devices != 1):
        raise ValueError(
            f"This training stage runs on one device, got devices={devices!r} and "
            f"strategy={strategy!r}. DDP is supported by `model.train()` only: JIND.align, "
            "JIND.self_train and scDET's n_novel warm-up do not shard their data. Call them "
            "with devices=1 and no strategy; to train SCDET with DDP, create it with "
            "n_novel=<number of novel types> (no warm-up)."
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
    with interruptible("This training stage was interrupted; its results were not stored."):
        trainer.fit(plan, train_dataloaders=train_dataloader, val_dataloaders=val_dataloader)
    model.module.eval()
    model.to_device(device)
    # the logger records on the global-zero process only: after a DDP ``model.train()``
    # (strategy="ddp") the other processes of the script get no history here
    history = getattr(trainer.logger, "history", None)
    return dict(history) if isinstance(history, dict) else {}


def record_stage_history(
    model: BaseModelClass, history: dict[str, pd.DataFrame], prefix: str
) -> None:
    """Put a training stage's metrics into ``model.history`` as ``{prefix}{metric}``.

    Like the metrics of ``train()``, each stage's are those of its last run: the metrics of
    an earlier run of the stage (keys starting with ``prefix``) are replaced. A history that
    is not scvi's dict of frames (a custom logger) is left as it is.
    """
    if model.history_ is not None and not isinstance(model.history_, dict):
        return
    merged = {k: v for k, v in (model.history_ or {}).items() if not k.startswith(prefix)}
    for key, frame in history.items():
        merged[prefix + key] = frame.rename(columns={key: prefix + key})
    model.history_ = merged
