"""Lookup-Free Quantization (Yu et al. 2023, MAGVIT-v2, "Language Model Beats Diffusion").

Each of log2(K) channels is quantized to its sign, and the index is the integer whose bits are the
positive channels. The codebook {-1, 1}^bits is implicit; no nearest-neighbour search is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    zero_loss,
)
from .config import QuantizerConfig


def binary_entropy(probs: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(probs)."""
    probs = probs.clamp(1e-6, 1 - 1e-6)
    return -(probs * probs.log() + (1 - probs) * (1 - probs).log())


class LookupFreeQuantizer(Quantizer):
    """LFQ over log2(codebook_size) channels, with linear projections when embed_dim differs."""

    def __init__(self, config: QuantizerConfig, embed_dim: int) -> None:
        if config.kind != "lfq":
            raise ValueError(f"config.kind={config.kind!r}; LookupFreeQuantizer expects kind='lfq'")
        super().__init__(embed_dim, config.codebook_size, config.usage_window, config.dead_code_steps)
        self.config = config
        self.bits = config.codebook_size.bit_length() - 1
        self.project_in = Float32Linear(embed_dim, self.bits) if self.bits != embed_dim else nn.Identity()
        self.project_out = Float32Linear(self.bits, embed_dim) if self.bits != embed_dim else nn.Identity()
        self.register_buffer("bit_values", 2 ** torch.arange(self.bits, dtype=torch.long), persistent=False)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """(B, D, h, w) latents -> sign codes with straight-through gradient, indices, losses and stats."""
        self.check_latents(z)
        batch, _, height, width = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            latents = self.project_in(to_tokens(z))  # (N, bits)
            signs = torch.where(latents > 0, 1.0, -1.0)  # (N, bits)
            indices = ((latents > 0).long() * self.bit_values).sum(dim=1)  # (N,)
            commit_loss = self.config.commitment_weight * F.mse_loss(latents, signs)
            entropy_loss = self._entropy_loss(latents)
            quantized = self.project_out(straight_through(signs, latents))  # (N, D)
            counts = self.code_counts(indices)
            if self.training and distributed.all_finite(latents.detach()):  # a NaN step is skipped by the trainer
                self.update_usage(counts)
            stats = self.codebook_stats(counts)
        return make_output(quantized, indices, (batch, height, width), stats, commit_loss=commit_loss,
                           entropy_loss=entropy_loss)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """(B, h, w) int64 -> (B, D, h, w); equals `quantized` for the same indices in eval mode."""
        self.check_indices(indices)
        batch, height, width = indices.shape
        with torch.autocast(device_type=indices.device.type, enabled=False):
            bits = (indices.reshape(-1, 1) & self.bit_values) > 0  # (N, bits)
            signs = torch.where(bits, 1.0, -1.0)
            return from_tokens(self.project_out(signs), batch, height, width)

    def implicit_codebook(self) -> Tensor:
        """(K, bits) every sign vector in index order; materializes 2**bits rows, use with care."""
        indices = torch.arange(self.codebook_size, device=self.bit_values.device).unsqueeze(1)
        return torch.where((indices & self.bit_values) > 0, 1.0, -1.0)

    def _entropy_loss(self, latents: Tensor) -> Tensor:
        """MAGVIT-v2 entropy penalty, factorized over bits so the 2**bits codebook is never built.

        softmax(-||z - c||^2 / T) over c in {-1, 1}^bits factorizes into independent bits with
        p(bit=1) = sigmoid(4 z / T), so the per-token entropy is a sum of binary entropies. The codebook
        entropy uses the same per-bit factorization of the mean distribution (as in BSQ, Zhao et al. 2024),
        an upper bound of the exact one.
        """
        if self.config.entropy_weight == 0.0:
            return zero_loss(latents)
        bit_probs = torch.sigmoid(4.0 * latents / self.config.entropy_temperature)  # (N, bits)
        per_token_entropy = binary_entropy(bit_probs).sum(dim=1).mean()
        codebook_entropy = binary_entropy(bit_probs.mean(dim=0)).sum()
        penalty = per_token_entropy - self.config.entropy_diversity_weight * codebook_entropy
        return self.config.entropy_weight * penalty
