"""The deployment files under infra/: what can be checked without Docker, Kubernetes, GPUs or a cloud.

Each file is parsed and checked against what it names in the project (commands, options, the flow,
paths, versions) and against the others (one image name, one work pool, one Ray version).
"""

from __future__ import annotations

import configparser
import importlib
import inspect
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import mlflow
import prefect
import ray
import ray.autoscaler
import yaml
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
VERSION = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
CPU_IMAGE, GPU_IMAGE = f"genpipe-train:{VERSION}", f"genpipe-train:{VERSION}-gpu"


def locked(package: str) -> str:
    """The version requirements.lock pins for `package`."""
    return re.search(rf"^{package}==(.+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)


def load(relative: str):
    return yaml.safe_load((INFRA / relative).read_text())


def load_all(relative: str) -> list[dict]:
    return list(yaml.safe_load_all((INFRA / relative).read_text()))


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def genpipe_run_options() -> set[str]:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return set(re.findall(r"(--[a-z][a-z-]+)", result.output))


def genpipe_command(shell_line: str) -> list[str]:
    """The `genpipe ...` command of a shell line such as `cd /app && genpipe run ...`."""
    for part in shell_line.split("&&"):
        words = shlex.split(part)
        if words and words[0] == "genpipe":
            return words
    raise AssertionError(f"no genpipe command in {shell_line!r}")


def check_genpipe_run(words: list[str]) -> dict[str, str]:
    assert words[:2] == ["genpipe", "run"], words
    options = dict(zip(words[2::2], words[3::2], strict=True))
    unknown = set(options) - genpipe_run_options()
    assert not unknown, f"`genpipe run` has no option(s) {sorted(unknown)}"
    return options


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in (INFRA / "docker/Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return instructions


def test_ray_cluster_launcher_config_is_valid_and_has_multi_gpu_workers():
    config = load("ray/cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the schema `ray up` validates against
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 2]
    assert gpu_types, "no node type with several GPUs"
    assert all(0 < t["max_workers"] <= config["max_workers"] for t in gpu_types)
    assert config["docker"]["image"] == GPU_IMAGE
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_kuberay_cluster_has_a_head_and_gpu_workers_on_the_gpu_image():
    documents = {doc["kind"]: doc for doc in load_all("kuberay/raycluster.yaml")}
    cluster = documents["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head = cluster["spec"]["headGroupSpec"]
    workers = cluster["spec"]["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head should not train"
    for template in [head["template"], *(group["template"] for group in workers)]:
        assert [c["image"] for c in containers(template)] == [GPU_IMAGE]
        claims = [
            v["persistentVolumeClaim"]["claimName"]
            for v in template["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        ]
        assert claims == [documents["PersistentVolumeClaim"]["metadata"]["name"]]
        mounts = {m["mountPath"] for c in containers(template) for m in c["volumeMounts"]}
        # Every node sees the checkpoints where the driver (cwd /app) resolves train.storage_path.
        storage = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["storage_path"]
        assert f"/app/{storage}" in mounts
    gpu_workers = [
        g for g in workers if "nvidia.com/gpu" in containers(g["template"])[0]["resources"]["limits"]
    ]
    assert gpu_workers, "no worker group asks for GPUs"
    for group in gpu_workers:
        resources = containers(group["template"])[0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 2, "multi-GPU workers expected"
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_job_runs_genpipe_on_that_cluster_within_its_gpus():
    (job,) = load_all("kuberay/rayjob.yaml")
    (cluster,) = [d for d in load_all("kuberay/raycluster.yaml") if d["kind"] == "RayCluster"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert [c["image"] for c in containers(job["spec"]["submitterPodTemplate"])] == [GPU_IMAGE]

    options = check_genpipe_run(genpipe_command(job["spec"]["entrypoint"]))
    assert options["--ray-address"] == "auto"
    demand = (
        int(options["--workers"]) * float(options["--gpus-per-worker"]) * int(options["--max-concurrent"])
    )
    supply = sum(
        group["replicas"]
        * int(containers(group["template"])[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        for group in cluster["spec"]["workerGroupSpecs"]
    )
    assert 0 < demand <= supply, f"the job asks for {demand} GPUs, the cluster starts with {supply}"


def test_prefect_deployment_points_at_the_retrain_flow_on_a_cron_with_one_run_at_a_time():
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    config = load("prefect/prefect.yaml")
    assert config["prefect-version"] == prefect.__version__
    (deployment,) = config["deployments"]
    path, _, name = deployment["entrypoint"].partition(":")
    assert (ROOT / path).is_file()
    flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
    assert isinstance(flow, Flow) and flow.name == "genpipe-retrain"
    assert set(deployment["parameters"]) <= set(inspect.signature(flow.fn).parameters)

    (schedule,) = deployment["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a malformed cron
    assert len(schedule["cron"].split()) == 5
    assert deployment["concurrency_limit"]["limit"] == 1
    assert deployment["work_pool"]["name"] == "genpipe-process"


def test_compose_runs_mlflow_on_postgres_and_minio_and_prefect_with_healthchecks():
    compose = load("compose/docker-compose.yaml")
    services = compose["services"]
    assert {"mlflow", "postgres", "minio", "prefect"} <= set(services)
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"]

    mlflow_env = services["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith(
        "postgresql://genpipe:${POSTGRES_PASSWORD}@postgres:"
    )
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    command = " ".join(services["mlflow"]["command"])
    assert "--app-name basic-auth" in command and "--serve-artifacts" in command
    assert f"mlflow/mlflow:v{mlflow.__version__}" in services["mlflow"]["build"]["dockerfile_inline"]
    prefect_build = services["prefect"]["build"]["dockerfile_inline"]
    assert f"FROM prefecthq/prefect:{prefect.__version__}-python3.11" in prefect_build
    assert f'"SQLAlchemy=={locked("SQLAlchemy")}"' in prefect_build, (
        "the scheduler needs the locked SQLAlchemy"
    )
    assert services["prefect"]["command"][:3] == ["prefect", "server", "start"]

    # Secrets come from the environment, required, never written in the file.
    for service, variable in (("postgres", "POSTGRES_PASSWORD"), ("minio", "MINIO_ROOT_PASSWORD")):
        assert services[service]["environment"][variable].startswith(f"${{{variable}:?")
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")

    auth = configparser.ConfigParser()
    auth.read_string(compose["configs"]["mlflow-auth"]["content"])
    assert {"default_permission", "database_uri"} <= set(auth["mlflow"])

    worker = services["worker"]
    assert worker["image"] == CPU_IMAGE
    assert (INFRA / "compose" / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == (
        INFRA / "docker/Dockerfile"
    )
    worker_script = worker["command"][-1]
    assert "--pool genpipe-process" in worker_script and "prefect deploy --all" in worker_script


def test_dockerfile_installs_the_lock_and_the_project_on_python_311_slim():
    instructions = dockerfile_instructions()
    args = dict(a.partition("=")[::2] for k, a in instructions if k == "ARG" and "=" in a)
    assert args["BASE_IMAGE"].startswith("python:3.11-slim")
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert [a for k, a in instructions if k == "FROM"] == ["${BASE_IMAGE}"]

    copies = [(i, a.split()) for i, (k, a) in enumerate(instructions) if k == "COPY"]
    runs = [(i, a) for i, (k, a) in enumerate(instructions) if k == "RUN"]
    for _, words in copies:
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which the project lacks"
    lock_copied = next(i for i, words in copies if words[0] == "requirements.lock")
    lock_installed = next((i for i, a in runs if "pip install -r requirements.lock" in a), None)
    assert lock_installed is not None, "no RUN installs requirements.lock"
    assert lock_copied < lock_installed
    # torch at the locked version, but from the PyTorch index of the chosen build.
    assert re.search(r"^torch==", (ROOT / "requirements.lock").read_text(), re.M)
    assert any(
        '--index-url "${TORCH_INDEX_URL}"' in a and "grep '^torch==' requirements.lock" in a for _, a in runs
    )
    assert any("pip install --no-deps -e ." in a for _, a in runs)
    # The image's user is the uid KubeRay's pods run as.
    assert any("useradd" in a and "--uid 1000" in a for _, a in runs)
    assert ("USER", "ray") in instructions
    for document in load_all("kuberay/raycluster.yaml"):
        if document["kind"] == "RayCluster":
            assert (
                document["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
            )


def test_every_image_reference_uses_the_project_version():
    referenced = set()
    for path in INFRA.rglob("*"):
        if path.is_file():
            referenced |= set(re.findall(r"genpipe-train:[\w.-]+", path.read_text()))
    assert referenced == {CPU_IMAGE, GPU_IMAGE}


def test_stack_scripts_parse_and_make_targets_use_them():
    for script in ("up.sh", "down.sh", "common.sh"):
        checked = subprocess.run(
            ["bash", "-n", str(INFRA / "stack" / script)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stderr
    template = configparser.ConfigParser()
    template.read_string((INFRA / "stack/basic_auth.ini").read_text())
    assert {"default_permission", "database_uri", "authorization_function"} <= set(template["mlflow"])
    assert "@AUTH_DB@" in template["mlflow"]["database_uri"]

    makefile = (ROOT / "Makefile").read_text()
    for target, script in (("stack-up", "up.sh"), ("stack-down", "down.sh")):
        rule = re.search(rf"^{target}: (.*)\n\t(.*)$", makefile, re.M)
        assert rule, f"Makefile has no {target} target"
        assert "$(STAMP)" in rule.group(1)
        assert f"GENPIPE_BIN=$(BIN) infra/stack/{script}" in rule.group(2)
