"""Evaluation of a tokenizer on a dataset: PSNR, SSIM, codebook usage / perplexity, and LPIPS and rFID when
their weights are available locally."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from tokenizer import VQTokenizer

from .metrics import CodeHistogram, json_ready, psnr, ssim


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VQTokenizer, dataloader, accelerator: Accelerator | None = None,
                       max_batches: int | None = None, perceptual=None, fid=None,
                       sample_images: int | None = None) -> tuple[dict[str, Any], tuple]:
    """Reconstruction metrics over `dataloader` (batches with "pixel_values").

    Returns (metrics, (originals, reconstructions)) — the pair feeds a validation grid: this process's first
    `sample_images` images (from as many batches as that takes), or its first batch when `sample_images` is None.
    Across processes, per-image values and code ids are gathered, so the numbers cover the whole dataset.
    `perceptual` is an optional `LPIPSLoss` (anything with `distances(a, b) -> (B,)`), gathered per image like
    PSNR and SSIM; `fid` an optional `ReconstructionFID`, fed every batch and reported as "rfid".
    """
    if perceptual is not None and not callable(getattr(perceptual, "distances", None)):
        raise TypeError(f"perceptual must have distances(a, b) -> (B,) (an LPIPSLoss), got {type(perceptual).__name__}")
    was_training = tokenizer.training
    tokenizer.eval()
    device = next(tokenizer.parameters()).device
    histogram = CodeHistogram(tokenizer.codebook_size)
    psnrs, ssims, lpips_values = [], [], []
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        pixels = batch["pixel_values"].to(device)  # a no-op for loaders prepared by accelerate
        out = tokenizer(pixels)
        reconstruction = out.reconstruction.float().clamp(-1, 1)
        columns = [psnr(reconstruction, pixels), ssim(reconstruction, pixels)]
        if perceptual is not None:
            columns.append(perceptual.distances(reconstruction, pixels).to(columns[0].device))
        per_image = torch.stack(columns, dim=1)  # (B, 2 or 3): PSNR, SSIM[, LPIPS]
        indices = out.indices
        if fid is not None:
            fid.update(pixels, reconstruction, accelerator=accelerator)  # gathers features across processes
        if accelerator is not None:
            per_image = accelerator.gather_for_metrics(per_image)
            indices = accelerator.gather_for_metrics(indices)
        psnrs.append(per_image[:, 0].cpu())
        ssims.append(per_image[:, 1].cpu())
        if perceptual is not None:
            lpips_values.append(per_image[:, 2].cpu())
        histogram.update(indices)
        wanted = pixels.shape[0] if sample_images is None else sample_images
        if not kept or sum(part.shape[0] for part, _ in kept) < wanted:
            kept.append((pixels.detach().cpu(), reconstruction.detach().cpu()))
    tokenizer.train(was_training)
    if not kept:
        raise ValueError("the evaluation dataloader yielded no batch")
    first = tuple(torch.cat(parts)[:sample_images] for parts in zip(*kept))
    metrics = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": histogram.usage(),
        "perplexity": histogram.perplexity(),
        "num_images": int(torch.cat(psnrs).numel()),
    }
    if lpips_values:
        metrics["lpips"] = float(torch.cat(lpips_values).mean())
    if fid is not None:
        metrics["rfid"] = fid.compute()
    return metrics, first


def _same_data(recorded: object, args) -> bool:
    """Whether the data named by `args` is the data the tokenizer was trained on (recorded in training_info).

    Folders are compared as resolved paths, so that ./images, ./images/ and /abs/images are one folder (the
    recorded one is resolved from the current directory, as it was given to the training command)."""
    import os

    if not isinstance(recorded, str):
        return False
    if args.train_data_dir is not None:
        return os.path.realpath(recorded) == os.path.realpath(args.train_data_dir)
    return recorded == (args.dataset or args.dataset_name)


def apply_training_split_defaults(args, tokenizer: VQTokenizer) -> None:
    """Fill in `args.seed` and `args.validation_split` where they are None: on the data the tokenizer was trained
    on, the training run's (recorded in training_info), so that the images training held out are held out here too;
    on other data, seed 0 and the usual fraction. Embedded datasets have fixed splits and keep the usual fraction."""
    import sys

    from .data.sources import DEFAULT_VALIDATION_SPLIT

    info = tokenizer.training_info
    same_data = _same_data(info.get("dataset"), args)
    if not same_data and (args.seed is None or args.validation_split is None):
        trained_on = (f"not the training data ({info['dataset']!r})" if info.get("dataset") is not None
                      else "the tokenizer records no training data")
        print(f"{trained_on}: the held-out split is drawn with the defaults (--seed 0 and the usual "
              "--validation_split) unless given", file=sys.stderr)
    if args.seed is None:
        args.seed = info.get("seed", 0) if same_data else 0
    if args.validation_split is None:
        args.validation_split = (info.get("validation_split", DEFAULT_VALIDATION_SPLIT)
                                 if same_data and not args.dataset else DEFAULT_VALIDATION_SPLIT)


def build_parser():
    import argparse

    from .train_tokenizer import add_data_args

    parser = argparse.ArgumentParser(description="Evaluate a saved tokenizer on a dataset; prints JSON metrics.")
    parser.add_argument("--tokenizer", type=str, required=True, help="folder or Hub id of a saved tokenizer")
    parser.add_argument("--split", type=str, default="validation", choices=["train", "validation"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_batches", type=int, default=None)
    parser.add_argument("--lpips_weights", type=str, default=None,
                        help="torchvision VGG16 weights file; LPIPS is reported when these (or the cached ones) exist")
    parser.add_argument("--fid_weights", type=str, default=None,
                        help="FID Inception-v3 weights file (torch-fidelity's weights-inception-2015-12-05-*.pth); "
                             "rFID is reported when these (or the ones in torch hub's cache) exist")
    parser.add_argument("--output", type=str, default=None, help="also write the JSON here")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds the held-out split (default: the tokenizer's training seed, else 0), so that "
                             "the validation split is the one held out during training")
    add_data_args(parser)
    # Defaults from the tokenizer's training_info: the resolution it was trained at (else its image processor's,
    # else 32) and its validation_split (else the usual default).
    parser.set_defaults(resolution=None, validation_split=None)
    return parser


def main(argv: list[str] | None = None) -> None:
    import json
    import sys
    from pathlib import Path

    from accelerate import PartialState
    from torch.utils.data import DataLoader

    from tokenizer.losses import LPIPSLoss, lpips_available
    from tokenizer.losses.perceptual import SMALLEST_INPUT

    from .data import collate_images
    from .data._checks import check_positive_int, check_resolution_flag
    from .data.sources import DEFAULT_RESOLUTION
    from .fid import ReconstructionFID, fid_weights_cache_path, resolve_fid_weights
    from .train_tokenizer import load_data
    from .training import cpu_only_multiprocess

    args = build_parser().parse_args(argv)
    check_positive_int("--batch_size", args.batch_size)
    if args.max_batches is not None:
        check_positive_int("--max_batches", args.max_batches)
    # metric networks first: a bad weights file fails before the tokenizer or the dataset is fetched
    if args.lpips_weights is not None and not Path(args.lpips_weights).is_file():
        raise FileNotFoundError(f"--lpips_weights {args.lpips_weights!r} is not a file; expected torchvision's VGG16 "
                                "weights (vgg16-397923af.pth)")
    perceptual = LPIPSLoss(trunk_weights=args.lpips_weights) if lpips_available(trunk_weights=args.lpips_weights) else None
    fid_weights = resolve_fid_weights(args.fid_weights)
    fid = ReconstructionFID(weights=fid_weights) if fid_weights is not None else None
    device = PartialState(cpu=cpu_only_multiprocess()).device  # the GPU when there is one
    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).to(device)
    if perceptual is not None:
        perceptual.to(device)
    if fid is not None:
        fid.feature.to(device)
    if args.resolution is None:
        args.resolution = tokenizer.trained_resolution or DEFAULT_RESOLUTION
    check_resolution_flag(args.resolution, tokenizer.downsample_factor)
    lpips_skipped = None
    if perceptual is not None and args.resolution < SMALLEST_INPUT[perceptual.net_name]:
        lpips_skipped = (f"LPIPS not computed: its {perceptual.net_name} trunk needs images of at least "
                         f"{SMALLEST_INPUT[perceptual.net_name]} pixels, and --resolution is {args.resolution}")
        perceptual = None
    apply_training_split_defaults(args, tokenizer)
    # Every split gets the deterministic resize + center crop: no random crops or flips in the train split either.
    datasets, _, source = load_data(args, tokenizer.config.in_channels, augment=False)
    loader = DataLoader(datasets[args.split], batch_size=args.batch_size, collate_fn=collate_images)
    metrics, _ = evaluate_tokenizer(tokenizer, loader, max_batches=args.max_batches, perceptual=perceptual, fid=fid)
    metrics.update(tokenizer=args.tokenizer, dataset=source, split=args.split, resolution=args.resolution,
                   seed=args.seed)
    if perceptual is None:
        metrics["lpips"] = None
        print(lpips_skipped or "LPIPS not computed: the VGG16 trunk is not available locally; pass --lpips_weights "
              "PATH", file=sys.stderr)
    if fid is None:
        metrics["rfid"] = None
        print(f"rFID not computed: no FID Inception weights at {fid_weights_cache_path()}; pass --fid_weights PATH",
              file=sys.stderr)
    metrics, not_finite = json_ready(metrics)
    if not_finite:
        print(f"{', '.join(not_finite)} not finite (NaN/Inf), written as null: the tokenizer's reconstructions "
              "contain NaN or Inf", file=sys.stderr)
    text = json.dumps(metrics, indent=2, allow_nan=False)
    print(text)  # first: the results are not lost if the file below cannot be written
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
