"""Benchmark what the generator's moving average (`ema_decay`) buys: its samples against its generator's.

One kept adversarial model trained with `ema_decay` > 0 holds both networks after the same training:
the generator the last step left and the average of its recent weights that `sample` draws from.
Both draw from the same latents; each set is scored by FID and KID against the test split under the
pipeline's featurizer (trained here as `bench/sample_quality.py` trains it, so the scores compare with
its results on the same data and seed), and its first 64 images go to a grid under bench/results/.

    .venv/bin/python bench/generator_average.py --data shapes --size 10000 --resolution 32 KEPT_MODEL_DIR...

KEPT_MODEL_DIR is a model folder `bench/sample_quality.py --keep-models` wrote; `--data` and its
options must be the ones it trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import data_arguments, load_data, machine, publish, results_arguments
from sample_quality import IMAGES, SETTINGS, pipeline_featurizer, real_grid

from components.evaluation.images import save_grid
from components.evaluation.sample_quality import fid_kid
from components.models.adversarial import AdversarialModel
from components.models.model_dir import load_model_dir

RESULTS = Path(__file__).with_name("RESULTS-generator-average.md")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data_arguments(parser)
    parser.add_argument("models", nargs="+", type=Path, metavar="KEPT_MODEL_DIR")
    parser.add_argument("--seed", type=int, default=0, help="featurizer and latents")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = [load_model_dir(folder) for folder in args.models]
    for folder, model in zip(args.models, models, strict=True):
        if not (isinstance(model, AdversarialModel) and model.ema_decay > 0):
            raise SystemExit(f"{folder}: not an adversarial model with a generator's average (ema_decay > 0)")

    with tempfile.TemporaryDirectory(prefix="bench-generator-average-") as tmp:
        data = load_data(args, Path(tmp))
        extractor, extractor_id = pipeline_featurizer(Path(tmp), args.seed)
        test = torch.from_numpy(data.test.images)
        grids = Path(tmp) if args.no_write else IMAGES  # --no-write leaves bench/ as it was
        real_png = real_grid(data, "continuous", grids)
        rows, gallery = [], []
        for folder, model in zip(args.models, models, strict=True):
            epochs = len(json.loads((folder / "history.json").read_text())["history"])
            label = f"{folder.parent.name}/{folder.name}"
            cells = []
            for network_name, network in (
                ("average", model.generator_average.module),
                ("generator", model.generator),
            ):
                with torch.no_grad():
                    latents = torch.Generator().manual_seed(args.seed)
                    images = ((model.generate(SETTINGS.num_samples, latents, network) + 1) / 2).clamp(0, 1)
                scores = fid_kid(test, images, extractor, kid_subset_size=SETTINGS.kid_subset_size)
                rows.append(
                    f"| {label} | {epochs} | {network_name} | {scores['fid']:.2f} "
                    f"| {scores['kid_mean']:.4f} ± {scores['kid_std']:.4f} |"
                )
                png = save_grid(images[:64], grids / f"{folder.name}-{epochs}ep-{network_name}.png").name
                cells.append(f"![{network_name}](results/{png})")
            gallery.append(f"| {label} | ![real](results/{real_png}) | {' | '.join(cells)} |")

    command = " ".join([".venv/bin/python", "bench/generator_average.py", *sys.argv[1:]])
    report = f"""# The generator's moving average against the generator itself, same model, same latents

Dataset: {data.name} ({"x".join(map(str, data.image_shape))}); {SETTINGS.num_samples} samples of each network
(latents from seed {args.seed}), FID and KID (subsets of {SETTINGS.kid_subset_size}) against the
{len(test)} test images in the feature space of `{extractor_id}`.

Machine: {machine()}.
Command: `{command}`

| model | epochs | network | FID | KID |
|---|---:|---|---:|---:|
{chr(10).join(rows)}

| model | real test images | average's samples | generator's samples |
|---|---|---|---|
{chr(10).join(gallery)}
"""
    publish(args, report)


if __name__ == "__main__":
    main()
