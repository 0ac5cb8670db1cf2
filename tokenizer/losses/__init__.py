"""Training losses of the VQGAN-style tokenizer. They live outside the model: the training loop owns them,
and neither the LPIPS network nor the discriminator ever enters the tokenizer's state dict."""

from .adversarial import (
    DISCRIMINATOR_LOSSES,
    GENERATOR_LOSSES,
    LeCamRegularizer,
    adaptive_adversarial_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    non_saturating_discriminator_loss,
    non_saturating_generator_loss,
)
from .discriminator import NLayerDiscriminator
from .perceptual import (
    LPIPSLoss,
    PerceptualWeightsUnavailableError,
    load_trunk_weights,
    lpips_available,
    resolve_trunk_weights,
    trunk_cache_path,
)
from .reconstruction import ReconstructionLoss, ReconstructionLossOutput
from .vqgan_loss import VQGANLoss, VQGANLossConfig

__all__ = [
    "DISCRIMINATOR_LOSSES",
    "GENERATOR_LOSSES",
    "LPIPSLoss",
    "LeCamRegularizer",
    "NLayerDiscriminator",
    "PerceptualWeightsUnavailableError",
    "ReconstructionLoss",
    "ReconstructionLossOutput",
    "VQGANLoss",
    "VQGANLossConfig",
    "adaptive_adversarial_weight",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "load_trunk_weights",
    "lpips_available",
    "non_saturating_discriminator_loss",
    "non_saturating_generator_loss",
    "resolve_trunk_weights",
    "trunk_cache_path",
]
