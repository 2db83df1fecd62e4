"""Behaviour of the autoregressive density families: exact masking, normalisation, sampling, training.

Every exactness test runs on binary images and on 8-bit colour images (few levels, so that every
image of a tiny size can be enumerated), with both 8-bit outputs.
"""

from __future__ import annotations

import functools
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cpu_job
from scipy.stats import chisquare

from components.models import create_model
from components.models.autoregressive import AutoregressiveImageModel
from components.models.factory import model_class
from components.models.families.made import MADE
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, run_training

FAMILIES = ("fvsbn", "nade", "made", "pixelcnn", "pixelrnn")

# Tiny versions of every family and variant, for the exactness tests.
TINY = [
    pytest.param("fvsbn", {}, id="fvsbn"),
    pytest.param("nade", {"hidden": 8}, id="nade"),
    pytest.param("nade", {"hidden": 8, "activation": "sigmoid"}, id="nade-sigmoid"),
    pytest.param("made", {"hidden": 24, "num_layers": 2}, id="made"),
    pytest.param("made", {"hidden": 24, "num_layers": 2, "random_order": False}, id="made-raster"),
    pytest.param("made", {"hidden": 24, "num_layers": 2, "num_masks": 3}, id="made-3-masks"),
    pytest.param("pixelcnn", {"channels": 8, "num_blocks": 2, "gated": False}, id="pixelcnn"),
    pytest.param("pixelcnn", {"channels": 8, "num_blocks": 2, "gated": True}, id="pixelcnn-gated"),
    pytest.param("pixelrnn", {"channels": 8, "hidden": 4, "num_layers": 2}, id="pixelrnn-row"),
    pytest.param(
        "pixelrnn", {"channels": 8, "hidden": 4, "num_layers": 2, "variant": "diagonal"}, id="pixelrnn-diag"
    ),
]

#: The 8-bit forms, with a few levels only, crossed with every tiny family.
EIGHT_BIT = [
    pytest.param({"pixels": "8bit", "levels": levels, "output": output}, id=f"8bit-{output}")
    for levels, output in ((4, "categorical"), (3, "logistic"))
]
BINARY = pytest.param({}, id="binary")
FORMS = [BINARY, *EIGHT_BIT]


def cases_in_every_form(cases: list = TINY) -> list:
    """Each tiny case in the binary form and in each 8-bit form."""
    return [
        pytest.param(case.values[0], {**case.values[1], **form.values[0]}, id=f"{form.id}-{case.id}")
        for form in FORMS
        for case in cases
    ]


def shape_of(hparams: dict, height: int, width: int) -> tuple[int, int, int]:
    """Binary models see one channel; the 8-bit ones three, so that the channel masks are tested."""
    return (3 if hparams.get("pixels") == "8bit" else 1, height, width)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(
    name: str, hparams: dict, shape: tuple[int, int, int], seed: int = 0, scale: float = 0.7
) -> AutoregressiveImageModel:
    """A float64 model whose parameters are all random, so no masked path hides behind a zero weight."""
    torch.manual_seed(seed)
    model = create_model(name, shape, **hparams).double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, scale)
    return model


def all_images(shape: tuple[int, int, int], levels: int) -> torch.Tensor:
    """Every image of this shape with `levels` values per sub-pixel, in counting order over the
    flattened C x H x W layout (the first sub-pixel is the top digit), values k / (levels - 1)."""
    values = torch.linspace(0, 1, levels, dtype=torch.float64).tolist()
    images = torch.tensor(list(itertools.product(values, repeat=math.prod(shape))), dtype=torch.float64)
    return images.reshape(-1, *shape)


def levels_of(hparams: dict) -> int:
    return hparams.get("levels", 2) if hparams.get("pixels") == "8bit" else 2


@pytest.mark.parametrize(("name", "hparams"), cases_in_every_form())
def test_output_of_each_subpixel_ignores_it_and_every_later_one_in_the_models_order(name, hparams):
    shape = shape_of(hparams, 3, 4)
    model = random_model(name, hparams, shape)
    d, p = model.num_dims, model.params_per_dim
    if isinstance(model, MADE):
        conditionals = [
            (functools.partial(model.params, mask_index=m), model.orderings[m])
            for m in range(model.num_masks)
        ]
    else:
        conditionals = [(model.params, model.ordering())]
    if shape[0] > 1 and not isinstance(model, MADE | model_class("fvsbn") | model_class("nade")):
        # The convolutional and recurrent families draw a pixel's channels in turn, pixel by pixel.
        assert model.ordering()[:3].tolist() == [0, 12, 24]
    x = torch.randn(3, *shape, dtype=torch.float64, requires_grad=True)
    for params_of, ordering in conditionals:
        assert sorted(ordering.tolist()) == list(range(d))
        params = params_of(x)
        assert params.shape == (3, *shape, p)
        params = params.flatten(1, 3)
        for position, subpixel in enumerate(ordering.tolist()):
            (grad,) = torch.autograd.grad(params[:, subpixel].sum(), x, retain_graph=True)
            grad = grad.flatten(1)
            later = ordering[position:]
            assert torch.all(grad[:, later] == 0), (
                f"output of sub-pixel {subpixel} depends on sub-pixels {later.tolist()}"
            )
            if position == d - 1:  # the last sub-pixel must actually use its context
                assert grad[:, ordering[:-1]].abs().sum() > 0


