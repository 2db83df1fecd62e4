"""`genpipe data import`: read a user's dataset (IDX, .npz or an image folder) and put it under DVC.

Everything is read and validated before `data/raw` is touched; an import that fails at any point,
`dvc add` included, leaves `data/raw` and `data.dvc` exactly as they were. Provenance written to
`dataset.json` names input files, never absolute paths, so the same files give the same DVC hash
on every machine.
"""

from __future__ import annotations

import gzip
import re
import shlex
import shutil
import struct
import tempfile
import zipfile
import zlib
from math import prod
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from components.data.raw import DataError, RawDataset, builtin_digits, write_raw
from components.data.shapes import render_shapes
from components.data.versioning import DATA_DIR, DATA_FILE, DvcError, track_data

FORMATS = ("idx", "npz", "images")
BUILTINS = ("shapes", "digits")
SHAPES_SIZE, SHAPES_RESOLUTION = 10_000, 32  # `genpipe data builtin shapes` without options
RAW_SUBDIR = "raw"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# MNIST-family names: train-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte, emnist-letters-train-images-...
IDX_NAME = re.compile(
    r"^(?P<prefix>.*)(?P<kind>images|labels)(?P<sep>[.-])idx(?P<ndim>[13])-ubyte(?P<gz>\.gz)?$", re.IGNORECASE
)
IDX_IMAGES_MAGIC = 0x00000803  # uint8 (0x08), 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8 (0x08), 1 dimension
GZIP_MAGIC = b"\x1f\x8b"


def read_dataset(path: Path, fmt: str | None = None, name: str | None = None) -> RawDataset:
    """Read and validate the dataset at `path` (format detected unless `fmt` is one of FORMATS)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt is None:
        fmt = detect_format(path)
    elif fmt.lower() not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if name is not None and not name.strip():
        raise DataError(f"{path}: the dataset name must not be empty")
    reader = {"idx": _read_idx, "npz": _read_npz, "images": _read_image_folder}[fmt.lower()]
    images, labels, source = reader(path)
    dataset = RawDataset(images, labels, name or _default_name(path), source)
    dataset.validate(str(path))
    return dataset


def import_dataset(path: Path, repo: Path, fmt: str | None = None, name: str | None = None) -> RawDataset:
    """Replace `data/raw` of the DVC project `repo` with the dataset at `path` and track it in `data.dvc`.

    On any failure `data/raw` and `data.dvc` are restored byte for byte and the error is raised.
    """
    check_project(repo)
    return install_dataset(read_dataset(path, fmt, name), repo)


def check_project(repo: Path) -> None:
    """Raise DvcError unless `repo` is a DVC project (checked before any data is read or rendered)."""
    if not (Path(repo) / ".dvc").is_dir():
        raise DvcError(f"{repo}: not a DVC project (no .dvc/ folder); run it from the genpipe project root")


def install_dataset(dataset: RawDataset, repo: Path) -> RawDataset:
    """Replace `data/raw` of the DVC project `repo` with `dataset` and track it in `data.dvc`.

    On any failure `data/raw` and `data.dvc` are restored byte for byte and the error is raised.
    """
    repo = Path(repo)
    check_project(repo)
    raw_dir, data_file = repo / DATA_DIR / RAW_SUBDIR, repo / DATA_FILE
    old_data_file = data_file.read_bytes() if data_file.exists() else None
    # Inside .dvc/tmp (git-ignored, same filesystem as data/) so the old data can be renamed back, not copied.
    (repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    backup = Path(tempfile.mkdtemp(prefix="import-backup-", dir=repo / ".dvc" / "tmp"))
    old_raw = backup / RAW_SUBDIR
    try:
        if raw_dir.exists():
            raw_dir.rename(old_raw)
        try:
            write_raw(dataset, raw_dir)
            track_data(repo)
        except BaseException:
            shutil.rmtree(raw_dir, ignore_errors=True)
            if old_raw.exists():
                old_raw.rename(raw_dir)
            if old_data_file is None:
                data_file.unlink(missing_ok=True)
            else:
                data_file.write_bytes(old_data_file)
            raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)
    return dataset


def builtin_dataset(
    name: str, *, size: int | None = None, resolution: int | None = None, seed: int = 0, grey: bool = False
) -> RawDataset:
    """A built-in dataset by name: `shapes` (rendered, any size and resolution) or `digits` (fixed)."""
    if name == "shapes":
        return render_shapes(
            SHAPES_SIZE if size is None else size,
            SHAPES_RESOLUTION if resolution is None else resolution,
            seed,
            channels=1 if grey else 3,
        )
    if name == "digits":
        given = [
            option for option, value in (("--size", size), ("--resolution", resolution)) if value is not None
        ]
        if given or grey or seed:
            given += ["--grey"] * grey + ["--seed"] * bool(seed)
            raise DataError(
                f"digits: {', '.join(given)} not accepted; the digits are a fixed set of 1,797 8x8 images"
            )
        return builtin_digits()
    raise DataError(f"unknown built-in dataset {name!r}; expected one of {', '.join(BUILTINS)}")


def commit_hint(dataset: RawDataset) -> str:
    """The line `genpipe data import` prints: what was imported and how to commit it."""
    n, c, h, w = dataset.images.shape
    labels = "no labels" if dataset.labels is None else f"{len(np.unique(dataset.labels))} labels"
    message = shlex.quote(f"Import dataset {dataset.name}")
    return (
        f"Imported {n} images of {c}x{h}x{w} ({labels}) as '{dataset.name}'. "
        f"Commit data.dvc: git add {DATA_FILE} && git commit -m {message}"
    )


def detect_format(path: Path) -> str:
    """Which of FORMATS the file or folder at `path` holds, from its names and, for IDX, its magic number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        entries = _visible(path)
        if not entries:
            raise DataError(f"{path}: empty folder; expected images, class sub-folders or IDX files")
        if any(_is_image(p) for p in entries) or any(
            p.is_dir() and any(_is_image(q) for q in _visible(p)) for p in entries
        ):
            return "images"
        if any(p.is_file() and IDX_NAME.match(p.name) for p in entries):
            return "idx"
        raise DataError(
            f"{path}: unknown dataset format; expected PNG/JPEG images, class sub-folders of images "
            "or IDX files (train-images-idx3-ubyte[.gz]) inside"
        )
    if path.suffix.lower() == ".npz":
        return "npz"
    if IDX_NAME.match(path.name) or _idx_magic(path) in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        return "idx"
    raise DataError(
        f"{path}: unknown dataset format; expected a .npz file, an IDX file or a folder of PNG/JPEG images"
    )


