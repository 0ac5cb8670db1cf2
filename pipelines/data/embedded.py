"""Embedded image datasets built from pictures that ship inside scikit-learn and scikit-image.

They need no network, so the quickstart and the tests run anywhere:

- ``"digits"``: the 1797 labelled 8x8 handwritten digits of scikit-learn (UCI optdigits), upsampled to
  ``resolution`` as grayscale images, with a stratified held-out validation split.
- ``"natural-patches"``: square RGB patches cut at several scales from natural photos. Train and validation
  patches come from different photos, so validation measures generalisation to unseen pictures rather than
  to unseen crops of pictures already seen in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ._checks import check_int, check_positive_int

EMBEDDED_DATASETS: tuple[str, ...] = ("digits", "natural-patches")

DIGIT_CLASS_NAMES = tuple(str(digit) for digit in range(10))
DIGITS_VALIDATION_FRACTION = 0.1  # ~180 of the 1797 digits
PATCHES_NUM_TRAIN = 20_000
PATCHES_NUM_VALIDATION = 1_000
# Each photo is also cut at 1/2 and 1/4 size (an image pyramid, as in Burt & Adelson 1983): at full size most
# 32 px patches of a 512 px photo are smooth surfaces, while the smaller scales add patches holding edges and
# whole objects, which a tokenizer must also learn to reconstruct.
PATCH_SCALES = (1.0, 0.5, 0.25)


def load_embedded_dataset(
    name: str,
    *,
    resolution: int = 32,
    seed: int = 0,
    num_train: int | None = None,
    num_validation: int | None = None,
) -> datasets.DatasetDict:
    """Build one of `EMBEDDED_DATASETS` in memory, without any network access.

    Args:
        name: ``"digits"`` or ``"natural-patches"``.
        resolution: side of the square images produced.
        seed: seeds the split (digits) or the patch positions (natural-patches); same seed, same dataset.
        num_train: digits: at most this many training images (default: all 1617 left after the validation
            split); natural-patches: number of training patches (default 20000).
        num_validation: digits: size of the held-out split (default 180, ~10%); natural-patches: number of
            validation patches (default 1000).

    Returns:
        ``DatasetDict`` with ``"train"`` and ``"validation"`` splits; column ``"image"`` (PIL) and, for digits,
        ``"label"`` (``ClassLabel`` with names ``"0"``..``"9"``).
    """
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"name must be one of {EMBEDDED_DATASETS}, got {name!r}")
    check_positive_int("resolution", resolution)
    check_int("seed", seed)
    for argument, value in (("num_train", num_train), ("num_validation", num_validation)):
        if value is not None:
            check_positive_int(argument, value)
    if name == "digits":
        return _load_digits(resolution, seed, num_train, num_validation)
    return _load_natural_patches(
        resolution,
        seed,
        PATCHES_NUM_TRAIN if num_train is None else num_train,
        PATCHES_NUM_VALIDATION if num_validation is None else num_validation,
    )


# ---------------------------------------------------------------------------------------------- digits
def _load_digits(
    resolution: int, seed: int, num_train: int | None, num_validation: int | None
) -> datasets.DatasetDict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)  # (N,)
    total = len(labels)
    if num_validation is None:
        num_validation = round(DIGITS_VALIDATION_FRACTION * total)
    if num_validation >= total:
        raise ValueError(f"num_validation={num_validation} leaves no training digit; expected < {total}")
    # Stratified, so that every digit keeps its share in both splits (needs at least one digit per class).
    stratify = labels if min(num_validation, total - num_validation) >= len(DIGIT_CLASS_NAMES) else None
    train_indices, validation_indices = train_test_split(
        np.arange(total), test_size=num_validation, stratify=stratify, random_state=seed
    )
    if num_train is not None:
        train_indices = train_indices[:num_train]  # a cap; already shuffled by train_test_split

    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGIT_CLASS_NAMES))}
    )

    def build(indices: np.ndarray) -> datasets.Dataset:
        images = [_encode(_upsample_digit(pixels[i], resolution)) for i in indices]
        return datasets.Dataset.from_dict({"image": images, "label": labels[indices].tolist()}, features=features)

    return datasets.DatasetDict({"train": build(train_indices), "validation": build(validation_indices)})


def _upsample_digit(pixels: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (8, 8) -> uint8 (resolution, resolution)."""
    # Bicubic interpolation turns the 8x8 blocks into smooth strokes; nearest would keep hard pixel edges that
    # a convolutional tokenizer would spend capacity on.
    return np.asarray(Image.fromarray(pixels).resize((resolution, resolution), Image.Resampling.BICUBIC))


