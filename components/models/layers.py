"""Building blocks shared by several families."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

MIN_SIDE = 4  # smallest image side the convolutional encoder and decoder accept
FINAL_SIDE = 4  # the encoder halves the image until its smaller side is at most this
MIN_STAGES = 2


def downsampled_size(size: int, times: int) -> int:
    """Spatial size after `times` stride-2, padding-1, kernel-3 convolutions."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def halvings_to_final_side(side: int) -> int:
    """Stride-2 stages that bring a side to at most 4 pixels, and at least 2 (8 -> 2, 32 -> 3, 64 -> 4)."""
    stages = MIN_STAGES
    while downsampled_size(side, stages) > FINAL_SIDE:
        stages += 1
    return stages


def downsampling_stages(image_shape: Sequence[int], owner: str) -> int:
    """`halvings_to_final_side` of the image's smaller side; `owner` names the model in the error
    raised for an image below the 4 x 4 minimum."""
    c, h, w = image_shape
    if min(h, w) < MIN_SIDE:
        raise ValueError(
            f"{owner}: images of {c}x{h}x{w} are smaller than its minimum of {MIN_SIDE}x{MIN_SIDE} pixels"
        )
    return halvings_to_final_side(min(h, w))


def stage_channels(stages: int, channels: int) -> list[int]:
    """Feature channels of each stride-2 stage: `channels`, doubling per stage as the map shrinks."""
    return [channels * 2**i for i in range(stages)]


def strided_features(
    image_shape: Sequence[int], channels: int, owner: str, norm: bool = False
) -> list[nn.Module]:
    """Stride-2 3 x 3 convolutions (as many as `downsampling_stages`), each followed by ReLU, or by
    per-image normalisation and LeakyReLU when `norm` (a discriminator's features)."""
    layers: list[nn.Module] = []
    fan_in = image_shape[0]
    for fan_out in stage_channels(downsampling_stages(image_shape, owner), channels):
        layers.append(nn.Conv2d(fan_in, fan_out, 3, stride=2, padding=1))
        layers += [nn.GroupNorm(1, fan_out), nn.LeakyReLU(0.2)] if norm else [nn.ReLU()]
        fan_in = fan_out
    return layers


def strided_feature_size(image_shape: Sequence[int], channels: int, owner: str) -> int:
    """Length of the flattened output of `strided_features`."""
    _, h, w = image_shape
    stages = downsampling_stages(image_shape, owner)
    return stage_channels(stages, channels)[-1] * downsampled_size(h, stages) * downsampled_size(w, stages)


class ConvEncoder(nn.Module):
    """Stride-2 convolutions down to about 4 x 4 (their number follows the image size) and an MLP head:
    image -> vector of `out_features`."""

    def __init__(
        self,
        image_shape,
        out_features: int,
        *,
        channels: int = 32,
        hidden: int = 256,
        owner: str = "ConvEncoder",
    ):
        super().__init__()
        self.net = nn.Sequential(
            *strided_features(image_shape, channels, owner),
            nn.Flatten(),
            nn.Linear(strided_feature_size(image_shape, channels, owner), hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: vector -> image logits, cropped to the exact image size."""

    def __init__(
        self,
        image_shape,
        in_features: int,
        *,
        channels: int = 32,
        hidden: int = 256,
        owner: str = "ConvDecoder",
    ):
        super().__init__()
        c, self.height, self.width = image_shape
        stages = downsampling_stages(image_shape, owner)
        widths = stage_channels(stages, channels)[::-1]
        self.grid = (widths[0], downsampled_size(self.height, stages), downsampled_size(self.width, stages))
        layers: list[nn.Module] = [
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, math.prod(self.grid)),
            nn.ReLU(),
            nn.Unflatten(1, self.grid),
        ]
        for fan_in, fan_out in itertools.pairwise([*widths, c]):
            layers += [nn.ConvTranspose2d(fan_in, fan_out, 4, stride=2, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])  # linear logits out

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

    def posterior_sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A reparameterised code for each image and its KL divergence from N(0, I)."""
        mean, log_var = self.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(1)
        return z, kl

    def encode(self, x: Tensor) -> Tensor:
        return self.posterior(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))
