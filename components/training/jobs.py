"""Turns `params.yaml` into training jobs and runs one model's training on the cluster."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from components.config import Params, auto_pixels
from components.data.prepared import PreparedData
from components.data.shards import ShardedSplit
from components.models import create_model
from components.models.factory import model_class
from components.training.ray_train import Scaling, train_on_ray
from components.training.trainer import TrainJob, TrainOutcome, TrainProgress


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the model is not registered."""


class ModelsDoNotFit(ValueError):
    """Some models cannot be built for the data and the params; nothing was trained."""


def train_job(params: Params, model_name: str, image_shape: tuple[int, int, int], levels: int) -> TrainJob:
    """The job for `model_name` from params (hyper-parameters under `models.<name>`) for images of
    `image_shape` with `levels` distinct pixel values (which `data.pixels: auto` follows).

    The model is built on PyTorch's meta device (no memory, no arithmetic: FVSBN at 3x64x64 has
    4.5 x 10^8 weights), which checks its name, hyper-parameters and the image shape; a ValueError says
    what does not fit.
    """
    train = params.train.for_model(model_name)
    with torch.device("meta"):
        hparams = params.hyperparameters(model_name, auto_pixels(image_shape, levels))
        spec = create_model(model_name, image_shape, **hparams).spec
    return TrainJob(
        model=spec.to_dict(),
        epochs=train.epochs,
        batch_size=train.batch_size,
        lr=train.lr,
        seed=params.seed,
        precision=train.precision,
        checkpoint_every_steps=train.checkpoint_every_steps,
        compile=train.compile,
        sample_every_epochs=train.sample_every_epochs,
    )


def check_models_fit(
    params: Params, models: list[str], image_shape: tuple[int, int, int], levels: int
) -> None:
    """Raise `ModelsDoNotFit` naming every model of `models` whose job cannot be made for images of
    `image_shape` and `levels` (a setting the data cannot take, an image below the family's minimum,
    an unknown family or hyper-parameter), so that a run stops before any model trains."""
    misfits = []
    for model in models:
        try:
            train_job(params, model, image_shape, levels)
        except ValueError as err:
            shared = "pixels" in params.hyperparameters(model) and "pixels" not in (
                params.models.get(model) or {}
            )
            source = f" (pixels from params.yaml data.pixels: {params.data.pixels})" if shared else ""
            misfits.append(f"{model}: {err}{source}")
    if misfits:
        shape = "x".join(map(str, image_shape))
        raise ModelsDoNotFit(
            f"{len(misfits)} of {len(models)} model(s) cannot be built for the prepared {shape} images "
            "(params.yaml `models.<name>`); nothing was trained:\n  " + "\n  ".join(misfits)
        )


def scaling(params: Params) -> Scaling:
    return Scaling(workers=params.train.workers, gpus_per_worker=params.train.gpus_per_worker)


def storage_path(params: Params, project_dir: Path) -> str:
    """`train.storage_path` as Ray needs it: a URI as it is, a relative path inside the project."""
    configured = params.train.storage_path
    if "://" in configured or Path(configured).is_absolute():
        return configured
    return str(Path(project_dir).resolve() / configured)


def training_splits(
    job: TrainJob, data: PreparedData, streamed: bool
) -> tuple[np.ndarray | ShardedSplit, np.ndarray | ShardedSplit]:
    """What `train_on_ray` is given of the training and validation splits: their shards, which the
    workers read (`streamed`), or the arrays, held whole on each worker's device (small data)."""
    if streamed:
        return data.train.shards, data.val.shards
    kind = model_class(job.spec.name).data_kind_for(job.spec.image_shape, job.spec.hparams)
    return data.train.pixels, data.val.for_kind(kind)


def train_model(
    job: TrainJob,
    data: PreparedData,
    params: Params,
    *,
    project_dir: Path,
    run_name: str,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainOutcome:
    """Train on Ray; the final weights land in `<project>/outputs/<run_name>`.

    A training split above `train.streaming_threshold_images` streams from its shards (and the
    validation split is read from its shards); a smaller one is held whole on each worker's device. `on_progress` receives where the training is, about once a
    second. Raises TrainingDiverged when the loss blew up.
    """
    streamed = len(data.train) > params.train.streaming_threshold_images
    outcome = train_on_ray(
        job,
        *training_splits(job, data, streamed),
        scaling=scaling(params),
        storage_path=storage_path(params, project_dir),
        run_name=run_name,
        output_dir=Path(project_dir) / "outputs" / run_name,
        on_progress=on_progress,
    )
    if outcome.diverged:
        raise TrainingDiverged(f"model {job.spec.name!r} diverged: {outcome.diverged}")
    return outcome
