"""Expression-profile augmentations."""

from __future__ import annotations

import torch
from torch import nn


def mask_genes(
    x: torch.Tensor,
    rate: float = 0.1,
    *,
    log1p_input: bool = True,
) -> torch.Tensor:
    """Set a random fraction of the genes of every cell to zero and renormalise.

    scNym's augmentation: "we randomly mask 10% of genes in each cell with zero values and
    then renormalize to obtain an augmented profile". Each entry is masked independently
    with probability ``rate``; every cell is then rescaled so that its total expression
    (on the linear scale) is the same as before masking, i.e. library-normalised profiles
    (CPM) stay library-normalised.

    Parameters
    ----------
    x
        Minibatch, cells x genes, of ``log1p``-normalised values (e.g. log(CPM + 1)) or, with
        ``log1p_input=False``, of non-negative linear-scale values.
    rate
        Probability that a gene is masked in a cell (scNym: 0.1).
    log1p_input
        ``x`` is ``log1p`` of normalised values: masking and renormalisation are done on
        ``expm1(x)`` and the result is returned on the log scale.

    Returns
    -------
    Augmented tensor of the input's shape. A cell whose every non-zero gene was masked is
    returned all zero.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}.")
    if rate == 0:
        return x
    linear = torch.expm1(x) if log1p_input else x
    keep = torch.rand_like(linear) >= rate
    masked = linear * keep
    total = linear.sum(dim=1, keepdim=True)
    kept = masked.sum(dim=1, keepdim=True)
    scale = torch.where(kept > 0, total / kept.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
    masked = masked * scale
    return torch.log1p(masked) if log1p_input else masked


class GeneMasking(nn.Module):
    """Random gene masking with renormalisation, active only in training mode.

    Parameters
    ----------
    rate
        Probability that a gene is masked in a cell (scNym: 0.1).
    log1p_input
        Inputs are ``log1p``-normalised (see :func:`mask_genes`).
    """

    def __init__(self, rate: float = 0.1, *, log1p_input: bool = True):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be in [0, 1), got {rate}.")
        self.rate = rate
        self.log1p_input = log1p_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask and renormalise in training mode; identity in eval mode."""
        if not self.training:
            return x
        return mask_genes(x, self.rate, log1p_input=self.log1p_input)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, log1p_input={self.log1p_input}"