NORMALISATION_SHAPES = [
    pytest.param(BINARY.values[0], (1, 3, 3), id="binary-1x3x3"),
    *(pytest.param(form.values[0], (1, 2, 2), id=f"{form.id}-1x2x2") for form in EIGHT_BIT),
    pytest.param(
        {"pixels": "8bit", "levels": 3, "output": "categorical"}, (3, 1, 2), id="8bit-categorical-3x1x2"
    ),
    pytest.param({"pixels": "8bit", "levels": 3, "output": "logistic"}, (3, 1, 2), id="8bit-logistic-3x1x2"),
]


@pytest.mark.parametrize(("form", "shape"), NORMALISATION_SHAPES)
@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_probabilities_of_all_images_sum_to_one(name, hparams, form, shape):
    if form.get("pixels") == "8bit" and name == "pixelcnn" and not hparams["gated"] and shape[0] == 3:
        hparams = {**hparams, "channels": 12}  # the residual blocks' half width must split in 3 groups
    model = random_model(name, {**hparams, **form}, shape)
    images = all_images(shape, levels_of(form))
    with torch.no_grad():
        log_prob = model.log_prob(images)
    assert log_prob.shape == (levels_of(form) ** math.prod(shape),)
    assert torch.logsumexp(log_prob, 0).exp().item() == pytest.approx(1.0, abs=1e-4)


#: 8-bit models get weights large enough that each sub-pixel depends strongly on those before it, so
#: that drawing in a wrong order changes the distribution visibly (see the test after the next);
#: binary ones would then be almost deterministic.
SAMPLING_SCALE = 1.0
SAMPLING_FORMS = [
    pytest.param(BINARY.values[0], (1, 2, 2), id="binary-1x2x2"),
    pytest.param(
        {"pixels": "8bit", "levels": 3, "output": "categorical"}, (2, 1, 2), id="8bit-categorical-2x1x2"
    ),
    pytest.param({"pixels": "8bit", "levels": 3, "output": "logistic"}, (2, 1, 2), id="8bit-logistic-2x1x2"),
]


