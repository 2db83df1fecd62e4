"""Where the wall-clock of one `genpipe run` goes: start-up, data preparation, training, evaluation,
registration (register + promote), read back from Prefect's own record of the task runs; and the
flow process's peak memory (its RSS high-water mark), which evaluating in that process used to drive.

Runs the flow once on this project with `--force` semantics against a throw-away MLflow store, so the
project's own registry is untouched. Phases that overlap (models train two at a time) are measured as
the span from the first task of that kind starting to the last one ending.

    .venv/bin/python bench/pipeline_timing.py                         # vae, made, dcgan
    .venv/bin/python bench/pipeline_timing.py --models vae --epochs 5
    .venv/bin/python bench/pipeline_timing.py --models all --results bench/RESULTS-pipeline-14.md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from common import machine, publish, results_arguments

RESULTS = Path(__file__).with_name("RESULTS-pipeline-timing.md")
PROJECT = Path(__file__).resolve().parents[1]
TASKS = ("prepare-data", "plan", "train", "evaluate", "register", "promote")
PHASES = {
    "prepare": ("prepare-data", "plan"),
    "training": ("train",),
    "evaluation": ("evaluate",),
    "registration": ("register", "promote"),
}


async def task_spans(flow_run_id) -> dict[str, list[tuple[float, float]]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        flow = await client.read_flow_run(flow_run_id)
    spans: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.start_time and run.end_time:
            kind = next((k for k in TASKS if run.name.startswith(k)), run.name)
            spans.setdefault(kind, []).append((run.start_time.timestamp(), run.end_time.timestamp()))
    spans["flow"] = [(flow.start_time.timestamp(), flow.end_time.timestamp())]
    return spans


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="vae,made,dcgan", help="comma-separated, or 'all' (params.yaml's list)"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--project", type=Path, default=PROJECT, help="the project to run (default: this one)"
    )
    results_arguments(parser, RESULTS)
    args = parser.parse_args()
    process_start = time.time()
    with tempfile.TemporaryDirectory(prefix="genpipe-timing-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        from flows.retrain import retrain

        imported = time.time()
        state = retrain(
            project_dir=str(args.project),
            models=None if args.models == "all" else args.models.split(","),
            force=True,
            overrides={"train": {"epochs": args.epochs}},
            return_state=True,
        )
        finished = time.time()
        if not state.is_completed():
            print(state.message, file=sys.stderr)
            return 1
        spans = asyncio.run(task_spans(state.state_details.flow_run_id))

    flow_start, flow_end = spans["flow"][0]
    rows = [
        ("start-up: imports", imported - process_start),
        ("start-up: Prefect temporary server and flow run", flow_start - imported),
    ]
    for phase, kinds in PHASES.items():
        intervals = [span for kind in kinds for span in spans.get(kind, [])]
        rows.append((phase, max(e for _, e in intervals) - min(s for s, _ in intervals)))
    plan_end = max(e for _, e in spans["plan"])
    first_train = min(s for s, _ in spans["train"])
    rows.insert(3, ("start-up: Ray instance (between plan and first training)", first_train - plan_end))
    rows.append(("wind-down: flow end to process end", finished - flow_end))
    total = finished - process_start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    first_evaluation, last_training = min(s for s, _ in spans["evaluate"]), max(s for s, _ in spans["train"])
    table = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in rows)
    report = f"""# Where the time of one `genpipe run` goes

Models: {args.models}; {args.epochs} epochs; 2 models at a time; data already prepared (DVC stages up to date).
Phases overlap across models: each row is the span from its first task's start to its last task's end.

Machine: {machine()}.
Command: `.venv/bin/python bench/pipeline_timing.py {" ".join(sys.argv[1:])}`

| phase | seconds |
|---|---:|
{table}
| **total** | **{total:.1f}** |

The flow process's peak RSS: **{peak_mib:,.0f} MiB**. The first evaluation started
{first_evaluation - last_training:+.1f} s after the last training started (negative: while models still waited to train).
"""
    publish(args, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
