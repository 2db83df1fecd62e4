"""DVC and git operations on a project directory: track data, reproduce stages, read versions.

DVC's Python `Repo.reproduce` is internal, so stages run through the stable `dvc` command, with the
current interpreter's scripts first on PATH so stage commands (`python -m ...`) use this environment.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from components.data.raw import RawDataset, builtin_digits, write_raw

DATA_DIR = "data"
DATA_FILE = "data.dvc"
LOCK_FILE = "dvc.lock"


class DvcError(RuntimeError):
    """A dvc or git command failed; the message carries the command and its output."""


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_dvc(repo: Path, *args: str) -> str:
    """Run `dvc ARGS` in `repo`; return its output or raise DvcError with it."""
    command = [sys.executable, "-m", "dvc", *args]
    completed = subprocess.run(command, cwd=repo, env=_environment(), capture_output=True, text=True)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).strip()
        raise DvcError(f"`dvc {' '.join(args)}` failed in {repo} (exit {completed.returncode}):\n{output}")
    return completed.stdout


def track_data(repo: Path) -> None:
    """`dvc add data`: hash `data/` into the cache and (re)write the top-level `data.dvc`."""
    run_dvc(repo, "add", "--quiet", DATA_DIR)


def reproduce(repo: Path) -> str:
    """`dvc repro`: run the stages of `dvc.yaml` whose inputs changed; returns DVC's log."""
    return run_dvc(repo, "repro")


def data_version(repo: Path) -> str:
    """The DVC hash of the data the `prepare` stage last ran on, from `dvc.lock`."""
    lock_path = Path(repo) / "dvc.lock"
    if not lock_path.is_file():
        raise DvcError(f"{lock_path}: missing; run `dvc repro` first")
    lock = yaml.safe_load(lock_path.read_text())
    for dep in lock.get("stages", {}).get("prepare", {}).get("deps", []):
        if dep.get("path") == DATA_DIR:
            return dep["md5"]
    raise DvcError(f"{lock_path}: the prepare stage has no recorded dependency on {DATA_DIR!r}")


def ensure_data(repo: Path, raw_dir: Path, default: RawDataset | None = None) -> str:
    """Make sure `data/` holds the tracked dataset, writing the built-in one where that is what is tracked.

    A fresh clone has `data.dvc` but no `data/`: the built-in digits are rebuilt byte-for-byte;
    anything else is fetched from the DVC remote. Returns a one-line account of what happened.
    """
    repo = Path(repo)
    data_dir, data_file = repo / DATA_DIR, repo / DATA_FILE
    if data_dir.exists() and data_file.exists():
        return f"{DATA_DIR}/ present"
    if not data_dir.exists():
        write_raw(default or builtin_digits(), repo / raw_dir)
        if data_file.exists() and "modified" in run_dvc(repo, "status", DATA_FILE):
            shutil.rmtree(data_dir)
            try:
                run_dvc(repo, "pull", DATA_FILE)
            except DvcError as err:
                raise DvcError(
                    f"{data_dir}/ is missing and {data_file} tracks a dataset other than the built-in one; "
                    f"`dvc pull` could not fetch it:\n{err}"
                ) from err
            return f"{DATA_DIR}/ pulled from the DVC remote"
    track_data(repo)
    return f"{DATA_DIR}/ written (built-in dataset) and tracked in {DATA_FILE}"


def git_revision(repo: Path) -> tuple[str, bool]:
    """(commit, dirty) of the git work tree at `repo`; ("unknown", True) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True
    return commit.stdout.strip(), bool(status.stdout.strip())


@contextmanager
def data_at_revision(repo: Path, revision: str | None) -> Iterator[None]:
    """Within the block, `data/` holds the data that `data.dvc` tracked at git `revision`.

    DVC checks it out from the cache (or pulls it from the remote). Afterwards the work tree is put
    back as it was: `data.dvc` and `dvc.lock` as they were, and the data and stage outputs they name
    checked out again, so `git status` does not change and only the block saw the older version.
    """
    if revision is None:
        yield
        return
    repo = Path(repo)
    data_file, lock_file = repo / DATA_FILE, repo / LOCK_FILE
    shown = subprocess.run(
        ["git", "show", f"{revision}:{DATA_FILE}"], cwd=repo, capture_output=True, text=True
    )
    if shown.returncode != 0:
        raise DvcError(
            f"--data-rev {revision}: git has no {DATA_FILE} at that revision ({shown.stderr.strip()})"
        )
    original_data_file = data_file.read_bytes()
    original_lock = lock_file.read_bytes() if lock_file.is_file() else None
    data_file.write_text(shown.stdout)
    try:
        try:
            run_dvc(repo, "checkout", "--force", DATA_FILE)
        except DvcError:
            run_dvc(repo, "pull", "--force", DATA_FILE)
        yield
    finally:
        data_file.write_bytes(original_data_file)
        if original_lock is None:
            lock_file.unlink(missing_ok=True)
        else:
            lock_file.write_bytes(original_lock)
        run_dvc(repo, "checkout", "--force", DATA_FILE)
        if original_lock is not None:
            try:
                run_dvc(repo, "checkout", "--force")
            except DvcError as err:  # outputs never cached here: the next `dvc repro` recomputes them
                logging.getLogger(__name__).warning("stage outputs not restored: %s", err)
