"""The retraining DAG: prepare -> for each model: train -> evaluate -> register -> promote.

Tasks only compose components. A failing model fails its own branch; the others finish, and the
flow's final state names every model that failed and why.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from components.config import load_params
from components.data.prepared import PreparedData, load_prepared
from components.data.versioning import data_version, ensure_data, git_revision, reproduce
from components.evaluation.evaluate import Evaluation, EvaluationSettings, evaluate_model, feature_extractor
from components.registry.models import decide_promotion, load_version, register_version, registered_name
from components.registry.tracking import RunLogger, client_for, resolve_tracking_uri
from components.training.jobs import scaling, train_job, train_model
from components.training.ray_train import ray_cluster
from components.training.trainer import load_model_dir


@dataclass
class Inputs:
    """What every model branch shares: the versioned data and where things live."""

    project_dir: str
    params: dict[str, Any]
    data_version: str
    tracking_uri: str
    parent_run_id: str
    pipeline_id: str

    def data(self) -> PreparedData:
        return load_prepared(Path(self.project_dir) / self.params["data"]["prepared_dir"])

    @property
    def featurizer_dir(self) -> Path:
        return Path(self.project_dir) / self.params["featurizer"]["dir"]


@dataclass
class Trained:
    model: str
    run_id: str
    model_dir: str
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class ModelResult:
    model: str
    status: str  # "promoted", "kept champion", "failed"
    detail: str
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


def _params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def _evaluate(model, inputs: Inputs, data: PreparedData) -> Evaluation:
    cfg = inputs.params["evaluate"]
    extractor, extractor_id = feature_extractor(
        cfg.get("feature_extractor", "featurizer"), inputs.featurizer_dir
    )
    settings = EvaluationSettings(
        num_samples=cfg["num_samples"],
        kid_subset_size=cfg["kid_subset_size"],
        importance_samples=cfg["importance_samples"],
        batch_size=cfg["batch_size"],
        seed=inputs.params["seed"],
    )
    return evaluate_model(model, data, extractor, extractor_id, settings)


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(project_dir: str, raw_dir: str) -> str:
    """Make sure the tracked data is present, run the DVC stages, return the data version."""
    logger = get_run_logger()
    repo = Path(project_dir)
    logger.info(ensure_data(repo, Path(raw_dir)))
    for line in reproduce(repo).splitlines():
        if line.strip():
            logger.info("dvc: %s", line)
    version = data_version(repo)
    logger.info("data version %s", version)
    return version


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{model}")
def train(model: str, inputs: Inputs) -> Trained:
    logger = get_run_logger()
    data = inputs.data()
    job = train_job(inputs.params, model, data.image_shape)
    client = client_for(inputs.tracking_uri)
    commit, dirty = git_revision(Path(inputs.project_dir))
    run = RunLogger.start(
        client,
        inputs.params["tracking"]["experiment"],
        model,
        parent_run_id=inputs.parent_run_id,
        tags={
            "model": model,
            "data_version": inputs.data_version,
            "git_commit": commit,
            "git_dirty": str(dirty),
        },
    )
    with run.fail_on_error():
        run.log_params({"model": job.model, "train": inputs.params["train"], "seed": job.seed})
        run.log_dataset(
            data.train.images,
            name=data.name,
            version=inputs.data_version,
            source=str(Path(inputs.project_dir).resolve() / "data"),
            context="train",
        )
        workers = scaling(inputs.params).workers
        logger.info("training %s on Ray: %d worker(s), %d epochs", model, workers, job.epochs)
        output_dir = Path(inputs.project_dir) / "outputs" / inputs.pipeline_id / model
        outcome = train_model(
            job, data, inputs.params, run_name=f"{inputs.pipeline_id}-{model}", output_dir=output_dir
        )
        run.log_history(outcome.history)
        last = outcome.history[-1] if outcome.history else {}
        logger.info(
            "trained %s: %d steps, last epoch %s",
            model,
            outcome.steps,
            {k: round(v, 4) for k, v in last.items() if k not in ("epoch", "step")},
        )
    return Trained(model, run.run_id, str(output_dir), outcome.history)


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{trained.model}")
def evaluate(trained: Trained, inputs: Inputs) -> Evaluation:
    run = RunLogger(client_for(inputs.tracking_uri), trained.run_id)
    with run.fail_on_error():
        evaluation = _evaluate(load_model_dir(trained.model_dir), inputs, inputs.data())
        run.log_evaluation(evaluation)
    get_run_logger().info(
        "evaluated %s: %s = %.4f (%s)",
        trained.model,
        evaluation.primary_metric,
        evaluation.primary_value,
        evaluation.extractor_id,
    )
    return evaluation


@task(name="register", cache_policy=NO_CACHE, task_run_name="register-{trained.model}")
def register(trained: Trained, evaluation: Evaluation, inputs: Inputs) -> str:
    client = client_for(inputs.tracking_uri)
    run = RunLogger(client, trained.run_id)
    with run.fail_on_error():
        source = run.log_model_dir(Path(trained.model_dir))
        commit, dirty = git_revision(Path(inputs.project_dir))
        version = register_version(
            client,
            registered_name(inputs.data().name, trained.model),
            source,
            trained.run_id,
            evaluation,
            inputs.data_version,
            extra_tags={
                "git_commit": commit,
                "git_dirty": str(dirty),
                "params_hash": _params_hash(inputs.params),
                "prefect_flow_run_id": inputs.pipeline_id,
                "ray_workers": str(scaling(inputs.params).workers),
                "torch_version": torch.__version__,
                "python_version": platform.python_version(),
            },
        )
    get_run_logger().info("registered %s version %s as challenger", version.name, version.version)
    return version.version


@task(name="promote", cache_policy=NO_CACHE, task_run_name="promote-{trained.model}")
def promote(trained: Trained, version: str, evaluation: Evaluation, inputs: Inputs) -> ModelResult:
    client = client_for(inputs.tracking_uri)
    run = RunLogger(client, trained.run_id)
    name = registered_name(inputs.data().name, trained.model)
    with run.fail_on_error():
        candidate = client.get_model_version(name, version)
        decision = decide_promotion(
            client,
            name,
            candidate,
            evaluation,
            inputs.data_version,
            reevaluate=lambda champion: _evaluate(load_version(client, champion), inputs, inputs.data()),
            min_improvement=float(inputs.params["train"].get("min_improvement", 0.0)),
        )
        run.set_tags(
            {
                "promotion.decision": "promoted" if decision.promoted else "rejected",
                "promotion.reason": decision.reason,
                "registered_version": version,
            }
        )
        run.finish()
    get_run_logger().info("%s v%s: %s", name, version, decision.reason)
    status = "promoted" if decision.promoted else "kept champion"
    return ModelResult(trained.model, status, decision.reason, version, evaluation.metrics, trained.run_id)


def _branch_failure(model: str, futures: list[PrefectFuture]) -> ModelResult:
    for future in futures:
        future.wait()
        if future.state.is_failed() or future.state.is_crashed():
            return ModelResult(model, "failed", future.state.message or str(future.state))
    return ModelResult(model, "failed", "an upstream step did not complete")


@flow(name="genpipe-retrain", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def retrain(
    project_dir: str = ".",
    models: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
):
    """Retrain every model in params.yaml (or `models`) on the current data version."""
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml", overrides)
    models = list(models or params["train"]["models"])
    logger = get_run_logger()
    version = prepare_data(str(project), params["data"]["raw_dir"])

    tracking_uri = resolve_tracking_uri(params["tracking"]["mlflow_tracking_uri"], project)
    pipeline_id = str(flow_run.get_id() or "local")
    parent = RunLogger.start(
        client_for(tracking_uri),
        params["tracking"]["experiment"],
        f"retrain-{pipeline_id[:8]}",
        tags={"prefect_flow_run_id": pipeline_id, "data_version": version},
    )
    parent.log_params({"models": ",".join(models), "params_hash": _params_hash(params)})
    inputs = Inputs(str(project), params, version, tracking_uri, parent.run_id, pipeline_id)

    results: list[ModelResult] = []
    with ray_cluster(ray_address):
        # Submitted stage by stage: a waiting downstream task holds a worker thread, so queueing every
        # training first lets `max_concurrent_models` trainings run while later stages wait their turn.
        branches = {model: [train.submit(model, inputs)] for model in models}
        for futures in branches.values():
            futures.append(evaluate.submit(futures[0], inputs))
        for futures in branches.values():
            futures.append(register.submit(futures[0], futures[1], inputs))
        for futures in branches.values():
            futures.append(promote.submit(futures[0], futures[2], futures[1], inputs))
        for model, futures in branches.items():
            final = futures[-1]
            final.wait()
            results.append(final.result() if final.state.is_completed() else _branch_failure(model, futures))

    failed = [r for r in results if r.status == "failed"]
    parent.set_tags({"failed_models": ",".join(r.model for r in failed)})
    parent.finish("FAILED" if failed else "FINISHED")
    for result in results:
        logger.info("%-10s %-14s %s", result.model, result.status, result.detail)
    summary = [result.__dict__ for result in results]
    if failed:
        reasons = "; ".join(f"{r.model}: {r.detail}" for r in failed)
        return Failed(message=f"{len(failed)} of {len(results)} model(s) failed: {reasons}", data=summary)
    return Completed(message=f"{len(results)} model(s) trained", data=summary)
