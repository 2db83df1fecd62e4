"""The scheduled deployment served by `genpipe schedule` on a real Prefect server, logging to a real
`mlflow server` process. The server's scheduler creates its upcoming runs. Then it is triggered in two
rounds of five overlapping runs, the first on the project's data and the second after new data was
imported, with one run alone between them: each round trains and registers exactly once (the second
re-evaluates the champion on the new data first), the run alone skips because nothing changed,
`champion` and `prod.*` always point at versions whose decision says "promoted", and no alias is left
half-moved after a round.

One served deployment, one `mlflow server` and two trainings show all of it: the schedule and the
overlapping triggers were two tests with a deployment, a server and two trainings each."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import scheduled_runs, wait_until
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.data.importers import import_dataset
from components.data.raw import builtin_digits
from components.registry.lineage import FINGERPRINT_TAG
from components.registry.versions import CHAMPION

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
DEPLOYMENT = "genpipe-retrain/e2e"
NAME, PRODUCTION = "digits.vae", "prod.digits.vae"
AT_A_TIME = 5


def served_deployment():
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            return None


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


def overlapping_round(label: str, parameters: dict, registry: MlflowClient, serve_log: Path):
    """Trigger the deployment `AT_A_TIME` times at once; check the registry after every run that ends
    and once all have. Returns the id of the one run that trained."""
    from prefect.deployments import run_deployment

    triggered = [run_deployment(DEPLOYMENT, parameters=parameters, timeout=0) for _ in range(AT_A_TIME)]
    pending, ended = {run.id for run in triggered}, {}
    while pending:
        for run_id in list(pending):
            if (state := final_state(run_id)) is not None:
                pending.discard(run_id)
                ended[run_id] = state
                registry_holds(registry)  # after every run, while the others still run
        time.sleep(1)
    messages = [state.message for state in ended.values()]
    assert all(s.is_completed() or s.is_cancelled() for s in ended.values()), (
        f"{label}: {messages}\n{serve_log.read_text()[-3000:]}"
    )
    trained = [run_id for run_id, s in ended.items() if s.message.startswith("1 model(s) trained")]
    assert len(trained) == 1, f"{label}: {messages}"
    skipped = [s.message for run_id, s in ended.items() if run_id not in trained]
    assert all(m == "0 model(s) trained, 1 skipped" or "another genpipe run" in m for m in skipped), messages
    aliases = registry_holds(registry)  # every run of the round has ended: nothing is mid-move
    assert aliases["champion"] is not None, f"{label}: no champion"
    assert aliases["champion"] == aliases["production source"], f"{label}: half-moved {aliases}"
    return trained[0]


def test_served_deployment_is_scheduled_and_overlapping_triggers_train_once_per_input_and_skip_otherwise(
    prefect_server, ray_instance, mlflow_server, tmp_path, project_factory
):
    from prefect.deployments import run_deployment

    project = project_factory(tmp_path / "project")
    # Twelve hours from now: the scheduled runs the server creates are never due while the test runs.
    hour = (datetime.now(UTC) + timedelta(hours=12)).hour
    cron = f"0 {hour} * * *"
    # The runner looks for due runs every 10 s by default; each trigger below would wait on that.
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve_log = tmp_path / "serve.log"
    server = subprocess.Popen(
        [
            *(str(BIN / "genpipe"), "schedule", "--cron", cron, "--name", "e2e", "--models", "vae"),
            *("-C", str(project)),
        ],
        env=env,
        stdout=open(serve_log, "w"),
        stderr=subprocess.STDOUT,
    )
    registry = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    try:
        found = wait_until(served_deployment, 120, "served deployment")
        assert [s.schedule.cron for s in found.schedules] == [cron]
        # The server's scheduler, not the test, creates the next runs of the cron schedule.
        upcoming = wait_until(lambda: scheduled_runs(found.id), 60, "scheduled runs")
        starts = sorted(run.expected_start_time for run in upcoming)
        assert all(run.auto_scheduled for run in upcoming)
        assert all((t.hour, t.minute, t.second) == (hour, 0, 0) for t in starts), starts
        assert datetime.now(UTC) < starts[0] <= datetime.now(UTC) + timedelta(days=1)
        assert all(later - earlier == timedelta(days=1) for earlier, later in itertools.pairwise(starts)), (
            starts
        )
        assert all(run.parameters["project_dir"] == str(project.resolve()) for run in upcoming)
        parameters = {
            "overrides": {
                "train": {"epochs": 1},
                "evaluate": {"num_samples": 200, "importance_samples": 10},
                "tracking": {"mlflow_tracking_uri": mlflow_server},
            },
            "ray_address": ray_instance.get_runtime_context().gcs_address,
        }

        first = overlapping_round("first input", parameters, registry, serve_log)
        champion = registry.get_model_version_by_alias(NAME, CHAMPION)
        assert champion.tags["prefect_flow_run_id"] == str(first)

        alone = run_deployment(DEPLOYMENT, parameters=parameters, timeout=300, poll_interval=2)
        assert alone.state.is_completed(), alone.state.message
        assert alone.state.message == "0 model(s) trained, 1 skipped"
        assert len(registry.search_model_versions(f"name = '{NAME}'")) == 1

        digits = builtin_digits()  # new data under the same name: retrain, and re-evaluate the champion first
        np.savez(project / "fewer.npz", x=digits.images[:900, 0], y=digits.labels[:900])
        import_dataset(project / "fewer.npz", project, name="digits")
        overlapping_round("new data", parameters, registry, serve_log)
        versions = registry.search_model_versions(f"name = '{NAME}'")
        assert sorted(str(v.version) for v in versions) == ["1", "2"]
        newest = max(versions, key=lambda v: int(v.version))
        assert (
            "re-evaluated first" in newest.tags["promotion.reason"]
            and "prepared_data" in newest.tags["promotion.reason"]
        )
        assert newest.tags["data_version"] != champion.tags["data_version"]
    finally:
        server.terminate()
        server.wait(timeout=60)
