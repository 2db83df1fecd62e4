"""Shared, real infrastructure for the test session: one Ray instance and one Prefect server.

Both take ~10 s to start, so every integration test shares them. Nothing here is mocked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("params.yaml", "dvc.yaml")

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_instance():
    """A real local Ray instance with two CPUs, shared by the session."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's own temporary server (real API, SQLite), shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


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
