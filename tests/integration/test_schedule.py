"""The scheduled deployment served by `genpipe schedule` on a real Prefect server, logging to a real
`mlflow server` process: the server's scheduler creates its upcoming runs; triggered, the first run
trains and registers, a second with nothing changed skips, a third after the data changed retrains and
re-evaluates the champion on the new data first."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import scheduled_runs, wait_until
from mlflow.tracking import MlflowClient

from components.data.importers import import_dataset
from components.data.raw import builtin_digits

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def test_served_deployment_is_scheduled_then_trains_skips_and_retrains_on_new_data(
    prefect_server, ray_instance, mlflow_server, tmp_path, project_factory
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    project = project_factory(tmp_path / "project")
    # Twelve hours from now: the scheduled runs the server creates are never due while the test runs.
    hour = (datetime.now(UTC) + timedelta(hours=12)).hour
    cron = f"0 {hour} * * *"
    # The runner looks for due runs every 10 s by default; each trigger below would wait on that.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    server = subprocess.Popen(
        [
            str(BIN / "genpipe"),
            "schedule",
            "--cron",
            cron,
            "--name",
            "e2e",
            "--models",
            "vae",
            "-C",
            str(project),
        ],
        env=env,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
    )

    def deployment():
        with get_client(sync_client=True) as client:
            try:
                return client.read_deployment_by_name("genpipe-retrain/e2e")
            except ObjectNotFound:
                return None

    try:
        found = wait_until(deployment, 120, "served deployment")
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
        first = run_deployment("genpipe-retrain/e2e", parameters=parameters, timeout=600, poll_interval=2)
        assert first.state.is_completed(), (
            f"{first.state.message}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        )
        assert first.state.message.startswith("1 model(s) trained")
        registry = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        champion = registry.get_model_version_by_alias("digits.vae", "champion")
        assert champion.tags["prefect_flow_run_id"] == str(first.id)

        second = run_deployment("genpipe-retrain/e2e", parameters=parameters, timeout=300, poll_interval=2)
        assert second.state.is_completed(), second.state.message
        assert second.state.message == "0 model(s) trained, 1 skipped"
        assert len(registry.search_model_versions("name = 'digits.vae'")) == 1

        digits = builtin_digits()  # new data under the same name: retrain, and re-evaluate the champion first
        np.savez(project / "fewer.npz", x=digits.images[:900, 0], y=digits.labels[:900])
        import_dataset(project / "fewer.npz", project, name="digits")
        third = run_deployment("genpipe-retrain/e2e", parameters=parameters, timeout=600, poll_interval=2)
        assert third.state.is_completed(), third.state.message
        assert third.state.message.startswith("1 model(s) trained")
        newest = max(registry.search_model_versions("name = 'digits.vae'"), key=lambda v: int(v.version))
        assert str(newest.version) == "2"
        assert (
            "re-evaluated first" in newest.tags["promotion.reason"]
            and "prepared_data" in newest.tags["promotion.reason"]
        )
        assert newest.tags["data_version"] != champion.tags["data_version"]

    finally:
        server.terminate()
        server.wait(timeout=60)
