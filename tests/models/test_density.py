"""Behaviour of the autoregressive density families: exact masking, normalisation, sampling, training."""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from components.models import create_model
from components.models.autoregressive import AutoregressiveBernoulli, bernoulli_log_prob
from components.models.families.made import MADE
from components.training.trainer import LocalContext, TrainJob, load_model_dir, run_training

FAMILIES = ("fvsbn", "nade", "made", "pixelcnn", "pixelrnn")

# Tiny versions of every family and variant, for the exactness tests.
TINY = [
    pytest.param("fvsbn", {}, id="fvsbn"),
    pytest.param("nade", {"hidden": 8}, id="nade"),
    pytest.param("made", {"hidden": 24, "num_layers": 2}, id="made"),
    pytest.param("made", {"hidden": 24, "num_layers": 2, "num_masks": 3}, id="made-3-masks"),
    pytest.param("pixelcnn", {"channels": 8, "num_blocks": 2}, id="pixelcnn"),
    pytest.param("pixelcnn", {"channels": 8, "num_blocks": 2, "gated": True}, id="pixelcnn-gated"),
    pytest.param("pixelrnn", {"channels": 8, "hidden": 4, "num_layers": 2}, id="pixelrnn-row"),
    pytest.param(
        "pixelrnn", {"channels": 8, "hidden": 4, "num_layers": 2, "variant": "diagonal"}, id="pixelrnn-diag"
    ),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(
    name: str, hparams: dict, shape: tuple[int, int, int], seed: int = 0
) -> AutoregressiveBernoulli:
    """A float64 model whose parameters are all random, so no masked path hides behind a zero weight."""
    torch.manual_seed(seed)
    model = create_model(name, shape, **hparams).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.7)
    return model


def all_binary_images(height: int, width: int) -> torch.Tensor:
    """Every binary image of this size in binary-counting order (the first pixel is the top bit)."""
    pixels = list(itertools.product([0.0, 1.0], repeat=height * width))
    return torch.tensor(pixels, dtype=torch.float64).reshape(-1, 1, height, width)


@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_logit_of_each_pixel_ignores_that_pixel_and_every_later_one(name, hparams):
    model = random_model(name, hparams, (1, 4, 5))
    d = model.num_dims
    if isinstance(model, MADE):
        conditionals = [
            (functools.partial(model.logits, mask_index=m), model.orderings[m])
            for m in range(model.num_masks)
        ]
    else:
        conditionals = [(model.logits, torch.arange(d))]
    x = torch.randn(3, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    for logits_of, ordering in conditionals:
        logits = logits_of(x).flatten(1)
        assert logits.shape == (3, d)
        for position, pixel in enumerate(ordering.tolist()):
            (grad,) = torch.autograd.grad(logits[:, pixel].sum(), x, retain_graph=True)
            grad = grad.flatten(1)
            later = ordering[position:]
            assert torch.all(grad[:, later] == 0), (
                f"logit of pixel {pixel} depends on pixels {later.tolist()}"
            )
            if position == d - 1:  # the last pixel must actually use its context
                assert grad[:, ordering[:-1]].abs().sum() > 0


@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_probabilities_of_all_3x3_images_sum_to_one(name, hparams):
    model = random_model(name, hparams, (1, 3, 3))
    with torch.no_grad():
        log_prob = model.log_prob(all_binary_images(3, 3))
    assert log_prob.shape == (512,)
    assert torch.logsumexp(log_prob, 0).exp().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_sample_frequencies_match_the_density(name, hparams):
    model = random_model(name, hparams, (1, 2, 2), seed=1)
    n = 20_000
    samples = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, 1, 2, 2)
    assert samples.dtype == torch.float64 and set(samples.unique().tolist()) <= {0.0, 1.0}
    codes = (samples.flatten(1) * torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)).sum(1).long()
    observed = torch.bincount(codes, minlength=16).double()
    with torch.no_grad():
        probs = model.log_prob(all_binary_images(2, 2)).exp()
    expected = probs / probs.sum() * n
    # Pool the rare images: the chi-square approximation needs expected counts of at least 5.
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert probs.max() < 0.9, "random weights gave an almost deterministic model: a weak test"
    p_value = chisquare(observed.numpy(), expected.numpy()).pvalue
    assert p_value > 0.001, f"samples disagree with exp(log_prob): chi-square p = {p_value:.2e}"


