"""The scheduled deployment of the retraining flow (scheduled retraining)."""

from __future__ import annotations

from pathlib import Path

from prefect.deployments.runner import RunnerDeployment

from flows.retrain import retrain

DEPLOYMENT_NAME = "nightly"


def scheduled_deployment(
    cron: str, project_dir: str = ".", name: str = DEPLOYMENT_NAME, models: list[str] | None = None
) -> RunnerDeployment:
    """A deployment of `retrain` on `cron` (5-field cron, server time zone UTC) for `project_dir`."""
    parameters = {"project_dir": str(Path(project_dir).resolve())}
    if models:
        parameters["models"] = models
    return retrain.to_deployment(name=name, cron=cron, parameters=parameters)
