"""The retraining DAG: prepare -> plan -> for each model: train -> evaluate -> register -> promote.

Tasks only compose components. The plan skips models whose inputs (prepared data, feature
extractor, params, the code the family executes) are unchanged since their last registered version. A failing model fails its own branch;
the others finish, and the flow's final state names every model that failed and why.
"""

from __future__ import annotations

import functools
import getpass
import json
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from components.config import Params, auto_pixels, load_params
from components.data.prepared import PreparedData, load_prepared_version
from components.data.versioning import data_at_revision, data_version, ensure_data, git_revision, reproduce
from components.evaluation.evaluate import Evaluation
from components.evaluation.on_cluster import EvaluationTask, ExtractorSource, evaluate_on_cluster
from components.models import GenerativeModel
from components.models.model_dir import load_model_dir
from components.registry.lineage import (
    FINGERPRINT_TAG,
    changed_inputs,
    code_version,
    inputs_fingerprint,
    model_inputs,
    package_versions,
    params_hash,
)
from components.registry.store import client_for, resolve_tracking_uri
from components.registry.tracking import RunLogger
from components.registry.versions import (
    PromotionPolicy,
    decide_promotion,
    describe_version,
    load_version,
    publish_to_production,
    register_version,
    registered_name,
    version_with_tag,
)
from components.report.page import report_html
from components.training.jobs import check_models_fit, scaling, train_job, train_model
from components.training.ray_train import ray_cluster
from flows.journal import JOURNAL_FILE, Holder, ProjectHeld, RunJournal, holder_of
from flows.logs import quiet_tool_notices
from flows.progress import feed
from flows.registry_turn import RegistryBusy, registry_turn

LOCK_FILE = ".genpipe.lock"
TRANSIENT_RETRIES = {"retries": 2, "retry_delay_seconds": 3}
REPORT_ARTIFACT = "report.html"


@dataclass
class Inputs:
    """What every model branch shares: the versioned data and where things live."""

    project_dir: str
    params: Params
    data_version: str
    tracking_uri: str
    parent_run_id: str
    pipeline_id: str
    journal: RunJournal

    def data(self) -> PreparedData:
        return load_prepared_version(
            Path(self.project_dir) / self.params.data.prepared_dir, self.data_version
        )

    def evaluation_task(self, context: dict[str, str]) -> EvaluationTask:
        """How this run evaluates: data, feature extractor (paths in params are the project's), settings."""
        return EvaluationTask.from_params(self.params, self.project_dir, self.data_version, context)

    def registered_name(self, model: str) -> str:
        return registered_name(self.data().name, model)


@dataclass
class Plan:
    model: str
    action: str  # "train" or "skip"
    reason: str
    fingerprint: str = ""
    ray_run_name: str = ""


@dataclass
class Trained:
    model: str
    fingerprint: str
    run_id: str
    model_dir: str
    reason: str = ""  # why the plan retrained it


@dataclass
class ModelResult:
    model: str
    status: str  # "promoted", "kept champion", "skipped", "failed"
    detail: str
    version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


def _evaluate(model: GenerativeModel, inputs: Inputs, shown_as: str) -> Evaluation:
    """Evaluate under the run's settings, as a task on the Ray cluster: a candidate and a re-evaluated
    champion alike; its progress is shown on the row of the model `shown_as`."""
    context = {"prepared_data": inputs.data_version, "code": code_version(type(model).registry_name)}
    task = inputs.evaluation_task(context)
    return evaluate_on_cluster(model, task, on_progress=functools.partial(feed.evaluation, shown_as))


def _model_inputs(inputs: Inputs, model: str) -> dict[str, Any]:
    """What decides `model` in this run, as fingerprinted and recorded on its version."""
    extractor_id = ExtractorSource.from_params(inputs.params, inputs.project_dir).id()
    data = inputs.data()
    data_pixels = auto_pixels(data.image_shape, data.levels)
    return model_inputs(inputs.params, model, inputs.data_version, extractor_id, data_pixels)


