"""Fault injection around checkpoints: a worker that dies after one, and Ray Train's own record of them."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import psutil
from two_nodes import ray_actor_processes

from components.training.ray_train import RUN_SNAPSHOT
from components.training.trainer import STATE_FILE, LocalContext


def registered_step(run_dir: Path) -> int:
    """Step of the latest checkpoint that Ray Train's controller has registered, from its own record.

    Only such a checkpoint is handed to a restarted worker group, and one already in storage is
    registered only at the controller's next poll of the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
    """
    with contextlib.suppress(OSError, ValueError):
        latest = json.loads((run_dir / RUN_SNAPSHOT).read_text())["latest_checkpoint_result"]
        return latest["metrics"]["step"] if latest else 0
    return 0


def train_controllers(root: psutil.Process) -> set[int]:
    """Process ids of the Ray Train controllers below `root`."""
    return {process.pid for process in ray_actor_processes(root, "TrainController")}


def cut_short_as_by_a_kill(run_dir: Path, ray_root: psutil.Process, controllers_before: set[int]) -> Path:
    """Leave `run_dir` as a kill can: Ray Train's record of the run empty (the kill came while Ray
    rewrote it in place) and a checkpoint newer than any registered one whose copy was cut short.
    First waits until the controllers below `ray_root` that are not in `controllers_before` (the
    dead run's) are gone, so that none rewrites the record after. Returns the cut-short checkpoint."""
    deadline = time.monotonic() + 60
    while train_controllers(ray_root) - controllers_before:
        assert time.monotonic() < deadline, "the dead run's Ray Train controller lives on"
        time.sleep(0.2)
    torn = run_dir / "checkpoint_9999-12-31_23-59-59.999999"  # Ray names them by time: newer than all
    shutil.copytree(max(run_dir.glob("checkpoint_2*")), torn)
    state = torn / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (run_dir / RUN_SNAPSHOT).write_text("")
    return torn


class SimulatedCrash(Exception):
    """Stands for a worker dying: raised where no code of the trainer can catch it."""


class CrashAfterCheckpoint(LocalContext):
    """A local worker that dies right after its checkpoint at `step` is stored."""

    def __init__(self, output_dir: Path, step: int):
        super().__init__(output_dir)
        self.step = step

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        super().report(metrics, checkpoint_dir)
        if checkpoint_dir is not None and metrics.get("step") == self.step:
            raise SimulatedCrash(f"simulated crash after the checkpoint at step {self.step}")
