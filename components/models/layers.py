"""Building blocks shared by several families."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def downsampled_size(size: int, times: int) -> int:
    """Spatial size after `times` stride-2, padding-1, kernel-3 convolutions."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions and an MLP head: image of any size -> vector of `out_features`."""

    def __init__(self, image_shape, out_features: int, *, channels: int = 32, hidden: int = 256):
        super().__init__()
        c, h, w = image_shape
        flat = 2 * channels * downsampled_size(h, 2) * downsampled_size(w, 2)
        self.net = nn.Sequential(
            nn.Conv2d(c, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(flat, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: vector -> image logits, cropped to the exact image size."""

    def __init__(self, image_shape, in_features: int, *, channels: int = 32, hidden: int = 256):
        super().__init__()
        c, self.height, self.width = image_shape
        self.grid = (2 * channels, downsampled_size(self.height, 2), downsampled_size(self.width, 2))
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, math.prod(self.grid)),
            nn.ReLU(),
            nn.Unflatten(1, self.grid),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels, c, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)[:, :, : self.height, : self.width]


def gaussian_log_density(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """Log N(x; mean, exp(log_var)) summed over the last dimension."""
    return (-0.5 * ((x - mean) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))).sum(-1)


class GaussianLatent:
    """Mix-in for models whose `encoder` predicts the mean and log-variance of a Gaussian q(z|x)
    (reparameterisation trick, Kingma & Welling 2013) and whose `decoder` maps codes to pixel logits."""

    latent_dim: int
    encoder: nn.Module
    decoder: nn.Module

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of q(z|x)."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-12.0, 8.0)

    def posterior_sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """A reparameterised code for each image (noise from `generator`) and its KL from N(0, I)."""
        mean, log_var = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + noise * (0.5 * log_var).exp()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        return z, kl

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))
