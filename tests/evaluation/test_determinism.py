"""Evaluation is repeatable bit for bit, also while another evaluation runs in another thread."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from components.data.prepared import PreparedData
from components.evaluation.evaluate import EvaluationSettings, RealFeatureCache, evaluate_model
from components.evaluation.featurizer import Featurizer
from components.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = EvaluationSettings(
    num_samples=100, kid_subset_size=50, importance_samples=4, batch_size=100, seed=0
)


@pytest.fixture(scope="module")
def extractor() -> Featurizer:
    torch.manual_seed(0)
    return Featurizer(1, 16, 10, 8).eval().requires_grad_(False)


def tiny(name: str, seed: int, **form):
    torch.manual_seed(seed)
    hparams = {"vae": {"latent_dim": 2, "channels": 4, "hidden": 16}}.get(name, {})
    return create_model(name, (1, 8, 8), **hparams, **form)


def test_an_evaluation_beside_a_concurrent_one_gives_bit_identical_metrics(
    digits: PreparedData, extractor: Featurizer
):
    model = tiny("vae", 0)
    alone = evaluate_model(model, digits, extractor, "f", SETTINGS).metrics

    # Another evaluation (its own model, its own seed) runs over and over in a second thread while
    # the first is evaluated again, as the flow does with two models at once.
    other, other_settings = tiny("vae", 1), EvaluationSettings(**{**SETTINGS.__dict__, "seed": 7})
    started, done = threading.Event(), threading.Event()

    def keep_evaluating():
        while not done.is_set():
            started.set()
            evaluate_model(other, digits, extractor, "f", other_settings)

    thread = threading.Thread(target=keep_evaluating)
    thread.start()
    try:
        started.wait(timeout=60)
        beside = evaluate_model(model, digits, extractor, "f", SETTINGS).metrics
    finally:
        done.set()
        thread.join()
    assert beside == alone  # exact: every draw came from the evaluation's own generators


def test_an_evaluation_neither_reads_nor_moves_the_global_random_state(
    digits: PreparedData, extractor: Featurizer
):
    model = tiny("ae", 0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = evaluate_model(model, digits, extractor, "f", SETTINGS).metrics
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)
    assert evaluate_model(model, digits, extractor, "f", SETTINGS).metrics == first


def test_every_metric_is_named_by_its_split_and_a_split_does_not_depend_on_the_others(
    digits: PreparedData, extractor: Featurizer
):
    model = tiny("vae", 0)
    both = evaluate_model(model, digits, extractor, "f", SETTINGS, context={"prepared_data": "p1"})
    assert {"val_fid", "test_fid", "val_nll_bound", "test_nll_bound", "val_kid_mean"} <= set(both.metrics)
    assert all(name.startswith(("val_", "test_")) for name in both.metrics)
    assert both.gate_metric == "val_nll_bound" and both.primary_value == both.metrics["val_nll_bound"]
    assert both.metrics["val_fid"] != both.metrics["test_fid"]  # scored against different images
    assert both.settings == {
        **SETTINGS.__dict__,
        "feature_extractor": "f",
        "splits": ["val", "test"],
        "prepared_data": "p1",
    }
    val_only = evaluate_model(model, digits, extractor, "f", SETTINGS, splits=("val",))
    assert val_only.metrics == {k: v for k, v in both.metrics.items() if k.startswith("val_")}
    with pytest.raises(ValueError, match="train"):
        evaluate_model(model, digits, extractor, "f", SETTINGS, splits=("train",))


@pytest.mark.parametrize(
    ("name", "pixels", "nats", "primary"),
    [
        ("nade", "binary", "nll", "nll"),
        ("nade", "8bit", "nll", "bits_per_dim"),
        ("vae", "binary", "nll_bound", "nll_bound"),
        ("vae", "8bit", "nll_bound", "bits_per_dim_bound"),
    ],
)
def test_the_gate_reads_nats_per_image_on_binary_pixels_and_bits_per_dim_on_8bit_ones(
    digits: PreparedData, extractor: Featurizer, name: str, pixels: str, nats: str, primary: str
):
    evaluation = evaluate_model(
        tiny(name, 0, pixels=pixels), digits, extractor, "f", SETTINGS, splits=("val",)
    )
    assert evaluation.gate_metric == f"val_{primary}"
    bits = evaluation.metrics[f"val_{nats.replace('nll', 'bits_per_dim')}"]
    assert bits == pytest.approx(evaluation.metrics[f"val_{nats}"] / (8 * 8 * math.log(2)))
    assert 0 < bits < (1.5 if pixels == "binary" else 12)


@pytest.mark.parametrize("name", ["vae", "nade", "dcgan"])
def test_evaluation_progress_counts_every_batch_up_to_the_planned_total(
    digits: PreparedData, extractor: Featurizer, name: str
):
    model, updates = tiny(name, 0), []
    settings = EvaluationSettings(**{**SETTINGS.__dict__, "num_samples": 150})  # two sampling batches
    evaluate_model(model, digits, extractor, "f", settings, on_progress=updates.append)
    assert [u.done for u in updates] == list(range(1, len(updates) + 1))
    assert {u.total for u in updates} == {len(updates)}  # the end was known from the first batch
    activities = list(dict.fromkeys(u.activity for u in updates))
    scored = {"vae": ["ELBO", "NLL bound", "reconstruction"], "nade": ["NLL"]}
    per_split = ["real features", *scored.get(name, ["Parzen"])]
    assert activities == ["sampling", "sample features"] + [
        f"{split}: {what}" for split in ("val", "test") for what in per_split
    ]


def test_real_features_are_computed_once_then_read_and_give_the_same_scores(
    digits: PreparedData, extractor: Featurizer, tmp_path
):
    model = tiny("dcgan", 0)
    uncached = evaluate_model(model, digits, extractor, "f", SETTINGS).metrics
    cache = RealFeatureCache(tmp_path / "real-features")
    first_updates, second_updates = [], []
    first = evaluate_model(
        model, digits, extractor, "f", SETTINGS, real_features=cache, on_progress=first_updates.append
    )
    files = {path.name: path.stat().st_mtime_ns for path in cache.directory.iterdir()}
    assert sorted(files) == [f"{split}-{model.data_kind}.pt" for split in ("test", "val")]

    second = evaluate_model(
        model, digits, extractor, "f", SETTINGS, real_features=cache, on_progress=second_updates.append
    )
    assert uncached == first.metrics == second.metrics
    assert {
        path.name: path.stat().st_mtime_ns for path in cache.directory.iterdir()
    } == files  # read, not rewritten
    assert not any("cached" in u.activity for u in first_updates)
    assert [u.activity for u in second_updates if "cached" in u.activity] == [
        "val: real features (cached)",
        "test: real features (cached)",
    ]
    assert second_updates[-1].done == second_updates[-1].total == first_updates[-1].total

    # A file left half-written (a killed evaluation) is computed again, not trusted.
    damaged = cache.directory / f"val-{model.data_kind}.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = evaluate_model(model, digits, extractor, "f", SETTINGS, real_features=cache)
    assert third.metrics == uncached
    assert torch.load(damaged, weights_only=True).shape[0] == len(digits.val)


@pytest.mark.parametrize("name", ["vae", "nade", "ae", "gan"])
def test_evaluation_reads_each_split_shard_by_shard_with_the_same_scores(
    digits_root, extractor: Featurizer, tmp_path, monkeypatch, name
):
    """Scores with small shards (batches spanning them) equal those with one shard per split, and no
    split is ever held whole: evaluation of large data reads it in batches."""
    from components.data.prepared import Split, load_prepared, prepare

    prepare(digits_root / "raw", tmp_path / "one", 0.1, 0.2, 0, shard_images=10_000)
    prepare(digits_root / "raw", tmp_path / "many", 0.1, 0.2, 0, shard_images=37)
    one_shard = evaluate_model(tiny(name, 0), load_prepared(tmp_path / "one"), extractor, "f", SETTINGS)
    with monkeypatch.context() as patch:
        for whole in ("for_kind", "pixels", "images", "binary"):
            patch.setattr(Split, whole, property(lambda _: pytest.fail("a split was read whole")))
        many = evaluate_model(tiny(name, 0), load_prepared(tmp_path / "many"), extractor, "f", SETTINGS)
    assert many.metrics == one_shard.metrics
