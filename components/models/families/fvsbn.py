"""Fully visible sigmoid belief network (Frey 1998; Neal 1992).

Idea: the simplest autoregressive model of binary images, with no hidden units: each pixel is a
Bernoulli whose logit is a linear function of the pixels before it,
p(x_i = 1 | x_<i) = sigmoid(b_i + sum_{j<i} W_ij x_j), i.e. one strictly lower-triangular linear
layer over the raster-ordered pixels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from components.models.autoregressive import AutoregressiveBernoulli, Conditional, MaskedLinear
from components.models.registry import register_model


@register_model("fvsbn")
class FVSBN(AutoregressiveBernoulli):
    def __init__(self, image_shape: Sequence[int]):
        super().__init__(image_shape)
        d = self.num_dims
        self.linear = MaskedLinear(d, d, torch.ones(d, d).tril(-1))

    def logits(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).reshape(-1, *self.image_shape)

    def conditional_logits(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        # Row i of the masked weight reads only pixels < i, all drawn already: O(D) per pixel.
        weight = self.linear.masked_weight()
        for i in range(self.num_dims):
            yield i, x @ weight[i] + self.linear.bias[i]
