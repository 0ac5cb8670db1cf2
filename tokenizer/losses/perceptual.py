"""LPIPS perceptual loss (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"), as used by VQGAN (Esser et al. 2021).

The `lpips` package ships its small linear calibration layers, but its trunk (VGG16, AlexNet or
SqueezeNet) holds torchvision's ImageNet weights, which torchvision would download while the module is
built. Here the trunk always comes from a local file: an explicit `trunk_weights` path, else torch hub's
cache, else one download attempt into that cache; when all fail the error says which file is missing and
how to supply it. Nothing falls back to a random trunk unless `pnet_rand=True` is asked for.
"""

import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lpips
import torch
from torch import nn
from torchvision import models as tv_models

from ..image_checks import check_image_pair

# The ImageNet weights each lpips trunk is built from (lpips.pretrained_networks calls these models).
_TRUNK_WEIGHTS = {
    "vgg": tv_models.VGG16_Weights.IMAGENET1K_V1,
    "alex": tv_models.AlexNet_Weights.IMAGENET1K_V1,
    "squeeze": tv_models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
}
DOWNLOAD_TIMEOUT_S = 10.0


class PerceptualWeightsUnavailableError(RuntimeError):
    """The LPIPS trunk weights are neither on disk nor downloadable; the message says how to supply them."""

    def __init__(self, net: str, expected_path: Path, reason: BaseException) -> None:
        self.net = net
        self.expected_path = expected_path
        url = _trunk_url(net)
        super().__init__(
            f"LPIPS (net={net!r}) needs torchvision's ImageNet trunk weights {expected_path.name!r}, which are "
            f"not at {str(expected_path)!r}, and downloading them from {url} failed "
            f"({type(reason).__name__}: {reason}). To fix this, either\n"
            f"  - copy {expected_path.name} (fetched from {url} on a machine with network access) to "
            f"{expected_path},\n"
            f"  - or pass its path with --lpips_weights PATH (LPIPSLoss(trunk_weights=PATH)),\n"
            f"  - or train without the perceptual term: --perceptual_weight 0."
        )


def _check_net(net: str) -> None:
    if net not in _TRUNK_WEIGHTS:
        raise ValueError(f"net must be one of {sorted(_TRUNK_WEIGHTS)}, got {net!r}")


def _trunk_url(net: str) -> str:
    return _TRUNK_WEIGHTS[net].url


