"""Sample-quality scores: FID and KID (torchmetrics) in the feature space of a chosen extractor.

The extractor is either the project's own featurizer or a TorchScript feature network the user
supplies as a file (such as the Inception-v3 of the FID literature), since nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat

INCEPTION_SIZE = 299  # input side of Inception-v3, used to probe a network's feature size


class SeededKernelInceptionDistance(KernelInceptionDistance):
    """torchmetrics' KID with its random subsets drawn from a generator the caller owns.

    torchmetrics draws the subsets from the process-global RNG, which another evaluation running in
    another thread moves; a generator of its own makes the score repeatable whatever runs beside it.
    """

    def __init__(self, *, generator: torch.Generator, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        scores = []
        for _ in range(self.subsets):
            real_subset = real[torch.randperm(len(real), generator=self.generator)[: self.subset_size]]
            fake_subset = fake[torch.randperm(len(fake), generator=self.generator)[: self.subset_size]]
            scores.append(poly_mmd(real_subset, fake_subset, self.degree, self.gamma, self.coef))
        stacked = torch.stack(scores)
        return stacked.mean(), stacked.std(unbiased=False)


def image_features(
    images: Tensor | Iterable[Tensor],
    extractor: nn.Module,
    *,
    batch_size: int = 500,
    on_batch: Callable[[], None] = lambda: None,
) -> Tensor:
    """The extractor's N x D features of images in [0, 1] (one tensor, cut into `batch_size` batches,
    or batches as given), computed on the extractor's device (where it has parameters), returned on
    the CPU; `on_batch` is called after each batch."""
    device = next(extractor.parameters(), torch.empty(0)).device
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    chunks = []
    with torch.no_grad():
        for chunk in batches:
            chunks.append(extractor(chunk.float().to(device)).float().cpu())
            on_batch()
    return torch.cat(chunks)


class _GivenFeatures(nn.Module):
    """Lets torchmetrics' FID and KID take features computed (or cached) beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with an image

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_kid_of_features(
    real: Tensor, fake: Tensor, *, kid_subset_size: int = 100, generator: torch.Generator | None = None
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two sets of N x D features.

    KID's subset size is capped by the smaller set, so small test splits still get a score; its
    subsets come from `generator` (by default a fresh one at seed 0), so the score is repeatable.
    """
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(
            f"FID/KID need at least 2 real and 2 generated images, got {len(real)} and {len(fake)}"
        )
    given = _GivenFeatures(real.shape[1])
    fid = FrechetInceptionDistance(feature=given)
    kid = SeededKernelInceptionDistance(
        feature=given,
        subset_size=min(kid_subset_size, len(real), len(fake)),
        generator=generator or torch.Generator().manual_seed(0),
    )
    for features, is_real in ((real, True), (fake, False)):
        fid.update(features, real=is_real)
        kid.update(features, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def fid_kid(
    real: Tensor,
    fake: Tensor,
    extractor: nn.Module,
    *,
    kid_subset_size: int = 100,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """FID and KID between two image sets in [0, 1], N x C x H x W, in the extractor's feature space."""
    return fid_kid_of_features(
        image_features(real, extractor, batch_size=batch_size),
        image_features(fake, extractor, batch_size=batch_size),
        kid_subset_size=kid_subset_size,
        generator=generator,
    )


class TorchScriptFeatures(nn.Module):
    """A TorchScript feature network fed the way Inception-v3 FID networks expect their input.

    Images in [0, 1] with 1 or 3 channels become uint8 RGB in [0, 255] (grey images repeated over
    the three channels); the network must map that to N x D features (anything else is flattened).
    A network whose `forward` takes `return_features` (the `inception-2015-12-05` TorchScript file,
    which resizes to 299 x 299 itself and otherwise returns logits) is asked for its pool features.
    """

    def __init__(self, network: torch.jit.ScriptModule, source: str):
        super().__init__()
        self.network = network.eval()
        arguments = [argument.name for argument in network.forward.schema.arguments]
        self.options = {"return_features": True} if "return_features" in arguments else {}
        try:
            with torch.no_grad():
                probe = self(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
        except Exception as err:  # whatever the scripted code raises for an input it cannot take
            raise ValueError(
                f"{source}: the network failed on one uint8 image of 3 x {INCEPTION_SIZE} x {INCEPTION_SIZE} "
                f"({err})"
            ) from err
        if probe.dim() != 2 or probe.shape[1] < 1:
            raise ValueError(
                f"{source}: expected a network returning N x D features, got shape {tuple(probe.shape)} "
                f"for one {INCEPTION_SIZE} x {INCEPTION_SIZE} image"
            )
        self.num_features = int(probe.shape[1])  # read by torchmetrics' FID/KID

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] not in (1, 3):
            raise ValueError(f"feature network: expected images with 1 or 3 channels, got {images.shape[1]}")
        pixels = (images.float().clamp(0.0, 1.0) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
        features = self.network(pixels.contiguous(), **self.options)
        return features.flatten(1).float()


HOW_TO_PROVIDE_INCEPTION = (
    "set params.yaml evaluate.inception_weights to a local TorchScript Inception-v3 feature network "
    "(e.g. inception-2015-12-05.pt); nothing is downloaded"
)


def inception_id(path: str | Path | None) -> str:
    """The id "inception-<sha256[:12]>" of the TorchScript feature network file at `path`."""
    if path is None or not str(path).strip():
        raise FileNotFoundError(
            f"the inception feature extractor needs a weights file: {HOW_TO_PROVIDE_INCEPTION}"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: inception weights file not found; {HOW_TO_PROVIDE_INCEPTION}")
    with path.open("rb") as file:
        return f"inception-{hashlib.file_digest(file, 'sha256').hexdigest()[:12]}"


def load_torchscript_features(path: str | Path | None) -> tuple[TorchScriptFeatures, str]:
    """The TorchScript feature network saved at `path`, and its id "inception-<sha256[:12]>"."""
    extractor_id = inception_id(path)
    path = Path(path).expanduser()
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # TorchScript raises RuntimeError or pickling errors for foreign files
        raise ValueError(
            f"{path}: not a loadable TorchScript module ({err}); {HOW_TO_PROVIDE_INCEPTION}"
        ) from err
    extractor = TorchScriptFeatures(network, str(path))
    return extractor.requires_grad_(False), extractor_id
