"""Training plan of scDET: one automatic-optimisation step on a (reference, target) pair."""

from __future__ import annotations

from functools import partial

import torch

from labeltransfer.train import AnnotationTrainingPlan

from ._module import SCDETModule


class SCDETTrainingPlan(AnnotationTrainingPlan):
    r"""Optimise scDET's objective (eq. 11) with Adam.

    Training batches are ``(reference, target)`` pairs from
    :class:`~labeltransfer.dataloaders.RefQueryDataSplitter` (``use_query=True``); validation
    batches are held-out reference cells (cross-entropy and accuracy over all classes, logged
    as ``validation_loss`` and ``validation_accuracy``). The class distribution used by
    :math:`\mathcal L_{reg}`, the logit adjustment and the sampling is the module's
    ``class_distribution``, updated by :class:`~labeltransfer.scdet.DistributionEstimation`.

    Parameters
    ----------
    module
        The scDET module.
    lr
        Adam learning rate (scDET: 1e-4).
    weight_decay
        Weight decay (not in the paper: 0).
    lambda_cls
        :math:`\lambda_1`, weight of the pseudo-labelling branch (scDET: 1.0).
    lambda_con
        :math:`\lambda_2`, weight of the contrastive branch (scDET: 1.0).
    pseudo_temperature
        :math:`\hat\tau`, the sharper temperature of the soft pseudo-labels. The paper gives
        no value; 0.05, half the classifier's :math:`\tau = 0.1`.
    contrastive_temperature
        :math:`\tau` of the contrastive losses (scDET: 1.0, the same :math:`\tau`).
    rho
        Smoothing of the estimated distribution in :math:`\mathcal L_{reg}` (scDET: 0.5).
    gamma
        Logit-adjustment strength (scDET: 0.5), of the pseudo-labels passed to the
        contrastive branch and of the trained model's predictions (post-hoc logit
        adjustment, eq. 7; see :meth:`~labeltransfer.scdet.SCDETModule.inference`).
    alpha, beta
        Sampling-rate exponents for the reference types in / not in the minibatch
        (scDET: 0.5, 0.5).
    mask_rate
        Fraction of genes masked in the second view (the paper's augmentation is in its
        supplement; 0.2).
    noise_sd
        Standard deviation of the Gaussian noise added to both views (denoising
        autoencoder; 0.1 on the log-normalised scale).
    reference_fraction
        Share of reference cells among the training cells, to weight the minibatch means of
        :math:`\mathcal L_{reg}` with ``regularise="all"``; set by
        :meth:`~labeltransfer.SCDET.train`.
    regularise
        Cells whose mean prediction :math:`\mathcal L_{reg}` regularises. ``"target"``
        (default, a departure from eq. 5): the target cells, towards the estimated class
        frequencies *of the target* smoothed by :math:`\rho`. ``"all"``: eq. 5, the mean over
        :math:`\mathcal D_r \cup \mathcal D_t` towards the smoothed :math:`\pi`. The
        reference part of that mean is pinned to the labels by :math:`\mathcal L_r`, so the
        mass that smoothing moves to the rarer (often novel) classes must all come from the
        target cells: on Kang ctrl -> stim with the true :math:`\pi` (oracle), 42% of the
        target was predicted novel against 31% in truth, and seen accuracy fell from 0.91 to
        0.74 during training.
    warmup
        Train only the reconstruction, reference cross-entropy and unsupervised and
        supervised contrastive losses (before the number of novel types is estimated).
    **kwargs
        Passed to :class:`~labeltransfer.train.AnnotationTrainingPlan`.
    """

    def __init__(
        self,
        module: SCDETModule,
        *,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lambda_cls: float = 1.0,
        lambda_con: float = 1.0,
        pseudo_temperature: float = 0.05,
        contrastive_temperature: float = 1.0,
        rho: float = 0.5,
        gamma: float = 0.5,
        alpha: float = 0.5,
        beta: float = 0.5,
        mask_rate: float = 0.2,
        noise_sd: float = 0.1,
        reference_fraction: float = 0.5,
        regularise: str = "target",
        warmup: bool = False,
        **kwargs,
    ):
        if regularise not in ("target", "all"):
            raise ValueError(f"regularise must be 'target' or 'all', got {regularise!r}.")
        for name, value in (("rho", rho), ("alpha", alpha), ("beta", beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (scDET), got {value}.")
        for name, value in (
            ("pseudo_temperature", pseudo_temperature),
            ("contrastive_temperature", contrastive_temperature),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}.")
        if not 0.0 <= reference_fraction <= 1.0:
            raise ValueError(f"reference_fraction must be in [0, 1], got {reference_fraction}.")
        kwargs.setdefault("optimizer", "Custom")
        if kwargs["optimizer"] == "Custom":
            kwargs.setdefault(
                "optimizer_creator",
                partial(torch.optim.Adam, lr=lr, weight_decay=weight_decay),
            )
        super().__init__(module, lr=lr, weight_decay=weight_decay, **kwargs)
        self.loss_options = {
            "lambda_cls": lambda_cls,
            "lambda_con": lambda_con,
            "pseudo_temperature": pseudo_temperature,
            "contrastive_temperature": contrastive_temperature,
            "rho": rho,
            "gamma": gamma,
            "alpha": alpha,
            "beta": beta,
            "mask_rate": mask_rate,
            "noise_sd": noise_sd,
            "reference_fraction": reference_fraction,
            "regularise": regularise,
            "warmup": warmup,
        }

    def on_train_start(self) -> None:
        """Predictions of the trained model use the logit adjustment of training (eq. 7)."""
        super().on_train_start()
        self.module.logit_adjustment.fill_(self.loss_options["gamma"])

    def training_step(self, batch, batch_idx):
        """One scDET step on a ``(reference, target)`` minibatch pair."""
        if not isinstance(batch, tuple | list):
            raise ValueError(
                "scDET trains on reference and target cells together: the training batches "
                "must be (reference, query) pairs (RefQueryDataSplitter(use_query=True))."
            )
        reference, query = batch
        output = self.module.scdet_loss(reference, query, **self.loss_options)
        self._log_loss_output(output, "train")
        return output.loss
