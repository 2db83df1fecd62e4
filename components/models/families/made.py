"""Masked autoencoder for distribution estimation, MADE (Germain, Gregor, Murray & Larochelle, ICML 2015).

Idea: a fully-connected autoencoder becomes an autoregressive model when its weights are masked so
that output i is connected only to inputs earlier than i in some ordering: each unit gets a degree,
a hidden unit of degree k sees units of degree <= k, and output i sees hidden units of degree < i.
All D conditionals then come out of one forward pass. With several masks (different orderings and
connectivities sharing the same weights), training draws one mask per minibatch (order- and
connectivity-agnostic training) and evaluation averages the probabilities of the resulting ensemble,
log p(x) = log mean_m p_m(x), which is itself a normalised density. The first ordering is a random
permutation of the pixels by default, as in the reference implementations (`random_order=False`:
the raster order, 10 nats worse on 28x28 binarised digits, see bench/RESULTS-density.md). On 8-bit
images each output unit becomes the parameters of one sub-pixel's distribution over the levels, all
with the degree of that sub-pixel, over the flattened C x H x W sub-pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.autoregressive import AutoregressiveImageModel, Conditional, MaskedLinear
from components.models.factory import register_model


def made_masks(
    num_dims: int,
    hidden: int,
    num_layers: int,
    num_masks: int,
    seed: int,
    params_per_dim: int = 1,
    random_order: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Orderings (num_masks x D) and, per layer, the stacked masks (num_masks x out x in).

    The output layer has `params_per_dim` units per dimension, all with that dimension's degree.
    The first ordering is the raster order unless `random_order`; the others are random
    permutations. Degrees are
    0-based positions in the ordering; hidden degrees are drawn in [lowest degree below, D - 2], so
    no hidden unit is cut off from every input and none waits on the last pixel, which no output
    needs.
    """
    # Drawn on the CPU whatever the default device: also where a model is built on PyTorch's meta
    # device to check that it can be built (its masks are data, not parameters).
    with torch.device("cpu"):
        generator = torch.Generator().manual_seed(seed)
        orderings = [] if random_order else [torch.arange(num_dims)]
        orderings += [
            torch.randperm(num_dims, generator=generator) for _ in range(num_masks - len(orderings))
        ]
        layer_masks: list[list[Tensor]] = [[] for _ in range(num_layers + 1)]
        for order in orderings:
            input_degree = torch.empty(num_dims, dtype=torch.long)
            input_degree[order] = torch.arange(num_dims)
            below = input_degree
            for layer in range(num_layers):
                degree = torch.randint(int(below.min()), num_dims - 1, (hidden,), generator=generator)
                layer_masks[layer].append((degree[:, None] >= below[None, :]).float())
                below = degree
            output_degree = input_degree.repeat_interleave(params_per_dim)
            layer_masks[-1].append((output_degree[:, None] > below[None, :]).float())
        return torch.stack(orderings), [torch.stack(masks) for masks in layer_masks]


