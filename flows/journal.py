"""The run journal: one record, in the project, of what the pipeline run holding the project has open.

It names the holder (flow run, host, pid and that process's start time), the registry turn it holds
(a Prefect concurrency lease), the MLflow runs it has open, and the Ray run of every model that
started training but is not registered yet (the run a `--resume` continues). A pipeline writes it only
while holding the project's lock. The next pipeline of the project, holding that lock in turn, proves
the writer dead (the lock is free, and on the same host no process with that pid and start time is
running), then releases its lease at once, ends its MLflow runs as KILLED and its flow run as Crashed,
and keeps its unfinished Ray runs for a later `--resume`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from uuid import UUID

import psutil
from mlflow.exceptions import MlflowException
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from components.registry.store import client_for
from components.registry.tracking import RunLogger

JOURNAL_FILE = "outputs/run-journal.json"
ABANDONED_TAG = "abandoned"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """The process that holds a project or a registry, as a later run can check it."""

    flow_run: str
    host: str
    pid: int
    process_started: float  # the process's start time: a pid reused by another process does not match
    since: str

    @classmethod
    def this_process(cls, flow_run_id: str | None) -> Holder:
        """This pipeline process, running `flow_run_id`."""
        pid = os.getpid()
        return cls(
            flow_run=str(flow_run_id or "none"),
            host=socket.gethostname(),
            pid=pid,
            process_started=psutil.Process(pid).create_time(),
            since=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def is_running(self) -> bool:
        """True unless this host can tell that the process has ended; another host's is assumed running."""
        if self.host != socket.gethostname():
            return True
        try:
            return abs(psutil.Process(self.pid).create_time() - self.process_started) < 1.0
        except psutil.NoSuchProcess:
            return False

    def __str__(self) -> str:
        return f"flow run {self.flow_run} on host {self.host}, pid {self.pid}, since {self.since}"


class ProjectHeld(RuntimeError):
    """A live pipeline holds the project (its journal names it) even though its lock was free."""

    def __init__(self, holder: Holder):
        super().__init__(f"the project is held by {holder}")
        self.holder = holder


@dataclass
class _Entries:
    holder: Holder | None = None
    registry_lease: str | None = None
    mlflow_runs: list[dict[str, str]] = field(default_factory=list)
    ray_runs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> _Entries:
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        holder = data.get("holder")
        return cls(
            holder=Holder(**holder) if holder else None,
            registry_lease=data.get("registry_lease"),
            mlflow_runs=list(data.get("mlflow_runs", [])),
            ray_runs=dict(data.get("ray_runs", {})),
        )


def holder_of(path: Path) -> Holder | None:
    """The holder a project's journal names, for telling a skipped run who is in its way."""
    try:
        return _Entries.read(path).holder
    except (OSError, ValueError, TypeError):  # being rewritten, or from an older genpipe
        return None


class RunJournal:
    """Context manager for one pipeline run; enter it only while holding the project's lock."""

    def __init__(self, path: Path, holder: Holder):
        self.path = path
        self.holder = holder
        self._entries = _Entries(holder=holder)
        self._writing = threading.Lock()  # model branches record their runs from concurrent threads

    def __enter__(self) -> RunJournal:
        previous = _Entries.read(self.path)
        if previous.holder is not None:
            if previous.holder.is_running():
                raise ProjectHeld(previous.holder)
            self._end_abandoned(previous)
        self._entries.ray_runs = previous.ray_runs
        self._write()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        # Runs still open here were left by a step that raised past its own error handling.
        why = f"the pipeline stopped: {type(error).__name__}: {error}" if error else "the pipeline ended"
        still_open = [run for run in self._entries.mlflow_runs if not _end_mlflow_run(run, "FAILED", why)]
        with self._writing:
            self._entries = _Entries(mlflow_runs=still_open, ray_runs=self._entries.ray_runs)
            if still_open or self._entries.ray_runs:
                self._write_unlocked()
            else:
                self.path.unlink(missing_ok=True)

    def record_registry_lease(self, lease_id: UUID | None) -> None:
        """The registry turn this run holds (None once released)."""
        with self._writing:
            self._entries.registry_lease = str(lease_id) if lease_id else None
            self._write_unlocked()

    def record_mlflow_run(self, tracking_uri: str, run_id: str) -> None:
        with self._writing:
            self._entries.mlflow_runs.append({"mlflow_run": run_id, "tracking_uri": tracking_uri})
            self._write_unlocked()

    def ray_run_name(self, model: str, fingerprint: str, resume: bool) -> str:
        """The Ray run to train `model` in: with `resume`, the unfinished one recorded for these inputs."""
        key = f"{model}-{fingerprint}"
        with self._writing:
            if not (resume and key in self._entries.ray_runs):
                self._entries.ray_runs[key] = f"{key}-{self.holder.flow_run[:8]}"
                self._write_unlocked()
            return self._entries.ray_runs[key]

    def registered(self, model: str, fingerprint: str) -> None:
        """`model` is registered: nothing of its training is left to resume."""
        with self._writing:
            if self._entries.ray_runs.pop(f"{model}-{fingerprint}", None) is not None:
                self._write_unlocked()

    def _write(self) -> None:
        with self._writing:
            self._write_unlocked()

    def _write_unlocked(self) -> None:
        # Written whole and renamed into place: a process killed mid-write leaves the previous version.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = asdict(self._entries)
        if self._entries.holder is None:
            del entries["holder"]
        staged = self.path.with_suffix(".tmp")
        staged.write_text(json.dumps(entries, indent=1) + "\n")
        os.replace(staged, self.path)

    def _end_abandoned(self, previous: _Entries) -> None:
        why = f"its pipeline process died ({previous.holder}); ended by flow run {self.holder.flow_run}"
        logger.warning("ending what a dead run of this project left open: %s", previous.holder)
        with get_client(sync_client=True) as client:
            if previous.registry_lease:
                client.release_concurrency_slots_with_lease(UUID(previous.registry_lease))
            _crash_flow_run(client, previous.holder.flow_run, why)
        for run in previous.mlflow_runs:
            _end_mlflow_run(run, "KILLED", why)


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


def _crash_flow_run(client: SyncPrefectClient, flow_run_id: str, why: str) -> None:
    try:
        state = client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):  # recorded on another Prefect server, or run outside a flow
        logger.warning("flow run %s is not on this Prefect server; left as it is", flow_run_id)
        return
    if state is not None and not state.is_final():
        client.set_flow_run_state(UUID(flow_run_id), Crashed(message=why), force=True)
