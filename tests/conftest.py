"""Shared, real infrastructure for the tests: one Prefect server for the whole run (shared by the
pytest-xdist processes), one Ray instance per test process, an MLflow server process per module that
asks for one, and one prepared project (data tracked, `dvc repro` done) that tests copy.

Each takes 10-30 s of CPU to start, so the integration tests share them. Nothing here is mocked.

Lanes: tests that start Ray or a server are marked `integration` here, from the fixtures they use
(and everything under tests/integration/); `make test-fast` runs the others.
"""

from __future__ import annotations

import contextlib
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
import yaml
from filelock import FileLock

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("params.yaml", "dvc.yaml")
BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# One torch thread per test process (and per Ray worker and subprocess they start): the suite runs two
# processes on two cores, and torch's default of a thread per core had them oversubscribe the machine
# (`make test-fast` 105 s, 83 s on one thread each). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tests' projects score FID/KID under a featurizer of a few epochs (the stage's default trains 30):
# every test that changes the data retrains it, and none needs it accurate, only the same for all.
FEATURIZER_EPOCHS = 3
SERVER_FIXTURES = {"ray_instance", "prefect_server", "mlflow_server"}
SHARED_PROCESSES = "shared-processes"
# Test files that read one costly session fixture, run in one process (pytest_xdist_make_scheduler).
FILE_GROUPS = {
    "tests/integration/test_colour_pipeline.py": "colour-run",
    "tests/integration/test_report.py": "colour-run",
}


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts Ray or a server `integration`, so the fast lane can leave it out."""
    for item in items:
        in_integration = "integration" in Path(item.fspath).parts
        if in_integration or SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the files of a `FILE_GROUPS` group sent to one process as one unit, where
    their session fixture is made once. (pytest-xdist's `loadgroup` would do this from marks, but under
    pytest 9 its renamed node ids do not take, and it spreads a group's tests over the processes.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return FILE_GROUPS.get(file, file)

    return FileGroupScheduling(config, log)


def run_wide_dir(tmp_path_factory) -> Path:
    """A directory shared by every process of this pytest run: the xdist controller's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pytest_sessionfinish(session):
    """The controller (or the only process) stops the processes the test processes shared."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    record = factory.getbasetemp() / SHARED_PROCESSES if factory else None
    if record is None or not record.is_dir():
        return
    for pid_file in record.glob("*.pid"):
        stop_process_group(int(pid_file.read_text()))


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
        stop_process_group(process.pid)


def stop_process_group(pid: int) -> None:
    """SIGTERM a server's process group, SIGKILL it if it has not ended within 30 s."""
    try:
        os.killpg(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, 9)


def start_shared_server(
    shared: Path, name: str, command: list[str], health_url: str, env: dict[str, str]
) -> None:
    """Start a server that outlives this test process (the controller stops it at the end)."""
    log = shared / f"{name}.log"
    process = subprocess.Popen(
        command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    record = shared / SHARED_PROCESSES
    record.mkdir(exist_ok=True)
    (record / f"{name}.pid").write_text(str(process.pid))
    try:
        wait_until(lambda: process.poll() is None and http_ok(health_url), 120, name)
    except TimeoutError as err:
        raise RuntimeError(f"{err}; exit code {process.poll()}; log:\n{log.read_text()[-3000:]}") from err


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """Prefect's own server (`prefect server start`: API, SQLite, and its services, the scheduler
    included), one for the whole run: the first test process that needs it starts it, the others find
    its address in a file. Each process talks to it through PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shared = run_wide_dir(tmp_path_factory)
    address = shared / "prefect-server.url"
    with FileLock(shared / "prefect-server.lock"):
        if not address.is_file():
            home = shared / "prefect-server"
            home.mkdir()
            port = free_port()
            url = f"http://127.0.0.1:{port}/api"
            env = {
                **os.environ,
                "PREFECT_HOME": str(home),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
                "PREFECT_UI_ENABLED": "false",
                # Deployments created by a test get their scheduled runs within seconds, not a minute.
                "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "2",
                # Leases of killed runs (concurrency slots) are reclaimed soon after they expire.
                "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
            }
            command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            start_shared_server(shared, "prefect-server", command, f"{url}/health", env)
            address.write_text(url)
        url = address.read_text()
    with temporary_settings(updates={PREFECT_API_URL: url}):
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


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory):
    """A function that puts a new, empty MLflow SQLite store at a path and returns its URI: a copy of
    one that MLflow created in this test process. Creating a store runs MLflow's schema migrations,
    1.5-5 s of CPU that every test's own store would repeat."""
    from mlflow.tracking import MlflowClient

    created = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{created}").search_experiments()

    def new_store(database: Path) -> str:
        database.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(created, database)
        return f"sqlite:///{database}"

    return new_store


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory, new_mlflow_store) -> Path:
    """One project as its first `genpipe run` prepares it (built-in data written and tracked, `dvc repro`
    done: splits and the featurizer; its MLflow store created), made once for the whole run; tests copy
    it. test_report.py's run creates its own store, as a first run does."""
    from components.config import load_params
    from components.data.versioning import ensure_data, reproduce

    shared = run_wide_dir(tmp_path_factory)
    template = shared / "prepared-template"
    with FileLock(shared / "prepared-template.lock"):
        if not (template / "dvc.lock").is_file():
            shutil.rmtree(template, ignore_errors=True)
            make_project(template)
            set_params(template, featurizer={"epochs": FEATURIZER_EPOCHS})
            ensure_data(template, Path(load_params(template / "params.yaml").data.raw_dir))
            reproduce(template)
            new_mlflow_store(template / "mlflow.db")
    return template


