"""Codebook quantizers of the vqstack tokenizer: VQ (learned codebook), FSQ and LFQ (implicit codebooks).

All share the `Quantizer` interface: `forward(z) -> QuantizerOutput` and `indices_to_codes(indices)`.
"""

from .base import CodebookStats, Quantizer, QuantizerOutput
from .config import QuantizerConfig
from .fsq import FiniteScalarQuantizer
from .lfq import LookupFreeQuantizer
from .vector_quantizer import VectorQuantizer

_QUANTIZER_CLASSES: dict[str, type[Quantizer]] = {
    "vq": VectorQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
}


def build_quantizer(config: QuantizerConfig, embed_dim: int) -> Quantizer:
    """The quantizer named by `config.kind`, for latents with `embed_dim` channels."""
    if not isinstance(config, QuantizerConfig):
        raise TypeError(f"config must be a QuantizerConfig, got {type(config).__name__}")
    return _QUANTIZER_CLASSES[config.kind](config, embed_dim)


__all__ = [
    "CodebookStats",
    "FiniteScalarQuantizer",
    "LookupFreeQuantizer",
    "Quantizer",
    "QuantizerConfig",
    "QuantizerOutput",
    "VectorQuantizer",
    "build_quantizer",
]
