"""The model registry: versions, the `challenger` and `champion` aliases, and the promotion rule.

A new version always becomes `challenger`. `champion` moves to it only when it beats the current
champion on the family's primary metric on the validation split; the test split is reported for
both and never decides. The two figures are compared only when both evaluations ran under
identical settings (prepared data, feature extractor, sample counts, seed, splits, code): when
anything differs, the champion is re-evaluated under the candidate's settings first. Figures are
recorded and compared unrounded. Every decision, with the figures and the reason, is written to
the candidate's tags.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.config import Params
from components.evaluation.evaluate import GATE_SPLIT, REPORT_SPLIT, SPLITS, Evaluation
from components.models import GenerativeModel
from components.models.model_dir import load_model_dir
from components.registry.pyfunc import DATA_DIR, TamperedArtifact, verify
from components.registry.store import CHALLENGER, CHAMPION, DATA_VERSION_TAG, PRIMARY_TAG
from components.registry.store import alias_version as _alias_version
from components.registry.store import registered_name as registered_name  # the flow imports it from here
from components.registry.tracking import SAMPLES_ARTIFACT, experiment_id, ui_artifact_path

EXTRACTOR_TAG = "feature_extractor"
WEIGHTS_TAG = "weights_sha256"
EVALUATION_TAG = "evaluation_settings"
SPLIT_NAMES = {GATE_SPLIT: "validation", REPORT_SPLIT: "test"}
HISTORY_TAG = "champion_history"


@dataclass(frozen=True)
class MetricInfo:
    """How a score reads to a person: its name, its unit, and the split it is measured on."""

    label: str
    unit: str = ""
    split: str = ""

    def text(self, value: float) -> str:
        unit = f" {self.unit}" if self.unit else ""
        split = f" ({self.split} split)" if self.split else ""
        return f"{self.label} {value:.4g}{unit}{split}"


# What each score is; the recorded names carry the split they are measured on (`val_fid`, `test_nll`).
METRICS = {
    "nll": MetricInfo("NLL", "nats/image"),
    "nll_bound": MetricInfo("NLL bound", "nats/image"),
    "negative_elbo": MetricInfo("negative ELBO", "nats/image"),
    "bits_per_dim": MetricInfo("NLL", "bits/dim"),
    "bits_per_dim_bound": MetricInfo("NLL bound", "bits/dim"),
    "fid": MetricInfo("FID"),
    "kid_mean": MetricInfo("KID"),
}


def metric_info(metric: str) -> MetricInfo:
    """What `metric` (e.g. `val_fid`) is and its split; a metric genpipe does not know reads as its name."""
    split, _, base = metric.partition("_")
    if split not in SPLIT_NAMES:
        return MetricInfo(metric)
    return replace(METRICS.get(base, MetricInfo(base)), split=SPLIT_NAMES[split])


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model `name` unless it exists (also when a concurrent run just created it)."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise


def register_version(
    client: MlflowClient,
    name: str,
    source: str,
    run_id: str,
    evaluation: Evaluation,
    data_version: str,
    extra_tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Make the version of `name` trained by `run_id` the challenger, creating it on the first call.

    Metrics are tagged unrounded (`repr` round-trips a float exactly), with the settings they were
    computed under. Safe to repeat: a retried task finds the version its earlier attempt created,
    even when that attempt never saw the server's reply.
    """
    ensure_registered_model(client, name)
    tags = {
        **{f"metric.{k}": repr(float(v)) for k, v in evaluation.metrics.items()},
        PRIMARY_TAG: evaluation.gate_metric,
        EXTRACTOR_TAG: evaluation.extractor_id,
        DATA_VERSION_TAG: data_version,
        EVALUATION_TAG: _settings_tag(evaluation.settings),
        **(extra_tags or {}),
    }
    version = _create_once(
        client,
        name,
        f"run_id = '{run_id}'",
        lambda: client.create_model_version(name, source, run_id=run_id, tags=tags),
    )
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def _create_once(
    client: MlflowClient, name: str, identity: str, create: Callable[[], object]
) -> ModelVersion:
    """The version of `name` matching the search clause `identity`, made by `create()` unless an
    earlier attempt made it.

    MLflow's HTTP client re-sends a create request whose reply was lost, and the server then creates
    the version again: the first is kept and the copies, which no alias can point at yet, deleted.
    """

    def made() -> list[ModelVersion]:
        versions = client.search_model_versions(f"name = '{name}' and {identity}")
        return sorted(versions, key=lambda v: int(v.version))

    if not made():
        create()
    version, *copies = made()
    for copy in copies:
        client.delete_model_version(name, copy.version)
    return version


