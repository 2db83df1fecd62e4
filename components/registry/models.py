"""The model registry: versions, the `challenger` and `champion` aliases, and the promotion rule.

A new version always becomes `challenger`. `champion` moves to it only when it beats the current
champion on the family's primary metric (lower is better) measured on the same data version with
the same feature extractor; when either differs, the champion is re-evaluated first. Every
decision, with both figures and the reason, is written to the candidate's tags.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.evaluation.evaluate import Evaluation
from components.models import GenerativeModel
from components.training.trainer import load_model_dir

CHAMPION, CHALLENGER = "champion", "challenger"
DATA_VERSION_TAG, EXTRACTOR_TAG, PRIMARY_TAG = "data_version", "feature_extractor", "primary_metric"


def registered_name(dataset: str, model: str) -> str:
    """Registered model name: the dataset and the family, e.g. `digits.vae`."""
    return f"{dataset}.{model}"


def register_version(
    client: MlflowClient,
    name: str,
    source: str,
    run_id: str,
    evaluation: Evaluation,
    data_version: str,
    extra_tags: dict[str, str] | None = None,
) -> ModelVersion:
    """Create a version of `name` from `source`, tag it with its scores and make it the challenger."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
            raise
    tags = {
        **{f"metric.{k}": f"{v:.6g}" for k, v in evaluation.metrics.items()},
        PRIMARY_TAG: evaluation.primary_metric,
        EXTRACTOR_TAG: evaluation.extractor_id,
        DATA_VERSION_TAG: data_version,
        **(extra_tags or {}),
    }
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


@dataclass
class Decision:
    promoted: bool
    reason: str
    candidate_value: float
    champion_value: float | None
    champion_version: str | None


def _alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def decide_promotion(
    client: MlflowClient,
    name: str,
    candidate: ModelVersion,
    evaluation: Evaluation,
    data_version: str,
    reevaluate: Callable[[ModelVersion], Evaluation],
    min_improvement: float = 0.0,
) -> Decision:
    """Move `champion` to `candidate` if it is better by more than `min_improvement`; record why."""
    metric, value = evaluation.primary_metric, evaluation.primary_value
    champion = _alias_version(client, name, CHAMPION)
    if champion is None:
        decision = Decision(True, "first version: no champion yet", value, None, None)
    else:
        comparable = (
            champion.tags.get(DATA_VERSION_TAG) == data_version
            and champion.tags.get(EXTRACTOR_TAG) == evaluation.extractor_id
            and champion.tags.get(PRIMARY_TAG) == metric
        )
        if comparable:
            champion_value, basis = float(champion.tags[f"metric.{metric}"]), "its recorded score"
        else:
            champion_value = reevaluate(champion).metrics[metric]
            basis = f"re-evaluated on data {data_version[:12]} with {evaluation.extractor_id}"
        better = value < champion_value - min_improvement
        verdict = "better" if better else "not better"
        decision = Decision(
            better,
            f"{metric} {value:.4f} vs champion v{champion.version} {champion_value:.4f} ({basis}): {verdict}"
            + (f" by more than {min_improvement}" if min_improvement else ""),
            value,
            champion_value,
            champion.version,
        )
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
    for key, tag in {
        "promotion.decision": "promoted" if decision.promoted else "rejected",
        "promotion.reason": decision.reason,
        "promotion.champion_value": ""
        if decision.champion_value is None
        else f"{decision.champion_value:.6g}",
    }.items():
        client.set_model_version_tag(name, candidate.version, key, tag)
    return decision


def load_version(client: MlflowClient, version: ModelVersion, device: str = "cpu") -> GenerativeModel:
    """Download a registered version's weights and rebuild the model (no pickled code is loaded)."""
    with tempfile.TemporaryDirectory(prefix="genpipe-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        return load_model_dir(Path(local), device=device)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    version = _alias_version(client, name, alias)
    if version is None:
        known = [m.name for m in client.search_registered_models()]
        raise LookupError(
            f"registered model {name!r} has no version with alias {alias!r}"
            + (f"; registered models: {', '.join(sorted(known))}" if known else "; nothing is registered yet")
        )
    return version


def registry_status(client: MlflowClient) -> list[dict[str, str]]:
    """One row per registered model: champion version, its primary metric, data version, when."""
    rows = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        champion = _alias_version(client, model.name, CHAMPION)
        if champion is None:
            rows.append(
                {
                    "model": model.name,
                    "champion": "-",
                    "metric": "-",
                    "value": "-",
                    "data_version": "-",
                    "registered": "-",
                }
            )
            continue
        metric = champion.tags.get(PRIMARY_TAG, "")
        rows.append(
            {
                "model": model.name,
                "champion": str(champion.version),
                "metric": metric,
                "value": champion.tags.get(f"metric.{metric}", "-"),
                "data_version": champion.tags.get(DATA_VERSION_TAG, "-"),
                "registered": _timestamp(champion.creation_timestamp),
            }
        )
    return rows


def _timestamp(milliseconds: int) -> str:
    return dt.datetime.fromtimestamp(milliseconds / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
