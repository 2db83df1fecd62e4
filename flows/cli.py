"""`genpipe`: run the retraining flow, schedule it, inspect the registry, sample, import data."""

from __future__ import annotations

import contextlib
import functools
import getpass
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from components.config import Params

# genpipe runs offline: the tools it drives send no usage reports (and Prefect's temporary server
# skips a heartbeat that contends for its SQLite database). A user's own setting wins.
NO_USAGE_REPORTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update({name: value for name, value in NO_USAGE_REPORTS.items() if name not in os.environ})

app = typer.Typer(
    help="Reproducible, distributed retraining of deep generative models.", no_args_is_help=True
)
data_app = typer.Typer(help="Bring data under version control.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# Rich assumes 80 columns when output is not a terminal; logs and CI have room for wider tables.
console = Console(width=None if sys.stdout.isatty() else 160)

# sysexits' EX_TEMPFAIL: nothing was done because another run was busy; trying again later may work.
EXIT_SKIPPED = 75
UI_START_TIMEOUT_S = 120

ProjectDir = Annotated[Path, typer.Option("--project-dir", "-C", help="Project directory with params.yaml.")]


def _csv(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def _store(project_dir: Path) -> tuple[Params, str]:
    """The project's params and the tracking URI of its store."""
    from components.config import load_params
    from components.registry.store import resolve_tracking_uri

    params = load_params(project_dir / "params.yaml")
    return params, resolve_tracking_uri(params.tracking.mlflow_tracking_uri, project_dir)


def _tracking(project_dir: Path):
    from components.registry.store import client_for

    params, uri = _store(project_dir)
    return params, uri, client_for(uri)


@app.command()
def run(
    models: Annotated[
        str | None, typer.Option(help="Comma-separated families (default: train.models).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override train.epochs.")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray Train workers per model.")] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="GPUs per worker (fractions allowed).")
    ] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Models training at the same time.")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Attach to this Ray cluster ($RAY_ADDRESS).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Retrain models whose inputs are unchanged.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue unfinished models from their checkpoints.")] = False,
    data_rev: Annotated[str | None, typer.Option(help="Train on data.dvc as of this git revision.")] = None,
    production_registry_uri: Annotated[
        str | None, typer.Option(help="MLflow server that receives promoted champions.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print Prefect's logs here too, not only to the log file.")
    ] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Run the retraining flow once: prepare, plan, train, evaluate, register, promote.

    Exits 1 when a model failed, and EXIT_SKIPPED when another live run held the project or the
    registry, so that nothing was done.
    """
    from components.config import ConfigError, load_params
    from flows.logs import new_log_file, route_logs
    from flows.progress import LiveProgress, PlainProgress, feed
    from flows.retrain import retrain

    train = {
        "epochs": epochs,
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        "max_concurrent_models": max_concurrent,
    }
    overrides = {
        "train": {k: v for k, v in train.items() if v is not None},
        "registry": {"production_registry_uri": production_registry_uri},
    }
    try:
        load_params(project_dir / "params.yaml", overrides)
    except ConfigError as err:
        raise _fail(str(err)) from err
    log_file = new_log_file(project_dir)
    log_stream = route_logs(log_file, terminal=verbose)
    # The live display redraws its rows in place, which log lines printed beside it would break.
    live = console.is_terminal and not verbose
    display = (
        LiveProgress(console)
        if live
        else contextlib.nullcontext(PlainProgress(functools.partial(print, flush=True)))
    )
    # What the tools print to stderr themselves (MLflow's "Copied version ..."), not as log records.
    stray_prints = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(log_stream)
    started = time.monotonic()
    with stray_prints, display as listener, feed.listening(listener):
        state = retrain(
            project_dir=str(project_dir),
            models=_csv(models),
            overrides=overrides,
            ray_address=ray_address,
            force=force,
            resume=resume,
            data_rev=data_rev,
            return_state=True,
        )
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, list):
        raise _fail(f"the flow failed before training: {state.message or summary}")
    table = Table(title=f"genpipe run ({time.monotonic() - started:.0f} s)")
    for column in ("model", "status", "version", "detail"):
        table.add_column(column)
    for row in summary:
        colour = {"promoted": "green", "failed": "red", "skipped": "dim"}.get(row["status"], "yellow")
        table.add_row(
            row["model"], f"[{colour}]{row['status']}[/{colour}]", str(row["version"] or "-"), row["detail"]
        )
    console.print(table)
    _, uri = _store(project_dir)
    console.print(f"Results: MLflow at [bold]{uri}[/bold]; weights under {project_dir / 'outputs'}")
    console.print("  Look:       genpipe ui   (MLflow's runs and registry; --prefect adds Prefect's UI)")
    console.print("  Report:     genpipe report -o report.html")
    console.print("  Registry:   genpipe status")
    console.print(f"  Logs:       {log_file}")
    if state.is_cancelled():
        console.print(f"[yellow]skipped:[/yellow] {state.message}")
        raise typer.Exit(code=EXIT_SKIPPED)
    if state.is_failed():
        raise _fail(state.message or "some models failed")


@app.command()
def schedule(
    cron: Annotated[str, typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 UTC daily).')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    models: Annotated[
        str | None, typer.Option(help="Comma-separated families (default: train.models).")
    ] = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Serve the flow as a Prefect deployment on a cron schedule (runs until interrupted)."""
    from prefect import serve

    from flows.deployment import scheduled_deployment

    deployment = scheduled_deployment(cron, str(project_dir), name, _csv(models))
    console.print(f"Serving deployment genpipe-retrain/{name} on schedule {cron!r}; Ctrl-C stops it.")
    serve(deployment)


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """One row per registered model: champion version, primary metric, data version, when registered."""
    from components.registry.store import status_rows

    _, uri = _store(project_dir)
    rows = status_rows(uri)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if not rows:
        console.print(f"Nothing registered yet in {uri}. Run `genpipe run`.")
        return
    table = Table(title=f"Registry ({uri})")
    for column in rows[0]:
        table.add_column(column.replace("_", " "))
    for row in rows:
        table.add_row(*(str(value) for value in {**row, "data_version": row["data_version"][:12]}.values()))
    console.print(table)


def _serve(command: list[str], env: dict, log: Path, health_url: str, what: str) -> subprocess.Popen:
    """Start a server in its own process group, its output in `log`; return once `health_url` answers."""
    import requests

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + UI_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise _fail(
                f"{what} exited with code {process.returncode}; its log ({log}):\n{log.read_text()[-2000:]}"
            )
        try:
            if requests.get(health_url, timeout=2).ok:
                return process
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    _stop(process)
    raise _fail(f"{what} did not answer at {health_url} within {UI_START_TIMEOUT_S} s; see {log}")


def _stop(process: subprocess.Popen) -> None:
    """Stop a server started by `_serve` and the workers it started (its process group)."""
    with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    prefect: Annotated[bool, typer.Option("--prefect", help="Also start the Prefect UI.")] = False,
    prefect_port: Annotated[int, typer.Option(help="Port of the Prefect UI.")] = 4200,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    project_dir: ProjectDir = Path("."),
) -> None:
    """Open the MLflow UI on the project's tracking store (and the Prefect UI); Ctrl-C stops them."""
    from components.registry.tracking import experiment_id, is_server, ui_experiment_url, ui_server_command

    params, uri, client = _tracking(project_dir)
    servers: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, _interrupt)  # stopped by a service manager: stop the servers too
    logs = project_dir / "outputs"
    try:
        if is_server(uri):
            base = uri
        else:
            command, env = ui_server_command(uri, host, port, (project_dir / "mlruns").resolve())
            base = f"http://{host}:{port}"
            servers.append(_serve(command, env, logs / "mlflow-ui.log", f"{base}/health", "mlflow server"))
        experiment = experiment_id(client, params.tracking.experiment)
        console.print(f"MLflow UI:  [bold]{ui_experiment_url(base, experiment)}[/bold]   (store: {uri})")
        if prefect:
            api = os.environ.get("PREFECT_API_URL")
            if api:
                console.print(f"Prefect UI: [bold]{api.removesuffix('/').removesuffix('/api')}[/bold]")
            else:
                prefect_bin = str(Path(sys.executable).parent / "prefect")
                command = [prefect_bin, "server", "start", "--host", host, "--port", str(prefect_port)]
                prefect_url = f"http://{host}:{prefect_port}"
                servers.append(
                    _serve(
                        command,
                        dict(os.environ),
                        logs / "prefect-ui.log",
                        f"{prefect_url}/api/health",
                        "prefect server",
                    )
                )
                console.print(f"Prefect UI: [bold]{prefect_url}[/bold]")
        if not servers:
            return
        console.print(f"Server logs in {logs}; Ctrl-C stops the UI.")
        while all(server.poll() is None for server in servers):
            time.sleep(1)
        raise _fail(f"a UI server stopped on its own; see the logs in {logs}")
    except KeyboardInterrupt:
        console.print("stopping the UI")
    finally:
        for server in servers:
            _stop(server)


