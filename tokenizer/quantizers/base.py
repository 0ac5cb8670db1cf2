"""Shared pieces of every quantizer: output dataclasses, the base class and codebook-usage tracking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed


@dataclass
class CodebookStats:
    """Codebook health, reported by every forward pass.

    perplexity: exp(entropy of this batch's code histogram); equals the codebook size when uniform.
    usage: fraction of codes used within the last `usage_window` training steps (plus this batch).
    dead_codes: number of codes unused for `dead_code_steps` steps (the ones restarted this step), or
        unused within the window when restarts are off.
    """

    perplexity: Tensor
    usage: Tensor
    dead_codes: Tensor


@dataclass
class QuantizerOutput:
    """Result of `Quantizer.forward`; `loss` is the sum of the three auxiliary loss terms."""

    quantized: Tensor  # (B, D, h, w) codes with a straight-through gradient to z
    indices: Tensor  # (B, h, w) int64
    loss: Tensor
    commit_loss: Tensor  # commitment_weight * ||z - sg[e]||^2
    codebook_loss: Tensor  # codebook_weight * ||sg[z] - e||^2, zero under EMA updates
    entropy_loss: Tensor
    stats: CodebookStats


def straight_through(value: Tensor, source: Tensor) -> Tensor:
    """Forward value `value` exactly, gradient to `source` as identity (Bengio et al. 2013)."""
    # `source - source.detach()` is exactly zero, so the forward value is bit-identical to `value`.
    return value.detach() + (source - source.detach())


def rotation_trick(value: Tensor, source: Tensor, eps: float = 1e-12) -> Tensor:
    """Forward value `value` (N, d) exactly; gradient to `source` (N, d) through the rotation and rescaling
    that map each source vector onto its value, held constant (Fifty et al. 2024, "Restructuring Vector
    Quantization with the Rotation Trick", eq. 4.2).

    With u = z/||z||, e = q/||q||, w = (u + e)/||u + e||: R = I - 2 w w^T + 2 e u^T and R u = e, so
    (||q|| / ||z||) R z = q. Unlike the identity of the straight-through estimator, the gradient reaching z
    keeps the angle between the loss gradient and the code, so latents in the same code cell receive
    different updates.
    """
    value = value.detach()
    source_norm = source.detach().norm(dim=1, keepdim=True).clamp_min(eps)  # (N, 1)
    value_norm = value.norm(dim=1, keepdim=True).clamp_min(eps)
    u, e = source.detach() / source_norm, value / value_norm  # (N, d)
    w = torch.nn.functional.normalize(u + e, dim=1)
    rotated = source - 2.0 * w * (source * w).sum(1, keepdim=True) + 2.0 * e * (source * u).sum(1, keepdim=True)
    rotated = rotated * (value_norm / source_norm)
    return value + (rotated - rotated.detach())  # forward value bit-identical to `value`


class Float32Linear(nn.Linear):
    """`nn.Linear` computed in float32 even when the module was cast to another dtype (`tokenizer.to(bf16)`):
    the quantizers' lookups and projections run in float32 by design. Same parameters and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def to_tokens(z: Tensor) -> Tensor:
    """(B, D, h, w) -> (B*h*w, D) float32, one row per spatial position."""
    if z.dim() != 4:
        raise ValueError(f"z must have shape (B, D, h, w), got shape {tuple(z.shape)}")
    return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)


def make_output(tokens: Tensor, indices: Tensor, grid: tuple[int, int, int], stats: CodebookStats, *,
                commit_loss: Tensor | None = None, codebook_loss: Tensor | None = None,
                entropy_loss: Tensor | None = None) -> QuantizerOutput:
    """Assemble a `QuantizerOutput` from (N, D) codes and (N,) indices on a (B, h, w) grid.

    Absent loss terms are float32 zeros; `loss` is always the sum of the three.
    """
    zero = zero_loss(tokens)
    terms = [zero if term is None else term for term in (commit_loss, codebook_loss, entropy_loss)]
    return QuantizerOutput(
        quantized=from_tokens(tokens, *grid),
        indices=indices.reshape(grid),
        loss=terms[0] + terms[1] + terms[2],
        commit_loss=terms[0],
        codebook_loss=terms[1],
        entropy_loss=terms[2],
        stats=stats,
    )


def from_tokens(tokens: Tensor, batch: int, height: int, width: int) -> Tensor:
    """(B*h*w, D) -> (B, D, h, w), a channels-last view: no copy here nor in its backward."""
    return tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2)  # (B, D, h, w)


