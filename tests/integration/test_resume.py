"""`genpipe run --resume` after the pipeline process was killed: training continues from the last Ray
checkpoint, the model is registered exactly once, and the dead attempt's runs are ended."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from ray_checkpoints import registered_step

from components.registry.tracking import resolve_tracking_uri
from flows.open_runs import ABANDONED_TAG

pytestmark = pytest.mark.integration

GENPIPE = str(Path(sys.executable).parent / "genpipe")
EPOCHS = 12  # 240 steps: the driver is killed after step 5, well before the end


def genpipe_env(ray_instance) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address,
    }


def test_resume_after_the_driver_dies_continues_and_registers_once(
    tmp_path, ray_instance, prefect_server, project_factory
):
    project = project_factory(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(checkpoint_every_steps=5, epochs=EPOCHS)
    params["evaluate"].update(num_samples=100, importance_samples=5)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    command = [GENPIPE, "run", "--models", "vae", "-C", str(project)]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(
        command, env=genpipe_env(ray_instance), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 240
    # Ray resumes only from checkpoints its controller has registered, not from any directory written.
    while not any(registered_step(run) for run in (project / "ray_results").glob("*")):
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the whole pipeline process dies mid-training
    driver.wait()
    assert list((project / "outputs" / "unfinished").glob("vae-*.json")), "the ledger remembers the run"

    resumed = subprocess.run(
        [*command, "--resume"], env=genpipe_env(ray_instance), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    uri = resolve_tracking_uri(None, project)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions("name = 'digits.vae'")
    run = client.get_run(version.run_id)
    assert int(run.data.tags["resumed_from_step"]) > 0
    assert run.data.metrics["train/model_loss"] > 0
    assert len(client.get_metric_history(version.run_id, "train/model_loss")) == EPOCHS

    # The dead attempt's runs were ended by the resumed one, not left running for good.
    runs = client.search_runs([client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    abandoned = [r for r in runs if r.info.status == "KILLED"]
    assert sorted(r.data.tags["mlflow.runName"].split("-")[0] for r in abandoned) == ["retrain", "vae"]
    assert all(ABANDONED_TAG in r.data.tags for r in abandoned)
    (dead_parent,) = [r for r in abandoned if "prefect_flow_run_id" in r.data.tags]
    with get_client(sync_client=True) as prefect:
        dead_flow_run = prefect.read_flow_run(UUID(dead_parent.data.tags["prefect_flow_run_id"]))
    assert dead_flow_run.state.is_crashed(), dead_flow_run.state

    again = subprocess.run(
        [*command, "--resume"], env=genpipe_env(ray_instance), capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:]
    assert len(client.search_model_versions("name = 'digits.vae'")) == 1
