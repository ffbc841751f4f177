"""MixMatch building blocks (Berthelot et al., 2019) as used by scNym."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sharpen(probabilities: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Sharpen categorical distributions: ``p_k^(1/T) / sum_j p_j^(1/T)``.

    Parameters
    ----------
    probabilities
        Rows of class probabilities, cells x classes.
    temperature
        ``T`` (scNym/MixMatch: 0.5). ``T = 1`` returns the input, ``T -> 0`` approaches the
        one-hot argmax and ``T = 0`` returns it exactly.

    Returns
    -------
    Tensor of the input's shape whose rows sum to one.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature == 0:
        index = probabilities.argmax(dim=1)
        return F.one_hot(index, probabilities.shape[1]).to(probabilities.dtype)
    if temperature == 1:
        return probabilities
    # in log space so that small temperatures do not underflow to 0/0
    tiny = torch.finfo(probabilities.dtype).tiny
    return torch.softmax(probabilities.clamp_min(tiny).log() / temperature, dim=1)


def mixup_weights(
    n: int,
    alpha: float = 0.3,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw MixUp weights ``lambda ~ Beta(alpha, alpha)`` kept on the dominant side.

    Parameters
    ----------
    n
        Number of weights (one per mixed sample).
    alpha
        Shape of the symmetric Beta distribution (scNym: 0.3). ``0`` gives no mixing
        (all weights 1).
    device, dtype
        Of the result.

    Returns
    -------
    Tensor of shape ``(n,)`` with ``lambda = max(lambda, 1 - lambda)`` in ``[0.5, 1]``, so that
    each mixed sample is dominated by its first argument and keeps its identity (MixMatch).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}.")
    if alpha == 0 or n == 0:
        return torch.ones(n, device=device, dtype=dtype)
    concentration = torch.tensor(float(alpha), device=device, dtype=dtype)
    lam = torch.distributions.Beta(concentration, concentration).sample((n,))
    return torch.maximum(lam, 1.0 - lam)


def mixup(
    x: torch.Tensor,
    y: torch.Tensor,
    x_other: torch.Tensor,
    y_other: torch.Tensor,
    *,
    alpha: float = 0.3,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al., 2018) of paired samples and their (soft) labels.

    ``Mix_lambda(a, b) = lambda a + (1 - lambda) b`` row by row, with
    ``lambda = max(lambda', 1 - lambda')``, ``lambda' ~ Beta(alpha, alpha)`` drawn per row.

    Parameters
    ----------
    x, y
        Samples (cells x genes) and their label distributions (cells x classes). They get
        the weight ``lambda >= 0.5``: each mixed row keeps the identity of its row of ``x``.
    x_other, y_other
        Partners of the same shapes (e.g. ``x[perm]``, ``y[perm]``).
    alpha
        Beta shape (scNym: 0.3); ignored when ``weights`` is given.
    weights
        Explicit ``lambda`` per row instead of random draws.

    Returns
    -------
    mixed_x, mixed_y, weights
        The mixed samples and labels (rows of ``mixed_y`` sum to one when those of ``y`` and
        ``y_other`` do) and the ``lambda`` used, shape ``(n,)``.
    """
    if x.shape != x_other.shape or y.shape != y_other.shape or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"mixup needs pairs of equal shapes, got x {tuple(x.shape)}, x_other "
            f"{tuple(x_other.shape)}, y {tuple(y.shape)}, y_other {tuple(y_other.shape)}."
        )
    if weights is None:
        weights = mixup_weights(x.shape[0], alpha, device=x.device, dtype=x.dtype)
    lam = weights.reshape(-1, 1)
    return lam * x + (1 - lam) * x_other, lam * y + (1 - lam) * y_other, weights


def sigmoid_ramp(epoch: float, ramp_epochs: float, max_value: float = 1.0) -> float:
    """Sigmoid-shaped ramp-up ``max_value * exp(-5 (1 - t / T)^2)`` (Laine & Aila, 2017).

    Parameters
    ----------
    epoch
        Current epoch ``t`` (0-based).
    ramp_epochs
        ``T``: the value reaches ``max_value`` at ``t = T`` and stays there (scNym: 100 epochs
        for the interpolation-consistency weight, 20 for the adversary). ``T <= 0`` gives
        ``max_value`` from the start.
    max_value
        Final value (scNym: 1.0 for the consistency loss, 0.1 for the adversary).

    Returns
    -------
    The weight at ``epoch``: ``max_value * exp(-5) ~ 0.007 max_value`` at ``t = 0``, rising
    monotonically to ``max_value``.
    """
    if ramp_epochs <= 0 or epoch >= ramp_epochs:
        return float(max_value)
    phase = 1.0 - max(float(epoch), 0.0) / ramp_epochs
    return float(max_value * math.exp(-5.0 * phase * phase))
