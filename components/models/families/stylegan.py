"""A compact style-based generator (Karras, Laine & Aila, 2019: StyleGAN).

Idea: do not feed the latent code to the first layer; a mapping network first turns z into an
intermediate code w, and every convolution of the synthesis network is modulated by its own affine
"style" of w, so w controls the image scale by scale. Synthesis starts from a learned constant
4 x 4 input rather than from z, and per-pixel Gaussian noise, with a learned per-channel strength,
is added after every convolution to supply stochastic detail that the styles need not encode.
Styles act by weight modulation and demodulation (the StyleGAN2 form of the paper's AdaIN, which
normalises by the expected rather than the measured feature statistics, avoiding AdaIN's blob
artefacts).

Kept small for 8 x 8 to 32 x 32 data: a short mapping network, two styled 3 x 3 convolutions per
resolution with bilinear upsampling between resolutions, and a final styled 1 x 1 "to image"
layer with a linear output, as in the paper (a tanh there saturated and stalled training; samples
are clamped instead). Left out: progressive growing, equalised learning rate (replaced by He
initialisation), style mixing and truncation. The discriminator is a small convolutional one with
the minibatch standard deviation feature of the paper's discriminator, and the loss is the
non-saturating GAN loss with the R1 penalty on real images, as in the paper. Both players work on
a power-of-two canvas (at least 8 x 8): the generator's output is cropped to the data's size from
its centre, and the discriminator pads images back onto it with black.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.adversarial import (
    AdversarialModel,
    crop_center,
    pad_center,
    power_of_two_canvas,
    r1_penalty,
    standard_normal,
)
from components.models.registry import register_model


class ModulatedConv2d(nn.Module):
    """Convolution whose input channels are scaled per sample by a style of w, with optional
    demodulation that rescales each output channel back to unit expected variance."""

    def __init__(self, fan_in: int, fan_out: int, kernel: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(fan_out, fan_in, kernel, kernel) / math.sqrt(fan_in * kernel**2)
        )
        self.style = nn.Linear(style_dim, fan_in)
        # Styles start at 1 +- O(1) so that w, hence z, visibly changes the image from the first step.
        nn.init.normal_(self.style.weight, std=1 / math.sqrt(style_dim))
        nn.init.ones_(self.style.bias)
        self.demodulate = demodulate

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        style = self.style(w)
        # Scaling the input instead of the weights is the same convolution without a per-sample kernel.
        out = F.conv2d(x * style[:, :, None, None], self.weight, padding=self.weight.shape[-1] // 2)
        if self.demodulate:
            energy = style.pow(2) @ self.weight.pow(2).sum(dim=(2, 3)).t()  # N x fan_out
            out = out * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return out


class StyledLayer(nn.Module):
    """Modulated 3 x 3 convolution, per-pixel noise with learned per-channel strength, bias, LeakyReLU."""

    def __init__(self, fan_in: int, fan_out: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(fan_in, fan_out, 3, style_dim)
        self.noise_strength = nn.Parameter(torch.zeros(fan_out))
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x: Tensor, w: Tensor, generator: torch.Generator | None) -> Tensor:
        x = self.conv(x, w)
        noise = standard_normal((len(x), 1, *x.shape[2:]), generator, x.device).to(x.dtype)
        x = x + self.noise_strength[:, None, None] * noise + self.bias[:, None, None]
        return F.leaky_relu(x, 0.2)


class StyleGenerator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, width: int, mapping_layers: int):
        super().__init__()
        channels, *self.image_size = image_shape
        mapping: list[nn.Module] = []
        for i in range(mapping_layers):
            linear = nn.Linear(latent_dim if i == 0 else width, width)
            # He initialisation keeps w at unit scale through the layers; PyTorch's default shrinks it
            # several-fold per layer, and a near-constant w lets the generator ignore z (mode collapse).
            nn.init.kaiming_normal_(linear.weight, a=0.2)
            nn.init.zeros_(linear.bias)
            mapping += [linear, nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*mapping)
        self.constant = nn.Parameter(torch.randn(1, width, 4, 4))
        doublings = int(math.log2(power_of_two_canvas(image_shape) // 4))
        self.resolutions = nn.ModuleList(
            nn.ModuleList([StyledLayer(width, width, width), StyledLayer(width, width, width)])
            for _ in range(doublings + 1)
        )
        self.to_image = ModulatedConv2d(width, channels, 1, width, demodulate=False)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Pixel norm: z on the sphere, so the mapping network sees codes of one scale.
        w = self.mapping(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))
        x = self.constant.expand(len(z), -1, -1, -1)
        for i, layers in enumerate(self.resolutions):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            for layer in layers:
                x = layer(x, w, generator)
        return crop_center(self.to_image(x, w), *self.image_size)


class MinibatchStd(nn.Module):
    """Appends the batch's mean per-feature standard deviation as one extra channel (Karras et al.
    2018), so the discriminator can see a generator that lacks variety, and punish mode collapse."""

    def forward(self, x: Tensor) -> Tensor:
        # The epsilon keeps the gradient finite where a feature is constant over the batch (padding).
        spread = (x.float().var(dim=0, correction=0) + 1e-8).sqrt().mean().to(x.dtype)
        return torch.cat([x, spread.expand(len(x), 1, *x.shape[2:])], dim=1)


class StyleDiscriminator(nn.Module):
    """Two 3 x 3 convolutions and a 2 x 2 average pool per resolution down to 4 x 4, then minibatch
    standard deviation, a convolution and two linear layers; images are padded onto the canvas."""

    def __init__(self, image_shape: tuple[int, int, int], width: int):
        super().__init__()
        self.canvas = power_of_two_canvas(image_shape)
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], width, 1), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(self.canvas // 4))):
            for _ in range(2):
                layers += [nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2)]
            layers.append(nn.AvgPool2d(2))
        layers += [
            MinibatchStd(),
            nn.Conv2d(width + 1, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(width * 16, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, 1),
            nn.Flatten(0),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(pad_center(images, self.canvas))


@register_model("stylegan")
class StyleGAN(AdversarialModel):
    def __init__(
        self,
        image_shape,
        *,
        latent_dim: int = 32,
        width: int = 32,
        mapping_layers: int = 3,
        r1_gamma: float = 1.0,
    ):
        super().__init__(image_shape, latent_dim=latent_dim)
        self.r1_gamma = r1_gamma
        self.generator = StyleGenerator(self.image_shape, latent_dim, width, mapping_layers)
        self.discriminator = StyleDiscriminator(self.image_shape, width)

    def generate(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.generator(self.prior(n, generator), generator)

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor | None:
        return r1_penalty(self.discriminator, real, self.r1_gamma) if self.r1_gamma > 0 else None
