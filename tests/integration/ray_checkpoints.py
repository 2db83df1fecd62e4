"""Fault injection around checkpoints: a worker that dies after one, and Ray Train's own record of them."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from components.training.trainer import LocalContext


def registered_step(run_dir: Path) -> int:
    """Step of the latest checkpoint that Ray Train's controller has registered, from its own record.

    Only such a checkpoint is handed to a restarted worker group, and one already in storage is
    registered only at the controller's next poll of the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).
    """
    with contextlib.suppress(OSError, ValueError):
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())[
            "latest_checkpoint_result"
        ]
        return latest["metrics"]["step"] if latest else 0
    return 0


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
