"""Convolutional variational autoencoder (Kingma & Welling, 2013).

Idea: an encoder predicts the mean and log-variance of a Gaussian posterior q(z|x); a sample drawn
with the reparameterisation trick z = mu + sigma * eps is decoded into the parameters of p(x|z),
and training maximises the evidence lower bound log p(x|z) - KL(q(z|x) || N(0, I)). The decoder
gives Bernoulli pixels for binary images and, for 8-bit images, a discretised logistic (or a
softmax over the levels) per sub-pixel, so the bound is in nats of the discrete values like the
likelihoods of the autoregressive families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from components.models.autoregressive import subpixel_params
from components.models.base import LatentVariableModel, PixelForm
from components.models.factory import register_model
from components.models.layers import ConvDecoder, ConvEncoder, GaussianLatent, gaussian_log_density
from components.models.pixels import resolve_pixels, subpixel_distribution


@register_model("vae")
class ConvVAE(PixelForm, GaussianLatent, LatentVariableModel):
    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        latent_dim: int = 16,
        channels: int = 32,
        hidden: int = 256,
        pixels: str | None = None,
        output: str = "logistic",
        levels: int = 256,
        mixture_components: int = 1,
    ):
        super().__init__(image_shape)
        self.pixels = resolve_pixels("vae", pixels, self.image_shape)
        self.distribution = subpixel_distribution("vae", self.pixels, output, levels, mixture_components)
        self.latent_dim = latent_dim
        c, h, w = self.image_shape
        self.encoder = ConvEncoder(self.image_shape, 2 * latent_dim, channels=channels, hidden=hidden)
        # One decoder output channel per parameter of each sub-pixel's distribution.
        decoded_shape = (c * self.distribution.num_params, h, w)
        self.decoder = ConvDecoder(decoded_shape, latent_dim, channels=channels, hidden=hidden)

    def decoded_params(self, z: Tensor) -> Tensor:
        """Parameters of p(x|z) for every sub-pixel, N x C x H x W x P."""
        return subpixel_params(self.decoder(z), self.image_shape[0])

    def log_likelihood(self, z: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) of each image, in nats."""
        return self.distribution.log_prob(self.decoded_params(z), x).flatten(1).sum(1)

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        z, kl = self.posterior_sample(x, generator)
        return self.log_likelihood(z, x) - kl

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
            log_weights.append(self.log_likelihood(z, x) + log_prior - log_q)
        return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        negative_elbo = -self.elbo(x).mean()
        return {"loss": negative_elbo, "negative_elbo": negative_elbo.detach()}

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        return {"val_negative_elbo": -self.elbo(x).mean()}

    def decode(self, z: Tensor) -> Tensor:
        """Mean pixel value under p(x|z) (the Bernoulli probability for binary images)."""
        return self.distribution.mean(self.decoded_params(z))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device, dtype=dtype)
        return self.distribution.sample(self.decoded_params(z), generator)
