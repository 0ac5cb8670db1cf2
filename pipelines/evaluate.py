"""Evaluation of a tokenizer on a dataset: PSNR, SSIM, codebook usage / perplexity, LPIPS when available."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator

from tokenizer import VQTokenizer

from .metrics import CodeHistogram, psnr, ssim


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VQTokenizer, dataloader, accelerator: Accelerator | None = None,
                       max_batches: int | None = None, perceptual=None) -> tuple[dict[str, Any], tuple]:
    """Reconstruction metrics over `dataloader` (batches with "pixel_values").

    Returns (metrics, (first originals, first reconstructions)) — the pair feeds a validation grid.
    Across processes, per-image values and code ids are gathered, so the numbers cover the whole dataset.
    `perceptual` is an optional callable (e.g. `LPIPSLoss`) returning the mean distance of a batch.
    """
    was_training = tokenizer.training
    tokenizer.eval()
    histogram = CodeHistogram(tokenizer.codebook_size)
    psnrs, ssims, lpips_values = [], [], []
    first = None
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        pixels = batch["pixel_values"]
        out = tokenizer(pixels)
        reconstruction = out.reconstruction.float().clamp(-1, 1)
        per_image = torch.stack([psnr(reconstruction, pixels), ssim(reconstruction, pixels)], dim=1)  # (B, 2)
        indices = out.indices
        if perceptual is not None:
            lpips_values.append(float(perceptual(reconstruction, pixels)))
        if accelerator is not None:
            per_image = accelerator.gather_for_metrics(per_image)
            indices = accelerator.gather_for_metrics(indices)
        psnrs.append(per_image[:, 0].cpu())
        ssims.append(per_image[:, 1].cpu())
        histogram.update(indices)
        if first is None:
            first = (pixels.detach().cpu(), reconstruction.detach().cpu())
    tokenizer.train(was_training)
    if first is None:
        raise ValueError("the evaluation dataloader yielded no batch")
    metrics = {
        "psnr": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": histogram.usage(),
        "perplexity": histogram.perplexity(),
        "num_images": int(torch.cat(psnrs).numel()),
    }
    if lpips_values:
        metrics["lpips"] = sum(lpips_values) / len(lpips_values)
    return metrics, first
