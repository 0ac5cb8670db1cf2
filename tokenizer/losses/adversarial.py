"""GAN losses on raw discriminator logits, VQGAN's adaptive adversarial weight, and LeCam regularization.

All reductions run in float32, so they are safe under bf16 autocast.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..quantizers import distributed


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017), halved as in VQGAN: (mean relu(1 - D(x)) + mean relu(1 + D(x̂))) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def non_saturating_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits (Goodfellow et al. 2014): (mean softplus(-D(x)) + mean softplus(D(x̂))) / 2."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean D(x̂)."""
    return -logits_fake.float().mean()


def non_saturating_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss (Goodfellow et al. 2014): mean softplus(-D(x̂)) = -mean log sigmoid(D(x̂))."""
    return F.softplus(-logits_fake.float()).mean()


DISCRIMINATOR_LOSSES = {"hinge": hinge_discriminator_loss, "non_saturating": non_saturating_discriminator_loss}
GENERATOR_LOSSES = {"hinge": hinge_generator_loss, "non_saturating": non_saturating_generator_loss}


def adaptive_adversarial_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                                last_layer: torch.Tensor, base_weight: float = 1.0,
                                max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance of the GAN term (Esser et al. 2021, eq. 7), a detached float32 scalar.

    λ = ‖∇_L L_rec‖ / (‖∇_L L_G‖ + 1e-4), clamped to [0, max_weight], times `base_weight`, where L is the
    decoder's last layer weight: the GAN gradient reaching the decoder is rescaled to the size of the
    reconstruction gradient, whatever the scale of the discriminator's logits. Both losses must still
    have their graphs (they are kept for the backward pass that follows).
    """
    if not last_layer.requires_grad:
        raise ValueError(f"last_layer (shape {tuple(last_layer.shape)}) must require grad to compute the "
                         "adaptive adversarial weight; pass the decoder's last conv weight")
    reconstruction_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grad.float().norm() / (generator_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach() * base_weight


class LeCamRegularizer(nn.Module):
    """LeCam regularization for GANs on limited data (Tseng et al. 2021).

    Keeps EMAs of the mean real and fake logits and penalises logits that cross the other side's EMA:
    mean relu(D(x) - ema_fake)² + mean relu(ema_real - D(x̂))². The EMAs are persistent buffers, so they
    are saved and restored with the state dict for an exact resume. The first update sets them to the
    current means, so they do not start biased towards zero.
    """

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        """Move the EMAs towards the current mean logits (no host sync: the first-step case is a `where`).

        With several data-parallel processes the means are averaged over them first, so every process keeps the
        same EMAs (a checkpoint saves one process's copy, and a resume must continue all of them exactly).
        """
        means = torch.stack([logits_real.float().detach().mean(), logits_fake.float().detach().mean()])
        means = distributed.all_reduce_sum_(means) / distributed.world_size()  # equal batches per process
        if not bool(torch.isfinite(means).all()):  # the same on every process: the means were all-reduced
            return  # a non-finite batch (its step is skipped) would leave the averages NaN for good
        step = torch.where(self.num_updates == 0, 1.0, 1.0 - self.decay)
        self.ema_real.lerp_(means[0], step)
        self.ema_fake.lerp_(means[1], step)
        self.num_updates += 1

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """The LeCam penalty against the current EMAs (float32 scalar, differentiable in the logits)."""
        return (F.relu(logits_real.float() - self.ema_fake).square().mean()
                + F.relu(self.ema_real - logits_fake.float()).square().mean())

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """Update the EMAs with this batch, then return its penalty (the order of the reference code)."""
        self.update(logits_real, logits_fake)
        return self.penalty(logits_real, logits_fake)