def _settings_tag(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


@dataclass
class PromotionPolicy:
    """How a family's candidate is judged against its champion (params.yaml `promotion`).

    Metric names carry no split (`fid`, `nll_bound`): the gate always reads them on the validation split.
    """

    metric: str
    direction: str  # "minimize" | "maximize"
    min_improvement: float
    guards: dict[str, str]  # metric -> direction; must not get worse

    @classmethod
    def from_params(cls, params: Params, model: str, primary_metric: str) -> PromotionPolicy:
        """`promotion.default` with what `promotion.<model>` sets over it."""
        merged: dict = {}
        for rule in (params.promotion.get("default"), params.promotion.get(model)):
            if rule is not None:
                merged.update({key: value for key, value in rule.model_dump().items() if value is not None})
        unset = [key for key in ("direction", "min_improvement") if key not in merged]
        if unset:
            raise ValueError(
                f"params.yaml promotion: {', '.join(unset)} set neither in `default` nor for {model!r}"
            )
        policy = cls(
            metric=merged.get("metric") or primary_metric,
            direction=merged["direction"],
            min_improvement=merged["min_improvement"],
            guards=merged.get("guards", {}),
        )
        for metric in (policy.metric, *policy.guards):
            split = next((s for s in SPLITS if metric.startswith(f"{s}_")), None)
            if split is not None:
                raise ValueError(
                    f"params.yaml promotion.{model}: metric {metric!r} names a split; name it without "
                    f"one ({metric.removeprefix(f'{split}_')!r}): the gate always decides on the validation split"
                )
        return policy

    @staticmethod
    def gain(candidate: float, champion: float, direction: str) -> float:
        """How much better the candidate is (positive) or worse (negative)."""
        return champion - candidate if direction == "minimize" else candidate - champion


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate_value: float  # the gate metric on the validation split
    champion_value: float | None
    champion_version: str | None


def _recorded_metrics(version: ModelVersion) -> dict[str, float]:
    return {k.removeprefix("metric."): float(v) for k, v in version.tags.items() if k.startswith("metric.")}


def _gate(metric: str) -> str:
    return f"{GATE_SPLIT}_{metric}"


def _report(metric: str) -> str:
    return f"{REPORT_SPLIT}_{metric}"


def decide_promotion(
    client: MlflowClient,
    name: str,
    candidate: ModelVersion,
    evaluation: Evaluation,
    reevaluate: Callable[[ModelVersion], Evaluation],
    policy: PromotionPolicy,
) -> Decision:
    """Move `champion` to `candidate` if the policy says it is better; record the decision and why.

    The decision is recorded on the candidate before the alias moves, so a retried call carries out
    the same decision instead of judging the candidate against itself.
    """
    decision = _recorded_decision(candidate, evaluation.metrics[_gate(policy.metric)])
    if decision is None:
        decision, report = _judge(client, name, evaluation, reevaluate, policy)
        for key, tag in {
            "promotion.decision": "promoted" if decision.promoted else "rejected",
            "promotion.reason": decision.reason,
            "promotion.split": GATE_SPLIT,
            "promotion.metric": _gate(policy.metric),
            "promotion.candidate_value": repr(decision.candidate_value),
            "promotion.champion_value": ""
            if decision.champion_value is None
            else repr(decision.champion_value),
            "promotion.champion_version": decision.champion_version or "",
            **report,
        }.items():
            client.set_model_version_tag(name, candidate.version, key, tag)
    if decision.promoted:
        move_champion(client, name, str(candidate.version))
    return decision


def _recorded_decision(candidate: ModelVersion, value: float) -> Decision | None:
    tags = candidate.tags
    if tags.get("promotion.decision") not in ("promoted", "rejected"):
        return None
    champion_value = tags.get("promotion.champion_value")
    return Decision(
        tags["promotion.decision"] == "promoted",
        tags.get("promotion.reason", ""),
        value,
        float(champion_value) if champion_value else None,
        tags.get("promotion.champion_version") or None,
    )


def _differing_settings(recorded: str | None, current: dict) -> list[str]:
    """Which evaluation settings of the champion (its tag) differ from the candidate's."""
    if recorded is None:
        return ["not recorded"]
    before = json.loads(recorded)
    return sorted(key for key in set(before) | set(current) if before.get(key) != current.get(key))


def _champion_metrics(
    champion: ModelVersion, evaluation: Evaluation, reevaluate: Callable[[ModelVersion], Evaluation]
) -> tuple[dict[str, float], str]:
    """The champion's metrics under the candidate's evaluation settings, and how they were obtained."""
    differing = _differing_settings(champion.tags.get(EVALUATION_TAG), evaluation.settings)
    if not differing:
        return _recorded_metrics(champion), "recorded under the same evaluation settings"
    again = reevaluate(champion)
    if again.settings != evaluation.settings:
        raise RuntimeError(
            f"{champion.name} v{champion.version} was re-evaluated under other settings than the "
            f"candidate's: {_differing_settings(_settings_tag(again.settings), evaluation.settings)}"
        )
    return again.metrics, f"re-evaluated first, as its evaluation differed in {', '.join(differing)}"


def _judge(
    client: MlflowClient,
    name: str,
    evaluation: Evaluation,
    reevaluate: Callable[[ModelVersion], Evaluation],
    policy: PromotionPolicy,
) -> tuple[Decision, dict[str, str]]:
    """The decision on the validation split, and the test figures of both as report-only tags."""
    gate = _gate(policy.metric)
    value = evaluation.metrics[gate]
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        return Decision(True, "first version: no champion yet", value, None, None), {}
    champion_metrics, basis = _champion_metrics(champion, evaluation, reevaluate)
    champion_value = champion_metrics[gate]
    gain = policy.gain(value, champion_value, policy.direction)
    worse_guards = [
        f"{_gate(guard)} {evaluation.metrics[_gate(guard)]:.4g} vs {champion_metrics[_gate(guard)]:.4g}"
        for guard, direction in policy.guards.items()
        if policy.gain(evaluation.metrics[_gate(guard)], champion_metrics[_gate(guard)], direction) < 0
    ]
    if gain <= policy.min_improvement:
        verdict = (
            "not better" if gain <= 0 else f"better by {gain:.4g}, not more than {policy.min_improvement}"
        )
    elif worse_guards:
        verdict = f"better, but guard metric(s) got worse: {'; '.join(worse_guards)}"
    else:
        verdict = "better"
    report_metric = _report(policy.metric)
    report = {
        f"promotion.{role}_{REPORT_SPLIT}_value": repr(metrics[report_metric])
        for role, metrics in (("candidate", evaluation.metrics), ("champion", champion_metrics))
        if report_metric in metrics
    }
    decision = Decision(
        verdict == "better",
        f"decided on the {SPLIT_NAMES[GATE_SPLIT]} split: {gate} {value:.4f} vs champion "
        f"v{champion.version} {champion_value:.4f} ({basis}): {verdict}",
        value,
        champion_value,
        str(champion.version),
    )
    return decision, report


def describe_version(client: MlflowClient, name: str, version: str, decision: Decision) -> str:
    """Write what a version is in two lines (family, data, primary score, promotion) as its description."""
    found = client.get_model_version(name, version)
    tags = found.tags
    metric = tags.get(PRIMARY_TAG, "")
    value = float(tags.get(f"metric.{metric}", "nan"))
    experiment = client.get_run(found.run_id).info.experiment_id
    outcome = "promoted to champion" if decision.promoted else "not promoted"
    description = (
        f"**{tags.get('model', name)}** trained on data version `{tags.get(DATA_VERSION_TAG, '?')[:12]}`: "
        f"{metric_info(metric).text(value)}, lower is better.\n\n"
        f"{outcome.capitalize()}: {decision.reason}. "
        f"[Sample grid]({ui_artifact_path(experiment, found.run_id, SAMPLES_ARTIFACT)})"
    )
    client.update_model_version(name, version, description=description)
    return description


def move_champion(client: MlflowClient, name: str, version: str) -> None:
    """Point `champion` at `version` and remember the move, so a rollback knows where to return."""
    history = [v for v in client.get_registered_model(name).tags.get(HISTORY_TAG, "").split(",") if v]
    client.set_registered_model_alias(name, CHAMPION, version)
    if history[-1:] != [version]:  # a repeated move (a retry) is recorded once
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, version]))


