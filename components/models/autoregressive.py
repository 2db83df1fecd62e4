"""Masked layers and the shared base of the autoregressive Bernoulli families.

An autoregressive model factorises p(x) = prod_i p(x_i | x_<i) over the pixels in a fixed order.
Every family here computes, in one pass, the logit of each binary pixel given the pixels before it;
masks keep later pixels out of each logit. Masks are buffers applied functionally
(`weight * mask` inside `forward`, never edits of the weights), so DistributedDataParallel and
`torch.compile` see pure functions. The base turns the logits into an exact log-likelihood and draws
samples by ancestral sampling: all samples in parallel, one pixel at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.base import DensityModel

#: What a family hands the sampler at each step: the pixel to draw (one flat index for all samples,
#: or one per sample) and the logit of that pixel being 1 given the pixels drawn so far, shape N.
Conditional = tuple[int | Tensor, Tensor]


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by one of K fixed 0/1 masks of shape out x in."""

    def __init__(self, in_features: int, out_features: int, masks: Tensor, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        if masks.dim() == 2:
            masks = masks[None]
        if masks.dim() != 3 or masks.shape[1:] != (out_features, in_features):
            raise ValueError(
                f"MaskedLinear({in_features} -> {out_features}): masks must be K x {out_features} x "
                f"{in_features}, got shape {tuple(masks.shape)}"
            )
        self.register_buffer("masks", masks.to(self.weight.dtype))

    def masked_weight(self, mask_index: int = 0) -> Tensor:
        return self.weight * self.masks[mask_index]

    def forward(self, x: Tensor, mask_index: int = 0) -> Tensor:
        return F.linear(x, self.masked_weight(mask_index), self.bias)


class MaskedConv2d(nn.Conv2d):
    """Size-preserving convolution that sees only the rows above and the pixels to the left.

    Mask type "A" hides the centre pixel too (the first layer: a pixel must not see itself); type
    "B" lets it through (later layers: the centre feature already excludes its own pixel). Only the
    spatial mask is needed because the families accept single-channel images only.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], mask_type: str):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if mask_type not in ("A", "B") or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"MaskedConv2d: expected mask_type 'A' or 'B' and an odd kernel, got {mask_type!r} and "
                f"{kh}x{kw}"
            )
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        mask = torch.ones(kh, kw)
        mask[kh // 2, kw // 2 + (mask_type == "B") :] = 0
        mask[kh // 2 + 1 :] = 0
        self.register_buffer("mask", mask[None, None])

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def bernoulli_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """Sum over pixels of log Bernoulli(x | sigmoid(logits)), one value per image."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


class AutoregressiveBernoulli(DensityModel):
    """Base of the families that factorise p(x) over the pixels of a binary image, in raster order.

    A family implements `logits`; it may override `conditional_logits` when it can compute the next
    pixel's logit more cheaply than a whole forward pass (NADE, FVSBN, the Row LSTM do).
    """

    #: True when the logits of image row r depend only on rows <= r and are the same for an image
    #: cropped below row r (convolutional and row-recurrent families): the default sampler then runs
    #: the network on the rows drawn so far instead of the whole image.
    row_prefix_sampling: ClassVar[bool] = False

    def __init__(self, image_shape: Sequence[int]):
        super().__init__(image_shape)
        if self.image_shape[0] != 1:
            name = getattr(type(self), "registry_name", type(self).__name__)
            raise ValueError(
                f"model {name!r} models single-channel binary images: expected image_shape (1, H, W), "
                f"got {self.image_shape} with {self.image_shape[0]} channels"
            )

    def logits(self, x: Tensor) -> Tensor:
        """Logit of p(x_i = 1 | x_<i) for every pixel i, N x 1 x H x W like `x`."""
        raise NotImplementedError

    def check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            name = getattr(type(self), "registry_name", type(self).__name__)
            raise ValueError(
                f"model {name!r}: expected images of shape N x {' x '.join(map(str, self.image_shape))}, "
                f"got {tuple(x.shape)}"
            )

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_images(x)
        return bernoulli_log_prob(self.logits(x), x)

    def conditional_logits(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        """Yield the next pixel and its logit given `x`, which the sampler fills in between steps.

        `x` is N x D (flattened images, zeros where nothing is drawn yet). This default runs the
        whole network once per pixel.
        """
        width = self.image_shape[2]
        images = x.view(len(x), *self.image_shape)
        for i in range(self.num_dims):
            seen = images[:, :, : i // width + 1] if self.row_prefix_sampling else images
            yield i, self.logits(seen).flatten(1)[:, i]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        x = torch.zeros(n, self.num_dims, device=self.device, dtype=dtype)
        rows = torch.arange(n, device=self.device)
        for index, logit in self.conditional_logits(x, generator):
            x[rows, index] = torch.bernoulli(torch.sigmoid(logit), generator=generator)
        return x.reshape(n, *self.image_shape)


def logit_head(channels: int) -> nn.Sequential:
    """Per-pixel output of the convolutional families: ReLU, 1x1, ReLU, 1x1 down to one logit."""
    return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 1, 1))
