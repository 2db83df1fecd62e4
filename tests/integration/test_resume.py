"""Case 0 of issue 14, with the default set-up (no Prefect server configured, so every `genpipe run`
starts its own temporary server on the database in PREFECT_HOME) and against a shared
`prefect server start`: the pipeline and all its children are killed mid-training; `--resume` takes
the project over at once, continues from the last Ray checkpoint, registers exactly one version and
ends the dead run's MLflow runs and flow run, from the run journal; a plain run after it works too.
In the second case the kill also left Ray Train's record of the run empty and a newer checkpoint cut
short, as a kill during their writes does: the resumed run continues from the newest whole one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import set_params
from mlflow.tracking import MlflowClient
from ray_checkpoints import cut_short_as_by_a_kill, registered_step, train_controllers

from components.registry.store import resolve_tracking_uri
from components.training.ray_train import RUN_SNAPSHOT
from flows.journal import ABANDONED_TAG, JOURNAL_FILE
from flows.registry_turn import limit_name

pytestmark = pytest.mark.integration

CODE_ROOT = Path(__file__).resolve().parents[2]
GENPIPE = [sys.executable, "-m", "flows.cli"]
EPOCHS = 5  # 100 steps: the pipeline is killed after step 5, well before the end


class TemporaryServers:
    """No Prefect API configured: each run starts a temporary server on its own PREFECT_HOME, which
    dies with the run; what it recorded is read from its database."""

    def __init__(self, tmp_path: Path):
        self.home = tmp_path / "prefect-home"
        # A busy test machine can take longer than the default 20 s to start the temporary server.
        self.env = {"PREFECT_HOME": str(self.home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}

    def _query(self, query: str, *args) -> list[tuple]:
        with sqlite3.connect(self.home / "prefect.db") as db:
            return db.execute(query, args).fetchall()

    def active_slots(self, limit: str) -> int:
        (slots,) = self._query("select active_slots from concurrency_limit_v2 where name = ?", limit)
        return slots[0]

    def flow_run_state(self, flow_run_id: str) -> str:
        states = self._query("select id, state_type from flow_run")
        (state,) = [s for run_id, s in states if run_id.replace("-", "") == flow_run_id.replace("-", "")]
        return state


class SharedServer:
    """Every run talks to one `prefect server start` that outlives them (the test session's)."""

    def __init__(self, url: str):
        self.env = {"PREFECT_API_URL": url}

    def active_slots(self, limit: str) -> int:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(limit).active_slots

    def flow_run_state(self, flow_run_id: str) -> str:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run_id).state.type.value


@pytest.fixture
def prefect_setup(request, tmp_path):
    if request.param == "temporary servers":
        return TemporaryServers(tmp_path)
    return SharedServer(request.getfixturevalue("prefect_server"))


@pytest.mark.parametrize(
    ("prefect_setup", "ray_record"),
    [("temporary servers", "intact"), ("shared server", "cut short")],
    indirect=["prefect_setup"],
)
def test_a_killed_run_blocks_nothing_and_resume_continues_and_registers_once(
    prefect_setup, ray_record, tmp_path, ray_instance, project_factory
):
    project = project_factory(tmp_path / "project")
    set_params(project, train={"checkpoint_every_steps": 5, "epochs": EPOCHS}, evaluate={"num_samples": 100})
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    env.update(
        prefect_setup.env,
        PYTHONPATH=str(CODE_ROOT),  # the code under test, not another checkout's installed copy
        RAY_ADDRESS=ray_instance.get_runtime_context().gcs_address,
    )
    registry_limit = limit_name(resolve_tracking_uri(None, project))
    command = [*GENPIPE, "run", "--models", "nade", "-C", str(project)]
    log = open(tmp_path / "first.log", "w")
    ray_root = psutil.Process()  # the test's Ray instance runs below this process
    controllers_before = train_controllers(ray_root)  # earlier tests' fits may hold theirs
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 480
    # Ray resumes only from checkpoints its controller has registered, not from any directory written.
    while not (registered := [r for r in (project / "ray_results").glob("*") if registered_step(r)]):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the pipeline, its temporary Prefect server, all its children
    driver.wait()
    (ray_run,) = registered
    if ray_record == "cut short":
        cut_short_as_by_a_kill(ray_run, ray_root, controllers_before)
    dead = json.loads((project / JOURNAL_FILE).read_text())
    assert dead["holder"]["pid"] == driver.pid and dead["registry_lease"]
    assert list(dead["ray_runs"]) and prefect_setup.active_slots(registry_limit) == 1

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    uri = resolve_tracking_uri(None, project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'digits.nade'")
    run = client.get_run(version.run_id)
    assert int(run.data.tags["resumed_from_step"]) > 0
    assert (ray_run / f"{RUN_SNAPSHOT}.unreadable").exists() == (ray_record == "cut short")
    assert len(client.get_metric_history(version.run_id, "train/model_loss")) == EPOCHS

    # The dead run's MLflow runs and flow run were ended by the resumed one, not left running for good.
    experiment = yaml.safe_load((project / "params.yaml").read_text())["tracking"]["experiment"]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    abandoned = [r for r in runs if r.info.status == "KILLED"]
    assert sorted(r.data.tags["mlflow.runName"].split("-")[0] for r in abandoned) == ["nade", "retrain"]
    assert all(f"pid {driver.pid}" in r.data.tags[ABANDONED_TAG] for r in abandoned)
    assert prefect_setup.flow_run_state(dead["holder"]["flow_run"]) == "CRASHED"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing done" not in again.stdout + again.stderr
    assert len(client.search_model_versions("name = 'digits.nade'")) == 1
    assert prefect_setup.active_slots(registry_limit) == 0
    assert not (project / JOURNAL_FILE).exists(), "nothing is left for a later run to clean up"