@register_model("made")
class MADE(AutoregressiveImageModel):
    pixel_major = False

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        hidden: int = 256,
        num_layers: int = 2,
        num_masks: int = 1,
        mask_seed: int = 0,
        random_order: bool = True,
        pixels: str | None = None,
        output: str = "logistic",
        levels: int = 256,
        mixture_components: int = 5,
    ):
        super().__init__(
            image_shape, pixels=pixels, output=output, levels=levels, mixture_components=mixture_components
        )
        if num_layers < 1 or num_masks < 1 or self.num_dims < 2:
            raise ValueError(
                f"model 'made': expected num_layers >= 1, num_masks >= 1 and at least 2 pixels, got "
                f"num_layers={num_layers}, num_masks={num_masks}, image_shape={self.image_shape}"
            )
        self.num_masks = num_masks
        p = self.params_per_dim
        orderings, masks = made_masks(
            self.num_dims, hidden, num_layers, num_masks, mask_seed, p, random_order
        )
        self.register_buffer("orderings", orderings)
        sizes = [self.num_dims] + [hidden] * num_layers + [self.num_dims * p]
        self.layers = nn.ModuleList(
            MaskedLinear(n_in, n_out, mask)
            for n_in, n_out, mask in zip(sizes[:-1], sizes[1:], masks, strict=True)
        )

    def params(self, x: Tensor, mask_index: int = 0) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers[:-1]:
            h = F.relu(layer(h, mask_index))
        return self.layers[-1](h, mask_index).reshape(-1, *self.image_shape, self.params_per_dim)

    def mask_log_prob(self, x: Tensor, mask_index: int) -> Tensor:
        """Log-likelihood of each image under the one ordering and connectivity of mask `mask_index`."""
        return self.distribution.log_prob(self.params(x, mask_index), x).flatten(1).sum(1)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check_images(x)
        per_mask = torch.stack([self.mask_log_prob(x, m) for m in range(self.num_masks)])
        return torch.logsumexp(per_mask, 0) - math.log(self.num_masks)

    def forward(self, x: Tensor, phase: str) -> dict[str, Tensor]:
        if not (self.training and self.num_masks > 1):
            return super().forward(x, phase)
        # Order- and connectivity-agnostic training: one mask per minibatch, drawn at random, so that
        # every mask of the ensemble that evaluation averages is trained with the same weights.
        self.check_images(x)
        mask_index = int(torch.randint(self.num_masks, ()))
        nll = -self.mask_log_prob(x, mask_index).mean()
        return {"loss": nll, "nll": nll.detach()}

    def ordering(self) -> Tensor:
        return self.orderings[0]

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        # Sampling the ensemble: pick a mask per sample, then draw in that mask's order. Samples are
        # sorted by mask so that each mask runs once per step on one contiguous slice.
        n = len(x)
        component = torch.randint(self.num_masks, (n,), generator=generator, device=x.device).sort().values
        bounds = [0, *torch.bincount(component, minlength=self.num_masks).cumsum(0).tolist()]
        groups = [
            _SamplingState(self, m, x[bounds[m] : bounds[m + 1]], slice(bounds[m], bounds[m + 1]))
            for m in range(self.num_masks)
            if bounds[m + 1] > bounds[m]
        ]
        pixel = self.orderings[component]
        for step in range(self.num_dims):
            params = x.new_empty(n, self.params_per_dim)
            for group in groups:
                params[group.rows] = group.params(step)
            yield pixel[:, step], params
            for group in groups:
                group.drawn(x[group.rows], step)


class _SamplingState:
    """One mask's share of a sampling run, a step costing O(H^2 + H P) instead of a whole pass.

    The weights are masked once, not at every step; the first layer's pre-activation grows by the
    column of the sub-pixel just drawn (the others are still zero), and the output layer computes
    only the rows of the sub-pixel to draw next.
    """

    def __init__(self, made: MADE, mask_index: int, x: Tensor, rows: slice):
        first, *hidden, output = made.layers
        self.rows, self.p = rows, made.params_per_dim
        self.order = made.orderings[mask_index].tolist()
        self.first_weight = first.masked_weight(mask_index)
        self.pre_activation = F.linear(x, self.first_weight, first.bias)
        self.hidden = [(layer.masked_weight(mask_index), layer.bias) for layer in hidden]
        self.output_weight, self.output_bias = output.masked_weight(mask_index), output.bias

    def params(self, step: int) -> Tensor:
        h = F.relu(self.pre_activation)
        for weight, bias in self.hidden:
            h = F.relu(F.linear(h, weight, bias))
        rows = slice(self.order[step] * self.p, (self.order[step] + 1) * self.p)
        return F.linear(h, self.output_weight[rows], self.output_bias[rows])

    def drawn(self, x: Tensor, step: int) -> None:
        d = self.order[step]
        self.pre_activation += x[:, d : d + 1] * self.first_weight[:, d]
