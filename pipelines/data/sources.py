"""`load_image_dataset`: one entry point for Hub datasets, local image folders and embedded datasets.

Whatever the source, the result is a ``DatasetDict`` with ``"train"`` and ``"validation"`` splits and the
same columns: ``"image"`` (decoded PIL) and, when the source has labels, ``"label"`` (int64 class ids).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import EmptyDatasetError
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import LocalEntryNotFoundError

from ._checks import check_int, check_positive_int
from .embedded import EMBEDDED_DATASETS, load_embedded_dataset

DEFAULT_VALIDATION_SPLIT = 0.05  # fraction held out when a source has no validation split
DEFAULT_RESOLUTION = 32  # image size in pixels when none is given (and none is recorded with the tokenizer)

LABEL_COLUMN_CANDIDATES = ("label", "labels")
VALIDATION_SPLIT_CANDIDATES = ("validation", "valid", "val", "test")


class DatasetUnavailableError(RuntimeError):
    """A Hub dataset could neither be downloaded nor found in the local cache."""


def load_image_dataset(
    *,
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    embedded: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    validation_split: float = DEFAULT_VALIDATION_SPLIT,
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = 0,
    cache_dir: str | None = None,
    strict_data: bool = False,
    max_samples: int | None = None,
    require_labels: bool = False,
) -> datasets.DatasetDict:
    """Load images from exactly one source, with standardized columns and a validation split.

    Args:
        dataset_name: a Hub dataset id, loaded with ``datasets.load_dataset`` (or from its cache when offline).
        train_data_dir: a local folder of images (``imagefolder``); class subfolders become labels.
        embedded: one of `EMBEDDED_DATASETS`, built in memory without network.
        dataset_config_name: the Hub dataset's configuration (subset) name.
        image_column: column holding the images (default: the first ``Image`` column).
        label_column: column holding class labels (default: ``"label"`` or ``"labels"`` when present).
        validation_split: fraction held out for validation when the source has no validation/test split.
        resolution: image size of embedded datasets (others keep their size; see `set_image_transforms`).
        seed: seeds the validation split, the `max_samples` subset and the embedded datasets.
        cache_dir: where ``datasets`` caches downloads and processed files.
        strict_data: raise on the first unreadable image instead of skipping unreadable images with a warning.
        max_samples: keep at most this many training images (a seeded random subset), for quick runs.
        require_labels: the labels will be used (e.g. for a class-conditional prior): refuse examples without one
            (-1 or null), and replace a held-out split with no labels at all (as Hub datasets publish unlabelled
            test splits) by a held-out part of the training split. Without it such labels are left as they are.

    Returns:
        ``DatasetDict`` with ``"train"`` and ``"validation"``; columns ``"image"`` and, if labelled, ``"label"``.
    """
    _check_source(dataset_name, train_data_dir, embedded)
    if dataset_config_name is not None and dataset_name is None:
        raise ValueError(
            f"dataset_config_name={dataset_config_name!r} only applies to a Hub dataset; expected dataset_name too"
        )
    if isinstance(validation_split, bool) or not isinstance(validation_split, (int, float)):
        raise TypeError(f"validation_split must be a float, got {validation_split!r} ({type(validation_split).__name__})")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must lie strictly between 0 and 1, got {validation_split}")
    check_int("seed", seed)
    if max_samples is not None:
        check_positive_int("max_samples", max_samples)

    if embedded is not None:
        # Fixed columns and a fixed held-out split: flags that choose them would otherwise be ignored silently.
        ignored = [f"{name} (--{name})" for name, given in (("image_column", image_column is not None),
                                                             ("label_column", label_column is not None),
                                                             ("validation_split",
                                                              validation_split != DEFAULT_VALIDATION_SPLIT))
                   if given]
        if ignored:
            verb = "does" if len(ignored) == 1 else "do"
            raise ValueError(f"{', '.join(ignored)} {verb} not apply to the embedded dataset {embedded!r}: its columns "
                             "and its held-out split are fixed (see load_embedded_dataset)")
        # Generating fewer images is cheaper than generating all of them and dropping most.
        return load_embedded_dataset(embedded, resolution=resolution, seed=seed, num_train=max_samples)

    if dataset_name is not None:
        raw = _load_hub_dataset(dataset_name, dataset_config_name, cache_dir)
    else:
        raw = _load_image_folder(train_data_dir, cache_dir)
    train, validation = _pick_splits(raw)
    image_key, label_key = _find_columns(train, image_column, label_column)
    # Class-id columns only: any other kind of label column is refused by name in _standardize_columns.
    label_key_ids = label_key if require_labels and label_key and _is_class_label(train.features[label_key]) else None
    if label_key_ids and set(train.unique(label_key)) <= MISSING_LABELS:
        # e.g. an "unlabeled" split: the data is unlabelled, not mislabelled
        warnings.warn(f"the training split has no labels ({label_key!r} is all -1 or empty): the dataset is used "
                      "unlabelled", stacklevel=2)
        label_key = label_key_ids = None
    if label_key_ids and validation is not None and set(validation.unique(label_key)) <= MISSING_LABELS:
        # Hub datasets mark the labels of a test split they do not publish with -1 (or leave them empty).
        warnings.warn(f"the source's held-out split has no labels ({label_key!r} is all -1 or empty): it is not used; "
                      f"validation_split={validation_split} of the training split is held out instead", stacklevel=2)
        validation = None
    for name, split in (("train", train), ("validation", validation)):
        if label_key_ids and split is not None:
            missing = MISSING_LABELS & set(split.unique(label_key))
            if missing:
                raise ValueError(f"the {name!r} split has examples without a label ({label_key!r} holds "
                                 f"{sorted(map(repr, missing))}); remove them, or pass the columns of an unlabelled "
                                 "dataset without a label column")
    splits = _standardize_columns({"train": train, "validation": validation}, image_key, label_key)
    if splits["validation"] is None:
        splits = _split_off_validation(splits["train"], validation_split, seed)
    if max_samples is not None and max_samples < len(splits["train"]):
        # Capped before the image check below, so that a quick run does not read the whole dataset.
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(max_samples))
    return _drop_unreadable_images(datasets.DatasetDict(splits), strict=strict_data)


MISSING_LABELS = {-1, None, ""}  # how Hub datasets mark an example without a label


def _check_source(dataset_name: str | None, train_data_dir: str | None, embedded: str | None) -> None:
    given = {
        name: value
        for name, value in (("dataset_name", dataset_name), ("train_data_dir", train_data_dir), ("embedded", embedded))
        if value is not None
    }
    if len(given) != 1:
        raise ValueError(
            "expected exactly one of dataset_name (a Hub id), train_data_dir (a local image folder) or embedded "
            f"(one of {EMBEDDED_DATASETS}); got {given or 'none'}"
        )
    if embedded is not None and embedded not in EMBEDDED_DATASETS:
        raise ValueError(f"embedded (--dataset) must be one of {EMBEDDED_DATASETS}, got {embedded!r}")


# ------------------------------------------------------------------------------------------ sources
def _load_hub_dataset(
    dataset_name: str, dataset_config_name: str | None, cache_dir: str | None
) -> datasets.DatasetDict:
    try:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError, DatasetNotFoundError) as error:
        # `datasets` reports an unreachable Hub as a bare ConnectionError; say what to do about it.
        raise DatasetUnavailableError(
            f"could not load the Hub dataset {dataset_name!r}"
            + (f" (config {dataset_config_name!r})" if dataset_config_name else "")
            + f": it is neither reachable on the Hub nor in the local cache ({type(error).__name__}: {error}). "
            "Either download it on a machine with network access and copy its images to a local folder "
            "(one subfolder per class for labels), then pass that folder with --train_data_dir; or pre-fill the "
            "cache given by --cache_dir; or train on an embedded dataset that needs no network with "
            f"--dataset digits (or one of {EMBEDDED_DATASETS})."
        ) from error


def _load_image_folder(train_data_dir: str, cache_dir: str | None) -> datasets.DatasetDict:
    if not Path(train_data_dir).is_dir():
        raise ValueError(f"train_data_dir={train_data_dir!r} is not an existing directory; expected a folder of images")
    try:
        raw = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    except (EmptyDatasetError, ValueError) as error:
        if not isinstance(error, EmptyDatasetError) and "corresponds to no data" not in str(error):
            raise
        raise ValueError(f"no image files found under train_data_dir={train_data_dir!r} (looked for the extensions "
                         "datasets' imagefolder reads, e.g. .png, .jpg, .jpeg, .webp, .bmp)") from error
    if not any("label" in (split.features or {}) for split in raw.values()):
        classes = _ignored_class_folders(Path(train_data_dir))
        if classes:
            warnings.warn(
                f"train_data_dir={train_data_dir!r} has class-like subfolders ({', '.join(classes[:5])}"
                f"{', ...' if len(classes) > 5 else ''}) but datasets' imagefolder gave no labels: it infers them only "
                "when every image file lies at the same depth (class folders, optionally inside train/validation/test "
                "folders), and some lie at another depth here. The images are used unlabelled; move the other image "
                "files into class folders for labels.", stacklevel=3)
    return raw


IMAGEFOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


def _ignored_class_folders(root: Path) -> list[str]:
    """Class-like folders (up to two levels down, split folders such as train/ or test/ aside, that hold image
    files) when there are at least two and other image files lie at another depth: the layout in which datasets'
    imagefolder silently drops its class labels. Empty otherwise, and when a metadata file describes the folder."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    split_names = {"train", "training", *VALIDATION_SPLIT_CANDIDATES}
    depths: set[int] = set()
    classes = []
    for directory, subdirectories, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        depth = len(relative.parts)
        if any(name in IMAGEFOLDER_METADATA for name in files):
            return []  # labels, if any, come from the metadata file
        has_images = any(Path(name).suffix.lower() in extensions for name in files)
        if has_images:
            depths.add(depth)
            if 1 <= depth <= 2 and relative.name.lower() not in split_names:
                classes.append(str(relative))
        if depth >= 3:
            subdirectories.clear()  # deep enough to tell depths apart; large trees are not walked to the end
    return sorted(classes) if len(classes) >= 2 and len(depths) > 1 else []


