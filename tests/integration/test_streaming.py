"""Training data streamed through Ray Data from the prepared shards (real Ray, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_job
from ray_checkpoints import CrashAfterCheckpoint, SimulatedCrash

from components.data.prepared import load_prepared, prepare
from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.batches import DeviceBatches, StreamedBatches
from components.training.ray_train import (
    Scaling,
    epoch_shuffle_seed,
    shard_dataset,
    shard_order,
    stream_settings,
    streamed_batches,
)
from components.training.trainer import LocalContext, read_outcome, run_training, seed_everything

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHARD_IMAGES, BATCH, SEED = 100, 64, 5
FAMILIES = {"vae": {"latent_dim": 4, "channels": 8, "hidden": 32}, "dcgan": {"latent_dim": 8, "width": 8}}


@pytest.fixture(scope="module")
def sharded(digits_root, tmp_path_factory):
    """The digits prepared in shards of 100 images, so a batch can straddle two shards."""
    out = tmp_path_factory.mktemp("sharded") / "prepared"
    prepare(digits_root / "raw", out, 0.1, 0.2, 0, shard_images=SHARD_IMAGES)
    return load_prepared(out)


def streamed_rows(split, seed: int) -> torch.Tensor:
    """Row numbers of the split in the order `shard_dataset` streams it (no local shuffle)."""
    starts = [0]
    for shard in split.shards.shards:
        starts.append(starts[-1] + shard.count)
    return torch.cat(
        [torch.arange(starts[i], starts[i + 1]) for i in shard_order(len(split.shards.shards), seed)]
    )


def ray_epoch_batches(split, seed: int, shuffle_seed: int | None = None):
    dataset = shard_dataset(split.shards, seed)
    shuffle = (
        {}
        if shuffle_seed is None
        else {"local_shuffle_buffer_size": SHARD_IMAGES, "local_shuffle_seed": shuffle_seed}
    )
    return [
        batch["data"] for batch in dataset.iter_torch_batches(batch_size=BATCH, prefetch_batches=2, **shuffle)
    ]


def test_ray_data_streams_the_shards_in_the_seeded_order_and_shuffles_repeatably(ray_instance, sharded):
    batches = ray_epoch_batches(sharded.train, SEED)
    rows = streamed_rows(sharded.train, SEED)
    assert torch.equal(torch.cat(batches), torch.from_numpy(sharded.train.pixels)[rows])
    assert (
        sorted(shard_order(len(sharded.train.shards.shards), SEED).tolist())
        != shard_order(len(sharded.train.shards.shards), SEED).tolist()
    )  # a real permutation, so the check above tells orders apart
    first = ray_epoch_batches(sharded.train, SEED, epoch_shuffle_seed(SEED, 0, 0))
    again = ray_epoch_batches(sharded.train, SEED, epoch_shuffle_seed(SEED, 0, 0))
    next_epoch = ray_epoch_batches(sharded.train, SEED, epoch_shuffle_seed(SEED, 1, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], next_epoch[0])
    assert torch.equal(
        torch.cat(first).flatten(1).sum(0), torch.cat(next_epoch).flatten(1).sum(0)
    )  # same images


def phase_gradients(model, batch: torch.Tensor, binary: bool) -> dict[str, torch.Tensor]:
    gradients = {}
    for phase in model.phases:
        torch.manual_seed(SEED)
        x = torch.bernoulli(batch) if binary else batch
        model.zero_grad(set_to_none=True)
        model(x, phase)["loss"].backward()
        gradients[phase] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return gradients


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_and_on_device_batches_give_the_same_gradients(ray_instance, sharded, family):
    """Batch 1 of the stream straddles shards 1 and 2 of the permuted order: the same rows taken from
    the split held on the device give bit-identical losses' gradients in every phase."""
    streamed = StreamedBatches(
        lambda epoch: ray_epoch_batches(sharded.train, SEED), 0, [], torch.device("cpu")
    )
    on_device = DeviceBatches(sharded.train.pixels, BATCH, rank=0, world_size=1, seed=SEED, device="cpu")
    rows = streamed_rows(sharded.train, SEED)
    for index, batch in list(enumerate(streamed.epoch(0)))[:2]:
        same = on_device.batch(rows[index * BATCH : (index + 1) * BATCH])
        assert batch.dtype == same.dtype == torch.float32 and torch.equal(batch, same)
        seed_everything(SEED)
        model = create_model(family, sharded.image_shape, **FAMILIES[family])
        ours = phase_gradients(model, batch, model.data_kind == "binary")
        theirs = phase_gradients(model, same, model.data_kind == "binary")
        assert ours.keys() == set(model.phases)
        for phase in ours:
            assert ours[phase].abs().sum() > 0 and torch.equal(ours[phase], theirs[phase]), phase


