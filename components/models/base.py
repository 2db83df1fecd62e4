"""The one small interface every generative family implements.

A family is a pure PyTorch module. The generic trainer only ever calls the methods below, so a
family decides what one optimisation phase computes (a VAE has one phase, a GAN a discriminator and a
generator phase, a WGAN several critic phases per generator phase) without the trainer knowing which
family it drives. Capabilities that only some families have are expressed by the mix-ins at the end
(`DensityModel`, `LatentVariableModel`, `ReconstructionModel`); evaluation picks metrics by them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from components.models.pixels import resolve_pixels

DataKind = Literal["binary", "continuous"]
ImageShape = tuple[int, int, int]


class GenerativeModel(nn.Module):
    """Base of every family: training phases, optimisers and sampling.

    Subclasses set the class attributes and implement `forward` and `sample`. `forward(x, phase)`
    is the single training entry point, so a DistributedDataParallel wrapper around the whole model
    sees every forward pass and synchronises gradients whatever the phase.
    """

    #: Evaluation metric that decides promotion (lower is better) for each data kind, without its
    #: split: the gate reads it on the validation split (`val_fid`), the report on the test split.
    primary_metrics: ClassVar[dict[DataKind, str]] = {"continuous": "fid"}
    #: Optimiser names, one per phase, in the order one training iteration runs them.
    phases: ClassVar[tuple[str, ...]] = ("model",)
    #: Every data kind the family's models can have (see `data_kind`), for the catalogue.
    data_kinds: ClassVar[tuple[DataKind, ...]] = ("continuous",)
    #: The family's name for messages and versions: `register_model` sets it, the class name until then.
    registry_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.registry_name = cls.__name__

    def __init__(self, image_shape: Sequence[int]):
        super().__init__()
        if len(image_shape) != 3 or any(int(s) <= 0 for s in image_shape):
            raise ValueError(
                f"image_shape must be (channels, height, width) of positive sizes, got {image_shape}"
            )
        self.image_shape: ImageShape = tuple(int(s) for s in image_shape)

    @classmethod
    def data_kind_for(cls, image_shape: Sequence[int], hparams: Mapping[str, Any]) -> DataKind:
        """The data kind of the model these arguments build (see `data_kind`), known before building it."""
        return "continuous"

    @property
    def data_kind(self) -> DataKind:
        """ "binary": trained with dynamic binarisation, evaluated on the fixed binarised split, samples
        in {0, 1}; "continuous": trained and evaluated on images scaled to [0, 1]."""
        return type(self).data_kind_for(self.image_shape, {})

    @property
    def primary_metric(self) -> str:
        """The metric that decides this model's promotion (see `primary_metrics`)."""
        return type(self).primary_metrics[self.data_kind]

    @property
    def num_dims(self) -> int:
        """Number of scalar dimensions of one image (C*H*W)."""
        c, h, w = self.image_shape
        return c * h * w

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """The optimiser of each phase (phases may share one); `lr` is the pipeline's learning rate, families
        may scale it."""
        return {"model": torch.optim.Adam(self.parameters(), lr=lr)}

    def phase_schedule(self, step: int) -> Sequence[str]:
        """Phases to run at global iteration `step` (e.g. the generator only every n-th critic step)."""
        return self.phases

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        """Loss of `phase` on batch `x` under key "loss", plus any scalar metrics worth logging."""
        raise NotImplementedError

    def after_optimizer_step(self, phase: str) -> None:
        """Called after the optimiser of `phase` stepped (WGAN clips its critic here)."""

    def fit_after_training(self, x_train: Iterable[Tensor]) -> None:
        """Called once with the whole training split, in pieces, after the last step (an AE fits its code
        prior here); the pieces let a split larger than memory stream through."""

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        """Scalar metrics on held-out data, logged per epoch; empty when the family has none."""
        return {}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw `n` images, N x C x H x W in the data's range; repeatable given a seeded generator."""
        raise NotImplementedError


class DensityModel(GenerativeModel):
    """A model with an exact, normalised likelihood."""

    # Each in the unit its literature compares in: nats per image on binarised images, bits per
    # dimension on 8-bit ones.
    primary_metrics: ClassVar[dict[DataKind, str]] = {"binary": "nll", "continuous": "bits_per_dim"}

    def log_prob(self, x: Tensor) -> Tensor:
        """Natural-log likelihood of each image in `x`, shape N, in nats."""
        raise NotImplementedError

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        nll = -self.log_prob(x).mean()
        return {"loss": nll, "nll": nll.detach()}

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        return {"val_nll": -self.log_prob(x).mean()}


class ReconstructionModel(GenerativeModel):
    """A model that maps an image to a code and back; evaluation reports reconstruction error."""

    def encode(self, x: Tensor) -> Tensor:
        """Deterministic code of each image (the posterior mean for a VAE), shape N x latent_dim."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """Image in the data's range for each code (pixel means for Bernoulli decoders)."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


class LatentVariableModel(ReconstructionModel):
    """A latent-variable model with a variational bound on its likelihood."""

    primary_metrics: ClassVar[dict[DataKind, str]] = {
        "binary": "nll_bound",
        "continuous": "bits_per_dim_bound",
    }

    def elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Evidence lower bound of each image, in nats; its posterior draw comes from `generator`."""
        raise NotImplementedError

    def importance_weighted_bound(
        self, x: Tensor, num_samples: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Importance-weighted lower bound on log p(x) (Burda et al. 2016), tighter than the ELBO."""
        raise NotImplementedError


class PixelForm:
    """Mix-in of the likelihood families that model binary or 8-bit pixels (hyper-parameter `pixels`).

    The form, and with it the data kind, is a property of each model: binary models see dynamically
    binarised images, 8-bit models the [0, 1] images themselves (see `components.models.pixels`).
    """

    pixels: str
    data_kinds: ClassVar[tuple[DataKind, ...]] = ("binary", "continuous")

    @classmethod
    def data_kind_for(cls, image_shape: Sequence[int], hparams: Mapping[str, Any]) -> DataKind:
        return _data_kind_of(resolve_pixels(cls.registry_name, hparams.get("pixels"), image_shape))

    @property
    def data_kind(self) -> DataKind:
        return _data_kind_of(self.pixels)


def _data_kind_of(pixels: str) -> DataKind:
    return "binary" if pixels == "binary" else "continuous"


def bits_per_dim(nats_per_image: float, num_dims: int) -> float:
    """Convert a per-image negative log-likelihood from nats to bits per dimension."""
    return nats_per_image / (num_dims * math.log(2.0))
