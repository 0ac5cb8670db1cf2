"""Gated PixelCNN prior over code grids (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders"), with cached raster-order sampling (Ramachandran et al. 2017, "Fast Generation for Convolutional
Autoregressive Models").

Causality comes from masked convolutions. The vertical stack sees only rows strictly above the current one
(mask A drops the centre row on the first layer, mask B keeps it afterwards, when the centre row of the
features already summarises rows above). The horizontal stack sees the current row strictly left of the
current position (A) or up to it (B), and adds the vertical stack of the same row, so the receptive field has
no blind spot. The vertical stack never reads the horizontal one, which would leak the future.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Prior
from .configuration import PixelCNNConfig

MaskType = Literal["A", "B"]


def causal_mask(kernel_size: int, stack: Literal["vertical", "horizontal"], mask_type: MaskType) -> Tensor:
    """0/1 kernel mask: vertical (k, k) keeps rows above the centre (+ the centre row for B); horizontal
    (1, k) keeps columns left of the centre (+ the centre for B)."""
    centre = kernel_size // 2
    kept = centre + (mask_type == "B")
    if stack == "vertical":
        mask = torch.zeros(kernel_size, kernel_size)
        mask[:kept, :] = 1.0
    else:
        mask = torch.zeros(1, kernel_size)
        mask[:, :kept] = 1.0
    return mask


class MaskedConv2d(nn.Conv2d):
    """Same-padded convolution whose weight is multiplied by a fixed 0/1 mask at every call.

    The mask is a non-persistent buffer, so checkpoints hold plain weights and the weights are never mutated
    (masking in place would be undone by any optimizer step or weight load).
    """

    def __init__(self, in_channels: int, out_channels: int, mask: Tensor) -> None:
        kernel_height, kernel_width = mask.shape
        super().__init__(
            in_channels, out_channels, (kernel_height, kernel_width), padding=(kernel_height // 2, kernel_width // 2)
        )
        self.register_buffer("mask", mask[None, None].clone(), persistent=False)  # (1, 1, kh, kw)
        # Masks keep a leading block of rows (vertical) or columns (horizontal): the taps the cache needs.
        self.active_rows = int(mask.any(dim=1).sum())
        self.active_cols = int(mask.any(dim=0).sum())

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def active_weight(self) -> Tensor:
        """Masked weight cropped to its non-zero taps: (out, in, active_rows, active_cols)."""
        return (self.weight * self.mask)[:, :, : self.active_rows, : self.active_cols]


def gate(pre_activation: Tensor, dim: int = 1) -> Tensor:
    """Gated activation tanh(a) * sigmoid(b) over the two halves of `dim` (van den Oord et al. 2016, eq. 2)."""
    filter_part, gate_part = pre_activation.chunk(2, dim=dim)
    return torch.tanh(filter_part) * torch.sigmoid(gate_part)


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1x1 convolution applied to feature vectors (..., C_in) -> (..., C_out), as one matmul."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class GatedLayer(nn.Module):
    """One gated layer: vertical and horizontal masked convs, v->h link, gate, skip and (B only) residual."""

    def __init__(self, channels: int, kernel_size: int, mask_type: MaskType, num_class_embeddings: int) -> None:
        super().__init__()
        self.mask_type = mask_type
        self.vertical_conv = MaskedConv2d(channels, 2 * channels, causal_mask(kernel_size, "vertical", mask_type))
        self.horizontal_conv = MaskedConv2d(
            channels, 2 * channels, causal_mask(kernel_size, "horizontal", mask_type)
        )
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)
        self.skip = nn.Conv2d(channels, channels, 1)
        # Class-conditional biases of both stacks' gates (paper eq. 4, with a one-hot h = class embedding).
        self.class_bias = nn.Embedding(num_class_embeddings, 4 * channels) if num_class_embeddings else None

    def biases(self, class_ids: Tensor | None) -> tuple[Tensor | float, Tensor | float]:
        """Per-sample gate biases (N, 2C) of the vertical and horizontal stacks (0 when unconditional)."""
        if self.class_bias is None or class_ids is None:
            return 0.0, 0.0
        vertical_bias, horizontal_bias = self.class_bias(class_ids).chunk(2, dim=-1)  # (N, 2C) each
        return vertical_bias, horizontal_bias

    def forward(
        self, vertical: Tensor, horizontal: Tensor, class_ids: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(vertical, horizontal, skip) features (N, C, h, w) of the next layer."""
        vertical_bias, horizontal_bias = self.biases(class_ids)
        vertical_pre = self.vertical_conv(vertical)  # (N, 2C, h, w)
        horizontal_pre = self.horizontal_conv(horizontal) + self.vertical_to_horizontal(vertical_pre)
        vertical_out = gate(vertical_pre + _as_map(vertical_bias))
        gated = gate(horizontal_pre + _as_map(horizontal_bias))  # (N, C, h, w)
        horizontal_out = self.horizontal_out(gated)
        if self.mask_type == "B":  # the first layer sees the current token as input: no residual from it
            horizontal_out = horizontal_out + horizontal
        return vertical_out, horizontal_out, self.skip(gated)


