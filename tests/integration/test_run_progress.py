"""What `genpipe run` prints: a live progress bar in a terminal, one line per stage change otherwise.

Two real `genpipe run` processes on one project, on the session's Prefect server and Ray instance:
the first in a pseudo-terminal, the second with its output piped, as in CI.
"""

from __future__ import annotations

import math
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import set_params

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "vae"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")  # colours, cursor moves, links
STAGE_LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+) +(\S+)", re.MULTILINE)
NUISANCES = ("The specified dataset source can be interpreted", "Token authentication is")


def genpipe_run(project: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "-C", str(project), "--models", MODEL, *options]


def run_environment(ray_instance) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address,
        "PREFECT_LOGGING_LEVEL": "INFO",  # as a user has it: the log file gets Prefect's detail
        "COLUMNS": "160",
        "TERM": "xterm-256color",
    }


def run_in_terminal(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as its standard streams; its exit code and output."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            elif process.poll() is not None:
                break
        else:
            process.kill()
            raise TimeoutError(f"{command} did not finish in {timeout} s")
        return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(controller)


@pytest.fixture
def small_project(project_factory, tmp_path: Path) -> Path:
    """A prepared copy of the template project (`dvc repro` done): what is printed is the runs' own."""
    project = project_factory(tmp_path / "project")
    set_params(project, evaluate={"num_samples": 200, "importance_samples": 10})
    return project


def test_progress_bar_in_a_terminal_and_one_line_per_stage_change_when_piped(
    small_project, ray_instance, prefect_server
):
    env = run_environment(ray_instance)
    code, screen = run_in_terminal(genpipe_run(small_project, "--epochs", "1"), env, timeout=540)
    (small_project.parent / "terminal.txt").write_text(screen)  # for a person to look at
    text = ANSI.sub("", screen).replace("\r", "\n")
    assert code == 0, text[-3000:]

    from components.data.prepared import load_prepared

    params = yaml.safe_load((small_project / "params.yaml").read_text())
    train_images = len(load_prepared(small_project / params["data"]["prepared_dir"]).train)
    planned = math.ceil(train_images / params["train"]["batch_size"])  # one epoch
    bar_rows = [line for line in text.splitlines() if line.lstrip().startswith(MODEL) and "━" in line]
    assert any(f"{planned}/{planned}" in row for row in bar_rows), text[-3000:]
    assert any("img/s" in row and "epoch 1/1" in row for row in bar_rows)
    # The same row then counts the evaluation's batches to its end (the VAE's last: test reconstructions).
    evaluated = [row for row in bar_rows if "test: reconstruction" in row]
    assert any(re.search(r"\b(\d+)/\1\b", row) for row in evaluated), text[-3000:]
    log_file = Path(re.search(r"Logs: +(\S+\.log)", text).group(1))
    log = log_file.read_text()
    # Prefect's records, and what MLflow prints to stderr when it copies a champion, went to the file.
    for detail in ("training vae on Ray", "Copied version '1' of model 'digits.vae'"):
        assert detail in log and detail not in text

    piped = subprocess.run(
        genpipe_run(small_project, "--epochs", "1", "--force"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert piped.returncode == 0, piped.stdout[-3000:] + piped.stderr[-3000:]
    stages = [stage for model, stage in STAGE_LINE.findall(piped.stdout) if model == MODEL]
    assert stages == ["queued", "training", "evaluating", "registering", "done"], piped.stdout
    evaluating = next(line for line in piped.stdout.splitlines() if re.search(r" vae +evaluating", line))
    assert f"step {planned}/{planned}, epoch 1/1" in evaluating
    registering = next(line for line in piped.stdout.splitlines() if re.search(r" vae +registering", line))
    assert re.search(r"\(evaluated: batch (\d+)/\1, test: reconstruction\)", registering), registering
    assert "img/s" not in piped.stdout  # no live rows drawn into a log
    for output in (text, piped.stdout + piped.stderr):
        for nuisance in NUISANCES:
            assert nuisance not in output
