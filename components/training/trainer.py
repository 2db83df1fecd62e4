"""The one generic training loop, for every family, on one process or as one of N DDP workers.

This module is the only place that knows about devices, precision, DistributedDataParallel,
checkpoints and seeds. A family only says, through `GenerativeModel`, which phases an iteration
has and what each phase's loss is; the loop runs them with one optimiser each. How the loop talks
to the outside world (rank, reporting, checkpoint storage) is a `WorkerContext`, so the same loop
runs under Ray Train (`components.training.ray_train`) and in a plain process (`LocalContext`).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from components.data.prepared import Split
from components.data.shards import ShardedSplit
from components.models import GenerativeModel, ModelSpec, create_model
from components.models.model_dir import load_model_dir, load_weights, save_model_dir
from components.training.batches import BatchSource, DeviceBatches

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"
PROGRESS_SAMPLES_FILE = "progress_samples.npz"
PROGRESS_GRID = 16  # images per progress grid: enough to see them improve, cheap for autoregressive models
# A progress grid's sampling prior (an AE's) is fitted to this many training images, not to the whole
# split: the grid only illustrates, and a full pass every few epochs would cost an epoch on large data.
PROGRESS_FIT_IMAGES = 4096
PROGRESS_INTERVAL_S = 1.0  # rank 0 says where it is this often, not every step


VALIDATION_BATCH = 1024  # images per forward pass of the per-epoch validation


@dataclass
class TrainJob:
    """What to train and how; the same job and worker count give the same result on CPU."""

    model: dict[str, Any]  # ModelSpec.to_dict()
    epochs: int
    batch_size: int  # per worker
    lr: float
    seed: int
    precision: str  # "auto" | "fp32" | "bf16"
    checkpoint_every_steps: int
    compile: bool
    sample_every_epochs: int  # a small grid of samples every this many epochs and at the end; 0: none
    channels_last: bool = True  # on CUDA; not a setting of params.yaml

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.model)

    def checkpoint_due(self, step: int) -> bool:
        return self.checkpoint_every_steps > 0 and step % self.checkpoint_every_steps == 0

    def samples_due(self, epoch: int) -> bool:
        every = self.sample_every_epochs
        return every > 0 and (epoch % every == 0 or epoch == self.epochs)


@dataclass
class TrainOutcome:
    """What a finished training hands back: where the weights are and how training went."""

    model_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    diverged: str | None = None  # why training stopped early, if it did
    resumed_from_step: int = 0  # the checkpoint's step when a restarted run continued, else 0
    progress_samples: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> uint8 N x C x H x W


@dataclass
class TrainProgress:
    """Where a training is, sent by rank 0 about once a second while it trains."""

    step: int
    total_steps: int
    epoch: int  # the epoch in progress, from 1
    epochs: int
    loss: float | None  # the last phase's loss at `step`; None before the first step
    images_per_s: float  # over all workers, since the previous record


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...

    def progress(self, update: TrainProgress) -> None: ...

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]: ...


class LocalContext:
    """A single process without Ray: for unit tests, benchmarks and debugging."""

    rank, world_size = 0, 1

    def __init__(
        self,
        output_dir: Path,
        device: str | torch.device = "cpu",
        on_progress: Callable[[TrainProgress], None] | None = None,
    ):
        self.device = torch.device(device)
        self.output_dir = Path(output_dir)
        self.on_progress = on_progress

    def progress(self, update: TrainProgress) -> None:
        if self.on_progress is not None:
            self.on_progress(update)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            copy_tree(checkpoint_dir, self.output_dir)

    def restored_checkpoint(self) -> AbstractContextManager[Path | None]:
        has_state = (self.output_dir / STATE_FILE).is_file()
        return nullcontext(self.output_dir if has_state else None)


def copy_tree(source: Path, target: Path) -> None:
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, target, dirs_exist_ok=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32. bf16 needs no loss scaler, unlike fp16."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"params.yaml train.precision={precision!r}: expected auto, fp32 or bf16")


def run_training(
    job: TrainJob, x_train: np.ndarray | BatchSource, x_val: np.ndarray | ShardedSplit, ctx: WorkerContext
) -> None:
    """Train `job` on this worker's shard of `x_train`; rank 0 reports and checkpoints.

    `x_train` is the whole split (uint8 pixels, or float32 already in [0, 1]), held on the device, or
    a `BatchSource` that streams this worker's part of it. `x_val` is the validation split as the
    model sees it (float32), or its shards, read batch by batch at each epoch's end.

    The last checkpoint holds the final weights and the history; `read_outcome` reads it back.
    """
    seed_everything(job.seed)  # identical initial weights on every rank
    model = create_model(job.spec.name, job.spec.image_shape, **job.spec.hparams).to(ctx.device)
    conv_layout = job.channels_last and ctx.device.type == "cuda"
    if conv_layout:
        model = model.to(memory_format=torch.channels_last)
    optimizers = model.configure_optimizers(job.lr)
    saved_optimizers = _each_once(optimizers)
    autocast_dtype = resolve_precision(job.precision, ctx.device)
    step, start_epoch, record = 0, 0, {"history": [], "resumed_from_step": 0}
    progress: dict[int, np.ndarray] = {}
    seed_everything(job.seed + 7919 * (ctx.rank + 1))  # ranks draw different noise
    with ctx.restored_checkpoint() as restored:
        if restored is not None:
            step, start_epoch, record, progress = _restore(restored, model, saved_optimizers, ctx)
            record["resumed_from_step"] = step
            if ctx.rank != 0:  # only rank 0's random stream is saved; the others re-derive theirs
                seed_everything(job.seed + 7919 * (ctx.rank + 1) + step)
    history = record["history"]
    network = _distribute(model, ctx)
    if job.compile:
        network = torch.compile(network)

    binary = model.data_kind == "binary"
    val = _validation_batches(x_val, model.data_kind, ctx.device)
    batches = x_train
    if isinstance(x_train, np.ndarray):
        batches = DeviceBatches(
            x_train,
            job.batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=job.seed,
            device=ctx.device,
        )
    steps_per_epoch = len(batches)
    diverged = None
    pacer = _ProgressPacer(ctx, job, steps_per_epoch * job.epochs, step, start_epoch)

    for epoch in range(start_epoch, job.epochs):
        model.train()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        done_in_epoch = step - epoch * steps_per_epoch
        for batch_index, batch in enumerate(batches.epoch(epoch)):
            if batch_index < done_in_epoch:
                continue  # resumed mid-epoch: the sampler order is the same, skip what was done
            if binary:
                batch = torch.bernoulli(batch)  # dynamic binarisation: a fresh sample every epoch
            if conv_layout:
                batch = batch.contiguous(memory_format=torch.channels_last)
            for phase in model.phase_schedule(step):
                optimizer = optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(
                    ctx.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    outputs = network(batch, phase)
                outputs["loss"].backward()
                optimizer.step()
                model.after_optimizer_step(phase)
                for key, value in outputs.items():
                    name = f"{phase}_loss" if key == "loss" else key
                    sums[name] = sums.get(name, 0.0) + value.detach().float()
                    counts[name] = counts.get(name, 0) + 1
            step += 1
            pacer.step_done(step, epoch, outputs["loss"])
            # One due on the epoch's last batch waits for the epoch's metrics (below): saved here, a
            # resume would find the epoch done but not in the history, and lose its training metrics.
            if job.checkpoint_due(step) and batch_index + 1 < steps_per_epoch:
                _checkpoint(ctx, model, saved_optimizers, step, epoch, record, progress, {"step": step})
        metrics = _epoch_metrics(sums, counts, ctx)
        # Every rank sees the same all-reduced training metrics, so all of them stop together.
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if ctx.rank == 0:
            model.eval()
            with torch.no_grad():
                metrics.update(_validation_metrics(model, val()))
                if job.samples_due(epoch + 1) and not bad:  # no drawing from non-finite weights
                    progress[epoch + 1] = _progress_samples(model, batches.whole_split(), job.seed)
        metrics.update(epoch=epoch + 1, step=step)
        history.append(metrics)
        if bad:
            diverged = f"{', '.join(bad)} became non-finite at epoch {epoch + 1} (step {step})"
            break
        # Only checkpoints are reported: Ray Train V2 keeps just the metrics that come with one, and every
        # report costs a wait for the controller's next poll.
        if job.checkpoint_due(step):
            _checkpoint(ctx, model, saved_optimizers, step, epoch + 1, record, progress, metrics)

    pacer.finished(step)
    model.eval()
    if ctx.rank == 0 and diverged is None:
        model.fit_after_training(batches.whole_split())
    final = {"step": step, "diverged": 1.0 if diverged else 0.0}
    _checkpoint(ctx, model, saved_optimizers, step, job.epochs, record, progress, final, reason=diverged)


def _validation_batches(
    x_val: np.ndarray | ShardedSplit, data_kind: str, device: torch.device
) -> Callable[[], Iterator[Tensor]]:
    """A new pass over the validation split in batches on `device`, each time it is called: from the
    array held on the device, or read shard by shard (a split too large to hold)."""
    if isinstance(x_val, ShardedSplit):
        split = Split(x_val)
        return lambda: (torch.from_numpy(b).to(device) for b in split.batches(data_kind, VALIDATION_BATCH))
    whole = torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32)).to(device)
    return lambda: iter(whole.split(VALIDATION_BATCH))


def _validation_metrics(model: GenerativeModel, batches: Iterable[Tensor]) -> dict[str, float]:
    """The family's validation metrics (means over images) over the whole split: the batches' means
    weighted by their sizes."""
    # Summed on the device and read once at the end: a float() per batch would wait for the device.
    sums: dict[str, Tensor] = {}
    count = 0
    for batch in batches:
        for name, value in model.validation_metrics(batch).items():
            sums[name] = sums.get(name, 0.0) + value.detach().double() * len(batch)
        count += len(batch)
    return {name: float(total) / count for name, total in sums.items()}


@torch.no_grad()
def _progress_samples(model: GenerativeModel, x_train: Iterable[Tensor], seed: int) -> np.ndarray:
    """Samples from fixed noise, so the grids of successive epochs show the same draws improving."""
    model.fit_after_training(_first_images(x_train, PROGRESS_FIT_IMAGES))  # follows the current codes
    images = model.sample(PROGRESS_GRID, generator=torch.Generator(device=model.device).manual_seed(seed))
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def _first_images(pieces: Iterable[Tensor], limit: int) -> Iterator[Tensor]:
    """The leading `limit` images of a split given in pieces, reading no piece beyond them."""
    for piece in pieces:
        yield piece[:limit]
        limit -= len(piece)
        if limit <= 0:
            return


class _ProgressPacer:
    """Sends rank 0's `TrainProgress` at most every `PROGRESS_INTERVAL_S`; one clock read per step."""

    def __init__(self, ctx: WorkerContext, job: TrainJob, total_steps: int, step: int, epoch: int):
        self.ctx, self.job, self.total_steps = ctx, job, total_steps
        self.epoch, self.loss, self.images_per_s = epoch, None, 0.0
        self.sent_at, self.sent_step = time.monotonic(), step
        self._send(step)

    def step_done(self, step: int, epoch: int, loss: Tensor) -> None:
        self.epoch, self.loss = epoch, loss  # a reference: read (one host sync) only when sent
        if self.ctx.rank == 0 and time.monotonic() - self.sent_at >= PROGRESS_INTERVAL_S:
            self._send(step)

    def finished(self, step: int) -> None:
        self._send(step)

    def _send(self, step: int) -> None:
        if self.ctx.rank != 0:
            return
        now = time.monotonic()
        if step > self.sent_step:  # else (the last step already sent) the rate stays the last measured
            images = (step - self.sent_step) * self.job.batch_size * self.ctx.world_size
            self.images_per_s = images / max(now - self.sent_at, 1e-9)
        update = TrainProgress(
            step,
            self.total_steps,
            min(self.epoch + 1, self.job.epochs),
            self.job.epochs,
            None if self.loss is None else float(self.loss.detach()),
            self.images_per_s,
        )
        self.ctx.progress(update)
        self.sent_at, self.sent_step = now, step


