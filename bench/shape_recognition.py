"""Benchmark whether generated samples show recognisable shapes: the shape classifier judges the grids.

The built-in shapes set labels each image with its shape's kind. The pipeline's featurizer is a
classifier trained on those labels (its penultimate layer feeds FID), so it can also say, for each
tile of a saved 8 x 8 sample grid (bench/results/*.png, as bench/sample_quality.py writes them),
which kind it sees and how sure it is. A grid of real test images is the reference: the share of
tiles classified with confidence >= `--confidence`, and how the predicted kinds spread over the
classes (entropy in bits; log2 of the number of kinds when all are equally frequent). Samples that
are blobs get low confidence or collapse onto one kind.

    .venv/bin/python bench/shape_recognition.py bench/results/shapes32-*.png
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import machine, prepared_in, publish, results_arguments

from components.config import load_params
from components.data.importers import builtin_dataset
from components.data.shapes import KINDS
from components.evaluation.featurizer import load_featurizer, train_featurizer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS-shape-recognition.md"
TILE, PADDING, COLUMNS = 32, 1, 8  # the sample grids' layout (components/evaluation/images.py)


def grid_tiles(path: Path) -> torch.Tensor:
    """The 64 images of an 8 x 8 grid of 32 x 32 RGB tiles, N x 3 x 32 x 32 in [0, 1]."""
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    step = TILE + PADDING
    if pixels.shape[:2] != (COLUMNS * step + PADDING,) * 2:
        raise SystemExit(
            f"{path}: {pixels.shape[1]}x{pixels.shape[0]} pixels, not an 8 x 8 grid of 32 x 32 tiles"
        )
    tiles = [
        pixels[
            PADDING + row * step : PADDING + row * step + TILE,
            PADDING + col * step : PADDING + col * step + TILE,
        ]
        for row in range(COLUMNS)
        for col in range(COLUMNS)
    ]
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def judged(
    classifier, tiles: torch.Tensor, confidence: float, classes: int
) -> tuple[float, float, list[int]]:
    """Share of tiles classified with at least `confidence`, entropy (bits) of the kinds predicted
    with it, and how many tiles each kind got."""
    with torch.no_grad():
        probabilities = torch.softmax(classifier.classify(tiles), dim=1)
    best, kind = probabilities.max(dim=1)
    sure = kind[best >= confidence]
    counts = torch.bincount(sure, minlength=classes).tolist()
    shares = [c / len(sure) for c in counts if c] if len(sure) else []
    entropy = -sum(p * math.log2(p) for p in shares)
    return len(sure) / len(tiles), entropy, counts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("grids", nargs="+", type=Path, help="8 x 8 grids of 32 x 32 samples (PNG)")
    parser.add_argument(
        "--size", type=int, default=10_000, help="shapes images to render (as the grids' run)"
    )
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    settings = load_params(HERE.parent / "params.yaml").featurizer
    with tempfile.TemporaryDirectory(prefix="bench-shapes-") as tmp:
        work = Path(tmp)
        data = prepared_in(work, builtin_dataset("shapes", size=args.size, resolution=TILE))
        started = time.perf_counter()
        report = train_featurizer(
            work / "prepared",
            work / "featurizer",
            seed=args.seed,
            **settings.model_dump(include={"feature_dim", "epochs", "batch_size", "lr"}),
        )
        seconds = time.perf_counter() - started
        classifier = load_featurizer(work / "featurizer").eval()
    classes = data.num_classes
    rows = []
    for path in args.grids:
        share, entropy, counts = judged(classifier, grid_tiles(path), args.confidence, classes)
        rows.append(f"| `{path.name}` | {share:.0%} | {entropy:.2f} | {' / '.join(map(str, counts))} |")
    lines = [
        "# Do the samples show recognisable shapes? The shape classifier's verdict on each grid",
        "",
        f"The featurizer (params.yaml settings, seed {args.seed}), trained on {len(data.train):,} labelled "
        f"shapes32 images ({args.size:,} rendered) in {seconds:.0f} s, validation accuracy "
        f"{report.get('val_accuracy', float('nan')):.3f}, classifies each of the 64 tiles of a grid. "
        f"Confident: top class probability >= {args.confidence}. Entropy of the confident tiles' kinds, "
        f"in bits (log2 {classes} = {math.log2(classes):.2f} when every kind is equally frequent); "
        "per-kind counts of confident tiles.",
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/shape_recognition.py {' '.join(sys.argv[1:])}`",
        "",
        f"| grid | confident tiles | entropy of kinds (bits) | confident tiles per kind ({' / '.join(KINDS)}) |",
        "|---|---:|---:|---|",
        *rows,
    ]
    publish(args, "\n".join(lines))


if __name__ == "__main__":
    main()
