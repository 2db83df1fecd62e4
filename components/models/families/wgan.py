"""Wasserstein GANs: weight clipping (Arjovsky, Chintala & Bottou, 2017) and gradient penalty
(Gulrajani et al., 2017).

Idea: replace the discriminator by a critic f whose mean score gap E f(x) - E f(G(z)) estimates the
Wasserstein-1 distance when f is 1-Lipschitz; this distance gives the generator useful gradients
even where the two distributions do not overlap, and it tracks sample quality. The critic is
trained `n_critic` times per generator step so it stays near optimal. `wgan` keeps f Lipschitz by
clipping every critic weight to [-clip, clip] after each critic step and uses RMSprop (momentum
destabilised training in the paper); `wgan-gp` instead penalises lambda * (||grad f|| - 1)^2 at
random points between real and fake samples, uses Adam(beta1 = 0, beta2 = 0.9) and replaces the
critic's batch norm by layer norm, since the penalty is defined per sample.

Both use the DCGAN players (see `dcgan`), so they handle any image size the same way.
The paper's extra 100 critic steps during WGAN's first 25 generator steps are left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from components.models.adversarial import AdversarialModel, Wasserstein, gradient_penalty
from components.models.factory import register_model
from components.models.families.dcgan import DCGANDiscriminator, DCGANGenerator


class _WassersteinGAN(AdversarialModel):
    phases: ClassVar[tuple[str, ...]] = ("critic", "generator")
    objective = Wasserstein()

    def __init__(self, image_shape, *, latent_dim: int, width: int, n_critic: int, critic_norm: str):
        super().__init__(image_shape, latent_dim=latent_dim, critic_steps=n_critic)
        self.set_players(
            DCGANGenerator(self.image_shape, latent_dim, width),
            DCGANDiscriminator(self.image_shape, width, norm=critic_norm),
        )


@register_model("wgan")
class WGAN(_WassersteinGAN):
    def __init__(
        self, image_shape, *, latent_dim: int = 32, width: int = 64, n_critic: int = 5, clip: float = 0.01
    ):
        super().__init__(
            image_shape, latent_dim=latent_dim, width=width, n_critic=n_critic, critic_norm="batch"
        )
        self.clip = clip

    def make_optimizer(self, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(parameters, lr=lr)

    @torch.no_grad()
    def after_optimizer_step(self, phase: str) -> None:
        super().after_optimizer_step(phase)
        if phase == "critic":
            for parameter in self.discriminator.parameters():
                parameter.clamp_(-self.clip, self.clip)


@register_model("wgan-gp")
class WGANGP(_WassersteinGAN):
    def __init__(
        self,
        image_shape,
        *,
        latent_dim: int = 32,
        width: int = 64,
        n_critic: int = 5,
        penalty_weight: float = 10.0,
    ):
        super().__init__(
            image_shape, latent_dim=latent_dim, width=width, n_critic=n_critic, critic_norm="layer"
        )
        self.penalty_weight = penalty_weight

    def make_optimizer(self, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=lr, betas=(0.0, 0.9))

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        return gradient_penalty(self.discriminator, real, fake, self.penalty_weight)
