"""The generic trainer in one process: determinism, resuming, registry errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cpu_job

from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, TrainJob, read_outcome, restorable, run_training


def vae_job(digits, epochs: int) -> TrainJob:
    spec = create_model("vae", digits.image_shape, latent_dim=4, channels=8, hidden=32).spec
    return cpu_job(spec, epochs=epochs, batch_size=128, lr=1e-3, seed=3)


def train(digits, job: TrainJob, output: Path):
    run_training(job, digits.train.images, digits.val.binary.astype(np.float32), LocalContext(output))
    return read_outcome(output), load_model_dir(output)


def test_same_seed_gives_the_same_weights_and_curves(digits, tmp_path):
    first, model_a = train(digits, vae_job(digits, 2), tmp_path / "a")
    second, model_b = train(digits, vae_job(digits, 2), tmp_path / "b")
    assert first.history == second.history
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.history[-1]["val_negative_elbo"] < first.history[0]["val_negative_elbo"] + 5


def test_training_resumes_from_its_checkpoint(digits, tmp_path):
    steps_per_epoch = -(-len(digits.train) // 128)
    short, _ = train(digits, vae_job(digits, 1), tmp_path / "run")
    assert short.steps == steps_per_epoch
    resumed, _ = train(digits, vae_job(digits, 3), tmp_path / "run")  # same directory: continues
    assert resumed.steps == 3 * steps_per_epoch
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == short.history[0]
    uninterrupted, model = train(digits, vae_job(digits, 3), tmp_path / "straight")
    assert resumed.history == uninterrupted.history  # weights, optimiser and random state all restored
    for (name, a), (_, b) in zip(
        load_model_dir(tmp_path / "run").state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert resumed.resumed_from_step == steps_per_epoch and short.resumed_from_step == 0


def test_a_continued_run_trains_at_its_own_learning_rate(digits, tmp_path):
    spec = create_model("vae", digits.image_shape, latent_dim=4, channels=8, hidden=32).spec
    train(digits, cpu_job(spec, epochs=1, batch_size=128, lr=1e-3), tmp_path / "run")
    after_one = load_model_dir(tmp_path / "run").state_dict()
    # At rate 0 the second epoch leaves every weight where the first left it, Adam's moments or not.
    _, continued = train(digits, cpu_job(spec, epochs=2, batch_size=128, lr=0.0), tmp_path / "run")
    for name, weights in continued.state_dict().items():
        assert torch.equal(weights, after_one[name]), name


def test_unknown_model_and_hyperparameter_are_named():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", (1, 8, 8))
    with pytest.raises(ValueError, match="unknown hyper-parameter.*latent_size.*accepted: .*latent_dim"):
        create_model("vae", (1, 8, 8), latent_size=3)


def test_corrupt_weights_are_refused(digits, tmp_path):
    train(digits, vae_job(digits, 0), tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="weights.safetensors: cannot load weights"):
        load_model_dir(tmp_path / "m")


def test_a_checkpoint_with_any_file_cut_short_is_not_restorable(digits, tmp_path):
    train(digits, vae_job(digits, 1), tmp_path / "whole")
    assert restorable(tmp_path / "whole")
    files = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert len(files) == 5  # weights, spec, trainer state, history, progress grids
    for name in files:
        cut = tmp_path / f"cut-{name}"
        shutil.copytree(tmp_path / "whole", cut)
        (cut / name).write_bytes((cut / name).read_bytes()[: (cut / name).stat().st_size // 2])
        assert not restorable(cut), f"{name} cut in half still reads as whole"


def test_progress_is_paced_and_ends_at_the_planned_step(digits, tmp_path, monkeypatch):
    import components.training.trainer as trainer

    monkeypatch.setattr(trainer, "PROGRESS_INTERVAL_S", 0.0)  # every step, so pacing shows in the count
    updates = []
    job = vae_job(digits, 2)
    x_val = digits.val.binary.astype(np.float32)
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "a", on_progress=updates.append))
    planned = 2 * -(-len(digits.train) // 128)
    assert [u.step for u in updates] == [0, *range(1, planned + 1), planned]
    assert updates[-1].total_steps == planned and updates[-1].epoch == 2 and updates[-1].loss > 0
    assert all(u.images_per_s > 0 for u in updates[1:])  # the last repeats the last rate measured
    assert updates[-1].images_per_s == updates[-2].images_per_s

    monkeypatch.setattr(trainer, "PROGRESS_INTERVAL_S", 3600.0)
    updates.clear()
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "b", on_progress=updates.append))
    assert [u.step for u in updates] == [0, planned]  # the first and the last, nothing between


@pytest.mark.usefixtures("one_thread")
def test_a_diverging_epoch_is_reported_not_sampled_from(digits, tmp_path):
    """A sample grid is due at the last epoch; weights that became non-finite are not drawn from
    (which would raise inside the sampler), the divergence is reported instead."""
    from dataclasses import replace

    job = replace(vae_job(digits, epochs=1), lr=1e4, sample_every_epochs=1)  # Adam: weights move by ~lr
    run_training(job, digits.train.images, digits.val.binary.astype(np.float32), LocalContext(tmp_path))
    outcome = read_outcome(tmp_path)
    assert outcome.diverged and "non-finite at epoch 1" in outcome.diverged
    assert outcome.progress_samples == {}


@pytest.mark.compiles
@pytest.mark.usefixtures("one_thread")
def test_the_gpu_settings_train_on_cpu_bf16_compiled_with_a_short_last_batch(digits, tmp_path):
    # bf16 autocast and torch.compile are what a GPU run uses; both run on CPU too. The last batch
    # of an epoch is smaller (1,257 images in batches of 256), so the compiled graph meets a second
    # batch size, which once broke drawing a GAN's noise under torch.compile. DCGAN's R1 penalty needs
    # a double backward, which compiled graphs cannot do: the penalty must run eagerly.
    spec = create_model("dcgan", digits.image_shape, latent_dim=8, width=8).spec
    job = cpu_job(spec, epochs=1, batch_size=256, lr=1e-3, precision="bf16", compile=True)
    outcome, model = train(digits, job, tmp_path / "compiled")
    assert len(digits.train) % job.batch_size != 0
    assert outcome.steps == -(-len(digits.train) // job.batch_size)
    assert all(np.isfinite(v) for v in outcome.history[-1].values())
    assert model.sample(4, generator=torch.Generator().manual_seed(0)).isfinite().all()
