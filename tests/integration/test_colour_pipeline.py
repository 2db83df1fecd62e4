"""Every family through the real flow on colour images: the built-in shapes at 3x32x32, a few images,
one short epoch of tiny models. Each one builds, trains, samples at 3x32x32, is scored (the density
families and the VAE in bits/dim on the 8-bit values) and is registered. The flow's lifecycle on the
built-in digits is tested in test_pipeline.py."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from conftest import COLOUR_SHAPE, TINY_FAMILIES
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from scored import assert_scored, expected_primary_metric

from components.models import list_models
from components.registry.store import resolve_tracking_uri
from components.registry.versions import CHAMPION

# The run is conftest's `colour_run`, which test_report.py reads too (one process runs both files).
pytestmark = pytest.mark.integration


def test_a_model_is_evaluated_while_later_ones_still_wait_to_train(colour_run):
    """Two trainings at a time, 14 families: a branch goes on when its training ends, so the first
    evaluation starts before the last training does (queued stage by stage, it started after)."""
    _, state = colour_run
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    started = {run.name: run.start_time for run in task_runs}
    trainings = [when for name, when in started.items() if name.startswith("train-")]
    evaluations = [when for name, when in started.items() if name.startswith("evaluate-")]
    assert len(trainings) == len(evaluations) == len(list_models())
    assert min(evaluations) < max(trainings)


def test_every_family_trains_samples_and_is_scored_at_3x32x32_through_the_flow(colour_run):
    colour_project, _ = colour_run
    assert set(TINY_FAMILIES) == set(list_models()), "a family is missing from the colour run"
    uri = resolve_tracking_uri(None, colour_project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for family in list_models():
        version = client.get_model_version_by_alias(f"shapes32.{family}", CHAMPION)
        metrics = assert_scored(family, version, pixels="8bit")
        primary = expected_primary_metric(family, "8bit")
        if primary.startswith("bits_per_dim"):  # exact, or the VAE's bound, on the 8-bit values
            bits = metrics[f"test_{primary}"]
            assert 0 < bits < 16, f"{family}: {bits} bits/dim on 8-bit data"
            nats = metrics["test_nll" if primary == "bits_per_dim" else "test_nll_bound"]
            assert nats == pytest.approx(bits * math.log(2) * math.prod(COLOUR_SHAPE)), family
        with tempfile.TemporaryDirectory() as tmp:
            spec = json.loads(
                Path(client.download_artifacts(version.run_id, "model/data/model.json", tmp)).read_text()
            )
            assert tuple(spec["image_shape"]) == COLOUR_SHAPE, (family, spec)
            grid = Image.open(client.download_artifacts(version.run_id, "images/samples.png", tmp))
            assert grid.mode == "RGB" and grid.size[0] >= 2 * COLOUR_SHAPE[2], (family, grid.mode, grid.size)
