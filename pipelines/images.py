"""Image grids and PNG output."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer.weights import write_file_atomically


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] -> (B, H, W, C) uint8."""
    return pixel_values.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(pixel_values: torch.Tensor, columns: int, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one PIL image, `columns` per row, optionally upscaled."""
    images = to_uint8(pixel_values)
    count, height, width, channels = images.shape
    rows = -(-count // columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255, np.uint8)
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top:top + height, left:left + width] = image
    result = Image.fromarray(grid[:, :, 0] if channels == 1 else grid)
    if scale > 1:
        result = result.resize((result.width * scale, result.height * scale), Image.Resampling.NEAREST)
    return result


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (encoded in memory, then `write_file_atomically`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_file_atomically(path, buffer.getvalue())
    return path