def _encode(pixels: np.ndarray) -> dict:
    """uint8 (H, W) or (H, W, 3) -> an undecoded `datasets.Image` value holding a binary PGM/PPM file."""
    # Netpbm is a header plus the raw pixels: lossless, written with no per-image encoder call (20000 patches
    # in ~0.1 s instead of several seconds for the PNG `datasets.Image` would write), and read by PIL as "L"/"RGB".
    height, width = pixels.shape[:2]
    magic = "P5" if pixels.ndim == 2 else "P6"
    return {"bytes": f"{magic} {width} {height} 255\n".encode() + np.ascontiguousarray(pixels).tobytes(), "path": None}


# ------------------------------------------------------------------------------------ natural patches
@dataclass(frozen=True)
class Photo:
    """A natural RGB photo shipped inside an installed package ("skimage" or "sklearn")."""

    package: str
    file_name: str

    def load(self) -> np.ndarray:
        """The photo as uint8 (H, W, 3), read from the package's own files (never downloaded)."""
        if self.package == "sklearn":
            from sklearn.datasets import load_sample_image  # sklearn/datasets/images ships inside the wheel

            return np.asarray(load_sample_image(self.file_name))
        # Read the file from the installed package directory rather than through `skimage.data.<name>()`, which
        # falls back to a pooch download for images that are not shipped.
        import skimage.data

        path = Path(skimage.data.__file__).parent / self.file_name
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.file_name} is not shipped with the installed scikit-image ({path} is missing); "
                "the 'natural-patches' dataset needs a complete scikit-image installation"
            )
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))


# The natural photographs among the shipped images: not the astronomy, medical or microscopy ones, only the
# left view of the stereo pair, and not `cat` (the same picture as `chelsea`). Validation photos are held out
# entirely: no photo contributes to both splits.
TRAIN_PHOTOS = (
    Photo("skimage", "astronaut.png"),
    Photo("skimage", "chelsea.png"),
    Photo("skimage", "rocket.jpg"),
    Photo("skimage", "motorcycle_left.png"),
    Photo("sklearn", "china.jpg"),
)
VALIDATION_PHOTOS = (
    Photo("skimage", "coffee.png"),
    Photo("sklearn", "flower.jpg"),
)


def _load_natural_patches(resolution: int, seed: int, num_train: int, num_validation: int) -> datasets.DatasetDict:
    features = datasets.Features({"image": datasets.Image()})
    splits = {}
    for stream, (split, photos, count) in enumerate(
        (("train", TRAIN_PHOTOS, num_train), ("validation", VALIDATION_PHOTOS, num_validation))
    ):
        # One independent random stream per split, both derived from `seed`.
        rng = np.random.default_rng([seed, stream])
        patches = sample_patches([photo.load() for photo in photos], resolution, count, rng)  # (n, r, r, 3)
        images = [_encode(patch) for patch in patches]
        splits[split] = datasets.Dataset.from_dict({"image": images}, features=features)
    return datasets.DatasetDict(splits)


def sample_patches(
    photos: list[np.ndarray], resolution: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Cut `count` random ``resolution`` x ``resolution`` patches from an image pyramid of `photos`.

    A pyramid level (photo, scale) is drawn uniformly for each patch, then a uniform position inside it.
    Returns uint8 (count, resolution, resolution, 3).
    """
    levels = [level for photo in photos for level in _pyramid(photo, resolution)]
    level_of_patch = rng.integers(len(levels), size=count)  # (count,)
    patches = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    for level_index, level in enumerate(levels):
        chosen = np.flatnonzero(level_of_patch == level_index)
        if len(chosen) == 0:
            continue
        height, width = level.shape[:2]
        tops = rng.integers(height - resolution + 1, size=len(chosen))
        lefts = rng.integers(width - resolution + 1, size=len(chosen))
        # A strided view of every window: fancy indexing gathers all the crops of this level in one copy.
        windows = np.lib.stride_tricks.sliding_window_view(level, (resolution, resolution), axis=(0, 1))
        patches[chosen] = windows[tops, lefts].transpose(0, 2, 3, 1)  # (k, 3, r, r) -> (k, r, r, 3)
    return patches


def _pyramid(photo: np.ndarray, resolution: int) -> list[np.ndarray]:
    """The photo at each of `PATCH_SCALES` whose shorter side still holds a patch; upscaled if none does."""
    image = Image.fromarray(photo)
    shorter = min(image.size)
    levels = []
    for scale in PATCH_SCALES:
        if shorter * scale < resolution:
            continue
        size = (round(image.width * scale), round(image.height * scale))
        levels.append(np.asarray(image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)))
    if not levels:  # patches larger than the photo: upscale it so that its shorter side equals `resolution`
        scale = resolution / shorter
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        levels.append(np.asarray(image.resize(size, Image.Resampling.BICUBIC)))
    return levels
