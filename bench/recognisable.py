"""Benchmark how recognisable kept models' samples are: the share the featurizer's classifier names.

On labelled data the pipeline's featurizer is a classifier of the labels (on the built-in shapes,
the shape's kind). A sample counts as named when the classifier gives one label a probability of at
least NAMED_PROBABILITY; the test images give the share a perfect model would reach. Next to it: the
named samples per label (a model that draws only squares is named often but covers the data badly),
and FID and KID against the test split. The featurizer is trained here as `bench/sample_quality.py`
trains it, so the scores compare with its results on the same data and seed.

A model with a generator's average (`ema_decay` > 0) is scored twice from the same latents: the
average, which `sample` draws from, and the generator the last step left. With `--grids` each
model's first draw also goes to a grid under bench/results/ (`bench/sample_quality.py` wrote one per
kept model already).

    .venv/bin/python bench/recognisable.py --data shapes --size 10000 --resolution 32 KEPT_MODEL_DIR...

KEPT_MODEL_DIR is a model folder `bench/sample_quality.py --keep-models` wrote; `--data` and its
options must be the ones it trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from common import data_arguments, load_data, machine, publish, results_arguments
from sample_quality import IMAGES, SETTINGS, pipeline_featurizer, real_grid

from components.data.shapes import KINDS
from components.evaluation.images import save_grid
from components.evaluation.sample_quality import fid_kid
from components.models.adversarial import AdversarialModel
from components.models.base import GenerativeModel
from components.models.model_dir import load_model_dir

RESULTS = Path(__file__).with_name("RESULTS-recognisable.md")
NAMED_PROBABILITY = 0.9
GALLERY_HEADER = "| model | real test images | samples (first 64) |\n|---|---|---|\n"


def named(images: torch.Tensor, classifier: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The label each image is named as, or -1 where no label reaches NAMED_PROBABILITY."""
    with torch.no_grad():
        probabilities = torch.cat([classifier(batch).softmax(1) for batch in images.split(500)])
    best, label = probabilities.max(1)
    return torch.where(best >= NAMED_PROBABILITY, label, -1)


def samplers(model: GenerativeModel) -> dict[str, Callable[[int, torch.Generator], torch.Tensor]]:
    """What draws a model's images: `sample`, which is the generator's average where there is one, and
    then also the generator."""
    if not (isinstance(model, AdversarialModel) and model.ema_decay > 0):
        return {"samples": model.sample}

    def from_generator(n: int, latents: torch.Generator) -> torch.Tensor:
        return ((model.generate(n, latents, model.generator) + 1) / 2).clamp(0, 1)

    return {"average": model.sample, "generator": from_generator}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_arguments(parser)
    parser.add_argument("models", nargs="+", type=Path, metavar="KEPT_MODEL_DIR")
    parser.add_argument("--seed", type=int, default=0, help="featurizer, and the first draw's latents")
    parser.add_argument(
        "--draws", type=int, default=3, help="draws of images per model, seeds from --seed on"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--grids", action="store_true", help="also write each model's first draw as a grid to bench/results/"
    )
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = [load_model_dir(folder) for folder in args.models]

    with tempfile.TemporaryDirectory(prefix="bench-recognisable-") as tmp:
        data = load_data(args, Path(tmp))
        if data.num_classes == 0:
            raise SystemExit(f"--data {args.data}: no labels, so the featurizer names no kinds")
        labels = KINDS if args.data == "shapes" else [str(label) for label in range(data.num_classes)]
        extractor, extractor_id = pipeline_featurizer(Path(tmp), args.seed)
        accuracy = json.loads((Path(tmp) / "featurizer" / "config.json").read_text())["val_accuracy"]
        test = torch.from_numpy(data.test.images)
        grids = IMAGES if args.grids and not args.no_write else None  # --no-write leaves bench/ as it was
        real_png = real_grid(data, "continuous", grids) if grids else None

        train = torch.from_numpy(data.train.images)

        def training_images(n: int, draw: torch.Generator) -> torch.Tensor:
            return train[torch.randperm(len(train), generator=draw)[:n]]

        def row(label: str, epochs: str, draw: Callable[[int, torch.Generator], torch.Tensor]) -> tuple:
            """The table row of `args.draws` draws of images, and the first draw's images."""
            draws, names, fids, kids = [], [], [], []
            for index in range(args.draws):
                with torch.no_grad():
                    draws.append(draw(SETTINGS.num_samples, torch.Generator().manual_seed(args.seed + index)))
                names.append(named(draws[-1], extractor.classify))
                scores = fid_kid(test, draws[-1], extractor, kid_subset_size=SETTINGS.kid_subset_size)
                fids.append(scores["fid"])
                kids.append(scores["kid_mean"])
            pooled = torch.cat(names)
            counts = " / ".join(str(int((pooled == k).sum())) for k in range(len(labels)))
            share = float((pooled >= 0).float().mean())
            fid, kid = torch.tensor(fids), torch.tensor(kids)
            spread = f" ± {fid.std():.2f}" if args.draws > 1 else ""
            cells = f"{share:.1%} | {counts} | {fid.mean():.2f}{spread} | {kid.mean():.4f}"
            return f"| {label} | {epochs} | {cells} |", draws[0]

        test_names = named(test, extractor.classify)
        test_counts = " / ".join(str(int((test_names == k).sum())) for k in range(len(labels)))
        rows = [
            f"| test images | - | {float((test_names >= 0).float().mean()):.1%} | {test_counts} | - | - |"
        ]
        rows.append(row("training images", "-", training_images)[0])
        gallery = []
        for folder, model in zip(args.models, models, strict=True):
            epochs = len(json.loads((folder / "history.json").read_text())["history"])
            cells = []
            for drawn, draw in samplers(model).items():
                text, images = row(f"{folder.parent.name}/{folder.name} ({drawn})", str(epochs), draw)
                rows.append(text)
                if grids:
                    png = save_grid(images[:64], grids / f"{folder.name}-{epochs}ep-{drawn}.png").name
                    cells.append(f"{drawn}: ![{drawn}](results/{png})")
            if grids:
                gallery.append(
                    f"| {folder.name} ({epochs} epochs) | ![real](results/{real_png}) | {' '.join(cells)} |"
                )

    command = " ".join([".venv/bin/python", "bench/recognisable.py", *sys.argv[1:]])
    report = f"""# How recognisable are the samples? The share the featurizer's classifier names

Dataset: {data.name} ({"x".join(map(str, data.image_shape))}). Each model draws {args.draws} times
{SETTINGS.num_samples} images (latents from seeds {args.seed} to {args.seed + args.draws - 1}); the
training images row draws as many training images at random each time, the spread any model's FID has
from its draw alone. Named: the featurizer `{extractor_id}` (validation accuracy {accuracy:.1%} on the
labels) gives one label a probability of at least {NAMED_PROBABILITY}, over all draws (the test row:
the {len(test)} test images once). Named per label: {" / ".join(labels)}. FID (mean ± standard deviation
over the draws) and KID (mean; subsets of {SETTINGS.kid_subset_size}) against the test images in the
same featurizer's feature space.

Machine: {machine()}.
Command: `{command}`

| images | epochs | named | named per label | FID | KID |
|---|---:|---:|---|---:|---:|
{chr(10).join(rows)}

{GALLERY_HEADER + chr(10).join(gallery) if gallery else ""}"""
    publish(args, report)


if __name__ == "__main__":
    main()