def _pick_splits(raw: datasets.DatasetDict) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training split and, if the source has one, its validation (or test) split."""
    if "train" in raw:
        train_name = "train"
    elif len(raw) == 1:
        train_name = next(iter(raw))
    else:
        raise ValueError(f"the dataset has no 'train' split; its splits are {list(raw)}")
    validation_name = next((name for name in VALIDATION_SPLIT_CANDIDATES if name in raw and name != train_name), None)
    return raw[train_name], (raw[validation_name] if validation_name else None)


def _find_columns(
    dataset: datasets.Dataset, image_column: str | None, label_column: str | None
) -> tuple[str, str | None]:
    """Names of the image column and of the label column (None when the dataset is unlabelled)."""
    features = dataset.features
    described = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    if image_column is None:
        candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if not candidates:
            raise ValueError(f"the dataset has no Image column; pass image_column= (--image_column) one of its columns: {described}")
        image_column = "image" if "image" in candidates else candidates[0]
        if len(candidates) > 1:
            warnings.warn(f"the dataset has several Image columns {candidates}: using {image_column!r}; pass "
                          "image_column= (--image_column) to choose another", stacklevel=3)
    elif image_column not in features:
        raise ValueError(f"image_column (--image_column) {image_column!r} is not a column of the dataset; its columns are: {described}")
    if label_column is None:  # only a column that can hold class ids; multi-label lists, for one, are left out
        label_column = next(
            (name for name in LABEL_COLUMN_CANDIDATES if name in features and _is_class_label(features[name])), None
        )
    elif label_column not in features:
        raise ValueError(f"label_column (--label_column) {label_column!r} is not a column of the dataset; its columns are: {described}")
    return image_column, label_column


def _standardize_columns(
    splits: dict[str, datasets.Dataset | None], image_key: str, label_key: str | None
) -> dict[str, datasets.Dataset | None]:
    """Keep only the image and label columns, renamed to "image" and "label"; labels become class ids."""
    present = {name: split for name, split in splits.items() if split is not None}
    class_names = _string_label_names(present.values(), label_key) if label_key else None
    for name, split in present.items():
        keep = [image_key] + ([label_key] if label_key else [])
        renames = {old: new for old, new in ((image_key, "image"), (label_key, "label")) if old and old != new}
        split = split.select_columns(keep).rename_columns(renames)
        split = split.cast_column("image", datasets.Image())  # decoded, whatever the source stored
        if label_key:
            split = _labels_to_class_ids(split, class_names, label_key)
        splits[name] = split
    return splits


def _string_label_names(splits, label_key: str) -> list[str] | None:
    """Sorted label names across all splits when labels are strings (one shared vocabulary), else None."""
    feature = next(iter(splits)).features[label_key]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return None
    # missing labels (None) are no class: they become -1, and are refused where labels are required
    return sorted({value for split in splits for value in split.unique(label_key)} - {None})


def _is_class_label(feature: object) -> bool:
    return isinstance(feature, datasets.ClassLabel) or (
        isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint", "string", "large_string"))
    )


def _labels_to_class_ids(split: datasets.Dataset, class_names: list[str] | None, label_key: str) -> datasets.Dataset:
    feature = split.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return split
    if class_names is not None:
        return split.cast_column("label", datasets.ClassLabel(names=class_names))
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return split.cast_column("label", datasets.Value("int64"))
    raise ValueError(
        f"label_column (--label_column) {label_key!r} holds {feature}; expected integer class ids, a ClassLabel or strings"
    )


def _split_off_validation(train: datasets.Dataset, validation_split: float, seed: int) -> dict[str, datasets.Dataset]:
    num_validation = max(1, round(validation_split * len(train)))
    if num_validation >= len(train):
        raise ValueError(
            f"the dataset has {len(train)} image(s): too few to hold out validation_split={validation_split} "
            "and keep training images; expected at least 2 images"
        )
    parts = train.train_test_split(test_size=num_validation, seed=seed)
    return {"train": parts["train"], "validation": parts["test"]}


# ------------------------------------------------------------------------------------ image checks
def _drop_unreadable_images(splits: datasets.DatasetDict, *, strict: bool) -> datasets.DatasetDict:
    """Remove images that fail to decode (corrupt, truncated, not an image), once, at load time.

    A broken file would otherwise surface as an exception deep inside a DataLoader worker, hours into training.
    """
    skipped = {}
    first_bad = None
    for name, split in splits.items():
        # Check the undecoded bytes/paths so that a broken file is caught here, not by `datasets` decoding it.
        undecoded = split.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
        readable = undecoded.map(_readable_flags, batched=True, remove_columns=["image"], desc="Checking images")
        readable = list(readable["readable"])
        bad = [index for index, ok in enumerate(readable) if not ok]
        if bad and first_bad is None:
            value = undecoded[bad[0]]["image"]
            path = (value or {}).get("path")  # None for a missing image
            first_bad = (repr(path) if path else f"at row {bad[0]} of the {name!r} split") + f" ({decode_checked(value)[1]})"
        if bad:
            if strict:
                raise ValueError(
                    f"unreadable image {first_bad} ({len(bad)} unreadable image(s) in the {name!r} split); "
                    "fix or remove the file(s), or pass strict_data=False (no --strict_data) to skip them with a "
                    "warning"
                )
            splits[name] = split.select([index for index, ok in enumerate(readable) if ok])
            skipped[name] = len(bad)
        if len(splits[name]) == 0:
            raise ValueError(f"the {name!r} split has no readable image left ({len(split)} image(s) before the check)")
    if skipped:
        counts = ", ".join(f"{count} in {name!r}" for name, count in skipped.items())
        warnings.warn(
            f"skipped {sum(skipped.values())} unreadable image(s) ({counts}); first: {first_bad}. "
            "Pass strict_data=True (--strict_data) to raise instead.",
            stacklevel=3,
        )
    return splits


# PIL modes without colour: bilevel, 8/16/32-bit and float grayscale, grayscale with alpha.
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")


def infer_channels(dataset: datasets.Dataset) -> int:
    """1 when every image of `dataset` is grayscale (see `GRAYSCALE_MODES`), else 3.

    Every image counts, not just the first: one colour image makes the dataset RGB. Only image headers are read.
    """
    undecoded = dataset.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))
    flags = undecoded.map(_grayscale_flags, batched=True, remove_columns=["image"], desc="Reading image modes")
    return 1 if all(flags["grayscale"]) else 3


def _grayscale_flags(batch: dict) -> dict:
    modes = [_image_mode(value) for value in batch["image"]]
    return {"grayscale": [mode is None or mode in GRAYSCALE_MODES for mode in modes]}


def _image_mode(value: dict) -> str | None:
    """The PIL mode of an undecoded image ({"bytes", "path"}), from its header; None if it cannot be read."""
    from io import BytesIO

    from PIL import Image

    try:
        source = BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as image:
            return image.mode
    except Exception:  # unreadable images are dropped (or refused) by the loader: they do not decide (None)
        return None


def _readable_flags(batch: dict) -> dict:
    """For each undecoded image of a batch, whether it decodes completely."""
    return {"readable": [_is_readable(value) for value in batch["image"]]}


def _is_readable(value: dict | None) -> bool:
    return decode_checked(value)[0] is not None


def decode_checked(value: dict | None) -> tuple[Any, str | None]:
    """(PIL image, None) for a usable undecoded `Image` value, else (None, why it is not usable)."""
    from PIL import Image

    from tokenizer.image_processor import convert_mode

    if value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None):
        return None, "missing image"  # decode_example returns None for it instead of raising
    try:
        # `decode_example` opens paths, bytes and remote/archived files alike, then calls `Image.load()`, which
        # reads every pixel: unlike `Image.verify()`, it also catches files truncated after a valid header.
        image = datasets.Image().decode_example(value)
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            convert_mode(image, 1)  # the pixel conversion's value checks, so that they fail here, not mid-training
    except Image.DecompressionBombError as error:
        return None, (f"{type(error).__name__}: {error}; if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS "
                      "before loading")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct/zlib errors...
        return None, f"{type(error).__name__}: {error}"
    return image, None
