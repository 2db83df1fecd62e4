"""Convolutional autoencoder with a Gaussian fitted to its codes (Hinton & Salakhutdinov, 2006).

Idea: an encoder squeezes each image through a low-dimensional bottleneck and a decoder rebuilds it;
training minimises only the reconstruction error, so nothing makes the codes follow a known
distribution. To generate anyway, after training a full-covariance Gaussian is fitted to the codes
of the training images and samples are the decoded draws from it (the simplest "ex-post density
estimation" of Ghosh et al., 2020).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn import functional as F

from components.models.base import ReconstructionModel
from components.models.factory import register_model
from components.models.layers import ConvDecoder, ConvEncoder

FIT_BATCH_SIZE = 1000  # images encoded at once when fitting the code Gaussian
JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0)  # diagonal loads tried, as fractions of mean variance


def reconstruction_sse(model: ReconstructionModel, x: Tensor) -> Tensor:
    """Mean over images of the summed squared pixel error of the reconstruction (as in evaluation)."""
    return (model.reconstruct(x) - x).pow(2).flatten(1).sum(1).mean()


@register_model("ae")
class ConvAutoencoder(ReconstructionModel):
    def __init__(self, image_shape, *, latent_dim: int = 16, channels: int = 32, hidden: int = 256):
        super().__init__(image_shape)
        self.latent_dim = latent_dim
        sizes = {"channels": channels, "hidden": hidden, "owner": self.registry_name}
        self.encoder = ConvEncoder(self.image_shape, latent_dim, **sizes)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, **sizes)
        # The code Gaussian is state, not a parameter: buffers are saved with the weights and moved
        # with the module, and no optimiser touches them. N(0, I) until `fit_after_training`.
        self.register_buffer("code_mean", torch.zeros(latent_dim))
        self.register_buffer("code_cholesky", torch.eye(latent_dim))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(self.decoder(z))

    def corrupt(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The input the encoder is trained on; a plain autoencoder sees the clean image."""
        return x

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        # Bernoulli cross-entropy against grey levels: its gradient does not vanish near 0 and 1 the
        # way a squared error's does, which gives sharper digits for the same budget.
        logits = self.decoder(self.encoder(self.corrupt(x)))
        loss = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
        return {"loss": loss, "reconstruction_bce": loss.detach()}

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        return {"val_reconstruction_sse": reconstruction_sse(self, x)}

    @torch.no_grad()
    def fit_after_training(self, x_train: Iterable[Tensor]) -> None:
        """Fit the code Gaussian by maximum likelihood to the codes of the training images."""
        codes = torch.cat(
            [self.encode(chunk) for piece in x_train for chunk in piece.split(FIT_BATCH_SIZE)]
        ).double()
        if len(codes) < 2:
            raise ValueError(f"{type(self).__name__}: need at least 2 training images, got {len(codes)}")
        mean = codes.mean(0)
        centred = codes - mean
        covariance = centred.T @ centred / (len(codes) - 1)
        self.code_mean.copy_(mean.float())
        self.code_cholesky.copy_(stable_cholesky(covariance).float())

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`n` draws from the fitted code Gaussian, N x latent_dim."""
        eps = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.code_mean + eps @ self.code_cholesky.T

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self.sample_codes(n, generator))


def stable_cholesky(covariance: Tensor) -> Tensor:
    """Cholesky factor of a covariance that may be singular (collapsed code dimensions).

    Adds a growing fraction of the mean variance to the diagonal until the factorisation succeeds.
    """
    scale = covariance.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    for jitter in JITTERS:
        factor, info = torch.linalg.cholesky_ex(covariance + jitter * scale * eye)
        if info.item() == 0:
            return factor
    raise ValueError(
        f"code covariance is not positive definite even with {JITTERS[-1]:g} x its mean variance added "
        "to the diagonal; the codes are probably non-finite"
    )
