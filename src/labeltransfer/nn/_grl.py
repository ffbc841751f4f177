"""Gradient reversal (Ganin et al., 2016) for domain-adversarial training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GradientReversalFunction(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-weight`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        """Return ``x`` unchanged and remember ``weight`` for the backward pass."""
        ctx.weight = float(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Reverse and scale the incoming gradient (no gradient for ``weight``)."""
        return grad_output.neg() * ctx.weight, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Apply gradient reversal to ``x``.

    Parameters
    ----------
    x
        Input tensor (e.g. an embedding fed to a domain adversary).
    weight
        Scale ``lambda`` of the reversed gradient: the backward pass returns
        ``-lambda * grad``. ``0`` blocks the adversary's gradient entirely.

    Returns
    -------
    ``x`` itself (as a view), so the forward computation is unchanged.
    """
    return GradientReversalFunction.apply(x, weight)


class GradientReversal(nn.Module):
    """Gradient reversal layer with a settable weight.

    The layer is the identity in the forward pass. In the backward pass the gradient is
    multiplied by ``-weight``, so the layers *before* it are trained to increase the loss of
    the network *after* it (an adversary), while the adversary itself receives its normal,
    full-magnitude gradient (scNym, "Domain adaptation with domain adversarial networks").

    Parameters
    ----------
    weight
        Initial scale of the reversed gradient. Training plans update :attr:`weight` on a
        schedule (scNym: a sigmoid ramp from 0 to 0.1 over 20 epochs).
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Identity; reverses and scales the gradient on the way back."""
        return grad_reverse(x, self.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
