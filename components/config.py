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
    """Read `path` and deep-merge `overrides` ({"train": {"epochs": 3}}), which win over `train.per_model`."""
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
    overrides = overrides or {}
    return merge(_family_settings_yield_to(overrides, params), overrides, where=str(path))


def _family_settings_yield_to(overrides: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """`params` whose `train.per_model` values take the run's value of every key `overrides` sets.

    Overrides are what a user asked for this one run (`genpipe run --epochs 1`); a family's own
    setting in the file (`per_model: {gan: {epochs: 60}}`) must not win over them. Per-family values
    given in `overrides` themselves still apply, since they are merged afterwards.
    """
    run = {k: v for k, v in (overrides.get("train") or {}).items() if v is not None and k != "per_model"}
    per_model = params["train"].get("per_model") if isinstance(params["train"], dict) else None
    if not run or not isinstance(per_model, dict):
        return params
    yielded = copy.deepcopy(params)
    for settings in yielded["train"]["per_model"].values():
        if isinstance(settings, dict):
            settings.update({k: run[k] for k in settings.keys() & run.keys()})
    return yielded


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


def train_settings(params: dict[str, Any], model_name: str) -> dict[str, Any]:
    """`train` with the family's own overrides (`train.per_model.<name>`, e.g. more epochs for a GAN)."""
    settings = {k: v for k, v in params["train"].items() if k != "per_model"}
    overrides = (params["train"].get("per_model") or {}).get(model_name) or {}
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"params.yaml train.per_model.{model_name}: unknown key(s) {', '.join(unknown)}")
    return {**settings, **overrides}
