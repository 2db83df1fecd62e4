"""Generative model families behind one interface, built by name."""

from components.models.base import (
    DensityModel,
    GenerativeModel,
    LatentVariableModel,
    ReconstructionModel,
    bits_per_dim,
)
from components.models.factory import ModelSpec, create_model, hyperparameters, list_models, register_model

__all__ = [
    "DensityModel",
    "GenerativeModel",
    "LatentVariableModel",
    "ModelSpec",
    "ReconstructionModel",
    "bits_per_dim",
    "create_model",
    "hyperparameters",
    "list_models",
    "register_model",
]
