"""The built-in colour dataset: procedurally rendered shapes, byte-identical for a seed on every machine.

Each image is one filled shape (disc, square, triangle, ring or cross, the label) of random size,
position, orientation and colour on a background of another colour with a linear gradient. The
images are rendered with integer arithmetic only: every random quantity is an integer drawn from
NumPy's PCG64 stream, every inside-the-shape test is an integer inequality, and edges are
anti-aliased by counting which of 2 x 2 sub-pixel samples the shape covers. No floating point
touches a pixel, so the bytes (hence the DVC hash) are the same on every platform. Parameters are
drawn one row per image, so the first n images of a larger set are the set of size n.
"""

from __future__ import annotations

import itertools

import numpy as np

from components.data.raw import DataError, RawDataset

KINDS = ("disc", "square", "triangle", "ring", "cross")
MIN_RESOLUTION, MAX_RESOLUTION = 16, 256
MIN_SIZE = 10  # the fewest images `RawDataset.validate` accepts (train, val and test need some)
MAX_BYTES = 8 * 2**30  # refuse a request that could not fit in memory, before rendering anything
SUBSAMPLES = 2  # per axis: coverage of 2 x 2 sub-pixel samples gives 5 grey levels along an edge
CHUNK = 1024  # images rendered at once; bounds the sub-pixel arrays to ~100 MB at 64 x 64
# Sub-pixel sample j of an axis sits at (j + 1/2) / SUBSAMPLES pixels; in units of 1 / (2 * SUBSAMPLES)
# pixel that is the odd integer 2j + 1, and every other length below is in those units.
UNITS_PER_PIXEL = 2 * SUBSAMPLES
# Per-image parameters, one uint32 column each, mapped onto their ranges by `_scaled`.
COLUMNS = (
    "kind",
    "radius",
    "cx",
    "cy",
    "flip",
    "gx",
    "gy",
    *(f"bg{i}" for i in range(3)),
    *(f"fg{i}" for i in range(3)),
)


def _scaled(column: np.ndarray, low: np.ndarray | int, high: np.ndarray | int) -> np.ndarray:
    """uint32 draws mapped onto the integers low..high inclusive (multiply-shift, exact in int64)."""
    span = np.asarray(high, dtype=np.int64) - low + 1
    return low + ((column.astype(np.int64) * span) >> 32)


