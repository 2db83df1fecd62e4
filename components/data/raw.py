"""The raw dataset layout under version control, and the one function that writes it.

`data/raw/` holds `images.npy` (uint8, N x C x H x W), optional `labels.npy` (int64, N) and
`dataset.json` (name and provenance). `.npy` files are written byte-for-byte deterministically,
so the same images always give the same DVC hash on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
META_FILE = "dataset.json"


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and the problem."""


@dataclass
class RawDataset:
    images: np.ndarray  # uint8, N x C x H x W
    labels: np.ndarray | None  # int64, N
    name: str
    source: str

    def validate(self, where: str) -> None:
        """Raise DataError (naming `where`) unless this is a usable dataset."""
        if self.images.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8, found {self.images.dtype}")
        if self.images.ndim != 4:
            raise DataError(f"{where}: images must be N x C x H x W, found shape {self.images.shape}")
        n, c, h, w = self.images.shape
        if n < 10:
            raise DataError(f"{where}: need at least 10 images to split into train/val/test, found {n}")
        if c not in (1, 3) or h < 2 or w < 2:
            raise DataError(
                f"{where}: images must have 1 or 3 channels and be at least 2x2, found {c}x{h}x{w}"
            )
        if self.labels is not None:
            if self.labels.shape != (n,):
                raise DataError(
                    f"{where}: {n} images but labels have shape {self.labels.shape} (expected ({n},))"
                )
            if not np.issubdtype(self.labels.dtype, np.integer):
                raise DataError(f"{where}: labels must be integers, found {self.labels.dtype}")
            if self.labels.min() < 0:
                raise DataError(f"{where}: labels must be non-negative, found {self.labels.min()}")


def write_raw(dataset: RawDataset, raw_dir: Path) -> None:
    """Replace `raw_dir` with `dataset` atomically: a failure leaves the old directory untouched."""
    dataset.validate(str(raw_dir))
    raw_dir = Path(raw_dir)
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".raw-", dir=raw_dir.parent))
    try:
        np.save(staging / IMAGES_FILE, np.ascontiguousarray(dataset.images))
        if dataset.labels is not None:
            np.save(staging / LABELS_FILE, np.ascontiguousarray(dataset.labels.astype(np.int64)))
        meta = {"name": dataset.name, "source": dataset.source}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.chmod(staging, 0o755)
        if raw_dir.exists():
            retired = raw_dir.with_name(f".{raw_dir.name}-old")
            shutil.rmtree(retired, ignore_errors=True)
            raw_dir.rename(retired)
            staging.rename(raw_dir)
            shutil.rmtree(retired)
        else:
            staging.rename(raw_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_raw(raw_dir: Path) -> RawDataset:
    """Load and validate `raw_dir`; errors name the file at fault."""
    raw_dir = Path(raw_dir)
    images_path = raw_dir / IMAGES_FILE
    if not images_path.is_file():
        raise DataError(
            f"{images_path}: missing; run `genpipe data import PATH` or `genpipe run` for the built-in data"
        )
    try:
        images = np.load(images_path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{images_path}: not a readable .npy array ({err})") from err
    labels = None
    labels_path = raw_dir / LABELS_FILE
    if labels_path.exists():
        try:
            labels = np.load(labels_path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise DataError(f"{labels_path}: not a readable .npy array ({err})") from err
    meta_path = raw_dir / META_FILE
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_path}: invalid JSON ({err})") from err
    dataset = RawDataset(images, labels, meta.get("name", raw_dir.name), meta.get("source", "unknown"))
    dataset.validate(str(images_path))
    return dataset


def builtin_digits() -> RawDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, values 0..16), shipped with the package."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return RawDataset(images, digits.target.astype(np.int64), "digits", "sklearn.datasets.load_digits")


def dataset_name(raw_dir: Path) -> str:
    """Name of the dataset in `raw_dir` without loading its arrays."""
    meta_path = Path(raw_dir) / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; run `genpipe run` or `genpipe data import PATH` first")
    return json.loads(meta_path.read_text())["name"]
