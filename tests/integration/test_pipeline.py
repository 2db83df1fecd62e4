"""The whole retraining flow on real Prefect, Ray, MLflow (SQLite) and DVC, on the built-in digits.

One flow run trains every family once (the module's fixture); the tests of the lifecycle (a worse
candidate, skips, --force, new data, the read-only and manual commands) then work on its registry
instead of each training their own first version.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import set_params
from mlflow.tracking import MlflowClient
from scored import assert_scored

from components.registry import store
from components.registry.store import (
    MlflowRegistry,
    registry_status,
    resolve_tracking_uri,
    status_rows,
    version_tags,
)
from components.registry.versions import CHALLENGER, CHAMPION
from flows.retrain import retrain

pytestmark = pytest.mark.integration

TINY = {
    "train": {"epochs": 1, "max_concurrent_models": 2},  # epochs 1 wins over train.per_model too
    "evaluate": {"num_samples": 100, "importance_samples": 5},
}


def run_flow(project: Path, models: list[str], force: bool = False, data_rev: str | None = None, **train):
    overrides = {**TINY, "train": {**TINY["train"], **train}}
    return retrain(
        project_dir=str(project),
        models=models,
        overrides=overrides,
        force=force,
        data_rev=data_rev,
        return_state=True,
    )


# The lifecycle below runs on these; every family goes through the flow in test_colour_pipeline.py.
FAMILIES = ["vae", "fvsbn"]


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, ray_instance, prefect_server, project_factory):
    """One project of the built-in digits, binarised (`data.pixels: binary`; `auto` would model their
    17 grey levels as 8-bit), in which `FAMILIES` have been through the flow once."""
    project = project_factory(tmp_path_factory.mktemp("pipeline") / "project")
    set_params(project, data={"pixels": "binary"})
    state = run_flow(project, FAMILIES)
    assert state.is_completed(), state.message
    return project


def client_for(project: Path) -> MlflowClient:
    uri = resolve_tracking_uri(None, project)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_binary_digits_train_through_the_flow_and_are_registered_with_their_scores(trained_project):
    client = client_for(trained_project)
    for family in FAMILIES:
        version = client.get_model_version_by_alias(f"digits.{family}", CHAMPION)
        assert_scored(family, version, pixels="binary")


def test_first_version_becomes_champion_with_metrics_grids_and_data_version(trained_project):
    client = client_for(trained_project)
    champion = client.get_model_version_by_alias("digits.vae", CHAMPION)
    assert str(champion.version) == "1"
    lock = yaml.safe_load((trained_project / "dvc.lock").read_text())
    (prepared,) = lock["stages"]["prepare"]["outs"]  # the data version is what the models train on
    assert champion.tags["data_version"] == prepared["md5"]
    for split in ("val", "test"):
        for metric in ("nll_bound", "negative_elbo", "fid", "kid_mean", "reconstruction_sse"):
            value = float(champion.tags[f"metric.{split}_{metric}"])
            assert value == value  # not NaN
        assert float(champion.tags[f"metric.{split}_nll_bound"]) <= float(
            champion.tags[f"metric.{split}_negative_elbo"]
        )
    assert champion.tags["primary_metric"] == "val_nll_bound"
    assert champion.tags["feature_extractor"].startswith("featurizer-")
    settings = json.loads(champion.tags["evaluation_settings"])
    assert settings["num_samples"] == TINY["evaluate"]["num_samples"] and settings["splits"] == [
        "val",
        "test",
    ]
    assert (
        settings["prepared_data"] == prepared["md5"]
        and settings["feature_extractor"] == champion.tags["feature_extractor"]
    )
    run = client.get_run(champion.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"]
    assert run.data.tags["data_version"] == prepared["md5"]
    assert run.inputs.dataset_inputs, "the dataset is logged as an MLflow input"
    history = client.get_metric_history(champion.run_id, "train/model_loss")
    assert len(history) == 1
    artifacts = {a.path for a in client.list_artifacts(champion.run_id, "images")}
    assert {"images/samples.png", "images/reconstructions.png", "images/interpolation.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(champion.run_id, "model")} == {
        "model/MLmodel",
        "model/data",
    }
    assert {a.path for a in client.list_artifacts(champion.run_id, "model/data")} == {
        "model/data/model.json",
        "model/data/weights.safetensors",
    }
    assert (trained_project / "data.dvc").is_file()


def test_worse_candidate_does_not_move_champion(trained_project):
    state = run_flow(trained_project, ["vae"], epochs=0)  # an untrained model is worse
    assert state.is_completed(), state.message
    client = client_for(trained_project)
    assert str(client.get_model_version_by_alias("digits.vae", CHAMPION).version) == "1"
    candidate = client.get_model_version_by_alias("digits.vae", CHALLENGER)
    assert str(candidate.version) == "2"
    assert candidate.tags["promotion.decision"] == "rejected" and candidate.tags["promotion.split"] == "val"
    assert float(candidate.tags["metric.val_nll_bound"]) > float(candidate.tags["promotion.champion_value"])
    assert "decided on the validation split" in candidate.tags["promotion.reason"]
    # The champion's figures were recorded under the same settings: compared as recorded, not re-evaluated.
    assert "recorded under the same evaluation settings" in candidate.tags["promotion.reason"]
    assert float(candidate.tags["promotion.champion_test_value"]) == float(
        client.get_model_version("digits.vae", "1").tags["metric.test_nll_bound"]
    )


def test_a_model_that_cannot_be_built_stops_the_run_before_anything_trains(trained_project):
    client = client_for(trained_project)
    runs_before = len(client.search_runs([client.get_experiment_by_name("genpipe").experiment_id]))
    versions_before = len(client.search_model_versions("name = 'digits.vae'"))
    state = run_flow(trained_project, ["vae", "no-such-model"], force=True)
    assert state.is_failed()
    assert "no-such-model: unknown model 'no-such-model'" in state.message
    assert "1 of 2 model(s) cannot be built for the prepared 1x8x8 images" in state.message
    assert len(client.search_model_versions("name = 'digits.vae'")) == versions_before
    runs = client.search_runs([client.get_experiment_by_name("genpipe").experiment_id])
    assert len(runs) == runs_before + 1 and runs[0].info.status == "FAILED"  # only the pipeline's parent run


def test_a_model_failing_in_training_fails_its_branch_only(trained_project, monkeypatch):
    # Adam moves every weight by ~lr per step: at 1e4 the VAE's ELBO overflows within its epoch.
    state = run_flow(trained_project, ["fvsbn", "vae"], per_model={"vae": {"lr": 1e4}})
    assert state.is_failed()
    assert "vae" in state.message and "diverged" in state.message
    summary = {row["model"]: row for row in state.result(raise_on_failure=False)}
    assert summary["fvsbn"]["status"] in ("promoted", "kept champion", "skipped")
    assert summary["vae"]["status"] == "failed"
    # `genpipe status` and `genpipe lineage` read the run's registry, without MLflow, as MLflow does.
    uri = resolve_tracking_uri(None, trained_project)
    client = client_for(trained_project)
    with monkeypatch.context() as patch:
        patch.setattr(store, "client_for", lambda uri: pytest.fail(f"MLflow asked for {uri}"))
        rows = status_rows(uri)
        champions = [(row["model"], row["champion"]) for row in rows if row["champion"] != "-"]
        lineages = {(name, version): version_tags(uri, name, version) for name, version in champions}
    assert rows == registry_status(MlflowRegistry(client))
    assert {"digits.fvsbn", "digits.vae"} <= {name for name, _ in champions}, rows
    assert lineages == {(n, v): client.get_model_version(n, v).tags for n, v in champions}


def test_scheduled_deployment_has_its_cron_schedule(prefect_server, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deployment import scheduled_deployment

    deployment_id = scheduled_deployment("0 3 * * *", str(tmp_path), name="nightly-test").apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(deployment_id)

    deployment = asyncio.run(read())
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters["project_dir"] == str(tmp_path.resolve())


def test_status_and_sample_read_the_registry(trained_project, tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["status", "--json", "-C", str(trained_project)])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(result.output)}
    assert rows["digits.vae"]["champion"] == "1" and rows["digits.vae"]["metric"] == "val_nll_bound"
    output = tmp_path / "grid.png"
    args = ["sample", "--model", "vae", "-n", "16", "-o", str(output), "-C", str(trained_project)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert Image.open(output).size[0] > 8 * 4


def test_lineage_manual_promotion_and_rollback_from_the_command_line(trained_project):
    from typer.testing import CliRunner

    from flows.cli import app

    client = client_for(trained_project)
    runner = CliRunner()
    result = runner.invoke(app, ["lineage", "vae", "1", "-C", str(trained_project)], terminal_width=300)
    assert result.exit_code == 0, result.output
    commit = client.get_model_version("digits.vae", "1").tags["git_commit"]
    assert f"git checkout {commit}" in result.output and "dvc pull" in result.output
    assert "genpipe run --models vae --force" in result.output
    result = runner.invoke(app, ["promote", "vae", "2", "--reason", "drill", "-C", str(trained_project)])
    assert result.exit_code == 0, result.output
    assert str(client.get_model_version_by_alias("digits.vae", CHAMPION).version) == "2"
    production = client.get_model_version_by_alias("prod.digits.vae", CHAMPION)
    assert production.tags["source_version"] == "2"
    result = runner.invoke(app, ["rollback", "digits.vae", "-C", str(trained_project)])
    assert result.exit_code == 0, result.output
    assert str(client.get_model_version_by_alias("digits.vae", CHAMPION).version) == "1"
    result = runner.invoke(app, ["promote", "vae", "99", "--reason", "typo", "-C", str(trained_project)])
    assert result.exit_code == 1 and "digits.vae v99" in result.output
    assert str(client.get_model_version_by_alias("digits.vae", CHAMPION).version) == "1"


def test_an_overlapping_run_skips_while_another_holds_the_project_lock(trained_project):
    from filelock import FileLock

    versions = len(client_for(trained_project).search_model_versions("name = 'digits.vae'"))
    with FileLock(trained_project / ".genpipe.lock"):
        state = run_flow(trained_project, ["vae"], epochs=2)
    assert state.is_cancelled() and "another genpipe run holds" in state.message
    assert [row["status"] for row in state.result(raise_on_failure=False)] == ["skipped"]
    assert len(client_for(trained_project).search_model_versions("name = 'digits.vae'")) == versions


def test_a_run_elsewhere_writing_to_the_same_registry_makes_an_overlapping_run_skip(trained_project):
    from typer.testing import CliRunner

    from flows.cli import EXIT_SKIPPED, app
    from flows.journal import Holder
    from flows.registry_turn import registry_turn

    client = client_for(trained_project)
    versions = len(client.search_model_versions("name = 'digits.vae'"))
    elsewhere = Holder.this_process("a-run-on-another-host")
    # What a run on another host holds while it trains and registers: the registry's turn on the
    # shared Prefect server (the project lock here stays free).
    with registry_turn(resolve_tracking_uri(None, trained_project), wait_s=0, holder=elsewhere):
        result = CliRunner().invoke(
            app, ["run", "--models", "vae", "--epochs", "2", "-C", str(trained_project)]
        )
    output = " ".join(result.output.split())
    assert result.exit_code == EXIT_SKIPPED != 0, result.output
    assert "another genpipe run is writing to the registry" in output and "nothing done" in output
    assert f"flow run a-run-on-another-host on host {elsewhere.host}, pid {elsewhere.pid}" in output
    assert f"since {elsewhere.since}" in output
    assert len(client.search_model_versions("name = 'digits.vae'")) == versions


def test_unchanged_inputs_are_skipped_and_force_retrains(trained_project):
    first = run_flow(trained_project, ["vae"])
    assert first.is_completed(), first.message
    versions_before = len(client_for(trained_project).search_model_versions("name = 'digits.vae'"))
    again = run_flow(trained_project, ["vae"])
    (row,) = again.result(raise_on_failure=False)
    assert row["status"] == "skipped" and "inputs unchanged" in row["detail"]
    assert len(client_for(trained_project).search_model_versions("name = 'digits.vae'")) == versions_before
    forced = run_flow(trained_project, ["vae"], force=True)
    (row,) = forced.result(raise_on_failure=False)
    assert row["status"] in ("promoted", "kept champion")
    assert (
        len(client_for(trained_project).search_model_versions("name = 'digits.vae'")) == versions_before + 1
    )
    source = client_for(trained_project).get_model_version("digits.vae", row["version"]).source
    assert source.startswith(str(trained_project)) or str(trained_project) in source


def test_changed_data_retrains_and_data_rev_trains_on_an_older_version(trained_project):
    import numpy as np

    from components.data.importers import import_dataset
    from components.data.raw import builtin_digits

    git = __import__("conftest").git
    git(trained_project, "add", "data.dvc", "dvc.lock", ".gitignore")
    git(trained_project, "commit", "-qm", "built-in digits")
    original = git(trained_project, "rev-parse", "HEAD").strip()
    digits = builtin_digits()
    np.savez(trained_project / "fewer.npz", x=digits.images[:900, 0], y=digits.labels[:900])
    import_dataset(trained_project / "fewer.npz", trained_project, name="digits")
    git(trained_project, "commit", "-qam", "fewer digits")
    new_data_dvc = (trained_project / "data.dvc").read_text()

    changed = run_flow(trained_project, ["vae"])
    (row,) = changed.result(raise_on_failure=False)
    assert row["status"] in ("promoted", "kept champion"), row
    assert "retrained: changed since" in row["detail"] and "prepared data" in row["detail"]
    assert "re-evaluated first" in row["detail"] and "prepared_data" in row["detail"]

    older = run_flow(trained_project, ["vae"], data_rev=original)
    (row,) = older.result(raise_on_failure=False)
    assert (
        row["status"] == "skipped" and "inputs unchanged" in row["detail"]
    )  # the first run's data and inputs
    assert (trained_project / "data.dvc").read_text() == new_data_dvc
