"""The GPU path, run: every family one short epoch on the built-in colour shapes with bf16 autocast and
channels-last, `torch.compile` on one convolutional family, genpipe's Ray worker against a plain
PyTorch loop on the same device, and each family's peak memory.

Everything runs in one Ray Train run with one worker holding one GPU, so genpipe's trainer meets the
GPU exactly as `genpipe run` would (device from Ray, `precision: bf16`, channels-last on CUDA,
`compile` for the chosen family). Per family, in that worker:

  (a) a plain loop over the same model: channels-last, bf16 autocast, forward(x, phase), backward,
      step, nothing else; images/s over the epoch after one warm-up epoch;
  (b) genpipe's `run_training` for 1 epoch (untimed: one-time costs), then timed for 1 epoch and for
      3; images/s of epochs 2-3 from the difference
      (model building, compilation, the first epoch and the final checkpoint left out; the per-epoch
      validation counted, as a run pays it); none when the difference is within the timing noise;
  peak memory: CUDA's peak allocated bytes over (a) and (b) (on CPU the worker's RSS high-water
  mark, which never goes down, so only its growth means something).

It writes bench/RESULTS-gpu.md with the device's name. `--cpu` runs the same steps on CPU as a
rehearsal (bf16 autocast runs on CPU too; channels-last is CUDA-only in the trainer) and writes
nothing unless `--results` is given.

    .venv/bin/python bench/gpu_check.py                            # one GPU: under 8 minutes
    .venv/bin/python bench/gpu_check.py --cpu --size 256 --families ae dcgan made
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import machine, prepared_in, publish
from scaling import FreshContext  # a RayContext in which every training starts afresh

from components.data.prepared import PreparedData
from components.data.shapes import render_shapes
from components.models import create_model
from components.models.factory import list_models, model_class
from components.training.ray_train import Scaling, collect_reports_promptly
from components.training.trainer import TrainJob, resolve_precision, run_training

RESULTS = Path(__file__).with_name("RESULTS-gpu.md")
LR = 1e-3
COMPILED_FAMILY = "dcgan"
TIMED_EPOCHS = 2  # genpipe's rate comes from a run this many epochs longer than a 1-epoch run


def epoch_rate(images: int, extra_seconds: float) -> float | None:
    """Images/s of the `TIMED_EPOCHS` extra epochs; None where they took no measurable time (tiny data)."""
    return TIMED_EPOCHS * images / extra_seconds if extra_seconds > 0.01 else None


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def plain_loop(family: str, x: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Images/s of the second epoch of the minimal bf16, channels-last loop (the first warms up)."""
    torch.manual_seed(0)
    model = create_model(family, tuple(x.shape[1:])).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    binary = model.data_kind == "binary"
    optimizers = model.configure_optimizers(LR)
    step, seconds = 0, 0.0
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for batch in x[torch.randperm(len(x), device=x.device)].split(batch_size):
            if binary:
                batch = torch.bernoulli(batch)  # as the trainer does: a fresh binarisation per epoch
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            for phase in model.phase_schedule(step):
                optimizers[phase].zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = model(batch, phase)["loss"]
                loss.backward()
                optimizers[phase].step()
                model.after_optimizer_step(phase)
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    return len(x) / seconds


