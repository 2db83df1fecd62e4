"""Masked autoencoder for distribution estimation, MADE (Germain, Gregor, Murray & Larochelle, ICML 2015).

Idea: a fully-connected autoencoder becomes an autoregressive model when its weights are masked so
that output i is connected only to inputs earlier than i in some ordering: each unit gets a degree,
a hidden unit of degree k sees units of degree <= k, and output i sees hidden units of degree < i.
All D conditionals then come out of one forward pass. With several masks (different orderings and
connectivities sharing the same weights), training draws one mask per minibatch (order- and
connectivity-agnostic training) and evaluation averages the probabilities of the resulting ensemble,
log p(x) = log mean_m p_m(x), which is itself a normalised density.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.autoregressive import (
    AutoregressiveBernoulli,
    Conditional,
    MaskedLinear,
    bernoulli_log_prob,
)
from components.models.registry import register_model


def made_masks(
    num_dims: int, hidden: int, num_layers: int, num_masks: int, seed: int
) -> tuple[Tensor, list[Tensor]]:
    """Orderings (num_masks x D) and, per layer, the stacked masks (num_masks x out x in).

    The first ordering is the raster order; the others are random permutations. Degrees are
    0-based positions in the ordering; hidden degrees are drawn in [lowest degree below, D - 2], so
    no hidden unit is cut off from every input and none waits on the last pixel, which no output
    needs.
    """
    generator = torch.Generator().manual_seed(seed)
    orderings = [torch.arange(num_dims)]
    orderings += [torch.randperm(num_dims, generator=generator) for _ in range(num_masks - 1)]
    layer_masks: list[list[Tensor]] = [[] for _ in range(num_layers + 1)]
    for order in orderings:
        input_degree = torch.empty(num_dims, dtype=torch.long)
        input_degree[order] = torch.arange(num_dims)
        below = input_degree
        for layer in range(num_layers):
            degree = torch.randint(int(below.min()), num_dims - 1, (hidden,), generator=generator)
            layer_masks[layer].append((degree[:, None] >= below[None, :]).float())
            below = degree
        layer_masks[-1].append((input_degree[:, None] > below[None, :]).float())
    return torch.stack(orderings), [torch.stack(masks) for masks in layer_masks]


@register_model("made")
class MADE(AutoregressiveBernoulli):
    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        hidden: int = 256,
        num_layers: int = 2,
        num_masks: int = 1,
        mask_seed: int = 0,
    ):
        super().__init__(image_shape)
        if num_layers < 1 or num_masks < 1 or self.num_dims < 2:
            raise ValueError(
                f"model 'made': expected num_layers >= 1, num_masks >= 1 and at least 2 pixels, got "
                f"num_layers={num_layers}, num_masks={num_masks}, image_shape={self.image_shape}"
            )
        self.num_masks = num_masks
        orderings, masks = made_masks(self.num_dims, hidden, num_layers, num_masks, mask_seed)
        self.register_buffer("orderings", orderings)
        sizes = [self.num_dims] + [hidden] * num_layers + [self.num_dims]
        self.layers = nn.ModuleList(
            MaskedLinear(n_in, n_out, mask)
            for n_in, n_out, mask in zip(sizes[:-1], sizes[1:], masks, strict=True)
        )

    def logits(self, x: Tensor, mask_index: int = 0) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h, mask_index))
        return self.layers[-1](h, mask_index).reshape(-1, *self.image_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_images(x)
        per_mask = torch.stack([bernoulli_log_prob(self.logits(x, m), x) for m in range(self.num_masks)])
        return torch.logsumexp(per_mask, 0) - math.log(self.num_masks)

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        if not (self.training and self.num_masks > 1):
            return super().forward(x, phase)
        # Order- and connectivity-agnostic training: one mask per minibatch, drawn at random, so that
        # every mask of the ensemble that evaluation averages is trained with the same weights.
        self.check_images(x)
        mask_index = int(torch.randint(self.num_masks, ()))
        nll = -bernoulli_log_prob(self.logits(x, mask_index), x).mean()
        return {"loss": nll, "nll": nll.detach()}

    def conditional_logits(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        # Sampling the ensemble: pick a mask per sample, then draw in that mask's order. Samples are
        # sorted by mask so that each mask runs once per step on one contiguous slice.
        n = len(x)
        component = torch.randint(self.num_masks, (n,), generator=generator, device=x.device).sort().values
        bounds = [0, *torch.bincount(component, minlength=self.num_masks).cumsum(0).tolist()]
        groups = [
            (m, slice(bounds[m], bounds[m + 1])) for m in range(self.num_masks) if bounds[m + 1] > bounds[m]
        ]
        order = self.orderings.tolist()
        pixel = self.orderings[component]
        for step in range(self.num_dims):
            logit = x.new_empty(n)
            for m, rows in groups:
                logit[rows] = self.logits(x[rows], m).flatten(1)[:, order[m][step]]
            yield pixel[:, step], logit
