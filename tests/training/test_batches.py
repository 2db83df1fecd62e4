"""The trainer's two batch sources in one process: the same batches give the same training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cpu_job

from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.batches import DeviceBatches, StreamedBatches, streamed_batches_per_epoch
from components.training.trainer import LocalContext, TrainJob, read_outcome, run_training

BATCH = 128


def job_for(digits, family: str, **hparams) -> TrainJob:
    spec = create_model(family, digits.image_shape, **hparams).spec
    return cpu_job(spec, epochs=2, batch_size=BATCH, lr=1e-3, seed=5)


def test_uint8_pixels_on_the_device_give_the_float_batches_of_the_scaled_split(digits):
    from_pixels = DeviceBatches(digits.train.pixels, BATCH, rank=1, world_size=2, seed=3, device="cpu")
    from_floats = DeviceBatches(digits.train.images, BATCH, rank=1, world_size=2, seed=3, device="cpu")
    assert from_pixels.data.dtype == torch.uint8 and len(from_pixels) == len(from_floats)
    for a, b in zip(from_pixels.epoch(1), from_floats.epoch(1), strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert torch.equal(torch.cat(list(from_pixels.whole_split())), torch.from_numpy(digits.train.images))


def test_equal_split_leaves_out_the_remainder_and_refuses_too_few_images():
    assert streamed_batches_per_epoch(1258, 1, 128) == 10
    assert streamed_batches_per_epoch(1258, 2, 128) == 5  # 629 each
    assert streamed_batches_per_epoch(1280, 2, 128) == 5
    assert streamed_batches_per_epoch(1282, 2, 128) == 6  # 641 each: one image past 5 full batches
    with pytest.raises(ValueError, match="3 training images cannot be split across 4 workers"):
        streamed_batches_per_epoch(3, 4, 128)


@pytest.mark.parametrize(("family", "hparams"), [("ae", {"latent_dim": 4, "channels": 8, "hidden": 32})])
def test_streamed_batches_in_the_on_device_order_train_exactly_the_same_model(
    digits, tmp_path, family, hparams
):
    """Streaming changes where batches come from, not what training does with them: fed the on-device
    order as uint8 batches, run_training gives bit-identical curves and weights, and the fit after
    training (the AE's code Gaussian) reads the split shard by shard from the files."""
    job = job_for(digits, family, **hparams)
    run_training(job, digits.train.pixels, digits.val.images, LocalContext(tmp_path / "device"))

    order = DeviceBatches(digits.train.pixels, BATCH, rank=0, world_size=1, seed=job.seed, device="cpu")

    def epoch_batches(epoch: int):
        order.sampler.set_epoch(epoch)
        rows = torch.tensor(list(order.sampler))
        yield from (torch.from_numpy(digits.train.pixels)[chunk] for chunk in rows.split(BATCH))

    shard_files = [str(p) for p in digits.train.shards.paths("images")]
    streamed = StreamedBatches(epoch_batches, len(order), shard_files, torch.device("cpu"))
    run_training(job, streamed, digits.val.images, LocalContext(tmp_path / "streamed"))

    device_run, streamed_run = read_outcome(tmp_path / "device"), read_outcome(tmp_path / "streamed")
    assert streamed_run.steps == device_run.steps == 2 * len(order)
    assert streamed_run.history == device_run.history
    a, b = (
        load_model_dir(tmp_path / "device").state_dict(),
        load_model_dir(tmp_path / "streamed").state_dict(),
    )
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["code_cholesky"], torch.eye(len(a["code_cholesky"])))  # the fit ran


def test_streamed_epoch_scales_uint8_batches_on_the_device(digits):
    pixels = torch.from_numpy(digits.train.pixels[:10])
    streamed = StreamedBatches(lambda epoch: [pixels[:4], pixels[4:]], 2, [], torch.device("cpu"))
    batches = list(streamed.epoch(0))
    assert [len(b) for b in batches] == [4, 6] and all(b.dtype == torch.float32 for b in batches)
    np.testing.assert_array_equal(torch.cat(batches).numpy(), digits.train.images[:10])


@pytest.mark.parametrize(("family", "hparams"), [("nade", {"hidden": 16}), ("dcgan", {"width": 8})])
def test_validation_read_from_its_shards_in_batches_gives_the_whole_splits_metrics(
    digits, tmp_path, monkeypatch, family, hparams
):
    """The validation split as shards, read in batches of 50 (so four batches, the last short), gives
    the per-epoch validation metrics of the whole array at once; training is untouched."""
    import components.training.trainer as trainer

    job = job_for(digits, family, **hparams)
    kind = create_model(family, digits.image_shape, **hparams).data_kind
    run_training(job, digits.train.pixels, digits.val.for_kind(kind), LocalContext(tmp_path / "array"))
    monkeypatch.setattr(trainer, "VALIDATION_BATCH", 50)
    assert len(digits.val) > 3 * 50
    run_training(job, digits.train.pixels, digits.val.shards, LocalContext(tmp_path / "shards"))

    whole, batched = read_outcome(tmp_path / "array").history, read_outcome(tmp_path / "shards").history
    validation = [name for name in whole[0] if name.startswith("val_")]
    assert validation and len(whole) == len(batched) == 2
    for at_once, in_batches in zip(whole, batched, strict=True):
        assert {k: v for k, v in at_once.items() if k not in validation} == {
            k: v for k, v in in_batches.items() if k not in validation
        }
        assert {k: in_batches[k] for k in validation} == pytest.approx(
            {k: at_once[k] for k in validation}, rel=1e-5
        )
