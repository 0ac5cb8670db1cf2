"""Configuration of the codebook quantizers: one typed dataclass that round-trips through JSON."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config_fields import check_field_types, dataclass_from_dict

QUANTIZER_KINDS = ("vq", "fsq", "lfq")
SEARCH_DTYPES = ("float32", "bfloat16")
GRADIENT_ESTIMATORS = ("straight_through", "rotation")
KMEANS_SEEDINGS = ("kmeans++", "random")
RESTART_SOURCES = ("random", "worst")

# Recommended FSQ levels per codebook size, from Table 1 of Mentzer et al. 2023 ("Finite Scalar
# Quantization: VQ-VAE Made Simple"). The product of the levels is close to, not equal to, the size.
FSQ_RECOMMENDED_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5),
    2**10: (8, 5, 5, 5),
    2**12: (7, 5, 5, 5, 5),
    2**14: (8, 8, 8, 6, 5),
    2**16: (8, 8, 8, 5, 5, 5),
}


@dataclass
class QuantizerConfig:
    """Every option of the vqstack quantizers; the defaults are the tuned VQ configuration.

    The defaults (EMA codebook, k-means init, dead-code restarts, an 8-d cosine lookup space and a light
    entropy penalty) keep a 1024-code codebook >= 99% used with held-out perplexity >= 700 after 400 steps
    in the utilization part of `scripts/benchmarks/bench_quantizers.py`; without the entropy penalty the
    same setup reached 99.0% / 509. Options that do not apply to a kind are ignored.
    """

    kind: str = "vq"  # "vq" (nearest code), "fsq" (finite scalar), "lfq" (lookup-free, sign per channel)
    # vq: number of codes. fsq: must equal prod(fsq_levels), or pick the paper's levels when fsq_levels is
    # None (then it must be a key of FSQ_RECOMMENDED_LEVELS). lfq: must be a power of 2.
    codebook_size: int = 1024
    # vq: lookup space; z (embed_dim) is projected to it and back (ViT-VQGAN, Yu et al. 2021; LlamaGen
    # uses 8). Low dimensions raise codebook usage and shrink the search. None = embed_dim. Ignored by fsq (len(fsq_levels) channels)
    # and lfq (log2(codebook_size) channels).
    codebook_dim: int | None = 8
    commitment_weight: float = 0.25  # beta on ||z - sg[e]||^2 (van den Oord et al. 2017, eq. 3)
    codebook_weight: float = 1.0  # weight on ||sg[z] - e||^2; unused when the codebook is updated by EMA
    use_ema: bool = True  # codebook follows EMA of assigned vectors (van den Oord et al. 2017 app. A.1)
    ema_decay: float = 0.99  # gamma of the EMA; 0.99 as in Razavi et al. 2019 (VQ-VAE-2)
    ema_epsilon: float = 1e-5  # Laplace smoothing of EMA cluster sizes, avoids division by zero
    normalize_codes: bool = True  # l2-normalized codes and latents, cosine lookup (ViT-VQGAN)
    kmeans_init: bool = True  # initialize the codebook by k-means on the first training batch
    kmeans_iters: int = 10  # Lloyd iterations of that k-means
    kmeans_seeding: str = "kmeans++"  # "kmeans++" (Arthur & Vassilvitskii 2007) or "random" samples
    # Restart codes unused for this many training steps from random encoder outputs (Dhariwal et al.
    # 2020, Jukebox; Zeghidour et al. 2021, SoundStream). 0 disables restarts.
    dead_code_steps: int = 8
    # Which latents of the batch restarted codes move to: "random" ones (Jukebox), or "worst": those farthest
    # from their nearest code, so that each restart covers a latent the codebook fits badly (in the spirit of
    # CVQ-VAE's anchors, Zheng & Vedaldi 2023). Screening of the training benchmark (small-f4, seeds 0-3): held-out
    # usage 98.9-99.3% (random: 98.5-99.2%), PSNR -0.31 to +0.18 dB; not the default.
    dead_code_restart: str = "random"
    usage_window: int = 100  # training steps over which `CodebookStats.usage` counts a code as used
    # Entropy penalty (MaskGIT / MAGVIT-v2): weight * (mean per-token entropy - diversity * codebook
    # entropy) over softmax(-distance / temperature). 0 disables it. Benchmark sweep (held-out perplexity
    # of 1024 codes): 0.03 -> 694, 0.05 -> 751, 0.07 -> 789, 0.1 -> 828, at a small PSNR cost.
    entropy_weight: float = 0.07
    entropy_temperature: float = 0.01
    entropy_diversity_weight: float = 1.0
    entropy_max_tokens: int = 2048  # vq: estimate the entropies on at most this many random tokens per step
    fsq_levels: tuple[int, ...] | None = None  # fsq: levels per channel, e.g. (8, 5, 5, 5)
    search_chunk_size: int = 4096  # codes per distance-matmul chunk; bounds search memory at N x chunk
    # "bfloat16": a bf16 matmul shortlists `search_candidates` codes per token, re-ranked exactly in
    # float32 (several times faster on CPUs with AMX and on GPUs). "float32": one exact pass.
    search_dtype: str = "float32"
    search_candidates: int = 8
    # vq: how the decoder's gradient reaches the encoder through the codes: "straight_through" copies it
    # (Bengio et al. 2013; VQ-VAE), "rotation" rotates it with the code (Fifty et al. 2024).
    gradient_estimator: str = "straight_through"
    seed: int = 0  # seed of the generator for k-means seeding and restart samples

    def __post_init__(self) -> None:
        if isinstance(self.fsq_levels, list):
            self.fsq_levels = tuple(self.fsq_levels)
        check_field_types(self)
        _floats_as_float(self)
        if self.kind not in QUANTIZER_KINDS:
            raise ValueError(f"kind={self.kind!r} is not supported; expected one of {QUANTIZER_KINDS}")
        _check_choice(self, "search_dtype", SEARCH_DTYPES)
        _check_choice(self, "gradient_estimator", GRADIENT_ESTIMATORS)
        _check_choice(self, "dead_code_restart", RESTART_SOURCES)
        _check_choice(self, "kmeans_seeding", KMEANS_SEEDINGS)
        _check_positive(self, "codebook_size", "kmeans_iters", "usage_window", "search_chunk_size",
                        "search_candidates", "entropy_temperature", "ema_epsilon", "entropy_max_tokens")
        _check_non_negative(self, "commitment_weight", "codebook_weight", "entropy_weight",
                            "entropy_diversity_weight", "dead_code_steps")
        if self.codebook_dim is not None and self.codebook_dim <= 0:
            raise ValueError(f"codebook_dim={self.codebook_dim} must be a positive int or None")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must lie in [0, 2**32)")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must lie strictly between 0 and 1")
        if self.kind == "fsq":
            self._check_fsq()
        if self.kind == "lfq":
            self._check_lfq()

    def _check_fsq(self) -> None:
        if self.fsq_levels is None:
            if self.codebook_size not in FSQ_RECOMMENDED_LEVELS:
                raise ValueError(
                    f"codebook_size={self.codebook_size} has no recommended FSQ levels; set fsq_levels or "
                    f"use a codebook_size in {sorted(FSQ_RECOMMENDED_LEVELS)}"
                )
            return
        if len(self.fsq_levels) == 0 or any(level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels={self.fsq_levels} must be a non-empty sequence of ints >= 2")
        if math.prod(self.fsq_levels) != self.codebook_size:
            raise ValueError(
                f"codebook_size={self.codebook_size} must equal prod(fsq_levels)="
                f"{math.prod(self.fsq_levels)} for kind='fsq'"
            )

    def _check_lfq(self) -> None:
        bits = self.codebook_size.bit_length() - 1
        if 2**bits != self.codebook_size:
            raise ValueError(f"codebook_size={self.codebook_size} must be a power of 2 for kind='lfq'")

    @property
    def num_codes(self) -> int:
        """Number of distinct indices the quantizer emits: `codebook_size`, except for FSQ with its recommended
        levels, whose product can differ (1000 for `codebook_size=1024`)."""
        return math.prod(self.resolved_fsq_levels) if self.kind == "fsq" else self.codebook_size

    @property
    def resolved_fsq_levels(self) -> tuple[int, ...]:
        """FSQ levels per channel: `fsq_levels`, or the paper's recommendation for `codebook_size`."""
        if self.fsq_levels is not None:
            return self.fsq_levels
        return FSQ_RECOMMENDED_LEVELS[self.codebook_size]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict of every field."""
        data = dataclasses.asdict(self)
        if data["fsq_levels"] is not None:
            data["fsq_levels"] = list(data["fsq_levels"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizerConfig:
        """Build a config from `to_dict()` output; unknown keys and wrong types raise errors."""
        return dataclass_from_dict(cls, data, source="quantizer config")


def _floats_as_float(config: QuantizerConfig) -> None:
    """JSON writes 1.0 as 1: store ints given for float fields as floats (the types were checked before)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.type == "float" and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, field.name, float(value))


def _check_choice(config: QuantizerConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name}={getattr(config, name)!r}; expected one of {choices}")


def _check_positive(config: QuantizerConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value} must be a finite number > 0")


def _check_non_negative(config: QuantizerConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} must be a finite number >= 0")


__all__ = ["FSQ_RECOMMENDED_LEVELS", "QuantizerConfig"]
