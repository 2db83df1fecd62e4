"""Sample-quality scores behave as distances should, and the Parzen estimate is a density estimate."""

from __future__ import annotations

import hashlib
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_FAMILIES
from inception_v3 import POOL_FEATURES, InceptionV3
from torch import Tensor, nn

from components.data.prepared import PreparedData
from components.evaluation.evaluate import EvaluationSettings, evaluate_model, feature_extractor
from components.evaluation.featurizer import train_featurizer
from components.evaluation.parzen import DEFAULT_SIGMAS, parzen_estimate, parzen_log_likelihood
from components.evaluation.sample_quality import fid_kid
from components.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_dir(digits_root: Path) -> Path:
    """The session's prepared digits plus a quickly trained featurizer."""
    train_featurizer(
        digits_root / "prepared",
        digits_root / "featurizer",
        feature_dim=32,
        epochs=8,
        batch_size=128,
        lr=2e-3,
        seed=0,
    )
    return digits_root


@pytest.fixture(scope="module")
def featurizer(digits_dir: Path) -> nn.Module:
    extractor, extractor_id = feature_extractor("featurizer", digits_dir / "featurizer")
    assert extractor_id.startswith("featurizer-")
    return extractor


@pytest.fixture(scope="module")
def test_images(digits: PreparedData) -> Tensor:
    return torch.from_numpy(digits.test.images)


def test_fid_of_a_set_against_itself_is_zero(test_images: Tensor, featurizer: nn.Module):
    assert abs(fid_kid(test_images, test_images, featurizer)["fid"]) < 1e-3


def test_fid_grows_monotonically_with_added_noise(test_images: Tensor, featurizer: nn.Module):
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(test_images.shape, generator=generator)
    levels = [0.03, 0.1, 0.2, 0.35, 0.6]
    fids = [
        fid_kid(test_images, (test_images + level * noise).clamp(0, 1), featurizer)["fid"] for level in levels
    ]
    assert all(a < b for a, b in itertools.pairwise(fids)), dict(zip(levels, fids, strict=True))


def test_kid_is_near_zero_between_halves_and_large_against_noise(test_images: Tensor, featurizer: nn.Module):
    half = len(test_images) // 2
    same = fid_kid(test_images[:half], test_images[half:], featurizer, kid_subset_size=100)
    assert abs(same["kid_mean"]) < max(3 * same["kid_std"], 0.05)
    noise = torch.rand(test_images[half:].shape, generator=torch.Generator().manual_seed(0))
    different = fid_kid(test_images[:half], noise, featurizer, kid_subset_size=100)
    assert different["kid_mean"] > 10 * max(abs(same["kid_mean"]), same["kid_std"])
    assert different["fid"] > 10 * same["fid"]


