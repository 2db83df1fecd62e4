"""VAE-GAN: autoencoding beyond pixels with a learned similarity metric (Larsen et al., 2016).

Idea: a VAE whose decoder is also the generator of a GAN. The reconstruction term of the VAE is
measured not on pixels but on a hidden layer of the GAN's discriminator, Dis_l, with a Gaussian
observation model: -log p(Dis_l(x) | z) = 1/2 ||Dis_l(x) - Dis_l(Dec(z))||^2 + const. The three
networks are updated separately, as in the paper's algorithm:
  encoder        <- KL(q(z|x) || N(0, I)) + L_llike
  decoder        <- gamma * L_llike + GAN loss on reconstructions and on prior samples
  discriminator  <- GAN loss telling data from reconstructions and prior samples.
Each phase treats the other networks as constants (`frozen`), so no phase computes gradients for
weights it does not update.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from components.models.base import ReconstructionModel
from components.models.factory import register_model
from components.models.families.ae import reconstruction_sse
from components.models.layers import (
    ConvDecoder,
    ConvEncoder,
    GaussianLatent,
    strided_feature_size,
    strided_features,
)


def frozen(module: nn.Module, *inputs: Tensor):
    """`module(*inputs)` with its parameters as constants: gradients reach the inputs only."""
    return functional_call(module, {name: p.detach() for name, p in module.named_parameters()}, inputs)


class Discriminator(nn.Module):
    """Stride-2 convolutions down to about 4 x 4 (their output is Dis_l, the similarity features) and a
    linear score.

    Per-image normalisation keeps Dis_l at unit scale, so the similarity term is not dwarfed by the
    KL term (which collapses the posterior); unlike batch norm it does not mix real and fake
    statistics, nor depend on how a batch is split across workers.
    """

    def __init__(self, image_shape, channels: int):
        super().__init__()
        self.features = nn.Sequential(
            *strided_features(image_shape, channels, "vaegan", norm=True), nn.Flatten()
        )
        self.score = nn.Linear(strided_feature_size(image_shape, channels, "vaegan"), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Dis_l features (N x F) and the logit of "real" (N)."""
        features = self.features(x)
        return features, self.score(features).squeeze(1)


def _feature_nll(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """-log N(Dis_l(x); Dis_l(x~), I) up to a constant, averaged over images."""
    return 0.5 * (real_features - fake_features).pow(2).sum(1).mean()


@register_model("vaegan")
class VAEGAN(GaussianLatent, ReconstructionModel):
    phases: ClassVar[tuple[str, ...]] = ("encoder", "decoder", "discriminator")

    def __init__(
        self,
        image_shape,
        *,
        latent_dim: int = 16,
        channels: int = 32,
        hidden: int = 256,
        gamma: float = 1.0,
        discriminator_lr_scale: float = 0.25,
    ):
        super().__init__(image_shape)
        if gamma < 0 or discriminator_lr_scale <= 0:
            raise ValueError(
                f"vaegan: expected gamma >= 0 and discriminator_lr_scale > 0, "
                f"got gamma={gamma}, discriminator_lr_scale={discriminator_lr_scale}"
            )
        self.latent_dim, self.gamma = latent_dim, gamma
        self.discriminator_lr_scale = discriminator_lr_scale
        sizes = {"channels": channels, "hidden": hidden, "owner": "vaegan"}
        self.encoder = ConvEncoder(self.image_shape, 2 * latent_dim, **sizes)
        self.decoder = ConvDecoder(self.image_shape, latent_dim, **sizes)
        self.discriminator = Discriminator(self.image_shape, channels)

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        # beta1 = 0.5 for the two adversarial players, as DCGAN found stable. A slower discriminator
        # keeps Dis_l a steady similarity metric while the reconstructions are still poor; at the
        # full rate it soon rejects every fake and the decoder's reconstructions lag far behind.
        adversarial = {"betas": (0.5, 0.999)}
        return {
            "encoder": torch.optim.Adam(self.encoder.parameters(), lr=lr),
            "decoder": torch.optim.Adam(self.decoder.parameters(), lr=lr, **adversarial),
            "discriminator": torch.optim.Adam(
                self.discriminator.parameters(), lr=lr * self.discriminator_lr_scale, **adversarial
            ),
        }

    def _prior_sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self.device)

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        if phase == "encoder":
            return self._encoder_loss(x)
        if phase == "decoder":
            return self._decoder_loss(x)
        if phase == "discriminator":
            return self._discriminator_loss(x)
        raise ValueError(f"vaegan: unknown phase {phase!r}; expected one of {', '.join(self.phases)}")

    def _encoder_loss(self, x: Tensor) -> dict[str, Tensor]:
        z, kl = self.posterior_sample(x)
        with torch.no_grad():
            real_features, _ = self.discriminator(x)
        fake_features, _ = frozen(self.discriminator, torch.sigmoid(frozen(self.decoder, z)))
        similarity = _feature_nll(real_features, fake_features)
        kl = kl.mean()
        return {"loss": kl + similarity, "kl": kl.detach(), "similarity_nll": similarity.detach()}

    def _decoder_loss(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            z, _ = self.posterior_sample(x)
            real_features, _ = self.discriminator(x)
        reconstruction_features, reconstruction_logits = frozen(self.discriminator, self.decode(z))
        _, prior_logits = frozen(self.discriminator, self.decode(self._prior_sample(len(x))))
        similarity = _feature_nll(real_features, reconstruction_features)
        # Non-saturating generator loss (-log D) on both kinds of fakes, as logits via softplus.
        adversarial = F.softplus(-reconstruction_logits).mean() + F.softplus(-prior_logits).mean()
        return {"loss": self.gamma * similarity + adversarial, "generator_adversarial": adversarial.detach()}

    def _discriminator_loss(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():  # fakes without a graph: this phase's backward never reaches Enc or Dec
            z, _ = self.posterior_sample(x)
            reconstructions = self.decode(z)
            prior_samples = self.decode(self._prior_sample(len(x)))
        _, real = self.discriminator(x)
        _, reconstructed = self.discriminator(reconstructions)
        _, generated = self.discriminator(prior_samples)
        loss = F.softplus(-real).mean() + F.softplus(reconstructed).mean() + F.softplus(generated).mean()
        return {"loss": loss, "d_real": torch.sigmoid(real).mean().detach()}

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        _, kl = self.posterior_sample(x)
        return {"val_reconstruction_sse": reconstruction_sse(self, x), "val_kl": kl.mean()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self._prior_sample(n, generator))
