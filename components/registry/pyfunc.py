"""Registered models as MLflow pyfunc models that hold data only: weights, spec and an MLmodel file.

The pyfunc flavour names this module as its loader, so loading imports installed code and reads
safetensors; nothing in the artifact is unpickled or executed. The weights' SHA-256 is recorded
in the MLmodel metadata and in the registry, and a mismatch refuses to load.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
import yaml
from mlflow.models import Model

from components.models.model_dir import SPEC_FILE, WEIGHTS_FILE, load_model_dir

DATA_DIR = "data"


class TamperedArtifact(ValueError):
    """A model artifact whose weights do not match the hash recorded when it was registered."""


def weights_sha256(model_dir: Path) -> str:
    return hashlib.sha256((Path(model_dir) / WEIGHTS_FILE).read_bytes()).hexdigest()


def write_model_package(model_dir: Path, package_dir: Path) -> str:
    """Lay out `model_dir`'s weights as an MLflow pyfunc model in `package_dir`; returns the weights hash."""
    data = package_dir / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    for filename in (WEIGHTS_FILE, SPEC_FILE):
        shutil.copy(Path(model_dir) / filename, data / filename)
    digest = weights_sha256(data)
    model = Model(metadata={"weights_sha256": digest})
    mlflow.pyfunc.add_to_model(model, loader_module=__name__, data=DATA_DIR)
    model.save(str(package_dir / "MLmodel"))
    return digest


def verify(data_dir: Path, expected_sha256: str) -> None:
    actual = weights_sha256(data_dir)
    if actual != expected_sha256:
        raise TamperedArtifact(
            f"{Path(data_dir) / WEIGHTS_FILE}: SHA-256 {actual[:16]}... does not match the registered "
            f"{expected_sha256[:16]}...; refusing to load a modified model artifact"
        )


class GenerativePyFunc:
    """`predict({"n": 16, "seed": 0})` returns n images, N x C x H x W float32 in the data's range."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        request = dict(params or {})
        if hasattr(model_input, "to_dict"):  # a pandas DataFrame with columns n, seed
            request.update({k: v[0] for k, v in model_input.to_dict(orient="list").items()})
        elif isinstance(model_input, dict):
            request.update(model_input)
        n, seed = int(request.get("n", 16)), int(request.get("seed", 0))
        with torch.no_grad():
            images = self.model.sample(n, generator=torch.Generator().manual_seed(seed))
        return images.float().cpu().numpy()


def _load_pyfunc(data_path: str) -> GenerativePyFunc:
    """MLflow's entry point for this flavour: checks the hash in MLmodel, then loads the weights."""
    data_dir = Path(data_path)
    metadata = yaml.safe_load((data_dir.parent / "MLmodel").read_text()).get("metadata") or {}
    if "weights_sha256" not in metadata:
        raise TamperedArtifact(f"{data_dir.parent / 'MLmodel'}: no weights_sha256 in metadata")
    verify(data_dir, metadata["weights_sha256"])
    return GenerativePyFunc(load_model_dir(data_dir))