@task(name="prepare-data", cache_policy=NO_CACHE)
def prepare_data(project_dir: str, raw_dir: str, data_rev: str | None) -> str:
    """Make sure the tracked data is present, run the DVC stages, return the data version."""
    logger = get_run_logger()
    repo = Path(project_dir)
    logger.info(ensure_data(repo, Path(raw_dir)))
    for line in reproduce(repo).splitlines():
        if line.strip():
            logger.info("dvc: %s", line)
    version = data_version(repo)
    logger.info("data version %s%s", version, f" (data.dvc at {data_rev})" if data_rev else "")
    return version


@task(name="plan", cache_policy=NO_CACHE)
def plan(models: list[str], inputs: Inputs, force: bool, resume: bool) -> list[Plan]:
    """Decide, per model, whether its inputs changed since its last registered version; first check
    that every model can be built for the data, so a misfit stops the run before anything trains."""
    logger = get_run_logger()
    data = inputs.data()
    check_models_fit(inputs.params, models, data.image_shape, data.levels)
    client = client_for(inputs.tracking_uri)
    plans = []
    for model in models:
        current = _model_inputs(inputs, model)
        fingerprint = inputs_fingerprint(current)
        name = inputs.registered_name(model)
        existing = version_with_tag(client, name, FINGERPRINT_TAG, fingerprint)
        if existing is not None and not force:
            plans.append(
                Plan(
                    model,
                    "skip",
                    f"inputs unchanged since {name} v{existing.version} "
                    "(same prepared data, feature extractor, params and code); --force retrains",
                    fingerprint,
                )
            )
        else:
            latest = version_with_tag(client, name, "model", model)
            if force and existing is not None:
                why = "--force"
            elif latest is None:
                why = "no registered version yet"
            else:
                changed = changed_inputs(json.loads(latest.tags.get("inputs", "{}")), current)
                why = f"changed since v{latest.version}: {', '.join(changed) or 'unknown'}"
            run_name = inputs.journal.ray_run_name(model, fingerprint, resume)
            plans.append(Plan(model, "train", why, fingerprint, run_name))
        logger.info("%s: %s (%s)", model, plans[-1].action, plans[-1].reason)
    return plans


@task(name="train", cache_policy=NO_CACHE, task_run_name="train-{planned.model}")
def train(planned: Plan, inputs: Inputs) -> Trained:
    logger = get_run_logger()
    model = planned.model
    feed.stage(model, "training")
    data = inputs.data()
    job = train_job(inputs.params, model, data.image_shape, data.levels)
    client = client_for(inputs.tracking_uri)
    commit, dirty = git_revision(Path(inputs.project_dir))
    run = RunLogger.start(
        client,
        inputs.params.tracking.experiment,
        model,
        parent_run_id=inputs.parent_run_id,
        tags={
            "model": model,
            "data_version": inputs.data_version,
            "git_commit": commit,
            "git_dirty": str(dirty),
            FINGERPRINT_TAG: planned.fingerprint,
            "ray_run": planned.ray_run_name,
        },
    )
    inputs.journal.record_mlflow_run(inputs.tracking_uri, run.run_id)
    with run.fail_on_error():
        run.log_params({"model": job.model, "train": inputs.params.as_dict()["train"], "seed": job.seed})
        run.log_dataset(
            data.train.images,
            name=data.name,
            version=inputs.data_version,
            source=str(Path(inputs.project_dir).resolve() / "data"),
            context="train",
        )
        logger.info(
            "training %s on Ray (%s): %d worker(s), %d epochs",
            model,
            planned.ray_run_name,
            scaling(inputs.params).workers,
            job.epochs,
        )
        with run.system_metrics(inputs.params.tracking.system_metrics_interval_s):
            outcome = train_model(
                job,
                data,
                inputs.params,
                project_dir=Path(inputs.project_dir),
                run_name=planned.ray_run_name,
                on_progress=functools.partial(feed.training, model),
            )
        run.log_history(outcome.history)
        run.log_progress_samples(outcome.progress_samples)
        run.set_tags({"resumed_from_step": outcome.resumed_from_step})
        last = outcome.history[-1] if outcome.history else {}
        logger.info(
            "trained %s: %d steps, last epoch %s",
            model,
            outcome.steps,
            {k: round(v, 4) for k, v in last.items() if k not in ("epoch", "step")},
        )
    return Trained(model, planned.fingerprint, run.run_id, str(outcome.model_dir), planned.reason)


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{trained.model}")
def evaluate(trained: Trained, inputs: Inputs) -> Evaluation:
    feed.stage(trained.model, "evaluating")
    run = RunLogger(client_for(inputs.tracking_uri), trained.run_id)
    with run.fail_on_error():
        evaluation = _evaluate(load_model_dir(trained.model_dir), inputs, trained.model)
        run.log_evaluation(evaluation)
    get_run_logger().info(
        "evaluated %s: %s = %.4f (%s)",
        trained.model,
        evaluation.gate_metric,
        evaluation.primary_value,
        evaluation.extractor_id,
    )
    return evaluation


