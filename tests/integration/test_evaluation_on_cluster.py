"""Evaluation as a Ray task on a real local Ray instance: exactly the scores of the same evaluation in
this process, with its progress reaching this process."""

from __future__ import annotations

import copy
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from components.evaluation.evaluate import EvaluationSettings
from components.evaluation.featurizer import train_featurizer
from components.evaluation.on_cluster import (
    EvaluationTask,
    ExtractorSource,
    evaluate_on_cluster,
    run_evaluation,
)
from components.models import create_model

pytestmark = pytest.mark.integration

TINY = {"vae": {"latent_dim": 2, "channels": 4, "hidden": 16}, "nade": {"hidden": 8}, "dcgan": {"width": 8}}


@pytest.fixture(scope="module")
def task(digits_root: Path, tmp_path_factory) -> EvaluationTask:
    featurizer_dir = tmp_path_factory.mktemp("featurizer")
    train_featurizer(
        digits_root / "prepared", featurizer_dir, feature_dim=16, epochs=1, batch_size=128, lr=2e-3, seed=0
    )
    return EvaluationTask(
        prepared_dir=str(digits_root / "prepared"),
        data_version="digits-under-test",
        extractor=ExtractorSource("featurizer", str(featurizer_dir)),
        real_features_dir=str(tmp_path_factory.mktemp("real-features")),
        settings=EvaluationSettings(
            num_samples=100, kid_subset_size=50, importance_samples=4, batch_size=100, seed=0
        ),
        cpus=1,
        gpus="auto",
        context={"prepared_data": "digits-under-test"},
    )


@pytest.mark.usefixtures("one_thread")  # as a Ray task gets it: one CPU, one thread
@pytest.mark.parametrize("name", sorted(TINY))
def test_an_evaluation_on_the_cluster_scores_exactly_as_in_this_process(ray_instance, task, tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, (1, 8, 8), **TINY[name])
    updates = []
    on_cluster = evaluate_on_cluster(copy.deepcopy(model), task, on_progress=updates.append)
    # Its own feature cache, so this evaluation computes everything itself.
    here = run_evaluation(copy.deepcopy(model), dataclasses.replace(task, real_features_dir=str(tmp_path)))
    assert on_cluster.metrics == here.metrics
    assert on_cluster.settings == here.settings
    assert torch.equal(on_cluster.images["samples"][0], here.images["samples"][0])
    assert updates and updates[-1].done == updates[-1].total  # the task's progress came back here


def test_two_evaluations_run_side_by_side_when_the_cluster_has_room_for_both(ray_instance, task):
    """Two evaluation tasks of one CPU each on the two-CPU instance both report progress at once for
    seconds. (Run one after the other, their reports could overlap by at most one poll of a feed,
    half a second.)"""
    slow = dataclasses.replace(task, settings=dataclasses.replace(task.settings, importance_samples=1000))
    heard: dict[int, list[tuple[float, int, int]]] = {0: [], 1: []}

    def evaluate(seed: int):
        torch.manual_seed(seed)
        model = create_model("vae", (1, 8, 8), **TINY["vae"])
        return evaluate_on_cluster(
            model, slow, on_progress=lambda u: heard[seed].append((time.monotonic(), u.done, u.total))
        )

    with ThreadPoolExecutor(2) as pool:
        evaluations = list(pool.map(evaluate, (0, 1)))
    assert all("val_nll_bound" in evaluation.metrics for evaluation in evaluations)
    began, ended = (max(heard[i][0][0] for i in heard), min(heard[i][-1][0] for i in heard))
    assert ended - began > 2.0, heard  # both were reporting progress at once for over two seconds
