"""Fine-tune a reference model's encoder on one query, the reference stood in for by codes.

Used by ``model.train()`` after :meth:`~labeltransfer.base._mapping.ReferenceMappingMixin.load_query_data`
(scNym, scDET, CellPredX; JIND aligns with its GAN instead). The classifier is frozen, so it
keeps what it learned on the reference; the encoder learns to put the query's cells where
the reference's were, with three of the methods' own losses, each computed against the
*reference codes* saved with the model (the encoder's embedding of a stratified bank of
reference cells, with their labels) instead of the reference cells:

- **domain adversary** (scNym's ``L_adv``): a discriminator tells the saved reference codes
  from the query's embedding; the encoder gets its gradient reversed (scaled by a sigmoid
  ramp to ``adversary_weight``), so the query's codes move onto the reference's;
- **pseudo-label consistency** (scNym's ``L_SSL``): the model's predictions on the clean query
  (eval mode, no gradient), sharpened at ``temperature``, are the targets of its predictions on
  gene-masked query cells (squared error summed over classes); cells below
  ``pseudolabel_threshold`` (0.9) do not count: with every cell counting (scNym's training
  default) the encoder followed its wrong pseudo-labels and mapping lost 14-18 points of
  accuracy on Kang ctrl -> stim101 (scNym, scDET; ``benchmarks --suite mapping``);
- **class centers** (CellPredX's center loss, weight ``center_weight``): confident query codes
  are pulled to the mean reference code of their pseudo-label.

**Safeguard** (``anchors``): the query cells the reference model calls most confidently
before the fit are its *anchors*. After each epoch the plan measures how many of the anchors
the current model still gives the reference model's call (``train_anchor_agreement``); the
encoder of the last epoch whose agreement is at least ``1 - anchor_tolerance`` is kept
(:attr:`kept_state`, the starting encoder when no epoch reached it), and the fit stops at the
first epoch below it: a fit that moves the query off the reference's confident calls is
undone instead of making the model worse than the reference model it started from.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.nn import GradientReversal, mask_genes, mlp, sharpen, sigmoid_ramp

from ._epoch_means import EpochMeansMixin
from ._trainingplan import fast_adam


class QueryAdaptationPlan(EpochMeansMixin, pl.LightningModule):
    """Adapt ``encoder`` (a part of ``module``) to a query; the rest of the module is fixed.

    Each step takes a minibatch of saved reference codes and labels and a query minibatch
    (registry tensors); see the module docstring for the losses.

    Parameters
    ----------
    module
        The model's module; ``inference(x)`` returns ``z`` and ``logits``.
    encoder
        The part of ``module`` that is trained (its input-to-embedding network).
    reference_codes
        Saved reference codes (cells x latent dimensions), on any device.
    reference_labels
        Their reference type codes.
    lr
        Adam learning rate of the encoder (fine-tuning: 1e-4).
    lr_discriminator
        Adam learning rate of the discriminator (1e-3).
    adversary_weight
        Final scale of the reversed adversarial gradient (scNym: 0.1).
    adversary_ramp_epochs
        Epochs of its sigmoid ramp from 0.
    consistency_weight
        Weight of the pseudo-label consistency loss (scNym: 1.0).
    center_weight
        Weight of the class-center loss (0 turns it off).
    temperature
        Sharpening temperature of the pseudo-labels (scNym: 0.5).
    pseudolabel_threshold
        Least pseudo-label confidence for a query cell to count in the consistency and
        center losses (0.9; 0 counts every cell, as scNym's training does).
    mask_rate
        Probability of masking a gene in the augmentation (scNym: 0.1).
    anchors
        Query cells (a registry ``X`` tensor) the safeguard checks after each epoch;
        ``None`` turns it off. Their calls are the module's before the fit.
    anchor_tolerance
        Largest fraction of the anchors whose call may change in a kept epoch.
    """

    def __init__(
        self,
        module: nn.Module,
        encoder: nn.Module,
        reference_codes: torch.Tensor,
        reference_labels: torch.Tensor,
        *,
        lr: float = 1e-4,
        lr_discriminator: float = 1e-3,
        adversary_weight: float = 0.1,
        adversary_ramp_epochs: int = 5,
        consistency_weight: float = 1.0,
        center_weight: float = 0.0,
        temperature: float = 0.5,
        pseudolabel_threshold: float = 0.9,
        mask_rate: float = 0.1,
        anchors: torch.Tensor | None = None,
        anchor_tolerance: float = 0.02,
    ):
        super().__init__()
        self.module = module
        self.encoder = encoder
        self.lr = lr
        self.lr_discriminator = lr_discriminator
        self.adversary_weight = adversary_weight
        self.adversary_ramp_epochs = adversary_ramp_epochs
        self.consistency_weight = consistency_weight
        self.center_weight = center_weight
        self.temperature = temperature
        self.pseudolabel_threshold = pseudolabel_threshold
        self.mask_rate = mask_rate
        n_latent = reference_codes.shape[1]
        self.gradient_reversal = GradientReversal(weight=0.0)
        self.discriminator = mlp((n_latent, 256, 1))
        codes = torch.as_tensor(reference_codes, dtype=torch.float32)
        labels = torch.as_tensor(reference_labels, dtype=torch.long)
        n_labels = int(module.n_labels)
        counts = torch.bincount(labels, minlength=n_labels).clamp(min=1).unsqueeze(1)
        centers = torch.zeros(n_labels, n_latent).index_add_(0, labels, codes) / counts
        self.register_buffer("centers", centers)
        self.anchor_tolerance = anchor_tolerance
        self.anchors = anchors
        #: Agreement with the anchors' starting calls after each epoch.
        self.anchor_agreement: list[float] = []
        #: The encoder's state kept by the safeguard and the epochs it had trained.
        self.kept_state = copy.deepcopy(encoder.state_dict())
        self.kept_epoch = 0
        if anchors is not None:
            self.anchor_calls = self._calls(anchors)

    @torch.no_grad()
    def _calls(self, x: torch.Tensor) -> torch.Tensor:
        """Return the module's calls among the reference types (eval mode), by chunks."""
        module = self.module
        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        calls = [
            module.inference(chunk.to(device))["logits"][:, : module.n_labels].argmax(dim=1)
            for chunk in x.split(1024)
        ]
        module.train(was_training)
        return torch.cat(calls).cpu()

    def on_train_epoch_end(self) -> None:
        """Safeguard: keep this epoch's encoder if it keeps the anchors' calls, else stop."""
        if self.anchors is None:
            return
        agreement = float((self._calls(self.anchors) == self.anchor_calls).float().mean())
        self.anchor_agreement.append(agreement)
        self.log("train_anchor_agreement", agreement, on_step=False, on_epoch=True)
        if agreement >= 1 - self.anchor_tolerance:
            self.kept_state = copy.deepcopy(self.encoder.state_dict())
            self.kept_epoch = self.current_epoch + 1
        else:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        """Adam on the encoder and on the discriminator (two parameter groups)."""
        return fast_adam(
            [
                {"params": [p for p in self.encoder.parameters() if p.requires_grad]},
                {"params": self.discriminator.parameters(), "lr": self.lr_discriminator},
            ],
            lr=self.lr,
        )

    def training_step(self, batch, batch_idx):
        """One step on a ``((codes, labels), query)`` pair."""
        (codes, _), query = batch
        x = query[REGISTRY_KEYS.X_KEY]
        module = self.module
        with torch.no_grad():  # the teacher: clean input, eval mode
            was_training = module.training
            module.eval()
            probabilities = torch.softmax(module.inference(x)["logits"], dim=1)
            module.train(was_training)
        n_seen = module.n_labels
        probabilities = probabilities[:, :n_seen] / probabilities[:, :n_seen].sum(1, keepdim=True)
        confident = probabilities.max(dim=1).values >= self.pseudolabel_threshold
        targets = sharpen(probabilities, self.temperature)

        lognorm = getattr(module, "input_type", "counts") == "lognorm"
        augmented = mask_genes(x, self.mask_rate, log1p_input=lognorm)
        out = module.inference(torch.cat([x, augmented]))
        n = x.shape[0]
        z, logits = out["z"][:n], out["logits"][n:, :n_seen]
        zero = z.new_zeros(())

        error = (torch.softmax(logits, dim=1) - targets) ** 2
        consistency = (error.sum(dim=1) * confident).sum() / n
        if self.center_weight > 0 and confident.any():
            pseudo = probabilities.argmax(dim=1)
            distance = ((z - self.centers[pseudo]) ** 2).sum(dim=1)
            center = distance[confident].mean()
        else:
            center = zero

        weight = sigmoid_ramp(
            self.current_epoch, self.adversary_ramp_epochs, self.adversary_weight
        )
        self.gradient_reversal.weight = weight
        domain_logits = self.discriminator(
            torch.cat([codes.to(z.dtype), self.gradient_reversal(z)])
        ).ravel()
        domains = torch.cat([z.new_zeros(codes.shape[0]), z.new_ones(n)])
        adversary = F.binary_cross_entropy_with_logits(domain_logits, domains)
        accuracy = ((domain_logits > 0).float() == domains).float().mean()

        loss = self.consistency_weight * consistency + self.center_weight * center + adversary
        values = {
            "loss": loss,
            "consistency_loss": consistency,
            "center_loss": center,
            "adversary_loss": adversary,
            "adversary_accuracy": accuracy,
            "confident_fraction": confident.float().mean(),
        }
        self._add_to_epoch("train", values, n)
        return loss
