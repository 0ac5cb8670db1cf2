"""Training/validation image transforms, batch collation and label bookkeeping for image datasets.

Pixel conversion (mode, [-1, 1] scaling, resize + center crop) goes through the tokenizer's
`VQImageProcessor`, so training batches and images tokenized later are prepared by the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import datasets
import torch
from PIL import Image

from tokenizer import VQImageProcessor
from tokenizer.image_processor import convert_mode

from ._checks import check_positive_int


def set_image_transforms(
    dataset_dict: datasets.DatasetDict,
    *,
    resolution: int,
    channels: int,
    random_flip: bool = True,
    random_crop: bool = True,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Attach on-the-fly transforms (``set_transform``) that turn ``"image"`` into ``"pixel_values"``.

    Train split: resize the shorter side to `resolution`, then a random crop (center crop when `random_crop` is
    False) and a random horizontal flip (when `random_flip`), the augmentation of the VQGAN/diffusers image
    training scripts. Other splits: deterministic resize + center crop, so that validation metrics are
    comparable across epochs. The train split gets an ``"example_index"`` column, and each example's crop and
    flip are drawn from a generator seeded by (`seed`, epoch, example index): augmentation never depends on
    when a batch is fetched (loaders prefetch), so a resumed run sees exactly the same pixels. The train
    transform is kept as ``dataset_dict["train"].augmentation``; call its ``set_epoch`` at each epoch.

    Each example becomes ``{"pixel_values": float32 (channels, resolution, resolution) in [-1, 1]}``, plus
    ``"label"`` when the split has one. The datasets are modified in place and returned.
    """
    check_positive_int("resolution", resolution)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise TypeError(f"dataset_dict must be a datasets.DatasetDict, got {type(dataset_dict).__name__}")
    for name, split in dataset_dict.items():
        if "image" not in split.column_names:
            raise ValueError(f"the {name!r} split has no 'image' column; its columns are {split.column_names}")
        if name == "train":
            if "example_index" not in split.column_names:
                split = dataset_dict[name] = split.add_column("example_index", list(range(len(split))))
            transform = TrainAugmentation(resolution, channels, random_flip, random_crop, seed)
            split.augmentation = transform
        else:
            transform = _eval_transform(resolution, channels)
        split.set_transform(transform)
    return dataset_dict


class TrainAugmentation:
    """Random crop + flip of each example, seeded by (seed, epoch, example index)."""

    def __init__(self, resolution: int, channels: int, random_flip: bool, random_crop: bool, seed: int):
        self.processor = VQImageProcessor(channels=channels)  # images arrive already cropped to size
        self.resolution, self.random_flip, self.random_crop, self.seed = resolution, random_flip, random_crop, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, batch: dict) -> dict:
        images = []
        for image, index in zip(batch["image"], batch["example_index"]):
            # reduced mod 2**63 (manual_seed's range); smaller values are unchanged, so are existing runs' crops
            key = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index)) % 2**63
            generator = torch.Generator().manual_seed(key)
            # Converted before resizing: PIL resizes palette images with nearest neighbour whatever the filter.
            image = convert_mode(image, self.processor.channels)
            image = _crop(_resize_shorter_side(image, self.resolution), self.resolution, self.random_crop, generator)
            if self.random_flip and torch.rand((), generator=generator) < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(image)
        return _with_labels(batch, self.processor(images))


def _eval_transform(resolution: int, channels: int) -> Callable:
    processor = VQImageProcessor(channels=channels, resolution=resolution)  # resize + center crop

    def transform(batch: dict) -> dict:
        return _with_labels(batch, processor(batch["image"]))

    return transform


def _with_labels(batch: dict, pixel_values: torch.Tensor) -> dict:
    output = {"pixel_values": pixel_values}  # (B, C, H, W)
    if "label" in batch:
        output["label"] = [-1 if label is None else int(label) for label in batch["label"]]  # -1: no label
    return output


def _resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _crop(image: Image.Image, resolution: int, random: bool, generator: torch.Generator) -> Image.Image:
    free_x, free_y = image.width - resolution, image.height - resolution
    if random:
        left = int(torch.randint(free_x + 1, (), generator=generator))
        top = int(torch.randint(free_y + 1, (), generator=generator))
    else:
        left, top = free_x // 2, free_y // 2
    return image.crop((left, top, left + resolution, top + resolution))


def collate_images(examples: list[dict]) -> dict:
    """Stack transformed examples into ``{"pixel_values": (B, C, H, W) float32, "labels": (B,) int64}``.

    ``"labels"`` is present only when every example has a ``"label"``.
    """
    if not examples:
        raise ValueError("examples is empty; expected at least one example")
    if any("pixel_values" not in example for example in examples):
        raise ValueError("every example needs 'pixel_values'; call set_image_transforms on the dataset first")
    pixel_values = torch.stack([example["pixel_values"] for example in examples])  # (B, C, H, W)
    batch = {"pixel_values": pixel_values.to(torch.float32).contiguous()}
    labelled = sum("label" in example for example in examples)
    if labelled == len(examples):
        batch["labels"] = torch.tensor([int(example["label"]) for example in examples], dtype=torch.int64)  # (B,)
    elif labelled:
        raise ValueError(f"{labelled} of {len(examples)} examples have a 'label'; expected all or none")
    return batch


def infer_num_classes(dataset: datasets.Dataset | datasets.DatasetDict) -> int:
    """Number of classes of the ``"label"`` column: from its ``ClassLabel``, else max label + 1; 0 if unlabelled.

    For a ``DatasetDict``, the labels of all splits count.
    """
    splits = list(dataset.values()) if isinstance(dataset, datasets.DatasetDict) else [dataset]
    if not all(isinstance(split, datasets.Dataset) for split in splits):
        raise TypeError(f"dataset must be a datasets.Dataset or DatasetDict, got {type(dataset).__name__}")
    labelled = [split for split in splits if "label" in split.column_names]
    if not labelled:
        return 0
    feature = labelled[0].features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    # `with_format` returns a copy without the image transform, so only the label column is read.
    maxima = [
        int(split.with_format("numpy", columns=["label"])[:]["label"].max()) for split in labelled if len(split)
    ]
    return max(maxima) + 1 if maxima else 0
