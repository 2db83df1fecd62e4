"""The `prepare` stage: validate `data/raw`, split it and write each split as uint8 shards.

Outputs under `prepared/` (`components.data.shards` describes the layout): per split, shards of
`data.shard_images` images holding the raw uint8 pixels and a binarised copy (a Bernoulli sample at a
fixed seed, so evaluation of binary models is deterministic), labels when the raw data has them,
`index.json` listing the shards, and `meta.json`. Scaling to [0, 1] and the dynamic binarisation of
training happen where the data is consumed. The stage holds the raw array plus one shard in memory.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from components.config import load_params
from components.data.raw import DataError, read_raw
from components.data.shards import ShardedSplit, SplitWriter, read_index, unit_float, write_index

SPLITS = ("train", "val", "test")
DEFAULT_SHARD_IMAGES = 4096  # images per shard when a caller does not say (params.yaml data.shard_images)


class Split:
    """One prepared split: read shard by shard (`shards`), or whole for small data (`images`, ...)."""

    def __init__(self, shards: ShardedSplit):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    @cached_property
    def pixels(self) -> np.ndarray:
        """The whole split as uint8, N x C x H x W."""
        return self.shards.materialise("images")

    @cached_property
    def images(self) -> np.ndarray:
        """The whole split as float32 in [0, 1]."""
        return unit_float(self.pixels)

    @cached_property
    def binary(self) -> np.ndarray:
        """The whole fixed binarised copy, uint8 in {0, 1}."""
        return self.shards.materialise("binary")

    @cached_property
    def labels(self) -> np.ndarray | None:
        return self.shards.materialise("labels") if self.shards.has_labels else None

    def for_kind(self, data_kind: str) -> np.ndarray:
        """The float32 array a model of `data_kind` ("binary" or "continuous") is evaluated on."""
        return self.binary.astype(np.float32) if data_kind == "binary" else self.images

    def batches(self, data_kind: str, batch_size: int) -> Iterator[np.ndarray]:
        """What `for_kind` holds, as float32 batches of `batch_size` images in split order (the last
        one fewer), read one shard at a time: the same batches as cutting the whole array."""
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size}: must be at least 1")
        as_kind = (lambda x: x.astype(np.float32)) if data_kind == "binary" else unit_float
        held: list[np.ndarray] = []
        count = 0
        for chunk in self.shards.chunks("binary" if data_kind == "binary" else "images"):
            while len(chunk):
                taken, chunk = chunk[: batch_size - count], chunk[batch_size - count :]
                held.append(taken)
                count += len(taken)
                if count == batch_size:
                    yield as_kind(np.concatenate(held))
                    held, count = [], 0
        if held:
            yield as_kind(np.concatenate(held))

    def head(self, data_kind: str, n: int) -> np.ndarray:
        """The split's first `n` images (fewer if it has fewer; a split is never empty) as `for_kind` gives them."""
        return next(self.batches(data_kind, n))


@dataclass
class PreparedData:
    train: Split
    val: Split
    test: Split
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    levels: int  # distinct pixel values (0..255) in the whole dataset

    def split(self, name: str) -> Split:
        return getattr(self, name)


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A fixed-seed permutation cut into train / val / test."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"params.yaml data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
            "each must be in (0, 1) and their sum below 1"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, round(n * test_fraction)), max(1, round(n * val_fraction))
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def prepare(
    raw_dir: Path,
    out_dir: Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    shard_images: int = DEFAULT_SHARD_IMAGES,
) -> dict:
    """Write the prepared splits of `raw_dir` to `out_dir` as shards; returns the metadata written."""
    if isinstance(shard_images, bool) or not isinstance(shard_images, int) or shard_images < 1:
        raise DataError(f"params.yaml data.shard_images={shard_images!r}: expected a positive integer")
    raw = read_raw(raw_dir)
    out_dir = Path(out_dir)
    for split in SPLITS:  # shards of an earlier, larger dataset must not linger
        shutil.rmtree(out_dir / split, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One stream drawn shard after shard, splits in the order below: the same numbers as one draw per
    # whole split, so the binarised copy does not depend on the shard size.
    rng = np.random.default_rng(seed + 1)
    counts, index = {}, {}
    seen_values = np.zeros(256, dtype=bool)  # counted a shard at a time: bincount widens uint8 eightfold
    for split, order in split_indices(len(raw.images), val_fraction, test_fraction, seed).items():
        order = np.sort(order)
        writer = SplitWriter(out_dir, split)
        for start in range(0, len(order), shard_images):
            rows = order[start : start + shard_images]
            pixels = raw.images[rows]
            seen_values |= np.bincount(pixels.ravel(), minlength=256) > 0
            binary = (rng.random(pixels.shape, dtype=np.float32) < unit_float(pixels)).astype(np.uint8)
            writer.write(pixels, binary, raw.labels[rows] if raw.labels is not None else None)
        counts[split], index[split] = len(order), writer.index_entry()
    write_index(out_dir, shard_images, index)
    meta = {
        "name": raw.name,
        "source": raw.source,
        "image_shape": list(raw.images.shape[1:]),
        "num_classes": int(raw.labels.max()) + 1 if raw.labels is not None else 0,
        "counts": counts,
        # Distinct pixel values: `data.pixels: auto` models two-level grey images as binary.
        "levels": int(seen_values.sum()),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


@functools.lru_cache(maxsize=2)
def load_prepared_version(prepared_dir: str | Path, data_version: str) -> PreparedData:
    """`load_prepared`, once per process and data version: the flow's tasks and the Ray workers that
    evaluate read a version's index and metadata once; new data comes with a new version."""
    return load_prepared(prepared_dir)


def load_prepared(prepared_dir: str | Path) -> PreparedData:
    """Read the output of the `prepare` stage."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; run the `prepare` stage (`dvc repro prepare`) first")
    meta = json.loads(meta_path.read_text())
    shards = read_index(prepared_dir)
    missing = [split for split in SPLITS if split not in shards]
    if missing:
        raise DataError(f"{prepared_dir}/index.json: split(s) {', '.join(missing)} missing")
    if "levels" not in meta:
        raise DataError(
            f"{meta_path}: written by an older genpipe; run the `prepare` stage (`dvc repro`) again"
        )
    splits = {split: Split(shards[split]) for split in SPLITS}
    return PreparedData(
        **splits,
        name=meta["name"],
        image_shape=tuple(meta["image_shape"]),
        num_classes=meta["num_classes"],
        levels=meta["levels"],
    )


def main() -> int:
    params = load_params()
    data = params.data
    try:
        meta = prepare(
            Path(data.raw_dir),
            Path(data.prepared_dir),
            data.val_fraction,
            data.test_fraction,
            params.seed,
            data.shard_images,
        )
    except DataError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 1
    print(f"prepare: {meta['name']} {meta['image_shape']} -> {meta['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
