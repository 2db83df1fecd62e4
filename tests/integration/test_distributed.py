"""The distributed path on real Ray: DDP gradients, a two-node cluster, a killed worker, divergence.

Nothing is mocked. The two-node cluster is two `ray start --block` processes on loopback, driven from a
subprocess because this process is already connected to the session's Ray instance.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from ray import cloudpickle
from ray_checkpoints import CrashAfterCheckpoint, SimulatedCrash, registered_step
from torch.overrides import TorchFunctionMode

from components.config import load_params
from components.models import create_model
from components.training.batches import DeviceBatches
from components.training.jobs import TrainingDiverged, train_job, train_model
from components.training.ray_train import RayContext, Scaling, train_on_ray
from components.training.trainer import (
    STATE_FILE,
    LocalContext,
    TrainJob,
    WorkerContext,
    _distribute,
    read_outcome,
    run_training,
    seed_everything,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# Ray workers cannot import a test module by name, so the worker loop defined here travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TINY_VAE = {"latent_dim": 4, "channels": 8, "hidden": 32}
GRADIENT_FAMILIES = {"vae": TINY_VAE, "gan": {"latent_dim": 8, "hidden": 32}}
GLOBAL_BATCH = 16
SEED = 5
NODE_START_TIMEOUT_S = 120
JOB_EPOCHS, JOB_BATCH = 3, 32


def digits_job(image_shape, checkpoint_every_steps: int = 0) -> TrainJob:
    """The job trained on two nodes and, with a worker killed, on the session's instance: the
    two-node run is the uninterrupted reference of the killed one."""
    spec = create_model("vae", image_shape, **TINY_VAE).spec
    return TrainJob(
        model=spec.to_dict(),
        epochs=JOB_EPOCHS,
        batch_size=JOB_BATCH,
        lr=3e-3,
        seed=SEED,
        checkpoint_every_steps=checkpoint_every_steps,
        precision="auto",
        compile=False,
        sample_every_epochs=0,
    )


# --- 0. In-process: a crash right after an epoch-end checkpoint (runs before any Ray start-up) -------


def test_crash_after_an_epoch_end_checkpoint_keeps_that_epochs_metrics(digits, tmp_path):
    steps_per_epoch = -(-len(digits.train) // 128)
    job = replace(
        digits_job(digits.image_shape, checkpoint_every_steps=steps_per_epoch), batch_size=128, epochs=2
    )
    x_val = digits.val.binary.astype(np.float32)
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "uninterrupted"))
    with pytest.raises(SimulatedCrash):
        run_training(
            job, digits.train.images, x_val, CrashAfterCheckpoint(tmp_path / "crashed", steps_per_epoch)
        )
    run_training(job, digits.train.images, x_val, LocalContext(tmp_path / "crashed"))
    resumed, uninterrupted = read_outcome(tmp_path / "crashed"), read_outcome(tmp_path / "uninterrupted")
    assert resumed.steps == 2 * steps_per_epoch
    assert resumed.history[0] == uninterrupted.history[0]  # epoch 1 ran once, before the crash


# --- 1. DDP under Ray Train: two workers with batch B give the gradient of one process with 2B ---------


class SharedNoise(TorchFunctionMode):
    """Gives every example of the global batch the same Gaussian noise however the batch is sharded.

    Each `torch.randn` / `torch.randn_like` call draws noise for the whole global batch from one
    seeded generator and keeps this rank's rows. `DistributedSampler` deals examples round-robin,
    so global row i sits on rank i % world as local row i // world: rows `rank::world`.
    """

    def __init__(self, rank: int, world_size: int, seed: int):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        local = func(*args, **(kwargs or {}))
        if func not in (torch.randn, torch.randn_like):
            return local
        self.calls += 1
        full = torch.randn(len(local) * self.world_size, *local.shape[1:], generator=self.generator)
        return full[self.rank :: self.world_size].to(local)


def phase_gradients(family: str, data: np.ndarray, ctx: WorkerContext) -> dict[str, np.ndarray]:
    """Flattened gradient of each phase's loss on this worker's first batch, from the initial weights,
    with the model wrapped and the data sharded exactly as `run_training` does."""
    seed_everything(SEED)
    model = create_model(family, data.shape[1:], **GRADIENT_FAMILIES[family])
    network = _distribute(model, ctx)
    batches = DeviceBatches(
        data,
        GLOBAL_BATCH // ctx.world_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=SEED,
        device=ctx.device,
    )
    batch = next(iter(batches.epoch(0)))
    gradients = {}
    for phase in model.phases:
        model.zero_grad(set_to_none=True)
        with SharedNoise(ctx.rank, ctx.world_size, SEED) as noise:
            network(batch, phase)["loss"].backward()
        assert noise.calls > 0, f"{family} drew no Gaussian noise in phase {phase}: the control is moot"
        flat = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
        gradients[phase] = torch.cat([g.flatten() for g in flat]).numpy()
    return gradients


def _gradient_worker(config: dict) -> None:
    ctx = RayContext()
    for family in GRADIENT_FAMILIES:
        for phase, gradient in phase_gradients(family, config["data"], ctx).items():
            np.save(Path(config["out"]) / f"{family}-{phase}-rank{ctx.rank}.npy", gradient)


@pytest.fixture(scope="module")
def ddp_gradients(ray_instance, tmp_path_factory) -> Path:
    """Per-rank gradients written by two Ray Train workers (one gloo process group, 1 CPU each)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("gradients")
    TorchTrainer(
        _gradient_worker,
        train_loop_config={"data": gradient_data(), "out": str(out)},
        scaling_config=Scaling(workers=2, gpus_per_worker=0).scaling_config(),
        run_config=RunConfig(name="ddp-gradients", storage_path=str(out / "ray")),
    ).fit()
    return out