def _as_map(bias: Tensor | float) -> Tensor | float:
    return bias[:, :, None, None] if isinstance(bias, Tensor) else bias


class PixelCNNPrior(Prior):
    """Gated PixelCNN over embedded codes; class-conditional through per-layer gate biases."""

    prior_type = "pixelcnn"
    config_class = PixelCNNConfig

    def __init__(self, config: PixelCNNConfig) -> None:
        super().__init__(config)
        channels = config.hidden_channels
        num_class_embeddings = config.num_classes + 1 if config.num_classes else 0  # + the null class
        self.code_embedding = nn.Embedding(config.codebook_size, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, config.kernel_size, "A" if index == 0 else "B", num_class_embeddings)
            for index in range(config.num_layers)
        )
        self.output_hidden = nn.Conv2d(channels, config.output_channels, 1)
        self.output_logits = nn.Conv2d(config.output_channels, config.codebook_size, 1)

    def _head(self, skip_sum: Tensor) -> Tensor:
        return self.output_logits(F.relu(self.output_hidden(F.relu(skip_sum))))

    def _logits(self, inputs: Tensor, class_ids: Tensor | None) -> Tensor:
        features = self.code_embedding(inputs).permute(0, 3, 1, 2)  # (B, C, h, w)
        vertical, horizontal, skip_sum = features, features, 0.0
        for layer in self.layers:
            vertical, horizontal, skip = layer(vertical, horizontal, class_ids)
            skip_sum = skip_sum + skip
        return self._head(skip_sum).permute(0, 2, 3, 1)  # (B, h, w, K)

    def _logit_stream(
        self, class_ids: Tensor | None, batch_size: int, use_cache: bool
    ) -> Generator[Tensor, Tensor, None]:
        if use_cache:
            return self._cached_stream(class_ids, batch_size)
        return self._naive_stream(class_ids, batch_size)

    def _naive_stream(self, class_ids: Tensor | None, batch_size: int) -> Generator[Tensor, Tensor, None]:
        """Reference: one full forward pass over the whole grid per position."""
        height, width = self.config.grid_shape
        grid = torch.zeros(batch_size, height, width, dtype=torch.long, device=self._device())
        for position in range(height * width):
            row, col = divmod(position, width)
            token = yield self._logits(grid, class_ids)[:, row, col]  # (N, K)
            grid[:, row, col] = token

    def _cached_stream(self, class_ids: Tensor | None, batch_size: int) -> Generator[Tensor, Tensor, None]:
        """Raster sampling that computes each layer once per row (vertical) and once per position (horizontal).

        Following Ramachandran et al. (2017), every layer keeps the activations it has produced: the vertical
        stack of row i needs only its inputs on rows i - k//2 .. i, the horizontal stack at (i, j) only row i
        up to column j. Each step crops those inputs and applies the layer's active (unmasked) taps, which is
        the masked convolution evaluated at the new positions only.
        """
        config = self.config
        height, width = config.grid_shape
        channels, pad = config.hidden_channels, config.kernel_size // 2
        device, dtype = self._device(), self.code_embedding.weight.dtype
        num_layers = len(self.layers)
        # vertical_inputs[l]: input of layer l's vertical conv, zero-padded by `pad` rows on top and `pad`
        # columns on both sides; vertical_inputs[0] is the code embedding grid.
        vertical_inputs = [
            torch.zeros(batch_size, channels, height + pad, width + 2 * pad, device=device, dtype=dtype)
            for _ in range(num_layers)
        ]
        # horizontal_inputs[l]: input of layer l's horizontal conv on the current row, (N, W + pad, C),
        # zero-padded by `pad` columns on the left; entries right of the current column are never read.
        horizontal_inputs = [
            torch.zeros(batch_size, width + pad, channels, device=device, dtype=dtype) for _ in range(num_layers)
        ]
        biases = [layer.biases(class_ids) for layer in self.layers]
        vertical_weights = [layer.vertical_conv.active_weight() for layer in self.layers]
        horizontal_weights = [  # (2C, C, 1, cols) -> (2C, cols * C), matching windows flattened as (cols, C)
            layer.horizontal_conv.active_weight().squeeze(2).permute(0, 2, 1).flatten(1) for layer in self.layers
        ]
        for row in range(height):
            vertical_links = self._vertical_row(row, vertical_inputs, vertical_weights, biases)
            for col in range(width):
                token = yield self._horizontal_position(
                    col, horizontal_inputs, horizontal_weights, vertical_links, biases
                )
                embedded = self.code_embedding(token)  # (N, C)
                horizontal_inputs[0][:, col + pad] = embedded
                vertical_inputs[0][:, :, row + pad, col + pad] = embedded

    def _horizontal_position(
        self,
        col: int,
        horizontal_inputs: list[Tensor],
        horizontal_weights: list[Tensor],
        vertical_links: list[Tensor],
        biases: list[tuple[Tensor | float, Tensor | float]],
    ) -> Tensor:
        """Run the horizontal stack and the head at one column of the current row; returns logits (N, K)."""
        pad = self.config.kernel_size // 2
        skip_sum = 0.0
        for index, layer in enumerate(self.layers):
            window = horizontal_inputs[index][:, col : col + layer.horizontal_conv.active_cols]  # (N, cols, C)
            pre = F.linear(window.flatten(1), horizontal_weights[index], layer.horizontal_conv.bias)  # (N, 2C)
            gated = gate(pre + vertical_links[index][:, :, col] + biases[index][1], dim=-1)  # (N, C)
            horizontal_out = pointwise(layer.horizontal_out, gated)
            if layer.mask_type == "B":
                horizontal_out = horizontal_out + horizontal_inputs[index][:, col + pad]
            if index + 1 < len(self.layers):
                horizontal_inputs[index + 1][:, col + pad] = horizontal_out
            skip_sum = skip_sum + pointwise(layer.skip, gated)
        hidden = F.relu(pointwise(self.output_hidden, F.relu(skip_sum)))
        return pointwise(self.output_logits, hidden)  # (N, K)

    def _vertical_row(
        self,
        row: int,
        vertical_inputs: list[Tensor],
        vertical_weights: list[Tensor],
        biases: list[tuple[Tensor | float, Tensor | float]],
    ) -> list[Tensor]:
        """Run the vertical stack on one row; returns each layer's v->h link (N, 2C, W) for that row."""
        pad = self.config.kernel_size // 2
        links = []
        for index, layer in enumerate(self.layers):
            rows = layer.vertical_conv.active_rows  # input rows row - pad .. row - pad + rows - 1
            crop = vertical_inputs[index][:, :, row : row + rows]  # (N, C, rows, W + 2 pad)
            pre = F.conv2d(crop, vertical_weights[index], layer.vertical_conv.bias).squeeze(2)  # (N, 2C, W)
            links.append(pointwise(layer.vertical_to_horizontal, pre.transpose(1, 2)).transpose(1, 2))
            if index + 1 < len(self.layers):
                vertical_bias = biases[index][0]
                vertical_bias = vertical_bias[:, :, None] if isinstance(vertical_bias, Tensor) else vertical_bias
                vertical_inputs[index + 1][:, :, row + pad, pad:-pad] = gate(pre + vertical_bias)
        return links
