"""The distributed path on real Ray: a crash after a checkpoint, DDP gradients, divergence.

Nothing is mocked. The multi-node tests (placement on two nodes, a killed worker) run on the stack's
two-node cluster, in test_stack.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import cloudpickle
from ray_checkpoints import CrashAfterCheckpoint, SimulatedCrash
from torch.overrides import TorchFunctionMode
from two_nodes import TINY_VAE, digits_job

from components.config import load_params
from components.models import create_model
from components.training.batches import DeviceBatches
from components.training.jobs import TrainingDiverged, train_job, train_model
from components.training.ray_train import RayContext, Scaling
from components.training.trainer import (
    LocalContext,
    WorkerContext,
    _distribute,
    read_outcome,
    run_training,
    seed_everything,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# Ray workers cannot import a test module by name, so the worker loop defined here travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GRADIENT_FAMILIES = {"vae": TINY_VAE, "gan": {"latent_dim": 8, "hidden": 32}}
GLOBAL_BATCH = 16
SEED = 5


# --- 0. In-process: a crash right after an epoch-end checkpoint (runs before any Ray start-up) -------


def test_crash_after_an_epoch_end_checkpoint_keeps_that_epochs_metrics(digits, tmp_path):
    steps_per_epoch = -(-len(digits.train) // 128)
    job = replace(
        digits_job(digits.image_shape, checkpoint_every_steps=steps_per_epoch), batch_size=128, epochs=2
    )
    x_val = digits.val.binary.astype(np.float32)
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "uninterrupted"))
    with pytest.raises(SimulatedCrash):
        run_training(
            job, digits.train.images, x_val, CrashAfterCheckpoint(tmp_path / "crashed", steps_per_epoch)
        )
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "crashed"))
    resumed, uninterrupted = read_outcome(tmp_path / "crashed"), read_outcome(tmp_path / "uninterrupted")
    assert resumed.steps == 2 * steps_per_epoch
    assert resumed.history[0] == uninterrupted.history[0]  # epoch 1 ran once, before the crash


# --- 1. DDP under Ray Train: two workers with batch B give the gradient of one process with 2B ---------


class SharedNoise(TorchFunctionMode):
    """Gives every example of the global batch the same Gaussian noise however the batch is sharded.

    Each `torch.randn` / `torch.randn_like` call draws noise for the whole global batch from one
    seeded generator and keeps this rank's rows. `DistributedSampler` deals examples round-robin,
    so global row i sits on rank i % world as local row i // world: rows `rank::world`.
    """

    def __init__(self, rank: int, world_size: int, seed: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        local = func(*args, **(kwargs or {}))
        if func not in (torch.randn, torch.randn_like):
            return local
        self.calls += 1
        full = torch.randn(len(local) * self.world_size, *local.shape[1:], generator=self.generator)
        return full[self.rank :: self.world_size].to(local)


def phase_gradients(family: str, data: np.ndarray, ctx: WorkerContext) -> dict[str, np.ndarray]:
    """Flattened gradient of each phase's loss on this worker's first batch, from the initial weights,
    with the model wrapped and the data sharded exactly as `run_training` does."""
    seed_everything(SEED)
    model = create_model(family, data.shape[1:], **GRADIENT_FAMILIES[family])
    network = _distribute(model, ctx)
    batches = DeviceBatches(
        data,
        GLOBAL_BATCH // ctx.world_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=SEED,
        device=ctx.device,
    )
    batch = next(iter(batches.epoch(0)))
    gradients = {}
    for phase in model.phases:
        model.zero_grad(set_to_none=True)
        with SharedNoise(ctx.rank, ctx.world_size, SEED) as noise:
            network(batch, phase)["loss"].backward()
        assert noise.calls > 0, f"{family} drew no Gaussian noise in phase {phase}: the control is moot"
        flat = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        gradients[phase] = torch.cat([g.flatten() for g in flat]).numpy()
    return gradients


def _gradient_worker(config: dict) -> None:
    ctx = RayContext()
    for family in GRADIENT_FAMILIES:
        for phase, gradient in phase_gradients(family, config["data"], ctx).items():
            np.save(Path(config["out"]) / f"{family}-{phase}-rank{ctx.rank}.npy", gradient)


@pytest.fixture(scope="module")
def ddp_gradients(ray_instance, tmp_path_factory) -> Path:
    """Per-rank gradients written by two Ray Train workers (one gloo process group, 1 CPU each)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("gradients")
    TorchTrainer(
        _gradient_worker,
        train_loop_config={"data": gradient_data(), "out": str(out)},
        scaling_config=Scaling(workers=2, gpus_per_worker=0).scaling_config(),
        run_config=RunConfig(name="ddp-gradients", storage_path=str(out / "ray")),
    ).fit()
    return out


def gradient_data() -> np.ndarray:
    """The same binary images in every process (drawn from a local generator, not a global one)."""
    return (np.random.default_rng(SEED).random((GLOBAL_BATCH, 1, 8, 8)) < 0.5).astype(np.float32)


@pytest.mark.parametrize("family", sorted(GRADIENT_FAMILIES))
def test_two_ddp_workers_match_one_process_on_the_double_batch(family, ddp_gradients, tmp_path):
    single = phase_gradients(family, gradient_data(), LocalContext(tmp_path))
    for phase, expected in single.items():
        rank0, rank1 = (np.load(ddp_gradients / f"{family}-{phase}-rank{r}.npy") for r in (0, 1))
        np.testing.assert_array_equal(
            rank0, rank1, err_msg=f"{family}/{phase}: ranks disagree after all-reduce"
        )
        assert np.linalg.norm(expected) > 1e-3, f"{family}/{phase}: vanishing gradient proves nothing"
        np.testing.assert_allclose(rank0, expected, rtol=1e-4, atol=1e-6, err_msg=f"{family}/{phase}")


# --- 2. Divergence -----------------------------------------------------------------------------------


def test_diverging_model_stops_at_the_first_bad_epoch_without_retrying(digits, ray_instance, tmp_path):
    """The workers end normally with the divergence in the final checkpoint, so Ray has nothing to
    retry (a worker error would be retried max_failures times, then raise Ray's own error)."""
    overrides = {
        "train": {
            "epochs": 20,
            "lr": 1e4,  # Adam moves every weight by ~lr per step: the ELBO overflows within an epoch
            "batch_size": 128,
            "workers": 1,
            "gpus_per_worker": 0,
            "checkpoint_every_steps": 0,
        },
        "models": {"vae": TINY_VAE},
    }
    params = load_params(PROJECT_ROOT / "params.yaml", overrides)
    job = train_job(params, "vae", digits.image_shape, digits.levels)
    steps_per_epoch = -(-len(digits.train) // 128)
    with pytest.raises(
        TrainingDiverged, match=rf"model 'vae' diverged: .*non-finite at epoch 1 \(step {steps_per_epoch}\)"
    ):
        train_model(job, digits, params, project_dir=tmp_path, run_name="diverging")
    outcome = read_outcome(tmp_path / "outputs" / "diverging")
    assert outcome.steps == steps_per_epoch and len(outcome.history) == 1
    assert outcome.diverged and "negative_elbo" in outcome.diverged
