"""`--data-rev`: the block sees the data of an older git revision, and afterwards the work tree is as
it was (`git status --porcelain` empty). Real git and DVC on a two-file dataset and a one-line stage."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from components.data.versioning import data_at_revision, reproduce, run_dvc, track_data

pytestmark = pytest.mark.integration

STAGES = """\
stages:
  count:
    cmd: python -c "import pathlib; p = pathlib.Path('prepared'); p.mkdir(exist_ok=True); (p / 'count').write_text(str(len(list(pathlib.Path('data').iterdir()))))"
    deps: [data]
    outs: [prepared]
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def commit_data(repo: Path, files: int, message: str) -> str:
    for index in range(files):
        (repo / "data" / f"image{index}.txt").write_text(f"image {index}\n")
    track_data(repo)
    reproduce(repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").strip()


def test_data_rev_trains_on_the_old_data_and_leaves_the_work_tree_as_it_found_it(tmp_path):
    repo = tmp_path / "project"
    (repo / "data").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "tests@genpipe.invalid")
    git(repo, "config", "user.name", "genpipe tests")
    run_dvc(repo, "init", "-q")
    (repo / "dvc.yaml").write_text(STAGES)
    older = commit_data(repo, 2, "two images")
    commit_data(repo, 3, "three images")
    assert git(repo, "status", "--porcelain") == ""

    with data_at_revision(repo, older):
        reproduce(repo)
        assert len(list((repo / "data").iterdir())) == 2
        assert (repo / "prepared" / "count").read_text() == "2"
    assert git(repo, "status", "--porcelain") == "", "dvc.lock and data.dvc are as they were"
    assert len(list((repo / "data").iterdir())) == 3
    assert (repo / "prepared" / "count").read_text() == "3", "the stage outputs are the work tree's again"
    assert "changed" not in run_dvc(repo, "status")
