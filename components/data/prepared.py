"""The `prepare` stage: validate `data/raw`, split it, scale it and binarise it.

Outputs (all `.npy`, so they hash the same on every machine) under `prepared/`:
`{split}_images.npy` float32 in [0, 1], `{split}_binary.npy` uint8 in {0, 1} (a Bernoulli sample at
a fixed seed, so evaluation of binary models is deterministic), `{split}_labels.npy` when the raw
data has labels, and `meta.json`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.config import load_params
from components.data.raw import DataError, read_raw

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    images: np.ndarray  # float32 in [0, 1], N x C x H x W
    binary: np.ndarray  # uint8 in {0, 1}
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.images)

    def for_kind(self, data_kind: str) -> np.ndarray:
        """The float32 array a model of `data_kind` ("binary" or "continuous") is evaluated on."""
        return self.binary.astype(np.float32) if data_kind == "binary" else self.images


@dataclass
class PreparedData:
    train: Split
    val: Split
    test: Split
    name: str
    image_shape: tuple[int, int, int]
    num_classes: int

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


def prepare(raw_dir: Path, out_dir: Path, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Write the prepared splits of `raw_dir` to `out_dir`; returns the metadata written."""
    raw = read_raw(raw_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    counts = {}
    for split, index in split_indices(len(raw.images), val_fraction, test_fraction, seed).items():
        images = raw.images[np.sort(index)].astype(np.float32) / 255.0
        binary = (rng.random(images.shape, dtype=np.float32) < images).astype(np.uint8)
        np.save(out_dir / f"{split}_images.npy", images)
        np.save(out_dir / f"{split}_binary.npy", binary)
        if raw.labels is not None:
            np.save(out_dir / f"{split}_labels.npy", raw.labels[np.sort(index)])
        counts[split] = len(index)
    meta = {
        "name": raw.name,
        "source": raw.source,
        "image_shape": list(raw.images.shape[1:]),
        "num_classes": int(raw.labels.max()) + 1 if raw.labels is not None else 0,
        "counts": counts,
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load_prepared(prepared_dir: str | Path) -> PreparedData:
    """Read the output of the `prepare` stage."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing; run the `prepare` stage (`dvc repro prepare`) first")
    meta = json.loads(meta_path.read_text())
    splits = {}
    for split in SPLITS:
        labels_path = prepared_dir / f"{split}_labels.npy"
        splits[split] = Split(
            images=np.load(prepared_dir / f"{split}_images.npy"),
            binary=np.load(prepared_dir / f"{split}_binary.npy"),
            labels=np.load(labels_path) if labels_path.exists() else None,
        )
    return PreparedData(
        **splits, name=meta["name"], image_shape=tuple(meta["image_shape"]), num_classes=meta["num_classes"]
    )


def main() -> int:
    params = load_params()
    data = params["data"]
    try:
        meta = prepare(
            Path(data["raw_dir"]),
            Path(data["prepared_dir"]),
            data["val_fraction"],
            data["test_fraction"],
            params["seed"],
        )
    except DataError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 1
    print(f"prepare: {meta['name']} {meta['image_shape']} -> {meta['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
