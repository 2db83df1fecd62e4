"""The model families read from their source, without importing torch: for `genpipe models`.

A family is a class decorated with `@register_model("name")` in `components/models/families/`. Its
kind and primary metric are class attributes found along its bases (in method resolution order,
across the modules it imports them from), and its hyper-parameters are the keyword-only arguments
of the first `__init__` on that order, as `factory.hyperparameters` inspects them at run time.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from components.source import parse_file

FAMILIES_PACKAGE = "components.models.families"
# Found by path, not by import: importing any module of `components.models` imports torch.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FamilyEntry:
    """What `genpipe models` shows of one family."""

    name: str
    data_kind: str  # every kind the family's models can have, " / "-separated
    primary_metric: str  # the primary metric of each of those kinds, in the same order
    hyperparameters: dict[str, Any]


@dataclass(frozen=True)
class _Class:
    module: str
    node: ast.ClassDef
    bases: tuple[tuple[str, str], ...]  # (module, class name) of each base defined in this project


@cache
def _module_tree(module: str) -> ast.Module:
    path = SOURCE_ROOT / f"{module.replace('.', '/')}.py"
    return parse_file(path)


def _class(module: str, name: str) -> _Class:
    tree = _module_tree(module)
    imported = {
        alias.asname or alias.name: node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
    }
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            bases = []
            for base in node.bases:
                if isinstance(base, ast.Name):
                    where = imported.get(base.id, module)
                    if where.startswith("components."):
                        bases.append((where, base.id))
            return _Class(module, node, tuple(bases))
    if name in imported:
        return _class(imported[name], name)
    raise LookupError(f"class {name!r} not found in {module}")


def _mro(module: str, name: str) -> list[_Class]:
    """C3 linearisation of the project's classes above `module.name` (Python's own order)."""
    cls = _class(module, name)
    sequences = [_mro(*base) for base in cls.bases] + [[_class(*base) for base in cls.bases]]
    order = [cls]
    while any(sequences):
        for sequence in sequences:
            if not sequence:
                continue
            head = sequence[0]
            if not any(head in other[1:] for other in sequences):
                break
        else:
            raise TypeError(f"{module}.{name}: inconsistent class hierarchy")
        order.append(head)
        sequences = [seq[1:] if seq and seq[0] == head else seq for seq in sequences]
    return order


def _class_attribute(mro: list[_Class], attribute: str) -> Any:
    for cls in mro:
        for node in cls.node.body:
            target = node.target if isinstance(node, ast.AnnAssign) else None
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            if isinstance(target, ast.Name) and target.id == attribute and node.value is not None:
                return ast.literal_eval(node.value)
    raise LookupError(f"{mro[0].module}.{mro[0].node.name}: no class attribute {attribute!r} on its bases")


def _hyperparameters(mro: list[_Class]) -> dict[str, Any]:
    for cls in mro:
        for node in cls.node.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                arguments = node.args
                defaults = dict(zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True))
                return {
                    arg.arg: None if default is None else ast.literal_eval(default)
                    for arg, default in defaults.items()
                }
    return {}


def _registered_name(node: ast.ClassDef) -> str | None:
    for decorator in node.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Name)
            and decorator.func.id == "register_model"
            and decorator.args
        ):
            return ast.literal_eval(decorator.args[0])
    return None


@cache
def family_catalogue() -> tuple[FamilyEntry, ...]:
    """Every family in `components/models/families/`, sorted by name."""
    entries = []
    for path in sorted((SOURCE_ROOT / FAMILIES_PACKAGE.replace(".", "/")).glob("[!_]*.py")):
        module = f"{FAMILIES_PACKAGE}.{path.stem}"
        for node in _module_tree(module).body:
            name = isinstance(node, ast.ClassDef) and _registered_name(node)
            if name:
                mro = _mro(module, node.name)
                kinds = _class_attribute(mro, "data_kinds")
                metrics = _class_attribute(mro, "primary_metrics")
                entries.append(
                    FamilyEntry(
                        name,
                        " / ".join(kinds),
                        " / ".join(metrics[kind] for kind in kinds),
                        _hyperparameters(mro),
                    )
                )
    return tuple(sorted(entries, key=lambda entry: entry.name))


def family_hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of family `name` and their defaults; empty for a name no family has."""
    entry = next((entry for entry in family_catalogue() if entry.name == name), None)
    return entry.hyperparameters if entry else {}
