"""PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu, ICML 2016) and Gated PixelCNN (van den Oord,
Kalchbrenner, Vinyals, Espeholt, Graves & Kavukcuoglu, NeurIPS 2016).

Idea: a stack of convolutions whose kernels are masked so that the feature at a pixel sees only the
rows above and the pixels to its left: a type-A mask (centre hidden) in the first layer, type-B
masks (centre visible) after it. One forward pass then gives every conditional p(x_i | x_<i) at
once, in parallel over the image; only sampling is sequential. On colour images the masks also
run across the channels of a pixel (R from the context, G also from R, B from R and G).

Two bodies (hyper-parameter `gated`):
- the original residual stack (ReLU blocks around one masked k x k convolution), whose masked
  kernels never reach the pixels above and to the right beyond the first rows: a blind spot;
- Gated PixelCNN: a vertical stack that sees whole rows above and a horizontal stack that sees the
  row to the left, joined by feeding the vertical stack, shifted down a row, into the horizontal
  one; gated units tanh(a) * sigmoid(b); no blind spot. The default for 8-bit images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.autoregressive import (
    AutoregressiveImageModel,
    Conditional,
    MaskedConv2d,
    channel_conv,
    output_head,
    subpixel_params,
)
from components.models.factory import register_model


class ResidualBlock(nn.Module):
    """ReLU, 1x1 down to half width, ReLU, masked k x k (type B), ReLU, 1x1 back up; plus the input."""

    def __init__(self, channels: int, kernel_size: int, image_channels: int):
        super().__init__()
        half = channels // 2
        self.body = nn.Sequential(
            nn.ReLU(),
            channel_conv(channels, half, image_channels),
            nn.ReLU(),
            MaskedConv2d(half, half, kernel_size, "B", image_channels=image_channels),
            nn.ReLU(),
            channel_conv(half, channels, image_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VerticalConv(nn.Conv2d):
    """k x k convolution that sees the rows up to its own, whole: output row r reads rows r-k//2..r.

    It sees the current row, so its output may only reach a pixel shifted down a row (`shift_down`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size))
        self.reach = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.reach, self.reach, self.reach, 0)))


