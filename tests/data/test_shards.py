"""The prepare stage's sharded output: round trip, byte-stable files, the fixed binarised copy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from components.data.prepared import load_prepared, prepare, split_indices
from components.data.raw import DataError, RawDataset, read_raw, write_raw
from components.data.shards import INDEX_FILE


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_shards_round_trip_the_raw_pixels_and_labels(digits_root, tmp_path):
    prepare(digits_root / "raw", tmp_path / "prepared", 0.1, 0.2, 0, shard_images=100)
    raw = read_raw(digits_root / "raw")
    data = load_prepared(tmp_path / "prepared")
    for split, rows in split_indices(len(raw.images), 0.1, 0.2, 0).items():
        ours = data.split(split)
        rows = np.sort(rows)
        assert [s.count for s in ours.shards.shards] == [
            min(100, len(rows) - start) for start in range(0, len(rows), 100)
        ]
        chunks = list(ours.shards.chunks("images"))
        assert all(c.dtype == np.uint8 for c in chunks) and max(len(c) for c in chunks) == 100
        np.testing.assert_array_equal(np.concatenate(chunks), raw.images[rows])
        np.testing.assert_array_equal(ours.labels, raw.labels[rows])
        np.testing.assert_array_equal(ours.images, raw.images[rows].astype(np.float32) / 255.0)
        assert set(np.unique(ours.binary)) <= {0, 1} and ours.binary.shape == ours.images.shape


def test_prepare_writes_the_same_bytes_twice_and_drops_stale_shards(digits_root, tmp_path):
    prepare(digits_root / "raw", tmp_path / "a", 0.1, 0.2, 0, shard_images=300)
    prepare(digits_root / "raw", tmp_path / "b", 0.1, 0.2, 0, shard_images=2000)
    prepare(digits_root / "raw", tmp_path / "b", 0.1, 0.2, 0, shard_images=300)  # over a different layout
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    index = json.loads((tmp_path / "a" / INDEX_FILE).read_text())
    assert sum(s["count"] for s in index["splits"]["train"]["shards"]) == index["splits"]["train"]["count"]


def test_prepare_records_the_datas_distinct_pixel_values(digits_root, tmp_path):
    assert load_prepared(digits_root / "prepared").levels == 17  # the digits' grey levels 0..16, scaled
    black_and_white = np.random.default_rng(0).choice(np.array([0, 255], np.uint8), size=(20, 1, 4, 4))
    write_raw(RawDataset(black_and_white, None, "bw", "test"), tmp_path / "raw")
    assert prepare(tmp_path / "raw", tmp_path / "prepared", 0.1, 0.2, 0)["levels"] == 2
    assert load_prepared(tmp_path / "prepared").levels == 2


def test_prepared_data_of_an_older_genpipe_asks_for_the_stage_to_run_again(digits_root, tmp_path):
    prepare(digits_root / "raw", tmp_path / "p", 0.1, 0.2, 0)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    del meta["levels"]
    (tmp_path / "p" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"p/meta.json: written by an older genpipe; run the `prepare` stage"):
        load_prepared(tmp_path / "p")


def test_binarised_copy_does_not_depend_on_the_shard_size(digits_root, tmp_path):
    """One Bernoulli stream drawn shard after shard: the copy a single whole-split draw gave before."""
    prepare(digits_root / "raw", tmp_path / "small", 0.1, 0.2, 0, shard_images=7)
    small = load_prepared(tmp_path / "small")
    whole = load_prepared(digits_root / "prepared")
    raw = read_raw(digits_root / "raw")
    rng = np.random.default_rng(0 + 1)
    for split, rows in split_indices(len(raw.images), 0.1, 0.2, 0).items():
        grey = raw.images[np.sort(rows)].astype(np.float32) / 255.0
        expected = (rng.random(grey.shape, dtype=np.float32) < grey).astype(np.uint8)
        np.testing.assert_array_equal(small.split(split).binary, expected)
        np.testing.assert_array_equal(whole.split(split).binary, expected)


def test_bad_shard_size_and_missing_shard_are_named(digits_root, tmp_path):
    with pytest.raises(DataError, match="data.shard_images=0: expected a positive integer"):
        prepare(digits_root / "raw", tmp_path / "p", 0.1, 0.2, 0, shard_images=0)
    assert not (tmp_path / "p").exists()
    prepare(digits_root / "raw", tmp_path / "p", 0.1, 0.2, 0, shard_images=500)
    (tmp_path / "p" / "val" / "images-00000.npy").unlink()
    with pytest.raises(
        DataError, match=r"index.json: split 'val' lists shard files that are missing: val/images"
    ):
        load_prepared(tmp_path / "p")


@pytest.mark.parametrize("kind", ["binary", "continuous"])
def test_batches_across_shards_are_the_whole_array_cut_in_order(digits_root, tmp_path, kind):
    prepare(digits_root / "raw", tmp_path / "prepared", 0.1, 0.2, 0, shard_images=37)  # batches span shards
    split = load_prepared(tmp_path / "prepared").test
    whole = split.for_kind(kind)
    for size in (1, 36, 50, len(whole), len(whole) + 5):
        batches = list(split.batches(kind, size))
        assert [len(b) for b in batches] == [min(size, len(whole) - s) for s in range(0, len(whole), size)]
        assert all(b.dtype == np.float32 for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), whole)
    np.testing.assert_array_equal(split.head(kind, 10), whole[:10])
    with pytest.raises(ValueError, match="batch size 0"):
        next(split.batches(kind, 0))
