"""Benchmark the likelihood families on one training budget: test NLL, size and speed.

Trains FVSBN, NADE, MADE, PixelCNN, PixelRNN and the VAE with the same epochs, batch size and
learning rate through the generic trainer (in-process, `LocalContext`), on the built-in 8x8 digits
or on a dataset given with `--data` (an IDX file or folder such as MNIST, or anything
`genpipe data import` reads), prints a table and writes it to bench/RESULTS-density.md with the
machine it ran on. Two references put the numbers in scale: independent per-pixel Bernoullis fitted
on the training split (no dependencies at all), and a mixture with one component per training image
(p(x) = mean_j prod_i Bernoulli(x_i | g_ji), which knows the binarisation process).

    .venv/bin/python bench/density.py                      # digits, 3 seeds: ~3 minutes on 2 CPU cores
    .venv/bin/python bench/density.py --variants           # also gated PixelCNN, Diagonal BiLSTM, MADE x8
    .venv/bin/python bench/density.py --data path/to/mnist --max-images 12000 --epochs 5
    .venv/bin/python bench/density.py --upsample 28 --epochs 10   # a 1x28x28 binarised case
    .venv/bin/python bench/density.py --pixels 8bit --data shapes --size 2500 --resolution 32 --results bench/RESULTS-density-8bit.md
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import data_arguments, load_data, machine, printed_progress, publish, results_arguments

from components.data.prepared import SPLITS, PreparedData, Split
from components.models import DensityModel, LatentVariableModel, bits_per_dim, create_model
from components.models.autoregressive import AutoregressiveImageModel
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, TrainJob, run_training

RESULTS = Path(__file__).with_name("RESULTS-density.md")
IMPORTANCE_SAMPLES = 100
EVAL_BATCH = 500

#: (label, registered name, hyper-parameters beyond the defaults)
MODELS = [
    ("fvsbn", "fvsbn", {}),
    ("nade", "nade", {}),
    ("made", "made", {}),
    ("pixelcnn", "pixelcnn", {}),
    ("pixelrnn (row)", "pixelrnn", {}),
    ("vae", "vae", {}),
]
VARIANTS = [
    ("made, raster order", "made", {"random_order": False}),
    ("nade, sigmoid units", "nade", {"activation": "sigmoid"}),
    ("made, 8 masks", "made", {"num_masks": 8}),
    ("pixelcnn, gated", "pixelcnn", {"gated": True}),
    ("pixelrnn (diagonal)", "pixelrnn", {"variant": "diagonal"}),
]


@dataclass
class Row:
    label: str
    nlls: list[float]  # one per seed
    bound: bool  # the VAE reports an upper bound on the NLL
    context_seen: float | None  # autoregressive families only
    params: int
    train_seconds: float  # mean over seeds, as are the two below
    samples_per_second: float
    sample_seconds: float


@torch.no_grad()
def test_nll(model, x: torch.Tensor) -> tuple[float, bool]:
    """Mean NLL in nats, and whether it is only an upper bound (the VAE's importance-weighted one)."""
    if isinstance(model, DensityModel):
        return -torch.cat([model.log_prob(chunk) for chunk in x.split(EVAL_BATCH)]).mean().item(), False
    if isinstance(model, LatentVariableModel):
        torch.manual_seed(0)
        chunks = [model.importance_weighted_bound(chunk, IMPORTANCE_SAMPLES) for chunk in x.split(EVAL_BATCH)]
        return -torch.cat(chunks).mean().item(), True
    raise TypeError(f"{type(model).__name__} has neither a likelihood nor a bound")


def reference_nlls_8bit(data: PreparedData, levels: int = 256) -> dict[str, float]:
    """NLL of two non-learned references for 8-bit data: per-sub-pixel level frequencies and uniform."""

    def level(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images).flatten(1).mul(levels - 1).round().long()

    train, test = level(data.train.images), level(data.test.images)
    counts = torch.ones(train.shape[1], levels, dtype=torch.float64)  # add-one: no level costs infinity
    counts.scatter_add_(1, train.T, torch.ones_like(train.T, dtype=torch.float64))
    log_freq = (counts / counts.sum(1, keepdim=True)).log()
    independent = log_freq.gather(1, test.T).sum(0)
    return {
        "independent sub-pixels (train level frequencies)": -independent.mean().item(),
        "uniform over the levels": train.shape[1] * math.log(levels),
    }


def reference_nlls(data: PreparedData) -> dict[str, float]:
    """NLL of two non-learned references and the binarisation noise floor, in nats per image."""
    train = torch.from_numpy(data.train.images).double().flatten(1)
    test_grey = torch.from_numpy(data.test.images).double().flatten(1)
    x = torch.from_numpy(data.test.binary).double().flatten(1)

    def log_bernoulli(p: torch.Tensor) -> torch.Tensor:  # N_test x N_components
        p = p.clamp(0.01, 0.99)  # an unseen 0/1 pixel would otherwise cost infinitely many nats
        return x @ p.log().T + (1 - x) @ (1 - p).log().T

    mixture = torch.logsumexp(log_bernoulli(train), 1) - math.log(len(train))
    p = test_grey.clamp(1e-12, 1 - 1e-12)
    noise = -(p * p.log() + (1 - p) * (1 - p).log()).sum(1)
    return {
        "independent pixels (train means)": -log_bernoulli(train.mean(0, keepdim=True)).mean().item(),
        "mixture of all training images": -mixture.mean().item(),
        "binarisation noise H(x given the grey image), a floor": noise.mean().item(),
    }


def context_seen(model, max_pixels: int = 64) -> float | None:
    """Mean over pixels i of the share of pixels before i that can change the logit of pixel i.

    1.0 means every conditional sees its whole context (FVSBN, NADE; MADE up to its random
    connectivity, measured for its first mask); the PixelCNN's blind spot, the Row LSTM's triangular
    receptive field and the Diagonal BiLSTM's one missed pixel per row show up as less.
    """
    if not isinstance(model, AutoregressiveImageModel):
        return None
    x = torch.randn(32, *model.image_shape, requires_grad=True)  # several inputs: a dead ReLU is not a mask
    outputs = model.params(x).sum(-1).flatten(1)
    d, order = model.num_dims, model.ordering()
    positions = torch.linspace(1, d - 1, min(d - 1, max_pixels)).round().long().unique().tolist()
    shares = []
    for k in positions:  # the k-th sub-pixel in the model's order, against the k before it
        (grad,) = torch.autograd.grad(outputs[:, order[k]].sum(), x, retain_graph=True)
        shares.append((grad.flatten(1)[:, order[:k]] != 0).any(0).double().mean().item())
    return sum(shares) / len(shares)


def upsampled(data: PreparedData, size: int) -> PreparedData:
    """The same images resized (bilinear) to size x size, with fixed binarised splits drawn again.

    The 1x28x28 binarised case of the literature (binarized MNIST) at the cost of the digits.
    """
    rng = np.random.default_rng(0)
    splits, levels = {}, set()
    for name in SPLITS:
        split = data.split(name)
        images = torch.nn.functional.interpolate(
            torch.from_numpy(split.images), size=(size, size), mode="bilinear", align_corners=False
        )
        images = images.clamp(0, 1).numpy()
        binary = (rng.random(images.shape, dtype=np.float32) < images).astype(np.uint8)
        splits[name] = Split(images, binary, split.labels)
        levels.update(np.unique(np.rint(images * 255)).tolist())
    shape = (data.image_shape[0], size, size)
    return PreparedData(
        **splits,
        name=f"{data.name} upsampled to {size}x{size}",
        image_shape=shape,
        num_classes=data.num_classes,
        levels=len(levels),
    )


def run_one(name: str, hparams: dict, data: PreparedData, args, seed: int, out: Path) -> dict:
    """Train one model with one seed; its test NLL, size and timings."""
    torch.manual_seed(seed)
    spec = create_model(name, data.image_shape, **hparams).spec
    job = TrainJob(
        model=spec.to_dict(),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
        checkpoint_every_steps=0,
        precision="auto",
        compile=False,
        sample_every_epochs=0,
    )
    start = time.perf_counter()
    kind = create_model(name, data.image_shape, **hparams).data_kind
    run_training(
        job, data.train.images, data.val.for_kind(kind), LocalContext(out, on_progress=printed_progress(name))
    )
    train_seconds = time.perf_counter() - start
    model = load_model_dir(out)
    nll, bound = test_nll(model, torch.from_numpy(data.test.for_kind(kind)))
    start = time.perf_counter()
    model.sample(64, generator=torch.Generator().manual_seed(0))
    return {
        "model": model,
        "nll": nll,
        "bound": bound,
        "train_seconds": train_seconds,
        "sample_seconds": time.perf_counter() - start,
    }


def run_model(label: str, name: str, hparams: dict, data: PreparedData, args, work: Path) -> Row:
    slug = re.sub(r"\W+", "_", label)  # a fresh output folder per run: an old one would be resumed
    runs = [
        run_one(name, hparams, data, args, args.seed + k, work / f"{slug}-{k}") for k in range(args.seeds)
    ]
    model = runs[-1]["model"]
    train_seconds = statistics.mean(r["train_seconds"] for r in runs)
    return Row(
        label,
        [r["nll"] for r in runs],
        runs[0]["bound"],
        context_seen(model),
        sum(p.numel() for p in model.parameters()),
        train_seconds,
        args.epochs * len(data.train) / train_seconds,
        statistics.mean(r["sample_seconds"] for r in runs),
    )


def table(rows: list[Row], dims: int) -> str:
    lines = [
        "| model | test NLL (nats) | bits/dim | context seen | parameters | train s | train samples/s "
        "| s per 64 samples |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        le = "<= " if r.bound else ""
        nll = statistics.mean(r.nlls)
        spread = f" ± {statistics.stdev(r.nlls):.2f}" if len(r.nlls) > 1 else ""
        seen = "n/a" if r.context_seen is None else f"{r.context_seen:.0%}"
        lines.append(
            f"| {r.label} | {le}{nll:.2f}{spread} | {le}{bits_per_dim(nll, dims):.4f} | {seen} | {r.params:,} | "
            f"{r.train_seconds:.1f} | {r.samples_per_second:,.0f} | {r.sample_seconds:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--seed", type=int, default=0, help="first training seed")
    parser.add_argument("--seeds", type=int, default=3, help="train each model with this many seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--variants", action="store_true", help="also gated PixelCNN, Diagonal BiLSTM, MADE x8"
    )
    parser.add_argument(
        "--pixels",
        choices=("binary", "8bit"),
        default="binary",
        help="what the models model (8bit: 256 levels)",
    )
    parser.add_argument("--upsample", type=int, help="resize the images to this size (e.g. 28)")
    parser.add_argument("--only", nargs="+", help="run only the models with these labels")
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-density-") as tmp:
        work = Path(tmp)
        data = load_data(args, work)
        if args.upsample:
            data = upsampled(data, args.upsample)
        if data.image_shape[0] != 1 and args.pixels == "binary":
            raise SystemExit(
                f"{args.data}: binary likelihood models need 1-channel images, found {data.image_shape}; "
                "use --pixels 8bit for colour images"
            )
        dims = math.prod(data.image_shape)
        # One untimed epoch first, so the first timed model does not pay for one-time initialisation.
        warm_up = argparse.Namespace(**{**vars(args), "epochs": 1})
        run_one("fvsbn", {"pixels": args.pixels}, data, warm_up, args.seed, work / "warm-up")
        rows = []
        for label, name, hparams in MODELS + (VARIANTS if args.variants else []):
            if args.only and label not in args.only:
                continue
            rows.append(run_model(label, name, {**hparams, "pixels": args.pixels}, data, args, work))
            print(f"{label}: {rows[-1]}", flush=True)
    references = reference_nlls(data) if args.pixels == "binary" else reference_nlls_8bit(data)
    reference_lines = "\n".join(
        f"| {name} | {nll:.2f} | {bits_per_dim(nll, dims):.4f} |" for name, nll in references.items()
    )
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/density.py", *sys.argv[1:]])
    c, h, w = data.image_shape
    seen = (
        "trained with dynamic binarisation, scored on the fixed binarised test split"
        if args.pixels == "binary"
        else "8-bit form: every sub-pixel one of 256 levels, trained and scored on the images themselves"
    )
    report = f"""# Likelihood families: test NLL and speed

Dataset: {data.name} ({c}x{h}x{w}; {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images;
{seen}).
Budget, the same for every model: {args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr};
{args.seeds} training seed(s) from {args.seed} (NLL: mean ± standard deviation over seeds; the rest: means).
"Context seen": mean over pixels i of the share of pixels before i that can change the logit of pixel i.
The VAE row is an upper bound on its NLL (importance-weighted bound, {IMPORTANCE_SAMPLES} samples).
Train seconds include the per-epoch validation pass; sampling draws 64 images in parallel.

Machine: {machine()}.
Command: `{command}`

{table(rows, dims)}

References on the same test split (not learned by gradient descent):

| reference | test NLL (nats) | bits/dim |
|---|---:|---:|
{reference_lines}
"""
    publish(args, report)


if __name__ == "__main__":
    main()
