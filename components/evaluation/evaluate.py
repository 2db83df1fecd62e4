"""Honest evaluation of any family: what is computed follows from what the model can do.

Every model is scored on sample quality (FID/KID against a held-out split); density models add
their exact NLL, latent-variable models their ELBO and importance-weighted bound, models with an
encoder their reconstruction error. Each score is computed on the validation split, which the
promotion gate decides on, and on the test split, which is only reported: metric names carry the
split (`val_fid`, `test_nll_bound`). Scores are comparable only under identical settings (the
prepared data, the feature extractor, sample counts, seed), recorded with every evaluation.

Every random draw of an evaluation comes from generators that call owns, so two evaluations
running at once in one process (the flow evaluates models in threads) cannot move each other's
results.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from components.config import Params
from components.data.prepared import PreparedData
from components.evaluation.featurizer import featurizer_id, load_featurizer
from components.evaluation.parzen import parzen_estimate
from components.evaluation.sample_quality import (
    fid_kid_of_features,
    image_features,
    inception_id,
    load_torchscript_features,
)
from components.models import (
    DensityModel,
    GenerativeModel,
    LatentVariableModel,
    ReconstructionModel,
    bits_per_dim,
)

GRID_SIZE = 64
GATE_SPLIT, REPORT_SPLIT = "val", "test"  # the split promotion decides on; the split only reported
SPLITS = (GATE_SPLIT, REPORT_SPLIT)


@dataclass
class EvaluationSettings:
    num_samples: int
    kid_subset_size: int
    importance_samples: int
    batch_size: int
    seed: int

    @classmethod
    def from_params(cls, params: Params) -> EvaluationSettings:
        """The settings of params.yaml `evaluate` and the project seed."""
        section = params.evaluate
        return cls(
            num_samples=section.num_samples,
            kid_subset_size=section.kid_subset_size,
            importance_samples=section.importance_samples,
            batch_size=section.batch_size,
            seed=params.seed,
        )


@dataclass
class Evaluation:
    metrics: dict[str, float]  # "<split>_<metric>", e.g. val_fid, test_nll_bound
    primary_metric: str  # the family's metric without its split, e.g. "nll_bound"
    extractor_id: str
    # Everything that decides the scores (data, extractor, settings, splits): equal records, comparable scores.
    settings: dict[str, Any] = field(default_factory=dict)
    # grid name -> (N x C x H x W images in [0, 1], images per row or None for a square grid)
    images: dict[str, tuple[Tensor, int | None]] = field(default_factory=dict)

    @property
    def gate_metric(self) -> str:
        """The primary metric on the validation split: what promotion compares."""
        return f"{GATE_SPLIT}_{self.primary_metric}"

    @property
    def primary_value(self) -> float:
        return self.metrics[self.gate_metric]


def feature_extractor(
    kind: str, featurizer_dir: str | Path, inception_weights: str | Path | None = None
) -> tuple[nn.Module, str]:
    """The FID/KID feature extractor named in params (`evaluate.feature_extractor`) and its id.

    "featurizer": the pipeline's own classifier; "inception": a TorchScript Inception-v3 feature
    network from the local file `evaluate.inception_weights`.
    """
    if kind == "featurizer":
        return load_featurizer(featurizer_dir), featurizer_id(featurizer_dir)
    if kind == "inception":
        return load_torchscript_features(inception_weights)
    raise ValueError(f"params.yaml evaluate.feature_extractor={kind!r}: expected 'featurizer' or 'inception'")


def feature_extractor_id(
    kind: str, featurizer_dir: str | Path, inception_weights: str | Path | None = None
) -> str:
    """The id `feature_extractor` would return, without loading the network."""
    if kind == "featurizer":
        return featurizer_id(featurizer_dir)
    if kind == "inception":
        return inception_id(inception_weights)
    raise ValueError(f"params.yaml evaluate.feature_extractor={kind!r}: expected 'featurizer' or 'inception'")


def evaluation_record(
    settings: EvaluationSettings, extractor_id: str, splits: tuple[str, ...], context: dict[str, str]
) -> dict[str, Any]:
    """What decides an evaluation's scores; two evaluations are comparable when their records are equal."""
    return {**asdict(settings), "feature_extractor": extractor_id, "splits": list(splits), **context}


@dataclass(frozen=True)
class EvaluationProgress:
    """How far one evaluation has got, in batches of work (sampling, features, likelihoods)."""

    done: int
    total: int
    activity: str  # what it does now, e.g. "sampling", "val: FID/KID", "test: NLL"


