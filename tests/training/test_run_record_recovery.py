"""A run whose Ray Train record a kill left empty: which checkpoint it continues from, what is kept.
Ray's own side (a fit that then continues) is tested in tests/integration/test_resume.py."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import cpu_job

from components.models import create_model
from components.training.ray_train import RUN_SNAPSHOT, recover_cut_short_snapshot
from components.training.trainer import STATE_FILE, LocalContext, read_outcome, run_training

RECORD = '{"latest_checkpoint_result": null}'


@pytest.fixture(scope="module")
def whole_checkpoints(tmp_path_factory) -> list[Path]:
    """Two checkpoints as a run writes them, after one and two epochs."""
    spec = create_model("vae", (1, 8, 8), latent_dim=2, channels=2, hidden=8).spec
    images = np.random.default_rng(0).integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)
    directories = []
    for epochs in (1, 2):
        directory = tmp_path_factory.mktemp(f"epochs{epochs}")
        job = cpu_job(spec, epochs=epochs, batch_size=16, lr=1e-3)
        run_training(job, images, images[:8].astype(np.float32) / 255, LocalContext(directory))
        directories.append(directory)
    return directories


def ray_run(tmp_path: Path, checkpoints: dict[str, Path], record: str) -> Path:
    run = tmp_path / "run"
    for name, source in checkpoints.items():
        shutil.copytree(source, run / name)
    (run / RUN_SNAPSHOT).write_text(record)
    return run


def cut_short(directory: Path) -> None:
    state = directory / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def test_a_readable_record_is_left_to_ray(whole_checkpoints, tmp_path):
    run = ray_run(tmp_path, {"checkpoint_2026-01-01_00-00-00.000000": whole_checkpoints[0]}, RECORD)
    assert recover_cut_short_snapshot(str(run)) is None
    assert (run / RUN_SNAPSHOT).read_text() == RECORD
    assert recover_cut_short_snapshot(str(tmp_path / "a run never started")) is None


def test_an_empty_record_is_moved_aside_and_the_newest_whole_checkpoint_taken(
    whole_checkpoints, tmp_path, caplog
):
    one_epoch, two_epochs = whole_checkpoints
    run = ray_run(
        tmp_path,
        {
            "checkpoint_2026-01-01_00-00-00.000000": one_epoch,
            "checkpoint_2026-01-01_00-00-05.000000": two_epochs,
            "checkpoint_2026-01-01_00-00-09.000000": two_epochs,  # the copy the kill cut short
        },
        "",
    )
    cut_short(run / "checkpoint_2026-01-01_00-00-09.000000")
    with caplog.at_level(logging.WARNING, logger="components.training.ray_train"):
        checkpoint = recover_cut_short_snapshot(str(run))
    assert Path(checkpoint.path).name == "checkpoint_2026-01-01_00-00-05.000000"
    with checkpoint.as_directory() as directory:
        assert read_outcome(Path(directory)).steps == read_outcome(two_epochs).steps
    assert not (run / RUN_SNAPSHOT).exists() and (run / f"{RUN_SNAPSHOT}.unreadable").read_text() == ""
    assert "continuing from" in caplog.text and "00-00-05" in caplog.text
    assert len(list(run.glob("checkpoint_2*"))) == 3, "no checkpoint is deleted"


def test_with_no_whole_checkpoint_the_run_starts_over(whole_checkpoints, tmp_path, caplog):
    run = ray_run(tmp_path, {"checkpoint_2026-01-01_00-00-00.000000": whole_checkpoints[0]}, '{"latest')
    cut_short(run / "checkpoint_2026-01-01_00-00-00.000000")
    with caplog.at_level(logging.WARNING, logger="components.training.ray_train"):
        assert recover_cut_short_snapshot(str(run)) is None
    assert "starting over" in caplog.text
    assert (run / f"{RUN_SNAPSHOT}.unreadable").read_text() == '{"latest'
