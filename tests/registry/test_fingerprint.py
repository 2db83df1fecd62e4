"""The inputs fingerprint covers the code a family executes (found from its imports), its data and params."""

from __future__ import annotations

import ast
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from components.config import Params, load_params
from components.registry.lineage import (
    CODE_ROOT,
    changed_inputs,
    code_closure,
    inputs_fingerprint,
    model_inputs,
)

FAMILIES = ("vae", "wgan", "dcgan", "nade")


@pytest.fixture
def code_root(tmp_path: Path) -> Path:
    """A copy of the running `components` package to edit."""
    shutil.copytree(
        CODE_ROOT / "components", tmp_path / "components", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


@pytest.fixture(scope="module")
def params() -> Params:
    return load_params(CODE_ROOT / "params.yaml")


def inputs(params: Params, root: Path, model: str, data: str = "prepared-1", extractor: str = "featurizer-1"):
    return model_inputs(params, model, data, extractor, root=root)


@pytest.mark.parametrize("family", ["nade", "vae"])
def test_auto_pixels_and_the_same_form_set_by_name_are_one_model_and_another_form_is_not(family):
    auto, named, other = (
        load_params(CODE_ROOT / "params.yaml", {"data": {"pixels": pixels}})
        for pixels in ("auto", "8bit", "binary")
    )

    def fingerprint(params: Params) -> str:  # on data for which auto picks 8-bit
        return inputs_fingerprint(model_inputs(params, family, "prepared-1", "featurizer-1", "8bit"))

    assert fingerprint(auto) == fingerprint(named) != fingerprint(other)


def append_comment(root: Path, module: str) -> None:
    path = root / module
    path.write_text(path.read_text() + "# a comment changes the source\n")


def test_a_changed_module_changes_exactly_the_families_that_import_it(params, code_root):
    before = {model: inputs(params, code_root, model) for model in FAMILIES}
    append_comment(code_root, "components/models/families/dcgan.py")  # wgan builds on its networks
    after = {model: inputs(params, code_root, model) for model in FAMILIES}
    changed = {model: changed_inputs(before[model], after[model]) for model in FAMILIES}
    assert changed == {
        "vae": [],
        "wgan": ["code: components/models/families/dcgan.py"],
        "dcgan": ["code: components/models/families/dcgan.py"],
        "nade": [],
    }
    assert inputs_fingerprint(after["nade"]) == inputs_fingerprint(before["nade"])
    assert inputs_fingerprint(after["wgan"]) != inputs_fingerprint(before["wgan"])


def test_a_module_the_evaluation_imports_is_in_every_familys_fingerprint(params, code_root):
    before = {model: inputs(params, code_root, model) for model in FAMILIES}
    # The VAE's encoder and latent layers, which the featurizer's architecture also imports from.
    append_comment(code_root, "components/models/layers.py")
    for model in FAMILIES:
        assert changed_inputs(before[model], inputs(params, code_root, model)) == [
            "code: components/models/layers.py"
        ]


def test_shared_training_and_evaluation_code_is_in_every_familys_fingerprint(params, code_root):
    before = {model: inputs(params, code_root, model) for model in FAMILIES}
    # Modules reached only through imports of the trainer, the Ray adapter and the evaluation package.
    for module in (
        "components/training/ray_train.py",
        "components/evaluation/parzen.py",
        "components/config.py",
    ):
        append_comment(code_root, module)
    for model in FAMILIES:
        assert changed_inputs(before[model], inputs(params, code_root, model)) == [
            "code: components/config.py",
            "code: components/evaluation/parzen.py",
            "code: components/training/ray_train.py",
        ]


def test_a_module_outside_every_familys_closure_changes_no_fingerprint(params, code_root):
    before = {model: inputs_fingerprint(inputs(params, code_root, model)) for model in FAMILIES}
    for module in ("components/data/importers.py", "components/registry/versions.py"):
        append_comment(code_root, module)
    assert {model: inputs_fingerprint(inputs(params, code_root, model)) for model in FAMILIES} == before


def test_changed_inputs_name_the_data_the_extractor_and_the_param(params):
    before = inputs(params, CODE_ROOT, "vae")
    changed_params = params.model_copy(
        update={"models": {"vae": {"latent_dim": 8}}, "train": params.train.model_copy(update={"epochs": 3})}
    )
    after = inputs(changed_params, CODE_ROOT, "vae", data="prepared-2", extractor="featurizer-2")
    assert changed_inputs(before, after) == [
        "feature extractor",
        "params: models.vae.latent_dim",
        "params: train.epochs",
        "prepared data",
    ]
    # What only schedules runs, and the extractor's file name (its id covers it), decide nothing.
    scheduling = params.model_copy(
        update={"train": params.train.model_copy(update={"max_concurrent_models": 5, "models": ["vae"]})}
    )
    assert inputs(scheduling, CODE_ROOT, "vae") == before
    # A record of the older format is still compared, key by key.
    assert "code" in changed_inputs({"code": "0123abcd"}, before)


def test_the_closure_follows_absolute_relative_and_module_imports(tmp_path: Path):
    files = {
        "components/__init__.py": "",
        "components/pkg/__init__.py": "",
        "components/pkg/entry.py": (
            "import os\n"
            "import components.pkg.absolute\n"
            "from . import sibling\n"
            "from .relative import name\n"
            "from components.pkg import module_by_from\n"
            "from ..other.deep import thing\n"
            "def later():\n    from components.pkg.lazy import x\n"
        ),
        "components/pkg/absolute.py": "",
        "components/pkg/sibling.py": "",
        "components/pkg/relative.py": "name = 1\n",
        "components/pkg/module_by_from.py": "",
        "components/pkg/lazy.py": "x = 1\n",
        "components/pkg/unused.py": "",
        "components/other/__init__.py": "",
        "components/other/deep.py": "from components.pkg.sibling import *\nthing = 1\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert code_closure(["components.pkg.entry"], tmp_path) == [
        "components",
        "components.other",
        "components.other.deep",
        "components.pkg",
        "components.pkg.absolute",
        "components.pkg.entry",
        "components.pkg.lazy",
        "components.pkg.module_by_from",
        "components.pkg.relative",
        "components.pkg.sibling",
    ]
    with pytest.raises(ValueError, match="components.missing: no such module"):
        code_closure(["components.missing"], tmp_path)


def test_families_fingerprinted_from_several_threads_never_parse_at_once(params, monkeypatch):
    # CPython 3.11's `ast.parse` can fail when two threads parse at once (components/source.py), and
    # Prefect fingerprints a flow's families in task threads: parses must take turns.
    parse = ast.parse
    in_flight = []
    most_at_once = 0
    guard = threading.Lock()

    def slow_parse(*args, **kwargs):
        nonlocal most_at_once
        with guard:
            in_flight.append(None)
            most_at_once = max(most_at_once, len(in_flight))
        time.sleep(0.002)  # room for another thread to enter, were it allowed to
        try:
            return parse(*args, **kwargs)
        finally:
            with guard:
                in_flight.pop()

    monkeypatch.setattr(ast, "parse", slow_parse)
    with ThreadPoolExecutor(max_workers=len(FAMILIES)) as pool:
        fingerprints = list(pool.map(lambda family: inputs(params, CODE_ROOT, family), FAMILIES))

    assert most_at_once == 1
    assert fingerprints == [inputs(params, CODE_ROOT, family) for family in FAMILIES]