class _Tally:
    """Counts an evaluation's batches against the count planned for it, and tells `report`."""

    def __init__(self, total: int, report: Callable[[EvaluationProgress], None] | None):
        self.done, self.total, self.report = 0, total, report

    def batch_of(self, activity: str) -> Callable[[], None]:
        def one_batch() -> None:
            self.done += 1
            if self.report is not None:
                self.report(EvaluationProgress(self.done, self.total, activity))

        return one_batch

    def skip(self, batches: int, activity: str) -> None:
        """Count `batches` planned but not needed (their result was cached)."""
        self.done += batches
        if self.report is not None:
            self.report(EvaluationProgress(self.done, self.total, activity))


class RealFeatureCache:
    """The extractor's features of the real splits, kept as files `<split>-<data kind>.pt` in a
    directory of their own per extractor and data version: computed by the first evaluation that needs
    them and read by every later one, in this run and the next, instead of once per model."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def features(self, name: str, count: int, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """The cached features `name` of `count` images, or `compute()`'s, stored; and whether cached."""
        path = self.directory / f"{name}.pt"
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, Tensor) and len(cached) == count:
                return cached, True
        except (FileNotFoundError, RuntimeError, EOFError, pickle.UnpicklingError):
            pass  # absent, or left half-written by a killed process: computed again below
        features = compute()
        self.directory.mkdir(parents=True, exist_ok=True)
        # Two evaluations may compute the same features at once: each writes its own file, then renames.
        partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
        torch.save(features, partial)
        os.replace(partial, path)
        return features, False


def _planned_batches(
    model: GenerativeModel, data: PreparedData, splits: tuple[str, ...], settings: EvaluationSettings
) -> int:
    """The batches `evaluate_model` will count, so a progress bar knows its end from the start."""
    batches = functools.partial(_batches_of, batch_size=settings.batch_size)
    total = 2 * batches(settings.num_samples)  # sampling, then the samples' features
    for split in splits:
        size = len(data.split(split))
        total += batches(size)  # the real split's features
        if isinstance(model, DensityModel):
            total += batches(size)
        if isinstance(model, LatentVariableModel):
            total += 2 * batches(size)  # the ELBO, then the importance-weighted bound
        if not isinstance(model, DensityModel | LatentVariableModel):
            total += 1  # the Parzen estimate, counted as one
        if isinstance(model, ReconstructionModel):
            total += batches(size)
    return total


def _batches_of(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _batched(
    fn: Callable[[Tensor], Tensor], batches: Iterable[Tensor], on_batch: Callable[[], None]
) -> Tensor:
    results = []
    for batch in batches:
        results.append(fn(batch))
        on_batch()
    return torch.cat(results)


def _split_batches(
    data: PreparedData, split: str, kind: str, batch_size: int, device: torch.device | None = None
) -> Iterator[Tensor]:
    """One split as a model of `kind` sees it, in batches read shard by shard (on `device` if given)."""
    for batch in data.split(split).batches(kind, batch_size):
        yield _as_tensor(batch) if device is None else _as_tensor(batch).to(device)


def draw_samples(
    model: GenerativeModel,
    n: int,
    batch_size: int,
    generator: torch.Generator,
    on_batch: Callable[[], None] = lambda: None,
) -> Tensor:
    """`n` samples drawn in batches from one seeded generator (repeatable)."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    samples = []
    for size in sizes:
        samples.append(model.sample(size, generator=generator).float().cpu())
        on_batch()
    return torch.cat(samples)


def _generator(device: torch.device, seed: int, purpose: str) -> torch.Generator:
    """A generator of this evaluation's own, seeded from the seed and what it draws for: the draws
    for one split do not depend on which other splits are evaluated, or in which order."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(purpose.encode()))


def _as_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(images))


