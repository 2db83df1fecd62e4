"""Reading Ray Train's own record of the checkpoints it has registered, for fault-injection tests."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


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
