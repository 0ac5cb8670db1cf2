"""`vqstack quickstart`: the whole two-stage recipe on an embedded dataset, in minutes on a laptop CPU.

Trains a tokenizer, reports its reconstruction metrics, pre-tokenizes the data, trains a class-conditional
prior, samples a class-by-class grid, and writes `reconstructions.png`, `samples.png`, `metrics.json` and the
saved pipeline (`pipeline/`) to `--output_dir`. Every stage is the same code as the matching CLI command.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from datasets import DatasetDict
from torch.utils.data import DataLoader

from .data import EMBEDDED_DATASETS, collate_images, load_image_dataset, set_image_transforms
from .encode import encode_dataset
from .evaluate import evaluate_tokenizer
from .generation import GenerationPipeline, replace_saved_pipeline
from .images import image_grid, save_image
from .metrics import json_ready

logger = logging.getLogger(__name__)

# Budgets measured to finish in a few minutes on a 2-core CPU; --fast is a smoke run for tests.
FULL = {"tokenizer_steps": 400, "prior_steps": 800, "tokenizer_batch": 32, "prior_batch": 64}
FAST = {"tokenizer_steps": 3, "prior_steps": 3, "tokenizer_batch": 8, "prior_batch": 8}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=str, default="vqstack-output")
    parser.add_argument("--dataset", type=str, default="digits",
                        help=f"an embedded dataset {EMBEDDED_DATASETS} or a local image folder")
    parser.add_argument("--prior", type=str, default="transformer", choices=["transformer", "pixelcnn"])
    parser.add_argument("--resolution", type=int, default=None, help="default: 32 (digits) / 32 (natural-patches)")
    parser.add_argument("--tokenizer_steps", type=int, default=None)
    parser.add_argument("--prior_steps", type=int, default=None)
    parser.add_argument("--guidance_scale", type=float, default=3.0, help="classifier-free guidance for samples")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--samples_per_class", type=int, default=6)
    parser.add_argument("--mixed_precision", type=str, default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="a few steps of each stage (a smoke test, not a result)")
    parser.add_argument("--no_progress", action="store_true")
    return parser


def _data_flags(args: argparse.Namespace) -> list[str]:
    if args.dataset in EMBEDDED_DATASETS:
        return ["--dataset", args.dataset]
    if Path(args.dataset).is_dir():
        return ["--train_data_dir", args.dataset]
    raise ValueError(f"--dataset must be one of {EMBEDDED_DATASETS} or an existing image folder, got {args.dataset!r}")


def _check_args(args: argparse.Namespace) -> None:
    """Fail on bad flags before any stage runs (not after minutes of training), naming quickstart's own flags."""
    from prior.sampling import check_filter_args

    for name in ("resolution", "tokenizer_steps", "prior_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if args.samples_per_class < 1:
        raise ValueError(f"--samples_per_class must be >= 1, got {args.samples_per_class}")
    if not 0 <= args.guidance_scale < float("inf"):
        raise ValueError(f"--guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must lie in [0, 2**32), got {args.seed}")
    try:
        check_filter_args(args.temperature, args.top_k, None)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--{error}") from None


def run_quickstart(args: argparse.Namespace) -> dict:
    """Run every stage; returns the metrics also written to metrics.json."""
    from tokenizer import VQTokenizer

    from .train_prior import build_parser as prior_parser
    from .train_prior import train_prior
    from .train_tokenizer import build_parser as tokenizer_parser
    from .train_tokenizer import train_tokenizer

    _check_args(args)
    budget = dict(FAST if args.fast else FULL)
    budget.update({k: v for k, v in (("tokenizer_steps", args.tokenizer_steps), ("prior_steps", args.prior_steps))
                   if v is not None})
    resolution = args.resolution if args.resolution is not None else 32
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings, common = {}, ["--seed", str(args.seed), "--mixed_precision", args.mixed_precision]
    if args.no_progress:
        common.append("--no_progress")

    # 1. tokenizer ------------------------------------------------------------------------------------------
    start = time.perf_counter()
    tokenizer_args = tokenizer_parser().parse_args([
        *_data_flags(args), "--resolution", str(resolution), "--output_dir", str(out / "tokenizer-run"),
        "--config", "quickstart", "--perceptual_weight", "0", "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine", "--train_batch_size", str(budget["tokenizer_batch"]),
        "--max_train_steps", str(budget["tokenizer_steps"]), "--checkpointing_steps", str(budget["tokenizer_steps"]),
        "--checkpoints_total_limit", "1", "--overwrite_output_dir", "--validation_steps", str(budget["tokenizer_steps"]),
        *common,
    ])
    tokenizer_dir = train_tokenizer(tokenizer_args)
    timings["tokenizer_training_s"] = time.perf_counter() - start
    tokenizer = VQTokenizer.from_pretrained(tokenizer_dir)

    # 2. reconstruction metrics on the whole held-out split ---------------------------------------------------
    images = load_image_dataset(embedded=args.dataset if args.dataset in EMBEDDED_DATASETS else None,
                                train_data_dir=None if args.dataset in EMBEDDED_DATASETS else args.dataset,
                                resolution=resolution, seed=args.seed)
    # A view of the same rows with the deterministic evaluation transform; `images` stays raw for encoding.
    held_out = set_image_transforms(DatasetDict({"validation": images["validation"].with_format(None)}),
                                    resolution=resolution, channels=tokenizer.config.in_channels)
    loader = DataLoader(held_out["validation"], batch_size=64, collate_fn=collate_images)
    tokenizer_metrics, (originals, reconstructions) = evaluate_tokenizer(tokenizer, loader)
    count = min(16, originals.shape[0])
    save_image(image_grid(torch.cat([originals[:count], reconstructions[:count]]), columns=count, scale=3),
               out / "reconstructions.png")
    logger.info("tokenizer: %s", tokenizer_metrics)

    # 3. pre-tokenize -------------------------------------------------------------------------------------------
    start = time.perf_counter()
    _, metadata = encode_dataset(tokenizer, images, out / "tokens", resolution=resolution,
                                 tokenizer_source=str(tokenizer_dir))
    timings["encode_s"] = time.perf_counter() - start

    # 4. prior --------------------------------------------------------------------------------------------------
    start = time.perf_counter()
    prior_args = prior_parser().parse_args([
        "--tokens_dir", str(out / "tokens"), "--prior", args.prior, "--prior_config", "quickstart",
        "--output_dir", str(out / "prior-run"), "--train_batch_size", str(budget["prior_batch"]),
        "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", str(budget["prior_steps"] // 20),
        "--adam_weight_decay", "0.01",
        "--max_train_steps", str(budget["prior_steps"]), "--checkpointing_steps", str(budget["prior_steps"]),
        "--checkpoints_total_limit", "1", "--overwrite_output_dir", "--validation_steps", str(budget["prior_steps"]), *common,
    ])
    prior_dir = train_prior(prior_args)
    timings["prior_training_s"] = time.perf_counter() - start
    from prior import load_prior

    prior = load_prior(prior_dir)

    # 5. samples and the saved pipeline ---------------------------------------------------------------------
    start = time.perf_counter()
    pipeline = GenerationPipeline(tokenizer, prior, class_names=metadata.get("class_names"))
    grid = pipeline.sample_grid(args.samples_per_class * max(1, prior.config.num_classes), seed=args.seed,
                                guidance_scale=args.guidance_scale if prior.config.num_classes else 1.0,
                                temperature=args.temperature, top_k=args.top_k)
    save_image(grid, out / "samples.png")
    timings["sampling_s"] = time.perf_counter() - start
    replace_saved_pipeline(pipeline, out / "pipeline")

    metrics = {
        "dataset": args.dataset, "resolution": resolution, "fast": args.fast, "budget": budget,
        "tokenizer": {**tokenizer_metrics, "parameters": sum(p.numel() for p in tokenizer.parameters()),
                      "codebook_size": tokenizer.codebook_size, "grid_shape": metadata["grid_shape"]},
        "prior": {"type": args.prior, "parameters": prior.num_parameters(),
                  **{k.replace("validation_", "held_out_"): v for k, v in prior.training_metrics.items()}},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    metrics, not_finite = json_ready(metrics)
    if not_finite:
        logger.warning("%s not finite (NaN/Inf): written as null in metrics.json", ", ".join(not_finite))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    metrics = run_quickstart(args)
    out = Path(args.output_dir)
    tok = metrics["tokenizer"]

    def number(value, spec: str) -> str:  # None: not finite, written as null in metrics.json
        return "n/a" if value is None else format(value, spec)

    print(f"\ntokenizer: PSNR {number(tok['psnr'], '.2f')} dB, SSIM {number(tok['ssim'], '.3f')}, codebook usage "
          f"{100 * tok['codebook_usage']:.1f}% of {tok['codebook_size']} codes, perplexity "
          f"{number(tok['perplexity'], '.0f')}")
    bits = metrics["prior"].get("held_out_bits_per_token")
    if bits is not None:
        print(f"prior ({args.prior}): held-out {bits:.3f} bits/token")
    print(f"wrote {out / 'reconstructions.png'}, {out / 'samples.png'}, {out / 'metrics.json'} and "
          f"{out / 'pipeline'} in {time.perf_counter() - started:.0f} s")
