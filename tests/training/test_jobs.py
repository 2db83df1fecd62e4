"""A run checks that every model can be built for the data before any model trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import ConfigError, load_params
from components.models import list_models
from components.training.jobs import ModelsDoNotFit, check_models_fit, train_job

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
EIGHT_BIT = 256  # distinct pixel values of 8-bit data


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_every_family_fits_every_supported_resolution_with_the_default_params(shape):
    check_models_fit(load_params(PARAMS), list_models(), shape, EIGHT_BIT)


def test_each_misfit_is_named_with_its_family_setting_and_shape_and_the_fits_pass():
    params = load_params(PARAMS, {"models": {"nade": {"pixels": "binary"}, "made": {"hiden": 64}}})
    with pytest.raises(ModelsDoNotFit) as raised:
        check_models_fit(params, ["nade", "dcgan", "made", "pixelcnn"], (3, 32, 32), EIGHT_BIT)
    message = str(raised.value)
    assert message.startswith("2 of 4 model(s) cannot be built for the prepared 3x32x32 images")
    assert "nade: model 'nade' with pixels='binary' models single-channel binary images" in message
    assert "got (3, 32, 32) with 3 channels" in message
    assert "made: unknown hyper-parameter(s) hiden for model 'made'" in message
    assert "dcgan" not in message and "pixelcnn" not in message
    check_models_fit(params, ["dcgan", "pixelcnn"], (3, 32, 32), EIGHT_BIT)


def test_an_image_below_a_familys_minimum_is_refused_by_name():
    with pytest.raises(
        ModelsDoNotFit, match=r"vaegan: vaegan: images of 1x3x3 are smaller than its minimum of 4x4"
    ):
        check_models_fit(load_params(PARAMS), ["vaegan", "nade"], (1, 3, 3), EIGHT_BIT)


def test_a_job_is_made_without_building_the_model_in_memory():
    # FVSBN at 3x64x64 has about 12,288^2 x 3 weights (1.8 GB as float32): on the meta device, none exist.
    job = train_job(load_params(PARAMS), "fvsbn", (3, 64, 64), EIGHT_BIT)
    assert job.spec.image_shape == (3, 64, 64) and job.spec.name == "fvsbn"


def test_data_pixels_sets_the_form_of_every_pixel_family_and_a_familys_own_setting_wins():
    params = load_params(PARAMS, {"data": {"pixels": "8bit"}, "models": {"nade": {"pixels": "binary"}}})
    two_level = forms(params, (1, 28, 28), levels=2)
    assert two_level == {model: None for model in list_models() if model not in PIXEL_FAMILIES} | {
        "vae": "8bit",
        "fvsbn": "8bit",
        "nade": "binary",
        "made": "8bit",
        "pixelcnn": "8bit",
        "pixelrnn": "8bit",
    }


PIXEL_FAMILIES = {"vae", "fvsbn", "nade", "made", "pixelcnn", "pixelrnn"}


def forms(params, shape: tuple[int, int, int], levels: int) -> dict[str, str | None]:
    """The pixel form each family's job gets for this data (None: a family without one)."""
    return {
        model: train_job(params, model, shape, levels).spec.hparams.get("pixels") for model in list_models()
    }


@pytest.mark.parametrize(
    ("shape", "levels", "form"),
    [
        ((1, 28, 28), 2, "binary"),  # black and white: binarised MNIST's form
        ((1, 28, 28), 1, "binary"),  # a blank dataset is no reason to model 256 levels
        ((1, 8, 8), 17, "8bit"),  # the built-in digits: 17 grey levels
        ((1, 28, 28), 256, "8bit"),
        ((3, 32, 32), 2, "8bit"),  # binary modelling is single-channel
    ],
)
def test_auto_pixels_follows_the_datas_levels_binary_only_for_two_level_grey_images(shape, levels, form):
    expected = {model: form if model in PIXEL_FAMILIES else None for model in list_models()}
    assert forms(load_params(PARAMS), shape, levels) == expected
    own = load_params(PARAMS, {"models": {"nade": {"pixels": "8bit"}}})  # a family's own setting wins
    assert forms(own, shape, levels) == expected | {"nade": "8bit"}


def test_binary_data_pixels_with_colour_images_is_refused_naming_the_setting():
    params = load_params(PARAMS, {"data": {"pixels": "binary"}})
    with pytest.raises(ModelsDoNotFit) as raised:
        check_models_fit(params, ["made", "dcgan"], (3, 32, 32), EIGHT_BIT)
    message = str(raised.value)
    assert message.startswith("1 of 2 model(s) cannot be built for the prepared 3x32x32 images")
    assert "made: model 'made' with pixels='binary'" in message
    assert "(pixels from params.yaml data.pixels: binary)" in message


def test_an_unknown_data_pixels_value_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"data\.pixels.*'auto', 'binary' or '8bit'.*got '16bit'"):
        load_params(PARAMS, {"data": {"pixels": "16bit"}})