def gaussian_log_density(x: Tensor, mean: float, std: float) -> Tensor:
    """log N(x; mean, std^2 I) per row of x, in nats."""
    d = x.shape[1]
    return -0.5 * ((x - mean) / std).pow(2).sum(1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


def test_parzen_log_likelihood_matches_the_mixture_density_directly():
    generator = torch.Generator().manual_seed(0)
    samples, x = torch.rand(7, 1, 2, 3, generator=generator), torch.rand(5, 1, 2, 3, generator=generator)
    sigmas = [0.05, 0.3]
    # Batches smaller than both sets exercise the running logsumexp across chunks.
    estimated = parzen_log_likelihood(x, samples, sigmas, batch_size=3)
    for row, sigma in zip(estimated, sigmas, strict=True):
        per_kernel = torch.stack(
            [gaussian_log_density(x.flatten(1).double() - s, 0.0, sigma) for s in samples.flatten(1).double()]
        )
        expected = torch.logsumexp(per_kernel, dim=0) - math.log(len(samples))
        torch.testing.assert_close(row, expected, rtol=1e-9, atol=1e-9)


def test_parzen_estimate_approaches_the_true_log_likelihood_with_many_samples():
    generator = torch.Generator().manual_seed(0)
    dims, mean, std = 3, 0.5, 0.1

    def draw(n: int) -> Tensor:
        return mean + std * torch.randn(n, 1, 1, dims, generator=generator)

    val, test = draw(500), draw(1000)
    truth = gaussian_log_density(test.flatten(1).double(), mean, std).mean().item()
    few, many = parzen_estimate(draw(100), val, test), parzen_estimate(draw(5000), val, test)
    assert abs(many["parzen_ll_estimate"] - truth) < 0.05
    assert abs(many["parzen_ll_estimate"] - truth) < abs(few["parzen_ll_estimate"] - truth)
    for result in (few, many):
        assert result["parzen_sigma"] in DEFAULT_SIGMAS
    # Denser samples justify a narrower kernel.
    assert many["parzen_sigma"] < few["parzen_sigma"]


def test_evaluation_adds_the_parzen_estimate_for_sample_only_models_only(digits: PreparedData, featurizer):
    torch.manual_seed(0)
    settings = EvaluationSettings(
        num_samples=100, importance_samples=2, batch_size=100, kid_subset_size=100, seed=0
    )
    sample_only = evaluate_model(create_model("ae", digits.image_shape), digits, featurizer, "f", settings)
    for split in ("val", "test"):
        assert math.isfinite(sample_only.metrics[f"{split}_parzen_ll_estimate"])
        assert sample_only.metrics[f"{split}_parzen_sigma"] in DEFAULT_SIGMAS
    with_bound = evaluate_model(create_model("vae", digits.image_shape), digits, featurizer, "f", settings)
    assert not any("parzen" in name for name in with_bound.metrics)


class TinyFeatureNetwork(nn.Module):
    """Stands in for the Inception TorchScript file: uint8 RGB in, pool features (or logits) out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.logits = nn.Linear(6, 2)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        assert img.dtype == torch.uint8 and img.shape[1] == 3, "expects uint8 RGB images"
        features = torch.relu(self.conv(img.float() / 127.5 - 1.0)).mean(dim=(2, 3))
        return features if return_features else self.logits(features)


class PixelsToFeatures(nn.Module):
    """Mean of each colour channel, in [0, 1]: shows exactly what the wrapper fed the network."""

    def forward(self, img: Tensor) -> Tensor:
        return img.float().mean(dim=(2, 3)) / 255


def test_inception_extractor_loads_a_torchscript_feature_network(
    tmp_path: Path, digits_dir: Path, test_images: Tensor
):
    torch.manual_seed(0)
    path = tmp_path / "inception.pt"
    torch.jit.script(TinyFeatureNetwork()).save(str(path))
    extractor, extractor_id = feature_extractor("inception", digits_dir / "featurizer", path)
    assert extractor_id == f"inception-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert extractor.num_features == 6  # the pool features, not the 2 logits
    features = extractor(test_images[:5])  # one grey channel in [0, 1]
    assert features.shape == (5, 6)
    scores = fid_kid(test_images, test_images, extractor)
    assert abs(scores["fid"]) < 1e-3

    # A network without `return_features` (here traced, not scripted) is used as it is.
    traced = tmp_path / "traced.pt"
    torch.jit.trace(PixelsToFeatures(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).save(str(traced))
    other, _ = feature_extractor("inception", digits_dir / "featurizer", traced)
    assert other.num_features == 3
    torch.testing.assert_close(
        other(test_images[:2]),
        test_images[:2].mean(dim=(1, 2, 3))[:, None].expand(2, 3),
        atol=1 / 255,
        rtol=0,
    )


def test_inception_extractor_takes_a_random_network_of_inception_v3s_architecture(
    tmp_path: Path, digits_dir: Path, test_images: Tensor
):
    """The file a user brings, in shape: FID's Inception-v3 (299 x 299 inside, 2048 pool features, 1008
    logits), randomly initialised and scripted by the test. The 8x8 grey digits go in as uint8 RGB."""
    torch.manual_seed(0)
    path = tmp_path / "inception-v3.pt"
    torch.jit.script(InceptionV3().eval()).save(str(path))
    extractor, extractor_id = feature_extractor("inception", digits_dir / "featurizer", path)
    assert extractor_id.startswith("inception-") and extractor.num_features == POOL_FEATURES
    features = extractor(test_images[:8])
    assert features.shape == (8, POOL_FEATURES) and torch.isfinite(features).all()
    assert features.std(dim=0).mean() > 1e-3, "the images' features do not differ"
    same = fid_kid(test_images[:8], test_images[:8], extractor)["fid"]
    other = fid_kid(test_images[:8], test_images[8:16], extractor)["fid"]
    assert abs(same) < 1e-3 < other


def test_inception_extractor_says_which_file_is_missing_and_how_to_provide_it(tmp_path: Path):
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights") as error:
        feature_extractor("inception", tmp_path, missing)
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        feature_extractor("inception", tmp_path, None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="garbage.pt: not a loadable TorchScript"):
        feature_extractor("inception", tmp_path, garbage)
    with pytest.raises(ValueError, match="'featurizer' or 'inception'"):
        feature_extractor("clip", tmp_path)


class InceptionContract(nn.Module):
    """A randomly initialised stand-in for the FID Inception-v3 TorchScript file, with its contract:
    uint8 RGB of any size in, resized to 299 x 299 inside, pool features (or 1008 logits) out; 64
    features rather than the real 2048 keep FID's matrix square root cheap."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 8, stride=8)
        self.pool_features = nn.Linear(16, 64)
        self.logits = nn.Linear(64, 1008)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        assert img.dtype == torch.uint8 and img.dim() == 4 and img.shape[1] == 3, (
            "expects N x 3 x H x W uint8"
        )
        x = nn.functional.interpolate(img.float() / 127.5 - 1.0, size=(299, 299), mode="bilinear")
        features = self.pool_features(torch.relu(self.stem(x)).mean(dim=(2, 3)))
        return features if return_features else self.logits(features)


