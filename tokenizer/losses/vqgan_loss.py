"""The VQGAN training objective (Esser et al. 2021): reconstruction + perceptual + quantizer + adaptive GAN.

`VQGANLoss` is owned by the training loop, never by the tokenizer: its discriminator gets its own
optimizer, and its state dict (discriminator + LeCam EMAs, not the frozen LPIPS network) is what a
resume needs.
"""

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config_fields import check_field_types, dataclass_from_dict
from ..image_checks import check_image_pair
from ._checks import check_non_negative
from .adversarial import DISCRIMINATOR_LOSSES, GENERATOR_LOSSES, LeCamRegularizer, adaptive_adversarial_weight
from .discriminator import NORMS, NLayerDiscriminator
from .perceptual import LPIPSLoss
from .reconstruction import ReconstructionLoss


@dataclass
class VQGANLossConfig:
    """Weights and discriminator settings of the VQGAN objective (round-trips through JSON via `to_dict`)."""

    l1_weight: float = 1.0  # VQGAN's pixel loss is L1
    l2_weight: float = 0.0  # L2 blurs more; available for MSE-style baselines
    perceptual_weight: float = 1.0  # LPIPS; 0 skips building it (no trunk weights needed)
    quantizer_weight: float = 1.0  # multiplies the quantizer's own (codebook + commitment) loss
    adversarial_weight: float = 0.5  # times the adaptive λ (VQGAN configs: 0.8, LlamaGen: 0.5); 0 = no GAN
    disc_start: int = 0  # step from which GAN term and discriminator updates are on; VQGAN starts late so
    # that the discriminator does not overpower a decoder that cannot reconstruct yet
    disc_loss: str = "hinge"  # "hinge" (VQGAN) or "non_saturating"
    disc_base_channels: int = 64
    disc_layers: int = 3
    disc_norm: str = "batch"  # "batch" (pix2pix) or "group" (batch-size independent)
    image_channels: int = 3  # channels the discriminator sees
    lecam_weight: float = 0.0  # LeCam regularization (Tseng et al. 2021); 0 disables it
    lecam_decay: float = 0.99  # EMA decay of the mean logits LeCam compares against
    max_adaptive_weight: float = 1e4  # clamp of λ (VQGAN)
    perceptual_net: str = "vgg"  # LPIPS trunk
    lpips_trunk_weights: str | None = None  # local torchvision trunk file; None = torch hub cache
    lpips_pnet_rand: bool = False  # random LPIPS trunk, for tests only

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "quantizer_weight", "adversarial_weight",
                     "lecam_weight"):
            check_non_negative(name, getattr(self, name))
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be an int >= 0, got {self.disc_start!r}")
        if self.disc_loss not in DISCRIMINATOR_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {self.disc_loss!r}")
        if self.disc_norm not in NORMS:
            raise ValueError(f"disc_norm must be one of {NORMS}, got {self.disc_norm!r}")
        if not self.max_adaptive_weight > 0:
            raise ValueError(f"max_adaptive_weight must be a number > 0, got {self.max_adaptive_weight!r}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must be in [0, 1), got {self.lecam_decay!r}")

    def to_dict(self) -> dict:
        """Plain dict for JSON / experiment trackers."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VQGANLossConfig":
        """Inverse of `to_dict`; unknown keys and wrong types fail by name."""
        return dataclass_from_dict(cls, data, source="loss config")


class VQGANLoss(nn.Module):
    """Generator and discriminator losses of VQGAN, with the discriminator as a separate submodule.

    Per training step, the loop calls `generator_loss` (backward into the tokenizer), then, when
    `discriminator_active(step)`, `discriminator_loss` (backward into `discriminator`, with that
    optimizer's grads zeroed first: the generator pass also leaves grads on the discriminator).
    """

    def __init__(self, config: VQGANLossConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else VQGANLossConfig()
        if not isinstance(config, VQGANLossConfig):
            raise TypeError(f"config must be a VQGANLossConfig, got {type(config).__name__}")
        self.config = config
        self.reconstruction = ReconstructionLoss(config.l1_weight, config.l2_weight)
        self.perceptual = (LPIPSLoss(config.perceptual_net, config.lpips_trunk_weights, config.lpips_pnet_rand)
                           if config.perceptual_weight > 0 else None)
        self.discriminator = (NLayerDiscriminator(config.image_channels, config.disc_base_channels,
                                                  config.disc_layers, config.disc_norm)
                              if self.uses_discriminator else None)
        self.lecam = (LeCamRegularizer(config.lecam_decay)
                      if self.uses_discriminator and config.lecam_weight > 0 else None)

    @property
    def uses_discriminator(self) -> bool:
        """Whether there is a GAN term at all (adversarial_weight > 0)."""
        return self.config.adversarial_weight > 0

    def discriminator_active(self, global_step: int) -> bool:
        """Whether the GAN term counts and the discriminator trains at this step (step >= disc_start)."""
        if isinstance(global_step, bool) or not isinstance(global_step, int) or global_step < 0:
            raise ValueError(f"global_step must be an int >= 0, got {global_step!r}")
        return self.uses_discriminator and global_step >= self.config.disc_start

    def _check_images(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> None:
        check_image_pair(pixel_values, reconstruction)
        if self.discriminator is not None and pixel_values.shape[1] != self.config.image_channels:
            raise ValueError(f"the images have {pixel_values.shape[1]} channel(s), but the discriminator was built for "
                             f"{self.config.image_channels}: set VQGANLossConfig(image_channels=...) to the "
                             "tokenizer's in_channels")

    def generator_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor,
                       quantizer_loss: torch.Tensor, last_layer: torch.Tensor | None,
                       global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Tokenizer loss: rec + perceptual + quantizer + λ · GAN, and float logs of each term.

        Args:
            pixel_values: target images (B, C, H, W) in [-1, 1].
            reconstruction: the tokenizer's output for them, same shape, with its graph.
            quantizer_loss: the quantizer's scalar loss (codebook + commitment terms).
            last_layer: `VQTokenizer.get_last_layer()`, where the adaptive weight compares gradients;
                needed only once the discriminator is active.
            global_step: optimizer step, compared with `disc_start`.

        Under `torch.no_grad()` (validation) the adaptive weight cannot be computed and is 0, as in VQGAN.
        """
        self._check_images(pixel_values, reconstruction)
        rec = self.reconstruction(pixel_values, reconstruction)
        terms = {"l1": rec.l1, "l2": rec.l2, "rec": rec.loss, "quantizer": _scalar("quantizer_loss", quantizer_loss)}
        nll = rec.loss  # VQGAN's L_rec: pixel + perceptual terms
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, pixel_values)
            nll = nll + self.config.perceptual_weight * terms["perceptual"]
        loss = nll + self.config.quantizer_weight * terms["quantizer"]
        if self.discriminator_active(global_step):
            gan, weight = self._gan_term(nll, reconstruction, last_layer)
            terms.update(gan=gan, adaptive_weight=weight)
            loss = loss + weight * gan
        elif self.uses_discriminator:  # same log keys before disc_start, for trackers
            terms.update(gan=loss.new_zeros(()), adaptive_weight=loss.new_zeros(()))
        terms["loss"] = loss
        return loss, _to_floats(terms)

    def _gan_term(self, nll: torch.Tensor, reconstruction: torch.Tensor,
                  last_layer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits_fake = self.discriminator(reconstruction)  # (B, 1, H', W')
        gan = GENERATOR_LOSSES[self.config.disc_loss](logits_fake)
        if not torch.is_grad_enabled():
            return gan, gan.new_zeros(())
        if last_layer is None:
            raise ValueError("last_layer is None but the discriminator is active; pass "
                             "tokenizer.get_last_layer() so the adaptive GAN weight can be computed")
        weight = adaptive_adversarial_weight(nll, gan, last_layer, self.config.adversarial_weight,
                                             self.config.max_adaptive_weight)
        return gan, weight

    def discriminator_loss(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor,
                           global_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator loss on real images vs. (detached) reconstructions, plus LeCam when enabled.

        Before `disc_start` (or without a discriminator) the discriminator is not run at all and the
        loss is a constant 0 without a graph: check `discriminator_active(step)` before stepping its
        optimizer, so that no update (not even weight decay) happens.
        """
        self._check_images(pixel_values, reconstruction)
        if not self.discriminator_active(global_step):
            zero = torch.zeros((), device=pixel_values.device)
            return zero, {"disc_loss": 0.0}
        logits_real = self.discriminator(pixel_values.detach())  # (B, 1, H', W')
        logits_fake = self.discriminator(reconstruction.detach())  # no gradient into the tokenizer
        terms = {"disc_loss": DISCRIMINATOR_LOSSES[self.config.disc_loss](logits_real, logits_fake),
                 "logits_real": logits_real.float().mean(), "logits_fake": logits_fake.float().mean()}
        loss = terms["disc_loss"]
        if self.lecam is not None:
            terms["lecam"] = self.lecam(logits_real, logits_fake)
            loss = loss + self.config.lecam_weight * terms["lecam"]
        terms["loss"] = loss
        return loss, _to_floats(terms)


def _to_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached Python floats for logging, with one device sync instead of one per term."""
    values = torch.stack([value.detach().float().reshape(()) for value in terms.values()]).tolist()
    return dict(zip(terms, values))


def _scalar(name: str, value: torch.Tensor) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a float scalar tensor, got {shape}")
    return value.float().reshape(())
