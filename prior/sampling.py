"""Sampling utilities shared by every prior: one logit filter, one categorical sampler, one guidance rule.

All arithmetic here runs in float32, whatever dtype the network produced, so that filtering thresholds and
guidance differences do not depend on autocast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_filter_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Validate the arguments of `filter_logits` (done once per `sample` call, not once per token)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise TypeError(f"top_k must be an int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None:
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool):
            raise TypeError(f"top_p must be a float or None, got {top_p!r}")
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p}")


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering to `logits` of shape (..., K).

    Removed entries are set to -inf; the result is float32. With `temperature != 1` each row is shifted so that its
    maximum is 0 before the division (softmax is unchanged), so a tiny temperature tends to argmax. `top_k` larger
    than K keeps everything. Top-p keeps the smallest set of most probable tokens whose probability (after top-k)
    reaches `top_p`, and always keeps the most probable token (Holtzman et al. 2020, "The Curious Case of Neural
    Text Degeneration").
    """
    check_filter_args(temperature, top_k, top_p)
    return _filter_logits(logits, temperature, top_k, top_p)


def _filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """`filter_logits` without argument checks, for the per-token sampling loops."""
    logits = logits.float()
    if temperature != 1.0:
        # Shifted so that the largest logit is 0 before dividing: a tiny temperature then tends to argmax
        # (the others underflow to -inf) instead of overflowing to +inf.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # unsorted top-k and its minimum: the same threshold as sorted top-k's last value, about 25% faster
        kth_largest = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # (..., 1)
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first is never dropped.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


Generators = torch.Generator | Sequence[torch.Generator] | None


def check_generators(generator: Generators, rows: int) -> None:
    """Validate `generator`: None, one `torch.Generator`, or a sequence of exactly `rows` of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, Sequence) or not all(isinstance(g, torch.Generator) for g in generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them (one per sample) or None, got {generator!r}")
    if len(generator) != rows:
        raise ValueError(f"a list of generators needs one per sample: got {len(generator)} for {rows} samples")


def _uniforms(rows: int, generator: Generators, device: torch.device) -> Tensor:
    """(rows, 1) uniform numbers in [0, 1): from one generator, or row i from `generator[i]`."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(rows, 1, generator=generator, device=device)
    return torch.cat([torch.rand(1, 1, generator=g, device=device) for g in generator])


def sample_from_logits(logits: Tensor, generator: Generators = None) -> Tensor:
    """Draw one token per row of `logits` (N, K) from softmax(logits); returns LongTensor (N,).

    Inverse-CDF sampling: one uniform number per row, located in the cumulative distribution. Unlike
    `torch.multinomial`, which draws K exponential variates per row, its cost is one random number per row,
    which matters when sampling one token at a time. A token of probability 0 is never returned: its CDF
    entry equals the previous one, so it is never the first entry above u * total (searchsorted, right=True).
    `generator` is one generator for all rows, or a list with one per row: row i then depends only on
    `generator[i]`, whatever the other rows are (diffusers' per-image generators).
    """
    check_generators(generator, logits.shape[0])
    return _sample_from_logits(logits, generator)


def _sample_from_logits(logits: Tensor, generator: Generators) -> Tensor:
    """`sample_from_logits` without the generator check, for the per-token sampling loops."""
    probs = logits.float().softmax(dim=-1)  # (N, K)
    cdf = probs.cumsum(dim=-1)  # (N, K)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        # NaN or +inf logits (a diverged network, an fp16 overflow): searchsorted would return K, an index
        # outside the codebook.
        bad = (~torch.isfinite(cdf[:, -1])).nonzero().flatten().tolist()
        raise ValueError(f"logits of rows {bad[:5]} contain NaN or +inf; cannot sample from them (check the prior's "
                         "weights and the guidance scale)")
    uniform = _uniforms(cdf.shape[0], generator, cdf.device)  # (N, 1) in [0, 1)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # (N, 1)
    return tokens.squeeze(-1)


def guide_logits(cond_logits: Tensor, uncond_logits: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on log-probabilities, in float32.

    `uncond + scale * (cond - uncond)`: scale 1 is the conditional distribution, 0 the unconditional one, > 1
    sharpens towards the class. Log-softmax first so that the per-row normalizers of the two branches cancel.
    """
    cond = cond_logits.float().log_softmax(dim=-1)
    uncond = uncond_logits.float().log_softmax(dim=-1)
    return uncond + guidance_scale * (cond - uncond)