@app.command()
def report(
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write.")] = Path("report.html"),
    project_dir: ProjectDir = Path("."),
) -> None:
    """Write one self-contained HTML page: each family's champion, scores, samples and training curves."""
    from components.data.prepared import load_prepared
    from components.data.raw import DataError
    from components.report.page import report_html

    params, uri, client = _tracking(project_dir)
    try:
        prepared = load_prepared(project_dir / params.data.prepared_dir)
    except DataError as err:
        console.print(f"[yellow]no real images in the report:[/yellow] {err}")
        prepared = None
    output.write_text(report_html(client, params.registry.production_prefix, prepared))
    console.print(f"Wrote the report of {uri} to {output}")


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="Family name, e.g. vae.")],
    alias: Annotated[str, typer.Option(help="Registry alias to load.")] = "champion",
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 64,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")] = Path("samples.png"),
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: the current data).")] = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Load a registered model and write a grid of its samples."""
    import torch

    from components.data.raw import DataError, dataset_name
    from components.evaluation.images import save_grid
    from components.registry.versions import load_version, registered_name, version_by_alias

    params, _, client = _tracking(project_dir)
    try:
        name = registered_name(dataset or dataset_name(project_dir / params.data.raw_dir), model)
        version = version_by_alias(client, name, alias)
    except (DataError, LookupError) as err:
        raise _fail(str(err)) from err
    loaded = load_version(client, version)
    images = loaded.sample(n, generator=torch.Generator().manual_seed(seed))
    save_grid(images, output)
    console.print(f"Wrote {n} samples of {name} v{version.version} (@{alias}) to {output}")


