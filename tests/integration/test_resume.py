"""Case 0 of issue 14 with the default set-up (no Prefect server configured, so every `genpipe run`
starts its own temporary server on the database in PREFECT_HOME): the pipeline and all its children
are killed mid-training; `--resume` takes the project over at once, continues from the last Ray
checkpoint, registers exactly one version and ends the dead run's MLflow runs and flow run, from the
run journal; a plain run after it works too."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray_checkpoints import registered_step

from components.registry.store import resolve_tracking_uri
from flows.journal import ABANDONED_TAG, JOURNAL_FILE

pytestmark = pytest.mark.integration

CODE_ROOT = Path(__file__).resolve().parents[2]
GENPIPE = [sys.executable, "-m", "flows.cli"]
EPOCHS = 10  # 200 steps: the pipeline is killed after step 5, well before the end


def default_setup_env(tmp_path: Path, ray_instance) -> dict[str, str]:
    """No Prefect API configured: each run starts a temporary server on its own PREFECT_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_API")}
    return {
        **env,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        # A busy test machine can take longer than the default 20 s to start the temporary server.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "PYTHONPATH": str(CODE_ROOT),  # the code under test, not another checkout's installed copy
        "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address,
    }


def prefect_db(env: dict[str, str], query: str, *args) -> list[tuple]:
    with sqlite3.connect(Path(env["PREFECT_HOME"]) / "prefect.db") as db:
        return db.execute(query, args).fetchall()


def test_a_killed_run_blocks_nothing_and_resume_continues_and_registers_once(
    tmp_path, ray_instance, project_factory
):
    project = project_factory(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(checkpoint_every_steps=5, epochs=EPOCHS)
    params["evaluate"].update(num_samples=100)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = default_setup_env(tmp_path, ray_instance)
    command = [*GENPIPE, "run", "--models", "nade", "-C", str(project)]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 480
    # Ray resumes only from checkpoints its controller has registered, not from any directory written.
    while not any(registered_step(run) for run in (project / "ray_results").glob("*")):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the pipeline, its temporary Prefect server, all its children
    driver.wait()
    dead = json.loads((project / JOURNAL_FILE).read_text())
    assert dead["holder"]["pid"] == driver.pid and dead["registry_lease"]
    assert list(dead["ray_runs"]) and prefect_db(env, "select active_slots from concurrency_limit_v2") == [
        (1,)
    ]

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    uri = resolve_tracking_uri(None, project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'digits.nade'")
    run = client.get_run(version.run_id)
    assert int(run.data.tags["resumed_from_step"]) > 0
    assert len(client.get_metric_history(version.run_id, "train/model_loss")) == EPOCHS

    # The dead run's MLflow runs and flow run were ended by the resumed one, not left running for good.
    runs = client.search_runs([client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    abandoned = [r for r in runs if r.info.status == "KILLED"]
    assert sorted(r.data.tags["mlflow.runName"].split("-")[0] for r in abandoned) == ["nade", "retrain"]
    assert all(f"pid {driver.pid}" in r.data.tags[ABANDONED_TAG] for r in abandoned)
    (dead_state,) = [
        state
        for flow_run_id, state in prefect_db(env, "select id, state_type from flow_run")
        if flow_run_id.replace("-", "") == dead["holder"]["flow_run"].replace("-", "")
    ]
    assert dead_state == "CRASHED"

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing done" not in again.stdout + again.stderr
    assert len(client.search_model_versions("name = 'digits.nade'")) == 1
    assert prefect_db(env, "select active_slots from concurrency_limit_v2") == [(0,)]
    assert not (project / JOURNAL_FILE).exists(), "nothing is left for a later run to clean up"
