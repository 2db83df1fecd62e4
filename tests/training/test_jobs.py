"""A run checks that every model can be built for the data before any model trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.config import load_params
from components.models import list_models
from components.training.jobs import ModelsDoNotFit, check_models_fit, train_job

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_every_family_fits_every_supported_resolution_with_the_default_params(shape):
    check_models_fit(load_params(PARAMS), list_models(), shape)


def test_each_misfit_is_named_with_its_family_setting_and_shape_and_the_fits_pass():
    params = load_params(PARAMS, {"models": {"nade": {"pixels": "binary"}, "made": {"hiden": 64}}})
    with pytest.raises(ModelsDoNotFit) as raised:
        check_models_fit(params, ["nade", "dcgan", "made", "pixelcnn"], (3, 32, 32))
    message = str(raised.value)
    assert message.startswith("2 of 4 model(s) cannot be built for the prepared 3x32x32 images")
    assert "nade: model 'nade' with pixels='binary' models single-channel binary images" in message
    assert "got (3, 32, 32) with 3 channels" in message
    assert "made: unknown hyper-parameter(s) hiden for model 'made'" in message
    assert "dcgan" not in message and "pixelcnn" not in message
    check_models_fit(params, ["dcgan", "pixelcnn"], (3, 32, 32))


def test_an_image_below_a_familys_minimum_is_refused_by_name():
    with pytest.raises(
        ModelsDoNotFit, match=r"vaegan: vaegan: images of 1x3x3 are smaller than its minimum of 4x4"
    ):
        check_models_fit(load_params(PARAMS), ["vaegan", "nade"], (1, 3, 3))


def test_a_job_is_made_without_building_the_model_in_memory():
    # FVSBN at 3x64x64 has about 12,288^2 x 3 weights (1.8 GB as float32): on the meta device, none exist.
    job = train_job(load_params(PARAMS), "fvsbn", (3, 64, 64))
    assert job.spec.image_shape == (3, 64, 64) and job.spec.name == "fvsbn"
