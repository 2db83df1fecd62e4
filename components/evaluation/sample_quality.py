"""Sample-quality scores: FID and KID (torchmetrics) in the feature space of a chosen extractor."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


def fid_kid(
    real: Tensor, fake: Tensor, extractor: nn.Module, *, kid_subset_size: int = 100, batch_size: int = 500
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two image sets in [0, 1], N x C x H x W.

    KID's subset size is capped by the smaller set, so small test splits still get a score.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(fake)}"
        )
    subset = min(kid_subset_size, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=extractor, normalize=True)
    kid = KernelInceptionDistance(feature=extractor, subset_size=subset, normalize=True)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.float().split(batch_size):
                fid.update(chunk, real=is_real)
                kid.update(chunk, real=is_real)
        kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}
