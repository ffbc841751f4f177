"""Small helpers for torch modules."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``modules``.

    Optimisers built inside the block (scvi plans keep only trainable parameters) then leave
    these modules untouched; the previous flags are restored on exit, also after an error.
    """
    params = [p for m in modules for p in m.parameters()]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)
