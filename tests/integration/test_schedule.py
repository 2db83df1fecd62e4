"""The scheduled deployment served by `genpipe schedule`, triggered on a real Prefect server, logging to a
real `mlflow server` process: the first run trains and registers, a second with nothing changed skips,
a third after the data changed retrains and re-evaluates the champion on the new data first."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from components.data.importers import import_dataset
from components.data.raw import builtin_digits

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "art"),
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        wait_until(healthy, 90, "mlflow server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_served_deployment_trains_then_skips_when_nothing_changed(
    prefect_server, ray_instance, mlflow_server, tmp_path, project_factory
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL

    project = project_factory(tmp_path / "project")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    server = subprocess.Popen(
        [
            str(BIN / "genpipe"),
            "schedule",
            "--cron",
            "0 3 * * *",
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

    async def deployment():
        async with get_client() as client:
            try:
                return await client.read_deployment_by_name("genpipe-retrain/e2e")
            except Exception:
                return None

    try:
        found = wait_until(lambda: asyncio.run(deployment()), 120, "served deployment")
        assert [s.schedule.cron for s in found.schedules] == ["0 3 * * *"]
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
        assert "re-evaluated on data" in newest.tags["promotion.reason"]
        assert newest.tags["data_version"] != champion.tags["data_version"]

    finally:
        server.terminate()
        server.wait(timeout=60)
