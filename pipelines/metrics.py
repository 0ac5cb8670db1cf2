"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage and perplexity over a whole dataset."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from tokenizer.image_checks import check_image_pair
from tokenizer.modeling import PIXEL_RANGE_TOLERANCE


def check_metric_inputs(reconstruction: torch.Tensor, target: torch.Tensor) -> None:
    """Refuse inputs the metrics would score silently wrong: non-float images (uint8 would clamp to a perfect
    score), shapes that differ (they would broadcast) or a reference outside [-1, 1] (images in [0, 255]).

    The reconstruction may leave the range (it is clamped, as for display) or be NaN (the metric is then NaN)."""
    check_image_pair(reconstruction, target, names=("reconstruction", "target"))
    peak = float(target.detach().abs().amax()) if target.numel() else 0.0
    if not peak <= 1.0 + PIXEL_RANGE_TOLERANCE:  # NaN fails too
        raise ValueError(f"target images must lie in [-1, 1], but |max| is {peak:.4g}; map [0, 255] or [0, 1] images "
                         "to [-1, 1] first")


def json_ready(metrics: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`metrics` with every NaN/Inf number replaced by None (JSON has no NaN), and the names of those replaced."""
    cleaned, bad = {}, []
    for name, value in metrics.items():
        if isinstance(value, dict):
            value, inner = json_ready(value)
            bad += [f"{name}.{key}" for key in inner]
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
            bad.append(name)
        cleaned[name] = value
    return cleaned, bad


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak 1 after mapping to [0, 1]). Returns (B,)."""
    check_metric_inputs(reconstruction, target)
    a = (reconstruction.float().clamp(-1, 1) + 1) / 2
    b = (target.float().clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(reconstruction: torch.Tensor, target: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) of images in [-1, 1]. Returns (B,).

    The window shrinks for images smaller than it (e.g. 8x8 patches), so the metric stays defined.
    """
    check_metric_inputs(reconstruction, target)
    x = (reconstruction.float().clamp(-1, 1) + 1) / 2
    y = (target.float().clamp(-1, 1) + 1) / 2
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels).to(x.device)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x.pow(2)
    var_y = filt(y * y) - mu_y.pow(2)
    cov = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


class CodeHistogram:
    """Counts code ids over many batches: dataset-level usage (fraction of codes used) and perplexity."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)

    def update(self, indices: torch.Tensor) -> None:
        self.counts += torch.bincount(indices.flatten().cpu(), minlength=self.counts.numel()).double()

    def usage(self) -> float:
        return float((self.counts > 0).double().mean())

    def perplexity(self) -> float:
        total = self.counts.sum()
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0] / total
        return math.exp(float(-(p * p.log()).sum()))
