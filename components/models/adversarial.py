"""What every adversarial family shares: two players, an objective, and the phases that train them.

A family supplies two networks and picks an `Objective`: a `generator` (latent vector -> image of
exactly `image_shape` on the scale [-1, 1], through a tanh, or a linear output that `sample`
clamps) and a `discriminator` (image on that scale -> one score per image). `AdversarialModel`
turns them into the trainer's phases. The discriminator (or critic) phase draws its fakes without a
graph, so under the trainer's one-DDP-for-the-whole-model wrapper its backward pass never reaches
the generator; the generator phase back-propagates through the discriminator, whose gradients the
trainer then throws away because only the generator's optimiser steps. Data in [0, 1] is mapped to
[-1, 1] on the way in and back on the way out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel

from components.models.base import GenerativeModel

Critic = Callable[[Tensor], Tensor]
VALIDATION_FAKES = 256  # generated images the per-epoch validation scores against held-out ones
LAZY_R1_PHASE = "r1"  # the discriminator's own step for the R1 penalty alone, when it is lazy


class Objective(Protocol):
    """The two losses of an adversarial game, from the scores the discriminator gives real and fake data."""

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]: ...

    def generator_loss(self, fake: Tensor) -> Tensor: ...


class NonSaturating:
    """Goodfellow et al. (2014): D maximises log D(x) + log(1 - D(G(z))), G maximises log D(G(z)).

    Scores are logits, so both losses are softplus terms, which are exact where log-sigmoid would
    underflow; G's "non-saturating" loss keeps a strong gradient while D still rejects its samples.
    """

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        return loss, {"d_real": torch.sigmoid(real).mean(), "d_fake": torch.sigmoid(fake).mean()}

    def generator_loss(self, fake: Tensor) -> Tensor:
        return F.softplus(-fake).mean()


class Wasserstein:
    """Arjovsky et al. (2017): the critic's mean score gap estimates the Wasserstein-1 distance
    (up to its Lipschitz constant); the critic maximises it and the generator minimises it."""

    def discriminator_loss(self, real: Tensor, fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        distance = real.mean() - fake.mean()
        return -distance, {"wasserstein": distance}

    def generator_loss(self, fake: Tensor) -> Tensor:
        return -fake.mean()


# Eager even inside a torch.compile'd model: a penalty on this norm needs a double backward through the
# critic, which compiled graphs (aot_autograd) do not support.
@torch.compiler.disable
def input_gradient_norm(critic: Critic, points: Tensor) -> Tensor:
    """||d critic(x) / dx|| at each point, shape N, differentiable so a penalty on it trains the critic."""
    points = points.detach().requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(points).sum(), points, create_graph=True)
    return gradient.flatten(1).norm(dim=1)


def gradient_penalty(critic: Critic, real: Tensor, fake: Tensor, weight: float = 10.0) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): weight * E[(||grad critic(x_hat)|| - 1)^2] with x_hat drawn
    uniformly on lines between paired real and fake samples, a soft 1-Lipschitz constraint."""
    mix = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    between = mix * real.detach() + (1 - mix) * fake.detach().to(real.dtype)
    return weight * (input_gradient_norm(critic, between) - 1).pow(2).mean()


@contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Inside, `module`'s batch-norm layers normalise each batch by its own statistics, as in training,
    and leave their running statistics (what evaluation mode uses) as they were."""
    norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for norm in norms:
        # Training mode without tracking: batch statistics, and no update of the running ones.
        norm.training, norm.track_running_stats = True, False
    try:
        yield
    finally:
        for norm, (training, tracking) in zip(norms, saved, strict=True):
            norm.training, norm.track_running_stats = training, tracking


def r1_penalty(critic: Critic, real: Tensor, gamma: float) -> Tensor:
    """R1 (Mescheder et al. 2018), as used by StyleGAN: gamma/2 * E||grad D(x)||^2 on real data only."""
    return 0.5 * gamma * input_gradient_norm(critic, real).pow(2).mean()


def standard_normal(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """N(0, I) noise drawn with `generator` on its own device (a seeded CPU generator stays usable
    for a model on a GPU), then moved to `device`."""
    if generator is None:
        # Without the `generator` argument: torch.compile cannot pass it a symbolic batch size, and
        # the last, smaller batch of an epoch makes the size symbolic.
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, generator=generator, device=generator.device).to(device)


def power_of_two_canvas(image_shape: Sequence[int], minimum: int = 8) -> int:
    """Side of the square power-of-two canvas (at least `minimum`) that holds an image of this shape."""
    _, height, width = image_shape
    return max(minimum, 2 ** math.ceil(math.log2(max(height, width))))


def crop_center(images: Tensor, height: int, width: int) -> Tensor:
    """The central height x width window of images generated on a larger canvas."""
    top = (images.shape[-2] - height) // 2
    left = (images.shape[-1] - width) // 2
    return images[..., top : top + height, left : left + width]


def pad_center(images: Tensor, size: int) -> Tensor:
    """Inverse of `crop_center`: place images in the middle of a size x size canvas of -1 (black), so
    real and generated images look alike outside the image."""
    height, width = images.shape[-2:]
    top, left = (size - height) // 2, (size - width) // 2
    return F.pad(images, (left, size - width - left, top, size - height - top), value=-1.0)


class AdversarialModel(GenerativeModel):
    """Base of the GAN-style families: subclasses call `set_players` and may choose the `objective`.

    `phases[0]` trains the discriminator (named "critic" by the Wasserstein families) and runs every
    step; "generator" runs every `critic_steps`-th step. `r1_gamma > 0` adds the R1 penalty
    (Mescheder, Geiger & Nowozin, 2018) on real images to the discriminator's loss. With `r1_every`
    k > 1 the penalty is lazy, as in StyleGAN2 (Karras et al. 2020): a phase of its own ("r1") steps
    the discriminator's optimiser on k times the penalty every k-th step, so the double backward it
    needs costs 1/k as much. With `ema_decay` > 0, `sample` draws from an exponential moving average
    of the generator's weights and buffers (Karras et al. 2018; Yazici et al. 2019), updated after
    each generator step; the average of the first steps follows the generator more closely
    (decay (1 + n) / (10 + n) after n updates, until that exceeds `ema_decay`).
    """

    phases: ClassVar[tuple[str, ...]] = ("discriminator", "generator")
    objective: ClassVar[Objective] = NonSaturating()
    generator: nn.Module
    discriminator: nn.Module

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        latent_dim: int,
        critic_steps: int = 1,
        r1_gamma: float = 0.0,
        r1_every: int = 1,
        ema_decay: float = 0.0,
    ):
        super().__init__(image_shape)
        if critic_steps < 1:
            raise ValueError(
                f"{self.registry_name}: critic steps per generator step must be >= 1, got {critic_steps}"
            )
        if r1_gamma < 0:
            raise ValueError(f"{self.registry_name}: expected r1_gamma >= 0, got r1_gamma={r1_gamma}")
        if r1_every < 1:
            raise ValueError(f"{self.registry_name}: expected r1_every >= 1, got r1_every={r1_every}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"{self.registry_name}: expected ema_decay in [0, 1), got ema_decay={ema_decay}")
        self.latent_dim = latent_dim
        self.critic_steps = critic_steps
        self.r1_gamma = r1_gamma
        self.r1_every = r1_every
        if self.lazy_r1:  # this model's own phases: the class's, and the penalty's
            self.phases = (*type(self).phases, LAZY_R1_PHASE)
        self.ema_decay = ema_decay
        self.register_load_state_dict_pre_hook(self._average_from_generator)

    def set_players(self, generator: nn.Module, discriminator: nn.Module) -> None:
        """The two networks; with `ema_decay` > 0 also the generator's average, starting as a copy."""
        self.generator = generator
        self.discriminator = discriminator
        if self.ema_decay > 0:
            self.generator_average = AveragedModel(
                generator, multi_avg_fn=self._moving_average, use_buffers=True
            ).requires_grad_(False)

    def _moving_average(self, averages: list[Tensor], currents: list[Tensor], updates: Tensor) -> None:
        """One update of tensors of one dtype and device (`AveragedModel` groups them so)."""
        decay = min(self.ema_decay, (1 + updates.item()) / (10 + updates.item()))
        for average, current in zip(averages, currents, strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1 - decay)
            else:  # batch norm's step counters: copied, not averaged
                average.copy_(current)

    def _average_from_generator(self, module, state_dict, prefix, *args) -> None:
        """Weights saved without an average (with `ema_decay` 0, or before it existed) load with the
        average starting at their generator, so the model samples as it did and averages from there."""
        average, generator = f"{prefix}generator_average.", f"{prefix}generator."
        if self.ema_decay == 0 or any(key.startswith(average) for key in state_dict):
            return
        for key, value in list(state_dict.items()):
            if key.startswith(generator):
                state_dict[f"{average}module.{key.removeprefix(generator)}"] = value
        state_dict[f"{average}n_averaged"] = torch.tensor(1)

    @property
    def sampling_generator(self) -> nn.Module:
        """The network `sample` draws from: the generator's average where there is one."""
        return self.generator_average.module if self.ema_decay > 0 else self.generator

    @property
    def lazy_r1(self) -> bool:
        """Whether the R1 penalty takes a step of its own every `r1_every`-th step."""
        return self.r1_gamma > 0 and self.r1_every > 1

    def make_optimizer(self, parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """Optimiser of each player; Adam with beta1 = 0.5 as DCGAN found stable for GANs."""
        return torch.optim.Adam(parameters, lr=lr, betas=(0.5, 0.999))

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        critic = self.phases[0]
        optimizers = {
            critic: self.make_optimizer(self.discriminator.parameters(), lr),
            "generator": self.make_optimizer(self.generator.parameters(), lr),
        }
        if self.lazy_r1:  # the penalty steps the discriminator's own optimiser, as StyleGAN2 does
            optimizers[LAZY_R1_PHASE] = optimizers[critic]
        return optimizers

    def phase_schedule(self, step: int) -> Sequence[str]:
        players = self.phases[:2] if (step + 1) % self.critic_steps == 0 else self.phases[:1]
        if self.lazy_r1 and step % self.r1_every == 0:
            return (*players, LAZY_R1_PHASE)
        return players

    @torch.no_grad()
    def after_optimizer_step(self, phase: str) -> None:
        if phase == "generator" and self.ema_decay > 0:
            self.generator_average.update_parameters(self.generator)

    def prior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return standard_normal((n, self.latent_dim), generator, self.device)

    def generate(
        self, n: int, generator: torch.Generator | None = None, network: nn.Module | None = None
    ) -> Tensor:
        """`n` images from `network` (the generator unless given) on the [-1, 1] scale, with gradients if
        enabled."""
        return (self.generator if network is None else network)(self.prior(n, generator))

    def discriminator_penalty(self, real: Tensor, fake: Tensor) -> Tensor | None:
        """Extra term of the discriminator loss (a gradient penalty), computed in `forward` so DDP sees it."""
        if self.r1_gamma > 0 and not self.lazy_r1:
            return r1_penalty(self.discriminator, real, self.r1_gamma)
        return None

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        if phase == self.phases[0]:
            real = 2 * x - 1
            with torch.no_grad():  # the generator gets no gradient from the discriminator's step
                fake = self.generate(len(x))
            loss, metrics = self.objective.discriminator_loss(
                self.discriminator(real), self.discriminator(fake)
            )
            penalty = self.discriminator_penalty(real, fake)
            if penalty is not None:
                loss = loss + penalty
                metrics["penalty"] = penalty
            return {"loss": loss, **{k: v.detach() for k, v in metrics.items()}}
        if phase == "generator":
            return {"loss": self.objective.generator_loss(self.discriminator(self.generate(len(x))))}
        if phase == LAZY_R1_PHASE and self.lazy_r1:
            # k times the penalty every k-th step: on average the penalty of every step.
            penalty = r1_penalty(self.discriminator, 2 * x - 1, self.r1_gamma)
            return {"loss": self.r1_every * penalty, "penalty": penalty.detach()}
        raise ValueError(
            f"{type(self).__name__}.forward: unknown phase {phase!r}, expected one of {self.phases}"
        )

    def validation_metrics(self, x: Tensor) -> dict[str, Tensor]:
        """The objective's scores on held-out images and on the model's samples from `VALIDATION_FAKES`
        fixed latents (the same for every batch of held-out images, so batch means combine into the
        split's): a discriminator that rates validation images far below training images is memorising
        them. It scores them as it scores training batches, with batch statistics in any batch norm, so
        the two compare; evaluation mode's running statistics would shift the held-out scores alone."""
        fake = self.generate(VALIDATION_FAKES, torch.Generator(self.device).manual_seed(0))
        with batch_statistics(self.discriminator):
            _, metrics = self.objective.discriminator_loss(
                self.discriminator(2 * x - 1), self.discriminator(fake)
            )
        return {f"val_{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return ((self.generate(n, generator, self.sampling_generator).float() + 1) / 2).clamp(0, 1)
