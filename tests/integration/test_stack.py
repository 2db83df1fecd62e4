"""The local server stack (infra/stack): real MLflow with basic auth, Prefect and a two-node Ray cluster,
which also serves the multi-node training tests (placement, a killed worker resuming).

The stack runs on free loopback ports in a temporary directory; the fixture stops it even when a test
fails, and the last test checks that stopping leaves no process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shlex
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from conftest import scheduled_runs, wait_until
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from ray_checkpoints import registered_step
from two_nodes import JOB_BATCH, JOB_EPOCHS, DriverRun

from components.registry import store
from components.training.trainer import STATE_FILE

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UP, DOWN = ROOT / "infra/stack/up.sh", ROOT / "infra/stack/down.sh"
SERVICES = ("mlflow", "prefect", "ray-head", "ray-worker")
# Variables a stack of the developer's own may have exported; the test stack must not inherit them.
OUTER = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "PREFECT_API_URL",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN_PATH",
)


@dataclass
class Stack:
    state: Path
    script_env: dict[str, str]  # what up.sh and down.sh ran with
    exports: dict[str, str]  # what up.sh wrote to <state>/env
    ray_temp_dir: str

    def client_env(self) -> dict[str, str]:
        return {**self.script_env, **self.exports}


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now; all bound at once so they differ, then released for the stack."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_exports(path: Path) -> dict[str, str]:
    exports = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, value = shlex.split(line.removeprefix("export "))[0].split("=", 1)
            exports[key] = value
    return exports


def run_script(script: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack")
    # Ray keeps 10002-19999 for its workers; the kernel's ephemeral ports lie above that range.
    mlflow_port, prefect_port, ray_port = free_ports(3)
    ray_temp_dir = f"/tmp/ray-genpipe-test-{ray_port}"
    env = {k: v for k, v in os.environ.items() if k not in OUTER}
    env.update(
        GENPIPE_STACK_DIR=str(state),
        GENPIPE_BIN=str(Path(sys.executable).parent),
        GENPIPE_MLFLOW_PORT=str(mlflow_port),
        GENPIPE_PREFECT_PORT=str(prefect_port),
        GENPIPE_RAY_PORT=str(ray_port),
        GENPIPE_RAY_TEMP_DIR=ray_temp_dir,
        GENPIPE_STACK_TIMEOUT_S="120",
    )
    try:
        up = run_script(UP, env, timeout=240)
        assert up.returncode == 0, f"up.sh failed:\n{up.stdout}\n{up.stderr}"
        assert f"source {state}/env" in up.stdout
        yield Stack(state, env, read_exports(state / "env"), ray_temp_dir)
    finally:
        down = run_script(DOWN, env, timeout=180)
        assert down.returncode == 0, down.stderr


@contextmanager
def mlflow_as(stack: Stack, username: str | None, password: str | None) -> Iterator[MlflowClient]:
    """A client whose requests carry these basic-auth credentials (None: no credentials at all)."""
    uri = stack.exports["MLFLOW_TRACKING_URI"]
    with pytest.MonkeyPatch.context() as patch:
        for var, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                patch.delenv(var, raising=False)
            else:
                patch.setenv(var, value)
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)


def admin(stack: Stack):
    return mlflow_as(
        stack, stack.exports["MLFLOW_TRACKING_USERNAME"], stack.exports["MLFLOW_TRACKING_PASSWORD"]
    )


def ray_status(stack: Stack, **env: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "ray"), "status", "--address", stack.exports["RAY_ADDRESS"]]
    return subprocess.run(
        command, env={**stack.client_env(), **env}, capture_output=True, text=True, timeout=60
    )


def test_up_writes_the_env_file_and_refuses_a_second_start(stack):
    ports = {name: stack.script_env[f"GENPIPE_{name}_PORT"] for name in ("MLFLOW", "PREFECT", "RAY")}
    assert stack.exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['MLFLOW']}"
    assert stack.exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['PREFECT']}/api"
    assert stack.exports["RAY_ADDRESS"] == f"127.0.0.1:{ports['RAY']}"
    assert len(stack.exports["MLFLOW_TRACKING_PASSWORD"]) >= 12, "MLflow refuses shorter admin passwords"
    assert stat.S_IMODE((stack.state / "env").stat().st_mode) == 0o600, "the env file holds passwords"
    for name in SERVICES:
        assert (stack.state / "pids" / f"{name}.pid").read_text().strip().isdigit()
        assert (stack.state / "logs" / f"{name}.log").exists()

    again = run_script(UP, stack.script_env, timeout=60)
    assert again.returncode != 0
    assert "already running" in again.stderr
    with urllib.request.urlopen(f"{stack.exports['MLFLOW_TRACKING_URI']}/health", timeout=10) as reply:
        assert reply.status == 200, "a refused second start must leave the first one running"


def test_ray_cluster_has_a_head_and_a_worker_and_wants_its_token(stack, tmp_path):
    status = ray_status(stack)
    assert status.returncode == 0, status.stderr
    active = status.stdout.split("Active:")[1].split("Pending:")[0]
    assert len([line for line in active.splitlines() if "node_" in line]) == 2, status.stdout
    assert "/2.0 CPU" in status.stdout, status.stdout

    wrong = tmp_path / "token"
    wrong.write_text("0" * 64)
    refused = ray_status(stack, RAY_AUTH_TOKEN_PATH=str(wrong))
    assert refused.returncode != 0
    assert "Authentication" in refused.stderr or "auth" in refused.stderr.lower()


def test_registry_writes_need_valid_credentials_and_permission(stack, tmp_path):
    name = "stack-test.model"
    weights = tmp_path / "weights.txt"
    weights.write_text("not really weights")
    with admin(stack) as client:
        experiment = client.create_experiment("stack-test")
        run = client.create_run(experiment)
        client.log_artifact(run.info.run_id, str(weights), "model")
        client.create_registered_model(name)
        first = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
        second = client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
        client.set_registered_model_alias(name, "champion", first.version)
        assert client.get_model_version_by_alias(name, "champion").version == first.version
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/weights.txt"]
        users = get_app_client("basic-auth", tracking_uri=stack.exports["MLFLOW_TRACKING_URI"])
        users.create_user("reader", "reader-password-123")
    # The artifact went through the server's proxy into the stack's own store.
    assert list((stack.state / "mlflow/artifacts").rglob("weights.txt"))

    admin_user = stack.exports["MLFLOW_TRACKING_USERNAME"]
    attempts = {
        "no credentials": (None, None, 401),
        "a wrong password": (admin_user, "not-the-password", 401),
        "a user with read access only": ("reader", "reader-password-123", 403),
    }
    for who, (username, password, status) in attempts.items():
        with mlflow_as(stack, username, password) as client:
            with pytest.raises(MlflowException) as moved:
                client.set_registered_model_alias(name, "champion", second.version)
            assert moved.value.get_http_status_code() == status, who
            with pytest.raises(MlflowException) as registered:
                client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
            assert registered.value.get_http_status_code() == status, who
    with mlflow_as(stack, "reader", "reader-password-123") as client:
        assert client.get_registered_model(name).name == name, "default_permission READ lets users read"
    with mlflow_as(stack, None, None) as client, pytest.raises(MlflowException) as created:
        client.create_registered_model("stack-test.anonymous")
    assert created.value.get_http_status_code() == 401

    with admin(stack) as client:
        assert client.get_model_version_by_alias(name, "champion").version == first.version
        assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_deployments_land_on_the_stack_prefect_server(stack, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    from flows.deployment import scheduled_deployment

    url = stack.exports["PREFECT_API_URL"]
    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            assert str(client.api_url).rstrip("/") == url
            pool = WorkPoolCreate(
                name="genpipe-process",
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            )
            client.create_work_pool(pool, overwrite=True)
        # The project's prefect.yaml, deployed as its header says.
        command = [
            str(Path(sys.executable).parent / "prefect"),
            *("deploy", "--prefect-file", "infra/prefect/prefect.yaml", "--all", "--no-prompt"),
        ]
        deployed = subprocess.run(
            command, cwd=ROOT, env=stack.client_env(), capture_output=True, text=True, timeout=120
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        served_id = scheduled_deployment("0 3 * * *", str(tmp_path), name="stack-served").apply()
        with get_client(sync_client=True) as client:
            served = client.read_deployment(served_id)
            nightly = client.read_deployment_by_name("genpipe-retrain/nightly")

    assert [s.schedule.cron for s in served.schedules] == ["0 3 * * *"]
    assert served.parameters["project_dir"] == str(tmp_path.resolve())
    # The stack's scheduler service creates the upcoming runs of both, at 03:00 UTC.
    for deployment in (served, nightly):
        with temporary_settings(updates={PREFECT_API_URL: url}):
            upcoming = wait_until(lambda d=deployment: scheduled_runs(d.id), 90, f"runs of {deployment.name}")
        assert {(r.expected_start_time.hour, r.expected_start_time.minute) for r in upcoming} == {(3, 0)}

    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 3 * * *", "UTC")]
    assert nightly.global_concurrency_limit.limit == 1
    assert nightly.work_pool_name == "genpipe-process"
    assert nightly.entrypoint == "flows/retrain.py:retrain"
    assert nightly.parameters == {"project_dir": "."}
    # Prefect records where `prefect deploy` ran as the flow runs' working directory.
    assert any(
        step.get("prefect.deployments.steps.set_working_directory", {}).get("directory") == str(ROOT)
        for step in nightly.pull_steps
    ), nightly.pull_steps


def test_genpipe_run_trains_on_the_stack_and_registers_there(stack, tmp_path):
    from conftest import make_project, set_params

    # A new project: this first run writes and tracks the built-in data and runs `dvc repro`.
    project = make_project(tmp_path / "project")
    set_params(project, featurizer={"epochs": 2}, evaluate={"num_samples": 200, "importance_samples": 10})

    genpipe = Path(sys.executable).parent / "genpipe"
    command = [str(genpipe), "run", "--models", "vae", "--epochs", "1", "-C", str(project)]
    result = subprocess.run(command, env=stack.client_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    with admin(stack) as client:
        champion = client.get_model_version_by_alias("digits.vae", "champion")
        assert client.list_artifacts(champion.run_id, "model")
        exact_status = store.registry_status(store.MlflowRegistry(client))
        # `genpipe status` reads the server's REST API with the environment's credentials, as MLflow does.
        assert store.registry_status(store.RestRegistry(stack.exports["MLFLOW_TRACKING_URI"])) == exact_status
    status = subprocess.run(
        [str(genpipe), "status", "--json", "-C", str(project)],
        env=stack.client_env(),
        capture_output=True,
        check=True,
    )
    assert json.loads(status.stdout) == exact_status
    with mlflow_as(stack, None, None), pytest.raises(store.UnreadableHere, match="HTTP 401"):
        store.RestRegistry(
            stack.exports["MLFLOW_TRACKING_URI"]
        ).model_names()  # MLflow's client is asked then
    # The weights went through the server's artifact proxy into the stack's own store.
    assert list((stack.state / "mlflow/artifacts").glob(f"*/{champion.run_id}/artifacts/model/*"))
    sessions = Path(stack.ray_temp_dir) / "session_latest" / "logs"
    assert list(sessions.glob("python-core-driver-*")), "the flow's driver connected to the stack's Ray"
    with urllib.request.urlopen(f"{stack.exports['PREFECT_API_URL']}/flow_runs/count", b"{}") as reply:
        assert int(reply.read()) >= 1, "the flow run was recorded by the stack's Prefect server"


# --- The stack's two Ray nodes as a cluster: placement and a killed worker -----------------------------


@pytest.fixture(scope="module")
def cluster_run(stack, digits_root, tmp_path_factory) -> tuple[DriverRun, dict]:
    """`digits_job` trained uninterrupted on the stack's head and worker, one Ray Train worker each."""
    run = stack_driver(stack, tmp_path_factory.mktemp("cluster-run"), "two-nodes")
    return run, run.run(digits_root / "prepared", nodes=2)


