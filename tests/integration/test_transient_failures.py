"""The registration step against a real `mlflow server` whose network fails at the worst moment: the
server registers the model but its reply is lost. Whether the error reaches Prefect (which retries the
task) or MLflow's HTTP client re-sends the request itself, the model ends up registered exactly once."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from flaky_proxy import FlakyProxy
from mlflow.tracking import MlflowClient

from components.registry.versions import CHALLENGER, CHAMPION
from flows.retrain import retrain

pytestmark = pytest.mark.integration

CREATE_VERSION = b"POST /api/2.0/mlflow/model-versions/create "


@pytest.fixture(scope="module")
def project(tmp_path_factory, project_factory, ray_instance, prefect_server):
    return project_factory(tmp_path_factory.mktemp("transient") / "project")


@pytest.fixture
def proxy(mlflow_server) -> FlakyProxy:
    return FlakyProxy(urlparse(mlflow_server).port)


def run_through(proxy: FlakyProxy, project, model: str):
    overrides = {
        "train": {"epochs": 1},
        "evaluate": {"num_samples": 200, "importance_samples": 10},
        "tracking": {"mlflow_tracking_uri": proxy.url},
    }
    return retrain(project_dir=str(project), models=[model], overrides=overrides, return_state=True)


def task_run(state, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    with get_client(sync_client=True) as client:
        (found,) = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])),
        )
    return found


def registered_once(mlflow_server: str, name: str):
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert client.get_model_version_by_alias(name, CHAMPION).version == version.version
    assert client.get_model_version_by_alias(name, CHALLENGER).version == version.version
    assert client.get_run(version.run_id).info.status == "FINISHED"
    return version


def test_prefect_retries_registration_after_a_lost_reply_and_an_outage(
    project, proxy, mlflow_server, monkeypatch
):
    # MLflow's client would ride out a short outage with its own retries; with one retry, the error
    # reaches the task and Prefect's retry has to recover.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    proxy.lose_reply_to(CREATE_VERSION, then_down_for_s=2)

    state = run_through(proxy, project, "vae")

    assert state.is_completed(), state.message
    assert proxy.lost_replies == 1 and proxy.refused_connections >= 1
    register = task_run(state, "register-vae")
    assert register.state.is_completed() and register.run_count == 2
    version = registered_once(mlflow_server, "digits.vae")
    assert version.tags["metric.val_bits_per_dim_bound"]  # data.pixels auto: the digits' 17 levels, 8-bit


def test_a_create_request_resent_by_mlflow_leaves_one_version(project, proxy, mlflow_server):
    # MLflow's client re-sends the request at once (default retries): the server registers the run twice.
    proxy.lose_reply_to(CREATE_VERSION)

    state = run_through(proxy, project, "made")

    assert state.is_completed(), state.message
    assert proxy.lost_replies == 1
    assert task_run(state, "register-made").run_count == 1
    assert registered_once(mlflow_server, "digits.made").version == "1"
