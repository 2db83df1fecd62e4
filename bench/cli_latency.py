"""Benchmark the read-only commands' latency: wall time of `genpipe --help`, `models`, `status`, `lineage`.

Each command runs as a new process (`python -m flows.cli ...`, as a user's shell starts `genpipe`)
against a project whose SQLite registry holds one champion version. Several checkouts can be
measured side by side (`--checkout before=/path/to/old/checkout`); their runs are interleaved, so a
shared machine's changing load hits them alike. Reported: the median of `--repeat` runs (and the
range) of wall time, and of CPU time, which a loaded machine inflates less.

    .venv/bin/python bench/cli_latency.py                                  # this checkout
    .venv/bin/python bench/cli_latency.py --checkout before=../main --checkout after=.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, publish, results_arguments

HERE = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS-cli-latency.md")
MODEL, VERSION = "digits.vae", "1"
REPEATED, GENPIPE_WRITE, OTHER_WRITE = "repeated", "genpipe write", "other write"


def registry_project(directory: Path):
    """A project (params.yaml) whose SQLite registry holds `MODEL` v`VERSION` as champion, with lineage
    tags; returns the client that wrote it."""
    from components.registry.store import client_for, resolve_tracking_uri

    shutil.copy(HERE / "params.yaml", directory / "params.yaml")
    client = client_for(resolve_tracking_uri(None, directory))
    client.create_registered_model(MODEL)
    version = client.create_model_version(
        MODEL,
        (directory / "weights").as_uri(),
        tags={"primary_metric": "test_nll_bound", "metric.test_nll_bound": "71.3", "data_version": "0" * 32},
    )
    client.set_registered_model_alias(MODEL, "champion", version.version)
    return client


def commands(project: Path) -> dict[str, tuple[list[str], str]]:
    """Each command's arguments, and what happens to the store just before it runs: nothing (the same
    read ran just before: a repeated read), a write by genpipe (which ends by keeping the reads the
    next commands need: `store.keep_reads`), or a write by another program (the MLflow UI, a script)."""
    status, lineage = ["status", "-C", str(project)], ["lineage", MODEL, VERSION, "-C", str(project)]
    return {
        "genpipe --help": (["--help"], REPEATED),
        "genpipe models": (["models"], REPEATED),
        "genpipe status, store unchanged since the last read": (status, REPEATED),
        "genpipe status, first read after a genpipe write": (status, GENPIPE_WRITE),
        "genpipe status, first read after another program's write": (status, OTHER_WRITE),
        "genpipe lineage, store unchanged since the last read": (lineage, REPEATED),
        "genpipe lineage, first read after a genpipe write": (lineage, GENPIPE_WRITE),
        "genpipe lineage, first read after another program's write": (lineage, OTHER_WRITE),
    }


def timed(checkout: Path, arguments: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of `python -m flows.cli <arguments>` run from `checkout`."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments],
        cwd=checkout,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "200"},
    )
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkout",
        action="append",
        metavar="LABEL=DIR",
        help="a checkout to measure (repeatable); default: this one",
    )
    parser.add_argument("--repeat", type=int, default=5)
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    from components.registry.store import keep_reads, resolve_tracking_uri

    checkouts = dict(item.split("=", 1) for item in args.checkout or [f"this checkout={HERE}"])
    load_at_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="genpipe-cli-latency-") as tmp:
        client = registry_project(Path(tmp))
        uri = resolve_tracking_uri(None, tmp)
        jobs = commands(Path(tmp))
        for label, checkout in checkouts.items():  # one untimed run each: byte-compiles, warms the page cache
            for arguments, _ in jobs.values():
                timed(Path(checkout), arguments)
            print(f"warmed up {label}", file=sys.stderr)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.repeat):
            for command, (arguments, before) in jobs.items():
                for label, checkout in checkouts.items():
                    if before == REPEATED:  # the same read just before, untimed
                        timed(Path(checkout), arguments)
                    else:
                        client.set_registered_model_tag(MODEL, "bench_round", f"{round_} {label} {command}")
                    if before == GENPIPE_WRITE:  # what the flow, promote and rollback end with
                        keep_reads(uri, [(MODEL, VERSION)])
                    times.setdefault((command, label), []).append(timed(Path(checkout), arguments))

    header = "| command | " + " | ".join(
        f"{label}: wall s, median (range) | {label}: CPU s" for label in checkouts
    )
    lines = [header + " |", "|---|" + "---:|---:|" * len(checkouts)]
    for command in jobs:
        cells = []
        for label in checkouts:
            walls, cpus = zip(*times[(command, label)], strict=True)
            cells.append(f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})")
            cells.append(f"{statistics.median(cpus):.2f}")
        lines.append(f"| `{command}` | " + " | ".join(cells) + " |")
    report = "\n".join(
        [
            "# Latency of the read-only commands",
            "",
            f"Wall and CPU (user + system) time of a new process per command (`python -m flows.cli ...`), "
            f"median of {args.repeat} runs after one warm-up run; a project whose SQLite registry holds one "
            'champion version. "After a write": a registered-model tag is set just before; genpipe\'s own '
            "writes (a run, promote, rollback) end by reading what the next commands ask (`keep_reads`), "
            "another program's do not, so the command has to ask MLflow. Otherwise the same read ran just "
            "before. On a shared machine the CPU time is the steadier figure: a quiet machine's wall time "
            "is close to it.",
            "",
            f"Machine: {machine()}; 1-minute load average {load_at_start:.1f} at the start "
            "(other jobs share this machine).",
            "Checkouts: " + ", ".join(f"{label} = `{path}`" for label, path in checkouts.items()),
            f"Command: `.venv/bin/python bench/cli_latency.py {' '.join(sys.argv[1:])}`",
            "",
            *lines,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
