"""Retrain only what changed (issue 14, cases 1 and 2): real genpipe runs on real Prefect, Ray, MLflow, DVC.

"The code" is the code that runs. Each run here is `python -m flows.cli run` started in the project
directory, so the project's own `components/` (the copy `make_project` makes) is what trains,
evaluates, runs the DVC stages and is fingerprinted; editing it is editing the code that runs, as
editing a clone installed with `pip install -e .` is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import set_params
from mlflow.tracking import MlflowClient

from components.registry.store import resolve_tracking_uri

pytestmark = pytest.mark.integration

GENPIPE_SOURCE = Path(__file__).resolve().parents[2]  # for `flows`; `components` comes from the project
# The VAE and the DCGAN share no family code; WGAN builds on the DCGAN's networks.
FAMILIES = ("vae", "wgan", "dcgan")


def genpipe_run(project: Path, ray_instance, models: tuple[str, ...]) -> str:
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PYTHONPATH": str(GENPIPE_SOURCE),
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "RAY_ADDRESS": ray_instance.get_runtime_context().gcs_address,
    }
    command = [sys.executable, "-m", "flows.cli", "run", "--models", ",".join(models), "--epochs", "1"]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


def registry(project: Path) -> MlflowClient:
    uri = resolve_tracking_uri(None, project)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def versions(project: Path) -> dict[str, list]:
    client = registry(project)
    return {
        model: sorted(client.search_model_versions(f"name = 'digits.{model}'"), key=lambda v: int(v.version))
        for model in FAMILIES
    }


def retrained_because(project: Path, before: dict[str, list]) -> dict[str, str]:
    """For each family that got a new version since `before`, the reason its run records."""
    client = registry(project)
    reasons = {}
    for model, after in versions(project).items():
        new = after[len(before[model]) :]
        assert len(new) <= 1, f"{model} registered {len(new)} versions in one run"
        if new:
            reasons[model] = client.get_run(new[0].run_id).data.tags["retrained_because"]
    return reasons


def append_comment(project: Path, module: str) -> None:
    path = project / module
    path.write_text(path.read_text() + "# a comment: the source changed, the behaviour did not\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_instance, prefect_server, project_factory) -> Path:
    """One project in which `FAMILIES` went through a first run."""
    project = project_factory(tmp_path_factory.mktemp("what-changed") / "project")
    set_params(project, evaluate={"num_samples": 100, "kid_subset_size": 50, "importance_samples": 5})
    genpipe_run(project, ray_instance, FAMILIES)
    assert all(len(found) == 1 for found in versions(project).values()), versions(project)
    return project


def test_a_change_to_code_a_family_imports_retrains_it_and_names_the_module(trained, ray_instance):
    before = versions(trained)
    # The VAE's encoder and latent layers (the evaluation's featurizer imports from it too, so every
    # family executes it), and the DCGAN networks that wgan builds on.
    append_comment(trained, "components/models/layers.py")
    append_comment(trained, "components/models/families/dcgan.py")
    output = genpipe_run(trained, ray_instance, ("vae", "wgan", "dcgan"))
    reasons = retrained_because(trained, before)
    assert sorted(reasons) == ["dcgan", "vae", "wgan"], output
    assert "code: components/models/layers.py" in reasons["vae"]
    assert "dcgan.py" not in reasons["vae"]  # the VAE imports nothing of the DCGAN's
    for model in ("wgan", "dcgan"):
        assert "code: components/models/families/dcgan.py" in reasons[model]


def test_a_new_split_retrains_on_the_prepared_data_and_says_so(trained, ray_instance):
    before = versions(trained)
    set_params(trained, data={"val_fraction": 0.15})
    genpipe_run(trained, ray_instance, ("vae", "wgan"))
    counts = json.loads((trained / "prepared" / "meta.json").read_text())["counts"]
    assert counts["train"] == 1168  # dvc repro re-split the same raw data
    reasons = retrained_because(trained, before)
    assert sorted(reasons) == ["vae", "wgan"]
    for model, reason in reasons.items():
        assert "prepared data" in reason, (model, reason)
    lock = yaml.safe_load((trained / "dvc.lock").read_text())
    (prepared,) = lock["stages"]["prepare"]["outs"]
    for model in reasons:
        assert versions(trained)[model][-1].tags["data_version"] == prepared["md5"]


def test_a_change_to_a_module_outside_every_familys_closure_retrains_nothing(trained, ray_instance):
    before = versions(trained)
    append_comment(trained, "components/data/importers.py")  # `genpipe data import` only
    # The families whose other inputs are current (the others have not seen the last changes yet).
    output = genpipe_run(trained, ray_instance, ("vae", "wgan"))
    assert retrained_because(trained, before) == {}, output


def test_the_prepare_stage_reads_only_its_data_keys_so_data_pixels_prepares_nothing_again(
    tmp_path, project_factory
):
    """`data.pixels` decides what some models are, not what the prepared data is."""
    from components.data.versioning import run_dvc

    project = project_factory(tmp_path / "project")
    set_params(project, data={"pixels": "8bit"})
    assert json.loads(run_dvc(project, "status", "--json")) == {}
    set_params(project, data={"shard_images": 1000})
    assert "prepare" in json.loads(run_dvc(project, "status", "--json"))
