"""vqstack image tokenizers: images <-> integer grids (VQGAN-style encoder, codebook quantizer, decoder)."""

from .configuration import PRESETS, VQTokenizerConfig
from .image_processor import VQImageProcessor
from .modeling import EncodeOutput, TokenizerOutput, VQTokenizer
from .quantizers import CodebookStats, QuantizerConfig, QuantizerOutput, build_quantizer
from .weights import WeightsError

__all__ = [
    "PRESETS",
    "CodebookStats",
    "EncodeOutput",
    "QuantizerConfig",
    "QuantizerOutput",
    "TokenizerOutput",
    "VQImageProcessor",
    "VQTokenizer",
    "VQTokenizerConfig",
    "WeightsError",
    "build_quantizer",
]
