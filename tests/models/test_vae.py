"""The VAE's decoder in both pixel forms: a normalised p(x|z), samples on the levels, training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cpu_job

from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, run_training

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"latent_dim": 3, "channels": 4, "hidden": 16}


@pytest.mark.parametrize(
    ("hparams", "levels"),
    [
        pytest.param({"pixels": "binary"}, 2, id="binary"),
        pytest.param({"pixels": "8bit", "levels": 4, "output": "logistic"}, 4, id="8bit-logistic"),
        pytest.param({"pixels": "8bit", "levels": 3, "output": "categorical"}, 3, id="8bit-categorical"),
        pytest.param(
            {"pixels": "8bit", "levels": 5, "output": "logistic", "mixture_components": 3}, 5, id="8bit-mix"
        ),
    ],
)
def test_the_decoder_distribution_sums_to_one_over_all_images(hparams, levels):
    """p(x|z) factorises over sub-pixels, so it sums to one over all images when each factor does."""
    shape = (1, 4, 4) if hparams["pixels"] == "binary" else (3, 4, 4)
    torch.manual_seed(0)
    model = create_model("vae", shape, **TINY, **hparams).double().eval()
    z = torch.randn(2, TINY["latent_dim"], dtype=torch.float64)
    with torch.no_grad():
        params = model.decoded_params(z)
        per_level = torch.stack(
            [
                model.distribution.log_prob(
                    params, torch.full((2, *shape), k / (levels - 1), dtype=torch.float64)
                )
                for k in range(levels)
            ]
        )
        torch.testing.assert_close(
            torch.logsumexp(per_level, 0).exp(), torch.ones(2, *shape, dtype=torch.float64), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("output", ["logistic", "categorical"])
def test_8bit_samples_lie_on_the_levels_and_repeat_with_the_seed(output):
    model = create_model("vae", (3, 6, 5), **TINY, output=output, levels=8).eval()
    assert (model.pixels, model.data_kind) == ("8bit", "continuous")
    first = model.sample(16, generator=torch.Generator().manual_seed(1))
    again = model.sample(16, generator=torch.Generator().manual_seed(1))
    other = model.sample(16, generator=torch.Generator().manual_seed(2))
    assert first.shape == (16, 3, 6, 5)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal((first * 7).round() / 7, first) and first.min() >= 0 and first.max() <= 1
    means = model.decode(torch.randn(4, TINY["latent_dim"]))
    assert means.shape == (4, 3, 6, 5) and means.min() >= 0 and means.max() <= 1


def test_the_8bit_vae_trains_on_the_grey_values(digits, tmp_path: Path):
    x_test = torch.from_numpy(digits.test.images)
    torch.manual_seed(0)
    untrained = create_model("vae", digits.image_shape, **TINY, pixels="8bit", levels=17)
    job = cpu_job(untrained.spec, epochs=4, batch_size=64, lr=0.01)
    run_training(job, digits.train.images, digits.val.for_kind(untrained.data_kind), LocalContext(tmp_path))
    trained = load_model_dir(tmp_path)
    torch.manual_seed(0)
    with torch.no_grad():
        before = -untrained.elbo(x_test).mean().item()
        after = -trained.elbo(x_test).mean().item()
        bound = -trained.importance_weighted_bound(x_test, 20).mean().item()
    print(f"vae 8-bit: test negative ELBO {before:.2f} -> {after:.2f} nats, IWAE bound {bound:.2f}")
    assert after < before - 25.0
    assert bound <= after + 0.5  # the importance-weighted bound is the tighter one