@pytest.mark.parametrize(("name", "hparams"), [p for p in TINY if p.id != "made-3-masks"])
def test_the_samplers_step_by_step_logits_equal_the_one_pass_logits(name, hparams):
    """Families that compute the next conditional incrementally (NADE, FVSBN, Row LSTM) must agree."""
    model = random_model(name, hparams, (1, 3, 4))
    images = torch.bernoulli(torch.full((5, 12), 0.5, dtype=torch.float64))
    with torch.no_grad():
        expected = model.logits(images.reshape(5, 1, 3, 4)).flatten(1)
        x = torch.zeros_like(images)
        rows = torch.arange(5)
        steps = 0
        for step, (index, logit) in enumerate(model.conditional_logits(x, None)):
            assert torch.equal(torch.as_tensor(index).expand(5), torch.full((5,), step)), "not raster order"
            torch.testing.assert_close(logit, expected[rows, index], rtol=1e-9, atol=1e-9)
            x[rows, index] = images[rows, index]
            steps += 1
    assert steps == 12


def test_made_trains_one_random_mask_per_batch_and_evaluates_the_ensemble():
    model = random_model("made", {"hidden": 24, "num_masks": 3}, (1, 3, 3))
    x = all_binary_images(3, 3)[::7]
    with torch.no_grad():
        per_mask = torch.stack([bernoulli_log_prob(model.logits(x, m), x) for m in range(3)])
        model.train()
        losses = {model(x, "model")["loss"].item() for _ in range(30)}
        model.eval()
        ensemble = model(x, "model")["loss"].item()
    mask_nlls = (-per_mask.mean(1)).tolist()
    assert all(min(abs(loss - nll) for nll in mask_nlls) < 1e-9 for loss in losses)
    assert len(losses) > 1, "training always used the same mask"
    mixture = -(torch.logsumexp(per_mask, 0) - math.log(3))
    assert ensemble == pytest.approx(mixture.mean().item(), abs=1e-9)


@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_sampling_is_repeatable_with_a_seeded_generator(name, hparams):
    model = random_model(name, hparams, (1, 3, 4))
    first = model.sample(32, generator=torch.Generator().manual_seed(5))
    again = model.sample(32, generator=torch.Generator().manual_seed(5))
    other = model.sample(32, generator=torch.Generator().manual_seed(6))
    assert first.shape == (32, 1, 3, 4)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", FAMILIES)
def test_multichannel_images_are_rejected_at_construction(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*\(1, H, W\).*\(3, 8, 8\)"):
        create_model(name, (3, 8, 8))


@pytest.mark.parametrize("name", FAMILIES)
def test_log_prob_rejects_images_of_another_shape(name):
    model = create_model(name, (1, 4, 4))
    with pytest.raises(ValueError, match=r"N x 1 x 4 x 4, got \(2, 1, 4, 5\)"):
        model.log_prob(torch.zeros(2, 1, 4, 5))


# Small enough to train in a few seconds on one core; the untrained models score about 44 nats.
TRAINABLE = [
    pytest.param("fvsbn", {}, id="fvsbn"),
    pytest.param("nade", {"hidden": 32}, id="nade"),
    pytest.param("made", {"hidden": 64, "num_layers": 1}, id="made"),
    pytest.param("pixelcnn", {"channels": 16, "num_blocks": 1}, id="pixelcnn"),
    pytest.param("pixelrnn", {"channels": 16, "hidden": 8, "num_layers": 1}, id="pixelrnn"),
]


@pytest.mark.parametrize(("name", "hparams"), TRAINABLE)
def test_a_few_epochs_on_digits_lower_the_test_nll(name, hparams, digits, tmp_path: Path):
    x_test = torch.from_numpy(digits.test.binary.astype(np.float32))
    torch.manual_seed(0)
    untrained = create_model(name, digits.image_shape, **hparams)
    job = TrainJob(
        model=untrained.spec.to_dict(), epochs=8, batch_size=64, lr=0.01, seed=0, checkpoint_every_steps=0
    )
    run_training(job, digits.train.images, digits.val.binary.astype(np.float32), LocalContext(tmp_path))
    trained = load_model_dir(tmp_path)
    with torch.no_grad():
        before = -untrained.log_prob(x_test).mean().item()
        after = -trained.log_prob(x_test).mean().item()
    print(f"{name}: test NLL {before:.2f} -> {after:.2f} nats")
    assert after < before - 15.0, f"{name}: test NLL {before:.2f} -> {after:.2f} nats after training"
    samples = trained.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, *digits.image_shape)