def sampling_agreement(model: AutoregressiveImageModel, levels: int, n: int = 20_000) -> float:
    """Chi-square p-value of `n` samples' image frequencies against exp(log_prob)."""
    shape = model.image_shape
    samples = model.sample(n, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (n, *shape) and samples.dtype == torch.float64
    values = torch.linspace(0, 1, levels, dtype=torch.float64)
    assert torch.isin(samples, values).all(), "samples off the levels k / (levels - 1)"
    digits = (samples.flatten(1) * (levels - 1)).round().long()
    place = levels ** torch.arange(model.num_dims - 1, -1, -1)
    observed = torch.bincount(digits @ place, minlength=levels**model.num_dims).double()
    with torch.no_grad():
        probs = model.log_prob(all_images(shape, levels)).exp()
    expected = probs / probs.sum() * n
    # Pool the rare images: the chi-square approximation needs expected counts of at least 5.
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert probs.max() < 0.9, "random weights gave an almost deterministic model: a weak test"
    return chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize(("form", "shape"), SAMPLING_FORMS)
@pytest.mark.parametrize(("name", "hparams"), TINY)
def test_sample_frequencies_match_the_density(name, hparams, form, shape):
    scale = SAMPLING_SCALE if form.get("pixels") == "8bit" else 0.7
    model = random_model(name, {**hparams, **form}, shape, seed=1, scale=scale)
    p_value = sampling_agreement(model, levels_of(form))
    assert p_value > 0.001, f"samples disagree with exp(log_prob): chi-square p = {p_value:.2e}"


@pytest.mark.parametrize(
    ("name", "hparams", "wrong_order"),
    [
        pytest.param(
            "pixelrnn",
            {"variant": "diagonal", "channels": 8, "hidden": 4},
            [0, 1, 2, 3],
            id="pixelrnn-planes",
        ),
        pytest.param(
            "pixelrnn",
            {"variant": "diagonal", "channels": 8, "hidden": 4},
            [2, 0, 3, 1],
            id="pixelrnn-g-first",
        ),
        pytest.param("nade", {"hidden": 8}, [0, 2, 1, 3], id="nade-pixel-by-pixel"),
        pytest.param("nade", {"hidden": 8}, [1, 0, 3, 2], id="nade-swapped"),
    ],
)
def test_a_sampler_that_ignores_the_order_fails_the_agreement_test(name, hparams, wrong_order, monkeypatch):
    """The chi-square test above is strong enough to catch a sampler that draws in another order."""
    form = {"pixels": "8bit", "levels": 3, "output": "categorical"}
    model = random_model(name, {**hparams, **form}, (2, 1, 2), seed=1, scale=SAMPLING_SCALE)
    assert model.ordering().tolist() == ([0, 2, 1, 3] if name == "pixelrnn" else [0, 1, 2, 3])
    monkeypatch.setattr(model, "ordering", lambda: torch.tensor(wrong_order))
    # The generic sampler, which draws in `ordering()` (NADE's own one draws in a fixed order).
    monkeypatch.setattr(
        model, "conditional_params", functools.partial(AutoregressiveImageModel.conditional_params, model)
    )
    assert sampling_agreement(model, 3) < 1e-6


@pytest.mark.parametrize(
    ("name", "hparams"), cases_in_every_form([p for p in TINY if p.id != "made-3-masks"])
)
def test_the_samplers_step_by_step_params_equal_the_one_pass_params(name, hparams):
    """Families that compute the next conditional incrementally (NADE, FVSBN, Row LSTM) must agree, and
    so must PixelCNN's sampler, which runs the network only on the window its output at a pixel
    reads (here smaller than the image: first kernel 3, two blocks, so 3 or 4 rows above and 3
    columns to either side in a 7 x 8 image)."""
    height, width = (7, 8) if name == "pixelcnn" else (3, 4)
    if name == "pixelcnn":
        hparams = {**hparams, "first_kernel_size": 3}
    shape = shape_of(hparams, height, width)
    model = random_model(name, hparams, shape)
    if name == "pixelcnn":
        rows_above, columns_aside = model.sampling_reach()
        assert rows_above < height - 1 and 2 * columns_aside + 1 < width, "no cropped window is exercised"
    d, levels = model.num_dims, levels_of(hparams)
    images = torch.randint(levels, (5, d), generator=torch.Generator().manual_seed(3)).double() / (levels - 1)
    with torch.no_grad():
        expected = model.params(images.reshape(5, *shape)).flatten(1, 3)
        x = torch.zeros_like(images)
        rows = torch.arange(5)
        steps = 0
        for step, (index, params) in enumerate(model.conditional_params(x, None)):
            assert torch.equal(torch.as_tensor(index).expand(5), model.ordering()[step].expand(5)), (
                "wrong order"
            )
            torch.testing.assert_close(params, expected[rows, index], rtol=1e-9, atol=1e-9)
            x[rows, index] = images[rows, index]
            steps += 1
    assert steps == d


def test_made_draws_its_first_ordering_at_random_unless_told_to_use_the_raster_order():
    default, again = create_model("made", (1, 4, 4)), create_model("made", (1, 4, 4))
    raster = create_model("made", (1, 4, 4), random_order=False)
    assert sorted(default.ordering().tolist()) == list(range(16))
    assert not torch.equal(default.ordering(), torch.arange(16))
    assert torch.equal(default.ordering(), again.ordering()), "the ordering follows mask_seed alone"
    assert torch.equal(raster.ordering(), torch.arange(16))


def test_made_trains_one_random_mask_per_batch_and_evaluates_the_ensemble():
    model = random_model("made", {"hidden": 24, "num_masks": 3}, (1, 3, 3))
    x = all_images((1, 3, 3), 2)[::7]
    with torch.no_grad():
        per_mask = torch.stack([model.mask_log_prob(x, m) for m in range(3)])
        model.train()
        losses = {model(x, "model")["loss"].item() for _ in range(30)}
        model.eval()
        ensemble = model(x, "model")["loss"].item()
    mask_nlls = (-per_mask.mean(1)).tolist()
    assert all(min(abs(loss - nll) for nll in mask_nlls) < 1e-9 for loss in losses)
    assert len(losses) > 1, "training always used the same mask"
    mixture = -(torch.logsumexp(per_mask, 0) - math.log(3))
    assert ensemble == pytest.approx(mixture.mean().item(), abs=1e-9)


@pytest.mark.parametrize(("name", "hparams"), cases_in_every_form())
def test_sampling_is_repeatable_with_a_seeded_generator(name, hparams):
    shape = shape_of(hparams, 3, 4)
    model = random_model(name, hparams, shape)
    first = model.sample(32, generator=torch.Generator().manual_seed(5))
    again = model.sample(32, generator=torch.Generator().manual_seed(5))
    other = model.sample(32, generator=torch.Generator().manual_seed(6))
    assert first.shape == (32, *shape)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", FAMILIES)
def test_multichannel_images_are_rejected_in_the_binary_form(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*\(1, H, W\).*\(3, 8, 8\)"):
        create_model(name, (3, 8, 8), pixels="binary")


@pytest.mark.parametrize("name", [*FAMILIES, "vae"])
def test_the_pixel_form_and_data_kind_follow_the_shape_unless_given(name):
    cls = model_class(name)
    for shape, hparams, pixels, kind in [
        ((1, 4, 4), {}, "binary", "binary"),
        ((3, 4, 4), {}, "8bit", "continuous"),
        ((1, 4, 4), {"pixels": "8bit"}, "8bit", "continuous"),
    ]:
        model = create_model(name, shape, **hparams)
        assert (model.pixels, model.data_kind) == (pixels, kind), (shape, hparams)
        assert cls.data_kind_for(shape, hparams) == kind
        assert cls.data_kind_for(shape, model.spec.hparams) == kind


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"pixels": "16bit"}, r"'made'.*pixels must be 'binary' or '8bit', got '16bit'"),
        ({"output": "gaussian"}, r"'made'.*output must be 'categorical' or 'logistic', got 'gaussian'"),
        ({"levels": 1}, r"'made'.*levels must be at least 2, got 1"),
        ({"mixture_components": 0}, r"'made'.*mixture_components must be at least 1, got 0"),
    ],
)
def test_bad_pixel_settings_are_rejected_with_the_setting_named(hparams, message):
    with pytest.raises(ValueError, match=message):
        create_model("made", (3, 4, 4), **hparams)


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
    job = cpu_job(untrained.spec, epochs=8, batch_size=64, lr=0.01)
    run_training(job, digits.train.images, digits.val.binary.astype(np.float32), LocalContext(tmp_path))
    trained = load_model_dir(tmp_path)
    with torch.no_grad():
        before = -untrained.log_prob(x_test).mean().item()
        after = -trained.log_prob(x_test).mean().item()
    print(f"{name}: test NLL {before:.2f} -> {after:.2f} nats")
    assert after < before - 15.0, f"{name}: test NLL {before:.2f} -> {after:.2f} nats after training"
    samples = trained.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, *digits.image_shape)


