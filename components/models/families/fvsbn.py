"""Fully visible sigmoid belief network (Frey 1998; Neal 1992).

Idea: the simplest autoregressive model of images, with no hidden units: each pixel is a
Bernoulli whose logit is a linear function of the pixels before it,
p(x_i = 1 | x_<i) = sigmoid(b_i + sum_{j<i} W_ij x_j), i.e. one strictly lower-triangular linear
layer over the raster-ordered pixels. On 8-bit images the same linear layer gives the parameters of
each sub-pixel's distribution over the levels, in the flattened C x H x W order; its default, a
single discretised logistic, keeps the layer at 3 x D x D weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from components.models.autoregressive import AutoregressiveImageModel, Conditional, MaskedLinear
from components.models.factory import register_model

# Adam moves every weight by about the learning rate per step, so the step of a sub-pixel's output,
# a sum over up to D inputs, grows with D. The shared rate suits FVSBN up to 784 inputs (binarised
# 28x28, where it matches a reference implementation); above, the rate shrinks as 784 / D, which keeps
# that step the same (at 3x32x32 8-bit: 7.42 bits/dim after 10 epochs instead of 9.26, worse than
# uniform; bench/RESULTS-density-8bit.md).
RATE_TUNED_INPUTS = 784


@register_model("fvsbn")
class FVSBN(AutoregressiveImageModel):
    pixel_major = False

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        pixels: str | None = None,
        output: str = "logistic",
        levels: int = 256,
        mixture_components: int = 1,
    ):
        super().__init__(
            image_shape, pixels=pixels, output=output, levels=levels, mixture_components=mixture_components
        )
        d, p = self.num_dims, self.params_per_dim
        self.linear = MaskedLinear(d, d * p, torch.ones(d, d).tril(-1).repeat_interleave(p, 0))

    def configure_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return super().configure_optimizers(lr * min(1.0, RATE_TUNED_INPUTS / self.num_dims))

    def params(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1)).reshape(-1, *self.image_shape, self.params_per_dim)

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        # The rows of sub-pixel i in the masked weight read only sub-pixels < i, all drawn already.
        weight, bias, p = self.linear.masked_weight(), self.linear.bias, self.params_per_dim
        for i in range(self.num_dims):
            yield i, x @ weight[i * p : (i + 1) * p].T + bias[i * p : (i + 1) * p]
