"""Benchmark sampling time of the exact-likelihood families: seconds to draw `--samples` images.

Sampling is what dominates their evaluation (FID/KID needs `evaluate.num_samples` samples, drawn one
sub-pixel after another). Each family is built with its defaults at `--shape`, untrained (the cost of
a draw does not depend on the weights), on one thread, and timed per checkout; several checkouts
can be measured side by side (`--checkout before=../old`), each in a process of its own.

    .venv/bin/python bench/sampling_time.py --shape 1x28x28 --samples 100
    .venv/bin/python bench/sampling_time.py --checkout before=/tmp/before --checkout after=.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import machine, publish, results_arguments

HERE = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS-sampling.md")
FAMILIES = ("fvsbn", "nade", "made", "pixelcnn", "pixelrnn")

TIME_ONE = """
import json, sys, time, torch
torch.set_num_threads(1)
from components.models import create_model
family, shape, samples = sys.argv[1], tuple(json.loads(sys.argv[2])), int(sys.argv[3])
model = create_model(family, shape).eval()
started = time.perf_counter()
with torch.no_grad():
    model.sample(samples, generator=torch.Generator().manual_seed(0))
print(time.perf_counter() - started)
"""


def seconds(checkout: Path, family: str, shape: tuple[int, ...], samples: int) -> float:
    command = [sys.executable, "-c", TIME_ONE, family, json.dumps(shape), str(samples)]
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", metavar="LABEL=DIR", help="default: this one")
    parser.add_argument("--shape", default="1x28x28", help="C x H x W, e.g. 3x32x32")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated; default: all five")
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    checkouts = dict(item.split("=", 1) for item in args.checkout or [f"this checkout={HERE}"])
    shape = tuple(int(side) for side in args.shape.split("x"))
    rows = []
    for family in args.families.split(","):
        cells = [f"{seconds(Path(path), family, shape, args.samples):.1f}" for path in checkouts.values()]
        rows.append(f"| {family} | " + " | ".join(cells) + " |")
        print(rows[-1], file=sys.stderr)
    report = "\n".join(
        [
            "# Sampling time of the exact-likelihood families",
            "",
            f"Seconds to draw {args.samples} images of {args.shape} from each family with its default "
            "hyper-parameters (untrained, one thread, batch of all samples at once).",
            "",
            f"Machine: {machine()}",
            "Checkouts: " + ", ".join(f"{label} = `{path}`" for label, path in checkouts.items()),
            f"Command: `.venv/bin/python bench/sampling_time.py {' '.join(sys.argv[1:])}`",
            "",
            "| family | " + " | ".join(f"{label}: s" for label in checkouts) + " |",
            "|---|" + "---:|" * len(checkouts),
            *rows,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
