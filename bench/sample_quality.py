"""Benchmark every family that is not an exact-likelihood model on one training budget: sample quality.

Every registered family except the `DensityModel`s (so the autoencoders, the VAE, VAE-GAN and the
GANs, whichever are registered when it runs) is trained with the same epochs, batch size and
learning rate through the generic trainer (in-process, `LocalContext`) and scored by the pipeline's
own `evaluate_model`: FID and KID in the featurizer's feature space against the test split,
reconstruction error for models with an encoder, the Parzen-window estimate for sample-only models
(the VAE reports its importance-weighted bound instead), and speed. It writes sample grids next to
real test images under bench/results/ and a report to bench/RESULTS-sample-quality.md with the machine
it ran on.

    .venv/bin/python bench/sample_quality.py                          # built-in digits, a few minutes
    .venv/bin/python bench/sample_quality.py --models ae dae vaegan   # a subset
    .venv/bin/python bench/sample_quality.py --data path/to/mnist --max-images 12000 --epochs 3
    .venv/bin/python bench/sample_quality.py --models wgan-gp --hparam n_critic=2   # not the defaults

A long run can be continued: with `--keep-models DIR` each trained model (weights, optimiser state,
history) stays in DIR, checkpointed every few hundred steps, and a later run with the same DIR, data
and settings but more `--epochs` trains on from where the last one stopped instead of starting over.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (
    data_arguments,
    hyperparameter,
    load_data,
    machine,
    printed_progress,
    publish,
    results_arguments,
)

from components.config import load_params
from components.data.importers import SHAPES_SIZE
from components.data.prepared import PreparedData
from components.evaluation.evaluate import EvaluationSettings, evaluate_model, feature_extractor
from components.evaluation.featurizer import train_featurizer
from components.evaluation.images import save_grid
from components.evaluation.parzen import parzen_estimate
from components.evaluation.sample_quality import fid_kid
from components.models import DensityModel
from components.models.factory import create_model, list_models, model_class
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, TrainJob, read_outcome, run_training

RESULTS = Path(__file__).with_name("RESULTS-sample-quality.md")
IMAGES = Path(__file__).with_name("results")
SPEED_SAMPLES = 1000  # images drawn in one call to time sampling
KEPT_CHECKPOINT_STEPS = 500
DEFAULT_LR = 0.001
PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
SETTINGS = EvaluationSettings.from_params(PARAMS)  # the pipeline's own evaluation


@dataclass
class Row:
    name: str
    data_kind: str
    metrics: dict[str, float]
    params: int
    train_seconds: float
    train_samples_per_second: float
    sample_images_per_second: float
    samples_png: str
    real_png: str


def families(requested: list[str] | None) -> list[str]:
    """The requested families, or every registered one without an exact likelihood."""
    names = requested or [n for n in list_models() if not issubclass(model_class(n), DensityModel)]
    dense = [n for n in names if issubclass(model_class(n), DensityModel)]
    if dense:
        raise SystemExit(f"{', '.join(dense)}: exact-likelihood models are benchmarked by bench/density.py")
    return names


def check_hyperparameters(names: list[str], image_shape: tuple[int, int, int], hparams: dict) -> None:
    """Stop before anything trains if a family cannot be built with `hparams` (an unknown name, a bad
    value); built on the meta device, so no weights are allocated."""
    for name in names:
        try:
            with torch.device("meta"):
                create_model(name, image_shape, **hparams)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"--hparam: {name}: {err}") from err


def pipeline_featurizer(work: Path, seed: int) -> tuple[torch.nn.Module, str]:
    """The pipeline's featurizer with params.yaml's settings, trained on the data `load_data` prepared
    in `work`, and its id: the same weights for the same data and seed."""
    settings = PARAMS.featurizer.model_dump(include={"feature_dim", "epochs", "batch_size", "lr"})
    train_featurizer(work / "prepared", work / "featurizer", seed=seed, **settings)
    return feature_extractor("featurizer", work / "featurizer")


def real_grid(data: PreparedData, data_kind: str, grids: Path) -> str:
    """Grid of the test images a model of `data_kind` is scored against (written once per kind)."""
    path = grids / f"{data.name}-real-{data_kind}.png"
    if not path.exists():
        save_grid(torch.from_numpy(data.test.for_kind(data_kind)[:64]), path)
    return path.name


def run_label(name: str, args: argparse.Namespace) -> str:
    """`name`, the hyper-parameters set in place of the family's defaults, a learning rate other than
    the default and an image count other than the data's own: what names a kept model and its grids,
    so runs of one family with other settings neither overwrite nor continue each other."""
    settings = sorted(args.hparams.items())
    if args.lr != DEFAULT_LR:
        settings.append(("lr", args.lr))
    if args.size not in (None, SHAPES_SIZE):
        settings.append(("size", args.size))
    if args.max_images is not None:
        settings.append(("max_images", args.max_images))
    return name + "".join(f"-{key}{value}" for key, value in settings)


def run_one(
    name: str, data: PreparedData, args, models: Path, extractor, extractor_id: str, grids: Path
) -> Row:
    """Train and score one family, continuing the model kept in `models` if there is one; its sample
    grid goes to `grids`."""
    kind = model_class(name).data_kind_for(data.image_shape, {})
    torch.manual_seed(args.seed)
    job = TrainJob(
        model={"name": name, "image_shape": list(data.image_shape), "hparams": args.hparams},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        # A kept model is also checkpointed as it trains, so a run stopped early continues from there.
        checkpoint_every_steps=KEPT_CHECKPOINT_STEPS if args.keep_models else 0,
        precision="auto",
        compile=False,
        sample_every_epochs=0,
    )
    out = models / f"{data.name}-{run_label(name, args)}"
    start = time.perf_counter()
    run_training(
        job, data.train.images, data.val.for_kind(kind), LocalContext(out, on_progress=printed_progress(name))
    )
    train_seconds = time.perf_counter() - start
    outcome = read_outcome(out)
    epochs_now = sum(1 for epoch in outcome.history if epoch["step"] > outcome.resumed_from_step)
    if outcome.resumed_from_step:
        print(f"{name}: continued from step {outcome.resumed_from_step} in {out}", flush=True)
    model = load_model_dir(out)
    start = time.perf_counter()
    model.sample(SPEED_SAMPLES, generator=torch.Generator().manual_seed(args.seed))
    sample_seconds = time.perf_counter() - start
    evaluation = evaluate_model(
        model,
        data,
        extractor,
        extractor_id,
        dataclasses.replace(SETTINGS, seed=args.seed),
    )
    samples_png = save_grid(
        evaluation.images["samples"][0],
        grids / f"{data.name}-{run_label(name, args)}-{args.epochs}ep.png",
    ).name
    return Row(
        name,
        kind,
        evaluation.metrics,
        sum(p.numel() for p in model.parameters()),
        train_seconds,
        epochs_now * len(data.train) / train_seconds,
        SPEED_SAMPLES / sample_seconds,
        samples_png,
        real_grid(data, kind, grids),
    )


def data_reference(data: PreparedData, extractor, num_samples: int) -> dict[str, float]:
    """The scores of training images used as "samples": the best a model can expect on this budget."""
    train = torch.from_numpy(data.train.images[:num_samples])
    test, val = torch.from_numpy(data.test.images), torch.from_numpy(data.val.images)
    return {**fid_kid(test, train, extractor), **parzen_estimate(train, val, test)}


def _value(metrics: dict[str, float], key: str, fmt: str) -> str:
    return format(metrics[key], fmt) if key in metrics and math.isfinite(metrics[key]) else "-"


def table(rows: list[Row]) -> str:
    lines = [
        "| model | data | FID | KID | recon. SSE | Parzen LL est. (sigma) | NLL bound | parameters "
        "| train s | train img/s | sampling img/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.metrics
        kid = f"{m['test_kid_mean']:.3f} ± {m['test_kid_std']:.3f}"
        parzen = (
            f"{m['test_parzen_ll_estimate']:.1f} ({m['test_parzen_sigma']:.3g})"
            if "test_parzen_sigma" in m
            else "-"
        )
        lines.append(
            f"| {r.name} | {r.data_kind} | {m['test_fid']:.2f} | {kid} | {_value(m, 'test_reconstruction_sse', '.2f')} "
            f"| {parzen} | {_value(m, 'test_nll_bound', '.1f')} | {r.params:,} | {r.train_seconds:.1f} "
            f"| {r.train_samples_per_second:,.0f} | {r.sample_images_per_second:,.0f} |"
        )
    return "\n".join(lines)


def gallery(rows: list[Row]) -> str:
    lines = ["| model | real test images | generated samples |", "|---|---|---|"]
    lines += [
        f"| {r.name} | ![real](results/{r.real_png}) | ![{r.name}](results/{r.samples_png}) |" for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_arguments(parser)
    parser.add_argument("--models", nargs="+", help="families to run (default: every non-density family)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--hparam",
        type=hyperparameter,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyper-parameter of every model run, in place of the family's default (repeatable)",
    )
    parser.add_argument(
        "--keep-models",
        type=Path,
        metavar="DIR",
        help="keep each trained model in DIR; a later run with the same DIR continues it to --epochs",
    )
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    args.hparams = dict(args.hparam)
    torch.set_num_threads(args.threads)
    names = families(args.models)

    with tempfile.TemporaryDirectory(prefix="bench-sample-quality-") as tmp:
        work = Path(tmp)
        data = load_data(args, work)
        check_hyperparameters(names, data.image_shape, args.hparams)
        start = time.perf_counter()
        extractor, extractor_id = pipeline_featurizer(work, args.seed)
        featurizer_seconds = time.perf_counter() - start
        # One untimed epoch first, so the first timed model does not pay for one-time initialisation;
        # in a folder of its own, so that model starts afresh rather than continuing the warm-up's.
        warm_up = argparse.Namespace(**{**vars(args), "epochs": 1})
        run_one(names[0], data, warm_up, work / "warm-up", extractor, extractor_id, grids=work)
        reference = data_reference(data, extractor, SETTINGS.num_samples)
        rows = []
        grids = work if args.no_write else IMAGES  # --no-write leaves bench/ as it was
        for name in names:
            rows.append(run_one(name, data, args, args.keep_models or work, extractor, extractor_id, grids))
            print(f"{name}: {rows[-1].metrics} in {rows[-1].train_seconds:.1f} s", flush=True)

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/sample_quality.py", *sys.argv[1:]])
    c, h, w = data.image_shape
    hparams_text = ", ".join(f"{k} = {v}" for k, v in args.hparams.items()) or "the families' defaults"
    report = f"""# Sample quality of the non-likelihood families: FID, KID, reconstruction, Parzen estimate

