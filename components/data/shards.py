"""A prepared split on disk: fixed-size uint8 `.npy` shards listed in one small JSON index.

A shard holds `shard_images` consecutive images of a split (the last one fewer) as three files:
`images-NNNNN.npy` (uint8, as in the raw data), `binary-NNNNN.npy` (uint8 in {0, 1}, the fixed
binarised evaluation copy) and, when the data has labels, `labels-NNNNN.npy`. `np.save` writes the
same bytes for the same array on every machine, so DVC hashes are stable. Readers go one shard at
a time, so nothing here needs a whole split in memory; scaling to [0, 1] happens where data is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from components.data.raw import DataError

INDEX_FILE = "index.json"
INDEX_FORMAT = "genpipe-shards/1"
Column = Literal["images", "binary", "labels"]


@dataclass(frozen=True)
class Shard:
    """One shard's files, relative to the prepared directory, and its number of images."""

    images: str
    binary: str
    labels: str | None
    count: int


@dataclass(frozen=True)
class ShardedSplit:
    """The shards of one split under `root`; iterating them reads one shard at a time."""

    root: Path
    shards: tuple[Shard, ...]

    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    @property
    def largest_shard(self) -> int:
        """Images in the split's largest shard: the most one read brings into memory."""
        return max(shard.count for shard in self.shards)

    @property
    def has_labels(self) -> bool:
        return bool(self.shards) and self.shards[0].labels is not None

    def paths(self, column: Column) -> list[Path]:
        """Absolute paths of `column`'s shard files, in split order."""
        return [self.root / getattr(shard, column) for shard in self.shards]

    def chunks(self, column: Column) -> Iterator[np.ndarray]:
        """`column` one shard at a time, in split order."""
        for path in self.paths(column):
            yield np.load(path, allow_pickle=False)

    def materialise(self, column: Column) -> np.ndarray:
        """The whole `column` in memory: for small data only."""
        return np.concatenate(list(self.chunks(column)))


def unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels as float32 in [0, 1]: the one scaling every consumer of the shards uses."""
    return images.astype(np.float32) / np.float32(255.0)


class SplitWriter:
    """Writes one split's shards in order; `index_entry()` lists what was written."""

    def __init__(self, root: Path, split: str):
        self.root, self.split = Path(root), split
        (self.root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[Shard] = []

    def write(self, images: np.ndarray, binary: np.ndarray, labels: np.ndarray | None) -> None:
        number = len(self.shards)
        names = {
            column: f"{self.split}/{column}-{number:05d}.npy" for column in ("images", "binary", "labels")
        }
        np.save(self.root / names["images"], np.ascontiguousarray(images, dtype=np.uint8))
        np.save(self.root / names["binary"], np.ascontiguousarray(binary, dtype=np.uint8))
        if labels is not None:
            np.save(self.root / names["labels"], np.ascontiguousarray(labels, dtype=np.int64))
        self.shards.append(
            Shard(
                names["images"], names["binary"], names["labels"] if labels is not None else None, len(images)
            )
        )

    def index_entry(self) -> dict:
        return {"count": sum(s.count for s in self.shards), "shards": [asdict(s) for s in self.shards]}


def write_index(root: Path, shard_images: int, splits: dict[str, dict]) -> None:
    """The JSON index of every split's shards (sorted keys, so it is byte-stable)."""
    index = {"format": INDEX_FORMAT, "shard_images": shard_images, "splits": splits}
    (Path(root) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_index(root: Path) -> dict[str, ShardedSplit]:
    """Every split listed in `root`'s index; a missing file or wrong format is a clear error."""
    root = Path(root)
    path = root / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; run the `prepare` stage (`dvc repro prepare`) first")
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise DataError(
            f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}; rerun `dvc repro prepare`"
        )
    splits = {}
    for name, entry in index["splits"].items():
        shards = tuple(Shard(**shard) for shard in entry["shards"])
        missing = [p for shard in shards for p in (shard.images, shard.binary) if not (root / p).is_file()]
        if missing:
            raise DataError(
                f"{path}: split {name!r} lists shard files that are missing: {', '.join(missing)}"
            )
        splits[name] = ShardedSplit(root, shards)
    return splits
