"""Parzen-window log-likelihood estimate for models that can only sample (Goodfellow et al., 2014).

A Gaussian kernel of width sigma is centred on each of N generated samples s_i, giving the density
p(x) = 1/N sum_i N(x; s_i, sigma^2 I); its bandwidth is the one of a grid that maximises the
likelihood of one held-out split, and the score is the mean log-likelihood of another in nats per
image. It is an estimate with a known large bias and variance in high dimensions (Theis
et al., 2016), reported for comparison between sample-only models, never next to exact likelihoods.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

#: Bandwidths tried, for images scaled to [0, 1]: 0.01 to 1 in steps of 10^0.1.
DEFAULT_SIGMAS: tuple[float, ...] = tuple(10 ** (k / 10) for k in range(-20, 1))


def _log_mean_kernels(x: Tensor, samples: Tensor, sigmas: Tensor, batch_size: int) -> Tensor:
    """log (1/N) sum_i exp(-||x - s_i||^2 / (2 sigma^2)) for every sigma and x: S x len(x), float64.

    Squared distances are formed in float64 from ||x||^2 + ||s||^2 - 2 x.s, where float32 would
    cancel catastrophically for near neighbours, and reduced with a running logsumexp over sample
    chunks, so memory stays at S x batch_size x batch_size whatever the sizes.
    """
    x, samples = x.flatten(1).double(), samples.flatten(1).double().to(x.device)
    inverse_two_var = (0.5 / sigmas.double().to(x.device) ** 2)[:, None, None]
    sample_norms = samples.pow(2).sum(1)
    rows = []
    for chunk in x.split(batch_size):
        total = torch.full((len(sigmas), len(chunk)), -math.inf, dtype=torch.float64, device=x.device)
        chunk_norms = chunk.pow(2).sum(1, keepdim=True)
        for start in range(0, len(samples), batch_size):
            block = samples[start : start + batch_size]
            distances = chunk_norms + sample_norms[start : start + batch_size] - 2 * chunk @ block.T
            exponents = -distances.clamp_min(0.0) * inverse_two_var  # S x chunk x block
            total = torch.logaddexp(total, torch.logsumexp(exponents, dim=2))
        rows.append(total)
    return torch.cat(rows, dim=1) - math.log(len(samples))


def parzen_log_likelihood(
    x: Tensor, samples: Tensor, sigmas: Sequence[float] | Tensor, *, batch_size: int = 500
) -> Tensor:
    """Log-likelihood in nats of each image in `x` under the Parzen window on `samples`, per sigma.

    Returns S x N (float64) for S bandwidths and N images.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or len(sigmas) == 0 or not bool((sigmas > 0).all()):
        raise ValueError(
            f"Parzen bandwidths must be a non-empty list of positive numbers, got {sigmas.tolist()}"
        )
    if len(samples) == 0 or x.flatten(1).shape[1] != samples.flatten(1).shape[1]:
        raise ValueError(
            f"Parzen window: need samples with the data's shape, got {len(samples)} samples of "
            f"{tuple(samples.shape[1:])} for data of {tuple(x.shape[1:])}"
        )
    dims = x.flatten(1).shape[1]
    log_normaliser = 0.5 * dims * torch.log(2 * math.pi * sigmas**2).to(x.device)
    return _log_mean_kernels(x, samples, sigmas, batch_size) - log_normaliser[:, None]


def parzen_estimate(
    samples: Tensor,
    tuning: Tensor | Iterable[Tensor],
    scored: Tensor | Iterable[Tensor],
    *,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    batch_size: int = 500,
) -> dict[str, float]:
    """Choose sigma on `tuning` from the grid, then the mean log-likelihood of `scored` (nats per image).

    `tuning` and `scored` are each one tensor or batches of one (a split read shard by shard).
    """

    def log_likelihoods(images: Tensor | Iterable[Tensor], grid: Sequence[float]) -> Tensor:
        batches = [images] if isinstance(images, Tensor) else images
        return torch.cat([parzen_log_likelihood(x, samples, grid, batch_size=batch_size) for x in batches], 1)

    tuning_scores = log_likelihoods(tuning, sigmas).mean(1)
    sigma = float(sigmas[int(tuning_scores.argmax())])
    score = log_likelihoods(scored, [sigma]).mean()
    return {"parzen_ll_estimate": float(score), "parzen_sigma": sigma}
