"""Neural autoregressive distribution estimator, NADE (Larochelle & Murray, AISTATS 2011).

Idea: every conditional p(x_d | x_<d) is a one-hidden-layer network, and all D networks share one
input weight matrix W, so the hidden pre-activation of pixel d is that of pixel d-1 plus
W[:, d-1] x_{d-1}. A running (cumulative) sum therefore gives all D hidden layers in O(D*H)
instead of D separate forward passes of O(D*H) each:
h_d = act(c + W[:, <d] x_<d), p(x_d = 1 | x_<d) = sigmoid(b_d + V_d . h_d). The hidden units are
ReLUs with Kaiming-initialised weights by default (`activation="sigmoid"`: the paper's units):
10 nats better on 28x28 binarised digits, see bench/RESULTS-density.md.
On 8-bit images V_d and b_d give the parameters of sub-pixel d's distribution over the levels
instead of one logit, in the flattened C x H x W order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.autoregressive import AutoregressiveImageModel, Conditional
from components.models.factory import register_model

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}


@register_model("nade")
class NADE(AutoregressiveImageModel):
    pixel_major = False

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        hidden: int = 128,
        activation: str = "relu",
        pixels: str | None = None,
        output: str = "logistic",
        levels: int = 256,
        mixture_components: int = 5,
    ):
        super().__init__(
            image_shape, pixels=pixels, output=output, levels=levels, mixture_components=mixture_components
        )
        if activation not in ACTIVATIONS:
            raise ValueError(f"model 'nade': activation must be 'sigmoid' or 'relu', got {activation!r}")
        self.activation = ACTIVATIONS[activation]
        d, p = self.num_dims, self.params_per_dim
        if activation == "relu":  # Kaiming: keeps the ReLU units' scale through both layers
            self.input_weight = nn.Parameter(torch.randn(d, hidden) * math.sqrt(2.0 / d))
            output_weight = torch.randn(d * p, hidden) * math.sqrt(2.0 / hidden)
        else:
            self.input_weight = nn.Parameter(torch.empty(d, hidden).uniform_(-1, 1) / math.sqrt(d))
            output_weight = torch.empty(d * p, hidden).uniform_(-1, 1) / math.sqrt(hidden)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.output_weight = nn.Parameter(output_weight)
        self.output_bias = nn.Parameter(torch.zeros(d * p))

    def params(self, x: Tensor) -> Tensor:
        flat = x.flatten(1)
        # N x D x H: pre-activation of pixel d = c + sum_{j<d} W_j x_j, an exclusive cumulative sum.
        running = (flat[:, :, None] * self.input_weight).cumsum(1)
        pre_activation = self.hidden_bias + F.pad(running[:, :-1], (0, 0, 1, 0))
        hidden = self.activation(pre_activation)
        d, p = self.num_dims, self.params_per_dim
        output_weight = self.output_weight.view(d, p, -1)
        params = torch.einsum("ndh,dph->ndp", hidden, output_weight) + self.output_bias.view(d, p)
        return params.reshape(-1, *self.image_shape, p)

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        p = self.params_per_dim
        pre_activation = self.hidden_bias.expand(len(x), -1)
        for d in range(self.num_dims):
            rows = slice(d * p, (d + 1) * p)
            yield d, self.activation(pre_activation) @ self.output_weight[rows].T + self.output_bias[rows]
            pre_activation = pre_activation + x[:, d : d + 1] * self.input_weight[d]
