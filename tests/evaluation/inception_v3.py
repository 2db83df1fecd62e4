"""Inception-v3 in the form of FID's TorchScript file (`inception-2015-12-05.pt`): uint8 RGB images of
any size in, resized to 299 x 299 inside, 2048 pool features or 1008 logits out. Written from the
published architecture (Szegedy et al. 2016) so that a test can save a randomly initialised network of
the right shape as a user's file, with no download; its weights mean nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOL_FEATURES = 2048
LOGITS = 1008  # the FID network's classifier keeps the original 1,008 classes


def conv(cin: int, cout: int, kernel, stride: int = 1, padding=0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU()
    )


def row7(cin: int, cout: int) -> nn.Sequential:
    return conv(cin, cout, (1, 7), padding=(0, 3))


def column7(cin: int, cout: int) -> nn.Sequential:
    return conv(cin, cout, (7, 1), padding=(3, 0))


class Parallel(nn.Module):
    """Branches on one input, their outputs concatenated over channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        for branch in self.branches:
            outputs.append(branch(x))
        return torch.cat(outputs, 1)


def average_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


def block_35(cin: int, pool_channels: int) -> Parallel:
    return Parallel(
        conv(cin, 64, 1),
        nn.Sequential(conv(cin, 48, 1), conv(48, 64, 5, padding=2)),
        nn.Sequential(conv(cin, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, padding=1)),
        nn.Sequential(average_pool(), conv(cin, pool_channels, 1)),
    )


def reduce_35_to_17(cin: int) -> Parallel:
    return Parallel(
        conv(cin, 384, 3, stride=2),
        nn.Sequential(conv(cin, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, stride=2)),
        nn.MaxPool2d(3, stride=2),
    )


def block_17(cin: int, width: int) -> Parallel:
    """7 x 7 convolutions factorised into 1 x 7 and 7 x 1."""
    return Parallel(
        conv(cin, 192, 1),
        nn.Sequential(conv(cin, width, 1), row7(width, width), column7(width, 192)),
        nn.Sequential(
            conv(cin, width, 1),
            column7(width, width),
            row7(width, width),
            column7(width, width),
            row7(width, 192),
        ),
        nn.Sequential(average_pool(), conv(cin, 192, 1)),
    )


def reduce_17_to_8(cin: int) -> Parallel:
    return Parallel(
        nn.Sequential(conv(cin, 192, 1), conv(192, 320, 3, stride=2)),
        nn.Sequential(conv(cin, 192, 1), row7(192, 192), column7(192, 192), conv(192, 192, 3, stride=2)),
        nn.MaxPool2d(3, stride=2),
    )


def split_3x3(cin: int) -> Parallel:
    return Parallel(conv(cin, 384, (1, 3), padding=(0, 1)), conv(cin, 384, (3, 1), padding=(1, 0)))


def block_8(cin: int, pool: nn.Module) -> Parallel:
    return Parallel(
        conv(cin, 320, 1),
        nn.Sequential(conv(cin, 384, 1), split_3x3(384)),
        nn.Sequential(conv(cin, 448, 1), conv(448, 384, 3, padding=1), split_3x3(384)),
        nn.Sequential(pool, conv(cin, 192, 1)),
    )


class InceptionV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            conv(3, 32, 3, stride=2),
            conv(32, 32, 3),
            conv(32, 64, 3, padding=1),
            nn.MaxPool2d(3, stride=2),
            conv(64, 80, 1),
            conv(80, 192, 3),
            nn.MaxPool2d(3, stride=2),
        )
        self.blocks = nn.Sequential(
            block_35(192, 32),
            block_35(256, 64),
            block_35(288, 64),
            reduce_35_to_17(288),
            block_17(768, 128),
            block_17(768, 160),
            block_17(768, 160),
            block_17(768, 192),
            reduce_17_to_8(768),
            block_8(1280, average_pool()),
            block_8(POOL_FEATURES, nn.MaxPool2d(3, stride=1, padding=1)),  # FID's network: max here
        )
        self.logits = nn.Linear(POOL_FEATURES, LOGITS)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # keeps activations from fading over ~95 random layers
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False) / 127.5 - 1.0
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        return features if return_features else self.logits(features)
