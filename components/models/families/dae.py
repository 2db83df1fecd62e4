"""Denoising autoencoder (Vincent et al., 2008; 2010).

Idea: corrupt each training image (Gaussian noise, masking pixels to zero, or salt-and-pepper) and
train the autoencoder to rebuild the clean image, so it cannot learn the identity and must capture
the structure of the data instead. Generation works as for the plain autoencoder: decoded draws
from a Gaussian fitted to the codes of the clean training images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.models.factory import register_model
from components.models.families.ae import ConvAutoencoder

NOISE_TYPES = ("gaussian", "masking", "salt_pepper")


@register_model("dae")
class DenoisingAutoencoder(ConvAutoencoder):
    def __init__(
        self,
        image_shape,
        *,
        latent_dim: int = 16,
        channels: int = 32,
        hidden: int = 256,
        noise: str = "masking",
        noise_level: float = 0.3,
    ):
        super().__init__(image_shape, latent_dim=latent_dim, channels=channels, hidden=hidden)
        if noise not in NOISE_TYPES:
            raise ValueError(f"dae: noise must be one of {', '.join(NOISE_TYPES)}, got {noise!r}")
        upper = float("inf") if noise == "gaussian" else 1.0  # a std, or a probability
        if not 0.0 <= noise_level <= upper:
            raise ValueError(f"dae: noise_level for {noise} noise must be in [0, {upper}], got {noise_level}")
        self.noise, self.noise_level = noise, noise_level

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`x` with this model's noise applied, still in [0, 1]."""
        draw = torch.randn if self.noise == "gaussian" else torch.rand
        u = draw(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if self.noise == "gaussian":
            return (x + self.noise_level * u).clamp(0.0, 1.0)
        hit = u < self.noise_level
        if self.noise == "masking":
            return x.masked_fill(hit, 0.0)
        # Salt or pepper with equal odds: reuse the uniform draw, which is below level/2 half the time.
        return torch.where(hit, (u < self.noise_level / 2).to(x.dtype), x)
