"""Where a data loader runs under distributed data parallel (DDP) training."""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """Return this process's rank and the number of processes (``(0, 1)`` outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_size(n: int, world_size: int) -> int:
    """Cells per process when ``n`` cells are split as ``DistributedSampler`` splits them.

    The index list is padded by repeating its head to a multiple of ``world_size``, so every
    process gets ``ceil(n / world_size)`` cells and runs the same number of steps.
    """
    return math.ceil(n / world_size)


def set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch`` on ``loader`` or its sampler where they have one (DDP shuffling).

    Lightning does this for the data loaders it sees; a loader nested in another iterable
    (:class:`~labeltransfer.dataloaders.PairedDataLoader`) must do it itself, or every epoch
    repeats the first epoch's shuffle.
    """
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
