"""Benchmark what live progress costs training: throughput with rank 0 posting progress and without.

One Ray Train worker (as `train_on_ray` runs it) trains one family several times in a row, alternating
between a `RayContext` that posts `TrainProgress` to a `ProgressInbox` (read by the driver every
0.5 s, as `genpipe run` does) and one that posts nothing; the order alternates each round, so a shared
machine's changing load hits both alike. With nothing posted the trainer still reads the clock once a
step, so the same worker also times that read and one post on their own, for the cost of all of it:

    overhead = (post + loss read) / PROGRESS_INTERVAL_S + clock read x steps/s

    .venv/bin/python bench/progress_cost.py                     # vae, ~2 minutes on 2 CPU cores
    .venv/bin/python bench/progress_cost.py --family gan --epochs 40 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
import torch
from common import machine, prepared_in, publish, results_arguments
from ray.train import RunConfig
from ray.train.torch import TorchTrainer
from scaling import FreshContext  # a RayContext in which every training starts afresh

from components.cluster import progress_feed
from components.data.raw import builtin_digits
from components.models import create_model
from components.models.factory import list_models, model_class
from components.training.ray_train import Scaling
from components.training.trainer import PROGRESS_INTERVAL_S, TrainJob, TrainProgress, run_training

RESULTS = Path(__file__).with_name("RESULTS-progress-cost.md")


def _worker(config: dict) -> None:
    train, val = ray.get(config["train"]), ray.get(config["val"])
    job = TrainJob(**config["job"])
    poster = config["progress_poster"]
    seconds: dict[str, list[float]] = {"on": [], "off": []}
    for round_index in range(config["rounds"]):
        order = ("off", "on") if round_index % 2 == 0 else ("on", "off")
        for mode in order:
            context = FreshContext(poster if mode == "on" else None)
            started = time.perf_counter()
            run_training(job, train, val, context)
            seconds[mode].append(time.perf_counter() - started)
    reads = 200_000
    started = time.perf_counter()
    for _ in range(reads):
        time.monotonic()
    clock_s = (time.perf_counter() - started) / reads
    update = asdict(TrainProgress(10, 20, 1, 1, 0.5, 1000.0))
    posts = 2_000
    started = time.perf_counter()
    for _ in range(posts):
        poster.post(update)
    post_s = (time.perf_counter() - started) / posts
    loss = torch.ones((), requires_grad=True) * 2
    started = time.perf_counter()
    for _ in range(posts):
        float(loss.detach())
    read_s = (time.perf_counter() - started) / posts
    record = {"seconds": seconds, "clock_s": clock_s, "post_s": post_s, "loss_read_s": read_s}
    Path(config["out"]).write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="vae", choices=list_models())
    parser.add_argument("--epochs", type=int, default=60, help="per training: long enough for many posts")
    parser.add_argument("--rounds", type=int, default=3, help="trainings with progress, and as many without")
    parser.add_argument("--batch-size", type=int, default=64)
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    load_at_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="genpipe-progress-cost-") as tmp:
        work = Path(tmp)
        data = prepared_in(work, builtin_digits())
        spec = create_model(args.family, data.image_shape).spec
        binary = model_class(args.family).data_kind_for(spec.image_shape, spec.hparams) == "binary"
        val = data.val.binary.astype(np.float32) if binary else data.val.images
        job = TrainJob(
            spec.to_dict(),
            args.epochs,
            args.batch_size,
            1e-3,
            checkpoint_every_steps=0,
            seed=0,
            precision="auto",
            compile=False,
            sample_every_epochs=0,
        )
        ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
        received: list[TrainProgress] = []
        try:
            with progress_feed(received.append, TrainProgress) as poster:
                TorchTrainer(
                    _worker,
                    train_loop_config={
                        "job": asdict(job),
                        "train": ray.put(data.train.images),
                        "val": ray.put(val),
                        "rounds": args.rounds,
                        "out": str(work / "record.json"),
                        "progress_poster": poster,
                    },
                    scaling_config=Scaling(workers=1, gpus_per_worker=0).scaling_config(),
                    run_config=RunConfig(name="progress-cost", storage_path=str(work / "ray")),
                ).fit()
        finally:
            ray.shutdown()
        record = json.loads((work / "record.json").read_text())

    steps = math.ceil(len(data.train) / args.batch_size) * args.epochs
    images = len(data.train) * args.epochs
    rate = {mode: [images / s for s in seconds] for mode, seconds in record["seconds"].items()}
    median = {mode: statistics.median(rates) for mode, rates in rate.items()}
    measured = 100 * (median["off"] - median["on"]) / median["off"]
    steps_per_s = steps / statistics.median(record["seconds"]["off"])
    per_second = (record["post_s"] + record["loss_read_s"]) / PROGRESS_INTERVAL_S
    estimated = 100 * (per_second + record["clock_s"] * steps_per_s)
    rows = [
        "| progress | images/s, median | runs (images/s) |",
        "|---|---:|---|",
        *(
            f"| {mode} | {median[mode]:,.0f} | {', '.join(f'{r:,.0f}' for r in rate[mode])} |"
            for mode in ("off", "on")
        ),
    ]
    report = "\n".join(
        [
            "# What live progress costs training",
            "",
            f"Family `{args.family}` (default hyper-parameters), built-in digits ({len(data.train)} training "
            f"images), batch {args.batch_size}, {args.epochs} epochs ({steps} steps) per training, one Ray "
            f"Train worker on 1 torch thread; {args.rounds} trainings with progress and {args.rounds} without, "
            "alternating. Progress: rank 0 posts a record every "
            f"{PROGRESS_INTERVAL_S:g} s; the driver received {len(received)} of them.",
            "",
            f"Machine: {machine()}; 1-minute load average {load_at_start:.1f} at the start "
            "(other jobs share this machine).",
            f"Command: `.venv/bin/python bench/progress_cost.py {' '.join(sys.argv[1:])}`".rstrip(),
            "",
            *rows,
            "",
            "| cost, measured in the worker | value |",
            "|---|---:|",
            f"| one clock read (every step) | {record['clock_s'] * 1e9:,.0f} ns |",
            f"| one post to the inbox (every {PROGRESS_INTERVAL_S:g} s) | {record['post_s'] * 1e6:,.0f} µs |",
            f"| one loss read (every {PROGRESS_INTERVAL_S:g} s) | {record['loss_read_s'] * 1e6:,.1f} µs |",
            f"| overhead from these costs, at {steps_per_s:,.0f} steps/s | {estimated:.4f} % |",
            f"| overhead measured end to end (off - on) / off | {measured:+.1f} % |",
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
