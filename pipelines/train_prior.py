"""Train a prior (PixelCNN or Transformer) on pre-tokenized index grids, through `accelerate`.

`accelerate launch scripts/train_prior.py --tokens_dir out/tokens --prior transformer --output_dir out/prior`
uses the same conventions as tokenizer training: atomic checkpoints, exact resume, EMA, mixed precision,
trackers, validation bits/token on the held-out split and, given `--tokenizer`, periodic decoded samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from prior import PixelCNNConfig, PixelCNNPrior, Prior, TransformerPrior, TransformerPriorConfig, load_prior
from prior.sampling import check_filter_args

from .encode import load_token_dataset, tokenizer_digest
from .generation import GenerationPipeline, replace_saved_pipeline
from .hub import hub_push_errors
from .images import image_grid, save_image
from .training import (
    ExponentialMovingAverage,
    NonFiniteGuard,
    add_common_training_args,
    append_validation_metrics,
    apply_gradients,
    batches,
    check_common_args,
    evaluation_dataloader,
    export_trained_model,
    init_trackers,
    make_accelerator,
    make_scheduler,
    maybe_resume,
    progress_bar,
    recorded_resume_flags,
    run_training_steps,
    training_dataloader,
    unwrap_float32,
)

logger = logging.getLogger(__name__)
PRIORS = {"pixelcnn": (PixelCNNPrior, PixelCNNConfig), "transformer": (TransformerPrior, TransformerPriorConfig)}


# The flags of the validation samples, which are drawn only when a --tokenizer can decode them.
SAMPLE_FLAG_DEFAULTS = {"num_validation_samples": 16, "guidance_scale": 1.0, "temperature": 1.0, "top_k": None}


def add_prior_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens_dir", type=str, required=True, help="a folder written by `vqstack encode`")
    parser.add_argument("--prior", type=str, default="transformer", choices=sorted(PRIORS))
    parser.add_argument("--prior_config", type=str, default="base",
                        help="a preset name of the chosen prior or a config.json path: "
                             + "; ".join(f"{name}: {', '.join(config.presets)}" for name, (_, config) in PRIORS.items()))
    parser.add_argument("--label_dropout", type=float, default=None, help="class dropout for guidance (default: preset)")
    parser.add_argument("--pkeep", type=float, default=None, help="Transformer: keep-probability of input codes")
    parser.add_argument("--unconditional", action="store_true", help="ignore the labels of the token dataset")
    parser.add_argument("--tokenizer", type=str, default=None,
                        help="saved tokenizer: decodes validation samples, and is joined with the trained prior into "
                             "a generation pipeline in OUTPUT_DIR/pipeline")
    parser.add_argument("--num_validation_samples", type=int, default=SAMPLE_FLAG_DEFAULTS["num_validation_samples"],
                        help="with --tokenizer")
    parser.add_argument("--guidance_scale", type=float, default=SAMPLE_FLAG_DEFAULTS["guidance_scale"],
                        help="for validation samples (with --tokenizer)")
    parser.add_argument("--temperature", type=float, default=SAMPLE_FLAG_DEFAULTS["temperature"],
                        help="for validation samples (with --tokenizer)")
    parser.add_argument("--top_k", type=int, default=SAMPLE_FLAG_DEFAULTS["top_k"],
                        help="for validation samples (with --tokenizer)")
    add_common_training_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_prior_args(parser)
    return parser


def build_prior(args: argparse.Namespace, metadata: dict) -> Prior:
    """A prior whose grid shape, codebook size and classes come from the token dataset's metadata."""
    prior_class, config_class = PRIORS[args.prior]
    data_fields = {
        "grid_shape": tuple(metadata["grid_shape"]),
        "codebook_size": metadata["codebook_size"],
        "num_classes": 0 if args.unconditional else metadata["num_classes"],
    }
    if args.label_dropout is not None:
        if data_fields["num_classes"] == 0 and args.label_dropout > 0:
            why = "--unconditional ignores the labels" if args.unconditional else f"{args.tokens_dir} has no labels"
            raise ValueError(f"--label_dropout {args.label_dropout} applies to class-conditional priors, but {why}; "
                             "drop --label_dropout")
        data_fields["label_dropout"] = args.label_dropout
    if args.pkeep is not None:
        if args.prior != "transformer":
            raise ValueError("--pkeep applies to --prior transformer only")
        data_fields["pkeep"] = args.pkeep
    if Path(args.prior_config).suffix == ".json":
        from prior.configuration import config_from_dict

        config = config_from_dict(json.loads(Path(args.prior_config).read_text()), source=args.prior_config)
        if not isinstance(config, config_class):
            raise ValueError(f"{args.prior_config} describes a {config.prior_type} prior, not --prior {args.prior}")
        data = config.to_dict()
        data.update(data_fields)
        config = config_from_dict(data, source=args.prior_config)
    else:
        config = config_class.from_preset(args.prior_config, **data_fields)
    return prior_class(config)


