"""`vqstack reconstruct`: image files in, tokenizer reconstructions (and their index grids) out."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenizer import VQImageProcessor, VQTokenizer

from .images import save_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--tokenizer", type=str, required=True, help="folder or Hub id of a saved tokenizer")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--resolution", type=int, default=None,
                        help="resize + center-crop to this size; default: crop to a multiple of the downsampling factor")
    return parser


@torch.no_grad()
def reconstruct_files(tokenizer: VQTokenizer, paths: list[str], output_dir: str | Path,
                      resolution: int | None = None) -> list[Path]:
    """Reconstruct each image file; writes `<name>.png` and `<name>.indices.npy`, returns the PNG paths."""
    processor = tokenizer.image_processor_for(resolution)  # its saved resampling filter; fails early on a bad size
    targets = [Path(output_dir) / f"{Path(path).stem}.png" for path in paths]
    clashes = sorted({str(t.name) for t in targets if targets.count(t) > 1})
    if clashes:
        raise ValueError(f"several inputs would be written to the same output ({', '.join(clashes)}): their file names "
                         "differ only in folder or extension; reconstruct them into separate --output_dir folders")
    inputs = {Path(path).resolve() for path in paths}
    overwritten = [str(t) for t in targets if t.resolve() in inputs]
    if overwritten:
        raise ValueError(f"writing the reconstruction would overwrite the input {overwritten[0]!r}; choose another "
                         "--output_dir")
    was_training = tokenizer.training
    tokenizer.eval()  # in training mode the quantizer would update its codebook from these images
    try:
        return _reconstruct_each(tokenizer, processor, paths, output_dir)
    finally:
        tokenizer.train(was_training)


def _reconstruct_each(tokenizer: VQTokenizer, processor: VQImageProcessor, paths: list[str],
                      output_dir: str | Path) -> list[Path]:
    written = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as image:
                image.load()
                # Upright as `datasets` decodes it for training and encoding: EXIF orientation applied.
                upright = ImageOps.exif_transpose(image)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {str(path)!r}: {error}") from error
        try:
            pixels = processor.preprocess(upright)  # (1, C, H, W)
        except ValueError as error:
            raise ValueError(f"{str(path)!r}: {error}") from error
        indices = tokenizer.encode(pixels).indices  # (1, h, w)
        image_out = processor.postprocess(tokenizer.decode(indices), "pil")[0]
        target = Path(output_dir) / f"{path.stem}.png"
        written.append(save_image(image_out, target))
        np.save(target.with_suffix(".indices.npy"), indices[0].numpy())
    return written


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).eval()
    for path in reconstruct_files(tokenizer, args.images, args.output_dir, args.resolution):
        print(path)
