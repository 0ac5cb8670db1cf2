"""`VQTokenizer`: images <-> integer grids, with an HF-style save / load / push API."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, ModelCard, ModelHubMixin
from safetensors.torch import save
from torch import nn

from .autoencoder import Decoder, Encoder
from .config_fields import read_json_file
from .configuration import VQTokenizerConfig
from .image_processor import PROCESSOR_CONFIG_NAME, VQImageProcessor
from .model_card import remove_generated_card, tokenizer_model_card
from .quantizers import CodebookStats, build_quantizer
from .weights import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    create_model_repo,
    load_state_dict_strict,
    resolve_file,
    write_file_atomically,
)

TRAINING_INFO_NAME = "training_info.json"
PIXEL_RANGE_TOLERANCE = 0.01  # accepted overshoot of [-1, 1] (resampling filters ring slightly past the range)


@dataclass
class EncodeOutput:
    """Result of `VQTokenizer.encode`."""

    indices: torch.Tensor  # (B, h, w) int64 code ids
    quantized: torch.Tensor  # (B, D, h, w) codes, straight-through to the encoder
    commit_loss: torch.Tensor  # scalar, beta * ||z - sg[e]||^2
    quantizer_loss: torch.Tensor  # scalar, every auxiliary quantizer term (commitment + codebook + entropy)
    stats: CodebookStats


@dataclass
class TokenizerOutput:
    """Result of `VQTokenizer.forward`: what a training step needs."""

    reconstruction: torch.Tensor  # (B, C, H, W) decoder output, not clamped
    indices: torch.Tensor  # (B, h, w)
    quantizer_loss: torch.Tensor  # scalar, add to the reconstruction loss
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    entropy_loss: torch.Tensor
    stats: CodebookStats


class VQTokenizer(nn.Module, ModelHubMixin, library_name="vqstack", tags=["vqstack", "image-tokenizer", "vqgan"]):
    """A VQGAN-style image tokenizer: conv encoder -> codebook quantizer -> conv decoder.

    `encode(pixel_values).indices` turns float images (B, C, H, W) in [-1, 1] into code ids (B, H/f, W/f);
    `decode(indices)` turns them back into images in [-1, 1]. `image_processor` converts PIL / numpy / uint8
    images to and from those tensors and is saved alongside the weights.
    """

    def __init__(self, config: VQTokenizerConfig, image_processor: VQImageProcessor | None = None):
        super().__init__()
        if not isinstance(config, VQTokenizerConfig):
            raise TypeError(f"config must be a VQTokenizerConfig, got {type(config).__name__}; "
                            "use VQTokenizerConfig.from_preset(name) or VQTokenizerConfig(...)")
        self.config = config
        self.image_processor = image_processor or VQImageProcessor(
            channels=1 if config.in_channels == 1 else 3, crop_to_multiple=config.downsample_factor)
        if self.image_processor.channels != config.in_channels:
            raise ValueError(f"image_processor.channels={self.image_processor.channels} does not match "
                             f"config.in_channels={config.in_channels}")
        factor = config.downsample_factor
        for name in ("resolution", "crop_to_multiple"):
            value = getattr(self.image_processor, name)
            if value is not None and value % factor:
                raise ValueError(f"image_processor.{name}={value} is not a multiple of the downsampling factor "
                                 f"{factor}: its images could not be encoded")
        self.training_info: dict[str, Any] = {}  # data, steps, metrics: shown on the model card when known
        self.encoder = Encoder(config)
        self.quantizer = build_quantizer(config.quantizer, embed_dim=config.latent_channels)
        self.decoder = Decoder(config)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VQTokenizer:
        """A randomly initialised tokenizer from a named preset (see `VQTokenizerConfig.from_preset`)."""
        return cls(VQTokenizerConfig.from_preset(name, **overrides))

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def trained_resolution(self) -> int | None:
        """The image size it was trained at (exported tokenizers record it in training_info), else its image
        processor's fixed resolution; None when neither is known."""
        for value in (self.training_info.get("resolution"), self.image_processor.resolution):
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def image_processor_for(self, resolution: int | None) -> VQImageProcessor:
        """This tokenizer's image processor (channels, resampling filter) set to resize + center-crop to
        `resolution`, or, with None, to center-crop each image to a multiple of the downsampling factor."""
        if resolution is not None:
            self.token_grid_shape(resolution, resolution)  # fails early if not a multiple of the factor
        return replace(self.image_processor, resolution=resolution,
                       crop_to_multiple=None if resolution is not None else self.downsample_factor)

    def token_grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape (h, w) of the index grid of an image of size (height, width)."""
        self._check_size(height, width)
        return height // self.downsample_factor, width // self.downsample_factor

    # ------------------------------------------------------------------ model
    def encode(self, pixel_values: torch.Tensor) -> EncodeOutput:
        """Images (B, C, H, W) in [-1, 1] -> code ids (B, H/f, W/f) and their codes."""
        self._check_pixels(pixel_values)
        z = self.encoder(self._as_weight_dtype(pixel_values))  # (B, D, h, w)
        q = self.quantizer(z)
        return EncodeOutput(q.indices, q.quantized, q.commit_loss, q.loss, q.stats)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w) -> images (B, C, h*f, w*f) clamped to [-1, 1]."""
        return self.decode_latents(self.indices_to_codes(indices)).clamp(-1.0, 1.0)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w) -> codes (B, D, h, w), validated."""
        self._check_indices(indices)
        return self.quantizer.indices_to_codes(indices.long())

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """Codes (B, D, h, w) -> raw decoder output (B, C, H, W), not clamped."""
        if quantized.dim() != 4 or quantized.shape[1] != self.config.latent_channels:
            raise ValueError(f"quantized must have shape (B, {self.config.latent_channels}, h, w), "
                             f"got {tuple(quantized.shape)}")
        return self.decoder(self._as_weight_dtype(quantized))

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        """Encode, quantize and decode: the reconstruction plus the quantizer's loss terms and statistics."""
        self._check_pixels(pixel_values)
        q = self.quantizer(self.encoder(self._as_weight_dtype(pixel_values)))
        reconstruction = self.decode_latents(q.quantized)  # (B, C, H, W)
        return TokenizerOutput(reconstruction, q.indices, q.loss, q.commit_loss, q.codebook_loss, q.entropy_loss,
                               q.stats)

    def _as_weight_dtype(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the dtype of the conv weights: a tokenizer cast with `.to(torch.bfloat16)` takes float32 images,
        and its decoder the quantizer's float32 codes. A no-op for float32 weights (also under autocast)."""
        return x.to(self.decoder.conv_in.weight.dtype)

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight, where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ input checks
    def _check_size(self, height: int, width: int) -> None:
        f = self.downsample_factor
        if height % f or width % f or height < f or width < f:
            raise ValueError(
                f"pixel_values spatial size {height}x{width} is not divisible by the downsampling factor {f}; "
                f"resize or crop to a multiple of {f} (VQImageProcessor(crop_to_multiple={f}) does this)"
            )

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}; "
                            "convert images with tokenizer.image_processor.preprocess(images)")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a float tensor in [-1, 1], got dtype {pixel_values.dtype}; "
                            "convert uint8 images with tokenizer.image_processor.preprocess(images)")
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must have rank 4 (B, C, H, W), got shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (B=0)")
        if pixel_values.shape[1] != self.config.in_channels:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, but this tokenizer expects "
                             f"in_channels={self.config.in_channels}")
        self._check_size(pixel_values.shape[2], pixel_values.shape[3])
        peak = float(pixel_values.detach().abs().amax())  # one reduction for both checks (NaN propagates)
        if not math.isfinite(peak):
            raise ValueError("pixel_values contains NaN or Inf values")
        if peak > 1.0 + PIXEL_RANGE_TOLERANCE:
            raise ValueError(f"pixel_values must lie in [-1, 1], but |max| is {peak:.4g}; convert images in [0, 255] "
                             "or [0, 1] with tokenizer.image_processor.preprocess(images) (or x * 2 - 1 for [0, 1])")

    def _check_indices(self, indices: torch.Tensor) -> None:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor (B, h, w), got "
                            f"{getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.dim() != 3:
            raise ValueError(f"indices must have shape (B, h, w), got shape {tuple(indices.shape)}")
        if indices.numel() == 0:
            raise ValueError(f"indices is empty (shape {tuple(indices.shape)})")
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> VQTokenizer:
        """Load a tokenizer saved with `save_pretrained`, from a local folder or a Hub repo id.

        Only JSON and safetensors files are read; weights are loaded strictly.
        """
        hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "force_download", "local_files_only", "token")
                      if k in kwargs}
        # Read and validated strictly first (clear errors for a missing, malformed or non-object config.json):
        # ModelHubMixin's own lenient decoding runs before `_from_pretrained` and fails on those with raw errors.
        VQTokenizerConfig.from_json_file(resolve_file(str(pretrained_model_name_or_path), CONFIG_NAME, **hub_kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> str | None:
        """ModelHubMixin.save_pretrained, made safe to interrupt: the mixin deletes config.json before anything is
        written, so a save that fails before the new weights land puts the previous config.json back (from a hard
        link: nothing is written, which a full disk could refuse)."""
        folder = Path(save_directory)
        config, backup = folder / CONFIG_NAME, folder / f".{CONFIG_NAME}.previous"
        weights = folder / WEIGHTS_NAME
        old_weights = weights.stat().st_ino if weights.is_file() else None  # a replaced file has a new inode
        backup.unlink(missing_ok=True)
        if config.is_file():
            with contextlib.suppress(OSError):  # a file system without hard links: no safety net, as before
                os.link(config, backup)
        try:
            return super().save_pretrained(folder, **kwargs)
        except BaseException:
            same_weights = weights.is_file() and weights.stat().st_ino == old_weights
            if backup.exists() and same_weights and not config.exists():
                os.replace(backup, config)
            raise
        finally:
            backup.unlink(missing_ok=True)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """ModelHubMixin.push_to_hub; a training_info.json that an earlier push left in the repo is deleted unless
        this tokenizer uploads its own (the Hub keeps files an upload does not replace). With `private=True`, an existing
        public repo is refused (PermissionError) before anything is uploaded."""
        stale = kwargs.pop("delete_patterns", None) or []
        stale = [stale] if isinstance(stale, str) else list(stale)
        if kwargs.get("private"):  # ModelHubMixin would upload into an existing public repo
            repo_id = create_model_repo(HfApi(token=kwargs.get("token")), repo_id, private=True)
        return super().push_to_hub(repo_id, delete_patterns=[*stale, TRAINING_INFO_NAME], **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write config.json, model.safetensors, preprocessor_config.json (and training_info.json).

        A model card that an earlier save generated here is removed, so that the one written next describes these
        weights; a hand-written README.md is kept.
        """
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # Everything is serialized before any file is touched: metadata that JSON cannot encode must not leave new
        # weights beside the previous save's training_info.json. In memory and written by Python, too, because
        # safetensors' own file writer creates files with mode 0600.
        weights = save(state, metadata={"format": "pt", "library": "vqstack"})
        info = json.dumps(self.training_info, indent=2) + "\n" if self.training_info else None
        # The weights first: a save stopped while writing them (the long write) leaves the previous model whole.
        write_file_atomically(save_directory / WEIGHTS_NAME, weights)
        remove_generated_card(save_directory)
        self.config.to_json_file(save_directory / CONFIG_NAME)
        self.image_processor.save_pretrained(save_directory)
        info_path = save_directory / TRAINING_INFO_NAME
        if info is not None:
            write_file_atomically(info_path, info)
        else:
            info_path.unlink(missing_ok=True)  # left by an earlier save to this folder; it describes other weights

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: str | Path | None = None,
                         force_download: bool = False, local_files_only: bool = False, token: str | bool | None = None,
                         map_location: str = "cpu", torch_dtype: torch.dtype | str | None = None,
                         **passed_on: Any) -> VQTokenizer:
        """`torch_dtype`: None keeps float32 whatever the file holds, "auto" the floating dtype the weights were
        saved in, or a floating torch dtype to cast to (as `.to(dtype)`)."""
        # ModelHubMixin passes the decoded config (and, in older huggingface_hub versions, the download options
        # below) on; anything else is a keyword this loader does not know and would otherwise drop silently.
        unknown = sorted(set(passed_on) - {"config", "proxies", "resume_download"})
        if unknown:
            raise TypeError(f"VQTokenizer.from_pretrained got unexpected keyword argument(s) {unknown}; it takes "
                            "the Hub download options, map_location and torch_dtype")
        if not (torch_dtype is None or torch_dtype == "auto"
                or (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point)):
            raise ValueError(f"torch_dtype must be None, 'auto' or a floating torch dtype, got {torch_dtype!r}")
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                   local_files_only=local_files_only, token=token)
        # The config is re-read and validated strictly here (unknown keys, types, version) rather than trusting
        # the lenient decoding done by ModelHubMixin.
        config = VQTokenizerConfig.from_json_file(resolve_file(model_id, CONFIG_NAME, **hub))
        processor_file = resolve_file(model_id, PROCESSOR_CONFIG_NAME, required=False, **hub)
        processor = VQImageProcessor.from_json_file(processor_file) if processor_file else None
        model = cls(config, image_processor=processor)
        saved_dtype = load_state_dict_strict(model, resolve_file(model_id, WEIGHTS_NAME, **hub))
        info_file = resolve_file(model_id, TRAINING_INFO_NAME, required=False, **hub)
        if info_file:
            info = read_json_file(info_file)
            if not isinstance(info, dict):
                raise ValueError(f"{info_file} must hold a JSON object, got {type(info).__name__}")
            model.training_info = info
        model = model.to(map_location)
        dtype = saved_dtype if torch_dtype == "auto" else torch_dtype
        if dtype is not None and dtype != torch.float32:
            model = model.to(dtype)
        return model.eval()

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        return tokenizer_model_card(self)
