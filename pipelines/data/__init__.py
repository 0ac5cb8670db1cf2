"""Image data for vqstack: Hub datasets, local image folders and embedded datasets that need no network.

`load_image_dataset` returns ``{"train", "validation"}`` splits with an ``"image"`` column (and ``"label"`` when
the source is labelled); `set_image_transforms` turns images into ``"pixel_values"`` in [-1, 1];
`collate_images` batches them for a ``DataLoader``.
"""

from .embedded import EMBEDDED_DATASETS, load_embedded_dataset
from .sources import DatasetUnavailableError, infer_channels, load_image_dataset
from .transforms import collate_images, infer_num_classes, set_image_transforms

__all__ = [
    "EMBEDDED_DATASETS",
    "DatasetUnavailableError",
    "collate_images",
    "infer_channels",
    "infer_num_classes",
    "load_embedded_dataset",
    "load_image_dataset",
    "set_image_transforms",
]
