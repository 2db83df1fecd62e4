"""A style-based generator (Karras, Laine & Aila, 2019: StyleGAN; Karras et al., 2020: StyleGAN2).

Idea: do not feed the latent code to the first layer. A mapping network turns z into an
intermediate code w, and every convolution of the synthesis network is modulated by its own affine
"style" of a w, so the codes control the image scale by scale. Synthesis starts from a learned
constant 4 x 4 input, doubles the resolution block by block up to the image size, and adds
per-pixel Gaussian noise with a learned per-channel strength after every convolution, to supply
stochastic detail that the styles need not encode. Styles act by weight modulation and
demodulation (StyleGAN2's replacement for AdaIN: each output channel is rescaled to unit expected
variance from the weights and the style alone, instead of normalising measured feature statistics,
which caused AdaIN's blob artefacts).

Also from the papers:
- style mixing: while training, a share `mixing_prob` of images take the ws of two codes, the
  first up to a random layer and the second after it, so that neighbouring scales do not learn to
  depend on each other;
- the "skip" generator of StyleGAN2: every block has a 1 x 1 "to image" layer and the image is the
  sum of their upsampled outputs, so coarse blocks draw the coarse image;
- a residual discriminator with the minibatch standard deviation feature (Karras et al., 2018),
  the non-saturating GAN loss and the R1 penalty (gamma / 2) E||grad D(x)||^2 on real images,
  lazy as in StyleGAN2 (`r1_every` 16: a discriminator step of 16 times the penalty every 16th
  step; a step then costs what one without the penalty does, where a penalty at every step makes
  it 1.4 times as long: bench/RESULTS-step-time-stylegan-r1.md).
Left out: progressive growing (the skip generator made it unnecessary), equalised learning rate
(He initialisation instead), path-length regularisation and truncation. The
"to image" outputs are linear rather than a tanh (which saturated and stalled training); samples are
clamped. Both players work on a power-of-two canvas of at least 8 x 8: the generator's output is
cropped to the data's size from its centre, and the discriminator pads images back onto it.
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
    standard_normal,
)
from components.models.factory import register_model

LAYERS_PER_BLOCK = 2


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
            # ||weight * style|| per output channel: the output's standard deviation for unit-variance input.
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


class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then an MLP with LeakyReLU."""

    def __init__(self, latent_dim: int, style_dim: int, layers: int):
        super().__init__()
        stack: list[nn.Module] = []
        for i in range(layers):
            linear = nn.Linear(latent_dim if i == 0 else style_dim, style_dim)
            # He initialisation keeps w at unit scale through the layers; PyTorch's default shrinks it
            # several-fold per layer, and a near-constant w lets the generator ignore z (mode collapse).
            nn.init.kaiming_normal_(linear.weight, a=0.2)
            nn.init.zeros_(linear.bias)
            stack += [linear, nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*stack)

    def forward(self, z: Tensor) -> Tensor:
        # Pixel norm: z on the sphere, so the mapping network sees codes of one scale.
        return self.net(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))


class SynthesisNetwork(nn.Module):
    """A learned 4 x 4 constant, then one block per resolution up to the canvas (upsample, two styled
    layers, a "to image" layer); the image is the running sum of the upsampled "to image" outputs."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, style_dim: int):
        super().__init__()
        channels, *self.image_size = image_shape
        blocks = int(math.log2(power_of_two_canvas(image_shape) // 4)) + 1
        self.constant = nn.Parameter(torch.randn(1, width, 4, 4))
        self.blocks = nn.ModuleList(
            nn.ModuleList(StyledLayer(width, width, style_dim) for _ in range(LAYERS_PER_BLOCK))
            for _ in range(blocks)
        )
        self.to_images = nn.ModuleList(
            ModulatedConv2d(width, channels, 1, style_dim, demodulate=False) for _ in range(blocks)
        )
        self.num_ws = blocks * LAYERS_PER_BLOCK

    def forward(self, ws: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images from per-layer codes `ws` (N x num_ws x style_dim); "to image" uses its block's last w."""
        x = self.constant.expand(len(ws), -1, -1, -1)
        image = None
        for index, (layers, to_image) in enumerate(zip(self.blocks, self.to_images, strict=True)):
            if index > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                image = F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False)
            for offset, layer in enumerate(layers):
                x = layer(x, ws[:, index * LAYERS_PER_BLOCK + offset], generator)
            contribution = to_image(x, ws[:, index * LAYERS_PER_BLOCK + LAYERS_PER_BLOCK - 1])
            image = contribution if image is None else image + contribution
        return crop_center(image, *self.image_size)


