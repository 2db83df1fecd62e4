"""Benchmark whether the built-in colour shapes are learnable: the featurizer's validation accuracy on
their shape-kind labels, as the `featurize` stage trains it (params.yaml's featurizer settings).

The featurizer is what FID/KID are measured with, so a featurizer at chance would make every
sample-quality score on this dataset meaningless. Rendered, split and trained here; nothing is kept.

    .venv/bin/python bench/featurizer_learnability.py --size 2500 --resolution 32 --epochs 10 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import machine, publish, results_arguments

from components.data.prepared import prepare
from components.data.raw import write_raw
from components.data.shapes import KINDS, render_shapes
from components.evaluation.featurizer import train_featurizer

HERE = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS-featurizer-learnability.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2500)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 30])
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    params = yaml.safe_load((HERE / "params.yaml").read_text())
    settings, data = params["featurizer"], params["data"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="genpipe-learnability-") as tmp:
        root = Path(tmp)
        write_raw(render_shapes(args.size, args.resolution, seed=0), root / "raw")
        prepare(root / "raw", root / "prepared", data["val_fraction"], data["test_fraction"], params["seed"])
        for epochs in args.epochs:
            started = time.perf_counter()
            config = train_featurizer(
                root / "prepared",
                root / f"featurizer-{epochs}",
                feature_dim=settings["feature_dim"],
                epochs=epochs,
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                seed=0,
            )
            seconds = time.perf_counter() - started
            rows.append(f"| {epochs} | {config['val_accuracy']:.3f} | {seconds:.0f} |")
            print(rows[-1], file=sys.stderr)
    report = "\n".join(
        [
            "# Learnability of the built-in colour shapes",
            "",
            f"Validation accuracy of the featurizer on the shape kind of {args.size} rendered shapes at "
            f"{args.resolution}x{args.resolution} (splits as params.yaml's `data`, the featurizer's batch size, "
            f"learning rate and width from params.yaml; one thread). Chance: {1 / len(KINDS):.3f} "
            f"({len(KINDS)} kinds).",
            "",
            f"Machine: {machine()}",
            f"Command: `.venv/bin/python bench/featurizer_learnability.py {' '.join(sys.argv[1:])}`",
            "",
            "| epochs | validation accuracy | train seconds |",
            "|---:|---:|---:|",
            *rows,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
