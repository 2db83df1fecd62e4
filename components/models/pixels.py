"""What a likelihood model says about one sub-pixel: binary or one of `levels` intensities.

A density family or the VAE models either binarised images (`pixels="binary"`, a Bernoulli per
pixel) or 8-bit images (`pixels="8bit"`: every sub-pixel value k in 0..levels-1, seen as k/(levels-1)
in [0, 1]). In 8-bit form the network emits, per sub-pixel, the parameters of one of two discrete
distributions over the levels (hyper-parameter `output`):

- "categorical": a softmax over all levels (PixelCNN and PixelRNN, van den Oord et al. 2016);
- "logistic": a discretised mixture of logistics (PixelCNN++, Salimans et al. 2017): the mass of
  level k is the mixture's probability of the bin around it, the two end bins reaching to infinity,
  so the masses sum to one exactly whatever the parameters. Its 3 x components parameters per
  sub-pixel make it the affordable output of the fully connected families at 3x32x32.

Each distribution maps parameters N x ... x P to per-sub-pixel log-probabilities N x ..., draws
values with a seeded generator, and gives the mean value (a VAE's reconstruction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

Pixels = Literal["binary", "8bit"]
PIXELS = ("binary", "8bit")
OUTPUTS = ("categorical", "logistic")


def resolve_pixels(model: str, pixels: str | None, image_shape: Sequence[int]) -> Pixels:
    """The pixel form given, or the one that follows the shape: binary for one channel, 8-bit for more."""
    if pixels is None:
        return "binary" if image_shape[0] == 1 else "8bit"
    if pixels not in PIXELS:
        raise ValueError(f"model {model!r}: pixels must be 'binary' or '8bit', got {pixels!r}")
    if pixels == "binary" and image_shape[0] != 1:
        raise ValueError(
            f"model {model!r} with pixels='binary' models single-channel binary images: expected "
            f"image_shape (1, H, W), got {tuple(image_shape)} with {image_shape[0]} channels"
        )
    return pixels


class Bernoulli:
    """One logit per pixel: the binary form."""

    num_params = 1

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params[..., 0], x, reduction="none")

    def sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params[..., 0]), generator=generator)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params[..., 0])


class Categorical:
    """A softmax over `levels` values per sub-pixel."""

    def __init__(self, levels: int):
        self.levels = self.num_params = levels

    def level(self, x: Tensor) -> Tensor:
        return (x * (self.levels - 1)).round().clamp(0, self.levels - 1).long()

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return params.log_softmax(-1).gather(-1, self.level(x)[..., None])[..., 0]

    def sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        # Inverse CDF with one uniform per sub-pixel: the same draws on every device for one generator.
        uniform = torch.rand(params.shape[:-1], generator=generator, device=params.device, dtype=params.dtype)
        level = (params.softmax(-1).cumsum(-1) < uniform[..., None]).sum(-1).clamp(max=self.levels - 1)
        return level.to(params.dtype) / (self.levels - 1)

    def mean(self, params: Tensor) -> Tensor:
        values = torch.linspace(0, 1, self.levels, device=params.device, dtype=params.dtype)
        return params.softmax(-1) @ values


class DiscretisedLogisticMixture:
    """A mixture of `components` logistics on [-1, 1], integrated over each level's bin."""

    #: Lowest log-scale: keeps a collapsed component from producing infinite densities.
    min_log_scale = -7.0

    def __init__(self, levels: int, components: int):
        self.levels, self.components = levels, components
        self.num_params = 3 * components
        self.half_bin = 1.0 / (levels - 1)  # levels sit 2/(levels-1) apart on [-1, 1]

    def split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mixture log-weights, means and log-scales, each ... x components."""
        logit_weight, mean, log_scale = params.split(self.components, dim=-1)
        return logit_weight.log_softmax(-1), mean, log_scale.clamp(min=self.min_log_scale)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        log_weight, mean, log_scale = self.split(params)
        level = (x * (self.levels - 1)).round().clamp(0, self.levels - 1)[..., None]
        centred = (2 * level / (self.levels - 1) - 1) - mean
        inverse_scale = (-log_scale).exp()
        upper = inverse_scale * (centred + self.half_bin)  # standardised bin edges
        lower = inverse_scale * (centred - self.half_bin)
        # log(sigmoid(u) - sigmoid(l)) = logsigmoid(u) + logsigmoid(-l) + log(1 - exp(l - u)): no
        # cancellation when both are close to 0 or 1; the end bins keep only one of their edges.
        inner = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
        first, last = level == 0, level == self.levels - 1
        log_mass = torch.where(first, F.logsigmoid(upper), torch.where(last, F.logsigmoid(-lower), inner))
        return torch.logsumexp(log_weight + log_mass, -1)

    def sample(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        log_weight, mean, log_scale = self.split(params)
        shape, device, dtype = params.shape[:-1], params.device, params.dtype
        pick = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        component = (log_weight.exp().cumsum(-1) < pick[..., None]).sum(-1, keepdim=True)
        component = component.clamp(max=self.components - 1)
        uniform = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp(1e-12, 1 - 1e-12)
        value = mean.gather(-1, component)[..., 0] + log_scale.gather(-1, component)[..., 0].exp() * (
            uniform.log() - (-uniform).log1p()
        )
        # Rounding to the nearest level is integrating over its bin; the end bins are unbounded.
        level = ((value + 1) / 2 * (self.levels - 1)).round().clamp(0, self.levels - 1)
        return level / (self.levels - 1) + 0.0  # + 0.0 turns the -0.0 that rounding gives into 0.0

    def mean(self, params: Tensor) -> Tensor:
        """Mean of the continuous mixture, clipped to [0, 1] (close to the discretised mean)."""
        log_weight, mean, _ = self.split(params)
        return (((log_weight.exp() * mean).sum(-1) + 1) / 2).clamp(0, 1)


SubpixelDistribution = Bernoulli | Categorical | DiscretisedLogisticMixture


def subpixel_distribution(
    model: str, pixels: Pixels, output: str, levels: int, mixture_components: int
) -> SubpixelDistribution:
    """The output distribution of a model of this pixel form, checking the settings that shape it."""
    if pixels == "binary":
        return Bernoulli()
    if output not in OUTPUTS:
        raise ValueError(f"model {model!r}: output must be 'categorical' or 'logistic', got {output!r}")
    if levels < 2:
        raise ValueError(f"model {model!r}: levels must be at least 2, got {levels}")
    if output == "categorical":
        return Categorical(levels)
    if mixture_components < 1:
        raise ValueError(f"model {model!r}: mixture_components must be at least 1, got {mixture_components}")
    return DiscretisedLogisticMixture(levels, mixture_components)
