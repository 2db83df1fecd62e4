"""Where the seconds of a no-op `TorchTrainer.fit()` go, before anything Ray-side is tuned.

A worker function that does nothing is fitted a few times on one local Ray instance. From the worker
process's creation time (psutil) and timestamps the function writes, each fit splits into: `fit()` until
the worker actor's process exists (the controller actor, in one of Ray's pooled worker processes,
imports Ray Train, reserves the placement group and starts the worker), the worker process booting
until the function runs (Ray's worker, the imports of Ray Train and torch, the torch process group),
and the wind-down after the function returns. The cold imports a new process pays are timed on their
own, each in a fresh interpreter.

    .venv/bin/python bench/trainer_startup.py --fits 3
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
from common import machine, publish, results_arguments
from ray.train import RunConfig
from ray.train.torch import TorchTrainer

from components.training.ray_train import REPORT_POLL_ENV, Scaling, collect_reports_promptly

RESULTS = Path(__file__).with_name("RESULTS-trainer-startup.md")
COLD_IMPORTS = ("import ray", "import torch", "import ray.train.torch")


def _noop_worker(config: dict) -> None:
    """Record when this process was created and when the function ran."""
    entered = time.time()
    record = {"worker_created": psutil.Process().create_time(), "entered": entered, "left": time.time()}
    Path(config["out"]).write_text(json.dumps(record))


def one_fit(work: Path, number: int) -> dict[str, float]:
    out = work / f"fit-{number}.json"
    trainer = TorchTrainer(
        _noop_worker,
        train_loop_config={"out": str(out)},
        scaling_config=Scaling(workers=1, gpus_per_worker=0).scaling_config(),
        run_config=RunConfig(name=f"noop-{number}", storage_path=str(work / "ray")),
    )
    busy_before = machine_busy_seconds()
    called = time.time()
    trainer.fit()
    returned = time.time()
    busy = machine_busy_seconds() - busy_before
    record = json.loads(out.read_text())
    return {
        "fit() to the worker actor's process": record["worker_created"] - called,
        "worker process to the function": record["entered"] - record["worker_created"],
        "function's end to fit() returning": returned - record["left"],
        "whole fit()": returned - called,
        "CPU seconds the machine spent during fit() (all processes)": busy,
    }


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far (not idle, not waiting on I/O)."""
    cpu = psutil.cpu_times()
    return sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)


def cold_import_seconds(statement: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fits", type=int, default=3, help="no-op fits on one Ray instance")
    results_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    collect_reports_promptly()

    imports = {statement: cold_import_seconds(statement) for statement in COLD_IMPORTS}
    with tempfile.TemporaryDirectory(prefix="genpipe-bench-") as tmp:
        started = time.time()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.time() - started
        try:
            fits = [one_fit(Path(tmp), number) for number in range(args.fits)]
        finally:
            ray.shutdown()

    phases = list(fits[0])
    fit_table = "\n".join(
        [
            "| phase | " + " | ".join(f"fit {n + 1} s" for n in range(len(fits))) + " |",
            "|---|" + "---:|" * len(fits),
            *(f"| {phase} | " + " | ".join(f"{fit[phase]:.2f}" for fit in fits) + " |" for phase in phases),
        ]
    )
    import_table = "\n".join(
        [
            "| in a fresh interpreter | seconds |",
            "|---|---:|",
            *(f"| `{statement}` | {seconds:.2f} |" for statement, seconds in imports.items()),
            f"| `ray.init` of a local 2-CPU instance | {ray_start:.2f} |",
        ]
    )
    command = shlex.join(
        [".venv/bin/python", "bench/trainer_startup.py", *(argv if argv is not None else sys.argv[1:])]
    )
    report = (
        "# Where a no-op TorchTrainer.fit() spends its time\n\n"
        f"One Ray Train V2 worker (CPU), a worker function that only records timestamps; "
        f"{REPORT_POLL_ENV}={os.environ[REPORT_POLL_ENV]}. Phases from the worker process's creation time.\n\n"
        f"Machine: {machine()}.\nCommand: `{command}`\n\n{fit_table}\n\n{import_table}\n"
    )
    publish(args, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