Dataset: {data.name} ({c}x{h}x{w}; {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images).
Budget, the same for every model: {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr} (as each family
scales it), seed {args.seed}, hyper-parameters: {hparams_text}. Scores come from `evaluate_model` with params.yaml's `evaluate` settings:
{SETTINGS.num_samples} samples; FID and KID against the test split (binarised for binary models) in
the feature space of `{extractor_id}` (the pipeline's featurizer, trained here in {featurizer_seconds:.0f} s),
KID subsets of {SETTINGS.kid_subset_size}; recon. SSE is the summed squared pixel error per test image;
the Parzen estimate is the mean test log-likelihood in nats per image of a Gaussian kernel density on the
samples, bandwidth chosen on the validation split: an estimate for comparing sample-only models, not a
likelihood. The VAE reports its importance-weighted NLL bound (on binarised data) instead.
Train seconds include the per-epoch validation pass and cover the epochs this run trained (a model
continued with `--keep-models` counts only its new epochs); sampling draws {SPEED_SAMPLES} images in one call.

Machine: {machine()}.
Command: `{command}`

{table(rows)}

Reference: {min(len(data.train), SETTINGS.num_samples)} training images in place of samples score FID
{reference["fid"]:.2f}, KID {reference["kid_mean"]:.3f} ± {reference["kid_std"]:.3f} and a Parzen estimate of
{reference["parzen_ll_estimate"]:.1f} nats (sigma {reference["parzen_sigma"]:.3g}).

Grids: 64 test images next to 64 samples of each model (binary models against the binarised test split).

{gallery(rows)}
"""
    publish(args, report)


if __name__ == "__main__":
    main()
