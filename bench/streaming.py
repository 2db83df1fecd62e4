"""Benchmark the two ways training gets its data: the split on the device, or streamed through Ray Data.

Throughput (default): steady-state training images/s of one family, fed by each path, in this
process on one torch thread (as a Ray Train worker runs), so the seconds a TorchTrainer start-up
costs (and varies by, on a shared machine) stay out: `run_training` with the on-device source
against the same with the streamed source built exactly as a worker builds it (`streamed_batches`
over the shard dataset, with its prefetch and local shuffle; Ray Data's read tasks run in Ray's
worker processes as in training). Each path trains for 1 and for E epochs; the difference of the
two wall times is the time of epochs 2..E. The paths alternate for `--rounds` rounds; the table
gives the median round.

Memory (`--memory-steps S`): peak resident memory of the driver (this process) and of the largest
Ray process (the training worker, Ray Data's read tasks), RSS and private (USS), and the object
store's pages in /dev/shm, sampled every 0.2 s during one real `train_on_ray` run of one epoch of S
steps (the batch size is the split over S, so runs at N, 4N and 16N images train as many steps).

Data: the built-in digits (default), or `--generated N` random 3x32x32 uint8 images, prepared as
the pipeline does, in shards of `--shard-images`.

    .venv/bin/python bench/streaming.py                                   # digits, ~3 minutes
    .venv/bin/python bench/streaming.py --generated 20000 --memory-steps 200 --family gan
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import ray
import torch
from common import machine

from components.data.prepared import PreparedData, load_prepared, prepare
from components.data.raw import RawDataset, builtin_digits, write_raw
from components.models import create_model
from components.training.jobs import training_splits
from components.training.ray_train import (
    Scaling,
    ray_cluster,
    shard_dataset,
    stream_settings,
    streamed_batches,
    train_on_ray,
)
from components.training.trainer import LocalContext, TrainJob, run_training

RESULTS = Path(__file__).with_name("RESULTS-streaming.md")
PATHS = ("on-device", "streamed")


class PeakMemory:
    """Peaks, sampled in a background thread: this process's RSS; the largest RSS and the largest
    private memory (USS: RSS less the shared pages, such as the object store's blocks a worker has
    mapped) among its descendants that are Ray workers and tasks; and the pages of /dev/shm in use
    (Ray's object store) above what they were at the start."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.driver_peak = self.worker_peak = self.worker_private_peak = self.shared_peak = 0
        self._shared_at_start = shutil.disk_usage("/dev/shm").used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            shared = shutil.disk_usage("/dev/shm").used - self._shared_at_start
            self.shared_peak = max(self.shared_peak, shared)
            for child in me.children(recursive=True):
                try:
                    if " ".join(child.cmdline()).startswith("ray::"):
                        memory = child.memory_full_info()
                        self.worker_peak = max(self.worker_peak, memory.rss)
                        self.worker_private_peak = max(self.worker_private_peak, memory.uss)
                except psutil.Error:  # a task's process may end between listing and reading
                    continue
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def object_store_summary() -> str:
    """What `ray memory --stats-only` says of the connected cluster's object store (use, spilling)."""
    command = [str(Path(sys.executable).parent / "ray"), "memory", "--stats-only"]
    address = ray.get_runtime_context().gcs_address
    reply = subprocess.run([*command, "--address", address], capture_output=True, text=True, timeout=120)
    return reply.stdout if reply.returncode == 0 else f"ray memory failed: {reply.stderr[-500:]}"


def generated(n: int, seed: int = 0) -> RawDataset:
    """`n` random 3x32x32 uint8 images: memory and throughput depend on the size, not the content."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    return RawDataset(images, None, f"generated-{n}", "bench/streaming.py")


def memory_run(job: TrainJob, data: PreparedData, path: str, work: Path) -> float:
    """Seconds of one `train_on_ray` run, as `genpipe run` trains a model."""
    started = time.perf_counter()
    train_on_ray(
        job,
        *training_splits(job, data, streamed=path == "streamed"),
        scaling=Scaling(workers=1, gpus_per_worker=0),
        storage_path=work / "ray",
        run_name=f"memory-{path}",
        output_dir=work / "out" / path,
    )
    return time.perf_counter() - started


def in_process_run(job: TrainJob, data: PreparedData, path: str, epochs: int, work: Path) -> float:
    """Seconds of `run_training` for `epochs` in this process, fed by `path`."""
    job = replace(job, epochs=epochs)
    shutil.rmtree(work / "local", ignore_errors=True)
    ctx = LocalContext(work / "local")
    train, val = training_splits(job, data, streamed=path == "streamed")
    if path == "streamed":
        train = streamed_batches(shard_dataset(train, job.seed), job, stream_settings(train), ctx)
    started = time.perf_counter()
    run_training(job, train, val, ctx)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="ae")
    parser.add_argument("--generated", type=int, help="random 3x32x32 images instead of the digits")
    parser.add_argument("--shard-images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=6, help="E: the longer run's epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--memory-steps",
        type=int,
        help="measure memory only: one run of one epoch of this many steps (the batch size follows)",
    )
    parser.add_argument(
        "--memory-batch-size",
        type=int,
        help="with --memory-steps: this batch size instead (the epoch then has as many steps as it takes)",
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the throughput runs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to append the table to")
    args = parser.parse_args()

    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as tmp:
        work = Path(tmp)
        write_raw(builtin_digits() if args.generated is None else generated(args.generated), work / "raw")
        prepare(work / "raw", work / "prepared", 0.1, 0.2, 0, args.shard_images)
        meta = load_prepared(work / "prepared")
        name, shape, num_train = meta.name, list(meta.image_shape), len(meta.train)
        if args.memory_steps is None:
            batch_size = args.batch_size
        else:
            batch_size = args.memory_batch_size or math.ceil(num_train / args.memory_steps)
        steps_per_epoch = math.ceil(num_train / batch_size)
        epochs = 1 if args.memory_steps else args.epochs
        spec = create_model(args.family, meta.image_shape).spec
        job = TrainJob(
            model=spec.to_dict(),
            epochs=epochs,
            batch_size=batch_size,
            lr=1e-3,
            seed=0,
            precision="auto",
            checkpoint_every_steps=500,
            compile=False,
            sample_every_epochs=0,
        )
        del meta
        rows: list[str] = []
        summaries: dict[str, str] = {}
        with ray_cluster():
            if args.memory_steps:
                for path in args.paths:
                    data = load_prepared(work / "prepared")  # afresh: no split one path read stays cached
                    with PeakMemory() as memory:
                        seconds = memory_run(job, data, path, work)
                    del data
                    summaries[path] = object_store_summary()
                    rows.append(
                        f"| {path} | {seconds:.1f} | | {memory.driver_peak / mib:,.0f} | {memory.worker_peak / mib:,.0f}"
                        f" | {memory.worker_private_peak / mib:,.0f} | {memory.shared_peak / mib:,.0f} |"
                    )
                    print(rows[-1], flush=True)
            else:
                torch.set_num_threads(1)
                data = load_prepared(work / "prepared")
                rounds: dict[str, list[tuple[float, float]]] = {path: [] for path in args.paths}
                for _ in range(args.rounds):
                    for path in args.paths:
                        rounds[path].append(
                            (
                                in_process_run(job, data, path, 1, work),
                                in_process_run(job, data, path, epochs, work),
                            )
                        )
                        print(path, rounds[path][-1], flush=True)
                images = (epochs - 1) * num_train
                for path, times in rounds.items():
                    short, long = sorted(times, key=lambda t: t[1] - t[0])[len(times) // 2]
                    rows.append(
                        f"| {path} | {short:.2f} | {long:.2f} | {images / (long - short):,.0f} | | | |"
                    )

    table = [
        f"### {name} {shape}: {num_train:,} training images, {args.family}, batch {batch_size}, "
        + (
            f"one `train_on_ray` run (1 worker) of one epoch of {steps_per_epoch} steps"
            if args.memory_steps
            else f"E = {epochs}, in this process on 1 thread, median of {args.rounds} rounds"
        ),
        "",
        f"Machine: {machine()}.",
        f"Command: `.venv/bin/python bench/streaming.py {' '.join(sys.argv[1:])}`",
        "",
        (
            "| path | run s | | driver peak RSS MiB | largest Ray process peak RSS MiB"
            " | largest Ray process peak USS MiB | object store (/dev/shm) peak MiB |"
            if args.memory_steps
            else "| path | 1-epoch run s | E-epoch run s | steady images/s | | | |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *(
            f"`ray memory --stats-only` after the {path} run:\n\n```\n{summary.strip()}\n```\n"
            for path, summary in summaries.items()
        ),
    ]
    print("\n".join(table))
    with args.results.open("a") as out:
        out.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
