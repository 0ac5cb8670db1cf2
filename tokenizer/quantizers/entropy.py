"""Entropy penalty of a vector quantizer's soft assignments, computed in token chunks.

penalty = mean_i H(p_i) - diversity * H(mean_i p_i), with p_i = softmax(l_i) over the K codes and
l_ik = (2 z_i . e_k - ||e_k||^2) / T, i.e. softmax(-||z_i - e_k||^2 / T) (||z_i||^2 cancels in the softmax).
Low per-token entropy asks for confident assignments, high entropy of the batch-average assignment asks for
uniform use of the codebook (MaskGIT / MAGVIT-v2's entropy loss, Yu et al. 2023).

A plain autograd graph of this expression keeps several (N, K) tensors alive for the backward pass, 2.6 GiB
at N = 2048, K = 65536. `entropy_penalty` makes two passes over chunks of tokens instead and recomputes each
chunk's logits in the backward pass, so memory stays at a few (chunk, K) blocks for any K, and every
elementwise pass runs on a block that fits the CPU's caches. With logits l, softmax p, log-sum-exp s,
per-token entropies H_i = s_i - sum_k p_ik l_ik and average assignment m = mean_i p_i, the gradient of
penalty with respect to l is

    dP/dl_ik = (1/n) p_ik (diversity * log m_k - l_ik + c_i),   c_i = s_i - H_i - diversity * sum_j p_ij log m_j

(derived in the module's tests against autograd). Exponentials are taken of logits clamped to 60 below the
row maximum, so probabilities under 1e-26 of the largest one are rounded up to that floor: their effect on
the penalty and its gradient is far below float32 resolution, while exponentials and products in the
denormal range (reached at temperature 0.01) cost several times normal arithmetic on x86.
"""

from __future__ import annotations

import torch
from torch import Tensor

EXP_FLOOR = -60.0  # exp(-60) ~ 9e-27: products with it stay clear of float32's denormals (< 1.2e-38)
BLOCK_ELEMENTS = 1 << 21  # (chunk, K) blocks of 8 MiB: fastest on the benchmark CPU at K = 1024..65536


def _logits(latents: Tensor, codebook: Tensor, code_sq_norms: Tensor, temperature: float) -> Tensor:
    """(c, d), (K, d) -> (c, K) logits (2 z.e - ||e||^2) / T, one addmm."""
    return torch.addmm(code_sq_norms, latents, codebook.t(), beta=-1.0 / temperature, alpha=2.0 / temperature)


def _softmax_parts(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (c, K) and log-sum-exp (c,) of `logits`, clamping exponents at EXP_FLOOR."""
    row_max = logits.amax(dim=1, keepdim=True)  # (c, 1)
    probs = (logits - row_max).clamp_(min=EXP_FLOOR).exp_()  # (c, K), unnormalized
    total = probs.sum(dim=1, keepdim=True)  # (c, 1)
    probs.div_(total)
    return probs, (row_max + total.log()).squeeze(1)


class _EntropyPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents: Tensor, codebook: Tensor, temperature: float, diversity: float,
                chunk_size: int) -> Tensor:
        code_sq_norms = codebook.pow(2).sum(dim=1)  # (K,)
        token_entropy = latents.new_zeros(())
        assignment_sum = latents.new_zeros(codebook.shape[0])  # (K,)
        for start in range(0, latents.shape[0], chunk_size):
            logits = _logits(latents[start : start + chunk_size], codebook, code_sq_norms, temperature)
            probs, log_sum_exp = _softmax_parts(logits)
            token_entropy += (log_sum_exp - (probs * logits).sum(dim=1)).sum()
            assignment_sum += probs.sum(dim=0)
        count = latents.shape[0]
        mean_assignment = assignment_sum / count  # (K,)
        log_mean = mean_assignment.clamp_min(1e-30).log()
        codebook_entropy = -(mean_assignment * log_mean).sum()
        ctx.save_for_backward(latents, codebook, log_mean)
        ctx.temperature, ctx.diversity, ctx.chunk_size = temperature, diversity, chunk_size
        return token_entropy / count - diversity * codebook_entropy

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        latents, codebook, log_mean = ctx.saved_tensors
        temperature, diversity, chunk_size = ctx.temperature, ctx.diversity, ctx.chunk_size
        code_sq_norms = codebook.pow(2).sum(dim=1)  # (K,)
        scaled_log_mean = diversity * log_mean  # (K,)
        scale = grad_output / latents.shape[0]
        grad_latents = torch.empty_like(latents) if ctx.needs_input_grad[0] else None
        grad_codebook = torch.zeros_like(codebook) if ctx.needs_input_grad[1] else None
        weight_sum = codebook.new_zeros(codebook.shape[0]) if ctx.needs_input_grad[1] else None  # (K,)
        for start in range(0, latents.shape[0], chunk_size):
            chunk = latents[start : start + chunk_size]  # (c, d)
            logits = _logits(chunk, codebook, code_sq_norms, temperature)
            probs, log_sum_exp = _softmax_parts(logits)
            token_entropy = log_sum_exp - (probs * logits).sum(dim=1)  # (c,)
            offset = log_sum_exp - token_entropy - probs @ scaled_log_mean  # (c,)
            # dP/dl = scale * p * (diversity log m - l + c), reusing the logits' storage
            grad_logits = logits.neg_().add_(scaled_log_mean).add_(offset[:, None]).mul_(probs).mul_(scale)
            # l = (2 z.e - ||e||^2) / T: dl/dz_i = 2 e_k / T, dl/de_k = 2 (z_i - e_k) / T
            if grad_latents is not None:
                grad_latents[start : start + chunk_size] = grad_logits @ codebook * (2.0 / temperature)
            if grad_codebook is not None:
                grad_codebook.addmm_(grad_logits.t(), chunk, alpha=2.0 / temperature)
                weight_sum += grad_logits.sum(dim=0)
        if grad_codebook is not None:
            grad_codebook.sub_(codebook * weight_sum[:, None] * (2.0 / temperature))
        return grad_latents, grad_codebook, None, None, None


def entropy_penalty(latents: Tensor, codebook: Tensor, *, temperature: float, diversity: float,
                    chunk_size: int | None = None) -> Tensor:
    """Mean per-token entropy minus `diversity` x entropy of the mean assignment, over (N, d) latents and a
    (K, d) codebook (float32); differentiable with respect to both, memory O(chunk_size x K). The default
    chunk holds BLOCK_ELEMENTS logits."""
    if latents.dim() != 2 or codebook.dim() != 2 or latents.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"latents (N, d) and codebook (K, d) must share d, got shapes {tuple(latents.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    if chunk_size is None:
        chunk_size = max(1, BLOCK_ELEMENTS // codebook.shape[0])
    return _EntropyPenalty.apply(latents, codebook, float(temperature), float(diversity), int(chunk_size))