def _default_name(path: Path) -> str:
    path = path.resolve()
    if path.is_dir():
        return path.name
    if IDX_NAME.match(path.name):
        # "train-images-idx3-ubyte" says nothing; the folder it came in ("mnist") does.
        return path.parent.name
    return path.stem


# --- IDX ---------------------------------------------------------------------------------------------


def _read_idx(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    parts = [(path, _labels_next_to(path))] if path.is_file() else _idx_parts(path)
    with_labels = [images for images, labels in parts if labels is not None]
    if with_labels and len(with_labels) != len(parts):
        missing = next(images for images, labels in parts if labels is None)
        raise DataError(f"{missing}: no labels file next to it, but {with_labels[0]} has one")
    images, labels, described = [], [], []
    for images_path, labels_path in parts:
        images.append(_parse_idx(images_path, IDX_IMAGES_MAGIC, "images"))
        files = images_path.name + (f" + {labels_path.name}" if labels_path else "")
        described.append(f"{files} ({len(images[-1])})")
        if labels_path is not None:
            labels.append(_parse_idx(labels_path, IDX_LABELS_MAGIC, "labels").astype(np.int64))
            if len(labels[-1]) != len(images[-1]):
                raise DataError(
                    f"{labels_path}: {len(labels[-1])} labels but {images_path} has {len(images[-1])} images"
                )
        if images[-1].shape[1:] != images[0].shape[1:]:
            raise DataError(
                f"{images_path}: images are {'x'.join(map(str, images[-1].shape[1:]))} but {parts[0][0]} "
                f"has {'x'.join(map(str, images[0].shape[1:]))}"
            )
    source = "IDX " + " then ".join(described) + (", concatenated" if len(parts) > 1 else "")
    if not labels:
        source += "; no labels file found"
    return np.concatenate(images)[:, None], np.concatenate(labels) if labels else None, source


def _idx_parts(folder: Path) -> list[tuple[Path, Path | None]]:
    """The images files of an IDX folder to import, in order (train then t10k), each with its labels file."""
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        match = IDX_NAME.match(p.name)
        if p.is_file() and match and match["kind"].lower() == "images":
            # An uncompressed copy next to the .gz (a common leftover of `gunzip -k`) holds the same bytes.
            by_stem.setdefault(p.name.removesuffix(match["gz"] or ""), p)
    if not by_stem:
        raise DataError(f"{folder}: no IDX images file (e.g. train-images-idx3-ubyte[.gz]) inside")
    found = sorted(by_stem.values())

    def split_of(p: Path) -> str:
        tokens = set(re.split(r"[-_.]", IDX_NAME.match(p.name)["prefix"].lower()))
        return "train" if "train" in tokens else "test" if tokens & {"t10k", "test"} else "other"

    train = [p for p in found if split_of(p) == "train"]
    test = [p for p in found if split_of(p) == "test"]
    if len(train) > 1 or len(test) > 1 or (not train and not test and len(found) > 1):
        raise DataError(
            f"{folder}: several IDX images files ({', '.join(p.name for p in found)}); pass the one to import"
        )
    chosen = train + test or found
    return [(p, _labels_next_to(p)) for p in chosen]


def _labels_next_to(images_path: Path) -> Path | None:
    match = IDX_NAME.match(images_path.name)
    if match is None:
        return None
    if match["kind"].lower() == "labels":
        raise DataError(f"{images_path}: an IDX labels file; pass the images file (…-images-idx3-ubyte)")
    base = f"{match['prefix']}labels{match['sep']}idx1-ubyte"
    candidates = [images_path.with_name(base), images_path.with_name(base + ".gz")]
    return next((p for p in candidates if p.is_file()), None)


def _open_maybe_gzipped(path: Path) -> BinaryIO:
    """IDX files come both gzipped and not, whatever their names say; the gzip magic decides."""
    with path.open("rb") as file:
        compressed = file.read(2) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else path.open("rb")


def _idx_magic(path: Path) -> int | None:
    try:
        with _open_maybe_gzipped(path) as file:
            head = file.read(4)
    except (OSError, EOFError, zlib.error):
        return None
    return int.from_bytes(head, "big") if len(head) == 4 else None


def _parse_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """The uint8 array of an IDX file whose header must carry `magic`; sizes are checked exactly."""
    try:
        with _open_maybe_gzipped(path) as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable or truncated ({type(err).__name__}: {err})") from err
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(
            f"{path}: truncated: {len(data)} bytes, shorter than the {header_size}-byte IDX header"
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: wrong magic number 0x{found:08X}; expected 0x{magic:08X} (IDX {ndim}-D uint8 {what})"
        )
    dims = struct.unpack(f">{ndim}i", data[4:header_size])
    if min(dims) < 0:
        raise DataError(f"{path}: negative dimension in the IDX header {dims}")
    expected, body = prod(dims), len(data) - header_size
    if body != expected:
        problem = "truncated" if body < expected else "trailing bytes"
        raise DataError(
            f"{path}: {problem}: the header says {'x'.join(map(str, dims))} = {expected} bytes of {what}, "
            f"the file has {body} after the {header_size}-byte header"
        )
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(dims).copy()


# --- .npz --------------------------------------------------------------------------------------------


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path}: not a complete .npz (zip) archive; "
            "expected numpy.savez output with arrays x and optionally y"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            arrays = {key: archive[key] for key in ("x", "y") if key in names}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err})") from err
    if "x" not in arrays:
        raise DataError(
            f"{path}: no array named 'x' (found {', '.join(names) or 'nothing'}); expected x and optionally y"
        )
    x, y = arrays["x"], arrays.get("y")
    notes = [f"x {x.dtype} {'x'.join(map(str, x.shape))}"]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
        notes.append("channels-last transposed")
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(
            f"{path}: x has shape {x.shape}; expected N x H x W, N x H x W x C or N x C x H x W with C 1 or 3"
        )
    images, scaling = _to_uint8(x, path)
    notes.append(scaling)
    if y is not None:
        if y.shape != (len(images),):
            raise DataError(f"{path}: x has {len(images)} images but y has shape {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y has dtype {y.dtype}; expected integer class labels")
        y = y.astype(np.int64)
    return np.ascontiguousarray(images), y, f"npz {path.name} ({', '.join(notes)})"


