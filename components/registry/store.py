"""Where the registry lives and what it holds, read with MLflow alone (no torch): for `genpipe status`."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
DATA_VERSION_TAG, PRIMARY_TAG = "data_version", "primary_metric"


def resolve_tracking_uri(configured: str | None = None, workdir: str | Path = ".") -> str:
    """`configured` (params) > $MLFLOW_TRACKING_URI > a SQLite file in the working directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


def client_for(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def registered_name(dataset: str, model: str) -> str:
    """Registered model name: the dataset and the family, e.g. `digits.vae`."""
    return f"{dataset}.{model}"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def registry_status(client: MlflowClient) -> list[dict[str, str]]:
    """One row per registered model: champion version, its primary metric, data version, when."""
    rows = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        champion = alias_version(client, model.name, CHAMPION)
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
                "value": _shown(champion.tags.get(f"metric.{metric}")),
                "data_version": champion.tags.get(DATA_VERSION_TAG, "-"),
                "registered": _timestamp(champion.creation_timestamp),
            }
        )
    return rows


def _shown(value: str | None) -> str:
    """A recorded (unrounded) figure as people read it."""
    return "-" if value is None else f"{float(value):.6g}"


def _timestamp(milliseconds: int) -> str:
    return dt.datetime.fromtimestamp(milliseconds / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%MZ")
