"""Benchmark whether a kept adversarial model's discriminator memorises its training images.

The same weights score training images, held-out (validation) images and the model's own samples,
each set as one batch: with batch statistics in any batch norm, as the discriminator scores batches
in training and in the per-epoch validation, and in evaluation mode (running statistics). A
discriminator that memorises rates held-out images clearly below training images under the same
weights and mode. The training history cannot show this exactly: its training scores average an
epoch of moving weights.

    .venv/bin/python bench/discriminator_gap.py --data shapes --size 10000 --resolution 32 KEPT_MODEL_DIR...

KEPT_MODEL_DIR is a model folder `bench/sample_quality.py --keep-models` wrote; `--data` and its
options must be the ones it trained on, so the splits are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import data_arguments, load_data, machine, publish, results_arguments

from components.models.adversarial import AdversarialModel, batch_statistics
from components.models.model_dir import load_model_dir

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS-discriminator-gap.md"
MODES = {"batch statistics": batch_statistics, "evaluation mode": lambda _: contextlib.nullcontext()}


def scores(model: AdversarialModel, real: torch.Tensor, fake: torch.Tensor, mode: str) -> dict[str, float]:
    """The objective's scores (d_real and d_fake, or the Wasserstein estimate) of `real` against `fake`."""
    with torch.no_grad(), MODES[mode](model.discriminator):
        _, metrics = model.objective.discriminator_loss(
            model.discriminator(2 * real - 1), model.discriminator(fake)
        )
    return {k: float(v) for k, v in metrics.items()}


def pair(name: str, with_train: float, with_held_out: float) -> str:
    """One score as "training / held-out", or once where the real set does not enter it (d_fake)."""
    if with_train == with_held_out:
        return f"{name} {with_train:.3f}"
    return f"{name} {with_train:.3f} / {with_held_out:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_arguments(parser)
    parser.add_argument("models", nargs="+", type=Path, metavar="KEPT_MODEL_DIR")
    parser.add_argument("--images", type=int, default=1000, help="training and held-out images scored")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-discriminator-gap-") as tmp:
        data = load_data(args, Path(tmp))
        train = torch.from_numpy(data.train.images[: args.images]).float()
        held_out = torch.from_numpy(data.val.images[: args.images]).float()
    rows = []
    for folder in args.models:
        model = load_model_dir(folder)
        if not isinstance(model, AdversarialModel):
            raise SystemExit(f"{folder}: a {model.registry_name} model has no discriminator to score")
        epochs = len(json.loads((folder / "history.json").read_text())["history"])
        fake = model.generate(args.images, torch.Generator().manual_seed(0))
        for mode in MODES:
            on_train, on_held_out = scores(model, train, fake, mode), scores(model, held_out, fake, mode)
            cells = "; ".join(pair(k, on_train[k], on_held_out[k]) for k in sorted(on_train, reverse=True))
            rows.append(f"| {folder.parent.name}/{folder.name} | {epochs} | {mode} | {cells} |")

    command = " ".join([".venv/bin/python", "bench/discriminator_gap.py", *sys.argv[1:]])
    report = f"""# Does the discriminator memorise? Scores on training against held-out images

Dataset: {data.name} ({"x".join(map(str, data.image_shape))}); {len(train)} training and
{len(held_out)} held-out (validation) images, and {len(fake)} samples of each model (seed 0), each
set scored as one batch by the kept weights. Scores: with training images / with held-out images as
the real set (d_real, d_fake: the discriminator's mean probability that its input is real;
wasserstein: the critic's mean real-minus-fake score).

Machine: {machine()}.
Command: `{command}`

| model | epochs | batch norm | scores: training / held-out |
|---|---:|---|---|
{chr(10).join(rows)}
"""
    publish(args, report)


if __name__ == "__main__":
    main()