class StyleGenerator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, width: int, mapping_layers: int):
        super().__init__()
        self.mapping = MappingNetwork(latent_dim, width, mapping_layers)
        self.synthesis = SynthesisNetwork(image_shape, width, width)

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images with one w for every layer (no mixing)."""
        ws = self.mapping(z)[:, None].expand(-1, self.synthesis.num_ws, -1)
        return self.synthesis(ws, generator)


class MinibatchStd(nn.Module):
    """Appends the batch's mean per-feature standard deviation as one extra channel (Karras et al.
    2018), so the discriminator can see a generator that lacks variety, and punish mode collapse."""

    def forward(self, x: Tensor) -> Tensor:
        # The epsilon keeps the gradient finite where a feature is constant over the batch (padding).
        spread = (x.float().var(dim=0, correction=0) + 1e-8).sqrt().mean().to(x.dtype)
        return torch.cat([x, spread.expand(len(x), 1, *x.shape[2:])], dim=1)


class ResidualBlock(nn.Module):
    """Two 3 x 3 convolutions and a 2 x 2 average pool, plus a pooled skip path; the sum is scaled by
    1 / sqrt(2) to keep unit variance (StyleGAN2's residual discriminator)."""

    def __init__(self, width: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.AvgPool2d(2),
        )
        self.skip = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(width, width, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return (self.main(x) + self.skip(x)) / math.sqrt(2)


class StyleDiscriminator(nn.Module):
    """A residual block per resolution down to 4 x 4, then minibatch standard deviation, a convolution
    and two linear layers; images are padded onto the canvas."""

    def __init__(self, image_shape: tuple[int, int, int], width: int):
        super().__init__()
        self.canvas = power_of_two_canvas(image_shape)
        layers: list[nn.Module] = [nn.Conv2d(image_shape[0], width, 1), nn.LeakyReLU(0.2)]
        layers += [ResidualBlock(width) for _ in range(int(math.log2(self.canvas // 4)))]
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
        latent_dim: int = 64,
        width: int = 64,
        mapping_layers: int = 4,
        mixing_prob: float = 0.9,
        r1_gamma: float = 1.0,
        r1_every: int = 16,
        ema_decay: float = 0.0,
    ):
        super().__init__(
            image_shape, latent_dim=latent_dim, r1_gamma=r1_gamma, r1_every=r1_every, ema_decay=ema_decay
        )
        if not 0.0 <= mixing_prob <= 1.0:
            raise ValueError(f"stylegan: expected mixing_prob in [0, 1], got mixing_prob={mixing_prob}")
        self.mixing_prob = mixing_prob
        self.set_players(
            StyleGenerator(self.image_shape, latent_dim, width, mapping_layers),
            StyleDiscriminator(self.image_shape, width),
        )

    def mixed_ws(self, network: StyleGenerator, z: Tensor, other: Tensor, crossover: Tensor) -> Tensor:
        """`network`'s per-layer codes: w(z) for layers before each image's `crossover` index, w(other)
        from it on."""
        num_ws = network.synthesis.num_ws
        first, second = network.mapping(z), network.mapping(other)
        later = torch.arange(num_ws, device=z.device)[None, :] >= crossover[:, None]
        return torch.where(later[:, :, None], second[:, None], first[:, None])

    def generate(
        self, n: int, generator: torch.Generator | None = None, network: nn.Module | None = None
    ) -> Tensor:
        network = self.generator if network is None else network
        z = self.prior(n, generator)
        if not (self.training and self.mixing_prob > 0):
            return network(z, generator)
        other = self.prior(n, generator)
        num_ws = network.synthesis.num_ws
        source = generator.device if generator is not None else self.device
        crossover = torch.randint(1, num_ws, (n,), generator=generator, device=source).to(self.device)
        unmixed = torch.rand(n, generator=generator, device=source).to(self.device) >= self.mixing_prob
        crossover = crossover.masked_fill(unmixed, num_ws)  # num_ws: every layer takes the first code
        return network.synthesis(self.mixed_ws(network, z, other, crossover), generator)