def gradient_data() -> np.ndarray:
    """The same binary images in every process (drawn from a local generator, not a global one)."""
    return (np.random.default_rng(SEED).random((GLOBAL_BATCH, 1, 8, 8)) < 0.5).astype(np.float32)


@pytest.mark.parametrize("family", sorted(GRADIENT_FAMILIES))
def test_two_ddp_workers_match_one_process_on_the_double_batch(family, ddp_gradients, tmp_path):
    single = phase_gradients(family, gradient_data(), LocalContext(tmp_path))
    for phase, expected in single.items():
        rank0, rank1 = (np.load(ddp_gradients / f"{family}-{phase}-rank{r}.npy") for r in (0, 1))
        np.testing.assert_array_equal(
            rank0, rank1, err_msg=f"{family}/{phase}: ranks disagree after all-reduce"
        )
        assert np.linalg.norm(expected) > 1e-3, f"{family}/{phase}: vanishing gradient proves nothing"
        np.testing.assert_allclose(rank0, expected, rtol=1e-4, atol=1e-6, err_msg=f"{family}/{phase}")


# --- 2. A real two-node cluster on loopback ----------------------------------------------------------


def ray_train_workers(root: psutil.Process) -> list[psutil.Process]:
    """Ray Train worker processes below `root`; Ray titles them `ray::RayTrainWorker...`."""
    workers = []
    for process in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                workers.append(process)
    return workers


def raylet_node_id(worker: psutil.Process) -> str:
    """The Ray node id of the raylet that started `worker` (from the raylet's --node_id flag)."""
    for parent in worker.parents():
        for arg in parent.cmdline():
            if parent.name() == "raylet" and arg.startswith("--node_id="):
                return arg.removeprefix("--node_id=")
    raise AssertionError(f"worker {worker.pid} has no raylet among its parents")


def _ahead_of_the_suite() -> None:
    """Run a test cluster's node processes ahead of the rest of the suite where allowed (root).

    On 2 cores, the other test process's flows (two trainings and their evaluations) starve a new
    raylet past the 30 s Ray gives it to register; its workers still drop to Ray's nice 15 relative
    to this. Without the permission, the node starts at normal priority and only the retry helps.
    """
    with contextlib.suppress(PermissionError):
        os.nice(-10)


class RayNodeTimedOut(RuntimeError):
    """`ray start` gave up waiting for its raylet to register (Ray's fixed 30 s)."""


