"""Runs a pipeline leaves open are ended: by the next run of the project when the pipeline died, by the
pipeline itself when a step raised past its own error handling. Real Prefect server, MLflow SQLite store."""

from __future__ import annotations

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.states import Running

from components.registry.tracking import RunLogger, client_for
from flows.open_runs import ABANDONED_TAG, OpenRuns

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


def test_the_next_run_of_the_project_ends_what_a_dead_one_left_open(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    record = tmp_path / "outputs" / "open-runs.jsonl"
    dead_flow_run = running_flow_run()
    dead = OpenRuns(record, dead_flow_run).__enter__()  # and never left: the process died
    abandoned = [RunLogger.start(client, "exp", name) for name in ("parent", "model")]
    for run in abandoned:
        dead.add_mlflow_run(uri, run.run_id)
    finished = RunLogger.start(client, "exp", "finished")
    dead.add_mlflow_run(uri, finished.run_id)
    finished.finish()
    with record.open("a") as out:
        out.write('{"mlflow_run": "cut sh')  # killed in the middle of a write

    with OpenRuns(record, running_flow_run()) as next_run:
        for run in abandoned:
            ended = client.get_run(run.run_id)
            assert ended.info.status == "KILLED"
            assert next_run.flow_run_id in ended.data.tags[ABANDONED_TAG]
        assert client.get_run(finished.run_id).info.status == "FINISHED"
        assert ABANDONED_TAG not in client.get_run(finished.run_id).data.tags
        assert flow_run_state(dead_flow_run).is_crashed()
        assert record.read_text().count("\n") == 1, "the record now holds only the next run"
    assert not record.exists()


def test_a_pipeline_that_raises_ends_its_open_runs_as_failed(prefect_server, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    record = tmp_path / "open-runs.jsonl"
    flow_run_id = running_flow_run()
    with pytest.raises(RuntimeError), OpenRuns(record, flow_run_id) as open_runs:
        run = RunLogger.start(client, "exp", "model")
        open_runs.add_mlflow_run(uri, run.run_id)
        raise RuntimeError("registry unreachable")
    ended = client.get_run(run.run_id)
    assert ended.info.status == "FAILED"
    assert "RuntimeError: registry unreachable" in ended.data.tags[ABANDONED_TAG]
    assert not flow_run_state(flow_run_id).is_crashed(), "Prefect itself records how its flow run ended"
    assert not record.exists()
