"""Behaviour of the autoencoder families: denoising, the fitted code prior, VAE-GAN's separate updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cpu_job

from components.data.prepared import PreparedData
from components.models import ReconstructionModel, create_model
from components.models.model_dir import load_model_dir, save_model_dir
from components.training.trainer import LocalContext, run_training

FAMILIES = ("ae", "dae", "vaegan")
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 12, 10)]


pytestmark = pytest.mark.usefixtures("one_thread")


def sse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the summed squared pixel difference."""
    return (a - b).pow(2).flatten(1).sum(1).mean().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_phase_and_method_works_at_any_image_size(family: str, shape: tuple[int, int, int]):
    torch.manual_seed(0)
    model = create_model(family, shape, latent_dim=4, channels=8, hidden=32)
    assert isinstance(model, ReconstructionModel) and model.data_kind == "continuous"
    assert model.primary_metric == "fid"
    x = torch.rand(5, *shape).contiguous(memory_format=torch.channels_last)
    optimizers = model.configure_optimizers(1e-3)
    assert set(optimizers) == set(model.phases)
    for phase in model.phases:
        loss = model(x, phase)["loss"]
        assert loss.dim() == 0 and torch.isfinite(loss)
    model.eval()
    assert model.encode(x).shape == (5, 4)
    assert model.reconstruct(x).shape == (5, *shape)
    assert all(torch.isfinite(v) for v in model.validation_metrics(x).values())
    samples = model.sample(7, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (7, *shape)
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, model.sample(7, generator=torch.Generator().manual_seed(1)))


def test_ae_fits_a_full_covariance_gaussian_to_its_codes_and_saves_it(tmp_path: Path, digits: PreparedData):
    torch.manual_seed(0)
    model = create_model("ae", (1, 8, 8), latent_dim=6).eval()
    x_train = torch.from_numpy(digits.train.images)
    model.fit_after_training(x_train.split(500))
    with torch.no_grad():
        codes = model.encode(x_train).double()
    covariance = model.code_cholesky.double() @ model.code_cholesky.double().T
    torch.testing.assert_close(model.code_mean.double(), codes.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(covariance, torch.cov(codes.T), rtol=1e-4, atol=1e-6)
    correlation = covariance / covariance.diagonal().sqrt().outer(covariance.diagonal().sqrt())
    assert (correlation - torch.eye(6, dtype=torch.float64)).abs().max() > 0.1  # full, not diagonal

    draws = model.sample_codes(20000, generator=torch.Generator().manual_seed(0)).double()
    scale = codes.std(0).max()
    assert (draws.mean(0) - codes.mean(0)).abs().max() < 0.05 * scale
    assert (torch.cov(draws.T) - torch.cov(codes.T)).abs().max() < 0.05 * scale**2

    save_model_dir(model, tmp_path / "ae")
    reloaded = load_model_dir(tmp_path / "ae")
    assert torch.equal(reloaded.code_mean, model.code_mean)
    assert torch.equal(reloaded.code_cholesky, model.code_cholesky)
    samples = reloaded.sample(50, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (50, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1


def test_code_gaussian_survives_collapsed_code_dimensions():
    """A dead code unit makes the covariance singular; the fit still gives a usable factor."""
    model = create_model("ae", (1, 8, 8), latent_dim=4).eval()
    with torch.no_grad():
        model.encoder.net[-1].weight[0].zero_()
        model.encoder.net[-1].bias[0] = 0.5
    model.fit_after_training([torch.rand(100, 1, 8, 8)])
    assert torch.isfinite(model.code_cholesky).all()
    assert model.code_mean[0].item() == pytest.approx(0.5)
    assert torch.isfinite(model.sample(4)).all()


@pytest.mark.parametrize(
    "noise, level", [("masking", 0.3), ("gaussian", 0.1), ("salt_pepper", 0.2)], ids=lambda v: str(v)
)
def test_dae_corruption_matches_its_noise_model(noise: str, level: float):
    model = create_model("dae", (1, 28, 28), noise=noise, noise_level=level)
    x = torch.full((200, 1, 28, 28), 0.5)
    corrupted = model.corrupt(x, generator=torch.Generator().manual_seed(0))
    assert corrupted.min() >= 0 and corrupted.max() <= 1
    changed = corrupted != x
    if noise == "gaussian":
        assert (corrupted - x).std().item() == pytest.approx(level, rel=0.05)
    else:
        assert changed.float().mean().item() == pytest.approx(level, rel=0.05)
        assert set(corrupted[changed].unique().tolist()) == ({0.0} if noise == "masking" else {0.0, 1.0})
    if noise == "salt_pepper":
        assert (corrupted == 1).float().mean().item() == pytest.approx(level / 2, rel=0.1)


def test_dae_rejects_unknown_noise_and_bad_levels():
    with pytest.raises(ValueError, match="gaussian, masking, salt_pepper"):
        create_model("dae", (1, 8, 8), noise="blur")
    with pytest.raises(ValueError, match="noise_level"):
        create_model("dae", (1, 8, 8), noise="masking", noise_level=1.5)


@pytest.mark.parametrize("noise, level", [("masking", 0.4), ("gaussian", 0.4), ("salt_pepper", 0.2)])
def test_dae_trained_briefly_removes_more_error_than_the_corruption_adds(
    tmp_path: Path, digits: PreparedData, noise: str, level: float
):
    hparams = {"noise": noise, "noise_level": level, "channels": 16, "hidden": 128}
    spec = create_model("dae", digits.image_shape, **hparams).spec
    job = cpu_job(spec, epochs=30, batch_size=64, lr=2e-3)
    run_training(job, digits.train.images, digits.val.images, LocalContext(tmp_path))
    model = load_model_dir(tmp_path)
    clean = torch.from_numpy(digits.test.images)
    corrupted = model.corrupt(clean, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        denoised = model.reconstruct(corrupted)
    assert sse(denoised, clean) < 0.8 * sse(corrupted, clean)
    # fit_after_training ran and its Gaussian travelled through the safetensors checkpoint.
    assert not torch.equal(model.code_cholesky, torch.eye(model.latent_dim))


def gradients(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize(
    "phase, updated",
    [("encoder", "encoder"), ("decoder", "decoder"), ("discriminator", "discriminator")],
)
def test_vaegan_phase_computes_gradients_only_for_the_network_it_updates(phase: str, updated: str):
    torch.manual_seed(0)
    model = create_model("vaegan", (1, 8, 8), latent_dim=4, channels=8, hidden=32)
    optimizers = model.configure_optimizers(1e-2)
    x = torch.rand(16, 1, 8, 8)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers[phase].zero_grad(set_to_none=True)
    model(x, phase)["loss"].backward()
    optimizers[phase].step()
    for network in ("encoder", "decoder", "discriminator"):
        grads = gradients(getattr(model, network))
        if network == updated:
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads), f"{phase} phase computed gradients for the {network}"
    for name, parameter in model.named_parameters():
        moved = not torch.equal(parameter, before[name])
        if not name.startswith(updated):
            assert not moved, f"{phase} phase changed {name}"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(updated))