def _distribute(model: GenerativeModel, ctx: WorkerContext) -> nn.Module:
    if ctx.world_size == 1:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Multi-phase families leave the other networks unused in each phase (the generator in the
    # discriminator phase), so DDP must look for unused parameters; single-phase ones skip the cost.
    # No buffer is broadcast from rank 0 before each forward (DDP's default): the autoregressive
    # families' masks never change and are up to hundreds of MB (bench/RESULTS-ddp-buffers.md), and
    # the buffers that do change (BatchNorm's running statistics, read only in eval mode) are rank 0's
    # own either way, which is the rank that checkpoints.
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=len(model.phases) > 1, broadcast_buffers=False
    )


def _epoch_metrics(sums: dict[str, Tensor], counts: dict[str, int], ctx: WorkerContext) -> dict[str, float]:
    """Mean of each metric over the epoch and over all workers: one host sync per epoch."""
    if not sums:
        return {}
    names = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[n]) for n in names])
    if ctx.world_size > 1:
        torch.distributed.all_reduce(totals)
    denominators = torch.tensor([counts[n] * ctx.world_size for n in names], device=totals.device)
    return dict(zip(names, (totals / denominators).tolist(), strict=True))


def _checkpoint(
    ctx: WorkerContext, model, optimizers, step, epoch, record, progress, metrics, reason=None
) -> None:
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="genpipe-ckpt-") as tmp:
        directory = Path(tmp)
        save_model_dir(model, directory)
        state = {
            "step": step,
            "epoch": epoch,
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": torch.get_rng_state(),  # rank 0's stream; the other ranks re-derive theirs from the step
        }
        torch.save(state, directory / STATE_FILE)
        (directory / HISTORY_FILE).write_text(json.dumps({**record, "diverged": reason}, indent=2))
        np.savez_compressed(
            directory / PROGRESS_SAMPLES_FILE, **{f"epoch_{e}": a for e, a in progress.items()}
        )
        ctx.report(metrics, directory)


