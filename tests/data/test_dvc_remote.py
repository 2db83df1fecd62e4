"""The project's DVC remote works offline out of the box: what `dvc push` sends, `dvc pull` brings back."""

from __future__ import annotations

import shutil
from pathlib import Path

from components.data.versioning import ensure_data, run_dvc

ROOT = Path(__file__).resolve().parents[2]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def test_push_then_pull_restores_the_tracked_data(project):
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the committed remote settings
    ensure_data(project, Path("data/raw"))
    before = snapshot(project / "data")
    run_dvc(project, "push", "data.dvc")
    assert any((project / ".dvc-storage").rglob("*")), "the local remote received the data"
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    run_dvc(project, "pull", "data.dvc")
    assert snapshot(project / "data") == before