@torch.no_grad()
def evaluate_model(
    model: GenerativeModel,
    data: PreparedData,
    extractor: nn.Module,
    extractor_id: str,
    settings: EvaluationSettings,
    *,
    splits: tuple[str, ...] = SPLITS,
    context: dict[str, str] | None = None,
    on_progress: Callable[[EvaluationProgress], None] | None = None,
    real_features: RealFeatureCache | None = None,
) -> Evaluation:
    """Score `model` on each of `splits` (binarised for binary models); deterministic for a fixed seed.

    The samples are drawn once and scored against every split; draws that depend on the split (the
    VAE's posterior noise, KID's subsets) come from a generator per split. `context` names what
    else decides the scores (the prepared data version, the code) for the evaluation's record.
    `on_progress` hears of every batch of work done, with the number planned. The real splits'
    features come from `real_features` where it has them (it must belong to this extractor and data).
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"evaluation splits {unknown}: expected some of {', '.join(SPLITS)}")
    model.eval()
    device = model.device
    tally = _Tally(_planned_batches(model, data, splits, settings), on_progress)
    samples = draw_samples(
        model,
        settings.num_samples,
        settings.batch_size,
        _generator(device, settings.seed, "samples"),
        tally.batch_of("sampling"),
    )
    images = {"samples": (samples[:GRID_SIZE], None)}
    sample_features = image_features(
        samples, extractor, batch_size=settings.batch_size, on_batch=tally.batch_of("sample features")
    )
    metrics: dict[str, float] = {}
    for split in splits:
        reference_features = _real_features(
            data, split, model.data_kind, extractor, settings, tally, real_features
        )
        scores = _split_metrics(
            model, data, split, samples, sample_features, reference_features, settings, tally
        )
        metrics.update({f"{split}_{name}": value for name, value in scores.items()})
    if isinstance(model, ReconstructionModel):
        originals = _as_tensor(data.split(splits[-1]).head(model.data_kind, 16)).to(device)
        reconstructions = model.reconstruct(originals).cpu()  # top row originals, bottom row these
        images["reconstructions"] = (torch.cat([originals.cpu(), reconstructions]), len(originals))
        strip = latent_interpolation(model, originals[0], originals[-1]).cpu()
        images["interpolation"] = (strip, len(strip))
    return Evaluation(
        metrics=metrics,
        primary_metric=model.primary_metric,
        extractor_id=extractor_id,
        settings=evaluation_record(settings, extractor_id, splits, context or {}),
        images=images,
    )


def _real_features(
    data: PreparedData,
    split: str,
    kind: str,
    extractor: nn.Module,
    settings: EvaluationSettings,
    tally: _Tally,
    cache: RealFeatureCache | None,
) -> Tensor:
    """The extractor's features of one split as a model of `kind` sees it, from `cache` if it has them."""
    activity = f"{split}: real features"

    def compute() -> Tensor:
        batches = _split_batches(data, split, kind, settings.batch_size)
        return image_features(batches, extractor, on_batch=tally.batch_of(activity))

    if cache is None:
        return compute()
    count = len(data.split(split))
    features, cached = cache.features(f"{split}-{kind}", count, compute)
    if cached:
        tally.skip(_batches_of(count, settings.batch_size), f"{activity} (cached)")
    return features


def _split_metrics(
    model: GenerativeModel,
    data: PreparedData,
    split: str,
    samples: Tensor,
    sample_features: Tensor,
    reference_features: Tensor,
    settings: EvaluationSettings,
    tally: _Tally,
) -> dict[str, float]:
    """The scores of `model` on one split, names without the split."""
    device, size, kind = model.device, settings.batch_size, model.data_kind

    def batches(on: torch.device | None = device, of: str = split) -> Iterator[Tensor]:
        return _split_batches(data, of, kind, size, on)

    dims = model.num_dims
    metrics = fid_kid_of_features(
        reference_features,
        sample_features,
        kid_subset_size=settings.kid_subset_size,
        generator=_generator(torch.device("cpu"), settings.seed, f"kid/{split}"),
    )
    if isinstance(model, DensityModel):
        nll = -_batched(model.log_prob, batches(), tally.batch_of(f"{split}: NLL")).mean().item()
        metrics.update(nll=nll, bits_per_dim=bits_per_dim(nll, dims))
    if isinstance(model, LatentVariableModel):
        noise = _generator(device, settings.seed, f"posterior/{split}")
        elbo = _batched(lambda x: model.elbo(x, generator=noise), batches(), tally.batch_of(f"{split}: ELBO"))
        negative_elbo = -elbo.mean().item()
        bound = -_batched(
            lambda x: model.importance_weighted_bound(x, settings.importance_samples, generator=noise),
            batches(),
            tally.batch_of(f"{split}: NLL bound"),
        ).mean()
        metrics.update(
            negative_elbo=negative_elbo,
            nll_bound=bound.item(),
            bits_per_dim_bound=bits_per_dim(bound.item(), dims),
        )
    if not isinstance(model, DensityModel | LatentVariableModel):
        # Sample-only models get the Parzen-window estimate instead of a likelihood or a bound; its
        # bandwidth is chosen on another split than the one scored (validation for test, train for validation).
        tuning = "train" if split == GATE_SPLIT else "val"
        metrics.update(parzen_estimate(samples, batches(None, tuning), batches(None), batch_size=size))
        tally.batch_of(f"{split}: Parzen")()
    if isinstance(model, ReconstructionModel):
        errors = _batched(
            lambda x: (model.reconstruct(x) - x).pow(2).flatten(1).sum(1),
            batches(),
            tally.batch_of(f"{split}: reconstruction"),
        )
        metrics["reconstruction_sse"] = errors.mean().item()
    return metrics


def latent_interpolation(model: ReconstructionModel, start: Tensor, end: Tensor, steps: int = 10) -> Tensor:
    """Decoded points on the straight line between the codes of two images."""
    codes = model.encode(torch.stack([start, end]))
    weights = torch.linspace(0, 1, steps, device=codes.device)[:, None]
    return model.decode((1 - weights) * codes[0] + weights * codes[1])