def _registered(model: str, params: Params, project_dir: Path) -> str:
    """`vae` -> `<current dataset>.vae`; a full registered name is kept as it is."""
    from components.data.raw import DataError, dataset_name
    from components.registry.store import registered_name

    if "." in model:
        return model
    try:
        return registered_name(dataset_name(project_dir / params.data.raw_dir), model)
    except DataError as err:
        raise _fail(str(err)) from err


ModelArgument = Annotated[str, typer.Argument(help="Family (e.g. vae) or registered name (digits.vae).")]


@app.command()
def promote(
    model: ModelArgument,
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    reason: Annotated[str, typer.Option(help="Why; recorded on the version.")],
    project_dir: ProjectDir = Path("."),
) -> None:
    """Make a version champion by hand (recorded, and published to production)."""
    from mlflow.exceptions import MlflowException

    from components.registry.store import client_for
    from components.registry.versions import promote_manually, publish_to_production

    params, _, client = _tracking(project_dir)
    name = _registered(model, params, project_dir)
    registry = params.registry
    try:
        promote_manually(client, name, version, reason, getpass.getuser())
        production = (
            client_for(registry.production_registry_uri) if registry.production_registry_uri else None
        )
        published = publish_to_production(client, name, version, registry.production_prefix, production)
    except MlflowException as err:
        raise _fail(f"{name} v{version}: {err.message}") from err
    console.print(
        f"{name}: champion -> v{version} ({reason}); published as {published.name} v{published.version}"
    )


