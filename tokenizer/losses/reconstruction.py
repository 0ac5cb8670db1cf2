"""Pixel reconstruction loss: a weighted sum of L1 and L2 (VQGAN uses L1, Esser et al. 2021)."""

from dataclasses import dataclass

import torch
from torch import nn

from ..image_checks import check_image_pair
from ._checks import check_non_negative


@dataclass
class ReconstructionLossOutput:
    """The weighted total and its unweighted parts (float32 scalars), so callers can log each term."""

    loss: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor


class ReconstructionLoss(nn.Module):
    """`l1_weight * mean|x - x̂| + l2_weight * mean (x - x̂)²`, reduced in float32 even under bf16 autocast."""

    def __init__(self, l1_weight: float = 1.0, l2_weight: float = 0.0) -> None:
        super().__init__()
        check_non_negative("l1_weight", l1_weight)
        check_non_negative("l2_weight", l2_weight)
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)

    def forward(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor) -> ReconstructionLossOutput:
        """Compare a reconstruction with its target images, both (B, C, H, W)."""
        check_image_pair(pixel_values, reconstruction)
        error = reconstruction.float() - pixel_values.float()  # (B, C, H, W), float32 for the reductions
        l1 = error.abs().mean()
        l2 = error.square().mean()
        return ReconstructionLossOutput(loss=self.l1_weight * l1 + self.l2_weight * l2, l1=l1, l2=l2)
