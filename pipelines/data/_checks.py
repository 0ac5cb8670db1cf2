"""Argument checks shared by the data modules: fail early, naming the argument, its value and what was expected."""

from __future__ import annotations

import numpy as np


def check_int(argument: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int, got {value!r} ({type(value).__name__})")


def check_positive_int(argument: str, value: object) -> None:
    check_int(argument, value)
    if value < 1:
        raise ValueError(f"{argument} must be a positive int, got {value}")


def check_resolution_flag(resolution: int, downsample_factor: int) -> None:
    """--resolution must be a positive multiple of the tokenizer's downsampling factor (the grid is resolution / f)."""
    if resolution < 1 or resolution % downsample_factor:
        nearest = max(downsample_factor, round(resolution / downsample_factor) * downsample_factor)
        raise ValueError(f"--resolution {resolution} is not a positive multiple of the tokenizer's downsampling factor "
                         f"{downsample_factor}: use a multiple of {downsample_factor}, e.g. --resolution {nearest}")