def set_params(project: Path, **sections: dict) -> None:
    """Update sections of the project's params.yaml (a nested key at a time, the rest as it was)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_project(template: Path, directory: Path) -> Path:
    """A copy of `template` (git history, DVC cache and outputs included) at `directory`."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(template, directory, symlinks=True)
    return directory


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def project_factory(prepared_template):
    """Prepared projects (a copy of `prepared_template`) for fixtures of any scope."""
    return lambda directory: copy_project(prepared_template, Path(directory))


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


def cpu_job(model, *, epochs: int, batch_size: int, lr: float, seed: int = 0, **settings):
    """A TrainJob of `model` (a ModelSpec) with what a test varies; the rest as a test on the CPU wants
    it: precision resolved as on the machine ("auto"), no compile, no checkpoints, no sample grids."""
    from components.training.trainer import TrainJob

    neutral = {"checkpoint_every_steps": 0, "sample_every_epochs": 0, "precision": "auto", "compile": False}
    return TrainJob(
        model=model.to_dict(),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        **{**neutral, **settings},
    )


# Tiny widths of the sample-quality families, for tests of their shapes and code paths, not capacity.
TINY_SAMPLE_QUALITY = {
    "ae": {"latent_dim": 4, "channels": 4, "hidden": 16},
    "dae": {"latent_dim": 4, "channels": 4, "hidden": 16},
    "vaegan": {"latent_dim": 4, "channels": 4, "hidden": 16},
    "gan": {"latent_dim": 4, "hidden": 16},
    "dcgan": {"latent_dim": 4, "width": 4},
    "wgan": {"latent_dim": 4, "width": 4, "n_critic": 2},
    "wgan-gp": {"latent_dim": 4, "width": 4, "n_critic": 2},
    "stylegan": {"latent_dim": 4, "width": 8, "mapping_layers": 2},
}

# Tiny widths of every family: the colour run tests each family's path at 3x32x32, not its quality.
TINY_FAMILIES = {
    "vae": {"latent_dim": 4, "channels": 4, "hidden": 16},
    "fvsbn": {},
    "nade": {"hidden": 16},
    "made": {"hidden": 32},
    "pixelcnn": {"channels": 8, "num_blocks": 1},
    "pixelrnn": {"channels": 8, "hidden": 4, "num_layers": 1},
    **TINY_SAMPLE_QUALITY,
}
COLOUR_SHAPE = (3, 32, 32)
COLOUR_SAMPLES = 16


@pytest.fixture(scope="session")
def colour_run(tmp_path_factory, ray_instance, prefect_server, project_factory):
    """A project whose data is 128 rendered shapes at 32x32, in which every family ran the flow once, as
    the project's first run (which creates its MLflow store); and the flow run's final state. The files
    that read it are one of `FILE_GROUPS`, so one process makes it once."""
    from components.data.importers import builtin_dataset, install_dataset
    from components.models import list_models
    from flows.retrain import retrain

    project = project_factory(tmp_path_factory.mktemp("colour") / "project")
    (project / "mlflow.db").unlink()  # the template comes with a store; a first run creates its own
    set_params(
        project,
        featurizer={"epochs": 1},
        evaluate={
            "num_samples": COLOUR_SAMPLES,
            "kid_subset_size": 8,
            "importance_samples": 2,
            "batch_size": 64,
        },
        tracking={"system_metrics_interval_s": 1},  # each training lasts seconds
        models=TINY_FAMILIES,  # every family's entry replaced whole
    )
    install_dataset(builtin_dataset("shapes", size=128, resolution=COLOUR_SHAPE[1]), project)
    state = retrain(
        project_dir=str(project),
        models=list_models(),
        overrides={"train": {"epochs": 1, "batch_size": 16, "max_concurrent_models": 2}},
        return_state=True,
    )
    assert state.is_completed(), state.message
    return project, state
