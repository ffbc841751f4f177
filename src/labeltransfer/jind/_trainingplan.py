"""Adversarial alignment of a query onto the frozen reference latent space (JIND eq. 3-5)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from labeltransfer._constants import REGISTRY_KEYS

from ._module import JINDModule


class JINDAlignmentPlan(pl.LightningModule):
    """Train the generator ``G`` against the discriminator ``D``; encoder and classifier fixed.

    Each training step takes a minibatch of reference latent codes ``h = F(x_s)`` and a query
    minibatch ``x_t``. ``D`` is updated at every step with eq. (4); ``G`` is updated every
    ``n_discriminator_steps`` steps with eq. (5), so ``D`` makes two iterations per ``G``
    iteration as in the paper.

    Parameters
    ----------
    module
        The JIND module (its generator and discriminator are trained).
    lr_generator, weight_decay_generator
        RMSProp settings of ``G`` (JIND: 1e-4 and 1e-2).
    lr_discriminator, weight_decay_discriminator
        RMSProp settings of ``D`` (JIND: 1e-4 and 1e-6).
    reg_lambda
        Weight ``lambda`` of ``||S(x) - 1||_2`` in the generator loss (JIND: 1e-3).
    n_discriminator_steps
        Discriminator iterations per generator iteration (JIND: 2).
    """

    def __init__(
        self,
        module: JINDModule,
        *,
        lr_generator: float = 1e-4,
        weight_decay_generator: float = 1e-2,
        lr_discriminator: float = 1e-4,
        weight_decay_discriminator: float = 1e-6,
        reg_lambda: float = 1e-3,
        n_discriminator_steps: int = 2,
    ):
        super().__init__()
        self.module = module
        self.automatic_optimization = False
        self.lr_generator = lr_generator
        self.weight_decay_generator = weight_decay_generator
        self.lr_discriminator = lr_discriminator
        self.weight_decay_discriminator = weight_decay_discriminator
        self.reg_lambda = reg_lambda
        self.n_discriminator_steps = n_discriminator_steps
        self._n_steps = 0

    def configure_optimizers(self):
        """RMSProp for the generator and for the discriminator."""
        generator = torch.optim.RMSprop(
            self.module.generator.parameters(),
            lr=self.lr_generator,
            weight_decay=self.weight_decay_generator,
        )
        discriminator = torch.optim.RMSprop(
            self.module.discriminator.parameters(),
            lr=self.lr_discriminator,
            weight_decay=self.weight_decay_discriminator,
        )
        return [generator, discriminator]

    def _log(self, name: str, value: torch.Tensor, n: int) -> None:
        self.log(name, value, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)

    def training_step(self, batch, batch_idx):
        """One discriminator update, and a generator update every ``n_discriminator_steps``."""
        (h_source,), query = batch
        module = self.module
        x = module.transform(query[REGISTRY_KEYS.X_KEY])
        with torch.no_grad():
            h = module.encoder(x)
        opt_generator, opt_discriminator = self.optimizers()
        n = x.shape[0]

        generator_step = (self._n_steps + 1) % self.n_discriminator_steps == 0
        # the generator's graph is only needed on the steps that update it
        with torch.set_grad_enabled(generator_step):
            h_hat, scale = module.generator(x, h)

        # eq. (4): D separates reference codes (label 1) from generated codes (label 0)
        d_source = module.discriminator(h_source)
        d_query = module.discriminator(h_hat.detach())
        d_loss = 0.5 * F.binary_cross_entropy_with_logits(d_source, torch.ones_like(d_source))
        d_loss = d_loss + 0.5 * F.binary_cross_entropy_with_logits(
            d_query, torch.zeros_like(d_query)
        )
        opt_discriminator.zero_grad()
        self.manual_backward(d_loss)
        opt_discriminator.step()
        self._log("discriminator_loss", d_loss.detach(), n)
        self._n_steps += 1

        if generator_step:
            # eq. (5): G fools the updated D while keeping the scale S(x) close to 1
            d_fake = module.discriminator(h_hat)
            adversarial = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            regulariser = (scale - 1.0).norm(dim=1).mean()
            g_loss = adversarial + self.reg_lambda * regulariser
            opt_generator.zero_grad()
            self.manual_backward(g_loss)
            opt_generator.step()
            self._log("generator_loss", g_loss.detach(), n)
            self._log("fooled_fraction", (d_fake.detach() > 0).float().mean(), n)
        return d_loss.detach()
