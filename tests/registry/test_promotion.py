"""Promotion policy, rollback, manual promotion, production copies and tamper checks on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from components.evaluation.evaluate import Evaluation
from components.models import create_model
from components.registry.models import (
    CHALLENGER,
    CHAMPION,
    PromotionPolicy,
    decide_promotion,
    load_version,
    promote_manually,
    publish_to_production,
    register_version,
    rollback,
)
from components.registry.pyfunc import TamperedArtifact
from components.registry.tracking import RunLogger
from components.training.trainer import save_model_dir

NAME = "digits.vae"
DATA = "data-v1"
EXTRACTOR = "featurizer-abc"


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model_dir(create_model("vae", (1, 8, 8), latent_dim=2, channels=4, hidden=8), directory)
    return directory


def evaluation(nll: float, fid: float = 10.0, extractor: str = EXTRACTOR) -> Evaluation:
    return Evaluation({"test_nll_bound": nll, "fid": fid}, "test_nll_bound", extractor)


def add_version(client, model_dir, result: Evaluation, data_version: str = DATA):
    run = RunLogger.start(client, "tests", "vae")
    source, digest = run.log_model_package(model_dir)
    run.finish()
    return register_version(
        client, NAME, source, run.run_id, result, data_version, {"weights_sha256": digest}
    )


def judge(
    client,
    model_dir,
    result: Evaluation,
    policy: PromotionPolicy | None = None,
    data_version=DATA,
    reevaluate=None,
):
    candidate = add_version(client, model_dir, result, data_version)
    decision = decide_promotion(
        client,
        NAME,
        candidate,
        result,
        data_version,
        reevaluate=reevaluate or (lambda v: pytest.fail("champion re-evaluated without need")),
        policy=policy or PromotionPolicy("test_nll_bound"),
    )
    return candidate, decision


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, CHAMPION).version)


def test_first_better_worse_and_equal(client, model_dir):
    _, first = judge(client, model_dir, evaluation(30.0))
    assert first.promoted and champion(client) == "1"
    better, decision = judge(client, model_dir, evaluation(29.0))
    assert decision.promoted and champion(client) == "2"
    assert client.get_model_version(NAME, better.version).tags["promotion.decision"] == "promoted"
    worse, decision = judge(client, model_dir, evaluation(31.0))
    assert not decision.promoted and champion(client) == "2"
    tags = client.get_model_version(NAME, worse.version).tags
    assert tags["promotion.decision"] == "rejected" and "not better" in tags["promotion.reason"]
    assert str(client.get_model_version_by_alias(NAME, CHALLENGER).version) == str(worse.version)
    _, decision = judge(
        client, model_dir, evaluation(28.95), PromotionPolicy("test_nll_bound", min_improvement=0.1)
    )
    assert not decision.promoted and "not more than 0.1" in decision.reason
    assert champion(client) == "2"


def test_guard_metric_that_gets_worse_blocks_promotion(client, model_dir):
    judge(client, model_dir, evaluation(30.0, fid=10.0))
    policy = PromotionPolicy("test_nll_bound", guards={"fid": "minimize"})
    _, decision = judge(client, model_dir, evaluation(25.0, fid=12.0), policy)
    assert not decision.promoted and "guard" in decision.reason and "fid" in decision.reason
    _, decision = judge(client, model_dir, evaluation(25.0, fid=9.0), policy)
    assert decision.promoted


def test_changed_data_re_evaluates_the_champion_first(client, model_dir):
    judge(client, model_dir, evaluation(30.0))
    seen = []

    def reevaluate(version):
        seen.append(str(version.version))
        return evaluation(20.0)  # the champion does better on the new data than its old score says

    _, decision = judge(client, model_dir, evaluation(25.0), data_version="data-v2", reevaluate=reevaluate)
    assert seen == ["1"]
    assert not decision.promoted and decision.champion_value == 20.0 and "re-evaluated" in decision.reason


def test_manual_promotion_rollback_and_production_copy(client, model_dir, tmp_path):
    for nll in (30.0, 29.0, 28.0):
        judge(client, model_dir, evaluation(nll))
    assert champion(client) == "3"
    promote_manually(client, NAME, "1", "known good", "ops")
    assert champion(client) == "1"
    assert client.get_model_version(NAME, "1").tags["promotion.reason"] == "known good"
    assert rollback(client, NAME) == ("1", "3")
    assert champion(client) == "3"
    copied = publish_to_production(client, NAME, "3")
    assert copied.name == f"prod.{NAME}" and copied.tags["source_version"] == "3"
    assert str(client.get_model_version_by_alias(f"prod.{NAME}", CHAMPION).version) == str(copied.version)
    other_uri = f"sqlite:///{tmp_path / 'production.db'}"
    other = MlflowClient(tracking_uri=other_uri, registry_uri=other_uri)
    remote = publish_to_production(client, NAME, "3", production=other)
    assert remote.tags["source_model"] == NAME and remote.tags["weights_sha256"]
    assert isinstance(load_version(other, remote), torch.nn.Module)


def test_a_retried_promotion_and_publication_repeat_nothing(client, model_dir, tmp_path):
    judge(client, model_dir, evaluation(30.0))
    candidate, first = judge(client, model_dir, evaluation(20.0))
    assert first.promoted and champion(client) == "2"
    # What a retried task does after its first attempt moved the alias: read the version afresh and
    # decide again. Judged anew, the candidate would now face itself as champion and be rejected.
    again = decide_promotion(
        client,
        NAME,
        client.get_model_version(NAME, candidate.version),
        evaluation(20.0),
        DATA,
        reevaluate=lambda v: pytest.fail("champion re-evaluated without need"),
        policy=PromotionPolicy("test_nll_bound"),
    )
    assert again == first
    assert champion(client) == "2"
    assert client.get_registered_model(NAME).tags["champion_history"] == "1,2"

    other_uri = f"sqlite:///{tmp_path / 'production.db'}"
    other = MlflowClient(tracking_uri=other_uri, registry_uri=other_uri)
    for target, production in ((client, None), (other, other)):
        first_copy, second_copy = (
            publish_to_production(client, NAME, "2", production=production) for _ in "ab"
        )
        assert first_copy.version == second_copy.version
        (only,) = target.search_model_versions(f"name = 'prod.{NAME}'")
        assert only.tags["source_version"] == "2"


def test_rollback_without_history_is_a_clear_error(client, model_dir):
    judge(client, model_dir, evaluation(30.0))
    with pytest.raises(LookupError, match="no previous champion"):
        rollback(client, NAME)


def test_pyfunc_samples_and_tampered_weights_are_refused(client, model_dir):
    version = add_version(client, model_dir, evaluation(30.0))
    pyfunc = mlflow.pyfunc.load_model(version.source)
    images = pyfunc.predict({"n": 5, "seed": 1})
    assert images.shape == (5, 1, 8, 8) and ((images == 0) | (images == 1)).all()
    assert (pyfunc.predict({"n": 5, "seed": 1}) == images).all()
    weights = Path(version.source.removeprefix("file://")) / "data" / "weights.safetensors"
    tampered = bytearray(weights.read_bytes())
    tampered[-1] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(TamperedArtifact, match="does not match the registered"):
        load_version(client, version)
    with pytest.raises(TamperedArtifact):
        mlflow.pyfunc.load_model(version.source)


def test_a_step_that_failed_then_succeeded_leaves_a_finished_run_that_remembers_the_failure(client):
    run = RunLogger.start(client, "tests", "vae")
    with pytest.raises(OSError), run.fail_on_error():
        raise OSError("artifact store timed out")
    assert client.get_run(run.run_id).info.status == "FAILED"
    run.finish()  # the retried step went through
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED"
    assert "error" not in finished.data.tags
    assert finished.data.tags["recovered_error"] == "OSError: artifact store timed out"
