"""The family factory: families register themselves by name; everything else builds models through `create_model`.

Every module in `components.models.families` is imported on first use, so adding a family is one
new module with a `@register_model("name")` class and nothing else.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from components.models.base import GenerativeModel

_FAMILIES: dict[str, type[GenerativeModel]] = {}
_loaded = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: saved next to its weights."""

    name: str
    image_shape: tuple[int, int, int]
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "image_shape": list(self.image_shape), "hparams": dict(self.hparams)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(data["name"], tuple(data["image_shape"]), dict(data.get("hparams", {})))


def register_model(name: str) -> Callable[[type[GenerativeModel]], type[GenerativeModel]]:
    """Class decorator adding a family to the registry under `name`."""

    def add(cls: type[GenerativeModel]) -> type[GenerativeModel]:
        if name in _FAMILIES and _FAMILIES[name] is not cls:
            raise ValueError(f"model name {name!r} is registered twice: {_FAMILIES[name]} and {cls}")
        _FAMILIES[name] = cls
        cls.registry_name = name
        return cls

    return add


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    package = importlib.import_module("components.models.families")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    _loaded = True


def list_models() -> list[str]:
    """Names of every registered family, sorted."""
    _load_families()
    return sorted(_FAMILIES)


def model_class(name: str) -> type[GenerativeModel]:
    _load_families()
    if name not in _FAMILIES:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters a family accepts, with their defaults."""
    signature = inspect.signature(model_class(name).__init__)
    return {
        key: param.default
        for key, param in signature.parameters.items()
        if key not in ("self", "image_shape") and param.kind is param.KEYWORD_ONLY
    }


def create_model(name: str, image_shape: Sequence[int], **hparams: Any) -> GenerativeModel:
    """Build family `name` for images of shape (C, H, W) with the given hyper-parameters."""
    accepted = hyperparameters(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for model {name!r}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    model = model_class(name)(image_shape=tuple(image_shape), **hparams)
    model.spec = ModelSpec(name, tuple(int(s) for s in image_shape), {**accepted, **hparams})
    return model
