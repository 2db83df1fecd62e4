"""Convolutional variational autoencoder with a Bernoulli decoder (Kingma & Welling, 2013).

Idea: an encoder predicts the mean and log-variance of a Gaussian posterior q(z|x); a sample drawn
with the reparameterisation trick z = mu + sigma * eps is decoded into Bernoulli pixel probabilities,
and training maximises the evidence lower bound log p(x|z) - KL(q(z|x) || N(0, I)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from components.models.base import LatentVariableModel
from components.models.layers import ConvDecoder, ConvEncoder, GaussianLatent, gaussian_log_density
from components.models.registry import register_model


@register_model("vae")
class ConvVAE(GaussianLatent, LatentVariableModel):
    def __init__(self, image_shape, *, latent_dim: int = 16, channels: int = 32, hidden: int = 256):
        super().__init__(image_shape)
        self.latent_dim = latent_dim
        self.encoder = ConvEncoder(self.image_shape, 2 * latent_dim, channels=channels, hidden=hidden)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, channels=channels, hidden=hidden)

    def _log_likelihood(self, logits: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z, kl = self.posterior_sample(x, generator)
        return self._log_likelihood(self.decoder(z), x) - kl

    def importance_weighted_bound(
        self, x: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        mean, log_var = self.posterior(x)
        std = (0.5 * log_var).exp()
        log_weights = []
        for _ in range(num_samples):
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + eps * std
            log_q = gaussian_log_density(z, mean, log_var)
            log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
            log_weights.append(self._log_likelihood(self.decoder(z), x) + log_prior - log_q)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        negative_elbo = -self.elbo(x).mean()
        return {"loss": negative_elbo, "negative_elbo": negative_elbo.detach()}

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        return {"val_negative_elbo": -self.elbo(x).mean()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        probs = self.decode(z)
        return torch.bernoulli(probs, generator=generator)
