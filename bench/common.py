"""What every benchmark shares: the data it runs on, the machine it ran on, and its results file."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import numpy as np
import torch

from components.data.importers import read_dataset
from components.data.prepared import PreparedData, load_prepared, prepare
from components.data.raw import DataError, RawDataset, builtin_digits, write_raw

ANALYSIS_HEADING = "## Analysis"


def data_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose what `load_data` loads."""
    parser.add_argument(
        "--data", help="IDX file or folder (or .npz / image folder); default: built-in digits"
    )
    parser.add_argument("--max-images", type=int, help="use a random subset of this many images")


def load_data(path: str | None, max_images: int | None, work: Path) -> PreparedData:
    """The built-in digits, or the dataset at `path` (IDX, .npz or images), prepared as the pipeline does."""
    try:
        raw = builtin_digits() if path is None else read_dataset(Path(path))
    except DataError as err:
        raise SystemExit(f"--data: {err}") from err
    if max_images is not None and max_images < len(raw.images):
        keep = np.random.default_rng(0).permutation(len(raw.images))[:max_images]
        labels = None if raw.labels is None else raw.labels[keep]
        raw = RawDataset(raw.images[keep], labels, raw.name, raw.source)
    write_raw(raw, work / "raw")
    prepare(work / "raw", work / "prepared", 0.1, 0.2, 0)
    return load_prepared(work / "prepared")


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
