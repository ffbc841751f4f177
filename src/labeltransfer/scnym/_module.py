"""scNym networks: classifier with a penultimate embedding, and the domain adversary."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput, auto_move_data
from torch import nn

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base._module import AnnotationModule
from labeltransfer.nn import (
    GradientReversal,
    mask_genes,
    mixup,
    mlp,
    sharpen,
)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-sum_k q_k log softmax(logits)_k`` against soft targets ``q``."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class SCNYMModule(AnnotationModule):
    """scNym classifier ``f_theta`` and domain adversary ``g_phi``.

    ``f_theta``: input -> 256 -> 256 -> classes; each hidden layer is linear, batch norm, ReLU
    and dropout. The embedding ``v`` is the output of the last hidden layer (penultimate
    layer). ``g_phi``: gradient reversal, one hidden layer of 256 ReLU units and one output
    per domain.

    Parameters
    ----------
    n_input
        Number of registered genes.
    n_labels
        Number of reference cell types.
    n_domains
        Number of domains the adversary predicts.
    feature_idx
        Indices of the genes used as input.
    input_type
        ``"counts"`` (turned into log(CPM + 1) per minibatch, scNym) or ``"lognorm"``.
    domain_source
        ``"batch"``: a cell's domain is its batch code; ``"role"``: reference cells are
        domain 0 and query cells domain 1.
    n_hidden
        Width of the hidden layers (scNym: 256).
    n_layers
        Number of hidden layers (scNym: 2).
    dropout_rate
        Dropout after each hidden layer. The paper pairs every layer with dropout without a
        rate; 0.5 is the reference implementation's (``torch.nn.Dropout()``).
    n_hidden_adversary
        Hidden units of the adversary (scNym: 256, one hidden layer).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_domains: int,
        *,
        feature_idx: Sequence[int],
        input_type: str,
        peak_weights: Sequence[float] | None = None,
        domain_source: str = "role",
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout_rate: float = 0.5,
        n_hidden_adversary: int = 256,
    ):
        super().__init__(
            n_input,
            n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
        )
        if domain_source not in ("batch", "role"):
            raise ValueError(f"domain_source must be 'batch' or 'role', got {domain_source!r}.")
        self.n_domains = n_domains
        self.domain_source = domain_source
        self.n_hidden = n_hidden
        self.n_hidden_adversary = n_hidden_adversary
        sizes = (self.n_features, *([n_hidden] * n_layers))
        self.embedder = mlp(sizes, batch_norm=True, dropout=dropout_rate, activate_last=True)
        self.classifier = nn.Linear(n_hidden, n_labels)
        self.gradient_reversal = GradientReversal(weight=0.0)
        self.adversary = self._build_adversary(n_domains)

    def _build_adversary(self, n_domains: int) -> nn.Sequential:
        return mlp((self.n_hidden, self.n_hidden_adversary, n_domains))

    def on_load(self, model, **kwargs) -> None:
        """Size the adversary to the saved model's domains before its weights are loaded.

        A model loaded onto an AnnData with new batch categories would otherwise build an
        adversary with more outputs than the saved one.
        """
        n_domains = len(getattr(model, "domains_", [])) or self.n_domains
        if n_domains != self.n_domains:
            self.n_domains = n_domains
            self.adversary = self._build_adversary(n_domains).to(self.feature_idx.device)

    # ------------------------------------------------------------- scvi contract
    @auto_move_data
    def inference(self, x: torch.Tensor, normalized: bool = False) -> dict[str, torch.Tensor]:
        """Penultimate embedding ``z`` and class ``logits`` (``normalized``: see :meth:`transform`)."""
        z = self.embedder(self.transform(x, normalized))
        return {"z": z, "logits": self.classifier(z)}

    # ------------------------------------------------------------- training
    @torch.no_grad()
    def pseudolabel_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities of normalised inputs with the model in eval mode (the teacher)."""
        was_training = self.training
        self.eval()
        try:
            probabilities = torch.softmax(self.classifier(self.embedder(x)), dim=1)
        finally:
            self.train(was_training)
        return probabilities

    def _domains(self, tensors: dict[str, torch.Tensor], role: int) -> torch.Tensor:
        n = tensors[REGISTRY_KEYS.X_KEY].shape[0]
        device = tensors[REGISTRY_KEYS.X_KEY].device
        if self.domain_source == "batch":
            return tensors[REGISTRY_KEYS.BATCH_KEY].long().ravel()
        domains = torch.full((n,), role, dtype=torch.long, device=device)
        # held-out reference cells in the query stream are reference cells to the adversary
        return domains.masked_fill(self.held_out_reference(tensors), 0)

    def semisupervised_loss(
        self,
        reference: dict[str, torch.Tensor],
        query: dict[str, torch.Tensor] | None = None,
        *,
        consistency_weight: float = 1.0,
        mixup_alpha: float = 0.3,
        temperature: float = 0.5,
        pseudolabel_threshold: float = 0.0,
        mask_rate: float = 0.1,
        mixmatch: bool = True,
    ) -> LossOutput:
        """Training loss of scNym on a labelled reference and an unlabelled query minibatch.

        1. Pseudolabels: the query's class probabilities (eval mode, no augmentation),
           sharpened at ``temperature``. Query cells whose unsharpened confidence is below
           ``pseudolabel_threshold`` are *unconfident* (new identity discovery).
        2. Augmentation: random gene masking with renormalisation of both minibatches.
        3. MixMatch: reference cells (one-hot labels) and confident query cells (sharpened
           pseudolabels) are pooled and each is mixed with a random partner from the pool,
           weight ``max(lambda, 1 - lambda)``, ``lambda ~ Beta(alpha, alpha)``.
        4. ``L_CE``: cross-entropy of the reference-dominated mixed cells against their mixed
           labels; ``L_SSL``: squared error between the predicted probabilities of the
           query-dominated mixed cells and their mixed pseudolabels, summed over classes and
           averaged over the query minibatch (unconfident cells contribute zero).
        5. ``L_adv``: cross-entropy of the adversary predicting the domain of the (unmixed)
           reference and confident query cells from the embedding, through the gradient
           reversal layer (its weight is set by the training plan). Cells of the query
           minibatch that carry a reference label (held-out reference cells trained like the
           query, ``RefQueryDataSplitter(validation_in_query_stream=True)``) are reference
           cells to the adversary; their labels serve nothing else.

        The returned loss is ``L_CE + consistency_weight * L_SSL + L_adv``. Without a query
        minibatch it is supervised MixUp training (plus the adversary over reference
        batches when domains come from ``batch_key``).

        Parameters
        ----------
        reference
            Labelled minibatch (registry tensors).
        query
            Unlabelled minibatch, or ``None``.
        consistency_weight
            ``lambda_SSL(t)`` of the current epoch.
        mixup_alpha
            Beta shape of MixUp (scNym: 0.3).
        temperature
            Sharpening temperature (scNym: 0.5).
        pseudolabel_threshold
            Minimum pseudolabel confidence (scNym's new identity discovery: 0.9; 0 keeps
            every query cell).
        mask_rate
            Gene masking probability (scNym: 0.1).
        mixmatch
            Mix the (confident) query cells into MixUp and penalise their inconsistency.
            ``False`` (an ablation) leaves the query to the adversary alone: MixUp within the
            reference and ``L_SSL = 0``.

        Returns
        -------
        :class:`~scvi.module.base.LossOutput` with extra metrics ``supervised_loss``,
        ``consistency_loss``, ``adversary_loss``, ``adversary_accuracy`` and
        ``confident_fraction``.
        """
        x_ref = self.transform(reference[REGISTRY_KEYS.X_KEY])
        labels = reference[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        if (labels >= self.n_labels).any():
            raise ValueError("The reference minibatch contains unlabelled cells.")
        target_ref = F.one_hot(labels, self.n_labels).to(x_ref.dtype)
        n_ref = x_ref.shape[0]
        device = x_ref.device
        zero = x_ref.new_zeros(())

        if query is not None:
            x_query = self.transform(query[REGISTRY_KEYS.X_KEY])
            probabilities = self.pseudolabel_probabilities(x_query)
            confident = probabilities.max(dim=1).values >= pseudolabel_threshold
            pseudolabels = sharpen(probabilities, temperature)
        else:
            x_query = x_ref.new_zeros((0, x_ref.shape[1]))
            confident = torch.zeros(0, dtype=torch.bool, device=device)
            pseudolabels = x_ref.new_zeros((0, self.n_labels))
        n_query = x_query.shape[0]

        x_ref = mask_genes(x_ref, mask_rate)
        x_query = mask_genes(x_query, mask_rate)

        # MixMatch: confident query cells first, then the reference cells
        in_pool = confident if mixmatch else torch.zeros_like(confident)
        pool_x = torch.cat([x_query[in_pool], x_ref])
        pool_y = torch.cat([pseudolabels[in_pool], target_ref])
        partner = torch.randperm(pool_x.shape[0], device=device)
        mixed_x, mixed_y, _ = mixup(
            pool_x, pool_y, pool_x[partner], pool_y[partner], alpha=mixup_alpha
        )
        n_confident = int(in_pool.sum())
        n_pool = pool_x.shape[0]

        # one pass: mixed cells (classification) and unmixed cells (adversary); the
        # unconfident query cells still contribute to the batch-norm statistics
        z = self.embedder(torch.cat([mixed_x, x_ref, x_query]))
        logits = self.classifier(z[:n_pool])
        supervised = soft_cross_entropy(logits[n_confident:], mixed_y[n_confident:])
        if n_query > 0 and n_confident > 0:
            error = (torch.softmax(logits[:n_confident], dim=1) - mixed_y[:n_confident]) ** 2
            consistency = error.sum() / n_query
        else:
            consistency = zero

        parts = [self._domains(reference, 0)]
        if query is not None:
            parts.append(self._domains(query, 1))
        domains = torch.cat(parts)
        include = torch.cat([torch.ones(n_ref, dtype=torch.bool, device=device), confident])
        use_adversary = self.n_domains > 1 and (query is not None or self.domain_source == "batch")
        if use_adversary and include.any():
            domain_logits = self.adversary(self.gradient_reversal(z[n_pool:][include]))
            adversary = F.cross_entropy(domain_logits, domains[include])
            adversary_accuracy = (domain_logits.argmax(dim=1) == domains[include]).float().mean()
        else:
            adversary = zero
            adversary_accuracy = zero

        loss = supervised + consistency_weight * consistency + adversary
        confident_fraction = confident.float().mean() if n_query > 0 else zero
        return LossOutput(
            loss=loss,
            n_obs_minibatch=n_ref,
            extra_metrics={
                "supervised_loss": supervised.detach(),
                "consistency_loss": consistency.detach(),
                "adversary_loss": adversary.detach(),
                "adversary_accuracy": adversary_accuracy.detach(),
                "confident_fraction": confident_fraction.detach(),
            },
        )