class Quantizer(nn.Module):
    """Base class: maps (B, D, h, w) latents to codes and int64 indices, and tracks codebook usage.

    Subclasses implement `forward` and `indices_to_codes`. Usage counters live in persistent buffers
    so that a resumed run reports (and restarts) exactly as an uninterrupted one.
    """

    def __init__(self, embed_dim: int, codebook_size: int, usage_window: int, dead_code_steps: int) -> None:
        super().__init__()
        if not isinstance(embed_dim, int) or isinstance(embed_dim, bool) or embed_dim <= 0:
            raise ValueError(f"embed_dim={embed_dim!r} must be a positive int")
        self.embed_dim = embed_dim
        self._codebook_size = codebook_size
        self.usage_window = usage_window
        self.dead_code_steps = dead_code_steps
        # Training steps seen; step numbers start at 1 so that last_used == 0 means "never used".
        self.register_buffer("usage_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))  # (K,)
        # Step of the last use or (re)seeding: the clock of dead-code restarts.
        self.register_buffer("last_active", torch.zeros(codebook_size, dtype=torch.long))  # (K,)

    @property
    def codebook_size(self) -> int:
        """Number of distinct indices the quantizer can emit."""
        return self._codebook_size

    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def indices_to_codes(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        """(B, h, w) int64 indices -> (B, D, h, w) codes, equal to `quantized` in eval mode."""
        raise NotImplementedError

    def check_indices(self, indices: Tensor) -> None:
        """Raise a clear error for indices of the wrong dtype, rank or range."""
        if indices.dtype != torch.long or indices.dim() != 3:
            raise ValueError(
                f"indices must be an int64 tensor of shape (B, h, w), got dtype {indices.dtype} "
                f"and shape {tuple(indices.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )

    def check_latents(self, z: Tensor) -> None:
        """Raise a clear error for latents that are not (B, embed_dim, h, w) floats."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim or not z.is_floating_point():
            raise ValueError(
                f"z must be a float tensor of shape (B, {self.embed_dim}, h, w), got dtype {z.dtype} "
                f"and shape {tuple(z.shape)}"
            )

    def code_counts(self, indices: Tensor) -> Tensor:
        """(N,) indices -> (K,) float32 histogram, summed over processes while training."""
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
        if self.training:
            # Summed so that every process sees the same usage and restarts the same codes.
            distributed.all_reduce_sum_(counts)
        return counts

    def update_usage(self, counts: Tensor) -> None:
        """Advance the step counter and stamp the codes used in this step (training only)."""
        self.usage_step += 1
        used = counts > 0
        self.last_used[used] = self.usage_step
        self.last_active[used] = self.usage_step

    def find_dead_codes(self) -> Tensor:
        """(K,) bool: codes neither used nor re-seeded for `dead_code_steps` steps."""
        return self.usage_step - self.last_active >= self.dead_code_steps

    def codebook_stats(self, counts: Tensor, restarted: int | None = None) -> CodebookStats:
        """Stats from this batch's histogram and the usage buffers; never modifies state."""
        probs = counts / counts.sum().clamp_min(1.0)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        recent = (self.last_used > 0) & (self.usage_step - self.last_used < self.usage_window)
        recent = recent | (counts > 0)
        if restarted is not None:
            dead = torch.tensor(restarted, device=counts.device)
        else:
            dead = (~recent).sum()
        return CodebookStats(perplexity=entropy.exp(), usage=recent.float().mean(), dead_codes=dead)


def zero_loss(reference: Tensor) -> Tensor:
    """A float32 scalar zero on the device of `reference`."""
    return reference.new_zeros((), dtype=torch.float32)
