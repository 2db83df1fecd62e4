"""PixelCNN (van den Oord, Kalchbrenner & Kavukcuoglu, ICML 2016; gated units from van den Oord et al.,
NeurIPS 2016).

Idea: a stack of convolutions whose kernels are masked so that the feature at a pixel sees only the
rows above and the pixels to its left: a type-A mask (centre hidden) in the first layer, type-B
masks (centre visible) after it. One forward pass then gives every conditional
p(x_i | x_<i) at once, in parallel over the image; only sampling is sequential. The body is a stack
of residual blocks; `gated=True` replaces each block's ReLUs by the gated activation
tanh(a) * sigmoid(b) of Gated PixelCNN (this model keeps the single masked stack, so it keeps the
original PixelCNN's blind spot above-right; the two-stack fix is not implemented).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from components.models.autoregressive import AutoregressiveBernoulli, MaskedConv2d, logit_head
from components.models.registry import register_model


class ResidualBlock(nn.Module):
    """ReLU, 1x1 down to half width, ReLU, masked k x k (type B), ReLU, 1x1 back up; plus the input."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        half = channels // 2
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, half, 1),
            nn.ReLU(),
            MaskedConv2d(half, half, kernel_size, "B"),
            nn.ReLU(),
            nn.Conv2d(half, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class GatedBlock(nn.Module):
    """Masked k x k (type B) to twice the width, tanh(a) * sigmoid(b), 1x1; plus the input."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = MaskedConv2d(channels, 2 * channels, kernel_size, "B")
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return x + self.out(a.tanh() * b.sigmoid())


@register_model("pixelcnn")
class PixelCNN(AutoregressiveBernoulli):
    row_prefix_sampling = True

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        channels: int = 64,
        num_blocks: int = 4,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        gated: bool = False,
    ):
        super().__init__(image_shape)
        block = GatedBlock if gated else ResidualBlock
        self.net = nn.Sequential(
            MaskedConv2d(1, channels, first_kernel_size, "A"),
            *(block(channels, kernel_size) for _ in range(num_blocks)),
            logit_head(channels),
        )

    def logits(self, x: Tensor) -> Tensor:
        return self.net(x)
