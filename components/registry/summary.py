"""What the report page shows, read from the registry: per family its champion and primary score,
the decision on its latest version, its sample grid beside real test images, its score across
versions and the training curves of its latest version."""

from __future__ import annotations

import datetime as dt
import io
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components.data.prepared import PreparedData
from components.evaluation.evaluate import GRID_SIZE
from components.evaluation.images import image_grid
from components.models.factory import model_class
from components.registry.tracking import SAMPLES_ARTIFACT
from components.registry.versions import CHAMPION, DATA_VERSION_TAG, PRIMARY_TAG, MetricInfo, metric_info

TRAINING_CURVE_PREFIX = "train/"


@dataclass
class VersionScore:
    version: int
    value: float
    decision: str  # "promoted", "rejected", "manual" or "" (not decided yet)


@dataclass
class FamilySummary:
    name: str  # registered name, e.g. digits.vae
    family: str
    metric: str
    info: MetricInfo
    champion: int | None
    champion_value: float | None
    latest: int
    decision: str
    reason: str
    data_version: str
    samples_version: int  # whose grid `samples_png` is: the champion's, else the latest version's
    samples_png: bytes | None
    real_png: bytes | None
    scores: list[VersionScore] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # latest version, per epoch


@dataclass
class RegistrySummary:
    tracking_uri: str
    generated: str
    families: list[FamilySummary]


def png_bytes(images: np.ndarray) -> bytes:
    """N x C x H x W images in [0, 1] as one PNG grid, tiled as the logged sample grids are."""
    buffer = io.BytesIO()
    image_grid(images).save(buffer, format="PNG")
    return buffer.getvalue()


def real_test_images(prepared: PreparedData | None) -> Callable[[str], bytes | None]:
    """For a family: a grid of real test images as that family is evaluated on them (binarised or not)."""

    def grid(family: str) -> bytes | None:
        if prepared is None:
            return None
        try:
            kind = model_class(family).data_kind_for(prepared.image_shape, {})
        except ValueError:  # a family that no longer exists in the code
            return None
        return png_bytes(prepared.test.head(kind, GRID_SIZE))

    return grid


def _artifact_bytes(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    with tempfile.TemporaryDirectory(prefix="genpipe-report-") as tmp:
        try:
            return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()
        except (MlflowException, OSError):  # a run whose evaluation never logged its grid
            return None


def _value(tags: dict[str, str], metric: str) -> float:
    return float(tags.get(f"metric.{metric}", "nan"))


def _curves(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(TRAINING_CURVE_PREFIX))
    return {
        key.removeprefix(TRAINING_CURVE_PREFIX): [
            (m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
        for key in keys
    }


def family_summary(
    client: MlflowClient, name: str, real_images: Callable[[str], bytes | None]
) -> FamilySummary | None:
    """One registered model's row of the report; None when it has no versions."""
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        return None
    champion_version = client.get_registered_model(name).aliases.get(CHAMPION)
    champion = next((v for v in versions if str(v.version) == str(champion_version)), None)
    latest = versions[-1]
    shown = champion or latest
    metric = shown.tags.get(PRIMARY_TAG, "")
    family = latest.tags.get("model", name.rsplit(".", 1)[-1])
    return FamilySummary(
        name=name,
        family=family,
        metric=metric,
        info=metric_info(metric),
        champion=int(champion.version) if champion else None,
        champion_value=_value(champion.tags, metric) if champion else None,
        latest=int(latest.version),
        decision=latest.tags.get("promotion.decision", ""),
        reason=latest.tags.get("promotion.reason", ""),
        data_version=shown.tags.get(DATA_VERSION_TAG, ""),
        samples_version=int(shown.version),
        samples_png=_artifact_bytes(client, shown.run_id, SAMPLES_ARTIFACT),
        real_png=real_images(family),
        scores=[
            VersionScore(int(v.version), _value(v.tags, metric), v.tags.get("promotion.decision", ""))
            for v in versions
            if math.isfinite(_value(v.tags, metric))
        ],
        curves=_curves(client, latest.run_id),
    )


def registry_summary(
    client: MlflowClient, production_prefix: str, real_images: Callable[[str], bytes | None]
) -> RegistrySummary:
    """Every registered family of the registry (production copies left out), in name order."""
    names = sorted(
        m.name for m in client.search_registered_models() if not m.name.startswith(production_prefix)
    )
    families = [s for s in (family_summary(client, n, real_images) for n in names) if s is not None]
    generated = dt.datetime.now(tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return RegistrySummary(client.tracking_uri, generated, families)
