"""Masked layers and the shared base of the autoregressive image families.

An autoregressive model factorises p(x) = prod_i p(x_i | x_<i) over the sub-pixels in a fixed order.
Every family here computes, in one pass, the parameters of each sub-pixel's distribution (a
Bernoulli logit for binary images, a softmax or a discretised logistic mixture over the levels of
8-bit images: `components.models.pixels`) given the sub-pixels before it; masks keep later ones out.
Masks are buffers applied functionally (`weight * mask` inside `forward`, never edits of the
weights), so DistributedDataParallel and `torch.compile` see pure functions. The base turns the
parameters into an exact log-likelihood and draws samples by ancestral sampling: all samples in
parallel, one sub-pixel at a time.

Colour images use the channel masking of PixelCNN (van den Oord et al. 2016): the features at each
position are split into one group per image channel, and the group of channel c sees, at its own
position, only the channels before c (R nothing, G the R value, B the R and G values), while every
earlier position is seen whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.base import DensityModel, PixelForm
from components.models.pixels import resolve_pixels, subpixel_distribution

#: What a family hands the sampler at each step: the sub-pixel to draw (one flat index into the
#: C x H x W layout for all samples, or one per sample) and its distribution's parameters, N x P.
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
        # As bools: a quarter of float's memory and checkpoint (FVSBN at 3x64x64: 0.45 GB, not 1.8 GB).
        self.register_buffer("masks", masks.bool())

    def masked_weight(self, mask_index: int = 0) -> Tensor:
        return self.weight * self.masks[mask_index]

    def forward(self, x: Tensor, mask_index: int = 0) -> Tensor:
        return F.linear(x, self.masked_weight(mask_index), self.bias)


def channel_groups(num_channels: int, image_channels: int, chunks: int = 1) -> Tensor:
    """Image channel that each of `num_channels` features belongs to.

    Features made of `chunks` equal parts that are later combined element by element (the two
    halves of a gated unit, the four gates of an LSTM) give unit u of every part the same group.
    """
    units = num_channels // chunks
    if units * chunks != num_channels or units < image_channels:
        raise ValueError(
            f"{num_channels} feature channels in {chunks} part(s) cannot be split among "
            f"{image_channels} image channels: expected a multiple of {chunks} of at least "
            f"{chunks * image_channels}"
        )
    return torch.arange(num_channels) % units * image_channels // units


class MaskedConv2d(nn.Conv2d):
    """Size-preserving convolution that sees only the rows above and the pixels to the left.

    Mask type "A" hides the centre pixel too (the first layer: a pixel must not see itself); type
    "B" lets it through (later layers: the centre feature already excludes its own pixel). With
    several image channels the centre is masked per channel group instead: type A lets group c see
    the groups before c, type B also group c itself.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        mask_type: str,
        *,
        image_channels: int = 1,
        out_chunks: int = 1,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if mask_type not in ("A", "B") or kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(
                f"MaskedConv2d: expected mask_type 'A' or 'B' and an odd kernel, got {mask_type!r} and "
                f"{kh}x{kw}"
            )
        super().__init__(in_channels, out_channels, (kh, kw), padding=(kh // 2, kw // 2))
        mask = torch.ones(out_channels, in_channels, kh, kw)
        mask[:, :, kh // 2, kw // 2 :] = 0
        mask[:, :, kh // 2 + 1 :] = 0
        if image_channels == 1:
            mask[:, :, kh // 2, kw // 2] = float(mask_type == "B")
            mask = mask[
                :1, :1
            ].clone()  # the same for every pair of channels: stored once, as binary models did
        else:
            out_group = channel_groups(out_channels, image_channels, out_chunks)[:, None]
            in_group = channel_groups(in_channels, image_channels)[None, :]
            visible = out_group >= in_group if mask_type == "B" else out_group > in_group
            mask[:, :, kh // 2, kw // 2] = visible.float()
        self.register_buffer("mask", mask.bool())

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def channel_conv(in_channels: int, out_channels: int, image_channels: int, out_chunks: int = 1) -> nn.Conv2d:
    """1x1 convolution that keeps the channel groups apart; a plain one for single-channel images."""
    if image_channels == 1:
        return nn.Conv2d(in_channels, out_channels, 1)
    return MaskedConv2d(
        in_channels, out_channels, 1, "B", image_channels=image_channels, out_chunks=out_chunks
    )


class AutoregressiveImageModel(PixelForm, DensityModel):
    """Base of the families that factorise p(x) over the sub-pixels of an image in a fixed order.

    A family implements `params`; it may override `conditional_params` when it can compute the next
    sub-pixel's parameters more cheaply than a whole forward pass (NADE, FVSBN, the Row LSTM do).
    """

    #: True when the output at image row r depends only on rows <= r and is the same for an image
    #: cropped below row r (convolutional and row-recurrent families): the default sampler then runs
    #: the network on the rows drawn so far instead of the whole image (see `sampling_rows_above`).
    row_prefix_sampling: ClassVar[bool] = False
    #: True: raster order over pixels, a pixel's channels in turn (the convolutional and recurrent
    #: families); False: the flattened C x H x W order (the fully connected families).
    pixel_major: ClassVar[bool] = True

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        pixels: str | None,
        output: str,
        levels: int,
        mixture_components: int,
    ):
        super().__init__(image_shape)
        self.pixels = resolve_pixels(self.registry_name, pixels, self.image_shape)
        self.distribution = subpixel_distribution(
            self.registry_name, self.pixels, output, levels, mixture_components
        )

    @property
    def params_per_dim(self) -> int:
        """Number of distribution parameters each sub-pixel gets (1 for a binary pixel's logit)."""
        return self.distribution.num_params

    def ordering(self) -> Tensor:
        """Flat indices into the C x H x W layout in the order the model draws them."""
        c, h, w = self.image_shape
        order = torch.arange(self.num_dims)
        return order.view(c, h * w).T.flatten() if self.pixel_major else order

    def params(self, x: Tensor) -> Tensor:
        """Parameters of p(x_i | x_<i) for every sub-pixel i, N x C x H x W x P."""
        raise NotImplementedError

    def check_images(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"model {self.registry_name!r}: expected images of shape N x {' x '.join(map(str, self.image_shape))}, "
                f"got {tuple(x.shape)}"
            )

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_images(x)
        return self.distribution.log_prob(self.params(x), x).flatten(1).sum(1)

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        """Yield the next sub-pixel and its parameters given `x`, which the sampler fills in between steps.

        `x` is N x D (flattened images, zeros where nothing is drawn yet). This default runs the
        whole network once per sub-pixel.
        """
        _, height, width = self.image_shape
        images = x.view(len(x), *self.image_shape)
        reach = self.sampling_reach()
        for i in self.ordering().tolist():
            channel, row, column = i // (height * width), i // width % height, i % width
            if not self.row_prefix_sampling:
                yield i, self.params(images)[:, channel, row, column]
                continue
            top, left, right = 0, 0, width
            if reach is not None:
                top, left, right = max(0, row - reach[0]), max(0, column - reach[1]), column + reach[1] + 1
            window = images[:, :, top : row + 1, left:right]
            yield i, self.params_at(window, row - top, column - left)[:, channel]

    def sampling_reach(self) -> tuple[int, int] | None:
        """How far the output at a pixel reads: rows above its own, columns to either side (None:
        the whole image). A `row_prefix_sampling` family that knows it lets the sampler run the
        network on that window only, so a step costs the same anywhere in an image of any size."""
        return None

    def params_at(self, images: Tensor, row: int, column: int) -> Tensor:
        """`params(images)` at one pixel, N x C x P; a family may compute only what that pixel needs."""
        return self.params(images)[:, :, row, column]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        dtype = next(self.parameters()).dtype
        x = torch.zeros(n, self.num_dims, device=self.device, dtype=dtype)
        rows = torch.arange(n, device=self.device)
        for index, params in self.conditional_params(x, generator):
            x[rows, index] = self.distribution.sample(params, generator)
        return x.reshape(n, *self.image_shape)


def output_head(channels: int, image_channels: int, params_per_dim: int) -> nn.Sequential:
    """Per-pixel output of the convolutional families: ReLU, 1x1, ReLU, 1x1 to each sub-pixel's parameters."""
    return nn.Sequential(
        nn.ReLU(),
        channel_conv(channels, channels, image_channels),
        nn.ReLU(),
        channel_conv(channels, image_channels * params_per_dim, image_channels),
    )


def subpixel_params(output: Tensor, image_channels: int) -> Tensor:
    """N x (C*P) x H x W, grouped by image channel, to N x C x H x W x P."""
    return output.unflatten(1, (image_channels, -1)).permute(0, 1, 3, 4, 2)
