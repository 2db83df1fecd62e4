"""Benchmark what running an evaluation as a Ray task costs over running it in this process.

On a fresh local Ray instance (2 CPUs), the same evaluation of one untrained model on the built-in
digits runs `--repeat` times as a Ray task (`evaluate_on_cluster`: the first lands on a new Ray
worker, which imports torch and loads the data and the feature extractor; later ones may find that
worker idle), then `--repeat` times in this process on one thread (`run_evaluation`, as the task
runs it). A featurizer trained for one epoch serves as the extractor; the real splits' features are
cached after the first evaluation, as in a pipeline run.

    .venv/bin/python bench/evaluation_task_cost.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
from common import machine, prepared_in, publish, results_arguments

from components.data.importers import builtin_dataset
from components.evaluation.evaluate import EvaluationSettings
from components.evaluation.featurizer import train_featurizer
from components.evaluation.on_cluster import (
    EvaluationTask,
    ExtractorSource,
    evaluate_on_cluster,
    run_evaluation,
)
from components.models import create_model

RESULTS = Path(__file__).with_name("RESULTS-evaluation-task-cost.md")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vae")
    parser.add_argument("--repeat", type=int, default=3)
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-evaluation-task-") as tmp:
        work = Path(tmp)
        data = prepared_in(work, builtin_dataset("digits"))
        train_featurizer(
            work / "prepared", work / "featurizer", feature_dim=16, epochs=1, batch_size=128, lr=2e-3, seed=0
        )
        task = EvaluationTask(
            prepared_dir=str(work / "prepared"),
            data_version="bench",
            extractor=ExtractorSource("featurizer", str(work / "featurizer")),
            real_features_dir=str(work / "real-features"),
            settings=EvaluationSettings(
                num_samples=1000, kid_subset_size=100, importance_samples=100, batch_size=500, seed=0
            ),
            cpus=1,
            gpus=0,
        )
        torch.manual_seed(0)
        model = create_model(args.model, data.image_shape)
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
        )
        try:
            on_cluster = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                evaluate_on_cluster(copy.deepcopy(model), task)
                on_cluster.append(time.perf_counter() - started)
        finally:
            ray.shutdown()
        torch.set_num_threads(1)
        in_process = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            run_evaluation(copy.deepcopy(model), task)
            in_process.append(time.perf_counter() - started)
    rows = [
        f"| {i + 1} | {a:.2f} | {b:.2f} |"
        for i, (a, b) in enumerate(zip(on_cluster, in_process, strict=True))
    ]
    report = "\n".join(
        [
            "# An evaluation as a Ray task against the same evaluation in this process",
            "",
            f"`{args.model}` (untrained) on the built-in digits: 1,000 samples, FID/KID against both splits, "
            "the NLL bound with 100 importance samples; wall seconds per evaluation, in order.",
            "",
            f"Machine: {machine()}.",
            f"Command: `.venv/bin/python bench/evaluation_task_cost.py {' '.join(sys.argv[1:])}`",
            "",
            "| evaluation | as a Ray task s | in this process s |",
            "|---:|---:|---:|",
            *rows,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
