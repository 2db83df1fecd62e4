"""Sample grids drawn during training: every K epochs and at the end, without changing the training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cpu_job

from components.models import create_model
from components.models.model_dir import load_model_dir
from components.training.trainer import LocalContext, _first_images, read_outcome, run_training

TINY = {"vae": {"latent_dim": 4, "channels": 8, "hidden": 32}, "ae": {}}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("family", sorted(TINY))
def test_grids_every_k_epochs_and_at_the_end_leave_training_unchanged(digits, tmp_path, family):
    spec = create_model(family, digits.image_shape, **TINY[family]).spec
    outcomes, models = {}, {}
    for every in (0, 2):
        job = cpu_job(spec, epochs=3, batch_size=256, lr=1e-3, seed=3, sample_every_epochs=every)
        output = tmp_path / f"every-{every}"
        run_training(job, digits.train.images, digits.val.binary.astype(np.float32), LocalContext(output))
        outcomes[every], models[every] = read_outcome(output), load_model_dir(output)
    assert outcomes[0].progress_samples == {}
    grids = outcomes[2].progress_samples
    assert sorted(grids) == [2, 3]
    for grid in grids.values():
        assert grid.dtype == np.uint8 and grid.shape == (16, *digits.image_shape)
    assert outcomes[0].history == outcomes[2].history
    for (name, a), (_, b) in zip(models[0].state_dict().items(), models[2].state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_progress_grid_reads_only_the_leading_images_of_the_split():
    read = []

    def pieces():
        for start in range(0, 100, 30):
            read.append(start)
            yield torch.arange(start, min(start + 30, 100))

    taken = torch.cat(list(_first_images(pieces(), 45)))
    assert torch.equal(taken, torch.arange(45)) and read == [0, 30]