@app.command()
def rollback(model: ModelArgument, project_dir: ProjectDir = Path(".")) -> None:
    """Move champion back to the previous champion."""
    from components.registry.versions import rollback as roll_back

    params, _, client = _tracking(project_dir)
    name = _registered(model, params, project_dir)
    try:
        current, previous = roll_back(client, name)
    except LookupError as err:
        raise _fail(str(err)) from err
    console.print(f"{name}: champion v{current} -> v{previous}")


LINEAGE_KEYS = (
    "data_version",
    "git_commit",
    "git_dirty",
    "params_hash",
    "feature_extractor",
    "inputs_fingerprint",
    "ray_scaling",
    "prefect_flow_run_id",
    "mlflow_run_id",
    "weights_sha256",
    "package_versions",
    "params",
)


@app.command()
def lineage(
    model: ModelArgument,
    version: Annotated[str, typer.Argument(help="Registered version.")],
    project_dir: ProjectDir = Path("."),
) -> None:
    """What a version was made from, and the commands that reproduce it."""
    from components.registry.lineage import reproduce_commands
    from components.registry.store import version_tags

    params, uri = _store(project_dir)
    name = _registered(model, params, project_dir)
    try:
        tags = version_tags(uri, name, version)
    except LookupError as err:
        raise _fail(str(err)) from err
    table = Table(title=f"Lineage of {name} v{version}", show_header=False)
    for key in LINEAGE_KEYS:
        table.add_row(key, tags.get(key, "-"))
    console.print(table)
    family = tags.get("model", name.rsplit(".", 1)[-1])
    console.print("Reproduce with:\n  " + "\n  ".join(reproduce_commands(tags, family)))


@app.command("models")
def list_families() -> None:
    """List the registered model families and their hyper-parameters."""
    from components.catalogue import family_catalogue

    table = Table(title="Model families")
    for column in ("name", "kind", "primary metric", "hyper-parameters (defaults)"):
        table.add_column(column)
    for family in family_catalogue():
        params = ", ".join(f"{k}={v}" for k, v in family.hyperparameters.items())
        table.add_row(family.name, family.data_kind, family.primary_metric, params)
    console.print(table)


@data_app.command("import")
def import_data(
    path: Annotated[Path, typer.Argument(help="IDX file or folder, .npz file, or image folder.")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="idx, npz or images (detected if omitted).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file or folder name).")] = None,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Replace data/raw with your own images and track them with DVC."""
    from components.data.importers import commit_hint, import_dataset
    from components.data.raw import DataError
    from components.data.versioning import DvcError

    try:
        dataset = import_dataset(path, project_dir, fmt=fmt, name=name)
    except (DataError, DvcError) as err:
        raise _fail(str(err)) from err
    console.print(commit_hint(dataset))


@data_app.command("builtin")
def builtin_data(
    name: Annotated[str, typer.Argument(help="shapes (rendered colour shapes, labelled) or digits.")],
    size: Annotated[int | None, typer.Option(help="shapes: number of images (default 10000).")] = None,
    resolution: Annotated[
        int | None, typer.Option(help="shapes: side in pixels, 16 to 256 (default 32).")
    ] = None,
    seed: Annotated[int, typer.Option(help="shapes: the same seed gives the same bytes.")] = 0,
    grey: Annotated[bool, typer.Option("--grey", help="shapes: one grey channel instead of RGB.")] = False,
    project_dir: ProjectDir = Path("."),
) -> None:
    """Replace data/raw with a built-in dataset, generated here, and track it with DVC."""
    from components.data.importers import builtin_dataset, check_project, commit_hint, install_dataset
    from components.data.raw import DataError
    from components.data.versioning import DvcError

    try:
        check_project(project_dir)
        dataset = install_dataset(
            builtin_dataset(name, size=size, resolution=resolution, seed=seed, grey=grey), project_dir
        )
    except (DataError, DvcError) as err:
        raise _fail(str(err)) from err
    console.print(commit_hint(dataset))


if __name__ == "__main__":
    app()