def shapes_with_featurizer(root: Path, count: int, side: int, feature_dim: int, epochs: int) -> Path:
    """`count` colour shapes at `side` x `side` rendered and prepared under `root`, with a featurizer
    trained on them for `epochs`."""
    from components.data.prepared import prepare
    from components.data.raw import write_raw
    from components.data.shapes import render_shapes

    write_raw(render_shapes(count, side, seed=0), root / "raw")
    prepare(root / "raw", root / "prepared", 0.1, 0.3, 0)
    train_featurizer(
        root / "prepared",
        root / "featurizer",
        feature_dim=feature_dim,
        epochs=epochs,
        batch_size=64,
        lr=2e-3,
        seed=0,
    )
    return root


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 colour shapes at 16 x 16, prepared, with a briefly trained 3-channel featurizer."""
    return shapes_with_featurizer(tmp_path_factory.mktemp("shapes"), 300, 16, feature_dim=16, epochs=2)


@pytest.fixture(scope="module")
def rgb_test_images(shapes_dir: Path) -> Tensor:
    from components.data.prepared import load_prepared

    images = torch.from_numpy(load_prepared(shapes_dir / "prepared").test.images)
    assert images.shape[1:] == (3, 16, 16)
    return images


def swap_red_and_blue(images: Tensor) -> Tensor:
    return images[:, [2, 1, 0]]


@pytest.mark.parametrize("extractor_kind", ["featurizer", "inception"])
def test_fid_and_kid_work_on_rgb_under_either_extractor(
    extractor_kind: str, shapes_dir: Path, rgb_test_images: Tensor, tmp_path
):
    torch.manual_seed(0)
    weights = tmp_path / "inception.pt"
    torch.jit.script(InceptionContract()).save(str(weights))
    extractor, extractor_id = feature_extractor(extractor_kind, shapes_dir / "featurizer", weights)
    assert extractor_id.startswith(f"{extractor_kind}-")
    assert extractor.num_features == (16 if extractor_kind == "featurizer" else 64)
    features = extractor(rgb_test_images[:4])
    assert features.shape == (4, extractor.num_features)
    # The three channels reach the network: the same shapes in other colours have other features.
    assert not torch.allclose(features, extractor(swap_red_and_blue(rgb_test_images[:4])))
    assert abs(fid_kid(rgb_test_images, rgb_test_images, extractor)["fid"]) < 1e-2
    half = len(rgb_test_images) // 2
    first, second = rgb_test_images[:half], rgb_test_images[half:]
    same = fid_kid(first, second, extractor, kid_subset_size=40)
    noise = torch.rand(second.shape, generator=torch.Generator().manual_seed(0))
    noisy = fid_kid(first, noise, extractor, kid_subset_size=40)
    assert noisy["fid"] > same["fid"] and noisy["kid_mean"] > same["kid_mean"], (same, noisy)


def test_the_featurizer_stages_follow_the_image_size():
    from components.evaluation.featurizer import Featurizer

    for side, stages in ((8, 2), (32, 3), (64, 4)):
        featurizer = Featurizer(3, 8, 5, side)
        strided = [m for m in featurizer.body if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        assert len(strided) == stages
        assert featurizer(torch.rand(2, 3, side, side)).shape == (2, 8)


@pytest.fixture(scope="module")
def shapes64_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 colour shapes at 64 x 64, prepared, with a featurizer trained for one epoch."""
    return shapes_with_featurizer(tmp_path_factory.mktemp("shapes64"), 60, 64, feature_dim=8, epochs=1)


@pytest.mark.parametrize(
    ("family", "primary", "also"),
    [
        ("vae", "bits_per_dim_bound", ()),
        ("made", "bits_per_dim", ()),
        ("dcgan", "fid", ("parzen_ll_estimate",)),
        ("ae", "fid", ("parzen_ll_estimate", "reconstruction_sse")),
    ],
)
def test_each_kind_of_score_is_computed_at_3x64x64(family: str, primary: str, also, shapes64_dir: Path):
    """The evaluation at the largest size the families take: a bound, an exact likelihood, the sample
    scores with a Parzen estimate and with a reconstruction error, over a featurizer at 64 x 64."""
    from components.data.prepared import load_prepared

    data = load_prepared(shapes64_dir / "prepared")
    assert data.image_shape == (3, 64, 64)
    extractor, extractor_id = feature_extractor("featurizer", shapes64_dir / "featurizer")
    settings = EvaluationSettings(
        num_samples=8, kid_subset_size=4, importance_samples=2, batch_size=8, seed=0
    )
    torch.manual_seed(0)
    model = create_model(family, data.image_shape, **TINY_FAMILIES[family])
    evaluation = evaluate_model(model, data, extractor, extractor_id, settings)
    assert evaluation.primary_metric == primary
    for split in ("val", "test"):
        for metric in (primary, "fid", "kid_mean", *also):
            assert math.isfinite(evaluation.metrics[f"{split}_{metric}"]), (split, metric, evaluation.metrics)
    if primary.startswith("bits_per_dim"):
        assert 0 < evaluation.metrics[f"test_{primary}"] < 16
