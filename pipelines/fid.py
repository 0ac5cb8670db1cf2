"""Reconstruction FID (rFID): the Fréchet Inception distance between a dataset and its reconstructions.

The network is torch-fidelity's port of the TensorFlow FID Inception-v3 (2048-d pool features, TF1-style
bilinear resize to 299), and the Fréchet distance comes from `torchmetrics`' `FrechetInceptionDistance`, so
with the published weights the numbers are comparable with published FID/rFID values. The weights are never
downloaded here: they come from a local file, `--fid_weights PATH` or torch hub's cache (where torch-fidelity
itself would have put them). The file is read once, its SHA-256 compared with the published one, and its bytes
loaded with `torch.load(weights_only=True)` into a strict `load_state_dict`; torch-fidelity's own loader, which
unpickles without that restriction, never runs.

Across processes the Inception features are computed where the images are, then gathered with accelerate's
`gather_for_metrics` (which drops the padding of an uneven last batch), so every process holds the statistics
of the whole dataset and `compute()` needs no collective call.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .metrics import check_metric_inputs

FID_FEATURES = 2048  # the pool3 features of the standard FID
FID_FEATURE_NAME = str(FID_FEATURES)


def fid_weights_url() -> str:
    """Where torch-fidelity publishes the FID Inception-v3 weights."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def fid_weights_cache_path() -> Path:
    """Where torch hub keeps the FID Inception weights (`<hub>/checkpoints/weights-inception-2015-12-05-*.pth`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(fid_weights_url()).path)


def fid_weights_sha256_prefix() -> str:
    """The SHA-256 prefix in the published file's name, read as torch hub reads it (`torch.hub.HASH_REGEX`)."""
    match = torch.hub.HASH_REGEX.search(fid_weights_cache_path().name)
    if match is None or not match.group(1):  # pragma: no cover - depends on torch-fidelity's URL
        raise RuntimeError(f"cannot read a SHA-256 prefix from {fid_weights_url()}")
    return match.group(1)


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


def load_fid_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a FID Inception weights file once, safely: a tensors-only state dict (`weights_only=True`).

    Warns when the bytes are not the published file's (SHA-256 prefix): such weights give distances that are
    not comparable with published FIDs.

    Raises:
        ValueError: the file is corrupt, holds anything but tensors, or is not the FID Inception's state dict.
    """
    where = f"FID weights file {str(path)!r}"
    if Path(path) == fid_weights_cache_path():
        where += " (torch hub's cache; delete it or pass --fid_weights PATH)"
    data = Path(path).read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors, truncated zip archives, non-tensor objects
        raise ValueError(f"{where} is corrupt or not a tensors-only state dict "
                         f"({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{where} must hold a state dict of tensors")
    if "Mixed_7c.branch_pool.conv.weight" not in state or "fc.weight" not in state:
        raise ValueError(f"{where} is not torch-fidelity's FID Inception-v3 state dict "
                         f"(expected keys such as 'Mixed_7c.branch_pool.conv.weight'; see {fid_weights_url()})")
    expected = fid_weights_sha256_prefix()
    if not hashlib.sha256(data).hexdigest().startswith(expected):
        warnings.warn(f"{where} is not the published FID Inception-v3 file (its SHA-256 does not start with "
                      f"{expected}): rFID values from it are not comparable with published ones", stacklevel=2)
    return state


class FIDInceptionV3(nn.Module):
    """torch-fidelity's FID Inception-v3 from a checked state dict: uint8 (B, 3, H, W) -> (B, 2048) features.

    It stays in eval mode (its batch norms must never use batch statistics) and has no trainable parameters.
    """

    num_features = FID_FEATURES

    def __init__(self, state_dict: dict[str, Tensor]) -> None:
        super().__init__()
        from torch_fidelity import feature_extractor_inceptionv3 as inception

        # The constructor loads its weights itself (download, or an unrestricted torch.load of a path). Hand it
        # the already checked state dict in place of the download; it then loads it strictly.
        try:
            with mock.patch.object(inception, "load_state_dict_from_url", return_value=state_dict):
                self.network = inception.FeatureExtractorInceptionV3("inception-v3-compat", [FID_FEATURE_NAME])
        except RuntimeError as error:  # strict load_state_dict: missing/unexpected keys or shape mismatches
            raise ValueError(f"the FID Inception-v3 weights do not fit the network: {error}") from error
        self.network.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)[0]


def fid_inception(weights: str | os.PathLike) -> FIDInceptionV3:
    """The FID Inception-v3 built from a local weights file (checked by `load_fid_weights`)."""
    return FIDInceptionV3(load_fid_weights(weights))


class _Precomputed(nn.Module):
    """The feature "network" of the torchmetrics metric: features arrive already computed (and gathered)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


class ReconstructionFID:
    """Accumulates originals and reconstructions (images in [-1, 1]), then gives their FID.

    `feature` is the feature network: by default the FID Inception-v3 from `weights`; any module mapping
    uint8 (B, 3, H, W) images to (B, F) features works (tests use a small random one). Grayscale images are
    repeated to three channels. With an `accelerator`, `update` gathers the features of every process
    (dropping the padding duplicates of an uneven last batch), so `compute()` covers the whole dataset on
    every process.
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: nn.Module | None = None) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if (weights is None) == (feature is None):
            raise ValueError("pass exactly one of weights (the FID Inception file) or feature (a feature module)")
        self.feature = feature if feature is not None else fid_inception(weights)
        num_features = getattr(self.feature, "num_features", None)
        if num_features is None:
            with torch.no_grad():
                probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=self._device())
                num_features = int(self.feature(probe).shape[-1])
        self.metric = FrechetInceptionDistance(feature=_Precomputed(int(num_features)), sync_on_compute=False)
        self.num_images = 0

    def _device(self) -> torch.device:
        parameter = next(self.feature.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @staticmethod
    def _as_uint8_rgb(images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        return self.feature(self._as_uint8_rgb(images).to(self._device())).double()  # (B, F)

    def update(self, originals: Tensor, reconstructions: Tensor, accelerator=None) -> None:
        """Add a batch of originals and their reconstructions, both (B, C, H, W) in [-1, 1].

        With an `accelerate.Accelerator`, call it on every process for every batch of the prepared dataloader.
        """
        check_metric_inputs(reconstructions, originals)
        real, fake = self._features(originals), self._features(reconstructions)
        if accelerator is not None:
            real, fake = accelerator.gather_for_metrics(real), accelerator.gather_for_metrics(fake)
        self.metric.update(real.cpu(), real=True)
        self.metric.update(fake.cpu(), real=False)
        self.num_images += real.shape[0]

    def compute(self) -> float:
        """The FID between everything added so far (at least two images per side)."""
        if self.num_images < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.num_images}")
        return float(self.metric.compute())
