"""PatchGAN discriminator (pix2pix, Isola et al. 2017), the one VQGAN trains against (Esser et al. 2021).

Each output logit judges one overlapping patch of the input (70x70 pixels with the default 3 layers),
so the adversarial loss pushes for realistic local texture and leaves global structure to the
reconstruction and perceptual terms.
"""

import math

import torch
from torch import nn

NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    # GroupNorm does not depend on the batch, which helps with tiny per-device batches.
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class NLayerDiscriminator(nn.Module):
    """conv(4, 2, 1) + LeakyReLU(0.2), then `n_layers` normalised convs, then a conv to 1-channel logits.

    Args:
        in_channels: image channels.
        base_channels: width of the first conv; each later conv doubles it, up to 8x.
        n_layers: number of normalised convs (the first n_layers - 1 halve the resolution).
        norm: "batch" (pix2pix, VQGAN) or "group".

    `forward` maps (B, in_channels, H, W) to raw logits (B, 1, H', W') with H' = H // 2**n_layers - 2.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("base_channels", base_channels)
        _check_positive_int("n_layers", n_layers)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.n_layers = n_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        channels = base_channels
        for index in range(1, n_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < n_layers else 1  # the last normalised conv keeps the resolution (pix2pix)
            # No conv bias: the affine norm right after it has one.
            layers += [nn.Conv2d(channels, out_channels, 4, stride, 1, bias=False), _norm(norm, out_channels),
                       nn.LeakyReLU(0.2, True)]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_weights)

    def output_size(self, size: int) -> int:
        """Logit-grid side for an input side `size`: each stride-2 conv halves it, each stride-1 conv takes 1."""
        return size // 2**self.n_layers - 2

    @staticmethod
    def smallest_input(n_layers: int) -> int:
        """The smallest image side that leaves a logit grid of at least 1x1 (output_size >= 1)."""
        return 3 * 2**n_layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, H', W') for images (B, C, H, W); no sigmoid (losses work on logits)."""
        height, width = pixel_values.shape[-2:]
        if min(self.output_size(height), self.output_size(width)) < 1:
            smallest = self.smallest_input(self.n_layers)
            raise ValueError(f"pixel_values of size {height}x{width} are too small for a {self.n_layers}-layer "
                             f"PatchGAN; expected H and W >= {smallest}")
        return self.layers(pixel_values)


def _init_weights(module: nn.Module) -> None:
    # N(0, 0.02) convs and N(1, 0.02) norm scales, as in pix2pix / DCGAN (Radford et al. 2016).
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