def trunk_cache_path(net: str = "vgg") -> Path:
    """Where torch hub keeps the trunk's torchvision weights, e.g. `<hub>/checkpoints/vgg16-397923af.pth`."""
    _check_net(net)
    file_name = os.path.basename(urlparse(_trunk_url(net)).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def lpips_available(net: str = "vgg", trunk_weights: str | os.PathLike | None = None) -> bool:
    """True when the LPIPS trunk can be built without the network (for code that reports LPIPS only if present)."""
    _check_net(net)
    if trunk_weights is not None:
        return Path(trunk_weights).is_file()
    return trunk_cache_path(net).is_file()


def _download_trunk(url: str, destination: Path) -> None:
    """Download `url` to `destination`, checking the hash in its name; give up fast when offline."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names end in the first hex digits of the file's SHA-256 (torch.hub's HASH_REGEX convention)
    match = torch.hub.HASH_REGEX.search(destination.name)
    hash_prefix = (match.group(1) or None) if match else None  # the regex also matches an empty prefix
    # torch.hub opens its URL without a timeout; a bounded default keeps an offline machine from hanging.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=hash_prefix, progress=False)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def resolve_trunk_weights(net: str = "vgg", trunk_weights: str | os.PathLike | None = None) -> Path:
    """The local file holding the trunk's torchvision state dict: `trunk_weights`, the hub cache, or a download.

    Raises:
        FileNotFoundError: `trunk_weights` was given but is not a file.
        PerceptualWeightsUnavailableError: no local file and the download failed.
    """
    _check_net(net)
    if trunk_weights is not None:
        path = Path(trunk_weights)
        if not path.is_file():
            raise FileNotFoundError(f"trunk_weights={str(trunk_weights)!r} is not a file; expected torchvision's "
                                    f"state dict for net={net!r} ({trunk_cache_path(net).name})")
        return path
    cached = trunk_cache_path(net)
    if cached.is_file():
        return cached
    try:
        _download_trunk(_trunk_url(net), cached)
    except (OSError, RuntimeError) as error:  # URLError and socket timeouts are OSErrors; hash mismatch is not
        raise PerceptualWeightsUnavailableError(net, cached, error) from error
    return cached


def load_trunk_weights(trunk: nn.Module, path: str | os.PathLike) -> None:
    """Load a torchvision state dict (`features.*`, optional `classifier.*`) strictly into an lpips trunk.

    lpips splits torchvision's `features` into slices but keeps each layer's index as its name
    (`slice2.5.weight` is `features.5.weight`), so the mapping is a rename. Every trunk tensor must be in
    the file; the classifier head, which LPIPS does not use, is the only thing allowed besides.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"trunk weights file {str(path)!r} must hold a state dict, got {type(state).__name__}")
    sources = {name: "features." + name.split(".", 1)[1] for name in trunk.state_dict()}  # trunk -> file key
    missing = sorted(set(sources.values()) - set(state))
    unexpected = sorted(k for k in state if k not in set(sources.values()) and not k.startswith("classifier."))
    if missing or unexpected:
        raise ValueError(f"trunk weights file {str(path)!r} does not match the LPIPS trunk: missing keys "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
                         f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    try:
        trunk.load_state_dict({name: state[source] for name, source in sources.items()}, strict=True)
    except RuntimeError as error:  # shape mismatches: the file is a different architecture
        raise ValueError(f"trunk weights file {str(path)!r} does not match the LPIPS trunk: {error}") from error


def linear_weights_path(net: str = "vgg") -> Path:
    """The calibrated linear heads that ship inside the lpips package (`weights/v0.1/<net>.pth`)."""
    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"


def load_linear_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load LPIPS's calibrated linear heads (`lin*.model.1.weight`) strictly, reading the pickle with weights_only.

    lpips itself reads this file with a plain `torch.load`, which unpickles anything on torch < 2.6; vqstack
    builds the network without it and loads the heads here instead.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"LPIPS linear weights file {str(path)!r} must hold a state dict, got {type(state).__name__}")
    # lpips registers each head twice (`lin0` and, as the same tensor, `lins.0`); the file names the first.
    expected = {name for name in model.state_dict() if name.startswith("lin") and not name.startswith("lins.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"LPIPS linear weights file {str(path)!r} does not match the network: missing keys "
                         f"{missing}, unexpected keys {unexpected}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"LPIPS linear weights file {str(path)!r} does not match the network: {error}") from error


# The smallest image side each trunk takes: its pooling stages shrink smaller images to nothing before the last
# feature layer LPIPS reads (measured on these trunks; every larger size works).
SMALLEST_INPUT = {"vgg": 16, "alex": 31, "squeeze": 17}


class LPIPSLoss(nn.Module):
    """Frozen LPIPS distance between images in [-1, 1]; returns the batch mean as a float32 scalar.

    Args:
        net: trunk, "vgg" (VGG16, as in VQGAN), "alex" or "squeeze".
        trunk_weights: local torchvision state-dict file for the trunk; by default torch hub's cache is
            used, then one download is tried (see `PerceptualWeightsUnavailableError`).
        pnet_rand: random trunk instead of ImageNet weights. Only meaningful for tests; it warns.

    The network is frozen (its parameters do not require grad, it stays in eval mode so the dropout of
    the linear layers is off) and is left out of this module's state dict: its weights come from files,
    and leaving them out keeps training checkpoints small.
    """

    def __init__(self, net: str = "vgg", trunk_weights: str | os.PathLike | None = None,
                 pnet_rand: bool = False) -> None:
        super().__init__()
        _check_net(net)
        if pnet_rand and trunk_weights is not None:
            raise ValueError(f"pnet_rand=True asks for a random trunk, but trunk_weights={str(trunk_weights)!r} "
                             "was also given; pass one or the other")
        trunk_path = None if pnet_rand else resolve_trunk_weights(net, trunk_weights)
        if pnet_rand:
            warnings.warn("LPIPSLoss(pnet_rand=True) uses a randomly initialised trunk: distances are not "
                          "perceptual. Use it for tests only.", UserWarning, stacklevel=2)
        self.net_name = net
        self.lpips = self._build(net)
        if trunk_path is not None:
            load_trunk_weights(self.lpips.net, trunk_path)
        for parameter in self.lpips.parameters():
            parameter.requires_grad_(False)
        self.lpips.eval()
        self.register_state_dict_post_hook(_drop_network_entries)
        self.register_load_state_dict_pre_hook(_keep_network_entries)

    @staticmethod
    def _build(net: str) -> nn.Module:
        # Always build a random trunk (no download): the ImageNet weights are loaded from a file afterwards.
        # The linear heads are loaded here too, not by lpips (see `load_linear_weights`).
        # lpips passes torchvision's deprecated `pretrained=` flag, whose warnings say nothing useful here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
            model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=False, verbose=False)
        load_linear_weights(model, linear_weights_path(net))
        return model

    def train(self, mode: bool = True) -> "LPIPSLoss":
        """Switch mode for API symmetry; the LPIPS network itself always stays in eval mode."""
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between two (B, C, H, W) batches in [-1, 1], C = 1 or 3."""
        return self.distances(input, target).mean()

    def distances(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS distances (B,) in float32 between two (B, C, H, W) batches in [-1, 1], C = 1 or 3."""
        check_image_pair(input, target, names=("input", "target"))
        channels = input.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"LPIPSLoss expects 1 or 3 channels, got input of shape {tuple(input.shape)}")
        smallest = SMALLEST_INPUT[self.net_name]
        if min(input.shape[-2:]) < smallest:
            raise ValueError(f"LPIPS with the {self.net_name} trunk needs images of at least {smallest}x{smallest} "
                             f"pixels, got {tuple(input.shape[-2:])}; train at a larger resolution or without the "
                             "perceptual loss (perceptual weight 0)")
        if channels == 1:  # grayscale: the trunk was trained on RGB, so repeat the one channel
            input, target = input.expand(-1, 3, -1, -1), target.expand(-1, 3, -1, -1)
        dtype = next(self.lpips.parameters()).dtype
        # In the network's own precision (float32 unless it was cast): under autocast its convs would run in bf16.
        with torch.autocast(device_type=input.device.type, enabled=False):
            distance = self.lpips(input.to(dtype), target.to(dtype))  # (B, 1, 1, 1)
        return distance.float().flatten()


def _drop_network_entries(module: LPIPSLoss, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "lpips.")]:
        del state_dict[key]


def _keep_network_entries(module: LPIPSLoss, state_dict: dict, prefix: str, *args) -> None:
    # The network is not saved, so loading keeps the weights it already has (and strict loading passes).
    for key, value in module.lpips.state_dict(prefix=prefix + "lpips.").items():
        state_dict.setdefault(key, value)
