"""Promotion policy, rollback, manual promotion, production copies and tamper checks on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from components.config import load_params
from components.evaluation.evaluate import Evaluation
from components.models import create_model
from components.models.model_dir import save_model_dir
from components.registry.pyfunc import TamperedArtifact
from components.registry.tracking import RunLogger
from components.registry.versions import (
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

NAME = "digits.vae"
DATA = "data-v1"
EXTRACTOR = "featurizer-abc"
SETTINGS = {
    "num_samples": 1000,
    "kid_subset_size": 100,
    "importance_samples": 100,
    "batch_size": 500,
    "seed": 0,
    "feature_extractor": EXTRACTOR,
    "splits": ["val", "test"],
    "prepared_data": DATA,
    "code": "code-v1",
}

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def rule(**changed) -> PromotionPolicy:
    """The rule of params.yaml's `promotion.default` for the VAE's metric, with `changed` over it."""
    return PromotionPolicy(
        **{"metric": "nll_bound", "direction": "minimize", "min_improvement": 0.0, "guards": {}, **changed}
    )


@pytest.fixture
def client(tmp_path, new_mlflow_store) -> MlflowClient:
    uri = new_mlflow_store(tmp_path / "mlflow.db")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model_dir(create_model("vae", (1, 8, 8), latent_dim=2, channels=4, hidden=8), directory)
    return directory


def evaluation(nll: float, fid: float = 10.0, test_nll: float | None = None, **settings) -> Evaluation:
    """Validation figures `nll` and `fid`; the test split gets `test_nll` (default: `nll` + 1)."""
    test_nll = nll + 1.0 if test_nll is None else test_nll
    metrics = {"val_nll_bound": nll, "test_nll_bound": test_nll, "val_fid": fid, "test_fid": fid}
    return Evaluation(metrics, "nll_bound", EXTRACTOR, settings={**SETTINGS, **settings})


def add_version(client, model_dir, result: Evaluation):
    run = RunLogger.start(client, "tests", "vae")
    source, digest = run.log_model_package(model_dir)
    run.finish()
    return register_version(client, NAME, source, run.run_id, result, DATA, {"weights_sha256": digest})


def judge(client, model_dir, result: Evaluation, policy: PromotionPolicy | None = None, reevaluate=None):
    candidate = add_version(client, model_dir, result)
    decision = decide_promotion(
        client,
        NAME,
        candidate,
        result,
        reevaluate=reevaluate or (lambda v: pytest.fail("champion re-evaluated without need")),
        policy=policy or rule(),
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
    _, decision = judge(client, model_dir, evaluation(28.95), rule(min_improvement=0.1))
    assert not decision.promoted and "not more than 0.1" in decision.reason
    assert champion(client) == "2"


def test_the_validation_split_decides_and_the_test_split_is_only_reported(client, model_dir):
    judge(client, model_dir, evaluation(30.0, test_nll=40.0))
    # Far better on test, slightly worse on validation: the test split must not decide.
    candidate, decision = judge(client, model_dir, evaluation(30.5, test_nll=20.0))
    assert not decision.promoted and champion(client) == "1"
    tags = client.get_model_version(NAME, candidate.version).tags
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.split"] == "val" and tags["promotion.metric"] == "val_nll_bound"
    assert "validation split" in tags["promotion.reason"] and "val_nll_bound" in tags["promotion.reason"]
    assert (
        float(tags["promotion.candidate_value"]) == 30.5 and float(tags["promotion.champion_value"]) == 30.0
    )
    assert float(tags["promotion.candidate_test_value"]) == 20.0
    assert float(tags["promotion.champion_test_value"]) == 40.0
    assert float(tags["metric.test_nll_bound"]) == 20.0  # reported with the version
    # Worse on test, better on validation: promoted.
    _, decision = judge(client, model_dir, evaluation(29.5, test_nll=50.0))
    assert decision.promoted and champion(client) == "3"


def test_a_policy_metric_that_names_a_split_is_refused():
    params = load_params(PARAMS, {"promotion": {"vae": {"metric": "test_nll_bound"}}})
    with pytest.raises(ValueError, match=r"promotion\.vae.*'test_nll_bound'.*'nll_bound'.*validation"):
        PromotionPolicy.from_params(params, "vae", "nll_bound")
    assert PromotionPolicy.from_params(load_params(PARAMS), "vae", "nll_bound").metric == "nll_bound"


def test_a_familys_rule_sets_only_what_differs_from_the_default():
    params = load_params(PARAMS, {"promotion": {"vae": {"min_improvement": 0.5}}})
    vae, gan = (PromotionPolicy.from_params(params, family, "x") for family in ("vae", "gan"))
    assert (vae.min_improvement, vae.direction) == (0.5, "minimize") and gan.min_improvement == 0.0


def test_a_bit_identical_retrain_does_not_win_by_rounding(client, model_dir):
    value = 29.99999961234  # rounds to "30" at 6 significant digits
    judge(client, model_dir, evaluation(value))
    assert float(client.get_model_version(NAME, "1").tags["metric.val_nll_bound"]) == value
    _, decision = judge(client, model_dir, evaluation(value))
    assert not decision.promoted and "not better" in decision.reason and champion(client) == "1"


def test_guard_metric_that_gets_worse_blocks_promotion(client, model_dir):
    judge(client, model_dir, evaluation(30.0, fid=10.0))
    policy = rule(guards={"fid": "minimize"})
    _, decision = judge(client, model_dir, evaluation(25.0, fid=12.0), policy)
    assert not decision.promoted and "guard" in decision.reason and "val_fid" in decision.reason
    _, decision = judge(client, model_dir, evaluation(25.0, fid=9.0), policy)
    assert decision.promoted


def test_a_champion_evaluated_differently_is_re_evaluated_first(client, model_dir):
    judge(client, model_dir, evaluation(30.0))  # v1, under SETTINGS
    for setting, candidate_value in {
        "num_samples": 2000,  # the champion was evaluated with 1000
        "prepared_data": "data-v2",
        "feature_extractor": "inception-123",
        "seed": 1,
        "importance_samples": 1000,
        "splits": ["val"],
        "code": "code-v2",
    }.items():
        seen = []

        def reevaluate(version, seen=seen, setting=setting, value=candidate_value):
            seen.append(str(version.version))
            # Under the candidate's settings the champion does better than its recorded score says.
            return evaluation(20.0, **{setting: value})

        _, decision = judge(
            client, model_dir, evaluation(25.0, **{setting: candidate_value}), reevaluate=reevaluate
        )
        assert seen == ["1"], setting
        assert not decision.promoted and decision.champion_value == 20.0, setting
        assert "re-evaluated" in decision.reason and setting in decision.reason, decision.reason
    assert champion(client) == "1"


def test_a_re_evaluation_under_other_settings_than_the_candidates_is_an_error(client, model_dir):
    judge(client, model_dir, evaluation(30.0, num_samples=1000))
    with pytest.raises(RuntimeError, match="num_samples"):
        judge(
            client,
            model_dir,
            evaluation(25.0, num_samples=2000),
            reevaluate=lambda version: evaluation(20.0, num_samples=1000),
        )


def test_manual_promotion_rollback_and_production_copy(client, model_dir, tmp_path, new_mlflow_store):
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
    other_uri = new_mlflow_store(tmp_path / "production.db")
    other = MlflowClient(tracking_uri=other_uri, registry_uri=other_uri)
    remote = publish_to_production(client, NAME, "3", production=other)
    assert remote.tags["source_model"] == NAME and remote.tags["weights_sha256"]
    assert isinstance(load_version(other, remote), torch.nn.Module)


def test_a_retried_promotion_and_publication_repeat_nothing(client, model_dir, tmp_path, new_mlflow_store):
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
        reevaluate=lambda v: pytest.fail("champion re-evaluated without need"),
        policy=rule(),
    )
    assert again == first
    assert champion(client) == "2"
    assert client.get_registered_model(NAME).tags["champion_history"] == "1,2"

    other_uri = new_mlflow_store(tmp_path / "production.db")
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


def test_a_champion_promoted_on_another_metric_is_judged_on_the_candidates_from_its_record(client, model_dir):
    """A champion promoted on nats per image, before 8-bit models were judged in bits/dim, meets a
    candidate whose gate is bits/dim: its recorded bits/dim decide, with no re-evaluation."""

    def scored(primary: str, nats: float, bits: float) -> Evaluation:
        figures = {"nll_bound": nats, "bits_per_dim_bound": bits, "fid": 10.0}
        metrics = {f"{split}_{name}": value for split in ("val", "test") for name, value in figures.items()}
        return Evaluation(metrics, primary, EXTRACTOR, settings=SETTINGS)

    judge(client, model_dir, scored("nll_bound", 4000.0, 2.0))
    # Made-up figures that disagree: worse in nats, better in bits/dim, so only the gate's metric decides.
    candidate, decision = judge(
        client, model_dir, scored("bits_per_dim_bound", 4100.0, 1.9), rule(metric="bits_per_dim_bound")
    )
    assert decision.promoted and champion(client) == "2"
    tags = client.get_model_version(NAME, candidate.version).tags
    assert tags["promotion.metric"] == "val_bits_per_dim_bound"
    assert float(tags["promotion.champion_value"]) == 2.0
