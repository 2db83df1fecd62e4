"""Evaluation as a Ray task: on the cluster's hardware (a GPU where it has one), scheduled by Ray beside
the trainings, rather than in the process that orchestrates them.

The task reads the prepared data and the feature extractor from storage the cluster reaches (the
project directory on one machine) and keeps them for the evaluations that follow in the same Ray
worker; only the model travels, on the CPU, and only the `Evaluation` comes back. The orchestrating
process never touches a GPU and holds no copy of the splits for evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import torch
from torch import nn

from components.cluster import ProgressPoster, gpus_to_use, progress_feed
from components.config import Params
from components.data.prepared import load_prepared_version
from components.evaluation.evaluate import (
    Evaluation,
    EvaluationProgress,
    EvaluationSettings,
    RealFeatureCache,
    evaluate_model,
    feature_extractor,
    feature_extractor_id,
)
from components.models import GenerativeModel


@dataclass(frozen=True)
class ExtractorSource:
    """Where the FID/KID feature extractor comes from: params.yaml `evaluate.feature_extractor` and
    its files."""

    kind: str  # "featurizer" or "inception"
    featurizer_dir: str
    inception_weights: str | None = None

    @classmethod
    def from_params(cls, params: Params, project_dir: str | Path) -> ExtractorSource:
        """The extractor params.yaml names; its paths are the project's."""
        project, weights = Path(project_dir), params.evaluate.inception_weights
        return cls(
            params.evaluate.feature_extractor,
            str(project / params.featurizer.dir),
            str(project / Path(weights).expanduser()) if weights else None,
        )

    def id(self) -> str:
        """The extractor's id, which hashes its weights, without loading it."""
        return feature_extractor_id(self.kind, self.featurizer_dir, self.inception_weights)


@dataclass(frozen=True)
class EvaluationTask:
    """Everything an evaluation reads besides the model, as paths and settings a Ray worker can use."""

    prepared_dir: str
    data_version: str
    extractor: ExtractorSource
    real_features_dir: str  # the cache of the real splits' features, one directory per extractor and version
    settings: EvaluationSettings
    cpus: float
    gpus: float | str  # "auto": one when the cluster has GPUs
    context: dict[str, str] = field(default_factory=dict)  # what else decides the scores, for the record

    @classmethod
    def from_params(
        cls, params: Params, project_dir: str | Path, data_version: str, context: dict[str, str]
    ) -> EvaluationTask:
        project = Path(project_dir)
        section = params.evaluate
        return cls(
            prepared_dir=str(project / params.data.prepared_dir),
            data_version=data_version,
            extractor=ExtractorSource.from_params(params, project),
            real_features_dir=str(project / section.real_features_dir),
            settings=EvaluationSettings.from_params(params),
            cpus=section.cpus_per_task,
            gpus=section.gpus_per_task,
            context=context,
        )


@functools.lru_cache(maxsize=2)
def _extractor(source: ExtractorSource, extractor_id: str, device: str) -> nn.Module:
    """The feature extractor on `device`, loaded once per Ray worker and weights (`extractor_id`
    hashes them, so a featurizer retrained in the same directory is loaded anew)."""
    extractor, _ = feature_extractor(source.kind, source.featurizer_dir, source.inception_weights)
    return extractor.to(device)


def run_evaluation(
    model: GenerativeModel,
    task: EvaluationTask,
    on_progress: Callable[[EvaluationProgress], None] | None = None,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """`evaluate_model` of `model` under `task` in this process: what the Ray task runs."""
    data = load_prepared_version(task.prepared_dir, task.data_version)
    extractor_id = task.extractor.id()
    evaluation = evaluate_model(
        model.to(device),
        data,
        _extractor(task.extractor, extractor_id, str(device)),
        extractor_id,
        task.settings,
        context=task.context,
        on_progress=on_progress,
        real_features=RealFeatureCache(Path(task.real_features_dir) / extractor_id / task.data_version),
    )
    evaluation.images = {
        name: (images.cpu(), per_row) for name, (images, per_row) in evaluation.images.items()
    }
    return evaluation


@ray.remote
def _evaluation_task(
    model: GenerativeModel, task: EvaluationTask, poster: ProgressPoster | None
) -> Evaluation:
    report = None if poster is None else (lambda update: poster.post(asdict(update)))
    device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
    try:
        return run_evaluation(model, task, report, device)
    finally:
        if poster is not None:
            poster.flush()


def evaluate_on_cluster(
    model: GenerativeModel,
    task: EvaluationTask,
    on_progress: Callable[[EvaluationProgress], None] | None = None,
) -> Evaluation:
    """Evaluate `model` as a Ray task on the connected cluster with the task's CPUs and GPUs; its
    progress reaches `on_progress` here about twice a second."""
    with progress_feed(on_progress, EvaluationProgress) as poster:
        options = {"num_cpus": task.cpus, "num_gpus": gpus_to_use(task.gpus)}
        return ray.get(_evaluation_task.options(**options).remote(model.cpu(), task, poster))
