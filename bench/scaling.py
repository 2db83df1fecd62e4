"""Benchmark training throughput: a plain PyTorch loop against genpipe's trainer on 1 and 2 Ray workers.

For every registered family (default hyper-parameters, built-in 8x8 digits, batch 64 per worker),
it measures training samples/s in the steady state, after start-up:

  (a) the minimal loop over the same model and batch: forward(x, phase), backward, step, nothing else;
  (b) genpipe's `run_training` under Ray Train with one worker, as `train_on_ray` runs it;
  (c) the same with two workers (DDP over gloo, one CPU each; global batch = 2 x 64).

(b) and (c) train every family one after the other inside one Ray Train run, twice: for one epoch and
for E epochs; their difference is the time of epochs 2..E, which leaves model building, the first
epoch and the final checkpoint out. (a) runs in the same worker process just before and just after
(b), on the same single torch thread, so a shared machine's changing load hits both alike; it touches
no Ray; its throughput is that of the median epoch of 2..E of both runs. The fixed costs are reported separately: Ray's start-up, and a TorchTrainer
run's cost before the worker function starts and after it ends.
(b) pays for what the trainer does besides the minimal loop: dynamic binarisation, the per-epoch
metrics all-reduce and validation on rank 0 (it reports to Ray only with checkpoints).

    .venv/bin/python bench/scaling.py                       # all families: ~4 minutes on 2 CPU cores
    .venv/bin/python bench/scaling.py --families vae gan --report-poll-s 2.0   # Ray's default polling
    .venv/bin/python bench/scaling.py --families vae gan dcgan made --repeat 8  # 8x longer epochs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import ray
import torch

from components.data.prepared import PreparedData, load_prepared, prepare
from components.data.raw import builtin_digits, write_raw
from components.models import create_model
from components.models.factory import list_models, model_class
from components.training.ray_train import REPORT_POLL_ENV, RayContext, Scaling, collect_reports_promptly
from components.training.trainer import TrainJob, run_training

RESULTS = Path(__file__).with_name("RESULTS-scaling.md")
ANALYSIS_HEADING = "## Analysis"
LR = 1e-3


class FreshContext(RayContext):
    """`RayContext` in which every training starts afresh."""

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        # Ray hands back the last checkpoint this run reported, i.e. the previous family's: start afresh.
        return nullcontext(None)


def median_rate(samples_per_epoch: int, epoch_seconds: list[float]) -> float:
    """Samples/s of the median epoch."""
    return samples_per_epoch / float(np.median(epoch_seconds))


def plain_loop(family: str, x: np.ndarray, epochs: int, batch_size: int) -> list[float]:
    """Seconds of epochs 2..E of the minimal loop (data already binarised for binary families)."""
    torch.manual_seed(0)
    model = create_model(family, x.shape[1:])
    optimizers = model.configure_optimizers(LR)
    x = torch.from_numpy(x)
    step, ends = 0, []
    for _ in range(epochs):
        for batch in x[torch.randperm(len(x))].split(batch_size):
            for phase in model.phase_schedule(step):
                optimizers[phase].zero_grad(set_to_none=True)
                model(batch, phase)["loss"].backward()
                optimizers[phase].step()
                model.after_optimizer_step(phase)
            step += 1
        ends.append(time.perf_counter())
    return np.diff(ends).tolist()


def _bench_worker(config: dict) -> None:
    """Per family: genpipe's trainer, between two plain loops in the one-worker run (so that a change
    of the machine's load hits both alike); rank 0 writes the rates."""
    entered = time.time()
    data = {key: ray.get(ref) for key, ref in config["data"].items()}
    train = data["train"]
    plain, trainer, ctx = {}, {}, None
    for family in config["families"]:
        binary = model_class(family).data_kind_for(train.shape[1:], {}) == "binary"
        ctx = FreshContext()
        x = data["train_binary"] if binary else train
        plain_seconds = (
            plain_loop(family, x, config["epochs"], config["batch_size"]) if ctx.world_size == 1 else []
        )
        spec = create_model(family, train.shape[1:]).spec
        job = TrainJob(
            model=spec.to_dict(),
            epochs=config["epochs"],
            batch_size=config["batch_size"],
            lr=LR,
            checkpoint_every_steps=0,
            seed=0,
            precision="auto",
            compile=False,
            sample_every_epochs=0,
        )
        val = data["val_binary"] if binary else data["val"]
        seconds = {}
        for epochs in (1, config["epochs"]):
            started = time.perf_counter()
            run_training(replace(job, epochs=epochs), train, val, ctx)
            seconds[epochs] = time.perf_counter() - started
        shard = math.ceil(len(train) / ctx.world_size)  # DistributedSampler pads to equal shards
        later_epochs = seconds[config["epochs"]] - seconds[1]
        trainer[family] = (config["epochs"] - 1) * ctx.world_size * shard / later_epochs
        if plain_seconds:
            plain_seconds += plain_loop(family, x, config["epochs"], config["batch_size"])
            plain[family] = median_rate(len(x), plain_seconds)
    if ctx is not None and ctx.rank == 0:
        record = {
            "entered": entered,
            "left": time.time(),
            "threads": torch.get_num_threads(),
            "plain": plain,
            "trainer": trainer,
        }
        Path(config["out"]).write_text(json.dumps(record))


