"""Honest evaluation of any family: what is computed follows from what the model can do.

Every model is scored on sample quality (FID/KID against the test split it is evaluated on);
density models add their exact test NLL, latent-variable models their ELBO and importance-weighted
bound, models with an encoder their reconstruction error. The feature extractor's id is recorded
with every score, because scores are only comparable under the same extractor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from components.data.prepared import PreparedData
from components.evaluation.featurizer import featurizer_id, load_featurizer
from components.evaluation.parzen import parzen_estimate
from components.evaluation.sample_quality import fid_kid, load_torchscript_features
from components.models import (
    DensityModel,
    GenerativeModel,
    LatentVariableModel,
    ReconstructionModel,
    bits_per_dim,
)

GRID_SIZE = 64


@dataclass
class EvaluationSettings:
    num_samples: int = 1000
    kid_subset_size: int = 100
    importance_samples: int = 100
    batch_size: int = 500
    seed: int = 0


@dataclass
class Evaluation:
    metrics: dict[str, float]
    primary_metric: str
    extractor_id: str
    # grid name -> (N x C x H x W images in [0, 1], images per row or None for a square grid)
    images: dict[str, tuple[Tensor, int | None]] = field(default_factory=dict)

    @property
    def primary_value(self) -> float:
        return self.metrics[self.primary_metric]


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


def _batched(fn, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


def draw_samples(model: GenerativeModel, n: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """`n` samples drawn in batches from one seeded generator (repeatable)."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return torch.cat([model.sample(size, generator=generator).float().cpu() for size in sizes])


@torch.no_grad()
def evaluate_model(
    model: GenerativeModel,
    data: PreparedData,
    extractor: nn.Module,
    extractor_id: str,
    settings: EvaluationSettings,
) -> Evaluation:
    """Score `model` on the test split (binarised for binary models); deterministic for a fixed seed."""
    model.eval()
    device = model.device
    torch.manual_seed(settings.seed)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    test = torch.from_numpy(np.ascontiguousarray(data.test.for_kind(model.data_kind)))
    test_on_device = test.to(device)
    dims = model.num_dims

    samples = draw_samples(model, settings.num_samples, settings.batch_size, generator)
    metrics = fid_kid(
        test, samples, extractor, kid_subset_size=settings.kid_subset_size, batch_size=settings.batch_size
    )
    images = {"samples": (samples[:GRID_SIZE], None)}

    if isinstance(model, DensityModel):
        nll = -_batched(model.log_prob, test_on_device, settings.batch_size).mean().item()
        metrics.update(test_nll=nll, test_bits_per_dim=bits_per_dim(nll, dims))
    if isinstance(model, LatentVariableModel):
        negative_elbo = -_batched(model.elbo, test_on_device, settings.batch_size).mean().item()
        bound = -_batched(
            lambda x: model.importance_weighted_bound(x, settings.importance_samples),
            test_on_device,
            settings.batch_size,
        ).mean()
        metrics.update(
            test_negative_elbo=negative_elbo,
            test_nll_bound=bound.item(),
            test_bits_per_dim_bound=bits_per_dim(bound.item(), dims),
        )
    if not isinstance(model, DensityModel | LatentVariableModel):
        # Sample-only models get the Parzen-window estimate instead of a likelihood or a bound.
        val = torch.from_numpy(np.ascontiguousarray(data.val.for_kind(model.data_kind)))
        metrics.update(parzen_estimate(samples, val, test, batch_size=settings.batch_size))
    if isinstance(model, ReconstructionModel):
        reconstructions = _batched(model.reconstruct, test_on_device, settings.batch_size)
        errors = (reconstructions - test_on_device).pow(2).flatten(1).sum(1)
        metrics["test_reconstruction_sse"] = errors.mean().item()
        shown = min(16, len(test))  # top row originals, bottom row their reconstructions
        images["reconstructions"] = (torch.cat([test[:shown], reconstructions[:shown].cpu()]), shown)
        strip = latent_interpolation(model, test_on_device[0], test_on_device[-1]).cpu()
        images["interpolation"] = (strip, len(strip))

    return Evaluation(
        metrics={**metrics, "num_samples": float(settings.num_samples)},
        primary_metric=type(model).primary_metric,
        extractor_id=extractor_id,
        images=images,
    )


def latent_interpolation(model: ReconstructionModel, start: Tensor, end: Tensor, steps: int = 10) -> Tensor:
    """Decoded points on the straight line between the codes of two images."""
    codes = model.encode(torch.stack([start, end]))
    weights = torch.linspace(0, 1, steps, device=codes.device)[:, None]
    return model.decode((1 - weights) * codes[0] + weights * codes[1])
