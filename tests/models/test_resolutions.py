"""Every sample-quality family builds, steps every phase and samples at 8x8 grey up to 64x64 RGB,
with as many up/down-sampling stages as the image size needs; the density families and the VAE step,
are scored and sample in 8-bit form at 1x28x28 and 3x64x64 (3x32x32 is the colour flow run's)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_FAMILIES, TINY_SAMPLE_QUALITY, cpu_job

from components.models import create_model
from components.models.layers import ConvEncoder, downsampling_stages
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, read_outcome, run_training

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]
TINY = TINY_SAMPLE_QUALITY
CONVOLUTIONAL_AUTOENCODERS = ("ae", "dae", "vaegan")
LIKELIHOOD_FAMILIES = ("vae", "fvsbn", "nade", "made", "pixelcnn", "pixelrnn")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_family_steps_every_phase_and_samples_at_this_size(family: str, shape: tuple[int, int, int]):
    torch.manual_seed(0)
    model = create_model(family, shape, **TINY[family])
    optimizers = model.configure_optimizers(1e-3)
    x = torch.rand(4, *shape)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for phase in model.phases:
        optimizers[phase].zero_grad(set_to_none=True)
        outputs = model(x, phase)
        assert torch.isfinite(outputs["loss"]), (phase, outputs)
        outputs["loss"].backward()
        optimizers[phase].step()
        model.after_optimizer_step(phase)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved, "no phase changed any weight"
    model.fit_after_training([x])  # the split in pieces, here one
    model.eval()
    samples = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, *shape) and 0 <= samples.min() <= samples.max() <= 1
    if family in CONVOLUTIONAL_AUTOENCODERS:
        assert model.reconstruct(x).shape == x.shape


def likelihood_cases():
    for shape in [(1, 28, 28), (3, 64, 64)]:
        for family in LIKELIHOOD_FAMILIES:
            # FVSBN at 3x64x64 has 4.5e8 weights: one Adam step peaks at 11.4 GB, too much beside the
            # suite's other process, so `make test` runs it after the parallel part, on its own.
            alone = [pytest.mark.alone] if (family, shape[1]) == ("fvsbn", 64) else []
            yield pytest.param(family, shape, marks=alone, id=f"{'x'.join(map(str, shape))}-{family}")


@pytest.mark.parametrize(("family", "shape"), likelihood_cases())
def test_likelihood_family_steps_is_scored_and_samples_in_8bit_at_this_size(family: str, shape):
    torch.manual_seed(0)
    model = create_model(family, shape, **TINY_FAMILIES[family], pixels="8bit")
    x = torch.randint(0, 256, (2, *shape)).float() / 255
    optimizer = model.configure_optimizers(1e-3)["model"]
    before = [p.detach().clone() for p in model.parameters()]
    outputs = model(x, "model")
    assert torch.isfinite(outputs["loss"]), outputs
    outputs["loss"].backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model.eval()
    with torch.no_grad():
        scores = model.validation_metrics(x)
        samples = model.sample(1, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(value).all() for value in scores.values()), scores
    assert samples.shape == (1, *shape)
    assert torch.equal(samples, (samples * 255).round() / 255), "8-bit samples are whole levels"


@pytest.mark.parametrize(("side", "stages"), [(8, 2), (12, 2), (28, 3), (32, 3), (64, 4), (128, 5)])
def test_the_encoder_halves_the_image_down_to_about_four_pixels(side: int, stages: int):
    assert downsampling_stages((3, side, side), "test") == stages
    encoder = ConvEncoder((3, side, side), 5, channels=2, hidden=8)
    convolutions = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convolutions) == stages
    assert encoder(torch.rand(2, 3, side, side)).shape == (2, 5)


@pytest.mark.parametrize("family", [*CONVOLUTIONAL_AUTOENCODERS, "vae"])
def test_an_image_below_the_minimum_is_refused_naming_family_and_shape(family: str):
    with pytest.raises(ValueError, match=r"3x3x2 are smaller than its minimum of 4x4") as error:
        create_model(family, (3, 3, 2))
    if family != "vae":  # vae's module passes no name to the shared encoder
        assert str(error.value).startswith(f"{family}: ")


@pytest.mark.parametrize("family", TINY)
def test_family_trains_in_process_on_rgb_32(family: str, tmp_path: Path):
    """A few real trainer steps at 3x32x32: two epochs of 16 images in batches of 8."""
    spec = create_model(family, (3, 32, 32), **TINY[family]).spec
    job = cpu_job(spec, epochs=2, batch_size=8, lr=1e-3)
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
    run_training(job, images, images[:8], LocalContext(tmp_path))
    outcome = read_outcome(tmp_path)
    assert outcome.diverged is None and outcome.steps == 4
    assert all(math.isfinite(v) for epoch in outcome.history for v in epoch.values())
    samples = load_model_dir(tmp_path).sample(2, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 32, 32)