@task(name="register", cache_policy=NO_CACHE, task_run_name="register-{trained.model}", **TRANSIENT_RETRIES)
def register(trained: Trained, evaluation: Evaluation, inputs: Inputs) -> str:
    """Register once: a retry finds the version an earlier attempt created (re-uploading the same files)."""
    feed.stage(trained.model, "registering")
    client = client_for(inputs.tracking_uri)
    name = inputs.registered_name(trained.model)
    run = RunLogger(client, trained.run_id)
    with run.fail_on_error():
        source, weights_sha256 = run.log_model_package(Path(trained.model_dir))
        commit, dirty = git_revision(Path(inputs.project_dir))
        params = inputs.params
        workers = scaling(params)
        version = register_version(
            client,
            name,
            source,
            trained.run_id,
            evaluation,
            inputs.data_version,
            extra_tags={
                "model": trained.model,
                "mlflow_run_id": trained.run_id,
                FINGERPRINT_TAG: trained.fingerprint,
                "inputs": json.dumps(_model_inputs(inputs, trained.model), sort_keys=True),
                "weights_sha256": weights_sha256,
                "git_commit": commit,
                "git_dirty": str(dirty),
                "params_hash": params_hash(params),
                "params": json.dumps(params.as_dict(), sort_keys=True),
                "prefect_flow_run_id": inputs.pipeline_id,
                "ray_scaling": json.dumps(
                    {"workers": workers.workers, "gpus_per_worker": workers.gpus_per_worker}
                ),
                "package_versions": json.dumps(package_versions(), sort_keys=True),
            },
        )
    inputs.journal.registered(trained.model, trained.fingerprint)
    get_run_logger().info("registered %s version %s as challenger", name, version.version)
    return str(version.version)


def _reevaluate(client: MlflowClient, champion: ModelVersion, model: str, inputs: Inputs) -> Evaluation:
    """The champion scored again under this run's settings, shown on the candidate's row."""
    feed.stage(model, "evaluating", f"champion v{champion.version} again: its evaluation differs")
    evaluation = _evaluate(load_version(client, champion), inputs, model)
    feed.stage(model, "registering", "promotion decision")
    return evaluation


@task(name="promote", cache_policy=NO_CACHE, task_run_name="promote-{trained.model}", **TRANSIENT_RETRIES)
def promote(trained: Trained, version: str, evaluation: Evaluation, inputs: Inputs) -> ModelResult:
    client = client_for(inputs.tracking_uri)
    run = RunLogger(client, trained.run_id)
    name = inputs.registered_name(trained.model)
    registry = inputs.params.registry
    with run.fail_on_error():
        candidate = client.get_model_version(name, version)
        policy = PromotionPolicy.from_params(inputs.params, trained.model, evaluation.primary_metric)
        decision = decide_promotion(
            client,
            name,
            candidate,
            evaluation,
            reevaluate=lambda champion: _reevaluate(client, champion, trained.model, inputs),
            policy=policy,
        )
        describe_version(client, name, version, decision)
        if decision.promoted:
            production_uri = registry.production_registry_uri
            published = publish_to_production(
                client,
                name,
                version,
                registry.production_prefix,
                client_for(production_uri) if production_uri else None,
            )
            get_run_logger().info(
                "published %s v%s as %s v%s", name, version, published.name, published.version
            )
        run.set_tags(
            {
                "promotion.decision": "promoted" if decision.promoted else "rejected",
                "promotion.reason": decision.reason,
                "registered_version": version,
                "retrained_because": trained.reason,
            }
        )
        run.finish()
    get_run_logger().info("%s v%s: %s", name, version, decision.reason)
    status = "promoted" if decision.promoted else "kept champion"
    detail = f"retrained: {trained.reason}; {decision.reason}"
    return ModelResult(trained.model, status, detail, version, evaluation.metrics, trained.run_id)