def test_streamed_training_resumed_mid_epoch_matches_an_uninterrupted_one(ray_instance, sharded, tmp_path):
    """Ray Data replays an epoch's order for its seeds, so a run resumed from a mid-epoch checkpoint
    skips exactly the batches it had trained on and ends with the same weights."""
    spec = create_model("vae", sharded.image_shape, **FAMILIES["vae"]).spec
    job = cpu_job(spec, epochs=2, batch_size=BATCH, lr=1e-3, seed=SEED, checkpoint_every_steps=7)
    batches_per_epoch = -(-len(sharded.train) // BATCH)
    crash_step = 4 * job.checkpoint_every_steps
    assert batches_per_epoch < crash_step < 2 * batches_per_epoch - 1  # a checkpoint inside epoch 2

    def source() -> StreamedBatches:  # what a Ray Train worker builds, on the whole dataset as rank 0 of 1
        split = sharded.train.shards
        return streamed_batches(
            shard_dataset(split, SEED), job, stream_settings(split), LocalContext(tmp_path)
        )

    x_val = sharded.val.binary.astype("float32")
    run_training(job, source(), x_val, LocalContext(tmp_path / "straight"))
    with pytest.raises(SimulatedCrash):
        run_training(job, source(), x_val, CrashAfterCheckpoint(tmp_path / "resumed", crash_step))
    run_training(job, source(), x_val, LocalContext(tmp_path / "resumed"))
    straight, resumed = read_outcome(tmp_path / "straight"), read_outcome(tmp_path / "resumed")
    assert (
        resumed.resumed_from_step == crash_step and resumed.steps == straight.steps == 2 * batches_per_epoch
    )
    assert resumed.history[0] == straight.history[0]
    # The interrupted epoch's training means cover only the batches after the resume (the trainer keeps
    # no partial sums in a checkpoint); what the model learnt, and so its validation score, is the same.
    assert resumed.history[1]["val_negative_elbo"] == straight.history[1]["val_negative_elbo"]
    a, b = (
        load_model_dir(tmp_path / "straight").state_dict(),
        load_model_dir(tmp_path / "resumed").state_dict(),
    )
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_streaming_without_a_cpu_left_for_ray_data_is_refused(ray_instance):
    """Two 1-CPU workers on the 2-CPU instance would leave Ray Data's read tasks waiting forever."""
    with pytest.raises(
        ValueError, match=r"needs 1 CPU beyond the 2 its 2 worker\(s\) hold, and the Ray cluster has 2"
    ):
        Scaling(workers=2, gpus_per_worker=0).check_room_for_reads()
    Scaling(workers=1, gpus_per_worker=0).check_room_for_reads()


SMALL_STORE_DRIVER = """
import json, sys
import numpy as np
import ray
from pathlib import Path
from components.config import load_params
from components.data.prepared import load_prepared, prepare
from components.data.raw import RawDataset, write_raw
from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.jobs import train_model
from components.training.trainer import TrainJob

work, store_bytes, params_file = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
images = np.random.default_rng(0).integers(0, 256, (40_000, 3, 32, 32), dtype=np.uint8)
write_raw(RawDataset(images, None, "bigger-than-the-store", "test"), work / "raw")
del images
prepare(work / "raw", work / "prepared", 0.1, 0.1, 0, shard_images=2048)
data = load_prepared(work / "prepared")
ray.init(address="local", num_cpus=2, object_store_memory=store_bytes, include_dashboard=False,
         log_to_driver=False, logging_level="WARNING")
# A zero threshold: the setting alone sends the split through Ray Data.
settings = {"streaming_threshold_images": 0, "workers": 1, "gpus_per_worker": 0, "checkpoint_every_steps": 0}
params = load_params(params_file, {"train": settings})
spec = create_model("ae", data.image_shape, latent_dim=4, channels=4, hidden=16).spec
job = TrainJob(model=spec.to_dict(), epochs=1, batch_size=1024, lr=1e-3, seed=0, precision="fp32",
               compile=False, checkpoint_every_steps=0, sample_every_epochs=0)
outcome = train_model(job, data, params, project_dir=work, run_name="small-store")
json.dump({
    "steps": outcome.steps,
    "planned": -(-len(data.train) // job.batch_size),
    "epochs": [h["epoch"] for h in outcome.history],
    "saved": load_model_dir(outcome.model_dir).spec.name,
    "train_bytes": sum(path.stat().st_size for path in data.train.shards.paths("images")),
}, open(work / "result.json", "w"))
"""


def test_a_split_bigger_than_the_object_store_streams_through_it(tmp_path):
    """A Ray instance of its own (in a driver process) with a 75 MiB object store, and a 98 MiB
    training split that a zero `train.streaming_threshold_images` sends through Ray Data: one worker,
    one epoch streams through the store and completes with its planned steps, and the weights are
    saved. (Whether the reads also stay within `read_ahead_bytes` shows in bench/RESULTS-streaming.md.)"""
    store_bytes = 75 * 2**20  # the smallest object store Ray starts with
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SMALL_STORE_DRIVER,
            str(tmp_path),
            str(store_bytes),
            str(PROJECT_ROOT / "params.yaml"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads((tmp_path / "result.json").read_text())
    assert run["train_bytes"] > store_bytes
    assert run["steps"] == run["planned"]
    assert run["epochs"] == [1] and run["saved"] == "ae"
