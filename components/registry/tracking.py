"""MLflow tracking: one parent run per pipeline run, one nested run per model.

Everything goes through an explicit `MlflowClient` (no fluent, process-global active run), so
several models can log from concurrent threads safely.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from components.evaluation.evaluate import Evaluation
from components.evaluation.images import image_grid, save_grid
from components.registry.pyfunc import write_model_package

MAX_PARAM_LENGTH = 6000
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI shows GenAI pages (traces, token usage) or model-training pages (runs, registry)
# by its workflow switch: the URL's `workflowType`, else the browser's last choice, GenAI at first.
# Links genpipe prints carry the switch; the experiment's kind tag is what other MLflow UIs read.
UI_WORKFLOW = "workflowType=machine_learning"
IMAGES_DIR = "images"
SAMPLES_ARTIFACT = f"{IMAGES_DIR}/samples.png"  # the grid of a model's samples, logged by its evaluation
PROGRESS_SAMPLES_KEY = "training_samples"  # the image key of the grids drawn during training, by epoch

# The monitor announces itself (and the lack of a GPU) once per model; only its problems matter.
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)


def is_server(tracking_uri: str) -> bool:
    """Whether the store is a tracking server (which already serves the UI) rather than a local file."""
    return tracking_uri.startswith(("http://", "https://"))


def ui_server_command(tracking_uri: str, host: str, port: int, artifacts_dir: Path) -> tuple[list[str], dict]:
    """The `mlflow server` command line and environment that serve a local store's UI in a browser."""
    command = [
        *(sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", tracking_uri, "--artifacts-destination", str(artifacts_dir)),
    ]
    # Its job runner (for GenAI jobs genpipe does not use) costs ~40 s of CPU at start-up.
    return command, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created as a model-training experiment (older ones are marked so)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    artifact_location = None
    if client.tracking_uri.startswith("sqlite:///"):
        # Artifacts live beside the database, not in whatever directory the process started in.
        database = Path(client.tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (database.parent / "mlruns").resolve().as_uri()
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def ui_experiment_url(ui_url: str, experiment: str) -> str:
    """The MLflow UI page of an experiment's runs (by id), in the UI's model-training view."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment}/runs?{UI_WORKFLOW}"


def ui_model_url(ui_url: str, name: str) -> str:
    """The MLflow UI page of a registered model, with its versions and aliases."""
    return f"{ui_url.rstrip('/')}/#/models/{quote(name, safe='')}?{UI_WORKFLOW}"


def ui_artifact_path(experiment: str, run_id: str, path: str) -> str:
    """A link, relative to the UI's own page, to a run's artifact (e.g. in a version description)."""
    return f"#/experiments/{experiment}/runs/{run_id}/artifactPath/{path}?{UI_WORKFLOW}"


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

    def log_progress_samples(self, grids: dict[int, np.ndarray]) -> None:
        """Sample grids drawn during training, one MLflow image step per epoch (the UI's step slider)."""
        for epoch, images in sorted(grids.items()):
            picture = image_grid(images.astype(np.float32) / 255)
            self.client.log_image(self.run_id, picture, key=PROGRESS_SAMPLES_KEY, step=epoch)

    def log_dataset(self, images: np.ndarray, *, name: str, version: str, source: str, context: str) -> None:
        dataset = mlflow.data.from_numpy(images, source=source, name=name, digest=version[:36])
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [tag])])

    def log_evaluation(self, evaluation: Evaluation) -> None:
        self.log_metrics({f"evaluation/{k}": v for k, v in evaluation.metrics.items()})
        self.set_tags(
            {
                "feature_extractor": evaluation.extractor_id,
                "primary_metric": evaluation.gate_metric,
                "evaluation_settings": json.dumps(evaluation.settings, sort_keys=True),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            for name, (images, columns) in evaluation.images.items():
                save_grid(images, Path(tmp) / f"{name}.png", columns)
            self.client.log_artifacts(self.run_id, tmp, IMAGES_DIR)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text file (e.g. an HTML page) as an artifact of the run."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_model_package(self, model_dir: Path) -> tuple[str, str]:
        """Upload the weights as a data-only pyfunc model (no optimiser state).

        Returns the registry's source URI and the weights' SHA-256.
        """
        with tempfile.TemporaryDirectory(prefix="genpipe-package-") as tmp:
            digest = write_model_package(Path(model_dir), Path(tmp))
            self.client.log_artifacts(self.run_id, tmp, "model")
        return f"{self.client.get_run(self.run_id).info.artifact_uri}/model", digest

    @contextmanager
    def system_metrics(self, interval_s: float) -> Iterator[None]:
        """Log this host's CPU, memory, disk, network (and GPU, where NVML finds one) every
        `interval_s` as the run's `system/*` metrics while the block runs."""
        monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=interval_s, tracking_uri=self.client.tracking_uri
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

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