@pytest.mark.parametrize(("name", "hparams"), TRAINABLE)
def test_the_8bit_form_trains_on_the_grey_values_themselves(name, hparams, digits, tmp_path: Path):
    """The digits have 17 grey levels (k/16): an 8-bit model with levels=17 learns them, unbinarised."""
    x_test = torch.from_numpy(digits.test.images)
    assert set((x_test * 16).round().unique().tolist()) > {0.0, 1.0, 8.0, 16.0}
    torch.manual_seed(0)
    untrained = create_model(name, digits.image_shape, **hparams, pixels="8bit", levels=17)
    assert untrained.data_kind == "continuous"
    job = cpu_job(untrained.spec, epochs=4, batch_size=64, lr=0.01)
    run_training(job, digits.train.images, digits.val.for_kind(untrained.data_kind), LocalContext(tmp_path))
    trained = load_model_dir(tmp_path)
    with torch.no_grad():
        before = -untrained.log_prob(x_test).mean().item()
        after = -trained.log_prob(x_test).mean().item()
    print(f"{name}: test NLL {before:.2f} -> {after:.2f} nats")
    # Trained on binarised images instead, a model would put its mass on levels 0 and 16 and score
    # worse than the untrained one on the grey test images.
    assert after < before - 40.0, f"{name}: test NLL {before:.2f} -> {after:.2f} nats after training"
    samples = trained.sample(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, *digits.image_shape)
    assert torch.equal((samples * 16).round() / 16, samples)


@pytest.mark.parametrize(
    ("shape", "share"), [((1, 8, 8), 1.0), ((1, 28, 28), 1.0), ((3, 32, 32), 784 / 3072)]
)
def test_fvsbn_takes_a_smaller_rate_the_more_inputs_its_outputs_sum(shape, share):
    (optimizer,) = create_model("fvsbn", shape).configure_optimizers(1e-3).values()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * share)
