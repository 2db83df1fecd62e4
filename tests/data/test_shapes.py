"""The built-in colour dataset: repeatable bytes, every kind, learnable, and `genpipe data builtin`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from components.data.importers import builtin_dataset
from components.data.raw import DataError, read_raw
from components.data.shapes import KINDS, render_shapes
from components.data.versioning import run_dvc
from flows.cli import app


def digest(images: np.ndarray) -> str:
    return hashlib.sha256(images.tobytes()).hexdigest()


@pytest.mark.parametrize(("resolution", "channels"), [(16, 3), (28, 1), (32, 3), (64, 3)])
def test_same_seed_same_bytes_other_seed_other_images(resolution: int, channels: int):
    first = render_shapes(60, resolution, seed=3, channels=channels)
    again = render_shapes(60, resolution, seed=3, channels=channels)
    other = render_shapes(60, resolution, seed=4, channels=channels)
    assert first.images.shape == (60, channels, resolution, resolution) and first.images.dtype == np.uint8
    assert digest(first.images) == digest(again.images)
    assert np.array_equal(first.labels, again.labels)
    assert digest(first.images) != digest(other.images)
    # Every image differs from the other seed's, not just a few.
    assert (first.images != other.images).reshape(60, -1).any(axis=1).all()


def test_the_bytes_are_those_every_machine_renders():
    """The hash every platform must give: the rendering uses integers only, so a change here means the
    dataset itself changed (and every committed data.dvc of a shapes dataset with it)."""
    dataset = render_shapes(20, 16, seed=0)
    assert digest(dataset.images) == "f75dae02a2e561d8b1bf46054a13433529d1e80991345ac665bf3200e551738a", (
        digest(dataset.images)
    )


def test_a_smaller_set_is_the_start_of_a_larger_one():
    small, large = render_shapes(30, 32, seed=1), render_shapes(2500, 32, seed=1)
    assert np.array_equal(small.images, large.images[:30])
    assert np.array_equal(small.labels, large.labels[:30])


def test_labels_cover_every_kind_and_images_are_varied():
    dataset = render_shapes(500, 32, seed=0)
    counts = np.bincount(dataset.labels, minlength=len(KINDS))
    assert len(counts) == len(KINDS) and counts.min() > 60, counts
    assert "0=disc" in dataset.source and "seed 0" in dataset.source
    assert dataset.name == "shapes32" and render_shapes(10, 28, channels=1).name == "shapes28-grey"
    images = dataset.images.astype(np.int64)
    # Corner colours (background) vary across images, and every image has a visible shape: some
    # pixel far from the background's colour at the corners.
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=2)
    assert corners.std(axis=0).min() > 40
    contrast = np.abs(images - images[:, :, :1, :1]).max(axis=(1, 2, 3))
    assert contrast.min() >= 48
    assert len({digest(image) for image in dataset.images}) == len(dataset.images)


def mask_features(images: np.ndarray) -> np.ndarray:
    """Per image: fill of the shape's bounding box, whether the box's centre is covered, and how
    unevenly the area splits between the box's top and bottom halves (N x 3).

    The shape is every pixel more than 56 levels from the background's centre colour (the mean of the
    corners, as the background's gradient is linear and centred): the background strays at most 48
    levels from it and the shape at least 64.
    """
    pixels = images.astype(np.int64)
    centre_colour = pixels[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].mean(axis=2)
    masks = np.abs(pixels - centre_colour[:, :, None, None]).max(axis=1) > 56
    features = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        height, width = box.shape
        top, bottom = box[: height // 2].sum(), box[(height + 1) // 2 :].sum()
        features.append([box.mean(), box[height // 2, width // 2], abs(int(top) - int(bottom)) / box.sum()])
    return np.array(features)


def test_the_kinds_are_told_apart_by_simple_statistics_of_the_images():
    """Nearest class mean on three shape statistics, fitted on one set and scored on another, is far
    above chance (20%): the labels are visible in the pixels, whatever the colours and positions."""
    train, test = render_shapes(1000, 32, seed=0), render_shapes(500, 32, seed=1)
    train_features, test_features = mask_features(train.images), mask_features(test.images)
    means = np.stack([train_features[train.labels == k].mean(0) for k in range(len(KINDS))])
    scale = train_features.std(0)
    distances = (((test_features[:, None] - means[None]) / scale) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == test.labels).mean()
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"size": 5}, "--size must be an integer of at least 10 images, got 5"),
        ({"size": 100, "resolution": 8}, "--resolution must be an integer from 16 to 256 pixels"),
        ({"size": 100, "resolution": 1000}, "got 1000"),
        ({"size": 10**9, "resolution": 64}, "GiB limit; ask for fewer images"),
    ],
)
def test_bad_size_or_resolution_is_named(options: dict, message: str):
    with pytest.raises(DataError, match=message):
        builtin_dataset("shapes", **options)


def test_unknown_builtin_and_options_digits_do_not_take_are_named():
    with pytest.raises(DataError, match="unknown built-in dataset 'cifar'; expected one of shapes, digits"):
        builtin_dataset("cifar")
    with pytest.raises(DataError, match="digits: --size, --grey not accepted"):
        builtin_dataset("digits", size=100, grey=True)
    assert builtin_dataset("digits").images.shape == (1797, 1, 8, 8)


def tracked(project: Path) -> dict[str, bytes]:
    """data.dvc and every file under data/, byte for byte."""
    files = [project / "data.dvc", *(p for p in (project / "data").rglob("*") if p.is_file())]
    return {str(p.relative_to(project)): p.read_bytes() for p in files}


def test_cli_writes_the_dataset_to_data_raw_and_tracks_it_and_bad_input_changes_nothing(project: Path):
    runner = CliRunner()
    args = [
        "data",
        "builtin",
        "shapes",
        "--size",
        "40",
        "--resolution",
        "16",
        "--seed",
        "2",
        "-C",
        str(project),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "40 images of 3x16x16 (5 labels) as 'shapes16'" in result.output
    raw = read_raw(project / "data" / "raw")
    assert digest(raw.images) == digest(render_shapes(40, 16, seed=2).images)
    assert json.loads((project / "data" / "raw" / "dataset.json").read_text())["name"] == "shapes16"
    assert (project / "data.dvc").is_file() and "modified" not in run_dvc(project, "status", "data.dvc")

    before = tracked(project)
    bad = runner.invoke(
        app, ["data", "builtin", "shapes", "--size", "40", "--resolution", "8", "-C", str(project)]
    )
    assert bad.exit_code == 1 and "--resolution must be an integer from 16 to 256" in bad.output
    assert tracked(project) == before

    back = runner.invoke(app, ["data", "builtin", "digits", "-C", str(project)])
    assert back.exit_code == 0, back.output
    assert read_raw(project / "data" / "raw").images.shape == (1797, 1, 8, 8)
    assert tracked(project)["data.dvc"] != before["data.dvc"]
