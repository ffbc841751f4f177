"""Small fully connected building blocks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn


def mlp(
    sizes: Sequence[int],
    *,
    activation: Callable[[], nn.Module] = nn.ReLU,
    dropout: float = 0.0,
    batch_norm: bool = False,
    activate_last: bool = False,
) -> nn.Sequential:
    """Build ``Linear -> [BatchNorm] -> activation -> [Dropout]`` blocks.

    Parameters
    ----------
    sizes
        Layer widths, input first: ``(n_in, n_hidden, ..., n_out)``.
    activation
        Activation class inserted after every hidden layer.
    dropout
        Dropout probability after every hidden activation.
    batch_norm
        Insert :class:`~torch.nn.BatchNorm1d` before each hidden activation.
    activate_last
        Also apply normalisation, activation and dropout after the last layer.

    Returns
    -------
    The network as a :class:`~torch.nn.Sequential`.
    """
    layers: list[nn.Module] = []
    n_layers = len(sizes) - 1
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < n_layers - 1 or activate_last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(n_out))
            layers.append(activation())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
