"""Checks of image batches shared by the losses and the metrics (no heavy imports: the metrics load it at start-up)."""

import torch


def check_image_pair(first: torch.Tensor, second: torch.Tensor,
                     names: tuple[str, str] = ("pixel_values", "reconstruction")) -> None:
    """Raise if the two image batches are not float tensors of one shape (B, C, H, W)."""
    for name, value in zip(names, (first, second)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor (B, C, H, W), got {type(value).__name__}"
                            + (f" of dtype {value.dtype}" if isinstance(value, torch.Tensor) else ""))
        if value.ndim != 4:
            raise ValueError(f"{name} must have 4 dims (B, C, H, W), got shape {tuple(value.shape)}")
    if first.shape != second.shape:
        raise ValueError(f"{names[0]} shape {tuple(first.shape)} and {names[1]} shape {tuple(second.shape)}: the batches "
                         "differ in shape")