def stack_driver(stack: Stack, work: Path, name: str, **settings) -> DriverRun:
    roots = [int((stack.state / "pids" / f"{node}.pid").read_text()) for node in ("ray-head", "ray-worker")]
    return DriverRun(stack.exports["RAY_ADDRESS"], stack.client_env(), roots, work, name, **settings)


def test_two_node_training_places_one_worker_on_each_node(cluster_run, digits):
    run, outcome = cluster_run
    assert len(outcome["nodes"]) == 2, outcome["nodes"]
    assert sorted(run.workers.values()) == outcome["nodes"], f"workers by node: {run.workers}"
    steps_per_epoch = -(-len(digits.train) // 2 // JOB_BATCH)
    assert outcome["steps"] == JOB_EPOCHS * steps_per_epoch
    assert [h["epoch"] for h in outcome["history"]] == list(range(1, JOB_EPOCHS + 1))


def checkpoint_steps(run_dir: Path, known: dict[str, int]) -> None:
    """Adds to `known` the step of each complete checkpoint in `run_dir` not seen before."""
    for directory in run_dir.glob("checkpoint_*"):
        if directory.name not in known:
            with contextlib.suppress(OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # mid-copy
                known[directory.name] = torch.load(directory / STATE_FILE, weights_only=True)["step"]


def test_killed_worker_resumes_from_the_latest_checkpoint(stack, cluster_run, digits_root, tmp_path):
    """SIGKILL one of the two workers once Ray has registered a checkpoint: the group restarts, every
    checkpoint written afterwards is past the registered one (a restart from scratch would write
    step 5 again), and the run ends where the uninterrupted run on the same nodes did."""
    every = 5
    run = stack_driver(stack, tmp_path, "killed", checkpoint_every_steps=every, max_failures=2)
    seen: dict[str, int] = {}
    kill: dict = {}

    def kill_once_registered() -> None:
        checkpoint_steps(run.run_dir, seen)
        if kill or (registered := registered_step(run.run_dir)) < every:
            return
        group = run.current_workers()
        assert len(group) == 2, f"expected two Ray Train workers, found {group}"
        kill.update(after=registered, group={w.pid for w in group}, before={*seen})
        group[-1].send_signal(signal.SIGKILL)

    outcome = run.run(digits_root / "prepared", nodes=2, while_running=kill_once_registered)

    assert kill, f"training ended before a worker could be killed: {outcome}"
    assert set(run.workers) - kill["group"], "no new Ray Train worker was started after the kill"
    after_kill = sorted(step for name, step in seen.items() if name not in kill["before"])
    assert after_kill, "no checkpoint was written after the kill"
    assert min(after_kill) > kill["after"], (
        f"restarted from scratch: checkpoints after the kill at steps {after_kill}, "
        f"but step {kill['after']} was already registered"
    )
    baseline = cluster_run[1]["history"]
    assert outcome["steps"] == cluster_run[1]["steps"] and outcome["diverged"] is None
    assert [h["epoch"] for h in outcome["history"]] == [h["epoch"] for h in baseline]
    assert all(set(h) == set(b) for h, b in zip(outcome["history"], baseline, strict=True))
    final, expected = outcome["history"][-1]["val_negative_elbo"], baseline[-1]["val_negative_elbo"]
    progress = baseline[0]["val_negative_elbo"] - expected
    assert abs(final - expected) < 0.1 * progress, (
        f"resumed run ends at {final:.3f} nats, uninterrupted at {expected:.3f} (epoch-1 to end: {progress:.3f})"
    )


def test_down_stops_every_process_and_is_safe_to_repeat(stack):
    sessions = {int((stack.state / "pids" / f"{name}.pid").read_text()) for name in SERVICES}
    down = run_script(DOWN, stack.script_env, timeout=180)
    assert down.returncode == 0, down.stderr

    leftovers = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # exited; only waiting for init to reap it
            cmdline = " ".join(process.info["cmdline"] or [])
            mentions_stack = str(stack.state) in cmdline or stack.ray_temp_dir in cmdline
            if mentions_stack or os.getsid(process.info["pid"]) in sessions:
                leftovers.append((process.info["pid"], cmdline[:120]))
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    assert not leftovers
    for var in ("GENPIPE_MLFLOW_PORT", "GENPIPE_PREFECT_PORT", "GENPIPE_RAY_PORT"):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # fails only on a listener
            sock.bind(("127.0.0.1", int(stack.script_env[var])))
    assert not (stack.state / "env").exists()
    assert not Path(stack.ray_temp_dir).exists()

    again = run_script(DOWN, stack.script_env, timeout=60)
    assert again.returncode == 0, again.stderr
