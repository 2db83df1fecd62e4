"""Where a command's CPU goes, by kind of process: run it, read every process's CPU time once a second.

For the test suite, whose processes come and go by the hundred (each Ray Train fit starts its own actors,
each `genpipe run` its own Prefect server): a per-process profile says which of them the machine's time
is spent in, where the per-test durations only say which tests wait longest. Every process on the
machine is read, as Ray's actors are not children of the command; a process's CPU is the most its
counters showed while it was seen, so one that lives under a second, or the last second of one, can be
missed, and a process whose command line was already gone counts under "others".

    .venv/bin/python bench/suite_cpu.py -- .venv/bin/python -m pytest -n 2 --dist loadfile -m "not alone"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from common import machine

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# First match wins: the specific kinds before the test processes, whose paths the others' command lines
# contain (a project under pytest's temporary directory).
KINDS = {
    "Ray Train actors of each fit (controller, workers, helpers)": (
        r"ray::(RayTrainWorker|TrainController|PlacementGroupCleaner|DatasetManager|SynchronizationActor"
        r"|PreemptionWatcher|SplitCoordinator)"
    ),
    "Ray's pooled worker processes, last seen idle": r"ray::IDLE|default_worker\.py",
    "Ray's services (raylet, GCS, dashboard, agents, log monitor, `ray status`)": (
        r"/raylet |gcs_server|dashboard|DashboardAgent|log_monitor|monitor\.py|RuntimeEnvAgent"
        r"|_AutoscalingCoordinatorActor|_StatsActor|ray status|ray\.util\.client"
    ),
    "genpipe's Ray actor and tasks (progress inbox, evaluations)": r"ray::(ProgressInbox|_evaluation_task)",
    "`genpipe` and `prefect` commands (run, schedule, deploy, ...)": r"flows\.cli|bin/genpipe |bin/prefect (?!server)",
    "flow runs started by a served deployment": r"-m prefect\.engine",
    "Prefect servers (shared and temporary)": r"prefect server start|prefect\.server\.api",
    "MLflow servers": r"mlflow",
    "DVC and its stages": r"dvc|components\.evaluation\.featurizer|components\.data\.prepared",
    "chromium": r"chrom",
    "the test processes (pytest and its xdist workers)": r"sys\.stdin|bin/pytest|-m pytest",
}
OTHERS = "others (mostly processes whose command line was gone when read)"


def _read(pid: str) -> tuple[str, float, str]:
    """(identity, CPU seconds, command line) of a process; the identity survives pid reuse."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    with open(f"/proc/{pid}/cmdline") as cmdline:
        command = cmdline.read().replace("\0", " ")
    return f"{pid}-{fields[19]}", (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, command


def _read_all() -> Iterator[tuple[str, tuple[float, str]]]:
    """Every process but this one, as (identity, (CPU seconds, command line))."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            identity, cpu, line = _read(pid)
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue  # ended between the listing and the read
        yield identity, (cpu, line)


def _machine_busy() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait


def sample(command: list[str], interval: float) -> tuple[list[dict], int, float, float]:
    """Run `command` to its end; per process its CPU and last command line; its exit status, wall
    seconds, and the share of the machine's CPU time that was busy meanwhile."""
    processes: dict[str, dict] = {}
    spent_before = {identity: cpu for identity, (cpu, _) in _read_all()}  # not the command's
    started, busy_before = time.monotonic(), _machine_busy()
    child = subprocess.Popen(command)
    while child.poll() is None:
        time.sleep(interval)
        for identity, (cpu, line) in _read_all():
            seen = processes.setdefault(identity, {"cpu": 0.0, "command": line})
            seen["cpu"] = max(seen["cpu"], cpu - spent_before.get(identity, 0.0))
            seen["command"] = line or seen["command"]  # Ray retitles its workers once they are given work
    total, idle = (end - start for end, start in zip(_machine_busy(), busy_before, strict=True))
    return list(processes.values()), child.returncode, time.monotonic() - started, 1 - idle / max(total, 1)


def by_kind(processes: list[dict]) -> dict[str, tuple[int, float]]:
    kinds: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for seen in processes:
        kind = next((k for k, pattern in KINDS.items() if re.search(pattern, seen["command"])), OTHERS)
        kinds[kind][0] += 1
        kinds[kind][1] += seen["cpu"]
    return {kind: (count, cpu) for kind, (count, cpu) in sorted(kinds.items(), key=lambda kv: -kv[1][1])}


def table(kinds: dict[str, tuple[int, float]]) -> str:
    total = sum(cpu for _, cpu in kinds.values())
    rows = [
        f"| {kind} | {count} | {cpu:,.0f} | {100 * cpu / total:.0f} % |"
        for kind, (count, cpu) in kinds.items()
    ]
    return "\n".join(
        ["| processes | seen | CPU s | share |", "|---|---:|---:|---:|", *rows, f"| all | | {total:,.0f} | |"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads")
    parser.add_argument("--raw", type=Path, help="also write every process's record here (JSON)")
    parser.add_argument("--regroup", type=Path, help="tabulate a --raw file of an earlier run instead")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    if args.regroup:
        print(table(by_kind(json.loads(args.regroup.read_text()))))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to profile after --")
    processes, status, wall, busy = sample(command, args.interval)
    if args.raw:
        args.raw.write_text(json.dumps(processes))
    print(f"\nMachine: {machine()}.\nCommand: `{' '.join(command)}` (exit status {status})")
    print(f"{wall:,.0f} s wall, machine busy {100 * busy:.0f} % of it.\n")
    print(table(by_kind(processes)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