def _each_once(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.optim.Optimizer]:
    """Each optimiser once, under the first phase that names it: phases may share one (a lazy
    penalty steps its player's), and a checkpoint holds its state once."""
    first: dict[int, tuple[str, torch.optim.Optimizer]] = {}
    for name, optimizer in optimizers.items():
        first.setdefault(id(optimizer), (name, optimizer))
    return dict(first.values())


def _restore(directory: Path, model, optimizers, ctx: WorkerContext) -> tuple[int, int, dict, dict]:
    load_weights(model, directory, ctx.device)
    state = torch.load(directory / STATE_FILE, map_location=ctx.device, weights_only=True)
    for name, optimizer in optimizers.items():
        # The job's learning rates win over the saved ones, so a continued run may change the rate;
        # the optimiser's moments carry over.
        rates = [group["lr"] for group in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizers"][name])
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = lr
    if ctx.rank == 0:
        torch.set_rng_state(state["rng"].cpu())  # a single worker continues exactly where it stopped
    record = json.loads((directory / HISTORY_FILE).read_text())
    history = {"history": record["history"], "resumed_from_step": 0}
    return state["step"], state["epoch"], history, _read_progress(directory)


def restorable(directory: Path) -> bool:
    """Whether `directory` holds a whole checkpoint of `run_training`'s, every file readable as
    `_restore` reads it: a copy into storage cut short by a kill is not."""
    try:
        load_model_dir(directory)
        torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        json.loads((directory / HISTORY_FILE).read_text())
        _read_progress(directory)
    except Exception:  # a cut-short file fails in whichever reader meets it first, each its own way
        return False
    return True


def _read_progress(directory: Path) -> dict[int, np.ndarray]:
    path = directory / PROGRESS_SAMPLES_FILE
    if not path.is_file():  # a checkpoint written before progress grids existed
        return {}
    with np.load(path) as grids:
        return {int(name.removeprefix("epoch_")): grids[name] for name in grids.files}


def read_outcome(checkpoint_dir: Path) -> TrainOutcome:
    """The outcome recorded in a final checkpoint written by `run_training`."""
    record = json.loads((checkpoint_dir / HISTORY_FILE).read_text())
    steps = record["history"][-1]["step"] if record["history"] else 0
    return TrainOutcome(
        checkpoint_dir,
        record["history"],
        steps,
        record["diverged"],
        record.get("resumed_from_step", 0),
        _read_progress(checkpoint_dir),
    )