def promote_manually(client: MlflowClient, name: str, version: str, reason: str, user: str) -> None:
    """Make `version` champion by hand; the reason and who did it are recorded on the version."""
    client.get_model_version(name, version)  # raises a clear MlflowException for an unknown version
    move_champion(client, name, version)
    for key, tag in {
        "promotion.decision": "manual",
        "promotion.reason": reason,
        "promotion.by": user,
    }.items():
        client.set_model_version_tag(name, version, key, tag)


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Move `champion` back to the previous champion; returns (from, to) versions."""
    history = [v for v in client.get_registered_model(name).tags.get(HISTORY_TAG, "").split(",") if v]
    if len(history) < 2:
        raise LookupError(f"registered model {name!r} has no previous champion to roll back to")
    current, previous = history[-1], history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    client.set_model_version_tag(name, current, "promotion.rolled_back", "true")
    return current, previous


def publish_to_production(
    client: MlflowClient,
    name: str,
    version: str,
    prefix: str = "prod.",
    production: MlflowClient | None = None,
) -> ModelVersion:
    """Copy a champion to the production registered model, keeping a link to its source version.

    With `production` (another MLflow server), the weights and tags are re-registered there.
    """
    source = client.get_model_version(name, version)
    target_name = f"{prefix}{name}"
    link = {"source_model": name, "source_version": str(version), "source_registry": client.tracking_uri}
    if production is None:
        target = client
        # A copy keeps its source's run, which names it; so a retried publication finds it.
        copied = _create_once(
            client,
            target_name,
            f"run_id = '{source.run_id}'",
            lambda: client.copy_model_version(f"models:/{name}/{version}", target_name),
        )
    else:
        target = production
        ensure_registered_model(production, target_name)
        copied = _create_once(
            production,
            target_name,
            " and ".join(f"tags.{key} = '{value}'" for key, value in link.items()),
            lambda: _reregister(client, source, production, target_name, {**source.tags, **link}),
        )
    for key, value in {**source.tags, **link}.items():
        target.set_model_version_tag(target_name, copied.version, key, value)
    target.set_registered_model_alias(target_name, CHAMPION, copied.version)
    return target.get_model_version(target_name, copied.version)


def _reregister(
    client: MlflowClient, source: ModelVersion, production: MlflowClient, target_name: str, tags: dict
) -> ModelVersion:
    """Register `source` on another server: its files under a run there, its tags with the version."""
    with tempfile.TemporaryDirectory(prefix="genpipe-publish-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        run = production.create_run(experiment_id(production, "genpipe-production"), run_name=target_name)
        production.log_artifacts(run.info.run_id, local, "model")
        production.set_terminated(run.info.run_id)
    return production.create_model_version(
        target_name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=tags
    )


def version_with_tag(client: MlflowClient, name: str, key: str, value: str) -> ModelVersion | None:
    """The newest version of `name` whose tag `key` equals `value` (e.g. the same inputs fingerprint)."""
    versions = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    return max(versions, key=lambda v: int(v.version), default=None)


def load_version(client: MlflowClient, version: ModelVersion, device: str = "cpu") -> GenerativeModel:
    """Download a registered version and rebuild the model; refuses weights that were modified."""
    with tempfile.TemporaryDirectory(prefix="genpipe-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        data_dir = Path(local) / DATA_DIR
        expected = version.tags.get(WEIGHTS_TAG)
        if not expected:
            raise TamperedArtifact(
                f"{version.name} v{version.version}: no {WEIGHTS_TAG} tag to check its weights"
            )
        verify(data_dir, expected)
        return load_model_dir(data_dir, device=device)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    version = _alias_version(client, name, alias)
    if version is None:
        known = [m.name for m in client.search_registered_models()]
        raise LookupError(
            f"registered model {name!r} has no version with alias {alias!r}"
            + (f"; registered models: {', '.join(sorted(known))}" if known else "; nothing is registered yet")
        )
    return version