def _branch_failure(model: str, futures: list[PrefectFuture]) -> ModelResult:
    for future in futures:
        future.wait()
        if future.state.is_failed() or future.state.is_crashed():
            return ModelResult(model, "failed", future.state.message or str(future.state))
    return ModelResult(model, "failed", "an upstream step did not complete")


def training_runner(params: Params) -> ThreadPoolTaskRunner:
    """The task runner of the trainings: `train.max_concurrent_models` train at the same time.

    Made from the run's own params inside the flow, so every entry point (the CLI, a deployment, a
    direct call of the flow) keeps the limit.
    """
    return ThreadPoolTaskRunner(max_workers=params.train.max_concurrent_models)


def follow_up_runner(branches: int) -> ThreadPoolTaskRunner:
    """The task runner of what follows a training (evaluate, register, promote): a thread for each of
    those tasks, so every branch goes on the moment its training ends, whatever else still trains.
    The threads mostly wait; evaluations are Ray tasks, which the cluster's resources pace."""
    return ThreadPoolTaskRunner(max_workers=max(1, 3 * branches))


def _run_branches(plans: list[Plan], inputs: Inputs) -> list[ModelResult]:
    trained_here = [p for p in plans if p.action == "train"]
    with training_runner(inputs.params) as training, follow_up_runner(len(trained_here)) as follow_up:
        branches = {}
        for planned in trained_here:
            trained = training.submit(train, {"planned": planned, "inputs": inputs})
            evaluation = follow_up.submit(evaluate, {"trained": trained, "inputs": inputs})
            version = follow_up.submit(
                register, {"trained": trained, "evaluation": evaluation, "inputs": inputs}
            )
            promoted = follow_up.submit(
                promote, {"trained": trained, "version": version, "evaluation": evaluation, "inputs": inputs}
            )
            branches[planned.model] = [trained, evaluation, version, promoted]
        results = [ModelResult(p.model, "skipped", p.reason) for p in plans if p.action == "skip"]
        model_of = {futures[-1].task_run_id: model for model, futures in branches.items()}
        for final in as_completed([futures[-1] for futures in branches.values()]):
            model = model_of[final.task_run_id]
            final.wait()  # as_completed yields when the thread ends; `wait` also brings the final state
            done = final.result() if final.state.is_completed() else _branch_failure(model, branches[model])
            results.append(done)
            feed.stage(model, "failed" if done.status == "failed" else "done", _outcome(done))
    order = [p.model for p in plans]
    return sorted(results, key=lambda result: order.index(result.model))


def _log_report(parent: RunLogger, inputs: Inputs) -> None:
    """The report page as this run leaves the registry, as an artifact of the pipeline's parent run."""
    try:
        page = report_html(parent.client, inputs.params.registry.production_prefix, inputs.data())
    except Exception as err:  # the models are registered either way; a report must not undo that
        get_run_logger().warning("report page not written (%s: %s)", type(err).__name__, err)
        return
    parent.log_text(page, REPORT_ARTIFACT)


def _outcome(result: ModelResult) -> str:
    return f"{result.status} v{result.version}" if result.version else result.detail


