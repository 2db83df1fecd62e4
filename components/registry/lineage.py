"""Lineage: what a model version was made from, and whether its inputs changed since.

The inputs fingerprint covers everything that decides a model: the data version, the model's
hyper-parameters, the training and evaluation settings, and the source code of its family (its
module and the modules it inherits from) and of the trainer and evaluation. Same fingerprint,
same model: the scheduled run skips it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from components.config import train_settings

PACKAGES = ("torch", "ray", "mlflow", "prefect", "dvc", "torchmetrics", "numpy")
SHARED_CODE = (
    "components.training.trainer",
    "components.evaluation.evaluate",
    "components.evaluation.sample_quality",
)
FINGERPRINT_TAG = "inputs_fingerprint"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def params_hash(params: dict[str, Any]) -> str:
    """Short hash of the whole parameter set, recorded with every run and version."""
    return _digest(params)[:12]


def family_code_hash(model: str) -> str:
    """Hash of the source of the family's class hierarchy and the shared training/evaluation code."""
    # Imported here, not above: `genpipe lineage` reads this module's other functions without torch.
    from components.models.base import GenerativeModel
    from components.models.registry import model_class

    modules = {
        klass.__module__
        for klass in model_class(model).__mro__
        if issubclass(klass, GenerativeModel) and klass.__module__.startswith("components.")
    }
    modules.update(SHARED_CODE)
    sources = {}
    for name in sorted(modules):
        __import__(name)
        sources[name] = hashlib.sha256(Path(inspect.getfile(sys.modules[name])).read_bytes()).hexdigest()
    return _digest(sources)


def model_inputs(params: dict[str, Any], model: str, data_version: str) -> dict[str, Any]:
    """The inputs that decide `model`, as recorded and fingerprinted."""
    train = {
        k: v
        for k, v in train_settings(params, model).items()
        if k not in ("models", "max_concurrent_models", "lock_timeout_s")
    }
    return {
        "data_version": data_version,
        "hparams": (params.get("models") or {}).get(model) or {},
        "train": train,
        "evaluate": params["evaluate"],
        "featurizer": params["featurizer"],
        "seed": params["seed"],
        "code": family_code_hash(model),
    }


def inputs_fingerprint(params: dict[str, Any], model: str, data_version: str) -> str:
    return _digest(model_inputs(params, model, data_version))[:16]


def changed_inputs(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Which recorded inputs differ (data_version, hparams, train, evaluate, featurizer, seed, code)."""
    return sorted(key for key in current if previous.get(key) != current.get(key))


def package_versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def reproduce_commands(tags: dict[str, str], model: str) -> list[str]:
    """Shell commands that rebuild a version from its lineage tags."""
    commit = tags.get("git_commit", "unknown")
    commands = [
        f"git checkout {commit}",
        "dvc pull data.dvc   # or `dvc checkout data.dvc` when the data is in the local cache",
        f"genpipe run --models {model} --force",
    ]
    if tags.get("git_dirty") == "True":
        commands.insert(1, "# warning: the version was trained from a work tree with uncommitted changes")
    return commands
