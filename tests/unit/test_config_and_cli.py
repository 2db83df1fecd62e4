"""params.yaml handling and the command line's surface."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.config import ConfigError, load_params
from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_overrides_apply_and_unknown_keys_are_named(tmp_path):
    params = load_params(ROOT / "params.yaml", {"train": {"epochs": 3}})
    assert params.train.epochs == 3
    with pytest.raises(ConfigError, match=r"params.yaml.train: unknown key 'epoch'"):
        load_params(ROOT / "params.yaml", {"train": {"epoch": 3}})
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="missing section"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "train",
            "epochs",
            "ten",
            "train.epochs: Input should be a valid integer, unable to parse string as an integer, got 'ten'",
        ),
        (
            "train",
            "precision",
            "fp16",
            "train.precision: Input should be 'auto', 'fp32' or 'bf16', got 'fp16'",
        ),
        (
            "train",
            "gpus_per_worker",
            -1,
            "train.gpus_per_worker: Input should be 'auto' or greater than or equal to 0, got -1",
        ),
        ("data", "val_fraction", 1.5, "data.val_fraction: Input should be less than 1, got 1.5"),
        (
            "evaluate",
            "num_samples",
            1,
            "evaluate.num_samples: Input should be greater than or equal to 2, got 1",
        ),
        (
            "evaluate",
            "feature_extractor",
            "clip",
            "evaluate.feature_extractor: Input should be 'featurizer' or 'inception', got 'clip'",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_key_and_what_was_expected(
    tmp_path, section, key, value, expected
):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as raised:
        load_params(tmp_path / "params.yaml")
    assert str(raised.value) == f"{tmp_path / 'params.yaml'} {expected}"
    # The same value typed for one run is refused the same way, before anything runs.
    with pytest.raises(ConfigError, match=expected.split(":")[0]):
        load_params(ROOT / "params.yaml", {section: {key: value}})


def test_a_family_setting_and_a_promotion_rule_are_checked_too(tmp_path):
    for family in ("gan", "vae"):  # one with settings of its own in the file, one without
        with pytest.raises(ConfigError, match=rf"train.per_model: {family}: unknown key\(s\) epoch$"):
            load_params(ROOT / "params.yaml", {"train": {"per_model": {family: {"epoch": 2}}}})
    params = load_params(ROOT / "params.yaml", {"train": {"per_model": {"gan": {"batch_size": 0}}}})
    with pytest.raises(
        ConfigError, match=r"train.per_model.gan batch_size: Input should be greater than 0, got 0"
    ):
        params.train.for_model("gan")
    with pytest.raises(
        ConfigError, match=r"promotion.vae.direction: Input should be 'minimize' or 'maximize'"
    ):
        load_params(ROOT / "params.yaml", {"promotion": {"vae": {"direction": "lower"}}})


def test_a_value_given_for_one_run_wins_over_the_familys_own_setting():
    from components.training.jobs import train_job

    file_only = load_params(ROOT / "params.yaml")
    assert file_only.train.per_model["gan"]["epochs"] > 1, "the file gives gan its own epochs"
    params = load_params(ROOT / "params.yaml", {"train": {"epochs": 1}})
    assert train_job(params, "gan", (1, 8, 8), levels=17).epochs == 1
    assert params.train.for_model("fvsbn").lr == file_only.train.per_model["fvsbn"]["lr"]
    # A per-family value given for the run itself still applies to that family only.
    params = load_params(ROOT / "params.yaml", {"train": {"epochs": 1, "per_model": {"gan": {"epochs": 2}}}})
    assert (params.train.for_model("gan").epochs, params.train.for_model("vae").epochs) == (2, 1)


@pytest.mark.parametrize(
    "command", [[], ["run"], ["schedule"], ["status"], ["sample"], ["models"], ["data", "import"]]
)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_models_lists_every_family():
    from components.models import list_models

    result = CliRunner().invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0
    for name in list_models():
        assert name in result.output


def test_status_and_sample_on_an_empty_registry_say_so(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = CliRunner().invoke(app, ["status", "-C", str(tmp_path)])
    assert result.exit_code == 0 and "Nothing registered yet" in result.output
    result = CliRunner().invoke(app, ["sample", "--model", "vae", "--dataset", "digits", "-C", str(tmp_path)])
    assert result.exit_code == 1 and "nothing is registered yet" in result.output


def test_the_cli_turns_usage_reports_off_unless_the_user_chose():
    show = "import os, flows.cli; print(os.environ['DVC_NO_ANALYTICS'], os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DVC_NO_ANALYTICS", "PREFECT_SERVER_ANALYTICS_ENABLED")
    }
    default = subprocess.run(
        [sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True
    )
    assert default.stdout.split() == ["1", "false"]
    chosen = subprocess.run(
        [sys.executable, "-c", show],
        env={**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "true"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert chosen.stdout.split() == ["1", "true"]


def test_the_static_family_catalogue_matches_the_families_classes():
    from components.catalogue import family_catalogue
    from components.models import create_model, hyperparameters, list_models
    from components.models.factory import model_class

    catalogue = {entry.name: entry for entry in family_catalogue()}
    assert sorted(catalogue) == list_models()
    for name, entry in catalogue.items():
        cls = model_class(name)
        kinds = list(dict.fromkeys(cls.data_kind_for((c, 8, 8), {}) for c in (1, 3)))
        metrics = [create_model(name, (c, 8, 8)).primary_metric for c in (1, 3)]
        assert entry.data_kind == " / ".join(kinds), name
        assert entry.primary_metric == " / ".join(dict.fromkeys(metrics)), name
        assert entry.hyperparameters == hyperparameters(name), name


def test_read_only_commands_import_neither_torch_nor_ray_nor_prefect(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    show = (
        "import sys; from flows.cli import app\n"
        "for command in (['--help'], ['models'], ['status', '-C', sys.argv[1]]):\n"
        "    try:\n"
        "        app(command)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('loaded:', *sorted({'torch', 'ray', 'prefect'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", show, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "Model families" in result.stdout and "Nothing registered yet" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "loaded:"


def test_status_and_lineage_read_a_sqlite_store_without_mlflow_and_see_every_write(
    tmp_path, new_mlflow_store
):
    """No read of a SQLite store imports MLflow, and another program's write is seen at once."""
    from components.registry.store import client_for, resolve_tracking_uri

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    new_mlflow_store(tmp_path / "mlflow.db")
    client = client_for(resolve_tracking_uri(None, tmp_path))
    client.create_registered_model("digits.vae")
    for value in ("71.5", "70.25"):
        client.create_model_version(
            "digits.vae",
            (tmp_path / "weights").as_uri(),
            tags={"primary_metric": "nll_bound", "metric.nll_bound": value, "data_version": "d" * 32},
        )
    client.set_registered_model_alias("digits.vae", "champion", "1")
    read = (
        "import json, sys; from flows.cli import app\n"
        "try:\n"
        "    app(sys.argv[2:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps('mlflow' in sys.modules))\n"
    )

    def genpipe(*arguments: str) -> tuple[str, bool]:
        result = subprocess.run(
            [sys.executable, "-c", read, "-", *arguments, "-C", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        *shown, imported = result.stdout.strip().splitlines()
        return "\n".join(shown), imported == "true"

    first, imported = genpipe("status", "--json")
    assert not imported and '"champion": "1"' in first and '"value": "71.5"' in first
    client.set_registered_model_alias("digits.vae", "champion", "2")  # as the MLflow UI would
    moved, imported = genpipe("status", "--json")
    assert not imported and '"champion": "2"' in moved and '"value": "70.25"' in moved

    lineage, imported = genpipe("lineage", "digits.vae", "2")
    assert not imported and "d" * 32 in lineage
    client.set_model_version_tag("digits.vae", "2", "data_version", "e" * 32)
    lineage, imported = genpipe("lineage", "digits.vae", "2")
    assert not imported and "e" * 32 in lineage
    missing, imported = genpipe("lineage", "digits.vae", "9")
    assert not imported and "digits.vae v9" in missing
