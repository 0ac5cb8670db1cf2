"""Building blocks of the VQGAN encoder and decoder: ResNet blocks, self-attention, resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1-projected) skip, as in VQGAN / DDPM."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (VQGAN's AttnBlock), via fused SDPA."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # 3 x (B, H*W, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric padding (pad right/bottom), so H -> H/2 exactly as in VQGAN.

    With `shortcut`, the conv learns a residual over a parameter-free path: 2x2 average pooling, which is
    DC-AE's space-to-channel shortcut followed by channel averaging when the width does not change
    (Chen et al. 2024, "Deep Compression Autoencoder").
    """

    def __init__(self, channels: int, shortcut: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.pad(x, (0, 1, 0, 1)))
        return h + F.avg_pool2d(x, 2) if self.shortcut else h


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv3x3 (avoids the checkerboard artifacts of transposed convs).

    With `shortcut`, the conv learns a residual over the upsampled input itself (DC-AE's channel-to-space
    shortcut after channel duplication, at an unchanged width).
    """

    def __init__(self, channels: int, shortcut: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) + x if self.shortcut else self.conv(x)


def channel_shortcut(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Parameter-free (B, C, H, W) -> (B, channels, H, W), one of C and `channels` dividing the other.

    Averages each run of C / channels consecutive channels, or repeats each channel channels / C times: the
    shortcuts DC-AE puts beside the encoder's output conv and the decoder's input conv.
    """
    batch, in_channels, height, width = x.shape
    if in_channels >= channels:
        return x.reshape(batch, channels, in_channels // channels, height, width).mean(dim=2)
    return x.repeat_interleave(channels // in_channels, dim=1)