def _split_batch(batch: dict, prior: Prior) -> tuple[torch.Tensor, torch.Tensor | None]:
    labels = batch.get("label") if prior.config.num_classes > 0 else None
    return batch["indices"].long(), labels


def collate_tokens(examples: list[dict]) -> dict:
    batch = {"indices": torch.stack([e["indices"] for e in examples])}  # (B, h, w)
    if "label" in examples[0]:
        batch["label"] = torch.stack([torch.as_tensor(e["label"]) for e in examples]).long()  # (B,)
    return batch


def train_prior(args: argparse.Namespace) -> Path:
    """Run the training described by `args`; returns the folder of the exported prior."""
    check_common_args(args)
    if args.tokenizer is None:
        given = [f"--{name}" for name, default in SAMPLE_FLAG_DEFAULTS.items() if getattr(args, name) != default]
        if given:
            raise ValueError(f"{', '.join(given)} set the validation samples, which are drawn only with --tokenizer "
                             "(to decode them); add --tokenizer or drop the flag(s)")
    accelerator = make_accelerator(args)
    tokens, metadata = load_token_dataset(args.tokens_dir)
    if "validation" not in tokens:
        raise ValueError(f"{args.tokens_dir} has no 'validation' split; its splits are {list(tokens)}")
    model = build_prior(args, metadata)
    if args.tokenizer is not None:
        _check_sample_args(model, args)
    train_loader = training_dataloader(tokens["train"], args, collate_tokens)
    val_loader = evaluation_dataloader(tokens["validation"], args.train_batch_size, collate_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    scheduler = make_scheduler(args, optimizer, accelerator)
    model, optimizer, scheduler, train_loader, val_loader = accelerator.prepare(
        model, optimizer, scheduler, train_loader, val_loader)
    ema = ExponentialMovingAverage(unwrap_float32(accelerator, model), args.ema_decay) if args.use_ema else None
    extra_state = {"ema": ema} if ema else {}
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    # Loaded before the resume restores the RNG states, and without drawing from them: building the tokenizer's
    # modules would otherwise shift label dropout and pkeep after a resume.
    with torch.random.fork_rng(devices=[]):
        tokenizer = _load_tokenizer(args, metadata)
    # Recorded with the checkpoints' flags: codes of another tokenizer mean other things, so a resume refuses them.
    args.tokens_tokenizer_sha256 = metadata.get("tokenizer_sha256")
    _check_resumed_tokens(args)
    step = maybe_resume(accelerator, args, guard, extra_state, outputs=("prior", "pipeline"))
    init_trackers(accelerator, args, "vqstack-prior")

    def report(loss: float | None, step: int) -> None:
        if loss is not None:
            bar.set_postfix(bits_per_token=f"{loss / math.log(2):.3f}")
            accelerator.log({"train/bits_per_token": loss / math.log(2), "lr": scheduler.get_last_lr()[0]}, step=step)

    bar = progress_bar(accelerator, args, step, f"prior ({args.prior})")
    step, metrics = run_training_steps(
        accelerator, args, model, step=step, data=batches(accelerator, train_loader, step), guard=guard,
        extra_state=extra_state, ema=ema, bar=bar,
        micro_step=lambda batch, _: _train_micro_step(accelerator, model, optimizer, scheduler, batch, args, guard),
        report=report, validate=lambda step: _validate(accelerator, model, val_loader, tokenizer, metadata, args, step),
    )

    def annotate(prior: Prior) -> None:
        prior.training_metrics = {"train_steps": float(step), **{f"validation_{k}": v for k, v in metrics.items()}}

    # With --tokenizer, --push_to_hub pushes the pipeline (what users generate from), after it is saved: a push
    # that fails at the end of the run must not cost the saved pipeline.
    prior_dir = export_trained_model(accelerator, model, ema, args, "prior", annotate, push=tokenizer is None)
    if tokenizer is not None and accelerator.is_main_process:
        pipeline_dir = Path(args.output_dir) / "pipeline"
        pipeline = save_pipeline(tokenizer, prior_dir, metadata, pipeline_dir)
        if args.push_to_hub:
            with hub_push_errors(pipeline_dir, args.hub_model_id):
                pipeline.push_to_hub(args.hub_model_id, token=args.hub_token)
    return prior_dir


def _check_resumed_tokens(args: argparse.Namespace) -> None:
    """Refuse to resume on token data that another tokenizer encoded than the data the checkpoint trained on.

    Checkpoints record the digest of the tokenizer that encoded their --tokens_dir (`tokens_tokenizer_sha256`);
    older ones, and token data encoded before digests were recorded, are not checked."""
    path, flags = recorded_resume_flags(args)
    trained_on = (flags or {}).get("tokens_tokenizer_sha256")
    if trained_on is not None and args.tokens_tokenizer_sha256 is not None and trained_on != args.tokens_tokenizer_sha256:
        raise ValueError(
            f"--tokens_dir {args.tokens_dir} was encoded by another tokenizer (sha256 {args.tokens_tokenizer_sha256[:12]}…) "
            f"than the token data checkpoint {path} trained on ({trained_on[:12]}…): its codes mean other things. "
            "Resume on token data encoded by the original tokenizer, or start a new run")


def save_pipeline(tokenizer, prior_dir: Path, metadata: dict, folder: Path) -> GenerationPipeline:
    """Join `tokenizer` and the prior saved in `prior_dir` into a generation pipeline (class names from the token
    metadata) at `folder`, replacing an older one in one rename; returns the pipeline."""
    prior = load_prior(prior_dir)
    class_names = metadata.get("class_names") if prior.config.num_classes else None  # None for --unconditional
    pipeline = GenerationPipeline(tokenizer.cpu(), prior, class_names=class_names)
    replace_saved_pipeline(pipeline, folder)
    logger.info("saved the tokenizer and the prior as a generation pipeline in %s", folder)
    return pipeline


def _train_micro_step(accelerator, model, optimizer, scheduler, batch, args, guard) -> float | None:
    indices, labels = _split_batch(batch, unwrap_float32(accelerator, model))
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = model(indices, labels).loss
        if guard.is_bad(accelerator, loss):
            optimizer.zero_grad(set_to_none=True)  # at the step's last micro-batch: drops the whole step
            return None
        apply_gradients(accelerator, model, loss, optimizer, scheduler, args)
    return float(loss.detach())


@torch.no_grad()
def evaluate_prior(prior: Prior, dataloader, accelerator=None) -> dict[str, float]:
    """Held-out bits per token (exact log-likelihood), over all processes."""
    was_training = prior.training
    prior.eval()
    total_bits, total_tokens = 0.0, 0
    for batch in dataloader:
        indices, labels = _split_batch(batch, prior)
        bits = -prior.log_prob(indices, labels) / math.log(2)  # (B,)
        if accelerator is not None:
            bits = accelerator.gather_for_metrics(bits)
        total_bits += float(bits.sum())
        total_tokens += bits.numel() * indices[0].numel()
    prior.train(was_training)
    return {"bits_per_token": total_bits / max(total_tokens, 1)}


def _validate(accelerator, model, val_loader, tokenizer, metadata, args, step) -> dict:
    prior = unwrap_float32(accelerator, model)
    metrics = evaluate_prior(prior, val_loader, accelerator)
    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        folder = append_validation_metrics(args, step, metrics)
        accelerator.print(f"step {step}: held-out bits/token {metrics['bits_per_token']:.4f}")
        if tokenizer is not None:
            _save_samples(prior, tokenizer, args, folder / f"samples-{step:06d}.png")
    return metrics


def _save_samples(prior: Prior, tokenizer, args, path: Path) -> None:
    count = args.num_validation_samples
    num_classes = prior.config.num_classes
    labels = [i % num_classes for i in range(count)] if num_classes else None
    prior.eval()
    generator = torch.Generator(device=next(prior.parameters()).device).manual_seed(args.seed)
    indices = prior.sample(count, labels=labels, temperature=args.temperature, top_k=args.top_k,
                           guidance_scale=args.guidance_scale, generator=generator)
    prior.train()
    with torch.no_grad():
        images = tokenizer.to(indices.device).decode(indices)
    save_image(image_grid(images, columns=num_classes or int(math.sqrt(count)) or 1, scale=2), path)


def _check_sample_args(prior: Prior, args: argparse.Namespace) -> None:
    """Fail before training on flags that would only break the first validation's samples."""
    if args.num_validation_samples < 1:
        raise ValueError(f"--num_validation_samples must be >= 1, got {args.num_validation_samples}")
    check_filter_args(args.temperature, args.top_k, None)
    if not 0 <= args.guidance_scale < float("inf"):
        raise ValueError(f"--guidance_scale must be a finite number >= 0, got {args.guidance_scale}")
    if args.guidance_scale != 1.0 and prior.config.num_classes == 0:
        raise ValueError(f"--guidance_scale {args.guidance_scale} needs a class-conditional prior (this one is "
                         "unconditional); use --guidance_scale 1")


def _load_tokenizer(args, metadata):
    if args.tokenizer is None:
        return None
    from tokenizer import VQTokenizer

    tokenizer = VQTokenizer.from_pretrained(args.tokenizer).eval()
    if tokenizer.codebook_size != metadata["codebook_size"]:
        raise ValueError(f"--tokenizer has {tokenizer.codebook_size} codes but the tokens in {args.tokens_dir} use "
                         f"{metadata['codebook_size']}")
    expected = metadata.get("tokenizer_sha256")
    if expected is not None and tokenizer_digest(tokenizer) != expected:
        # Same codebook size, other codes: the pipeline would decode the prior's tokens into noise.
        raise ValueError(f"--tokenizer {args.tokenizer} is not the tokenizer that encoded {args.tokens_dir} (its config "
                         "or weights differ); pass the tokenizer used by `vqstack encode`, or encode the dataset "
                         "again with this one")
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_prior(build_parser().parse_args(argv))