def _check_worker(config: dict) -> None:
    """Per family: the plain loop, then genpipe's trainer for 1 and 2 epochs; writes the figures."""
    train = ray.get(config["train"])
    val = {kind: ray.get(ref) for kind, ref in config["val"].items()}
    rows = {}
    for family in config["families"]:
        ctx = FreshContext()
        device = ctx.device
        peak_memory_reset(device)
        plain = plain_loop(family, torch.from_numpy(train).to(device), config["batch_size"], device)
        kind = model_class(family).data_kind_for(train.shape[1:], {})
        job = TrainJob(
            model=create_model(family, train.shape[1:]).spec.to_dict(),
            epochs=1,
            batch_size=config["batch_size"],
            lr=LR,
            seed=0,
            checkpoint_every_steps=0,
            precision="bf16",
            compile=family == config["compiled"],
            sample_every_epochs=0,
        )
        seconds = {}
        # The first run pays the one-time costs (kernel selection, torch.compile filling its cache)
        # that the two timed runs would otherwise pay unequally.
        for run, epochs in (("first", 1), ("short", 1), ("long", TIMED_EPOCHS + 1)):
            started = time.perf_counter()
            run_training(
                dataclasses.replace(job, epochs=epochs),
                train,
                val["binary" if kind == "binary" else "continuous"],
                ctx,
            )
            seconds[run] = time.perf_counter() - started
        rows[family] = {
            "plain": plain,
            "genpipe": epoch_rate(len(train), seconds["long"] - seconds["short"]),
            "first_run_s": seconds["first"],
            "peak_mib": peak_memory_mib(device),
            "compiled": job.compile,
            "autocast": str(resolve_precision(job.precision, device)),
        }
        print(f"{family}: {rows[family]}", flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    Path(config["out"]).write_text(json.dumps({"device": device_name, "rows": rows}))


def run_check(data: PreparedData, args, work: Path) -> dict:
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    out = work / "gpu-check.json"
    trainer = TorchTrainer(
        _check_worker,
        train_loop_config={
            "families": args.families,
            "batch_size": args.batch_size,
            "compiled": args.compiled,
            "train": ray.put(data.train.images),
            "val": {kind: ray.put(data.val.for_kind(kind)) for kind in ("binary", "continuous")},
            "out": str(out),
        },
        scaling_config=Scaling(
            workers=1, gpus_per_worker=0 if args.cpu else 1, max_failures=0
        ).scaling_config(),
        run_config=RunConfig(name="gpu-check", storage_path=str(work / "ray")),
    )
    trainer.fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="rehearse on CPU (no GPU needed)")
    parser.add_argument("--families", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--compiled", default=COMPILED_FAMILY, help="the family trained with torch.compile")
    parser.add_argument("--size", type=int, default=4096, help="shapes rendered (70 %% train)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--results", type=Path, help=f"markdown file for the report (default: {RESULTS.name}; --cpu: none)"
    )
    args = parser.parse_args()
    args.no_write = args.cpu and args.results is None
    args.results = args.results or RESULTS
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --cpu for the CPU rehearsal")
    collect_reports_promptly()

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="genpipe-gpu-check-") as tmp:
        work = Path(tmp)
        data = prepared_in(work, render_shapes(args.size, args.resolution, seed=0))
        ray.init(
            num_gpus=0 if args.cpu else 1,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
        try:
            record = run_check(data, args, work)
        finally:
            ray.shutdown()
    c, h, w = data.image_shape
    lines = [
        "| family | (a) plain loop img/s | (b) genpipe's Ray worker img/s | (b)/(a) | first 1-epoch run s "
        "| peak memory MiB | autocast | compiled |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for family, row in record["rows"].items():
        rate, ratio = (
            ("-", "-")
            if row["genpipe"] is None
            else (f"{row['genpipe']:,.0f}", f"{row['genpipe'] / row['plain']:.2f}")
        )
        lines.append(
            f"| {family} | {row['plain']:,.0f} | {rate} | {ratio} "
            f"| {row['first_run_s']:.1f} | {row['peak_mib']:,.0f} | {row['autocast']} | {'yes' if row['compiled'] else 'no'} |"
        )
    memory = (
        "peak memory: CUDA peak allocated over (a) and (b) of the family"
        if record["device"] != "CPU"
        else "peak memory: the worker's RSS high-water mark so far (CPU rehearsal; it never goes down)"
    )
    report = "\n".join(
        [
            "# The GPU path: every family with bf16 autocast and channels-last",
            "",
            f"Device: **{record['device']}**. Dataset: built-in shapes ({c}x{h}x{w}; {len(data.train)} train images); "
            f"default hyper-parameters; batch {args.batch_size}; `{args.compiled}` with `torch.compile`; {memory}. "
            f"(a) the second epoch of a plain bf16 loop; (b) epochs 2-{TIMED_EPOCHS + 1} of genpipe's `run_training` "
            f"in one Ray Train worker ({TIMED_EPOCHS + 1}-epoch run minus 1-epoch run, validation included; - where "
            f"the difference was within the timing noise). Whole check: {time.time() - started:.0f} s.",
            "",
            f"Machine: {machine()}",
            f"Command: `.venv/bin/python bench/gpu_check.py {' '.join(sys.argv[1:])}`",
            "",
            *lines,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
