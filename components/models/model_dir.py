"""A model on disk: its weights as safetensors and the spec that rebuilds the module.

Loading never unpickles code: the spec names the family, the image shape and the hyper-parameters,
and the family's class is built from it before the weights are read into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from components.models.base import GenerativeModel
from components.models.factory import ModelSpec, create_model

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model.json"


def save_model_dir(model: GenerativeModel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / SPEC_FILE).write_text(json.dumps(model.spec.to_dict(), indent=2, sort_keys=True) + "\n")


def load_weights(model: GenerativeModel, directory: Path, device: str | torch.device = "cpu") -> None:
    """Read the weights saved in `directory` into `model`, which must have the saved architecture."""
    weights_path = Path(directory) / WEIGHTS_FILE
    try:
        load_model(model, str(weights_path), device=str(device))
    except Exception as err:  # safetensors raises several types for corrupt or mismatched files
        raise ValueError(
            f"{weights_path}: cannot load weights for model {model.spec.name!r} ({err})"
        ) from err


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a model saved by `save_model_dir`; a missing or mismatched file is a clear error."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    for path in (spec_path, directory / WEIGHTS_FILE):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; not a genpipe model directory")
    spec = ModelSpec.from_dict(json.loads(spec_path.read_text()))
    model = create_model(spec.name, spec.image_shape, **spec.hparams)
    load_weights(model, directory, device)
    return model.to(device).eval()
