"""The runs a pipeline has open, recorded in the project so that none stays "running" forever.

A pipeline process that is killed cannot end its MLflow runs or its Prefect flow run: they would
show as running for good. Each open run is therefore written to a record in the project while the
pipeline holds the project's lock. The next pipeline of the project, holding that lock in turn,
knows the writer is dead and ends what it left open: MLflow runs as KILLED, the flow run as Crashed.
A pipeline that ends normally ends its own runs and removes the record.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from types import TracebackType
from uuid import UUID

from mlflow.exceptions import MlflowException
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from components.registry.tracking import RunLogger, client_for

ABANDONED_TAG = "abandoned"

logger = logging.getLogger(__name__)
_writing = threading.Lock()  # model branches add their runs from concurrent threads


class OpenRuns:
    """Context manager for one pipeline run; pass it a record path only while holding the project's lock."""

    def __init__(self, record: Path, flow_run_id: str | None):
        self.record = record
        self.flow_run_id = flow_run_id

    def __enter__(self) -> OpenRuns:
        if self.record.is_file():
            self._end_abandoned()
        self.record.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_text("")
        if self.flow_run_id:
            self._append({"prefect_flow_run": self.flow_run_id})
        return self

    def add_mlflow_run(self, tracking_uri: str, run_id: str) -> None:
        self._append({"mlflow_run": run_id, "tracking_uri": tracking_uri})

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # Runs still open here were left by a step that raised past its own error handling.
        why = f"the pipeline stopped: {type(error).__name__}: {error}" if error else "the pipeline ended"
        ended = [_end_mlflow_run(entry, "FAILED", why) for entry in self._entries() if "mlflow_run" in entry]
        if all(ended):  # otherwise the next run of the project tries again
            self.record.unlink(missing_ok=True)

    def _append(self, entry: dict[str, str]) -> None:
        with _writing, self.record.open("a") as out:
            out.write(json.dumps(entry) + "\n")

    def _entries(self) -> list[dict[str, str]]:
        lines = self.record.read_text().splitlines() if self.record.is_file() else []
        # The last line of a process killed while writing may be cut short.
        return [json.loads(line) for line in lines if line.endswith("}")]

    def _end_abandoned(self) -> None:
        why = f"its pipeline process died; ended by {self.flow_run_id or 'the next run'} of the project"
        for entry in self._entries():
            if "mlflow_run" in entry:
                _end_mlflow_run(entry, "KILLED", why)
            else:
                _crash_flow_run(entry["prefect_flow_run"], why)


def _end_mlflow_run(entry: dict[str, str], status: str, why: str) -> bool:
    """End the run if it is still running; False when the tracking server could not be asked."""
    run = RunLogger(client_for(entry["tracking_uri"]), entry["mlflow_run"])
    try:
        if run.client.get_run(run.run_id).info.status == "RUNNING":
            run.set_tags({ABANDONED_TAG: why})
            run.finish(status)
        return True
    except MlflowException as err:  # deleted meanwhile, or on a server no longer there
        logger.warning("could not end MLflow run %s: %s", entry["mlflow_run"], err)
        return False


def _crash_flow_run(flow_run_id: str, why: str) -> None:
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(UUID(flow_run_id)).state
        except ObjectNotFound:  # recorded on another Prefect server
            logger.warning("flow run %s is not on this Prefect server; left as it is", flow_run_id)
            return
        if state is not None and not state.is_final():
            client.set_flow_run_state(UUID(flow_run_id), Crashed(message=why), force=True)
