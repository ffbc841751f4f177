"""scDET networks: denoising autoencoder, prototype classifier and contrastive projection."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scvi.module.base import LossOutput, auto_move_data
from torch import nn

from labeltransfer._constants import REGISTRY_KEYS
from labeltransfer.base import AnnotationModule
from labeltransfer.nn import mask_genes, mlp

from ._losses import (
    SCDETLossConfig,
    distribution_kl,
    logit_adjust,
    sample_pseudo_labels,
    sampling_rates,
    smoothed_distribution,
    soft_contrastive_loss,
    soft_cross_entropy,
    supervised_contrastive_loss,
    unsupervised_contrastive_loss,
)


class SCDETModule(AnnotationModule):
    r"""The scDET model: autoencoder backbone with a pseudo-labelling and a contrastive branch.

    * **Backbone** (scDET, following scGAD): encoder ``genes -> 512 -> 256 -> 128`` (linear,
      batch norm, ReLU; the 128-d embedding ``z`` is linear), decoder ``128 -> 256 -> 512 ->
      genes`` (the reverse), reconstructing the log-normalised input.
    * **Pseudo-labelling branch**: ``h = ReLU(W z)`` (128 units), then the prototype
      classifier: logits :math:`h_i \cdot \mu_j / \tau` with L2-normalised ``h`` and
      prototypes :math:`\mu_j` (cosine similarity, eq. 2), one prototype per class of
      :math:`\mathcal C_r \cup \mathcal C_t`: the ``n_labels`` seen types first, then
      ``n_novel`` novel classes.
    * **Contrastive branch**: projection ``128 -> 128 -> 128`` (two linear layers with a ReLU
      between), L2-normalised.

    The estimated class distribution :math:`\pi` over all training cells
    (``class_distribution``) and among the target cells (``target_distribution``), uniform
    until the first estimation, are buffers, so they are saved with the model.

    Parameters
    ----------
    n_input
        Number of registered genes.
    n_labels
        Number of seen (reference) types.
    n_novel
        Number of novel classes.
    feature_idx
        Indices of the genes used as input.
    input_type
        ``"counts"`` (log(CPM + 1) per minibatch) or ``"lognorm"``.
    n_hidden
        Encoder widths (scDET / scGAD: 512, 256); the decoder mirrors them.
    n_latent
        Embedding size (scDET: 128).
    n_head
        Width of the classifier's hidden layer and of the projection (scDET: 128).
    temperature
        :math:`\tau` of the prototype classifier (0.1; the paper's 1.0 leaves the novel
        prototypes inactive, see :class:`~labeltransfer.SCDET`).
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        *,
        n_novel: int,
        feature_idx: Sequence[int],
        input_type: str,
        peak_weights: Sequence[float] | None = None,
        n_hidden: Sequence[int] = (512, 256),
        n_latent: int = 128,
        n_head: int = 128,
        temperature: float = 0.1,
    ):
        super().__init__(
            n_input,
            n_labels,
            feature_idx=feature_idx,
            input_type=input_type,
            peak_weights=peak_weights,
        )
        if n_novel < 0:
            raise ValueError(f"n_novel must be >= 0, got {n_novel}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.n_novel = int(n_novel)
        self.n_latent = n_latent
        self.n_head = n_head
        self.temperature = float(temperature)
        hidden = tuple(int(h) for h in n_hidden)
        self.encoder = nn.Sequential(
            mlp((self.n_features, *hidden), batch_norm=True, activate_last=True),
            nn.Linear(hidden[-1], n_latent),
        )
        self.decoder = mlp((n_latent, *hidden[::-1], self.n_features), batch_norm=True)
        self.classifier_head = nn.Sequential(nn.Linear(n_latent, n_head), nn.ReLU())
        self.prototypes = nn.Parameter(self._new_prototypes(self.n_classes))
        self.projector = mlp((n_latent, n_head, n_head))
        self.register_buffer(
            "class_distribution", torch.full((self.n_classes,), 1.0 / self.n_classes)
        )
        self.register_buffer(
            "target_distribution", torch.full((self.n_classes,), 1.0 / self.n_classes)
        )
        self.register_buffer("logit_adjustment", torch.zeros(()))

    # ------------------------------------------------------------- classes
    @property
    def n_classes(self) -> int:
        r"""Seen plus novel classes, :math:`|\mathcal C_r \cup \mathcal C_t|`."""
        return self.n_labels + self.n_novel

    def _new_prototypes(self, n: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(self.n_head)
        return torch.empty(n, self.n_head).uniform_(-bound, bound)

    def set_n_novel(self, n_novel: int) -> None:
        """Resize the classifier to ``n_novel`` novel classes (seen prototypes are kept).

        New novel prototypes are drawn at random (torch's global generator) and the class
        distribution is reset to uniform.
        """
        if n_novel < 0:
            raise ValueError(f"n_novel must be >= 0, got {n_novel}.")
        if n_novel == self.n_novel:
            return
        device = self.prototypes.device
        old = self.prototypes.detach()
        keep = min(old.shape[0], self.n_labels + n_novel)
        new = self._new_prototypes(self.n_labels + n_novel).to(device)
        new[:keep] = old[:keep]
        self.n_novel = int(n_novel)
        self.prototypes = nn.Parameter(new)
        self.class_distribution = torch.full(
            (self.n_classes,), 1.0 / self.n_classes, device=device
        )
        self.target_distribution = torch.full(
            (self.n_classes,), 1.0 / self.n_classes, device=device
        )

    def on_load(self, model, **kwargs) -> None:
        """Size the classifier to the saved number of novel classes before loading weights.

        A model created with ``n_novel=None`` estimates it during training; the saved weights
        then have more prototypes than the freshly built module.
        """
        n_novel = getattr(model, "n_novel_", None)
        if n_novel is not None:
            self.set_n_novel(int(n_novel))

    # ------------------------------------------------------------- networks
    def logits_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        r"""Cosine similarity of ``h`` to the prototypes divided by :math:`\tau` (eq. 2)."""
        return self.cosine(z) / self.temperature

    def cosine(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarity between ``h = head(z)`` and every prototype."""
        h = F.normalize(self.classifier_head(z), dim=1)
        return h @ F.normalize(self.prototypes, dim=1).T

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive features ``v``."""
        return F.normalize(self.projector(z), dim=1)

    @auto_move_data
    def inference(self, x: torch.Tensor, normalized: bool = False) -> dict[str, torch.Tensor]:
        r"""Embedding ``z``, class ``logits`` (seen then novel) and contrastive features ``v``.

        The logits are the rectified ones of eq. 7, :math:`h_i \cdot \mu_j / \tau - \gamma
        \log \pi_j`, with :math:`\gamma` = ``logit_adjustment`` (set to the training plan's
        ``gamma`` when training starts, 0 before) and :math:`\pi` = ``class_distribution``:
        the post-hoc logit adjustment of Menon et al. (2020) that eq. 7 cites, which
        removes the long-tail bias of the classifier from the predictions. ``normalized``:
        ``x`` is already the model's input (:meth:`transform`).
        """
        z = self.encoder(self.transform(x, normalized))
        # the 0-d buffer, not float() of it: no device-to-host sync per minibatch on a GPU
        logits = logit_adjust(
            self.logits_from_latent(z), self.class_distribution, self.logit_adjustment
        )
        return {"z": z, "logits": logits, "v": self.project(z)}

    # ------------------------------------------------------------- training
    def augment(
        self, x: torch.Tensor, *, mask_rate: float, noise_sd: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the two views of normalised cells ``x``.

        The paper leaves the augmentation to its supplement ("an alternate view ... to
        capture inter-gene correlations"). Here view 1 is the input with Gaussian noise (the
        corruption of the denoising autoencoder) and view 2 additionally has a fraction
        ``mask_rate`` of its genes masked and renormalised (:func:`~labeltransfer.nn.mask_genes`).
        """
        view1 = x + noise_sd * torch.randn_like(x) if noise_sd > 0 else x
        view2 = mask_genes(x, mask_rate)  # inputs are log1p-normalised
        if noise_sd > 0:
            view2 = view2 + noise_sd * torch.randn_like(view2)
        return view1, view2

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict[str, torch.Tensor] | None = None,
        generative_outputs: dict | None = None,
        *,
        config: SCDETLossConfig | None = None,
        query: dict[str, torch.Tensor] | None = None,
    ) -> LossOutput:
        r"""ScDET's training objective (eq. 11), or the cross-entropy of a labelled minibatch.

        scvi's loss hook, in two modes:

        * **training** (``config`` given; :class:`~labeltransfer.scdet.SCDETTrainingPlan`):
          the objective below on the reference minibatch ``tensors`` and the target
          minibatch ``query``, with the hyper-parameters of ``config`` (the only source of
          their values). The network runs on two augmented views of the cells, so
          ``inference_outputs`` is not used.
        * **evaluation** (``config=None``, as scvi's ``module(tensors)`` calls it, e.g. for
          the validation metrics): cross-entropy and accuracy of the labelled cells of
          ``tensors`` from ``inference_outputs`` (:meth:`AnnotationModule.loss`).

        The objective is :math:`\mathcal L = \mathcal L_{rec} + \lambda_1 (\mathcal L_r +
        \mathcal L_t + \mathcal L_{reg}) + \lambda_2 (\mathcal L^u_{CL} + \mathcal L^s_{CL} +
        \mathcal L^{soft}_{CL})`:

        * :math:`\mathcal L_{rec}`: mean squared error between the decoder output of both
          (corrupted) views and the clean log-normalised input.
        * :math:`\mathcal L_r` (eq. 3): cross-entropy of the reference labels, both views.
        * :math:`\mathcal L_t` (eq. 4): cross-view self-training on the target: the soft
          pseudo-label :math:`q` of one view (temperature ``pseudo_temperature``, detached)
          is the target of the other view's prediction :math:`p`.
        * :math:`\mathcal L_{reg}` (eq. 5): KL divergence of the mean prediction of each view
          to the estimated distribution smoothed by ``rho``. With ``regularise="target"``
          (default) the mean is over the target minibatch and the distribution is
          ``target_distribution``, the estimated class frequencies among the target cells;
          with ``regularise="all"`` (the paper) the mean over
          :math:`\mathcal D_r \cup \mathcal D_t` is estimated from the minibatch by weighting
          the reference and target means by their shares of the training cells
          (``reference_fraction``), since the two minibatches have equal sizes, and the
          distribution is ``class_distribution``.
        * Debiasing and sampling (eqs. 7-8): the rectified target distribution
          :math:`\hat p` (view 1, logit adjustment ``gamma``), the class-wise sampling rates
          (``alpha`` for the reference types present in the minibatch, ``beta`` otherwise)
          and the most confident cells of each predicted class, :math:`M(\mathcal D_t)`.
        * :math:`\mathcal L^u_{CL}` on all cells, :math:`\mathcal L^s_{CL}` on the reference
          cells (labels) and :math:`\mathcal L^{soft}_{CL}` on the reference cells (one-hot
          labels) and :math:`M(\mathcal D_t)` (:math:`\hat p`), eq. 10.

        With ``warmup=True`` (the representation warm-up before the number of novel types is
        estimated) only :math:`\mathcal L_{rec}`, :math:`\mathcal L_r`,
        :math:`\mathcal L^u_{CL}` and :math:`\mathcal L^s_{CL}` are used.

        The hyper-parameter names in this description are the fields of
        :class:`~labeltransfer.scdet.SCDETLossConfig`.

        Parameters
        ----------
        tensors
            Reference (labelled) minibatch.
        inference_outputs
            :meth:`inference` of ``tensors``; used in evaluation only.
        generative_outputs
            Unused (scvi's signature).
        config
            The objective's hyper-parameters; ``None`` for evaluation.
        query
            Target minibatch (training only). Cells in it that carry a reference label are
            held-out reference cells trained like the target
            (``RefQueryDataSplitter(validation_in_query_stream=True)``): every term applies to
            them but :math:`\mathcal L_{reg}`, whose mean is over the target cells only.

        Returns
        -------
        :class:`~scvi.module.base.LossOutput`. In training its extra metrics are every term,
        the reference accuracy, the sampled fraction of the target and the fraction of target
        cells predicted as novel.
        """
        if config is None:
            return super().loss(tensors, inference_outputs, generative_outputs)
        if query is None:
            raise ValueError(
                "scDET's objective needs a target minibatch: pass query=<target minibatch>."
            )
        reference = tensors
        x_ref = self.transform(reference[REGISTRY_KEYS.X_KEY])
        x_tgt = self.transform(query[REGISTRY_KEYS.X_KEY])
        labels = reference[REGISTRY_KEYS.LABELS_KEY].long().ravel()
        if (labels >= self.n_labels).any():
            raise ValueError("The reference minibatch contains unlabelled cells.")
        n_ref, n_tgt = x_ref.shape[0], x_tgt.shape[0]
        # held-out reference cells in the target stream are trained like the target, but
        # stay out of the match to the target's class distribution
        in_target = ~self.held_out_reference(query)
        clean = torch.cat([x_ref, x_tgt])
        view1, view2 = self.augment(clean, mask_rate=config.mask_rate, noise_sd=config.noise_sd)
        n = n_ref + n_tgt

        z = self.encoder(torch.cat([view1, view2]))
        reconstruction = F.mse_loss(self.decoder(z), torch.cat([clean, clean]))
        logits = self.logits_from_latent(z)
        v = self.project(z)
        logits1, logits2 = logits[:n], logits[n:]
        v1, v2 = v[:n], v[n:]
        zero = reconstruction.new_zeros(())

        # pseudo-labelling branch
        ref_ce = 0.5 * (
            F.cross_entropy(logits1[:n_ref], labels) + F.cross_entropy(logits2[:n_ref], labels)
        )
        accuracy = (logits1[:n_ref].argmax(dim=1) == labels).float().mean()
        if config.warmup:
            self_training = regulariser = zero
        else:
            with torch.no_grad():
                cos = logits.detach() * self.temperature
                q = torch.softmax(cos / config.pseudo_temperature, dim=1)
                q1, q2 = q[n_ref:n], q[n + n_ref :]
            self_training = 0.5 * (
                soft_cross_entropy(logits1[n_ref:], q2) + soft_cross_entropy(logits2[n_ref:], q1)
            )
            if config.regularise == "all":
                target = smoothed_distribution(self.class_distribution, config.rho)
            else:
                target = smoothed_distribution(self.target_distribution, config.rho)
            regulariser = zero
            for view_logits in (logits1, logits2) if in_target.any() else ():
                p = torch.softmax(view_logits, dim=1)
                target_p = p[n_ref:][in_target].mean(0)
                if config.regularise == "all":
                    mean_p = (
                        config.reference_fraction * p[:n_ref].mean(0)
                        + (1.0 - config.reference_fraction) * target_p
                    )
                else:
                    mean_p = target_p
                regulariser = regulariser + distribution_kl(mean_p, target)
        classification = ref_ce + self_training + regulariser

        # contrastive branch
        unsupervised = unsupervised_contrastive_loss(v1, v2, config.contrastive_temperature)
        supervised = supervised_contrastive_loss(
            v1[:n_ref], v2[:n_ref], labels, config.contrastive_temperature
        )
        if config.warmup:
            soft = zero
            sampled_fraction = zero
        else:
            with torch.no_grad():
                rectified = torch.softmax(
                    logit_adjust(logits1[n_ref:].detach(), self.class_distribution, config.gamma),
                    dim=1,
                )
                in_batch = torch.zeros(self.n_classes, dtype=torch.bool, device=labels.device)
                in_batch[labels] = True
                rates = sampling_rates(
                    self.class_distribution, in_batch, config.alpha, config.beta
                )
                keep = sample_pseudo_labels(rectified, rates)
                one_hot = F.one_hot(labels, self.n_classes).to(rectified.dtype)
                weights = torch.cat([one_hot, rectified[keep]])
            idx = torch.cat(
                [torch.arange(n_ref, device=v.device), n_ref + torch.nonzero(keep).ravel()]
            )
            soft = soft_contrastive_loss(v1[idx], v2[idx], weights, config.contrastive_temperature)
            sampled_fraction = keep.float().mean()
        contrastive = unsupervised + supervised + soft

        loss = (
            reconstruction + config.lambda_cls * classification + config.lambda_con * contrastive
        )
        novel_fraction = (
            (logits1[n_ref:][in_target].argmax(dim=1) >= self.n_labels).float().mean()
            if in_target.any()
            else zero
        )
        return LossOutput(
            loss=loss,
            n_obs_minibatch=n_ref,
            extra_metrics={
                "reconstruction_loss": reconstruction.detach(),
                "reference_loss": ref_ce.detach(),
                "self_training_loss": self_training.detach(),
                "regularisation_loss": regulariser.detach(),
                "unsupervised_contrastive_loss": unsupervised.detach(),
                "supervised_contrastive_loss": supervised.detach(),
                "soft_contrastive_loss": soft.detach(),
                "accuracy": accuracy.detach(),
                "sampled_fraction": sampled_fraction.detach(),
                "novel_fraction": novel_fraction.detach(),
            },
        )
