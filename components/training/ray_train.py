"""Runs the generic trainer under Ray Train: one `TorchTrainer` per model, DDP across its workers.

Ray stays at this edge: the per-worker function is `run_training` plus Ray's context, report and
checkpoint calls. Small training splits travel whole through Ray's object store and sit on each
worker's device. Larger ones stream: the shard files become a Ray Data dataset handed to
`TorchTrainer(datasets=...)`, read by Ray Data tasks from storage the cluster reaches (the project
directory on one machine), and each worker iterates its equal part with prefetch.

Streamed order, and how far it repeats: the shard order is a permutation drawn from the job's seed
(fixed for the run), the blocks reach the workers in that order (`preserve_order`, which also makes
Ray Data's split of blocks between workers deterministic), and each worker shuffles within a buffer
of one shard's size with a seed drawn from (seed, epoch, rank). So the same seed, data and worker
count give the same batches every run; each epoch visits the shards in the same order but mixes
their images differently. A resumed run replays the interrupted epoch's order and skips the batches
it had already trained on, so it ends with the planned step count.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from components.cluster import ProgressPoster, gpus_to_use, progress_feed
from components.data.shards import ShardedSplit
from components.training.batches import StreamedBatches, streamed_batches_per_epoch
from components.training.trainer import (
    TrainJob,
    TrainOutcome,
    TrainProgress,
    WorkerContext,
    read_outcome,
    restorable,
    run_training,
)

logger = logging.getLogger(__name__)

# Ray Train V2's controller collects at most one report per worker per poll, one poll every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and `ray.train.report` blocks while the worker's
# previous report is uncollected: with epochs shorter than that, training mostly waits. Ray forwards
# the variable from the driver to the controller and the workers.
REPORT_POLL_ENV, REPORT_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"


def collect_reports_promptly() -> None:
    """Let Ray collect reports every 0.1 s unless the environment already says otherwise."""
    os.environ.setdefault(REPORT_POLL_ENV, REPORT_POLL_S)


@dataclass
class Scaling:
    """How many Ray Train workers a model gets and what each holds."""

    workers: int
    gpus_per_worker: float | str  # "auto": 1 when the cluster has GPUs, else 0
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker-group restarts from the latest checkpoint

    def check_room_for_reads(self) -> None:
        """Ray Data's read tasks need a CPU the training workers do not hold, or streaming waits forever."""
        cpus, held = ray.cluster_resources().get("CPU", 0), self.workers * self.cpus_per_worker
        if cpus - held < 1:
            raise ValueError(
                f"streaming the training split needs 1 CPU beyond the {held:g} its {self.workers} worker(s) "
                f"hold, and the Ray cluster has {cpus:g}: use fewer workers, or raise "
                "train.streaming_threshold_images to keep this split on the device"
            )

    def scaling_config(self) -> ScalingConfig:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        gpus = gpus_to_use(self.gpus_per_worker)
        resources = {"CPU": self.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
        return ScalingConfig(num_workers=self.workers, use_gpu=gpus > 0, resources_per_worker=resources)


class RayContext:
    """`WorkerContext` backed by Ray Train's session of the current worker."""

    def __init__(
        self, progress_poster: ProgressPoster | None = None, recovered_checkpoint: Checkpoint | None = None
    ) -> None:
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.progress_poster = progress_poster
        self.recovered_checkpoint = recovered_checkpoint  # for a run whose Ray record was unreadable

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def progress(self, update: TrainProgress) -> None:
        if self.progress_poster is not None:
            self.progress_poster.post(asdict(update))

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            checkpoint = self.recovered_checkpoint
        if checkpoint is None:
            return nullcontext(None)
        return _as_path(checkpoint)


@contextmanager
def _as_path(checkpoint: Checkpoint):
    with checkpoint.as_directory() as directory:
        yield Path(directory)


STREAMED_DATASET = "train"
PREFETCH_BATCHES = 2  # batches a worker's iterator reads ahead while the current one trains
READ_AHEAD_SHARDS = 4  # shards per worker Ray Data may hold in the object store ahead of training
SHARD_COLUMN = "data"  # the column `ray.data.read_numpy` puts each file's rows in


def shard_order(num_shards: int, seed: int) -> np.ndarray:
    """The order the training shards are streamed in: a permutation fixed by `seed`."""
    return np.random.default_rng([seed, num_shards]).permutation(num_shards)


def shard_dataset(split: ShardedSplit, seed: int) -> ray.data.Dataset:
    """The split's uint8 image shards as a Ray Data dataset, one read task per shard, in `shard_order`."""
    paths = split.paths("images")
    dataset = ray.data.read_numpy(
        [str(paths[i]) for i in shard_order(len(paths), seed)], override_num_blocks=len(paths)
    )
    dataset.context.execution_options.preserve_order = True
    return dataset


def epoch_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a worker's local shuffle buffer in one epoch: a different mix every epoch, repeatable."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def read_ahead_bytes(split: ShardedSplit, workers: int) -> int:
    """The object store memory Ray Data may fill with shards read ahead of the workers: a few shards
    per worker. Unbounded, its reads race ahead of training into the object store, more the larger
    the split, until the store's own budget stops them (up to 3 GB of a 10 GB split here, see
    bench/RESULTS-streaming.md)."""
    # Memory-mapped: only the first shard's header is read, for the size of one uint8 image.
    image_bytes = int(np.prod(np.load(split.paths("images")[0], mmap_mode="r").shape[1:]))
    return READ_AHEAD_SHARDS * workers * split.largest_shard * image_bytes


def stream_settings(split: ShardedSplit) -> dict[str, Any]:
    """What a worker needs besides its dataset shard to stream `split`."""
    return {
        "num_images": len(split),
        "shuffle_buffer": split.largest_shard,
        # Rank 0 reads them in turn for the fit after training (an AE's code Gaussian).
        "shard_files": [str(path) for path in split.paths("images")],
    }


def streamed_batches(
    shard: ray.data.DataIterator | ray.data.Dataset, job: TrainJob, stream: dict[str, Any], ctx: WorkerContext
) -> StreamedBatches:
    """This worker's batches from its part of the streamed dataset (`get_dataset_shard` in a worker)."""

    def epoch_batches(epoch: int):
        for batch in shard.iter_torch_batches(
            batch_size=job.batch_size,
            prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=stream["shuffle_buffer"],
            local_shuffle_seed=epoch_shuffle_seed(job.seed, epoch, ctx.rank),
        ):
            yield batch[SHARD_COLUMN]

    batches = streamed_batches_per_epoch(stream["num_images"], ctx.world_size, job.batch_size)
    return StreamedBatches(epoch_batches, batches, stream["shard_files"], ctx.device)


def _worker_entry(config: dict[str, Any]) -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    job = TrainJob(**config["job"])
    ctx = RayContext(config.get("progress_poster"), config.get("recovered_checkpoint"))
    stream = config.get("stream")
    if stream is None:
        train = ray.get(config["train"])
    else:
        train = streamed_batches(ray.train.get_dataset_shard(STREAMED_DATASET), job, stream, ctx)
    val = config["val"]
    try:
        run_training(job, train, val if isinstance(val, ShardedSplit) else ray.get(val), ctx)
    finally:
        if ctx.progress_poster is not None:
            ctx.progress_poster.flush()


# Ray Train's record of a run's registered checkpoints, in the run's folder of the storage.
RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def recover_cut_short_snapshot(run_uri: str) -> Checkpoint | None:
    """Ray Train rewrites a run's snapshot in place, so a run killed while writing it leaves it empty or
    cut short, and Ray then refuses to start that run again ("CheckpointManagerInitializationError").
    Such a snapshot is moved aside (`.unreadable`), and the run's newest whole checkpoint is returned for
    the workers to continue from: None when the snapshot reads, or no checkpoint is whole."""
    fs, run_path = pyarrow.fs.FileSystem.from_uri(run_uri)
    snapshot = posixpath.join(run_path, RUN_SNAPSHOT)
    if fs.get_file_info(snapshot).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(snapshot) as stream:
        record = stream.read()
    try:
        json.loads(record)
        return None
    except ValueError:  # empty, cut short mid-value or mid-character
        fs.move(snapshot, f"{snapshot}.unreadable")
    folders = fs.get_file_info(pyarrow.fs.FileSelector(run_path))
    # Ray names checkpoint folders by their UTC time, so the names sort oldest to newest.
    checkpoints = sorted(
        (
            f.path
            for f in folders
            if f.type == pyarrow.fs.FileType.Directory and f.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    for path in checkpoints:
        checkpoint = Checkpoint(path, filesystem=fs)
        with checkpoint.as_directory() as directory:
            if restorable(Path(directory)):
                logger.warning(
                    "%s was unreadable (cut short by a kill while Ray wrote it) and is moved aside: "
                    "continuing from %s, the newest whole checkpoint",
                    snapshot,
                    path,
                )
                return checkpoint
    logger.warning(
        "%s was unreadable and is moved aside; no whole checkpoint is left: starting over", snapshot
    )
    return None


def train_on_ray(
    job: TrainJob,
    x_train: np.ndarray | ShardedSplit,
    x_val: np.ndarray | ShardedSplit,
    *,
    scaling: Scaling,
    storage_path: str | Path,
    run_name: str,
    output_dir: Path,
    on_progress: Callable[[TrainProgress], None] | None = None,
) -> TrainOutcome:
    """Train `job` on the connected Ray cluster and copy the final weights to `output_dir`.

    `x_train` whole (uint8 pixels) goes through the object store onto each worker's device; as a
    `ShardedSplit` it streams from its shard files through Ray Data. `x_val` whole goes through the
    object store; as a `ShardedSplit` rank 0 reads its shard files batch by batch. Re-running with the same
    `storage_path` and `run_name` continues from the run's latest checkpoint instead of starting over.
    `on_progress` receives rank 0's progress about once a second.
    """
    storage = str(Path(storage_path).resolve()) if "://" not in str(storage_path) else str(storage_path)
    collect_reports_promptly()
    config: dict[str, Any] = {
        "job": asdict(job),
        "val": x_val if isinstance(x_val, ShardedSplit) else ray.put(x_val),
        "recovered_checkpoint": recover_cut_short_snapshot(posixpath.join(storage, run_name)),
    }
    if isinstance(x_train, ShardedSplit):
        scaling.check_room_for_reads()
        config["stream"] = stream_settings(x_train)
        ingest = ray.train.DataConfig.default_ingest_options()
        ingest.preserve_order = True
        ingest.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=read_ahead_bytes(x_train, scaling.workers)
        )
        data_options = {
            "datasets": {STREAMED_DATASET: shard_dataset(x_train, job.seed)},
            "dataset_config": ray.train.DataConfig(execution_options=ingest),
        }
    else:
        config["train"] = ray.put(x_train)
        data_options = {}
    with progress_feed(on_progress, TrainProgress) as poster:
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={**config, "progress_poster": poster},
            scaling_config=scaling.scaling_config(),
            **data_options,
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
