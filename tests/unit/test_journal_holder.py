"""The run journal without servers: who holds a project, whether that process still runs, and the Ray
run a `--resume` continues. What a takeover ends on the servers is in tests/integration/test_journal.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from components.config import load_params
from flows.journal import Holder, ProjectHeld, RunJournal, holder_of
from flows.retrain import training_runner


def test_a_holder_is_running_only_while_its_own_process_runs():
    me = Holder.this_process("flow-run-id")
    assert me.is_running()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    assert not dataclasses.replace(me, pid=int(ended.stdout)).is_running()
    # The same pid, started at another time: another process that reuses the dead one's pid.
    assert not dataclasses.replace(me, process_started=me.process_started - 3600).is_running()
    # A process on another host cannot be checked from here, so it is taken to be running.
    assert dataclasses.replace(me, host="elsewhere.invalid", pid=int(ended.stdout)).is_running()
    assert str(me) == f"flow run flow-run-id on host {me.host}, pid {me.pid}, since {me.since}"


def test_a_live_holder_named_by_the_journal_keeps_the_project(tmp_path):
    path = tmp_path / "outputs" / "run-journal.json"
    with RunJournal(path, Holder.this_process("first")):
        assert holder_of(path).flow_run == "first"
        with (
            pytest.raises(ProjectHeld, match="held by flow run first on host"),
            RunJournal(path, Holder.this_process("second")),
        ):
            pass


def test_unfinished_ray_runs_outlive_the_run_and_resume_reuses_them(tmp_path):
    path = tmp_path / "run-journal.json"
    with RunJournal(path, Holder.this_process("aaaaaaaa-1")) as journal:
        vae = journal.ray_run_name("vae", "f1", resume=False)
        made = journal.ray_run_name("made", "f2", resume=True)  # nothing to resume: a new run
        assert (vae, made) == ("vae-f1-aaaaaaaa", "made-f2-aaaaaaaa")
        journal.registered("made", "f2")
    assert json.loads(path.read_text()) == {
        "registry_lease": None,
        "mlflow_runs": [],
        "ray_runs": {"vae-f1": "vae-f1-aaaaaaaa"},
    }, "an ended run leaves only what a --resume needs, and no holder"
    with RunJournal(path, Holder.this_process("bbbbbbbb-2")) as journal:
        assert journal.ray_run_name("vae", "f1", resume=True) == vae
        assert journal.ray_run_name("vae", "f1", resume=False) == "vae-f1-bbbbbbbb"
        journal.registered("vae", "f1")
    assert not path.exists(), "nothing left behind"


def test_the_journal_is_never_seen_half_written(tmp_path):
    path = tmp_path / "run-journal.json"
    with RunJournal(path, Holder.this_process("writer")) as journal:
        seen = []

        def read_while_writing():
            for _ in range(200):
                seen.append(holder_of(path))

        reader = threading.Thread(target=read_while_writing)
        reader.start()
        for step in range(200):
            journal.ray_run_name(f"model{step}", "f", resume=False)
        reader.join()
    assert all(holder is not None and holder.flow_run == "writer" for holder in seen)


def test_model_branches_are_limited_by_the_runs_own_params():
    """The limit comes from the params the flow itself reads, not from the command line."""
    params = load_params(
        Path(__file__).resolve().parents[2] / "params.yaml", {"train": {"max_concurrent_models": 3}}
    )
    assert training_runner(params)._max_workers == 3
