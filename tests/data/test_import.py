"""`genpipe data import`: every format reads to the same dataset, and bad input never touches `data/`.

One real git + DVC project per module, reset to its baseline (the built-in digits) after each test.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.importers import commit_hint, detect_format, import_dataset, read_dataset
from components.data.prepared import SPLITS, load_prepared, prepare
from components.data.raw import DataError, RawDataset, builtin_digits, read_raw, write_raw
from components.data.versioning import DvcError, run_dvc, track_data

N, SIZE, CLASSES = 30, 6, 5


@pytest.fixture(scope="module")
def reference() -> RawDataset:
    """Random 6x6 grayscale images, labels sorted so that class-folder order is the array order."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (N, 1, SIZE, SIZE), dtype=np.uint8)
    labels = np.repeat(np.arange(CLASSES, dtype=np.int64), N // CLASSES)
    return RawDataset(images, labels, "reference", "test")


@pytest.fixture(scope="module")
def reference_prepared(reference: RawDataset, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reference")
    write_raw(reference, root / "raw")
    prepare(root / "raw", root / "prepared", 0.1, 0.2, 0)
    return load_prepared(root / "prepared")


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory):
    """A git + DVC project whose data.dvc tracks the built-in digits, as `genpipe run` leaves it."""
    repo = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DVC_NO_ANALYTICS", "1")
        git = ["git", "-C", str(repo)]
        subprocess.run([*git, "init", "--quiet"], check=True)
        subprocess.run([*git, "config", "user.name", "genpipe tests"], check=True)
        subprocess.run([*git, "config", "user.email", "tests@genpipe.invalid"], check=True)
        run_dvc(repo, "init", "--quiet")
        write_raw(builtin_digits(), repo / "data" / "raw")
        track_data(repo)
        subprocess.run([*git, "add", ".dvc", "data.dvc", ".gitignore"], check=True)
        subprocess.run([*git, "commit", "--quiet", "-m", "baseline"], check=True)
        yield repo


def snapshot(repo: Path) -> dict[str, bytes]:
    """{relative path: bytes} of data.dvc and every file under data/ (raw and any leftovers)."""
    files = [repo / "data.dvc", *(p for p in (repo / "data").rglob("*") if p.is_file())]
    return {str(p.relative_to(repo)): p.read_bytes() for p in files}


@pytest.fixture
def repo(dvc_project: Path):
    baseline = snapshot(dvc_project)
    yield dvc_project
    shutil.rmtree(dvc_project / "data")
    for relative, content in baseline.items():
        (dvc_project / relative).parent.mkdir(parents=True, exist_ok=True)
        (dvc_project / relative).write_bytes(content)


# --- writers of each input format ----------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = 0x800 | array.ndim if magic is None else magic
    return struct.pack(f">I{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, ds: RawDataset, prefix: str = "train", gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    images, labels = idx_bytes(ds.images[:, 0]), idx_bytes(ds.labels)
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(
        gzip.compress(labels, mtime=0) if gz else labels
    )
    images_path = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    images_path.write_bytes(gzip.compress(images, mtime=0) if gz else images)
    return images_path


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def write_png_folder(folder: Path, ds: RawDataset) -> Path:
    for index, (image, label) in enumerate(zip(ds.images, ds.labels, strict=True)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / str(label) / f"{index:03d}.png")
    return folder


def noisy(images: np.ndarray, top: float) -> np.ndarray:
    """Floats that round to `images`, as a model's or a resize's output would be."""
    jitter = np.random.default_rng(1).uniform(-0.45, 0.45, images.shape)
    return np.clip(images + jitter, 0, top)


# kind -> (writer, detected format, default name); every writer stores the reference dataset.
GOOD: dict[str, tuple[Callable[[Path, RawDataset], Path], str, str]] = {
    "idx-gz-folder": (lambda tmp, ds: write_idx(tmp / "mnist", ds).parent, "idx", "mnist"),
    "idx-raw-file": (lambda tmp, ds: write_idx(tmp / "mnist", ds, gz=False), "idx", "mnist"),
    "npz-uint8-NxHxW": (
        lambda tmp, ds: write_npz(tmp / "fashion.npz", x=ds.images[:, 0], y=ds.labels),
        "npz",
        "fashion",
    ),
    "npz-float01": (
        lambda tmp, ds: write_npz(tmp / "f.npz", x=noisy(ds.images, 255) / 255, y=ds.labels),
        "npz",
        "f",
    ),
    "png-classes": (lambda tmp, ds: write_png_folder(tmp / "digits_png", ds), "images", "digits_png"),
}
MORE_GOOD: dict[str, tuple[Callable[[Path, RawDataset], Path], str, str]] = {
    "npz-float32-channels-last": (
        lambda tmp, ds: write_npz(
            tmp / "c.npz", x=(ds.images / np.float32(255)).transpose(0, 2, 3, 1), y=ds.labels
        ),
        "npz",
        "c",
    ),
    "npz-float-0-255-NCHW": (
        lambda tmp, ds: write_npz(tmp / "d.npz", x=noisy(ds.images, 255), y=ds.labels),
        "npz",
        "d",
    ),
    "npz-int64": (
        lambda tmp, ds: write_npz(tmp / "e.npz", x=ds.images.astype(np.int64), y=ds.labels),
        "npz",
        "e",
    ),
    "idx-train-then-t10k": (
        lambda tmp, ds: (
            [
                write_idx(tmp / "m", RawDataset(ds.images[:20], ds.labels[:20], "", "")),
                write_idx(
                    tmp / "m", RawDataset(ds.images[20:], ds.labels[20:], "", ""), prefix="t10k", gz=False
                ),
            ][0].parent
        ),
        "idx",
        "m",
    ),
    "idx-gz-and-gunzipped-copies": (
        lambda tmp, ds: [write_idx(tmp / "k", ds), write_idx(tmp / "k", ds, gz=False)][0].parent,
        "idx",
        "k",
    ),
}


def assert_same_dataset(dataset: RawDataset, reference: RawDataset) -> None:
    assert dataset.images.dtype == np.uint8 and dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.images, reference.images)
    np.testing.assert_array_equal(dataset.labels, reference.labels)


# --- good input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GOOD)
def test_import_tracks_the_dataset_and_prepares_the_same_splits(
    kind, repo, reference, reference_prepared, tmp_path
):
    write, _, name = GOOD[kind]
    data_dvc = (repo / "data.dvc").read_bytes()
    dataset = import_dataset(write(tmp_path, reference), repo)
    assert dataset.name == name
    assert (repo / "data.dvc").read_bytes() != data_dvc
    assert json.loads(run_dvc(repo, "status", "--json")) == {}
    assert read_raw(repo / "data" / "raw").name == name
    prepare(repo / "data" / "raw", tmp_path / "prepared", 0.1, 0.2, 0)
    prepared = load_prepared(tmp_path / "prepared")
    for split in SPLITS:
        ours, expected = prepared.split(split), reference_prepared.split(split)
        np.testing.assert_array_equal(ours.images, expected.images)
        np.testing.assert_array_equal(ours.binary, expected.binary)
        np.testing.assert_array_equal(ours.labels, expected.labels)


@pytest.mark.parametrize("kind", [*GOOD, *MORE_GOOD])
def test_format_is_detected_and_every_variant_reads_the_same_arrays(kind, reference, tmp_path):
    write, fmt, name = {**GOOD, **MORE_GOOD}[kind]
    path = write(tmp_path, reference)
    assert detect_format(path) == fmt
    detected, explicit = read_dataset(path), read_dataset(path, fmt=fmt.upper(), name="given")
    assert (detected.name, explicit.name) == (name, "given")
    assert_same_dataset(detected, reference)
    assert_same_dataset(explicit, reference)


@pytest.mark.parametrize(
    ("dtype", "note"),
    [
        (np.uint8, "integers 0/1 taken as binary images, mapped to 0/255"),
        (np.int64, "integers 0/1 taken as binary images, mapped to 0/255"),
        (np.bool_, "booleans mapped to 0/255"),
        (np.float32, "floats in [0, 1] scaled by 255"),
    ],
)
def test_binary_images_read_as_black_and_white_whatever_their_type(dtype, note, tmp_path):
    ones = np.random.default_rng(0).integers(0, 2, (N, SIZE, SIZE))
    np.savez(tmp_path / "binary.npz", x=ones.astype(dtype))
    dataset = read_dataset(tmp_path / "binary.npz")
    np.testing.assert_array_equal(dataset.images[:, 0], ones * 255)
    assert note in dataset.source


def test_idx_detected_by_magic_number_without_the_usual_name(reference, tmp_path):
    plain = tmp_path / "pixels.bin"
    plain.write_bytes(idx_bytes(reference.images[:, 0]))
    zipped = tmp_path / "pixels.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, zipped):
        assert detect_format(path) == "idx"
        dataset = read_dataset(path)
        np.testing.assert_array_equal(dataset.images, reference.images)
        assert dataset.labels is None and "no labels" in dataset.source


def test_train_and_t10k_are_concatenated_in_that_order_and_said_so(reference, tmp_path):
    folder = MORE_GOOD["idx-train-then-t10k"][0](tmp_path, reference)
    source = read_dataset(folder).source
    assert source.index("train-images") < source.index("t10k-images") and "concatenated" in source


def test_image_folders_flat_rgb_and_numeric_class_names(reference, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, image in enumerate(reference.images):
        Image.fromarray(image[0]).save(flat / f"{index:02d}.png")
    dataset = read_dataset(flat)
    assert dataset.labels is None
    np.testing.assert_array_equal(dataset.images, reference.images)

    rgb = RawDataset(np.repeat(reference.images, 3, axis=1), reference.labels, "", "")
    rgb.images[:, 1] //= 2  # distinct channels, so a channel mix-up would show
    from_png = read_dataset(write_png_folder(tmp_path / "rgb", rgb))
    from_npz = read_dataset(write_npz(tmp_path / "rgb.npz", x=rgb.images.transpose(0, 2, 3, 1), y=rgb.labels))
    assert_same_dataset(from_png, rgb)
    assert_same_dataset(from_npz, rgb)

    numbered = RawDataset(reference.images, np.where(reference.labels < 3, 2, 10), "", "")
    dataset = read_dataset(write_png_folder(tmp_path / "numbered", numbered))
    np.testing.assert_array_equal(dataset.labels, (numbered.labels == 10).astype(np.int64))
    assert "0=2, 1=10" in dataset.source


def test_commit_hint_summarises_the_import(reference):
    hint = commit_hint(RawDataset(reference.images, reference.labels, "mnist", ""))
    assert hint.startswith("Imported 30 images of 1x6x6 (5 labels) as 'mnist'. Commit data.dvc: ")
    assert "git add data.dvc && git commit -m 'Import dataset mnist'" in hint
    assert "(no labels)" in commit_hint(RawDataset(reference.images, None, "x", ""))


# --- bad input -------------------------------------------------------------------------------------------


def truncated(path: Path, keep: float = 0.5) -> Path:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return path


def rewritten(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def npz_with(tmp: Path, ds: RawDataset, values: list[float]) -> Path:
    x = ds.images / 255.0
    x.flat[: len(values)] = values
    return write_npz(tmp / "bad.npz", x=x, y=ds.labels)


def png_folder_with(tmp: Path, ds: RawDataset, odd: np.ndarray) -> Path:
    folder = write_png_folder(tmp / "pngs", ds)
    Image.fromarray(odd).save(folder / "3" / "odd.png")
    return folder / "3" / "odd.png"


def idx_pair(tmp: Path, ds: RawDataset) -> tuple[Path, Path]:
    images = write_idx(tmp / "mnist", ds, gz=False)
    return images, images.with_name("train-labels-idx1-ubyte")


# case -> builder(tmp, reference) returning (path to import, format, the file the error must name, problem).
BAD: dict[str, Callable[[Path, RawDataset], tuple[Path, str | None, Path, str]]] = {
    "missing path": lambda tmp, ds: (tmp / "nope", None, tmp / "nope", "no such file"),
    "unknown format option": lambda tmp, ds: (
        write_npz(tmp / "a.npz", x=ds.images[:, 0]),
        "csv",
        tmp / "a.npz",
        "unknown format 'csv'",
    ),
    "unknown file type": lambda tmp, ds: (
        rewritten(tmp / "table.csv", b"1,2,3\n"),
        None,
        tmp / "table.csv",
        "unknown dataset format",
    ),
    "truncated gzip idx": lambda tmp, ds: (
        tmp / "mnist",
        None,
        truncated(write_idx(tmp / "mnist", ds)),
        "truncated",
    ),
    "truncated raw idx": lambda tmp, ds: (
        tmp / "mnist",
        "idx",
        truncated(idx_pair(tmp, ds)[0], keep=0.9),
        "truncated: the header says 30x6x6 = 1080 bytes",
    ),
    "idx wrong magic number": lambda tmp, ds: (
        rewritten(tmp / "train-images-idx3-ubyte", idx_bytes(ds.images[:, 0], magic=0x0903)),
        None,
        tmp / "train-images-idx3-ubyte",
        "wrong magic number 0x00000903; expected 0x00000803",
    ),
    "idx labels wrong magic number": lambda tmp, ds: (
        (pair := idx_pair(tmp, ds))[0],
        None,
        rewritten(pair[1], idx_bytes(ds.labels[:, None, None])),
        "wrong magic number 0x00000803; expected 0x00000801",
    ),
    "idx image and label counts differ": lambda tmp, ds: (
        (pair := idx_pair(tmp, ds))[0],
        None,
        rewritten(pair[1], idx_bytes(ds.labels[:29])),
        "29 labels but",
    ),
    "npz image and label counts differ": lambda tmp, ds: (
        write_npz(tmp / "a.npz", x=ds.images, y=ds.labels[:29]),
        None,
        tmp / "a.npz",
        "x has 30 images but y has shape (29,)",
    ),
    "npz NaN": lambda tmp, ds: (p := npz_with(tmp, ds, [np.nan] * 3), None, p, "x contains 3 NaN values"),
    "npz infinite": lambda tmp, ds: (
        p := npz_with(tmp, ds, [np.inf]),
        None,
        p,
        "x contains 1 infinite values",
    ),
    "npz negative": lambda tmp, ds: (
        p := npz_with(tmp, ds, [-0.5, -1]),
        None,
        p,
        "x contains 2 negative values",
    ),
    "npz above 255": lambda tmp, ds: (
        p := npz_with(tmp, ds, [256.0]),
        None,
        p,
        "x contains 1 values above 255",
    ),
    "npz integers out of range": lambda tmp, ds: (
        p := write_npz(tmp / "a.npz", x=ds.images.astype(np.int16) - 1),
        None,
        p,
        "x has values -1..",
    ),
    "npz truncated": lambda tmp, ds: (
        p := truncated(write_npz(tmp / "a.npz", x=ds.images, y=ds.labels), keep=0.95),
        None,
        p,
        "not a complete .npz (zip) archive",
    ),
    "npz unreadable": lambda tmp, ds: (
        p := rewritten(tmp / "a.npz", b"not a zip archive at all"),
        None,
        p,
        "not a complete .npz (zip) archive",
    ),
    "npz without x": lambda tmp, ds: (
        p := write_npz(tmp / "a.npz", images=ds.images, y=ds.labels),
        None,
        p,
        "no array named 'x' (found images, y)",
    ),
    "too few images": lambda tmp, ds: (
        p := write_npz(tmp / "a.npz", x=ds.images[:5]),
        None,
        p,
        "need at least 10 images",
    ),
    "empty folder": lambda tmp, ds: (
        (tmp / "empty").mkdir() or tmp / "empty",
        None,
        tmp / "empty",
        "empty folder",
    ),
    "empty folder as images": lambda tmp, ds: (
        (tmp / "empty").mkdir() or tmp / "empty",
        "images",
        tmp / "empty",
        "empty folder",
    ),
    "non-image file in image folder": lambda tmp, ds: (
        write_png_folder(tmp / "pngs", ds),
        None,
        rewritten(tmp / "pngs" / "2" / "notes.txt", b"hello"),
        "not a PNG or JPEG image",
    ),
    "file next to class folders": lambda tmp, ds: (
        write_png_folder(tmp / "pngs", ds),
        None,
        rewritten(tmp / "pngs" / "README.md", b"my digits"),
        "a file next to class sub-folders",
    ),
    "transparent png": lambda tmp, ds: (
        tmp / "pngs",
        None,
        png_folder_with(tmp, ds, np.zeros((SIZE, SIZE, 4), np.uint8)),
        "has transparent pixels",
    ),
    "mixed image sizes": lambda tmp, ds: (
        tmp / "pngs",
        None,
        png_folder_with(tmp, ds, np.zeros((7, 7), np.uint8)),
        "7x7 grayscale but",
    ),
    "grayscale and RGB mixed": lambda tmp, ds: (
        tmp / "pngs",
        None,
        png_folder_with(tmp, ds, np.zeros((SIZE, SIZE, 3), np.uint8)),
        "6x6 RGB but",
    ),
    "truncated png": lambda tmp, ds: (
        tmp / "pngs",
        None,
        truncated(png_folder_with(tmp, ds, ds.images[20, 0])),
        "unreadable or truncated image",
    ),
    "empty class folder": lambda tmp, ds: (
        write_png_folder(tmp / "pngs", ds),
        None,
        (tmp / "pngs" / "9").mkdir() or tmp / "pngs" / "9",
        "empty class folder",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_file_and_leaves_data_untouched(case, repo, reference, tmp_path):
    path, fmt, culprit, problem = BAD[case](tmp_path, reference)
    before = snapshot(repo)
    with pytest.raises(DataError) as error:
        import_dataset(path, repo, fmt=fmt)
    assert f"{culprit}: " in str(error.value) and problem in str(error.value)
    assert snapshot(repo) == before


def broken_dvc_config(repo: Path) -> Callable[[], None]:
    """`dvc add` fails before it writes anything."""
    config = repo / ".dvc" / "config"
    original = config.read_bytes()
    config.write_text("[core\nthis is not a DVC config\n")
    return lambda: config.write_bytes(original)


def locked_git_index(repo: Path) -> Callable[[], None]:
    """`dvc add` rewrites data.dvc, then fails to `git add` it (autostage) while another git command runs."""
    local_config, lock = repo / ".dvc" / "config.local", repo / ".git" / "index.lock"
    local_config.write_text("[core]\n    autostage = true\n")
    lock.touch()
    return lambda: [path.unlink() for path in (local_config, lock)]


@pytest.mark.parametrize("sabotage", [broken_dvc_config, locked_git_index])
def test_failing_dvc_add_restores_data_and_data_dvc(sabotage, repo, reference, tmp_path):
    good = write_npz(tmp_path / "good.npz", x=reference.images, y=reference.labels)
    before = snapshot(repo)
    undo = sabotage(repo)
    try:
        with pytest.raises(DvcError, match="dvc add"):
            import_dataset(good, repo)
    finally:
        undo()
    assert snapshot(repo) == before
    assert not list((repo / ".dvc" / "tmp").glob("import-backup-*"))
    assert json.loads(run_dvc(repo, "status", "--json")) == {}
