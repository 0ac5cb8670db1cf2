"""Typed, JSON-round-tripping configurations of the priors.

A config holds everything needed to rebuild a prior's architecture: the grid it models (`grid_shape`, the
codebook size `K`), its conditioning (`num_classes`, `label_dropout`) and the network's own sizes. `config.json`
written by `save_pretrained` is `to_dict()` plus `prior_type` and `config_version`; `config_from_dict` reads it
back strictly (unknown keys, missing keys, wrong types and newer versions are errors, never silently ignored).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

# Bumped whenever the meaning of a saved field changes; files from a newer version are refused on load.
CONFIG_VERSION = 1


def _check_int(name: str, value: Any, minimum: int) -> None:
    # `bool` is a subclass of `int`; a flag passed where a size is expected is a bug, not a 0/1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_probability(name: str, value: Any, low_open: bool = False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {value!r} ({type(value).__name__})")
    low_ok = value > 0.0 if low_open else value >= 0.0
    if not (math.isfinite(value) and low_ok and value <= 1.0):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


@dataclass
class PriorConfig:
    """Fields shared by every prior: what grids it models and how it is conditioned."""

    grid_shape: tuple[int, int] = (16, 16)  # (h, w) of the index grids; fixes the sequence length h*w
    codebook_size: int = 1024  # K: tokens take values in [0, K)
    num_classes: int = 0  # 0 = unconditional; class ids are [0, num_classes), id num_classes is "null"
    label_dropout: float = 0.1  # classifier-free guidance (Ho & Salimans 2022): P(label -> null) in training

    prior_type: ClassVar[str] = ""
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.grid_shape, list):  # JSON has no tuples
            self.grid_shape = tuple(self.grid_shape)
        if not (isinstance(self.grid_shape, tuple) and len(self.grid_shape) == 2):
            raise TypeError(f"grid_shape must be a pair (h, w) of ints, got {self.grid_shape!r}")
        for axis, size in zip(("grid_shape[0]", "grid_shape[1]"), self.grid_shape):
            _check_int(axis, size, minimum=1)
        _check_int("codebook_size", self.codebook_size, minimum=2)
        _check_int("num_classes", self.num_classes, minimum=0)
        _check_probability("label_dropout", self.label_dropout)
        self.label_dropout = float(self.label_dropout)

    @property
    def num_tokens(self) -> int:
        """Tokens per grid, h * w."""
        return self.grid_shape[0] * self.grid_shape[1]

    @property
    def null_class_id(self) -> int:
        """The reserved class id meaning "no label" (used by label dropout and guidance)."""
        return self.num_classes

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PriorConfig:
        """Build a named preset (e.g. `"tiny"` for tests), with any field overridden by keyword."""
        if name not in cls.presets:
            raise ValueError(f"preset must be one of {sorted(cls.presets)}, got {name!r}")
        return cls(**{**cls.presets[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including `prior_type` and `config_version`."""
        fields = dataclasses.asdict(self)
        fields["grid_shape"] = list(self.grid_shape)
        return {"prior_type": self.prior_type, "config_version": CONFIG_VERSION, **fields}


@dataclass
class PixelCNNConfig(PriorConfig):
    """Gated PixelCNN (van den Oord et al. 2016) over code embeddings."""

    hidden_channels: int = 128  # width of the vertical and horizontal stacks (and of the code embedding)
    num_layers: int = 8  # gated layers; receptive field grows by kernel_size // 2 rows/columns per layer
    kernel_size: int = 5  # odd; the vertical stack uses (k//2 [+1]) x k taps, the horizontal 1 x (k//2 [+1])
    output_channels: int = 256  # width of the 1x1 output head before the K-way logits

    prior_type: ClassVar[str] = "pixelcnn"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(grid_shape=(4, 4), codebook_size=16, hidden_channels=16, num_layers=3, kernel_size=3,
                     output_channels=32),
        # Sized for `vqstack quickstart` (8x8 grids of a digits tokenizer) on a 2-core CPU.
        "quickstart": dict(grid_shape=(8, 8), codebook_size=256, hidden_channels=64, num_layers=6, kernel_size=3,
                           output_channels=128),
        "base": dict(grid_shape=(16, 16), codebook_size=1024),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("hidden_channels", self.hidden_channels, minimum=1)
        _check_int("num_layers", self.num_layers, minimum=1)
        _check_int("kernel_size", self.kernel_size, minimum=3)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        _check_int("output_channels", self.output_channels, minimum=1)


@dataclass
class TransformerPriorConfig(PriorConfig):
    """GPT-2 style causal Transformer over the raster-flattened grid."""

    hidden_size: int = 256  # d_model
    num_layers: int = 8
    num_heads: int = 8  # must divide hidden_size
    intermediate_size: int = 1024  # MLP width, 4 * d in GPT-2
    dropout: float = 0.0  # residual/attention/embedding dropout during training
    pkeep: float = 1.0  # training: keep each input code with this prob, else a random code (Esser et al. 2021)

    prior_type: ClassVar[str] = "transformer"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": dict(grid_shape=(4, 4), codebook_size=16, hidden_size=32, num_layers=2, num_heads=2,
                     intermediate_size=64),
        # Sized for `vqstack quickstart` (8x8 grids of a digits tokenizer) on a 2-core CPU.
        "quickstart": dict(grid_shape=(8, 8), codebook_size=256, hidden_size=128, num_layers=4, num_heads=4,
                           intermediate_size=512, dropout=0.1),
        "base": dict(grid_shape=(16, 16), codebook_size=1024),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("hidden_size", self.hidden_size, minimum=1)
        _check_int("num_layers", self.num_layers, minimum=1)
        _check_int("num_heads", self.num_heads, minimum=1)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads must divide hidden_size={self.hidden_size}, got {self.num_heads}")
        _check_int("intermediate_size", self.intermediate_size, minimum=1)
        _check_probability("dropout", self.dropout)
        _check_probability("pkeep", self.pkeep, low_open=True)
        self.dropout, self.pkeep = float(self.dropout), float(self.pkeep)

    @property
    def vocab_size(self) -> int:
        """Input vocabulary: K codes, num_classes + 1 class tokens (incl. null), one start token."""
        return self.codebook_size + self.num_classes + 2

    @property
    def start_token_id(self) -> int:
        """First input token of unconditional sequences."""
        return self.codebook_size + self.num_classes + 1


CONFIG_CLASSES: dict[str, type[PriorConfig]] = {
    cls.prior_type: cls for cls in (PixelCNNConfig, TransformerPriorConfig)
}


def config_from_dict(data: Any, source: str = "config") -> PriorConfig:
    """Strictly rebuild a config from `to_dict()` output; `source` names the file in error messages."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    data = dict(data)
    prior_type = data.pop("prior_type", None)
    if prior_type not in CONFIG_CLASSES:
        raise ValueError(f"{source}: prior_type must be one of {sorted(CONFIG_CLASSES)}, got {prior_type!r}")
    version = data.pop("config_version", None)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{source}: config_version must be a positive int, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"{source}: config_version {version} is newer than this vqstack understands ({CONFIG_VERSION}); "
            "upgrade vqstack to load it"
        )
    config_class = CONFIG_CLASSES[prior_type]
    expected = {field.name for field in dataclasses.fields(config_class)}
    unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
    if unknown or missing:
        raise ValueError(
            f"{source}: keys do not match a {prior_type!r} config: unknown {unknown}, missing {missing}"
        )
    try:
        return config_class(**data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: invalid value: {error}") from error
