"""Loads `params.yaml`, the single source of configuration, and applies overrides to it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
REQUIRED_SECTIONS = ("seed", "data", "featurizer", "train", "evaluate", "tracking", "models")


class ConfigError(ValueError):
    """params.yaml (or an override) is missing a key or has a value of the wrong kind."""


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read `path` and deep-merge `overrides` ({"train": {"epochs": 3}}); keys must already exist."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(
            f"{path}: not found; genpipe runs from a project directory with params.yaml"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    missing = [key for key in REQUIRED_SECTIONS if key not in params]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}")
    return merge(params, overrides or {}, where=str(path))


def merge(base: dict[str, Any], overrides: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """Copy of `base` with `overrides` applied; unknown keys are errors, except under `models`."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in merged and not where.endswith("models"):
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(merged))}")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, where=f"{where}.{key}")
        else:
            merged[key] = value
    return merged
