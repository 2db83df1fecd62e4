"""Every family through the real flow on colour images: the built-in shapes at 3x32x32, a few images,
one short epoch of tiny models. Each one builds, trains, samples at 3x32x32, is scored (the density
families and the VAE in bits/dim on the 8-bit values) and is registered. The flow's lifecycle on the
built-in digits is tested in test_pipeline.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY_SAMPLE_QUALITY
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import State
from scored import assert_scored

from components.data.importers import builtin_dataset, install_dataset
from components.models import list_models
from components.models.factory import model_class
from components.registry.store import resolve_tracking_uri
from components.registry.versions import CHAMPION
from flows.retrain import retrain

pytestmark = pytest.mark.integration

SHAPE = (3, 32, 32)
# Tiny widths: the point is every family's path at this size, not its quality.
TINY = {
    "vae": {"latent_dim": 4, "channels": 4, "hidden": 16},
    "fvsbn": {},
    "nade": {"hidden": 16},
    "made": {"hidden": 32},
    "pixelcnn": {"channels": 8, "num_blocks": 1},
    "pixelrnn": {"channels": 8, "hidden": 4, "num_layers": 1},
    **TINY_SAMPLE_QUALITY,
}
SAMPLES = 16


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory, ray_instance, prefect_server, project_factory) -> tuple[Path, State]:
    """A project whose data is 128 rendered shapes at 32x32, in which every family ran the flow once,
    and the flow run's final state."""
    project = project_factory(tmp_path_factory.mktemp("colour") / "project")
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["featurizer"]["epochs"] = 1
    params["models"] = TINY
    params["evaluate"].update(num_samples=SAMPLES, kid_subset_size=8, importance_samples=2, batch_size=64)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    install_dataset(builtin_dataset("shapes", size=128, resolution=SHAPE[1]), project)
    state = retrain(
        project_dir=str(project),
        models=list_models(),
        overrides={"train": {"epochs": 1, "batch_size": 16, "max_concurrent_models": 2}},
        return_state=True,
    )
    assert state.is_completed(), state.message
    return project, state


@pytest.fixture(scope="module")
def colour_project(colour_run) -> Path:
    return colour_run[0]


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


def test_every_family_trains_samples_and_is_scored_at_3x32x32_through_the_flow(colour_project):
    assert set(TINY) == set(list_models()), "a family is missing from the colour run"
    uri = resolve_tracking_uri(None, colour_project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for family in list_models():
        version = client.get_model_version_by_alias(f"shapes32.{family}", CHAMPION)
        metrics = assert_scored(family, version)
        primary = model_class(family).primary_metric
        if primary == "nll" or family == "vae":  # exact, or the VAE's bound, on the 8-bit values
            bits = metrics["test_bits_per_dim" if primary == "nll" else "test_bits_per_dim_bound"]
            assert 0 < bits < 16, f"{family}: {bits} bits/dim on 8-bit data"
        with tempfile.TemporaryDirectory() as tmp:
            spec = json.loads(
                Path(client.download_artifacts(version.run_id, "model/data/model.json", tmp)).read_text()
            )
            assert tuple(spec["image_shape"]) == SHAPE, (family, spec)
            grid = Image.open(client.download_artifacts(version.run_id, "images/samples.png", tmp))
            assert grid.mode == "RGB" and grid.size[0] >= 2 * SHAPE[2], (family, grid.mode, grid.size)
