"""The run journal on a real Prefect server and MLflow SQLite store: the next run of a project ends
what a dead run left open, from the journal alone; a pipeline that raises ends its own runs."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running

from components.registry.store import client_for
from components.registry.tracking import RunLogger
from flows.journal import ABANDONED_TAG, Holder, RunJournal
from flows.registry_turn import LEASE_S, limit_name, registry_turn

pytestmark = pytest.mark.integration


@flow
def stand_in_pipeline() -> None:
    """Never run: it only names the flow runs created below."""


def running_flow_run() -> str:
    with get_client(sync_client=True) as client:
        return str(client.create_flow_run(stand_in_pipeline, state=Running()).id)


def flow_run_state(flow_run_id: str):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def dead_process(flow_run_id: str) -> Holder:
    """This host's record of a pipeline process that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    return dataclasses.replace(Holder.this_process(flow_run_id), pid=int(ended.stdout))


def lease_of_a_dead_run(uri: str) -> str:
    """A granted lease that nobody releases or renews any more."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit_name(uri), limit=1)
        reply = client.increment_concurrency_slots_with_lease([limit_name(uri)], 1, "concurrency", LEASE_S)
    return reply.json()["lease_id"]


def test_the_next_run_of_the_project_ends_what_a_dead_one_left_open(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    journal = tmp_path / "outputs" / "run-journal.json"
    dead_flow_run = running_flow_run()
    abandoned = [RunLogger.start(client, "exp", name) for name in ("parent", "model")]
    finished = RunLogger.start(client, "exp", "finished")
    finished.finish()
    journal.parent.mkdir()
    journal.write_text(
        json.dumps(
            {
                "holder": dataclasses.asdict(dead_process(dead_flow_run)),
                "registry_lease": lease_of_a_dead_run(uri),
                "mlflow_runs": [
                    {"mlflow_run": run.run_id, "tracking_uri": uri} for run in [*abandoned, finished]
                ],
                "ray_runs": {"vae-f1": "vae-f1-deadbeef"},
            }
        )
    )
    next_flow_run = running_flow_run()
    with RunJournal(journal, Holder.this_process(next_flow_run)) as next_run:
        me = Holder.this_process(next_flow_run)
        with registry_turn(uri, wait_s=0, holder=me):
            pass  # the dead run's turn was handed back at once, not after its lease ran out
        for run in abandoned:
            ended = client.get_run(run.run_id)
            assert ended.info.status == "KILLED"
            assert f"ended by flow run {next_flow_run}" in ended.data.tags[ABANDONED_TAG]
        assert client.get_run(finished.run_id).info.status == "FINISHED"
        assert ABANDONED_TAG not in client.get_run(finished.run_id).data.tags
        assert flow_run_state(dead_flow_run).is_crashed()
        assert next_run.ray_run_name("vae", "f1", resume=True) == "vae-f1-deadbeef"
        recorded = json.loads(journal.read_text())
        assert recorded["holder"]["flow_run"] == next_flow_run and recorded["mlflow_runs"] == []
    assert json.loads(journal.read_text()) == {
        "registry_lease": None,
        "mlflow_runs": [],
        "ray_runs": {"vae-f1": "vae-f1-deadbeef"},
    }


def test_a_pipeline_that_raises_ends_its_open_runs_as_failed(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    journal = tmp_path / "run-journal.json"
    flow_run_id = running_flow_run()
    with pytest.raises(RuntimeError), RunJournal(journal, Holder.this_process(flow_run_id)) as open_runs:
        run = RunLogger.start(client, "exp", "model")
        open_runs.record_mlflow_run(uri, run.run_id)
        raise RuntimeError("registry unreachable")
    ended = client.get_run(run.run_id)
    assert ended.info.status == "FAILED"
    assert "RuntimeError: registry unreachable" in ended.data.tags[ABANDONED_TAG]
    assert not flow_run_state(flow_run_id).is_crashed(), "Prefect itself records how its flow run ended"
    assert not journal.exists()
