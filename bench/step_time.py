"""Benchmark one family's training step: seconds per step under several hyper-parameter settings.

Each setting builds the family at `--shape`, untrained (a step costs the same whatever the weights),
and runs the trainer's inner loop on one random batch: at each step every phase its `phase_schedule`
names (zero the phase's gradients, forward, backward, optimiser step). Settings take turns over
`--rounds`, so a change in the machine's speed falls on all of them alike; the table gives each
setting's median over the rounds.

    .venv/bin/python bench/step_time.py --family dcgan --setting r1_gamma=0 --setting r1_gamma=1 \\
        --setting r1_gamma=1,r1_every=16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import hyperparameter, machine, publish, results_arguments

from components.models import create_model

RESULTS = Path(__file__).with_name("RESULTS-step-time.md")
WARM_UP_STEPS = 3


def setting(text: str) -> dict[str, object]:
    """`--setting KEY=VALUE[,KEY=VALUE...]`: one set of hyper-parameters over the family's defaults."""
    return dict(hyperparameter(item) for item in text.split(",")) if text else {}


def seconds_per_step(family: str, shape: tuple[int, ...], hparams: dict, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(family, shape, **hparams)
    optimizers = model.configure_optimizers(1e-4)
    x = torch.rand(batch, *shape)

    def step(index: int) -> None:
        for phase in model.phase_schedule(index):
            optimizers[phase].zero_grad(set_to_none=True)
            model(x, phase)["loss"].backward()
            optimizers[phase].step()
            model.after_optimizer_step(phase)

    for index in range(WARM_UP_STEPS):
        step(index)
    started = time.perf_counter()
    for index in range(steps):
        step(index)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", required=True)
    parser.add_argument(
        "--setting",
        type=setting,
        action="append",
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="hyper-parameters of one setting (repeatable; default: the family's defaults only)",
    )
    parser.add_argument("--shape", default="3x32x32", help="C x H x W")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32, help="timed steps per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(side) for side in args.shape.split("x"))
    settings = args.setting or [{}]

    times: list[list[float]] = [[] for _ in settings]
    for round_index in range(args.rounds):
        for hparams, seen in zip(settings, times, strict=True):
            seen.append(seconds_per_step(args.family, shape, hparams, args.batch_size, args.steps))
            print(f"round {round_index + 1}: {hparams or 'defaults'} {seen[-1]:.3f} s/step", file=sys.stderr)
    baseline = statistics.median(times[0])
    rows = []
    for hparams, seen in zip(settings, times, strict=True):
        label = ", ".join(f"{k} = {v}" for k, v in hparams.items()) or "defaults"
        median = statistics.median(seen)
        spread = f"{min(seen):.3f}-{max(seen):.3f}"
        rows.append(f"| {label} | {median:.3f} | {spread} | {baseline / median:.2f} |")

    command = " ".join([".venv/bin/python", "bench/step_time.py", *sys.argv[1:]])
    report = f"""# Training step time of `{args.family}` under several settings

{args.family} at {args.shape}, batch {args.batch_size}, every phase of each step as the trainer runs it;
median seconds per step over {args.rounds} rounds of {args.steps} steps (after {WARM_UP_STEPS} untimed
ones), the settings taking turns; speed relative to the first setting.

Machine: {machine()}.
Command: `{command}`

| setting | s/step (median) | range over rounds | speed vs first |
|---|---:|---:|---:|
{chr(10).join(rows)}
"""
    publish(args, report)


if __name__ == "__main__":
    main()
