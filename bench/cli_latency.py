"""Benchmark the read-only commands' latency: wall time of `genpipe --help`, `models`, `status`, `lineage`.

Each command runs as a new process (`python -m flows.cli ...`, as a user's shell starts `genpipe`)
against a project whose registry holds one champion version, once in a SQLite file beside the
project and once in a real `mlflow server` (`MLFLOW_TRACKING_URI`). Several checkouts can be
measured side by side (`--checkout before=/path/to/old/checkout`); their runs are interleaved, so a
shared machine's changing load hits them alike. Reported: the median of `--repeat` runs (and the
range) of wall time, and of CPU time, which a loaded machine inflates less.

    .venv/bin/python bench/cli_latency.py                                  # this checkout
    .venv/bin/python bench/cli_latency.py --checkout before=../main --checkout after=.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from common import machine, publish, results_arguments

HERE = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS-cli-latency.md")
MODEL, VERSION = "digits.vae", "1"
UNCHANGED, WRITTEN = "store unchanged since the last read", "first read after another program's write"


def registry_project(directory: Path, tracking_uri: str):
    """A project (params.yaml) whose registry at `tracking_uri` holds `MODEL` v`VERSION` as champion,
    with lineage tags; returns the client that wrote it."""
    from components.registry.store import client_for

    shutil.copy(HERE / "params.yaml", directory / "params.yaml")
    client = client_for(tracking_uri)
    client.create_registered_model(MODEL)
    run = client.create_run(client.create_experiment("bench")).info  # a server wants a run's source
    version = client.create_model_version(
        MODEL,
        f"{run.artifact_uri}/model",
        run.run_id,
        tags={"primary_metric": "test_nll_bound", "metric.test_nll_bound": "71.3", "data_version": "0" * 32},
    )
    client.set_registered_model_alias(MODEL, "champion", version.version)
    return client


def commands(project: Path) -> dict[str, list[str]]:
    """Each command's arguments."""
    return {
        "genpipe --help": ["--help"],
        "genpipe models": ["models"],
        "genpipe status": ["status", "-C", str(project)],
        "genpipe lineage": ["lineage", MODEL, VERSION, "-C", str(project)],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(root: Path):
    """A real `mlflow server` (SQLite backend) on a free loopback port; yields its URL."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        *("server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"),
        *(
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
        ),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(root / "server.log", "w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"mlflow server did not start; see {root / 'server.log'}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def timed(checkout: Path, arguments: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of `python -m flows.cli <arguments>` run from `checkout`."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments],
        cwd=checkout,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, **env, "COLUMNS": "200"},
    )
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkout",
        action="append",
        metavar="LABEL=DIR",
        help="a checkout to measure (repeatable); default: this one",
    )
    parser.add_argument("--repeat", type=int, default=5)
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    from components.registry.store import resolve_tracking_uri

    checkouts = dict(item.split("=", 1) for item in args.checkout or [f"this checkout={HERE}"])
    load_at_start = os.getloadavg()[0]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="genpipe-cli-latency-") as tmp:
        sqlite_project, server_project = Path(tmp, "sqlite"), Path(tmp, "server")
        sqlite_project.mkdir(), server_project.mkdir()
        with mlflow_server(server_project) as server:
            stores = {
                "SQLite file": (sqlite_project, resolve_tracking_uri(None, sqlite_project), {}),
                "mlflow server": (server_project, server, {"MLFLOW_TRACKING_URI": server}),
            }
            for store, (project, uri, env) in stores.items():
                client = registry_project(project, uri)
                jobs = commands(project)
                if store != "SQLite file":  # --help and models read no store
                    jobs = {name: arguments for name, arguments in jobs.items() if "-C" in arguments}
                for (
                    checkout
                ) in checkouts.values():  # one untimed run each: byte-compiles, warms the page cache
                    for arguments in jobs.values():
                        timed(Path(checkout), arguments, env)
                for round_ in range(args.repeat):
                    for command, arguments in jobs.items():
                        for situation in (UNCHANGED, WRITTEN) if "-C" in arguments else (UNCHANGED,):
                            row = f"`{command}`, {store}" + (f", {situation}" if "-C" in arguments else "")
                            rows += [row] if row not in rows else []
                            for label, checkout in checkouts.items():
                                if situation == UNCHANGED:  # the same read just before, untimed
                                    timed(Path(checkout), arguments, env)
                                else:
                                    client.set_registered_model_tag(
                                        MODEL, "bench_round", f"{round_} {label} {row}"
                                    )
                                times.setdefault((row, label), []).append(
                                    timed(Path(checkout), arguments, env)
                                )
                print(f"measured {store}", file=sys.stderr)

    header = "| command | " + " | ".join(
        f"{label}: wall s, median (range) | {label}: CPU s" for label in checkouts
    )
    lines = [header + " |", "|---|" + "---:|---:|" * len(checkouts)]
    for row in rows:
        cells = []
        for label in checkouts:
            walls, cpus = zip(*times[(row, label)], strict=True)
            cells.append(f"{statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})")
            cells.append(f"{statistics.median(cpus):.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    report = "\n".join(
        [
            "# Latency of the read-only commands",
            "",
            f"Wall and CPU (user + system) time of a new process per command (`python -m flows.cli ...`), "
            f"median of {args.repeat} runs after one warm-up run; a project whose registry holds one "
            "champion version, in a SQLite file beside the project or in a real `mlflow server` on loopback "
            '(`MLFLOW_TRACKING_URI`). "After another program\'s write": a registered-model tag is set '
            "just before (as the MLflow UI or a script would); otherwise the same read ran just before. On a "
            "shared machine the CPU time is the steadier figure: a quiet machine's wall time is close to it.",
            "",
            f"Machine: {machine()}; 1-minute load average {load_at_start:.1f} at the start "
            "(other jobs share this machine).",
            "Checkouts: " + ", ".join(f"{label} = `{path}`" for label, path in checkouts.items()),
            f"Command: `.venv/bin/python bench/cli_latency.py {' '.join(sys.argv[1:])}`",
            "",
            *lines,
        ]
    )
    publish(args, report)


if __name__ == "__main__":
    main()
