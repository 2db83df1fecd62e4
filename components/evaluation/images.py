"""Image grids for people to look at: samples, reconstructions, latent interpolations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

TARGET_TILE_PIXELS = 48  # small images are enlarged (nearest neighbour) so an 8x8 digit is legible


def image_grid(images: Tensor | np.ndarray, columns: int | None = None, padding: int = 1) -> Image.Image:
    """Tile N x C x H x W images in [0, 1] into one picture, rows of `columns` images."""
    array = images.detach().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    n, c, h, w = array.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.ones((c, rows * (h + padding) + padding, columns * (w + padding) + padding), dtype=np.float32)
    for index, image in enumerate(array):
        top, left = padding + (index // columns) * (h + padding), padding + (index % columns) * (w + padding)
        canvas[:, top : top + h, left : left + w] = image
    pixels = (np.clip(canvas, 0.0, 1.0) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[0] if c == 1 else pixels.transpose(1, 2, 0))
    scale = max(1, TARGET_TILE_PIXELS // max(h, w))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_grid(images: Tensor | np.ndarray, path: Path, columns: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns).save(path)
    return path
