"""Training driven on a running multi-node Ray cluster from a process of its own.

A test process is already connected to the session's local Ray instance, so a run on another cluster
(the stack's head and worker) needs a driver process: `drive` is its body, `DriverRun` starts it and
records which node each Ray Train worker ran on, from the cluster's process trees.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import ray
from conftest import cpu_job

from components.models import create_model
from components.training.ray_train import Scaling, train_on_ray
from components.training.trainer import TrainJob

TINY_VAE = {"latent_dim": 4, "channels": 8, "hidden": 32}
JOB_EPOCHS, JOB_BATCH, JOB_SEED = 3, 32, 5
NODE_WAIT_S = 120
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def digits_job(image_shape, checkpoint_every_steps: int = 0) -> TrainJob:
    """The job of the cluster runs: trained once uninterrupted, the reference of the run whose worker
    is killed."""
    spec = create_model("vae", image_shape, **TINY_VAE).spec
    return cpu_job(
        spec,
        epochs=JOB_EPOCHS,
        batch_size=JOB_BATCH,
        lr=3e-3,
        seed=JOB_SEED,
        checkpoint_every_steps=checkpoint_every_steps,
    )


def ray_actor_processes(root: psutil.Process, actor: str) -> list[psutil.Process]:
    """Processes below `root` of Ray actors of class `actor`; Ray titles them `ray::<actor>...`."""
    found = []
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(process.cmdline()).startswith(f"ray::{actor}"):
                found.append(process)
    return found


def raylet_node_id(worker: psutil.Process) -> str:
    """The Ray node id of the raylet that started `worker` (from the raylet's --node_id flag)."""
    for parent in worker.parents():
        for arg in parent.cmdline():
            if parent.name() == "raylet" and arg.startswith("--node_id="):
                return arg.removeprefix("--node_id=")
    raise AssertionError(f"worker {worker.pid} has no raylet among its parents")


def drive(address: str, nodes: int, prepared_dir: str, run: dict) -> None:
    """Body of the driver process: wait for the cluster's `nodes`, train `digits_job` with one worker
    per node, write the outcome and the alive nodes' ids to `run["result_file"]`."""
    from components.data.prepared import load_prepared

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    deadline = time.monotonic() + NODE_WAIT_S
    while len(alive := [n for n in ray.nodes() if n["Alive"]]) < nodes and time.monotonic() < deadline:
        time.sleep(0.5)
    data = load_prepared(prepared_dir)
    storage = Path(run["storage"])
    outcome = train_on_ray(
        digits_job(data.image_shape, run["checkpoint_every_steps"]),
        data.train.images,
        data.val.binary.astype(np.float32),
        scaling=Scaling(
            workers=nodes, gpus_per_worker=0, cpus_per_worker=1, max_failures=run["max_failures"]
        ),
        storage_path=storage,
        run_name=run["name"],
        output_dir=storage / f"{run['name']}-model",
    )
    record = {
        "steps": outcome.steps,
        "history": outcome.history,
        "diverged": outcome.diverged,
        "nodes": sorted(n["NodeID"] for n in alive),
    }
    Path(run["result_file"]).write_text(json.dumps(record))
    ray.shutdown()


@dataclass
class DriverRun:
    """One `drive` process against the cluster at `address`, whose node processes are `node_roots`."""

    address: str
    env: dict[str, str]
    node_roots: list[int]
    work: Path
    name: str
    checkpoint_every_steps: int = 0
    max_failures: int = 0
    workers: dict[int, str] = field(default_factory=dict)  # pid -> node id of its raylet

    @property
    def run_dir(self) -> Path:
        """Where Ray Train keeps this run's checkpoints and its checkpoint manager's record."""
        return self.work / "ray" / self.name

    def current_workers(self) -> list[psutil.Process]:
        found = []
        for pid in self.node_roots:
            with contextlib.suppress(psutil.Error):
                found += ray_actor_processes(psutil.Process(pid), "RayTrainWorker")
        return found

    def run(self, prepared_dir: Path, nodes: int, while_running: Callable[[], None] = lambda: None) -> dict:
        """Drives the training to its end, calling `while_running` every 50 ms meanwhile."""
        result_file = self.work / f"{self.name}.json"
        driver_log = self.work / f"{self.name}-driver.log"
        run = {
            "storage": str(self.work / "ray"),
            "name": self.name,
            "checkpoint_every_steps": self.checkpoint_every_steps,
            "max_failures": self.max_failures,
            "result_file": str(result_file),
        }
        call = (
            f"from two_nodes import drive; drive({self.address!r}, {nodes}, {str(prepared_dir)!r}, {run!r})"
        )
        paths = [Path(__file__).parent, PROJECT_ROOT / "tests", PROJECT_ROOT]
        env = {**self.env, "PYTHONPATH": os.pathsep.join(map(str, paths))}
        with driver_log.open("w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-c", call], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            while driver.poll() is None:
                for worker in self.current_workers():
                    with contextlib.suppress(psutil.Error):
                        self.workers.setdefault(worker.pid, raylet_node_id(worker))
                while_running()
                time.sleep(0.05)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        assert driver.returncode == 0, f"driver of {self.name!r} failed:\n{driver_log.read_text()[-4000:]}"
        return json.loads(result_file.read_text())