def shift_down(x: Tensor) -> Tensor:
    """Move every row one down (zeros on top): row r then holds what was computed from rows < r."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return a.tanh() * b.sigmoid()


class GatedStackBlock(nn.Module):
    """One layer of both stacks: gated vertical and horizontal units, the horizontal one residual."""

    def __init__(self, channels: int, kernel_size: int, image_channels: int):
        super().__init__()
        self.vertical = VerticalConv(channels, 2 * channels, kernel_size)
        # Reads only rows above the pixel (shifted down), all of which every channel group may see.
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal = MaskedConv2d(
            channels, 2 * channels, (1, kernel_size), "B", image_channels=image_channels, out_chunks=2
        )
        self.horizontal_out = channel_conv(channels, channels, image_channels)

    def forward(self, vertical: Tensor, horizontal: Tensor) -> tuple[Tensor, Tensor]:
        vertical = self.vertical(vertical)
        pre_gate = self.horizontal(horizontal) + self.vertical_to_horizontal(shift_down(vertical))
        return gate(vertical), horizontal + self.horizontal_out(gate(pre_gate))


@register_model("pixelcnn")
class PixelCNN(AutoregressiveImageModel):
    row_prefix_sampling = True

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        channels: int = 64,
        num_blocks: int = 4,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        gated: bool | None = None,
        pixels: str | None = None,
        output: str = "categorical",
        levels: int = 256,
        mixture_components: int = 5,
    ):
        """`gated=None` picks the gated two-stack body for 8-bit images and the residual one for binary."""
        super().__init__(
            image_shape, pixels=pixels, output=output, levels=levels, mixture_components=mixture_components
        )
        c = self.image_shape[0]
        self.gated = self.pixels == "8bit" if gated is None else gated
        # The first convolution reads first_kernel_size // 2 rows above and columns to either side,
        # each block kernel_size // 2 more; the gated body's horizontal stack reads the vertical one
        # shifted down a row.
        spread = first_kernel_size // 2 + num_blocks * (kernel_size // 2)
        self.reach = (spread + int(self.gated), spread)
        if self.gated:
            self.vertical_in = VerticalConv(c, channels, first_kernel_size)
            self.horizontal_in = MaskedConv2d(c, channels, (1, first_kernel_size), "A", image_channels=c)
            self.blocks = nn.ModuleList(GatedStackBlock(channels, kernel_size, c) for _ in range(num_blocks))
            self.head = output_head(channels, c, self.params_per_dim)
        else:
            self.net = nn.Sequential(
                MaskedConv2d(c, channels, first_kernel_size, "A", image_channels=c),
                *(ResidualBlock(channels, kernel_size, c) for _ in range(num_blocks)),
                output_head(channels, c, self.params_per_dim),
            )

    def params(self, x: Tensor) -> Tensor:
        return subpixel_params(self._output_head(self._features(x)), self.image_shape[0])

    def params_at(self, images: Tensor, row: int, column: int) -> Tensor:
        """The head is per pixel (1x1 convolutions): it runs on the one pixel asked for."""
        features = self._features(images)[:, :, row : row + 1, column : column + 1]
        return subpixel_params(self._output_head(features), self.image_shape[0])[:, :, 0, 0]

    def sampling_reach(self) -> tuple[int, int]:
        return self.reach

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        """The gated body's sampler: the vertical stack reaches a row only from the rows above it, all
        drawn when the row starts, so it runs once per row (on the rows it reads); each step runs
        just the horizontal stack on the part of the current row it reads and the head on the pixel
        drawn. (The padding of a cropped input stands for what was cut off, which the outputs used
        do not reach.)"""
        if not self.gated:
            yield from super().conditional_params(x, generator)
            return
        channels, height, width = self.image_shape
        images = x.view(len(x), *self.image_shape)
        for row in range(height):
            from_above = self._vertical_contributions(images, row)
            for column in range(width):
                # The horizontal stack reads the pixel and the ones to its left, as far as its reach.
                left = max(0, column - self.reach[1])
                for channel in range(channels):
                    horizontal = self.horizontal_in(images[:, :, row : row + 1, left : column + 1])
                    for block, vertical in zip(self.blocks, from_above, strict=True):
                        pre_gate = block.horizontal(horizontal) + vertical[..., left : column + 1]
                        horizontal = horizontal + block.horizontal_out(gate(pre_gate))
                    params = subpixel_params(self.head(horizontal[..., -1:]), channels)
                    yield channel * height * width + row * width + column, params[:, channel, 0, 0]

    def _vertical_contributions(self, images: Tensor, row: int) -> list[Tensor]:
        """What each block's vertical stack adds to the horizontal one on `row` (N x 2F x 1 x W), from
        the rows above it: the ones its output on the row before reads (the top padding stands for
        the rows cut off above, which that output does not reach)."""
        rows_read = self.reach[0] - 1  # the reach counts the shift down a row as one more
        if row == 0:
            return [
                block.vertical_to_horizontal(
                    images.new_zeros(
                        len(images), block.vertical_to_horizontal.in_channels, 1, images.shape[-1]
                    )
                )
                for block in self.blocks
            ]
        vertical = self.vertical_in(images[:, :, max(0, row - 1 - rows_read) : row])
        contributions = []
        for block in self.blocks:
            pre_gate = block.vertical(vertical)
            contributions.append(block.vertical_to_horizontal(pre_gate[:, :, -1:]))
            vertical = gate(pre_gate)
        return contributions

    def _features(self, x: Tensor) -> Tensor:
        """What the output head reads at every pixel."""
        if not self.gated:
            return self.net[:-1](x)
        vertical, horizontal = self.vertical_in(x), self.horizontal_in(x)
        for block in self.blocks:
            vertical, horizontal = block(vertical, horizontal)
        return horizontal

    def _output_head(self, features: Tensor) -> Tensor:
        return self.head(features) if self.gated else self.net[-1](features)
