"""Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of a few channels is bounded and rounded to one of L_i levels; the index is the mixed-radix number
formed by the per-channel levels. The codebook (prod L_i points of a grid) is implicit: there is nothing
to learn, collapse or restart, and no auxiliary loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import distributed
from .base import (
    Float32Linear,
    Quantizer,
    QuantizerOutput,
    from_tokens,
    make_output,
    straight_through,
    to_tokens,
)
from .config import QuantizerConfig


class FiniteScalarQuantizer(Quantizer):
    """FSQ over `len(levels)` channels, with linear projections when embed_dim differs."""

    def __init__(self, config: QuantizerConfig, embed_dim: int) -> None:
        if config.kind != "fsq":
            raise ValueError(f"config.kind={config.kind!r}; FiniteScalarQuantizer expects kind='fsq'")
        levels = config.resolved_fsq_levels
        super().__init__(embed_dim, config.num_codes, config.usage_window, config.dead_code_steps)
        self.config = config
        self.levels = levels
        channels = len(levels)
        self.project_in = Float32Linear(embed_dim, channels) if channels != embed_dim else nn.Identity()
        self.project_out = Float32Linear(channels, embed_dim) if channels != embed_dim else nn.Identity()
        levels_tensor = torch.tensor(levels, dtype=torch.long)
        # Mixed-radix place values: index = sum_i digit_i * prod_{j<i} L_j.
        basis = torch.cumprod(torch.tensor((1,) + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("levels_tensor", levels_tensor, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    @property
    def half_width(self) -> Tensor:
        """(C,) float32 L // 2 per channel, from the integer levels (a float buffer would be rounded by .to(bf16))."""
        return (self.levels_tensor // 2).float()

    @property
    def highest(self) -> Tensor:
        """(C,) the highest rounded value: a channel with L levels takes -(L // 2) .. (L - 1) // 2, exactly L."""
        return ((self.levels_tensor - 1) // 2).float()

    def bound(self, latents: Tensor) -> Tensor:
        """Squash each channel into (-L/2, L/2), shifted for even L so rounding yields exactly L values."""
        levels = self.levels_tensor.float()
        half_levels = (levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels_tensor % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_levels)
        return torch.tanh(latents + shift) * half_levels - offset

    def forward(self, z: Tensor) -> QuantizerOutput:
        """(B, D, h, w) latents -> grid codes with straight-through rounding, indices and stats."""
        self.check_latents(z)
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            bounded = self.bound(self.project_in(to_tokens(z)))  # (N, C)
            # The bound's slack (1e-3) lets rounding reach one value past either end once L > 1000: clamp.
            grid = torch.clamp(bounded.round(), -self.half_width, self.highest)
            rounded = straight_through(grid, bounded)  # (N, C) integers in [-(L // 2), (L - 1) // 2]
            codes = rounded / self.half_width  # (N, C) in [-1, 1]
            # NaN latents (an overflowed step the trainer will skip) give index 0 instead of an invalid one
            indices = self._digits_to_indices(torch.nan_to_num(rounded.detach(), nan=0.0))  # (N,)
            quantized = self.project_out(codes)  # (N, D)
            counts = self.code_counts(indices)
            if self.training and distributed.all_finite(bounded.detach()):
                self.update_usage(counts)
            stats = self.codebook_stats(counts)
        return make_output(quantized, indices, (batch, height, width), stats)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, D, h, w); equals `quantized` for the same indices in eval mode."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with torch.autocast(device_type=indices.device.type, enabled=False):
            digits = (indices.reshape(-1, 1) // self.basis) % self.levels_tensor  # (N, C)
            codes = (digits.float() - self.half_width) / self.half_width  # (N, C)
            return from_tokens(self.project_out(codes), batch, height, width)

    def implicit_codebook(self) -> Tensor:
        """(K, C) every grid point in index order; materializes prod(levels) rows, use with care."""
        indices = torch.arange(self.codebook_size, device=self.basis.device)
        digits = (indices.unsqueeze(1) // self.basis) % self.levels_tensor  # (K, C)
        return (digits.float() - self.half_width) / self.half_width

    def _digits_to_indices(self, rounded: Tensor) -> Tensor:
        digits = (rounded + self.half_width).long()  # (N, C) in [0, L)
        return (digits * self.basis).sum(dim=1)  # (N,)
