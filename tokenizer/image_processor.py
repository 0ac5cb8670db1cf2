"""`VQImageProcessor`: PIL images / numpy arrays / uint8 tensors <-> float tensors in [-1, 1]."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .config_fields import check_field_types, dataclass_from_dict, read_json_file
from .weights import write_file_atomically

PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
OutputType = Literal["pil", "np", "pt"]


@dataclass
class VQImageProcessor:
    """Converts images for a tokenizer and back.

    `preprocess` accepts a PIL image, an (H, W) / (H, W, C) numpy array (uint8, or float in [0, 1]), a tensor
    (C, H, W) / (B, C, H, W) (uint8, or float in [0, 1] as torchvision's ToTensor gives), or a list of any of these,
    and returns float32 (B, C, H, W) in [-1, 1].
    With `resolution` set, images are resized (shorter side) and center-cropped to a square of that size;
    otherwise, with `crop_to_multiple` set, they are center-cropped to the nearest multiple of the tokenizer's
    downsampling factor, so that any photo can be tokenized.
    """

    channels: int = 3  # 1 = grayscale ("L"), 3 = RGB
    resolution: int | None = None  # square output size; None keeps each image's own size
    crop_to_multiple: int | None = None  # center-crop H and W down to a multiple of this (the downsampling factor)
    resample: str = "bicubic"  # PIL filter used when resizing

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive int or None, got {self.resolution}")
        if self.crop_to_multiple is not None and self.crop_to_multiple < 1:
            raise ValueError(f"crop_to_multiple must be a positive int or None, got {self.crop_to_multiple}")
        if self.resample not in _FILTERS:
            raise ValueError(f"resample must be one of {sorted(_FILTERS)}, got {self.resample!r}")

    # ---------------------------------------------------------------- images -> tensors
    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> float32 tensor (B, C, H, W) in [-1, 1]."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("images is empty; expected at least one image")
        tensors = [self._to_tensor(self._fit(self._to_pil(image, position))) for position, image in enumerate(images)]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(
                f"images have different sizes {sorted(shapes)}; set `resolution` to resize them to one size"
            )
        return torch.stack(tensors)

    __call__ = preprocess

    def _to_pil(self, image: Any, position: int) -> Image.Image:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, torch.Tensor):
            if image.dim() != 3 or not (image.dtype == torch.uint8 or image.is_floating_point()):
                raise TypeError(
                    f"images[{position}]: tensor images must be uint8 in [0, 255] or float in [0, 1], (C, H, W) or "
                    f"(B, C, H, W); got dtype {image.dtype} with shape {tuple(image.shape)}"
                )
            array = image.detach().cpu()
            if array.is_floating_point():
                array = array.float()
                low, high = (array.min().item(), array.max().item()) if array.numel() else (0.0, 0.0)
                if not (0.0 <= low and high <= 1.0):  # also catches NaN
                    raise ValueError(
                        f"images[{position}]: float tensors must lie in [0, 1] (as torchvision's ToTensor gives), got "
                        f"range [{low:.3g}, {high:.3g}]; tensors already in [-1, 1] need no preprocessing: pass "
                        "them to encode directly")
            pil = _array_to_pil(array.permute(1, 2, 0).numpy(), position)
        elif isinstance(image, np.ndarray):
            pil = _array_to_pil(image, position)
        else:
            raise TypeError(f"images[{position}] has unsupported type {type(image).__name__}; "
                            "expected PIL.Image, numpy array or uint8 torch tensor")
        return convert_mode(pil, self.channels)

    def _fit(self, image: Image.Image) -> Image.Image:
        if self.resolution is not None:
            scale = self.resolution / min(image.size)
            size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
            image = image.resize(size, _FILTERS[self.resample])
            return _center_crop(image, self.resolution, self.resolution)
        if self.crop_to_multiple is not None:
            m = self.crop_to_multiple
            if image.width < m or image.height < m:
                raise ValueError(f"image of size {image.size} is smaller than crop_to_multiple={m}")
            return _center_crop(image, image.width // m * m, image.height // m * m)
        return image

    @staticmethod
    def _to_tensor(image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)  # (C, H, W)

    # ---------------------------------------------------------------- tensors -> images
    def postprocess(self, pixel_values: torch.Tensor, output_type: OutputType = "pil") -> Any:
        """Float (B, C, H, W) in [-1, 1] -> list of PIL images, uint8 numpy (B, H, W, C), or uint8 tensor."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a (B, C, H, W) tensor, got {type(pixel_values).__name__} "
                             f"with shape {tuple(getattr(pixel_values, 'shape', ()))}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")
        images = pixel_values.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).cpu()
        if output_type == "pt":
            return images  # (B, C, H, W) uint8
        array = images.permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        if output_type == "np":
            return array
        return [Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a) for a in array]

    # ---------------------------------------------------------------- persistence
    def save_pretrained(self, save_directory: str | Path) -> None:
        write_file_atomically(Path(save_directory) / PROCESSOR_CONFIG_NAME,
                              json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> VQImageProcessor:
        return dataclass_from_dict(cls, read_json_file(path), source=str(path))


_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """`image` in mode "L" (channels 1) or "RGB" (channels 3).

    16-bit grayscale ("I;16", or "I" holding values above 255) is scaled to 8 bits first: PIL's own conversion
    clips every value above 255 to white. Float images ("F") must already lie in [0, 1].
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
                raise ValueError("float (mode 'F') images must lie in [0, 1]")
            array = array * 255.0
        else:
            if array.min() < 0 or array.max() > 65535:
                raise ValueError(f"mode {image.mode!r} image with values outside [0, 65535]")
            if image.mode.startswith("I;16") or array.max() > 255:
                array = array / 257.0  # 65535 -> 255
        image = Image.fromarray(array.round().astype(np.uint8))
    return image.convert("L" if channels == 1 else "RGB")


def _array_to_pil(array: np.ndarray, position: int) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"images[{position}]: array of shape {array.shape} is not (H, W) or (H, W, 1|3|4)")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"images[{position}] contains NaN or Inf values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"images[{position}]: float arrays must lie in [0, 1], got range "
                             f"[{array.min():.3g}, {array.max():.3g}]")
        array = (array * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"images[{position}]: arrays must be uint8 or float in [0, 1], got dtype {array.dtype}")
    return Image.fromarray(array)


def _center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))
