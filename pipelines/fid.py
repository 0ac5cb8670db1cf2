"""Reconstruction FID (rFID): the Fréchet Inception distance between a dataset and its reconstructions.

The distance and its distributed accumulation come from `torchmetrics`' `FrechetInceptionDistance`, and the
network is torch-fidelity's port of the TensorFlow FID Inception-v3 (2048-d pool features), so the numbers are
comparable with published FID/rFID values. Its weights are never downloaded here: they come from a local file,
`--fid_weights PATH` or torch hub's cache, where torch-fidelity itself would have put them. The file is first
read with `torch.load(weights_only=True)` and must hold a plain state dict of tensors (torch-fidelity's own
loader unpickles without that restriction, so it only ever sees a file that passed this check).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

FID_FEATURES = 2048  # the pool3 features of the standard FID


def fid_weights_url() -> str:
    """Where torch-fidelity publishes the FID Inception-v3 weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def fid_weights_cache_path() -> Path:
    """Where torch hub keeps the FID Inception weights (`<hub>/checkpoints/weights-inception-2015-12-05-*.pth`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(fid_weights_url()).path)


def resolve_fid_weights(fid_weights: str | os.PathLike | None = None) -> Path | None:
    """The local FID Inception weights file: `fid_weights`, else the hub cache; None when neither exists.

    Raises:
        FileNotFoundError: `fid_weights` was given but is not a file (with where to get it).
    """
    if fid_weights is not None:
        path = Path(fid_weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"fid_weights={str(fid_weights)!r} is not a file; expected the FID Inception-v3 weights "
                f"{fid_weights_cache_path().name!r} (from {fid_weights_url()})"
            )
        return path
    cached = fid_weights_cache_path()
    return cached if cached.is_file() else None


def check_fid_weights(path: str | os.PathLike) -> None:
    """Refuse a weights file that is not a plain state dict of tensors, or not the FID Inception's.

    Raises:
        ValueError: the file cannot be read as a tensors-only state dict, or its keys are not the network's.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors, truncated zip archives, non-tensor objects
        raise ValueError(f"FID weights file {str(path)!r} is corrupt or not a tensors-only state dict "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"FID weights file {str(path)!r} must hold a state dict of tensors")
    if "Mixed_7c.branch_pool.conv.weight" not in state or "fc.weight" not in state:
        raise ValueError(f"FID weights file {str(path)!r} is not torch-fidelity's FID Inception-v3 state dict "
                         f"(expected keys such as 'Mixed_7c.branch_pool.conv.weight'; see {fid_weights_url()})")


def fid_inception(weights: str | os.PathLike) -> nn.Module:
    """torch-fidelity's FID Inception-v3 (through torchmetrics) built from a checked local weights file."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    check_fid_weights(weights)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FID_FEATURES)],
                              feature_extractor_weights_path=str(weights))


class ReconstructionFID:
    """Accumulates originals and reconstructions (images in [-1, 1]), then gives their FID.

    `feature` is the feature network: by default the FID Inception-v3 from `weights`; any module mapping
    uint8 (B, 3, H, W) images to (B, F) features works (tests use a small random one). Grayscale images are
    repeated to three channels. Under `torch.distributed`, `compute()` gathers the statistics of every
    process (torchmetrics' metric synchronization).
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: nn.Module | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if (weights is None) == (feature is None):
            raise ValueError("pass exactly one of weights (the FID Inception file) or feature (a feature module)")
        self.metric = FrechetInceptionDistance(feature=feature if feature is not None else fid_inception(weights))
        self.num_images = 0

    @staticmethod
    def _as_uint8_rgb(images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels

    def update(self, originals: Tensor, reconstructions: Tensor) -> None:
        """Add a batch of originals and their reconstructions, both (B, C, H, W) in [-1, 1]."""
        if originals.shape != reconstructions.shape:
            raise ValueError(f"originals {tuple(originals.shape)} and reconstructions "
                             f"{tuple(reconstructions.shape)} differ in shape")
        self.metric.update(self._as_uint8_rgb(originals).to(self.metric.device), real=True)
        self.metric.update(self._as_uint8_rgb(reconstructions).to(self.metric.device), real=False)
        self.num_images += originals.shape[0]

    def compute(self) -> float:
        """The FID between everything added so far (at least two images per side, on every process)."""
        if self.num_images < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.num_images}")
        return float(self.metric.compute())
