"""Runs the generic trainer under Ray Train: one `TorchTrainer` per model, DDP across its workers.

Ray stays at this edge: the per-worker function is `run_training` plus Ray's context, report and
checkpoint calls. The training arrays travel through Ray's object store, so workers on other nodes
need no shared file system.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from components.training.trainer import TrainJob, TrainOutcome, TrainProgress, read_outcome, run_training

# Ray Train V2's controller collects at most one report per worker per poll, one poll every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and `ray.train.report` blocks while the worker's
# previous report is uncollected: with epochs shorter than that, training mostly waits. Ray forwards
# the variable from the driver to the controller and the workers.
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"
PROGRESS_POLL_S = 0.5  # how often the driver reads the latest progress of a training


def collect_reports_promptly() -> None:
    """Let Ray collect reports every 0.1 s unless the environment already says otherwise."""
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)


@dataclass
class Scaling:
    """How many Ray Train workers a model gets and what each holds."""

    workers: int = 1
    gpus_per_worker: float | str = "auto"  # "auto": 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the latest checkpoint

    def resolved_gpus(self) -> float:
        if self.gpus_per_worker == "auto":
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        gpus = float(self.gpus_per_worker)
        if gpus < 0:
            raise ValueError(f"gpus_per_worker must be >= 0 or 'auto', got {self.gpus_per_worker!r}")
        return gpus

    def scaling_config(self) -> ScalingConfig:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        gpus = self.resolved_gpus()
        resources = {"CPU": self.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        return ScalingConfig(num_workers=self.workers, use_gpu=gpus > 0, resources_per_worker=resources)


@ray.remote(num_cpus=0)
class ProgressInbox:
    """Holds the latest `TrainProgress` of one training until the driver takes it."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def post(self, update: dict[str, Any]) -> None:
        self.latest = update

    def take(self) -> dict[str, Any] | None:
        update, self.latest = self.latest, None
        return update


class RayContext:
    """`WorkerContext` backed by Ray Train's session of the current worker."""

    def __init__(self, progress_inbox: ray.actor.ActorHandle | None = None) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.progress_inbox = progress_inbox

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def progress(self, update: TrainProgress) -> None:
        if self.progress_inbox is not None:
            self.progress_inbox.post.remote(asdict(update))  # not awaited: training never waits for it

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return nullcontext(None)
        return _as_path(checkpoint)


@contextmanager
def _as_path(checkpoint: Checkpoint):
    with checkpoint.as_directory() as directory:
        yield Path(directory)


def _worker_entry(config: dict[str, Any]) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    job = TrainJob(**config["job"])
    context = RayContext(config.get("progress_inbox"))
    run_training(job, ray.get(config["train"]), ray.get(config["val"]), context)


@contextmanager
def progress_feed(on_progress: Callable[[TrainProgress], None] | None) -> Iterator[dict[str, Any]]:
    """Train-loop config entries that make rank 0 post progress; a thread hands it to `on_progress`."""
    if on_progress is None:
        yield {}
        return
    inbox = ProgressInbox.remote()
    done = threading.Event()

    def forward() -> None:
        while True:
            update = ray.get(inbox.take.remote())
            if update is not None:
                on_progress(TrainProgress(**update))
            if done.wait(PROGRESS_POLL_S):
                return

    poller = threading.Thread(target=forward, name="ray-train-progress", daemon=True)
    poller.start()
    try:
        yield {"progress_inbox": inbox}
    finally:
        done.set()
        poller.join()
        final = ray.get(inbox.take.remote())  # posted after the poller's last look
        if final is not None:
            on_progress(TrainProgress(**final))
        ray.kill(inbox)


def train_on_ray(
    job: TrainJob,
    x_train: np.ndarray,
    x_val: np.ndarray,
    *,
    scaling: Scaling,
    storage_path: str | Path,
    run_name: str,
    output_dir: Path,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainOutcome:
    """Train `job` on the connected Ray cluster and copy the final weights to `output_dir`.

    Re-running with the same `storage_path` and `run_name` continues from the run's latest
    checkpoint instead of starting over. `on_progress` receives rank 0's progress about once a second.
    """
    storage = str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path)
    collect_reports_promptly()
    with progress_feed(on_progress) as progress_config:
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={
                "job": asdict(job),
                "train": ray.put(x_train),
                "val": ray.put(x_val),
                **progress_config,
            },
            scaling_config=scaling.scaling_config(),
            run_config=RunConfig(
                name=run_name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=scaling.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
            ),
        )
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray run {run_name!r} finished without a checkpoint (storage {storage})")
    if output_dir.exists():
        shutil.rmtree(output_dir)
    with result.checkpoint.as_directory() as directory:
        shutil.copytree(directory, output_dir)
    return read_outcome(output_dir)


@contextmanager
def ray_cluster(address: str | None = None):
    """Attach to the cluster at `address` (or $RAY_ADDRESS); else start a local one for this block.

    A cluster that was already connected in this process (a test session's) is reused and left running.
    """
    if ray.is_initialized():
        yield
        return
    # "local" rather than Ray's default of attaching to any cluster it finds on this machine.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
