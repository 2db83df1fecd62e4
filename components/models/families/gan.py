"""Generative adversarial network with fully connected players (Goodfellow et al., 2014).

Idea: a generator G maps noise z ~ N(0, I) to images and a discriminator D learns to tell them from
data, D maximising log D(x) + log(1 - D(G(z))); G is trained against D with the non-saturating
objective max log D(G(z)), which has the same fixed point (p_G = p_data) but strong gradients early
on. Both players are MLPs over the flattened image, so any image size works as is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from torch import Tensor, nn

from components.models.adversarial import AdversarialModel
from components.models.factory import register_model


def mlp(sizes: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear layers of the given sizes, a fresh `activation()` between them and none after the last."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), activation()]
    return nn.Sequential(*layers[:-1])


class MLPGenerator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, hidden: int, depth: int):
        super().__init__()
        self.image_shape = image_shape
        num_dims = image_shape[0] * image_shape[1] * image_shape[2]
        self.net = mlp([latent_dim, *[hidden] * depth, num_dims], nn.ReLU)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).tanh().reshape(len(z), *self.image_shape)


@register_model("gan")
class GAN(AdversarialModel):
    def __init__(self, image_shape, *, latent_dim: int = 16, hidden: int = 256, depth: int = 2):
        super().__init__(image_shape, latent_dim=latent_dim)
        # LeakyReLU keeps D's gradient alive for inputs it rejects outright (a dead ReLU gives G none).
        self.set_players(
            MLPGenerator(self.image_shape, latent_dim, hidden, depth),
            nn.Sequential(
                nn.Flatten(),
                mlp([self.num_dims, *[hidden] * depth, 1], lambda: nn.LeakyReLU(0.2)),
                nn.Flatten(0),
            ),
        )
