"""MLflow tracking: one parent run per pipeline run, one nested run per model.

Everything goes through an explicit `MlflowClient` (no fluent, process-global active run), so
several models can log from concurrent threads safely.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from components.evaluation.evaluate import Evaluation
from components.evaluation.images import save_grid
from components.registry.pyfunc import write_model_package

# Defined where `genpipe status` reads them without torch; the flow imports them from here too.
from components.registry.store import client_for as client_for
from components.registry.store import resolve_tracking_uri as resolve_tracking_uri

MAX_PARAM_LENGTH = 6000


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # Artifacts live beside the database, not in whatever directory the process started in.
        database = Path(client.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlruns").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def _flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: str(value)[:MAX_PARAM_LENGTH]}


@dataclass
class RunLogger:
    """Writes one model's run: params, curves, evaluation, pictures, data version and weights."""

    client: MlflowClient
    run_id: str

    @classmethod
    def start(
        cls,
        client: MlflowClient,
        experiment: str,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> RunLogger:
        run_tags = dict(tags or {})
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, experiment), run_name=name, tags=run_tags)
        return cls(client, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        flat = _flatten("", params)
        items = [Param(key, value) for key, value in sorted(flat.items())]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        entries = [Metric(k, float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        for start in range(0, len(entries), 500):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 500])

    def log_history(self, history: list[dict[str, float]]) -> None:
        """Per-epoch training curves, one MLflow step per epoch."""
        for record in history:
            epoch = int(record.get("epoch", 0))
            self.log_metrics(
                {f"train/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, epoch
            )

    def log_dataset(self, images: np.ndarray, *, name: str, version: str, source: str, context: str) -> None:
        dataset = mlflow.data.from_numpy(images, source=source, name=name, digest=version[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])])

    def log_evaluation(self, evaluation: Evaluation) -> None:
        self.log_metrics({f"test/{k}": v for k, v in evaluation.metrics.items()})
        self.set_tags(
            {"feature_extractor": evaluation.extractor_id, "primary_metric": evaluation.primary_metric}
        )
        with tempfile.TemporaryDirectory() as tmp:
            for name, (images, columns) in evaluation.images.items():
                save_grid(images, Path(tmp) / f"{name}.png", columns)
            self.client.log_artifacts(self.run_id, tmp, "images")

    def log_model_package(self, model_dir: Path) -> tuple[str, str]:
        """Upload the weights as a data-only pyfunc model (no optimiser state).

        Returns the registry's source URI and the weights' SHA-256.
        """
        with tempfile.TemporaryDirectory(prefix="genpipe-package-") as tmp:
            digest = write_model_package(Path(model_dir), Path(tmp))
            self.client.log_artifacts(self.run_id, tmp, "model")
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/model", digest

    @contextmanager
    def fail_on_error(self) -> Iterator[None]:
        """Mark the run FAILED, with the error as a tag, if the block raises; nothing is lost silently."""
        try:
            yield
        except BaseException as err:
            self.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            self.finish("FAILED")
            raise

    def finish(self, status: str = "FINISHED") -> None:
        error = self.client.get_run(self.run_id).data.tags.get("error")
        if status == "FINISHED" and error is not None:
            # A step failed and its retry succeeded: keep the failure, but not as the run's error.
            self.set_tags({"recovered_error": error})
            self.client.delete_tag(self.run_id, "error")
        self.client.set_terminated(self.run_id, status=status)
