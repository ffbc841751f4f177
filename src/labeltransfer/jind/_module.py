"""JIND networks: encoder + classifier, and the generator/discriminator pair for alignment."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scvi.module.base import auto_move_data
from torch import nn

from labeltransfer.base._module import AnnotationModule
from labeltransfer.nn import mlp


class JINDGenerator(nn.Module):
    """Shift-and-scale generator ``G(x, h) = S(x) * h + B(x)`` (JIND, "Asymmetric integration").

    ``S`` and ``B`` are each two 512-unit ReLU layers and a linear output of the latent size.
    Their output layers start at zero and ``S`` is parameterised as ``1 + S'``, so the
    generator starts as the identity (``S = 1``, ``B = 0``) as the paper requires.
    """

    def __init__(self, n_input: int, n_latent: int, n_hidden: int = 512):
        super().__init__()
        self.scale = mlp((n_input, n_hidden, n_hidden, n_latent))
        self.shift = mlp((n_input, n_hidden, n_hidden, n_latent))
        #: Name of the stored alignment whose weights a copy made for inference holds, and
        #: how it was chosen (see ``JIND.align``); ``None`` for the module's own generator.
        self.alignment: str | None = None
        self.matched_by: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise to the identity mapping."""
        for net in (self.scale, self.shift):
            for layer in net:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the aligned code ``S(x) * h + B(x)`` and the scale ``S(x)``."""
        scale = 1.0 + self.scale(x)
        return scale * h + self.shift(x), scale


class JINDModule(AnnotationModule):
    """JIND prediction model (encoder ``F``, classifier ``P``) plus ``G`` and ``D``.

    Parameters
    ----------
    n_input
        Number of registered genes.
    n_labels
        Number of reference cell types ``K``.
    feature_idx
        Indices of the genes used as input (JIND: the 5000 most variable genes).
    input_type
        ``"counts"`` (normalised to log(CPM+1) per minibatch) or ``"lognorm"``.
    class_weights
        ``w_k`` of the weighted cross-entropy (JIND eq. 2).
    n_latent
        Size of the latent code (JIND: 256, one layer).
    n_hidden
        Hidden units of the classifier (JIND: 256).
    dropout_rate
        Dropout on the encoder's hidden layer (JIND: 0.2).
    n_hidden_generator
        Width of the two hidden layers of ``S`` and ``B`` (JIND: 512).
    discriminator_sizes
        Hidden widths of the discriminator (JIND: 512, 256, 256, Leaky ReLU).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        *,
        feature_idx: Sequence[int],
        input_type: str,
        peak_weights: Sequence[float] | None = None,
        class_weights: Sequence[float],
        n_latent: int = 256,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        n_hidden_generator: int = 512,
        discriminator_sizes: Sequence[int] = (512, 256, 256),
    ):
        super().__init__(
            n_input,
            n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
        )
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32))
        n_features = self.n_features
        # F: the latent code is the encoder output *before* the ReLU
        self.encoder = nn.Linear(n_features, n_latent)
        # P: ReLU + dropout on the encoder's hidden layer, then 256 ReLU units and the output
        self.classifier = nn.Sequential(
            nn.ReLU(),
            nn.Dropout(dropout_rate),
            nn.Linear(n_latent, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_labels),
        )
        self.generator = JINDGenerator(n_features, n_latent, n_hidden_generator)
        self.discriminator = mlp(
            (n_latent, *discriminator_sizes, 1), activation=lambda: nn.LeakyReLU(0.2)
        )

    def reset_alignment(self) -> None:
        """Identity generator and a freshly initialised discriminator."""
        self.generator.reset_parameters()
        for layer in self.discriminator:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()

    @auto_move_data
    def inference(
        self,
        x: torch.Tensor,
        aligned: bool = False,
        generator: JINDGenerator | None = None,
        normalized: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Latent code ``z`` and class ``logits``.

        ``z`` is aligned by ``generator`` (a generator holding a stored alignment, passed per
        call so that concurrent calls never share one), or by the module's own generator
        ``G`` if ``aligned`` (the one :meth:`~labeltransfer.JIND.align` trains). ``normalized``:
        ``x`` is already the model's input (:meth:`transform`).
        """
        x = self.transform(x, normalized)
        z = self.encoder(x)
        if generator is None and aligned:
            generator = self.generator
        if generator is not None:
            z, _ = generator(x, z)
        return {"z": z, "logits": self.classifier(z)}
