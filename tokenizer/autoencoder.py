"""The convolutional encoder and decoder of the tokenizer (VQGAN layout, Esser et al. 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttentionBlock, Downsample, ResnetBlock, Upsample, channel_shortcut, group_norm
from .configuration import VQTokenizerConfig


def _level_blocks(in_channels: int, out_channels: int, count: int, attention: bool, config: VQTokenizerConfig):
    """`count` ResNet blocks (each followed by self-attention when `attention`) taking in -> out channels."""
    blocks = nn.ModuleList()
    for index in range(count):
        blocks.append(ResnetBlock(in_channels if index == 0 else out_channels, out_channels,
                                  config.norm_groups, config.dropout))
        if attention:
            blocks.append(AttentionBlock(out_channels, config.norm_groups))
    return blocks


def _middle(channels: int, config: VQTokenizerConfig) -> nn.Sequential:
    layers = [ResnetBlock(channels, channels, config.norm_groups, config.dropout)]
    if config.mid_attention:
        layers.append(AttentionBlock(channels, config.norm_groups))
    layers.append(ResnetBlock(channels, channels, config.norm_groups, config.dropout))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Images (B, C, H, W) -> latents (B, latent_channels, H/f, W/f)."""

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        widths = config.widths
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.blocks = _level_blocks(previous, width, config.num_res_blocks, level in config.attention_levels, config)
            stage.downsample = Downsample(width, config.resample_shortcuts) if level < len(widths) - 1 else nn.Identity()
            self.levels.append(stage)
            previous = width
        self.middle = _middle(previous, config)
        self.norm_out = group_norm(previous, config.norm_groups)
        self.conv_out = nn.Conv2d(previous, config.latent_channels, 3, padding=1)
        self.latent_shortcut = config.latent_shortcuts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for stage in self.levels:
            for block in stage.blocks:
                h = block(h)
            h = stage.downsample(h)
        h = self.middle(h)  # (B, C_last, H/f, W/f)
        z = self.conv_out(F.silu(self.norm_out(h)))  # (B, latent_channels, H/f, W/f)
        return z + channel_shortcut(h, z.shape[1]) if self.latent_shortcut else z


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> images (B, C, h*f, w*f), unbounded (trained towards [-1, 1])."""

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        widths = config.widths
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.latent_shortcut = config.latent_shortcuts
        self.middle = _middle(widths[-1], config)
        self.levels = nn.ModuleList()
        previous = widths[-1]
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.blocks = _level_blocks(previous, widths[level], config.num_res_blocks + 1,
                                         level in config.attention_levels, config)
            stage.upsample = Upsample(widths[level], config.resample_shortcuts) if level > 0 else nn.Identity()
            self.levels.append(stage)
            previous = widths[level]
        self.norm_out = group_norm(previous, config.norm_groups)
        self.conv_out = nn.Conv2d(previous, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, C_last, h, w)
        if self.latent_shortcut:
            h = h + channel_shortcut(z, h.shape[1])
        h = self.middle(h)
        for stage in self.levels:
            for block in stage.blocks:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)
