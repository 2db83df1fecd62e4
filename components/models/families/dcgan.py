"""Deep convolutional GAN (Radford, Metz & Chintala, 2015).

Idea: make the adversarial game stable with an all-convolutional design: strided (transposed)
convolutions instead of pooling or upsampling layers, batch norm in both players (not on the
generator's output or the discriminator's input), ReLU in the generator and LeakyReLU in the
discriminator, a tanh output, and no fully connected hidden layers (the latent vector enters as a
1 x 1 map and a 4 x 4 convolution makes the discriminator's single score). Trained with the
non-saturating GAN objective and Adam(beta1 = 0.5).

Not in the paper: the R1 penalty (Mescheder, Geiger & Nowozin, 2018), (gamma / 2) E||grad D(x)||^2 on
real images, with `r1_gamma` 1 by default (0 is the paper's DCGAN). Without it, on the built-in
3 x 32 x 32 shapes the discriminator wins early and the generator collapses to a few blobs (FID 28.7
after 30 epochs); with gamma = 1 it keeps drawing varied objects (FID 5.6 after 20 epochs, 2.8
after 80 and 1.5 after 173, same featurizer), and on the 8 x 8 digits it does no harm. See in bench/:
RESULTS-sample-quality-shapes-dcgan30.md, RESULTS-sample-quality-shapes-dcgan-r1_gamma1-173.md and
RESULTS-sample-quality-digits-dcgan-r1.md (those runs put the penalty in every step). It is lazy (`r1_every` 16, as StyleGAN2 does it:
a discriminator step of 16 times the penalty every 16th step; 1 puts it in every step): a step then
costs what one without the penalty does, 0.58 s against 0.87 at 3 x 32 x 32
(RESULTS-step-time-dcgan-r1.md), and 20 epochs on the shapes reached FID 4.8 against 5.6
(RESULTS-sample-quality-shapes-dcgan-r1_every16-20.md); continued from 173 epochs it drew more
nameable shapes than the penalty at every step (RESULTS-sample-quality-shapes-dcgan-r1_every16-260.md),
and after 340 epochs, and 60 more at lr 1e-4, the featurizer's classifier names 82 % of its samples
(91 % of test images; RESULTS-recognisable.md). `ema_decay` (sampling from the generator's moving
average) is off: the same training sampled through the average was named less often after 20 epochs
(68 % against 74 %) and about as often after 300 and 400 (79 % against 78 %, 81 % against 82 %).

The players work on a square power-of-two canvas (at least 8 x 8): the generator draws on it and
its centre is cropped to the data's size; the discriminator pads images back onto the canvas with
black, so any image size (8 x 8 digits, 28 x 28 MNIST, 1 x 2 points) works.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from components.models.adversarial import (
    AdversarialModel,
    crop_center,
    pad_center,
    power_of_two_canvas,
)
from components.models.factory import register_model


def _stage_channels(canvas: int, width: int) -> list[int]:
    """Feature channels from the first downsampled map to the 4 x 4 one, doubling as the maps shrink."""
    return [width * 2**i for i in range(int(math.log2(canvas // 4)))]


class DCGANGenerator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, width: int):
        super().__init__()
        channels, *self.image_size = image_shape
        stages = _stage_channels(power_of_two_canvas(image_shape), width)[::-1]
        layers: list[nn.Module] = [nn.Unflatten(1, (latent_dim, 1, 1))]
        fan_in, kernel_stride_padding = latent_dim, (4, 1, 0)  # 1 x 1 -> 4 x 4, then doubling
        for fan_out in stages:
            layers += [
                nn.ConvTranspose2d(fan_in, fan_out, *kernel_stride_padding, bias=False),
                nn.BatchNorm2d(fan_out),
                nn.ReLU(),
            ]
            fan_in, kernel_stride_padding = fan_out, (4, 2, 1)
        layers += [nn.ConvTranspose2d(fan_in, channels, *kernel_stride_padding), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return crop_center(self.net(z), *self.image_size)


class DCGANDiscriminator(nn.Module):
    """Strided convolutions down to 4 x 4, then one 4 x 4 convolution to a score.

    `norm` is "batch" (DCGAN), "layer" (WGAN-GP, whose per-sample penalty batch norm would break) or
    "none"; the input layer is never normalised.
    """

    def __init__(self, image_shape: tuple[int, int, int], width: int, norm: str = "batch"):
        super().__init__()
        norms = {"batch": nn.BatchNorm2d, "layer": lambda c: nn.GroupNorm(1, c), "none": None}
        if norm not in norms:
            raise ValueError(f"DCGANDiscriminator: norm must be one of {', '.join(norms)}, got {norm!r}")
        self.canvas = power_of_two_canvas(image_shape)
        layers: list[nn.Module] = []
        fan_in = image_shape[0]
        for i, fan_out in enumerate(_stage_channels(self.canvas, width)):
            layers.append(nn.Conv2d(fan_in, fan_out, 4, 2, 1, bias=i == 0 or norms[norm] is None))
            if i > 0 and norms[norm] is not None:
                layers.append(norms[norm](fan_out))
            layers.append(nn.LeakyReLU(0.2))
            fan_in = fan_out
        layers += [nn.Conv2d(fan_in, 1, 4, 1, 0), nn.Flatten(0)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(pad_center(images, self.canvas))


@register_model("dcgan")
class DCGAN(AdversarialModel):
    def __init__(
        self,
        image_shape,
        *,
        latent_dim: int = 32,
        width: int = 64,
        r1_gamma: float = 1.0,
        r1_every: int = 16,
        ema_decay: float = 0.0,
    ):
        super().__init__(
            image_shape, latent_dim=latent_dim, r1_gamma=r1_gamma, r1_every=r1_every, ema_decay=ema_decay
        )
        self.set_players(
            DCGANGenerator(self.image_shape, latent_dim, width), DCGANDiscriminator(self.image_shape, width)
        )
