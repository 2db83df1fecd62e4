"""Ten overlapping triggers of the served deployment, five at a time, against one real `mlflow server`:
each model is registered at most once per changed input, `champion` and `prod.*` always point at
versions whose decision says "promoted", and no alias is left half-moved after a round of runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import wait_until
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.registry.lineage import FINGERPRINT_TAG
from components.registry.versions import CHAMPION

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
NAME, PRODUCTION = "digits.vae", "prod.digits.vae"
AT_A_TIME = 5


def final_state(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
    return state if state.is_final() else None


def aliased(registry: MlflowClient, name: str):
    """The version `name`'s champion alias points at; None before the first one is promoted."""
    try:
        return registry.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        assert err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"), err
        return None


def registry_holds(registry: MlflowClient) -> dict[str, str | None]:
    """What must hold whenever a run has ended, while others may still run: at most one version per
    input, and each champion alias on a promoted version. Returns where the two aliases point."""
    versions = registry.search_model_versions(f"name = '{NAME}'")
    per_input = Counter(v.tags[FINGERPRINT_TAG] for v in versions)
    assert all(count == 1 for count in per_input.values()), f"registered twice for one input: {per_input}"
    champion, production = aliased(registry, NAME), aliased(registry, PRODUCTION)
    for version in (champion, production):
        assert version is None or version.tags["promotion.decision"] == "promoted", version.tags
    return {
        "champion": champion and str(champion.version),
        "production source": production and production.tags["source_version"],
    }


def test_ten_overlapping_triggers_register_once_per_input_and_never_half_move_an_alias(
    prefect_server, ray_instance, mlflow_server, tmp_path, project_factory
):
    from prefect.deployments import run_deployment

    project = project_factory(tmp_path / "project")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    command = [
        str(BIN / "genpipe"),
        "schedule",
        "--cron",
        "0 0 1 1 *",
        "--name",
        "overlap",
        "--models",
        "vae",
    ]
    server = subprocess.Popen(
        [*command, "-C", str(project)],
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
    )
    registry = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    rounds = {"first input": 1e-3, "changed input": 2e-3}  # the learning rate is part of the fingerprint
    try:
        wait_until(deployment_served, 120, "served deployment")
        for label, lr in rounds.items():
            parameters = {
                "overrides": {
                    "train": {"epochs": 1, "lr": lr},
                    "evaluate": {"num_samples": 200, "importance_samples": 10},
                    "tracking": {"mlflow_tracking_uri": mlflow_server},
                },
                "ray_address": ray_instance.get_runtime_context().gcs_address,
            }
            triggered = [
                run_deployment("genpipe-retrain/overlap", parameters=parameters, timeout=0)
                for _ in range(AT_A_TIME)
            ]
            pending, ended = {run.id for run in triggered}, []
            while pending:
                for run_id in list(pending):
                    if (state := final_state(run_id)) is not None:
                        pending.discard(run_id)
                        ended.append(state)
                        registry_holds(registry)  # after every run, while the others still run
                time.sleep(1)
            messages = [state.message for state in ended]
            assert all(s.is_completed() or s.is_cancelled() for s in ended), (
                f"{label}: {messages}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            )
            trained = [m for m in messages if m.startswith("1 model(s) trained")]
            assert len(trained) == 1, f"{label}: {messages}"
            skipped = [s for s in ended if s.message not in trained]
            assert all(
                s.message == "0 model(s) trained, 1 skipped" or "another genpipe run" in s.message
                for s in skipped
            ), messages
            aliases = registry_holds(registry)  # every run of the round has ended: nothing is mid-move
            assert aliases["champion"] is not None, f"{label}: no champion"
            assert aliases["champion"] == aliases["production source"], f"{label}: half-moved {aliases}"
        assert len(registry.search_model_versions(f"name = '{NAME}'")) == len(rounds)
    finally:
        server.terminate()
        server.wait(timeout=60)


def deployment_served() -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name("genpipe-retrain/overlap")
        except ObjectNotFound:
            return False
    return True