def _masks(kind: int, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Which sub-pixel samples lie inside the shape, from integer offsets to its centre (B x S x S)."""
    if kind == 0:  # disc
        return dx * dx + dy * dy <= radius * radius
    if kind == 1:  # square, with the disc's area: side r * sqrt(pi) ~ r * 16 / 9
        half = radius * 8 // 9
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if kind == 2:  # isosceles triangle, apex at -r, base at +r/2 (dy is flipped for half of them)
        base = radius // 2
        return (dy <= base) & (np.abs(dx) * (base + radius) <= (dy + radius) * radius)
    if kind == 3:  # ring of inner radius 0.55 r
        squared = dx * dx + dy * dy
        inner = radius * 11 // 20
        return (squared <= radius * radius) & (squared >= inner * inner)
    if kind == 4:  # plus-shaped cross, arms 0.3 r half-thick
        arm = radius * 3 // 10
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"shape kind must be 0..{len(KINDS) - 1}, got {kind}")


def _render(params: dict[str, np.ndarray], resolution: int, channels: int) -> np.ndarray:
    """uint8 images (B x C x R x R) for one chunk of per-image parameters, sorted by kind."""
    count = len(params["kind"])
    samples = resolution * SUBSAMPLES
    position = 2 * np.arange(samples, dtype=np.int32) + 1
    dx = position[None, None, :] - params["cx"][:, None, None]
    dy = (position[None, :, None] - params["cy"][:, None, None]) * params["flip"][:, None, None]
    radius = params["radius"][:, None, None]
    inside = np.empty((count, samples, samples), dtype=bool)
    # Sorted kinds make each kind's images one contiguous slice: views, not gathered copies.
    bounds = np.searchsorted(params["kind"], np.arange(len(KINDS) + 1))
    for kind, (first, last) in enumerate(itertools.pairwise(bounds)):
        if last > first:
            inside[first:last] = _masks(kind, dx[first:last], dy[first:last], radius[first:last])
    # Covered sub-pixel samples per pixel, 0..SUBSAMPLES**2, summed in uint8.
    fine = inside.view(np.uint8)
    coverage = sum(
        fine[:, i::SUBSAMPLES, j::SUBSAMPLES] for i in range(SUBSAMPLES) for j in range(SUBSAMPLES)
    ).astype(np.int32)
    full = SUBSAMPLES * SUBSAMPLES
    pixel = np.arange(resolution, dtype=np.int32) - resolution // 2
    # A linear gradient centred on the image, so the base colour is the centre's.
    ramp = (
        params["gx"][:, None, None] * pixel[None, None, :]
        + params["gy"][:, None, None] * pixel[None, :, None]
    ) // resolution
    images = np.empty((count, channels, resolution, resolution), dtype=np.uint8)
    for c in range(channels):
        background = np.clip(params[f"bg{c}"][:, None, None] + ramp, 0, 255)
        foreground = params[f"fg{c}"][:, None, None]
        blended = (background * (full - coverage) + foreground * coverage + full // 2) // full
        images[:, c] = blended.astype(np.uint8)
    return images


def _parameters(size: int, resolution: int, seed: int, channels: int) -> dict[str, np.ndarray]:
    """Per-image integer parameters: the shape's kind, radius, centre, orientation and colours."""
    draws = np.random.default_rng(seed).integers(0, 2**32, size=(size, len(COLUMNS)), dtype=np.uint64)
    column = dict(zip(COLUMNS, draws.T, strict=True))
    extent = resolution * UNITS_PER_PIXEL
    radius = _scaled(column["radius"], extent * 15 // 100, extent * 35 // 100)  # 0.15..0.35 of the side
    params = {
        "kind": _scaled(column["kind"], 0, len(KINDS) - 1),
        "radius": radius,
        # Centres keep the whole shape inside the image.
        "cx": _scaled(column["cx"], radius, extent - radius),
        "cy": _scaled(column["cy"], radius, extent - radius),
        "flip": 2 * _scaled(column["flip"], 0, 1) - 1,
        "gx": _scaled(column["gx"], -48, 48),
        "gy": _scaled(column["gy"], -48, 48),
    }
    for c in range(channels):
        background = _scaled(column[f"bg{c}"], 0, 255)
        # Every channel of the shape differs from the background's centre by 64..128 levels (mod 256),
        # so no shape is invisible against its background.
        params[f"bg{c}"] = background
        params[f"fg{c}"] = (background + _scaled(column[f"fg{c}"], 64, 192)) % 256
    # int32 halves the memory of the sub-pixel arrays; lengths stay below 2**11, squares below 2**22.
    return {key: value.astype(np.int32) for key, value in params.items()}


def render_shapes(size: int, resolution: int, seed: int = 0, channels: int = 3) -> RawDataset:
    """`size` images of `channels` x `resolution` x `resolution` (uint8) with their shape kinds as labels."""
    check_request(size, resolution, channels)
    params = _parameters(size, resolution, seed, channels)
    order = np.argsort(params["kind"], kind="stable")
    images = np.empty((size, channels, resolution, resolution), dtype=np.uint8)
    for start in range(0, size, CHUNK):
        chosen = order[start : start + CHUNK]
        chunk = {key: value[chosen] for key, value in params.items()}
        images[chosen] = _render(chunk, resolution, channels)
    colour = "RGB" if channels == 3 else "grey"
    source = (
        f"genpipe built-in shapes: {size} {colour} images of {resolution}x{resolution}, seed {seed}, "
        f"labels {', '.join(f'{i}={kind}' for i, kind in enumerate(KINDS))}"
    )
    name = f"shapes{resolution}" + ("" if channels == 3 else "-grey")
    return RawDataset(images, params["kind"].astype(np.int64), name, source)


def check_request(size: int, resolution: int, channels: int) -> None:
    """Raise DataError naming the value at fault unless the request can be rendered."""
    if not isinstance(size, int) or size < MIN_SIZE:
        raise DataError(f"shapes: --size must be an integer of at least {MIN_SIZE} images, got {size!r}")
    if not isinstance(resolution, int) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DataError(
            f"shapes: --resolution must be an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels "
            f"(e.g. 28, 32 or 64), got {resolution!r}"
        )
    if channels not in (1, 3):
        raise DataError(f"shapes: channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    needed = size * channels * resolution * resolution
    if needed > MAX_BYTES:
        raise DataError(
            f"shapes: {size} images of {channels}x{resolution}x{resolution} need {needed / 2**30:.1f} GiB, "
            f"more than the {MAX_BYTES / 2**30:.0f} GiB limit; ask for fewer images"
        )