def ray_run(data: PreparedData, families: list[str], workers: int, epochs: int, batch_size: int, work: Path):
    """One TorchTrainer run over all families: the worker's record, plus the run's start-up and wind-down
    seconds (from `fit()` to the worker function, and from its end to `fit()` returning)."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    out = work / f"workers-{workers}.json"
    arrays = {
        "train": data.train.images,
        "train_binary": data.train.binary.astype(np.float32),
        "val": data.val.images,
        "val_binary": data.val.binary.astype(np.float32),
    }
    trainer = TorchTrainer(
        _bench_worker,
        train_loop_config={
            "families": families,
            "epochs": epochs,
            "batch_size": batch_size,
            "data": {key: ray.put(array) for key, array in arrays.items()},
            "out": str(out),
        },
        scaling_config=Scaling(workers=workers, gpus_per_worker=0).scaling_config(),
        run_config=RunConfig(
            name=f"bench-{workers}",
            storage_path=str(work / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    started = time.time()
    trainer.fit()
    finished = time.time()
    record = json.loads(out.read_text())
    return record, record["entered"] - started, finished - record["left"]


def digits(work: Path) -> PreparedData:
    write_raw(builtin_digits(), work / "raw")
    prepare(work / "raw", work / "prepared", 0.1, 0.2, 0)
    return load_prepared(work / "prepared")


def machine() -> str:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}, "
        f"Python {platform.python_version()}, {datetime.date.today().isoformat()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--epochs", type=int, default=5, help="per family; the first one is warm-up")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--repeat", type=int, default=1, help="tile the training split: longer epochs")
    parser.add_argument("--report-poll-s", type=float, help=f"sets {REPORT_POLL_ENV} (Ray's default: 2)")
    parser.add_argument("--no-write", action="store_true", help=f"print only, do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    if args.epochs < 3:
        parser.error("--epochs must be >= 3: the first epoch is warm-up")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if args.report_poll_s is not None:
        os.environ[REPORT_POLL_ENV] = str(args.report_poll_s)
    collect_reports_promptly()  # what train_on_ray does, unless set above
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="genpipe-bench-") as tmp:
        work = Path(tmp)
        data = digits(work)
        data.train.images, data.train.binary = (
            np.tile(a, (args.repeat, 1, 1, 1)) for a in (data.train.images, data.train.binary)
        )
        started = time.time()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        ray_start = time.time() - started
        try:
            runs = {n: ray_run(data, args.families, n, args.epochs, args.batch_size, work) for n in (1, 2)}
        finally:
            ray.shutdown()

    plain, one, two = runs[1][0]["plain"], runs[1][0]["trainer"], runs[2][0]["trainer"]
    rows = [
        f"| {f} | {plain[f]:,.0f} | {one[f]:,.0f} | {two[f]:,.0f} | {one[f] / plain[f]:.2f} "
        f"| {two[f] / (2 * one[f]):.2f} |"
        for f in args.families
    ]
    b_over_a = np.median([one[f] / plain[f] for f in args.families])
    efficiency = np.median([two[f] / (2 * one[f]) for f in args.families])
    table = "\n".join(
        [
            "| family | (a) plain loop samples/s | (b) genpipe, 1 Ray worker | (c) genpipe, 2 Ray workers "
            "| (b)/(a) | efficiency (c)/(2b) |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            f"| median | | | | {b_over_a:.2f} | {efficiency:.2f} |",
        ]
    )
    fixed = "\n".join(
        [
            "| fixed cost | seconds |",
            "|---|---:|",
            f"| `ray.init` of a local 2-CPU instance | {ray_start:.1f} |",
            *(
                f"| TorchTrainer run, {n} worker(s): `fit()` to the worker function | {runs[n][1]:.1f} |"
                for n in (1, 2)
            ),
            *(
                f"| TorchTrainer run, {n} worker(s): worker function's end to `fit()` returning | {runs[n][2]:.1f} |"
                for n in (1, 2)
            ),
        ]
    )
    command = shlex.join(
        [".venv/bin/python", "bench/scaling.py", *(argv if argv is not None else sys.argv[1:])]
    )
    header = (
        f"Dataset: digits (1x8x8, {len(data.train)} training images"
        f"{f', the split tiled {args.repeat} times' if args.repeat > 1 else ''}); default hyper-parameters; batch "
        f"{args.batch_size} per worker; {args.epochs} epochs per family, the first one warm-up; "
        f"samples/s of the median epoch of 2..{args.epochs} ((a): of two runs, before and after (b)).\n"
        f"Ray Train V2 with {REPORT_POLL_ENV}={os.environ[REPORT_POLL_ENV]}; every measurement on "
        f"{runs[1][0]['threads']} torch thread(s) per process.\n\n"
        f"Machine: {machine()}; 1-minute load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (other jobs share this machine).\n"
        f"Command: `{command}`"
    )
    print("\n" + header + "\n\n" + table + "\n\n" + fixed)
    if not args.no_write:
        previous = RESULTS.read_text() if RESULTS.is_file() else ""
        analysis = previous[previous.index(ANALYSIS_HEADING) :] if ANALYSIS_HEADING in previous else ""
        title = "# Training throughput: plain loop vs genpipe on 1 and 2 Ray workers"
        RESULTS.write_text(f"{title}\n\n{header}\n\n{table}\n\n{fixed}\n\n{analysis}".rstrip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
