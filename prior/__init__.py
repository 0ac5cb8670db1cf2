"""Priors over integer index grids `[B, h, w]` with values in `[0, K)`: PixelCNN and Transformer.

This package knows nothing about images; it never imports `tokenizer` or `pipelines`.
"""

from .base import PRIOR_TYPES, Prior, PriorOutput, load_prior
from .configuration import CONFIG_VERSION, PixelCNNConfig, PriorConfig, TransformerPriorConfig
from .pixelcnn import PixelCNNPrior
from .sampling import filter_logits, guide_logits, sample_from_logits
from .transformer import TransformerPrior

__all__ = [
    "CONFIG_VERSION",
    "PRIOR_TYPES",
    "PixelCNNConfig",
    "PixelCNNPrior",
    "Prior",
    "PriorConfig",
    "PriorOutput",
    "TransformerPrior",
    "TransformerPriorConfig",
    "filter_logits",
    "guide_logits",
    "load_prior",
    "sample_from_logits",
]