@flow(name="genpipe-retrain", log_prints=True)
def retrain(
    project_dir: str = ".",
    models: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    ray_address: str | None = None,
    force: bool = False,
    resume: bool = False,
    data_rev: str | None = None,
):
    """Retrain the models of params.yaml (or `models`) whose inputs changed, on the current data.

    When another live run holds the project or the registry, nothing is done and the flow run ends
    Cancelled, with a message naming that run.
    """
    quiet_tool_notices()
    project = Path(project_dir).resolve()
    params = load_params(project / "params.yaml", overrides)
    models = list(models or params.train.models)
    logger = get_run_logger()
    wait_s = params.train.lock_timeout_s

    def nothing_done(why: str) -> State:
        message = f"{why}; nothing done"
        logger.warning(message)
        for model in models:
            feed.stage(model, "skipped", message)
        return Cancelled(message=message, data=[ModelResult(m, "skipped", message).__dict__ for m in models])

    flow_run_id = flow_run.get_id()
    pipeline_id = str(flow_run_id or "local")
    with ExitStack() as held:
        held.enter_context(feed.logged_unless_watched(logger.info))  # a scheduled run's log
        try:
            held.enter_context(FileLock(project / LOCK_FILE).acquire(timeout=wait_s))
            journal = held.enter_context(RunJournal(project / JOURNAL_FILE, Holder.this_process(flow_run_id)))
        except Timeout:
            holder = holder_of(project / JOURNAL_FILE)
            return nothing_done(f"another genpipe run holds {project} ({holder or 'it did not say who'})")
        except ProjectHeld as held_by:
            return nothing_done(f"another genpipe run holds {project} ({held_by.holder})")
        held.enter_context(data_at_revision(project, data_rev))
        version = prepare_data(str(project), params.data.raw_dir, data_rev)
        tracking_uri = resolve_tracking_uri(params.tracking.mlflow_tracking_uri, project)
        try:
            lease_id = held.enter_context(registry_turn(tracking_uri, wait_s, journal.holder))
        except RegistryBusy as busy:
            return nothing_done(f"another genpipe run is writing to the registry at {tracking_uri}: {busy}")
        journal.record_registry_lease(lease_id)
        parent = RunLogger.start(
            client_for(tracking_uri),
            params.tracking.experiment,
            f"retrain-{pipeline_id[:8]}",
            tags={"prefect_flow_run_id": pipeline_id, "data_version": version},
        )
        journal.record_mlflow_run(tracking_uri, parent.run_id)
        parent.log_params(
            {
                "models": ",".join(models),
                "params_hash": params_hash(params),
                "force": force,
                "resume": resume,
                "data_rev": data_rev,
            }
        )
        inputs = Inputs(str(project), params, version, tracking_uri, parent.run_id, pipeline_id, journal)
        # Logged here first, serially: model runs logging the same new dataset concurrently would race
        # to insert it into MLflow's dataset table.
        parent.log_dataset(
            inputs.data().train.images,
            name=inputs.data().name,
            version=version,
            source=str(project / "data"),
            context="train",
        )
        plans = plan(models, inputs, force, resume)
        for planned in plans:
            feed.stage(planned.model, "queued" if planned.action == "train" else "skipped", planned.reason)
        needs_cluster = any(p.action == "train" for p in plans)
        with ray_cluster(ray_address) if needs_cluster else nullcontext():
            results = _run_branches(plans, inputs)
        failed = [r for r in results if r.status == "failed"]
        _log_report(parent, inputs)
        parent.set_tags({"failed_models": ",".join(r.model for r in failed), "run_by": getpass.getuser()})
        parent.finish("FAILED" if failed else "FINISHED")

    for result in results:
        logger.info("%-10s %-14s %s", result.model, result.status, result.detail)
    summary = [result.__dict__ for result in results]
    if failed:
        reasons = "; ".join(f"{r.model}: {r.detail}" for r in failed)
        return Failed(message=f"{len(failed)} of {len(results)} model(s) failed: {reasons}", data=summary)
    trained = sum(r.status != "skipped" for r in results)
    return Completed(message=f"{trained} model(s) trained, {len(results) - trained} skipped", data=summary)
