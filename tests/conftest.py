"""Shared, real infrastructure for the tests: one Ray instance and one Prefect server per session, an
MLflow server process per module that asks for one.

Each takes 10-20 s to start, so the integration tests share them. Nothing here is mocked.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("params.yaml", "dvc.yaml")
BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_instance():
    """A real local Ray instance with two CPUs, shared by the session."""
    import ray

    # "local": a new instance, never one that another test process (or `ray start`) left running here.
    ray.init(
        address="local", num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level="WARNING"
    )
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:  # refused, or too busy starting up to answer in time
        return False


def scheduled_runs(deployment_id) -> list:
    """The runs of a deployment that are scheduled and not started yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    scheduled = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=scheduled),
        )


@contextmanager
def serve(command: list[str], log: Path, health_url: str, what: str, env: dict[str, str] | None = None):
    """Start a server process, wait until `health_url` answers, stop it (and its children) afterwards."""
    process = subprocess.Popen(
        command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        try:
            wait_until(lambda: process.poll() is None and http_ok(health_url), 120, what)
        except TimeoutError as err:
            raise RuntimeError(f"{err}; exit code {process.poll()}; log:\n{log.read_text()[-3000:]}") from err
        yield
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Prefect's own server (`prefect server start`: API, SQLite, and its services, the scheduler
    included), shared by the session; the test process talks to it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
        # Deployments created by a test get their scheduled runs within seconds rather than a minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
        # Leases of killed runs (concurrency slots) are reclaimed soon after they expire.
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
    }
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with (
        serve(command, home / "server.log", f"{url}/health", "prefect server", env),
        temporary_settings(updates={PREFECT_API_URL: url}),
    ):
        yield url


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process (SQLite backend, proxied artifact store) for one test module."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        *("server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts")),
    ]
    url = f"http://127.0.0.1:{port}"
    # As in the stack: no server-side job runner, which genpipe does not use and which costs ~40 s of CPU.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serve(command, root / "server.log", f"{url}/health", "mlflow server", env):
        yield url


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def make_project(directory: Path) -> Path:
    """A fresh git + DVC project with genpipe's params and stages, and its own MLflow SQLite store."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        shutil.copy(PROJECT_ROOT / name, directory / name)
    # The stages depend on their own source files, as in a clone of the project.
    shutil.copytree(
        PROJECT_ROOT / "components", directory / "components", ignore=shutil.ignore_patterns("__pycache__")
    )
    git(directory, "init", "-q", "-b", "main")
    git(directory, "config", "user.email", "tests@genpipe.invalid")
    git(directory, "config", "user.name", "genpipe tests")
    from components.data.versioning import run_dvc

    run_dvc(directory, "init", "-q")
    git(directory, "add", "-A")
    git(directory, "commit", "-qm", "project")
    return directory


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def project_factory():
    """`make_project` for fixtures of wider scope than `project`."""
    return make_project


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids contention on a 2-core machine (use via pytest.mark.usefixtures)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """The built-in digits, written and prepared (split, scaled, binarised) once per session."""
    from components.data.prepared import prepare
    from components.data.raw import builtin_digits, write_raw

    root = tmp_path_factory.mktemp("digits")
    write_raw(builtin_digits(), root / "raw")
    prepare(root / "raw", root / "prepared", 0.1, 0.2, 0)
    return root


@pytest.fixture(scope="session")
def digits(digits_root):
    from components.data.prepared import load_prepared

    return load_prepared(digits_root / "prepared")