@dataclass
class RayNode:
    """One `ray start --block` process; terminating it shuts its node down."""

    process: subprocess.Popen
    temp_dir: Path
    log: Path

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], attempts: int = 3) -> RayNode:
        """Ray gives a new node's raylet a fixed 30 s to register; on a busy machine that can pass,
        and `ray start` exits saying so: such a start is tried again."""
        for attempt in range(1, attempts + 1):
            try:
                return cls._start_once(args, env)
            except RayNodeTimedOut:
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start_once(cls, args: list[str], env: dict[str, str]) -> RayNode:
        # Short, private temp dirs: Ray's socket paths must stay under the 107-byte limit.
        temp_dir = Path(tempfile.mkdtemp(prefix="gp-ray-", dir="/tmp"))
        log = temp_dir / "ray-start.log"
        command = [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats"]
        with log.open("w") as stream:
            process = subprocess.Popen(
                [*command, "--num-cpus=1", f"--temp-dir={temp_dir}", *args],
                env=env,
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_ahead_of_the_suite,
            )
        node = cls(process, temp_dir, log)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                said = log.read_text()[-3000:]  # before stopping the node removes its directory
                stop_nodes([node])
                failure = RayNodeTimedOut if "timed out during startup" in said else RuntimeError
                raise failure(f"`ray start {' '.join(args)}` did not come up:\n{said}")
            time.sleep(0.5)
        return node

    def processes(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        return []


def stop_nodes(nodes: list[RayNode]) -> None:
    """What `ray stop` does, for these nodes only (`ray stop` would end every Ray on the machine):
    SIGTERM to each process, SIGKILL to those still alive after a grace period."""
    processes = [p for node in nodes for p in node.processes()]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=3)  # a raylet drains for ~10 s: not worth waiting
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    for node in nodes:
        node.process.wait()
        shutil.rmtree(node.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster() -> Iterator[tuple[str, dict[str, str], dict[str, RayNode]]]:
    """Head (custom resource node_a) and one worker node (node_b), 1 CPU each, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Ray 2.60 enables token authentication: every process of the cluster shares this token.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{port}"
    nodes: dict[str, RayNode] = {}
    try:
        nodes["node_a"] = RayNode.start(
            ["--head", f"--port={port}", "--include-dashboard=false", '--resources={"node_a": 1}'], env
        )
        nodes["node_b"] = RayNode.start([f"--address={address}", '--resources={"node_b": 1}'], env)
        yield address, env, nodes
    finally:
        stop_nodes(list(nodes.values()))


def drive_two_node_training(address: str, prepared_dir: str, storage: str, result_file: str) -> None:
    """Driver of the two-node run (in its own process): train `digits_job` with one worker per CPU."""
    from components.data.prepared import load_prepared

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while len(alive := [n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    data = load_prepared(prepared_dir)
    outcome = train_on_ray(
        digits_job(data.image_shape),
        data.train.images,
        data.val.binary.astype(np.float32),
        scaling=Scaling(workers=2, gpus_per_worker=0, cpus_per_worker=1, max_failures=0),
        storage_path=storage,
        run_name="two-nodes",
        output_dir=Path(storage) / "model",
    )
    nodes = {key: n["NodeID"] for n in alive for key in ("node_a", "node_b") if key in n["Resources"]}
    record = {"steps": outcome.steps, "history": outcome.history, "nodes": nodes}
    Path(result_file).write_text(json.dumps(record))
    ray.shutdown()


@pytest.fixture(scope="module")
def two_node_run(digits_root, tmp_path_factory) -> dict:
    """Trains `digits_job` on a fresh two-node cluster and records where its Ray Train workers ran."""
    work = tmp_path_factory.mktemp("two-nodes")
    result_file = work / "result.json"
    driver_log = work / "driver.log"
    call = (
        f"from test_distributed import drive_two_node_training; "
        f"drive_two_node_training({{address!r}}, {str(digits_root / 'prepared')!r}, {str(work / 'ray')!r}, "
        f"{str(result_file)!r})"
    )
    workers: dict[int, str] = {}  # pid -> node id of its raylet
    with two_node_cluster() as (address, env, nodes):
        env = {**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(PROJECT_ROOT)])}
        with driver_log.open("w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-c", call.format(address=address)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        while driver.poll() is None:
            for node in nodes.values():
                for worker in ray_train_workers(psutil.Process(node.process.pid)):
                    with contextlib.suppress(psutil.Error):
                        workers.setdefault(worker.pid, raylet_node_id(worker))
            time.sleep(0.1)
    assert driver.returncode == 0, f"two-node driver failed:\n{driver_log.read_text()[-4000:]}"
    return {**json.loads(result_file.read_text()), "workers": workers}


def test_two_node_training_places_one_worker_on_each_node(two_node_run, digits):
    nodes = two_node_run["nodes"]
    assert sorted(nodes) == ["node_a", "node_b"] and nodes["node_a"] != nodes["node_b"]
    hosts = sorted(two_node_run["workers"].values())
    assert hosts == sorted(nodes.values()), f"workers by node: {two_node_run['workers']}, nodes: {nodes}"
    steps_per_epoch = -(-len(digits.train) // 2 // JOB_BATCH)
    assert two_node_run["steps"] == JOB_EPOCHS * steps_per_epoch
    assert [h["epoch"] for h in two_node_run["history"]] == list(range(1, JOB_EPOCHS + 1))


# --- 3. A Ray Train worker killed mid-training --------------------------------------------------------


def checkpoint_steps(run_dir: Path, known: dict[str, int]) -> None:
    """Adds to `known` the step of each complete checkpoint in `run_dir` not seen before."""
    for directory in run_dir.glob("checkpoint_*"):
        if directory.name not in known:
            with contextlib.suppress(OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # mid-copy
                known[directory.name] = torch.load(directory / STATE_FILE, weights_only=True)["step"]


def test_killed_worker_resumes_from_the_latest_checkpoint(digits, two_node_run, ray_instance, tmp_path):
    """SIGKILL one of two workers once Ray has registered a checkpoint: the group restarts, every
    checkpoint written afterwards is past the registered one (a restart from scratch would write
    step 5 again), and the run ends where the uninterrupted two-node run did."""
    job = digits_job(digits.image_shape, checkpoint_every_steps=5)
    run_dir = tmp_path / "ray" / "killed"
    seen: dict[str, int] = {}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            train_on_ray,
            job,
            digits.train.images,
            digits.val.binary.astype(np.float32),
            scaling=Scaling(workers=2, gpus_per_worker=0, max_failures=2),
            storage_path=tmp_path / "ray",
            run_name="killed",
            output_dir=tmp_path / "model",
        )
        while (killed_after := registered_step(run_dir)) < job.checkpoint_every_steps:
            assert not future.done(), f"training ended before a worker could be killed: {future.result()}"
            time.sleep(0.02)
        first_group = ray_train_workers(psutil.Process())
        assert len(first_group) == 2, f"expected two Ray Train workers, found {first_group}"
        checkpoint_steps(run_dir, seen)
        before_kill = {d.name for d in run_dir.glob("checkpoint_*")}
        first_group[-1].send_signal(signal.SIGKILL)
        workers_seen = set()
        while not future.done():
            checkpoint_steps(run_dir, seen)
            workers_seen |= {w.pid for w in ray_train_workers(psutil.Process())}
            time.sleep(0.02)
        outcome = future.result()

    assert workers_seen - {w.pid for w in first_group}, "no new Ray Train worker was started after the kill"
    after_kill = sorted(step for name, step in seen.items() if name not in before_kill)
    assert after_kill, "no checkpoint was written after the kill"
    assert min(after_kill) > killed_after, (
        f"restarted from scratch: checkpoints after the kill at steps {after_kill}, "
        f"but step {killed_after} was already registered"
    )
    baseline = two_node_run["history"]
    assert outcome.steps == two_node_run["steps"] and outcome.diverged is None
    assert [h["epoch"] for h in outcome.history] == [h["epoch"] for h in baseline]
    assert all(set(h) == set(b) for h, b in zip(outcome.history, baseline, strict=True)), outcome.history
    final, expected = outcome.history[-1]["val_negative_elbo"], baseline[-1]["val_negative_elbo"]
    progress = baseline[0]["val_negative_elbo"] - expected
    assert abs(final - expected) < 0.1 * progress, (
        f"resumed run ends at {final:.3f} nats, uninterrupted at {expected:.3f} (epoch-1 to end: {progress:.3f})"
    )


# --- 4. Divergence -----------------------------------------------------------------------------------


def test_diverging_model_stops_at_the_first_bad_epoch_without_retrying(digits, ray_instance, tmp_path):
    """The workers end normally with the divergence in the final checkpoint, so Ray has nothing to
    retry (a worker error would be retried max_failures times, then raise Ray's own error)."""
    overrides = {
        "train": {
            "epochs": 20,
            "lr": 1e4,  # Adam moves every weight by ~lr per step: the ELBO overflows within an epoch
            "batch_size": 128,
            "workers": 1,
            "gpus_per_worker": 0,
            "checkpoint_every_steps": 0,
        },
        "models": {"vae": TINY_VAE},
    }
    params = load_params(PROJECT_ROOT / "params.yaml", overrides)
    job = train_job(params, "vae", digits.image_shape)
    steps_per_epoch = -(-len(digits.train) // 128)
    with pytest.raises(
        TrainingDiverged, match=rf"model 'vae' diverged: .*non-finite at epoch 1 \(step {steps_per_epoch}\)"
    ):
        train_model(job, digits, params, project_dir=tmp_path, run_name="diverging")
    outcome = read_outcome(tmp_path / "outputs" / "diverging")
    assert outcome.steps == steps_per_epoch and len(outcome.history) == 1
    assert outcome.diverged and "negative_elbo" in outcome.diverged