def _to_uint8(x: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    """uint8 pixels from booleans or integers 0/1 (binary images, mapped to 0/255), integers 0..255,
    floats in [0, 1] (scaled by 255) or floats in [0, 255]."""
    if x.size == 0:
        raise DataError(f"{path}: x is empty")
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * np.uint8(255), "booleans mapped to 0/255"
    if np.issubdtype(x.dtype, np.integer):
        low, high = x.min(), x.max()
        if low < 0 or high > 255:
            raise DataError(f"{path}: x has values {low}..{high}; expected integers in 0..255")
        if high <= 1:  # kept, binarised MNIST saved as 0/1 would be near-black 8-bit images
            return x.astype(np.uint8) * np.uint8(255), "integers 0/1 taken as binary images, mapped to 0/255"
        return x.astype(np.uint8), "integers kept"
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{path}: x has dtype {x.dtype}; expected integers 0..255 or floats in [0, 1] or [0, 255]"
        )
    problems = {
        "NaN values": np.isnan(x),
        "infinite values": np.isinf(x),
        "negative values": x < 0,
        "values above 255": x > 255,
    }
    for problem, mask in problems.items():
        count = int(mask.sum())
        if count:
            raise DataError(f"{path}: x contains {count} {problem}; expected floats in [0, 1] or [0, 255]")
    if x.max() <= 1:
        return np.rint(x * 255.0).astype(np.uint8), "floats in [0, 1] scaled by 255"
    return np.rint(x).astype(np.uint8), "floats in [0, 255] rounded"


