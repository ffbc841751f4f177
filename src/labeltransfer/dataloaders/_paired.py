"""Iterate two data loaders side by side."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import cycle
from typing import Any

from ._distributed import set_sampler_epoch


class PairedDataLoader:
    """Yield ``(batch_a, batch_b)`` pairs from two loaders.

    One epoch is one pass over the longer loader; the shorter one is cycled, so every
    reference cell and every query cell is seen at least once per epoch. Each pass also
    advances the epoch of the loaders' distributed samplers (under DDP), which Lightning
    cannot reach inside this iterable: every epoch gets a new shuffle, the same on all
    processes.

    scvi's :class:`~scvi.dataloaders.ConcatDataLoader` zips loaders in the same way, but
    does not fit: it builds every loader itself, as an ``AnnDataLoader`` of one AnnData with
    one ``drop_last`` for all, while the loaders paired here are of other kinds (JIND's
    reference codes, CellPredX's query loader with kNN neighbours) and drop a last batch of
    one cell per set; and under DDP it stops at the shorter loader instead of cycling it.

    Parameters
    ----------
    loader_a
        First loader (the labelled reference in this package).
    loader_b
        Second loader (the unlabelled query).
    """

    def __init__(self, loader_a: Iterable[Any], loader_b: Iterable[Any]):
        self.loader_a = loader_a
        self.loader_b = loader_b
        self.epoch = 0

    def __len__(self) -> int:
        return max(len(self.loader_a), len(self.loader_b))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for loader in (self.loader_a, self.loader_b):
            set_sampler_epoch(loader, self.epoch)
        self.epoch += 1
        if len(self.loader_a) >= len(self.loader_b):  # type: ignore[arg-type]
            return zip(self.loader_a, cycle(self.loader_b), strict=False)
        return zip(cycle(self.loader_a), self.loader_b, strict=False)
