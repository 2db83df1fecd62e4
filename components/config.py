"""Loads `params.yaml`, the single source of configuration, applies a run's overrides and checks it.

The file is parsed once into typed sections (`Params`); every key is required, so the file is the
one place where a default lives. An error names the key, what was expected and what was found. The
components read the sections' attributes, not nested dictionaries.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

from components.catalogue import family_hyperparameters

PARAMS_FILE = "params.yaml"

Direction = Literal["minimize", "maximize"]


class ConfigError(ValueError):
    """params.yaml (or an override) is missing a key or has a value of the wrong kind."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    raw_dir: str
    prepared_dir: str
    val_fraction: float = Field(gt=0, lt=1)
    test_fraction: float = Field(gt=0, lt=1)
    shard_images: PositiveInt
    # What the density families and the VAE model: "auto" follows the prepared data (`auto_pixels`);
    # `models.<name>.pixels` wins over this for one family.
    pixels: Literal["auto", "binary", "8bit"]


def auto_pixels(image_shape: tuple[int, ...], levels: int) -> str:
    """The pixel form `data.pixels: auto` picks for images of `image_shape` with `levels` distinct values:
    binary for two-level single-channel images, 8-bit otherwise (binary modelling is single-channel)."""
    return "binary" if image_shape[0] == 1 and levels <= 2 else "8bit"


class FeaturizerConfig(_Section):
    dir: str
    feature_dim: PositiveInt
    epochs: NonNegativeInt
    batch_size: PositiveInt
    lr: PositiveFloat


class TrainSettings(_Section):
    """How one model trains: `train` with the family's own `train.per_model.<name>` over it."""

    epochs: NonNegativeInt
    batch_size: PositiveInt
    lr: PositiveFloat
    workers: PositiveInt
    gpus_per_worker: Literal["auto"] | NonNegativeFloat
    precision: Literal["auto", "fp32", "bf16"]
    compile: bool
    streaming_threshold_images: NonNegativeInt
    checkpoint_every_steps: NonNegativeInt
    sample_every_epochs: NonNegativeInt
    max_concurrent_models: PositiveInt
    storage_path: str
    lock_timeout_s: NonNegativeFloat


class TrainConfig(TrainSettings):
    models: list[str]
    per_model: dict[str, dict[str, Any]]

    @field_validator("per_model")
    @classmethod
    def _known_keys(cls, per_model: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for model, settings in per_model.items():
            unknown = sorted(set(settings or {}) - set(TrainSettings.model_fields))
            if unknown:
                raise ValueError(f"{model}: unknown key(s) {', '.join(unknown)}")
        return {model: settings or {} for model, settings in per_model.items()}

    def for_model(self, model: str) -> TrainSettings:
        """The settings `model` trains with, checked like the section itself."""
        shared = self.model_dump(include=set(TrainSettings.model_fields))
        try:
            return TrainSettings(**{**shared, **self.per_model.get(model, {})})
        except ValidationError as err:
            raise ConfigError(_described(err, f"{PARAMS_FILE} train.per_model.{model}")) from err


class EvaluateConfig(_Section):
    feature_extractor: Literal["featurizer", "inception"]
    inception_weights: str | None
    num_samples: int = Field(ge=2)  # FID needs two images a side
    kid_subset_size: PositiveInt
    importance_samples: PositiveInt
    batch_size: PositiveInt
    real_features_dir: str
    cpus_per_task: PositiveFloat
    gpus_per_task: Literal["auto"] | NonNegativeFloat


class PromotionRule(_Section):
    """One family's rule, or `default`'s; a family's rule sets only what differs from `default`."""

    metric: str | None = None  # None: the family's primary metric
    direction: Direction | None = None
    min_improvement: NonNegativeFloat | None = None
    guards: dict[str, Direction] | None = None  # metric -> direction; must not get worse


class RegistryConfig(_Section):
    production_prefix: str
    production_registry_uri: str | None


class TrackingConfig(_Section):
    experiment: str
    mlflow_tracking_uri: str | None
    system_metrics_interval_s: PositiveFloat


class Params(_Section):
    seed: int
    data: DataConfig
    featurizer: FeaturizerConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    promotion: dict[str, PromotionRule]
    registry: RegistryConfig
    tracking: TrackingConfig
    # Per-family hyper-parameters: each family's constructor is their schema (`create_model` checks them).
    models: dict[str, dict[str, Any] | None]

    def hyperparameters(self, model: str, data_pixels: str | None = None) -> dict[str, Any]:
        """`models.<model>`, with the pixel form of `data.pixels` for a family that models pixels and does
        not set its own; with `data.pixels: auto`, `data_pixels` is that form (`auto_pixels` of the
        data), and none is added without it."""
        own = dict(self.models.get(model) or {})
        pixels = data_pixels if self.data.pixels == "auto" else self.data.pixels
        if pixels is not None and "pixels" in family_hyperparameters(model):
            return {"pixels": pixels, **own}
        return own

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as logged, hashed and recorded with every run and version."""
        return self.model_dump(mode="json")


def load_params(path: str | Path = PARAMS_FILE, overrides: dict[str, Any] | None = None) -> Params:
    """Read `path`, deep-merge `overrides` ({"train": {"epochs": 3}}), which win over `train.per_model`,
    and check the result."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(
            f"{path}: not found; genpipe runs from a project directory with params.yaml"
        ) from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    missing = [key for key in Params.model_fields if key not in raw]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {', '.join(missing)}")
    overrides = overrides or {}
    merged = merge(_family_settings_yield_to(overrides, raw), overrides, where=str(path))
    try:
        return Params.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_described(err, str(path))) from err


# Where pydantic names the member of a union a value failed (`literal['auto']`, `constrained-float`).
_UNION_MEMBER_TAGS = ("constrained-float", "constrained-int", "float", "int", "str", "bool", "none")


def _described(err: ValidationError, where: str) -> str:
    """`params.yaml train.epochs: Input should be a valid integer, ..., got 'ten'`, a line per key.

    A value that fits no member of a union (`auto` or a number) gets one line that says all of them.
    """
    problems: dict[str, list[str]] = {}
    found: dict[str, str] = {}
    for problem in err.errors():
        parts = []
        for part in problem["loc"]:
            if isinstance(part, str) and ("[" in part or part in _UNION_MEMBER_TAGS):
                break
            parts.append(str(part))
        key = ".".join(parts)
        if problem["type"] == "extra_forbidden":
            message, found[key] = "unknown key", ""
        else:
            message = problem["msg"].removeprefix("Value error, ")
            # A check of ours (`value_error`) names what it found itself.
            shown = problem["type"] not in ("missing", "value_error")
            found[key] = f", got {problem.get('input')!r}" if shown else ""
        problems.setdefault(key, []).append(message)
    lines = []
    for key, messages in problems.items():
        said = messages[0] + "".join(f" or {m.removeprefix('Input should be ')}" for m in messages[1:])
        lines.append(f"{where} {key}: {said}{found[key]}")
    return "\n".join(lines)


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
    """Copy of `base` with `overrides` applied; unknown keys are errors, except in the sections keyed
    by family (`models`, `train.per_model`, `promotion`), whose entries `Params` checks."""
    merged = copy.deepcopy(base)
    keyed_by_family = any(f".{section}" in where for section in ("models", "per_model", "promotion"))
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in merged and not keyed_by_family:
            raise ConfigError(f"{where}: unknown key {key!r}; known keys: {', '.join(sorted(merged))}")
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value, where=f"{where}.{key}")
        else:
            merged[key] = value
    return merged