# --- image folders ------------------------------------------------------------------------------------


def _read_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    if not folder.is_dir():
        raise DataError(f"{folder}: a file; expected a folder of PNG/JPEG images or of class sub-folders")
    entries = _visible(folder)
    if not entries:
        raise DataError(f"{folder}: empty folder; expected PNG/JPEG images or class sub-folders")
    class_dirs = [p for p in entries if p.is_dir()]
    if class_dirs and len(class_dirs) != len(entries):
        stray = next(p for p in entries if not p.is_dir())
        raise DataError(
            f"{stray}: a file next to class sub-folders; expected only class sub-folders in {folder}"
        )
    if not class_dirs:
        return _load_images(entries), None, f"image folder {folder.name} (no labels)"
    # Numeric class names ("0".."11") in numeric order, so that folder "10" does not become label 2.
    numeric = all(p.name.isdigit() for p in class_dirs)
    class_dirs.sort(key=lambda p: int(p.name) if numeric else p.name)
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        inside = _visible(class_dir)
        if not inside:
            raise DataError(f"{class_dir}: empty class folder; expected PNG/JPEG images")
        nested = next((p for p in inside if p.is_dir()), None)
        if nested is not None:
            raise DataError(f"{nested}: a folder inside class folder {class_dir.name}; expected only images")
        paths += inside
        labels += [label] * len(inside)
    classes = ", ".join(f"{label}={p.name}" for label, p in enumerate(class_dirs))
    source = f"image folder {folder.name} (classes {classes})"
    return _load_images(paths), np.array(labels, dtype=np.int64), source


def _visible(folder: Path) -> list[Path]:
    """Sorted entries of `folder`, without hidden files such as .DS_Store."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _load_images(paths: list[Path]) -> np.ndarray:
    not_image = next((p for p in paths if not _is_image(p)), None)
    if not_image is not None:
        raise DataError(f"{not_image}: not a PNG or JPEG image; an image folder may hold only images")
    arrays = [_load_image(paths[0])]
    for path in paths[1:]:
        arrays.append(_load_image(path))
        if arrays[-1].shape != arrays[0].shape:
            raise DataError(
                f"{path}: {_describe(arrays[-1])} but {paths[0]} is {_describe(arrays[0])}; "
                "all images must have the same size and colour mode"
            )
    return np.stack(arrays)


def _describe(image: np.ndarray) -> str:
    c, h, w = image.shape
    return f"{h}x{w} {'grayscale' if c == 1 else 'RGB'}"


def _load_image(path: Path) -> np.ndarray:
    """C x H x W uint8 pixels: grayscale gives 1 channel, RGB 3; an alpha channel must be fully opaque."""
    alpha = None
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("1", "P"):
                image = image.convert("L" if image.mode == "1" else "RGBA")
            mode = image.mode
            if mode in ("LA", "RGBA"):
                alpha = np.asarray(image.getchannel("A"))
                image = image.convert(mode[:-1])
            pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable or truncated image ({type(err).__name__}: {err})") from err
    if mode not in ("L", "RGB", "LA", "RGBA"):
        raise DataError(f"{path}: colour mode {mode}; expected 8-bit grayscale (L) or RGB")
    if alpha is not None and np.any(alpha != 255):
        raise DataError(f"{path}: has transparent pixels; expected opaque grayscale or RGB images")
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
