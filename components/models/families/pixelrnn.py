"""PixelRNN (van den Oord, Kalchbrenner & Kavukcuoglu, ICML 2016).

Idea: replace the convolutional body of an autoregressive image model by two-dimensional LSTMs so
that each pixel's state summarises a large part of the image above and to its left. A type-A masked
7x7 convolution first hides every pixel from itself; then residual LSTM layers follow, each with a
masked (type-B) input-to-state convolution, in one of two variants (hyper-parameter `variant`):

- "row", Row LSTM: rows are processed top to bottom; a row's gates come from a masked 1 x k
  convolution of that row's input and a 1 x k convolution of the row above's hidden state, which
  gives a triangular receptive field. Sampling keeps the states of finished rows, so each step only
  recomputes the current row.
- "diagonal", Diagonal BiLSTM: the input is skewed so that the state at (r, c) can be computed from
  (r, c-1) and (r-1, c) with a 2 x 1 convolution along diagonals, once left-to-right and once
  right-to-left; the right-to-left output is shifted down one row (it has seen pixels to the right
  in its own row). Every pixel then sees its whole context but one pixel: the last of the row above
  is missed by the pixels further than the first convolution's reach to its left, because no
  feature ever contains its own pixel.

The output of pixel i depends only on pixels before i in raster order, exactly, in both variants.
On colour images every masked convolution also masks across the channels of a pixel (R from the
context, G also from R, B from R and G), and the LSTM units are split into channel groups the same
way; the recurrent connections read only earlier positions, which every group may see.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from components.models.autoregressive import (
    AutoregressiveImageModel,
    Conditional,
    MaskedConv2d,
    channel_conv,
    output_head,
    subpixel_params,
)
from components.models.factory import register_model

LSTMState = tuple[Tensor, Tensor]


def lstm_cell(gates: Tensor, cell: Tensor | None) -> LSTMState:
    """Hidden and cell state from the summed gate pre-activations (o, f, i, g along dim 1)."""
    out_gate, forget_gate, in_gate, candidate = gates.chunk(4, dim=1)
    new_cell = in_gate.sigmoid() * candidate.tanh()
    if cell is not None:
        new_cell = new_cell + forget_gate.sigmoid() * cell
    return out_gate.sigmoid() * new_cell.tanh(), new_cell


class RowLSTM(nn.Module):
    """One Row LSTM layer with a residual connection around it."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, image_channels: int):
        super().__init__()
        self.input_to_state = MaskedConv2d(
            channels, 4 * hidden, (1, kernel_size), "B", image_channels=image_channels, out_chunks=4
        )
        # No bias: the first row's missing state then contributes exactly what a zero state would.
        self.state_to_state = nn.Conv2d(
            hidden, 4 * hidden, (1, kernel_size), padding=(0, kernel_size // 2), bias=False
        )
        self.output = channel_conv(hidden, channels, image_channels)

    def recur(self, gates: Tensor, state: LSTMState | None) -> LSTMState:
        """State of one row (N x hidden x 1 x W) from its input gates and the row above's state."""
        if state is None:
            return lstm_cell(gates, None)
        return lstm_cell(gates + self.state_to_state(state[0]), state[1])

    def step(self, row: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        """Output and state of one row given the state of the row above."""
        state = self.recur(self.input_to_state(row), state)
        return row + self.output(state[0]), state

    def forward(self, x: Tensor) -> Tensor:
        gates = self.input_to_state(x)  # every row at once; only the recurrence is sequential
        state, rows = None, []
        for r in range(x.shape[2]):
            state = self.recur(gates[:, :, r : r + 1], state)
            rows.append(state[0])
        return x + self.output(torch.cat(rows, dim=2))


def skew(x: Tensor) -> Tensor:
    """N x C x H x W -> N x C x H x (W + H - 1), row r shifted right by r (zeros elsewhere)."""
    n, c, height, width = x.shape
    flat = F.pad(x, (0, height)).flatten(2)[:, :, : height * (width + height - 1)]
    return flat.reshape(n, c, height, width + height - 1)


def unskew(x: Tensor, width: int) -> Tensor:
    """Inverse of `skew`."""
    n, c, height, skewed_width = x.shape
    flat = F.pad(x.flatten(2), (0, height))
    return flat.reshape(n, c, height, skewed_width + 1)[:, :, :, :width]


class DiagonalBiLSTM(nn.Module):
    """One Diagonal BiLSTM layer with a residual connection around it."""

    def __init__(self, channels: int, hidden: int, image_channels: int):
        super().__init__()
        # 1x1 input-to-state for both directions (two halves of four gates each): a type-B mask, which
        # only matters across the channel groups of a colour image.
        self.input_to_state = MaskedConv2d(
            channels, 8 * hidden, 1, "B", image_channels=image_channels, out_chunks=8
        )
        self.state_to_state = nn.ModuleList(nn.Conv1d(hidden, 4 * hidden, 2, bias=False) for _ in range(2))
        self.output = channel_conv(hidden, channels, image_channels)

    @staticmethod
    def scan(gates: Tensor, state_to_state: nn.Conv1d) -> Tensor:
        """Left-to-right diagonal LSTM: the state at (r, c) reads the states at (r, c-1) and (r-1, c)."""
        width = gates.shape[3]
        skewed = skew(gates)
        state, columns = None, []
        # In the skewed map, column j-1 holds (r, c-1) in row r and (r-1, c) in row r-1.
        for j in range(skewed.shape[3]):
            column = skewed[:, :, :, j]
            if state is None:
                state = lstm_cell(column, None)
            else:
                state = lstm_cell(column + state_to_state(F.pad(state[0], (1, 0))), state[1])
            columns.append(state[0])
        return unskew(torch.stack(columns, dim=3), width)

    def forward(self, x: Tensor) -> Tensor:
        left_gates, right_gates = self.input_to_state(x).chunk(2, dim=1)
        left = self.scan(left_gates, self.state_to_state[0])
        right = self.scan(right_gates.flip(3), self.state_to_state[1]).flip(3)
        right = F.pad(right, (0, 0, 1, 0))[:, :, :-1]
        return x + self.output(left + right)


@register_model("pixelrnn")
class PixelRNN(AutoregressiveImageModel):
    row_prefix_sampling = True

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        variant: str = "row",
        channels: int = 64,
        hidden: int = 32,
        num_layers: int = 2,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        pixels: str | None = None,
        output: str = "categorical",
        levels: int = 256,
        mixture_components: int = 5,
    ):
        super().__init__(
            image_shape, pixels=pixels, output=output, levels=levels, mixture_components=mixture_components
        )
        if variant not in ("row", "diagonal"):
            raise ValueError(f"model 'pixelrnn': variant must be 'row' or 'diagonal', got {variant!r}")
        self.variant = variant
        c = self.image_shape[0]
        self.input_conv = MaskedConv2d(c, channels, first_kernel_size, "A", image_channels=c)
        self.layers = nn.ModuleList(
            RowLSTM(channels, hidden, kernel_size, c)
            if variant == "row"
            else DiagonalBiLSTM(channels, hidden, c)
            for _ in range(num_layers)
        )
        self.head = output_head(channels, c, self.params_per_dim)

    def params(self, x: Tensor) -> Tensor:
        features = self.input_conv(x)
        for layer in self.layers:
            features = layer(features)
        return subpixel_params(self.head(features), self.image_shape[0])

    def conditional_params(self, x: Tensor, generator: torch.Generator | None) -> Iterator[Conditional]:
        if self.variant != "row":
            yield from super().conditional_params(x, generator)
            return
        channels, height, width = self.image_shape
        images = x.view(len(x), *self.image_shape)
        reach = self.input_conv.kernel_size[0] // 2  # rows above that the first convolution reads
        states: list[LSTMState | None] = [None] * len(self.layers)
        for r in range(height):
            for c in range(width):
                for channel in range(channels):
                    features = self.input_conv(images[:, :, max(0, r - reach) : r + 1])[:, :, -1:]
                    row_states = []
                    for layer, state in zip(self.layers, states, strict=True):
                        features, new_state = layer.step(features, state)
                        row_states.append(new_state)
                    params = subpixel_params(self.head(features), channels)
                    yield channel * height * width + r * width + c, params[:, channel, 0, c]
            # No state of a row depends on the last sub-pixel of the row (the first mask is type A),
            # so the states computed before drawing it are final.
            states = row_states
