"""`genpipe`: run the retraining flow, schedule it, inspect the registry, sample, import data."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Reproducible, distributed retraining of deep generative models.", no_args_is_help=True
)
data_app = typer.Typer(help="Bring data under version control.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

ProjectDir = Annotated[Path, typer.Option("--project-dir", "-C", help="Project directory with params.yaml.")]


def _csv(value: str | None) -> list[str] | None:
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=1)


def _tracking(project_dir: Path):
    from components.config import load_params
    from components.registry.tracking import client_for, resolve_tracking_uri

    params = load_params(project_dir / "params.yaml")
    uri = resolve_tracking_uri(params["tracking"]["mlflow_tracking_uri"], project_dir)
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
    project_dir: ProjectDir = Path("."),
) -> None:
    """Run the retraining flow once: prepare, train, evaluate, register, promote."""
    from prefect.task_runners import ThreadPoolTaskRunner

    from components.config import ConfigError, load_params
    from flows.retrain import retrain

    train = {
        "epochs": epochs,
        "workers": workers,
        "gpus_per_worker": gpus_per_worker,
        "max_concurrent_models": max_concurrent,
    }
    overrides = {"train": {k: v for k, v in train.items() if v is not None}}
    try:
        params = load_params(project_dir / "params.yaml", overrides)
    except ConfigError as err:
        raise _fail(str(err)) from err
    flow = retrain.with_options(
        task_runner=ThreadPoolTaskRunner(max_workers=int(params["train"]["max_concurrent_models"]))
    )
    started = time.monotonic()
    with console.status("[bold]genpipe: retraining (Prefect logs below)..."):
        state = flow(
            project_dir=str(project_dir),
            models=_csv(models),
            overrides=overrides,
            ray_address=ray_address,
            return_state=True,
        )
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, list):
        raise _fail(f"the flow failed before training: {state.message or summary}")
    table = Table(title=f"genpipe run ({time.monotonic() - started:.0f} s)")
    for column in ("model", "status", "version", "detail"):
        table.add_column(column)
    for row in summary:
        colour = {"promoted": "green", "failed": "red"}.get(row["status"], "yellow")
        table.add_row(
            row["model"], f"[{colour}]{row['status']}[/{colour}]", str(row["version"] or "-"), row["detail"]
        )
    console.print(table)
    _, uri, _ = _tracking(project_dir)
    console.print(f"Results: MLflow at [bold]{uri}[/bold]; weights under {project_dir / 'outputs'}")
    console.print(f"  MLflow UI:  mlflow ui --backend-store-uri {uri}")
    console.print("  Prefect UI: prefect server start   (then open http://127.0.0.1:4200)")
    console.print("  Registry:   genpipe status")
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
    from components.registry.models import registry_status

    _, uri, client = _tracking(project_dir)
    rows = registry_status(client)
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
        table.add_row(*(str(value) for value in row.values()))
    console.print(table)


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
    from components.registry.models import load_version, registered_name, version_by_alias

    params, _, client = _tracking(project_dir)
    try:
        name = registered_name(dataset or dataset_name(project_dir / params["data"]["raw_dir"]), model)
        version = version_by_alias(client, name, alias)
    except (DataError, LookupError) as err:
        raise _fail(str(err)) from err
    loaded = load_version(client, version)
    images = loaded.sample(n, generator=torch.Generator().manual_seed(seed))
    save_grid(images, output)
    console.print(f"Wrote {n} samples of {name} v{version.version} (@{alias}) to {output}")


@app.command("models")
def list_families() -> None:
    """List the registered model families and their hyper-parameters."""
    from components.models import hyperparameters, list_models
    from components.models.registry import model_class

    table = Table(title="Model families")
    for column in ("name", "kind", "primary metric", "hyper-parameters (defaults)"):
        table.add_column(column)
    for name in list_models():
        cls = model_class(name)
        params = ", ".join(f"{k}={v}" for k, v in hyperparameters(name).items())
        table.add_row(name, cls.data_kind, cls.primary_metric, params)
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


if __name__ == "__main__":
    app()
