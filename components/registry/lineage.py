"""Lineage: what a model version was made from, and whether its inputs changed since.

The inputs fingerprint covers everything that decides a version, the same way for every family:

- the prepared data it trains and is evaluated on (the `prepare` stage's output hash in `dvc.lock`);
- the id of the FID/KID feature extractor, because every family is scored by FID/KID (evaluation
  samples every model; the id is the hash of the featurizer's weights or of the Inception file);
- its hyper-parameters (`models.<family>`), its training settings (`train` with its `per_model`
  overrides, less what only schedules runs) and the evaluation settings (`evaluate`, `seed`);
- the source of every project module that training and evaluating it executes: the transitive
  closure of `components.*` imports, read statically from the source, of the family's module, the
  trainer, the Ray adapter and the evaluation package. A module outside that closure (one no
  family, trainer or evaluation imports) changes no fingerprint.

"The code" is the code that runs: the `components` package of the running genpipe, which is
genpipe's installed code (in a clone installed with `pip install -e .`, the clone's own files).
Same fingerprint, same model: the scheduled run skips it.
"""

from __future__ import annotations

import ast
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from components.config import Params
from components.source import parse_file

PACKAGES = ("torch", "ray", "mlflow", "prefect", "dvc", "torchmetrics", "numpy")
CODE_PACKAGE = "components"
#: Where the running `components` package lives: the code that trains and evaluates.
CODE_ROOT = Path(__file__).resolve().parents[2]
#: What every family executes besides its own module: the trainer, the Ray adapter, the evaluation.
SHARED_ENTRY_POINTS = (
    "components.training.jobs",
    "components.training.trainer",
    "components.training.ray_train",
    "components.evaluation",
)
#: `train` keys that schedule a run but do not change the model it trains.
RUN_CONTROL_KEYS = ("models", "max_concurrent_models", "lock_timeout_s")
#: `evaluate` keys that name the feature extractor, which its id already covers.
EXTRACTOR_KEYS = ("feature_extractor", "inception_weights")
FINGERPRINT_TAG = "inputs_fingerprint"


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def params_hash(params: Params) -> str:
    """Short hash of the whole parameter set, recorded with every run and version."""
    return _digest(params.as_dict())[:12]


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of project module `module` under `root`, or None when there is none."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_modules(package: str, root: Path) -> list[str]:
    """`package` and, when it is a package, every module in it (one level deep)."""
    folder = root.joinpath(*package.split("."))
    if not (folder / "__init__.py").is_file():
        return [package]
    return [
        package,
        *(f"{package}.{path.stem}" for path in sorted(folder.glob("*.py")) if path.stem != "__init__"),
    ]


def _imported_modules(module: str, path: Path, root: Path) -> set[str]:
    """Project modules that `module` (source at `path`) imports, anywhere in the file, by name."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(parse_file(path)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            # `from package import module` imports the module too.
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {
        name for name in found if name.split(".")[0] == CODE_PACKAGE and _module_file(name, root) is not None
    }


def code_closure(entry_points: tuple[str, ...] | list[str], root: Path = CODE_ROOT) -> list[str]:
    """Every project module that importing `entry_points` executes, by static import analysis.

    Follows `import components.x`, `from components.x import y` (y a module or a name) and relative
    imports, and counts the `__init__` of every enclosing package, which Python runs first. Imports
    made by name at run time (`importlib.import_module`) are not followed.
    """
    pending = [name for entry in entry_points for name in _package_modules(entry, root)]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        path = _module_file(module, root)
        if path is None:
            raise ValueError(f"{module}: no such module under {root}")
        seen.add(module)
        parts = module.split(".")
        pending.extend(".".join(parts[:end]) for end in range(1, len(parts)))
        pending.extend(_imported_modules(module, path, root) - seen)
    return sorted(seen)


def code_fingerprint(model: str, root: Path = CODE_ROOT) -> dict[str, str]:
    """Source hash of every project file that training and evaluating `model` executes, by path."""
    # Imported here, not above: `genpipe lineage` reads this module's other functions without torch.
    from components.models.factory import model_class

    modules = code_closure([model_class(model).__module__, *SHARED_ENTRY_POINTS], root)
    files = sorted({_module_file(module, root) for module in modules})
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        for path in files
    }


def code_version(model: str, root: Path = CODE_ROOT) -> str:
    """One short hash of `code_fingerprint(model)`: the code an evaluation of `model` ran."""
    return _digest(code_fingerprint(model, root))[:16]


def model_inputs(
    params: Params,
    model: str,
    data_version: str,
    extractor_id: str,
    data_pixels: str | None = None,
    root: Path = CODE_ROOT,
) -> dict[str, Any]:
    """The inputs that decide `model`, as recorded (tag `inputs`) and fingerprinted. `data_pixels` is
    the pixel form `data.pixels: auto` takes for the data: recorded as the form, `auto` and that form
    set by name are the same model."""
    train = params.train.for_model(model).model_dump(mode="json", exclude=set(RUN_CONTROL_KEYS))
    evaluate = params.evaluate.model_dump(mode="json", exclude=set(EXTRACTOR_KEYS))
    return {
        "prepared_data": data_version,
        "feature_extractor": extractor_id,
        "params": {
            "models": {model: params.hyperparameters(model, data_pixels)},
            "train": train,
            "evaluate": evaluate,
            "seed": params.seed,
        },
        "code": code_fingerprint(model, root),
    }


def inputs_fingerprint(inputs: dict[str, Any]) -> str:
    """Short hash of a `model_inputs` record: equal fingerprints, same model."""
    return _digest(inputs)[:16]


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    leaves = {}
    for key, inner in value.items():
        leaves.update(_leaves(inner, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


INPUT_NAMES = {"prepared_data": "prepared data", "feature_extractor": "feature extractor"}


def changed_inputs(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two `model_inputs` records, named for people.

    E.g. "prepared data", "feature extractor", "params: models.vae.latent_dim",
    "code: components/models/layers.py". A record of an older format is compared key by key.
    """
    changed = []
    for key in sorted(set(previous) | set(current)):
        before, after = previous.get(key), current.get(key)
        if before == after:
            continue
        if key in ("params", "code") and isinstance(before, dict) and isinstance(after, dict):
            old, new = _leaves(before, ""), _leaves(after, "")
            changed.extend(
                f"{key}: {leaf}" for leaf in sorted(set(old) | set(new)) if old.get(leaf) != new.get(leaf)
            )
        else:
            changed.append(INPUT_NAMES.get(key, key))
    return changed


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
