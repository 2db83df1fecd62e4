"""What every benchmark shares: the data it runs on, the machine it ran on, and its results file."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from components.data.importers import BUILTINS, builtin_dataset, read_dataset
from components.data.prepared import PreparedData, load_prepared, prepare
from components.data.raw import DataError, RawDataset, write_raw
from components.training.trainer import TrainProgress
from flows.progress import stage_line, training_summary

ANALYSIS_HEADING = "## Analysis"
PROGRESS_EVERY_S = 60.0


def data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose what `load_data` loads."""
    parser.add_argument(
        "--data",
        default="digits",
        help=f"a built-in dataset ({', '.join(BUILTINS)}) or an IDX file or folder, .npz or image folder; "
        "default: the built-in digits",
    )
    parser.add_argument("--size", type=int, help="images to render (built-in shapes only)")
    parser.add_argument("--resolution", type=int, help="image side to render (built-in shapes only)")
    parser.add_argument("--max-images", type=int, help="use a random subset of this many images")


def load_data(args: argparse.Namespace, work: Path) -> PreparedData:
    """The dataset `data_arguments` chose, prepared (split, fixed binarised copies) as the pipeline does."""
    try:
        if args.data in BUILTINS:
            raw = builtin_dataset(args.data, size=args.size, resolution=args.resolution)
        elif args.size is not None or args.resolution is not None:
            raise DataError(f"{args.data}: --size and --resolution render a built-in dataset, not a file")
        else:
            raw = read_dataset(Path(args.data))
    except DataError as err:
        raise SystemExit(f"--data: {err}") from err
    if args.max_images is not None and args.max_images < len(raw.images):
        keep = np.random.default_rng(0).permutation(len(raw.images))[: args.max_images]
        labels = None if raw.labels is None else raw.labels[keep]
        raw = RawDataset(raw.images[keep], labels, raw.name, raw.source)
    return prepared_in(work, raw)


def prepared_in(work: Path, raw: RawDataset) -> PreparedData:
    """`raw` written and prepared under `work` as the pipeline's `prepare` stage does, then loaded."""
    write_raw(raw, work / "raw")
    prepare(work / "raw", work / "prepared", 0.1, 0.2, 0)
    return load_prepared(work / "prepared")


def printed_progress(model: str, every_s: float = PROGRESS_EVERY_S) -> Callable[[TrainProgress], None]:
    """An `on_progress` for `LocalContext` that prints where `model`'s training is, as `genpipe run`'s
    plain lines do, at once and then at most every `every_s` seconds: a run of hours says how far it got."""
    printed_at = -math.inf

    def show(update: TrainProgress) -> None:
        nonlocal printed_at
        if time.monotonic() - printed_at >= every_s:
            printed_at = time.monotonic()
            print(stage_line(model, "training", training_summary(update)), flush=True)

    return show


def hyperparameter(setting: str) -> tuple[str, object]:
    """`--hparam KEY=VALUE`: the value read as YAML, so numbers and booleans keep their type."""
    key, sep, value = setting.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{setting!r}: expected KEY=VALUE, e.g. n_critic=2")
    return key, yaml.safe_load(value)


def results_arguments(parser: argparse.ArgumentParser, default: Path) -> None:
    """`--results` (where the report goes) and `--no-write` (print it only)."""
    parser.add_argument(
        "--results",
        type=Path,
        default=default,
        help=f"markdown file for the report (default: {default.name})",
    )
    parser.add_argument("--no-write", action="store_true", help="print the report only; write no file")


def publish(args: argparse.Namespace, report: str) -> None:
    """Print the report and, unless `--no-write`, put it in the results file `results_arguments` chose."""
    print(report)
    if not args.no_write:
        write_results(args.results, report)


def machine() -> str:
    """CPU, cores, torch and Python versions, date and load: the context every figure needs."""
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} using {torch.get_num_threads()} thread(s), "
        f"Python {platform.python_version()}, {datetime.date.today().isoformat()}, "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end"
    )


def write_results(results: Path, report: str) -> None:
    """Replace the measured part of `results`; keep the hand-written analysis below its heading."""
    old = results.read_text() if results.exists() else ""
    analysis = "\n" + old[old.index(ANALYSIS_HEADING) :] if ANALYSIS_HEADING in old else ""
    results.write_text(report + "\n" + analysis)
