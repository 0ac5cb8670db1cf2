"""Train a VQ tokenizer with reconstruction, LPIPS and (optionally) PatchGAN losses, through `accelerate`.

`accelerate launch scripts/train_tokenizer.py --dataset digits --output_dir out/tok` runs the same code on
one CPU, one GPU or many processes. Checkpoints are atomic and a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenizer import VQTokenizer, VQTokenizerConfig
from tokenizer.configuration import PRESETS
from tokenizer.losses import NLayerDiscriminator, VQGANLoss, VQGANLossConfig
from tokenizer.losses.perceptual import SMALLEST_INPUT

from .data import collate_images, infer_channels, load_image_dataset, set_image_transforms
from .data._checks import check_resolution_flag
from .data.sources import DEFAULT_RESOLUTION, DEFAULT_VALIDATION_SPLIT
from .evaluate import evaluate_tokenizer
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


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Where images come from (exactly one source) and how they are cropped."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", type=str, default=None, help='embedded dataset: "digits" or "natural-patches"')
    group.add_argument("--dataset_name", type=str, default=None, help="a Hub dataset id, e.g. 'user/images'")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument("--train_data_dir", type=str, default=None, help="a local image folder (imagefolder layout)")
    group.add_argument("--image_column", type=str, default=None)
    group.add_argument("--label_column", type=str, default=None)
    group.add_argument("--cache_dir", type=str, default=None)
    group.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="training crop size in pixels")
    group.add_argument("--validation_split", type=float, default=DEFAULT_VALIDATION_SPLIT)
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--no_random_flip", action="store_true")
    group.add_argument("--strict_data", action="store_true", help="fail on unreadable images instead of skipping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tokenizer_args(parser)
    return parser


def add_tokenizer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=str, default="small-f4",
                        help=f"a tokenizer preset name ({', '.join(PRESETS)}) or a config.json path")
    parser.add_argument("--in_channels", type=int, choices=(1, 3), default=None,
                        help="image channels (default: 1 if every training image is grayscale, else 3)")
    parser.add_argument("--codebook_size", type=int, default=None, help="override the preset's codebook size")
    add_data_args(parser)
    add_common_training_args(parser)
    group = parser.add_argument_group("losses")
    group.add_argument("--l1_weight", type=float, default=1.0)
    group.add_argument("--l2_weight", type=float, default=0.0)
    group.add_argument("--perceptual_weight", type=float, default=1.0,
                       help="LPIPS weight; needs torchvision's VGG16 weights (see --lpips_weights); 0 turns it off")
    group.add_argument("--lpips_weights", type=str, default=None, help="local path to torchvision's vgg16 weights")
    group.add_argument("--adversarial_weight", type=float, default=0.0, help="PatchGAN weight (0 = no GAN)")
    group.add_argument("--disc_start", type=int, default=0, help="step at which the discriminator starts")
    group.add_argument("--disc_loss", type=str, default="hinge", choices=["hinge", "non_saturating"])
    group.add_argument("--disc_learning_rate", type=float, default=None,
                       help="default: --learning_rate; constant (--lr_scheduler applies to the tokenizer only)")
    group.add_argument("--lecam_weight", type=float, default=0.0)
    group.add_argument("--channels_last", action="store_true", help="channels_last memory format: faster convolutions on GPUs; on CPUs PyTorch's bf16 "
                       "GroupNorm is several times slower on it, so measure before using it there")
    group.add_argument("--num_validation_images", type=int, default=16)
    group.add_argument("--max_validation_batches", type=int, default=8)


def build_tokenizer_config(args: argparse.Namespace, in_channels: int, quantizer_seed: int = 0) -> VQTokenizerConfig:
    """The --config preset or JSON file with the flags' overrides, and `quantizer_seed` as the quantizer's seed."""
    overrides = {"in_channels": args.in_channels or in_channels, "quantizer": {"seed": quantizer_seed}}
    if args.codebook_size is not None:
        overrides["quantizer"]["codebook_size"] = args.codebook_size
    if Path(args.config).suffix == ".json":
        data = VQTokenizerConfig.from_json_file(args.config).to_dict()
        data.pop("config_version")
        data.update({k: v for k, v in overrides.items() if k != "quantizer"})
        data["quantizer"] = {**data["quantizer"], **overrides["quantizer"]}
        return VQTokenizerConfig.from_dict(data, source=args.config)
    return VQTokenizerConfig.from_preset(args.config, **overrides)


def resolve_quantizer_seed(args: argparse.Namespace) -> int:
    """The seed of the quantizer's own generators (k-means seeding, dead-code restart samples): --seed.

    A resumed run keeps the one its checkpoint was trained with. Checkpoints record it among their flags (as
    `quantizer_seed`); one written before they did comes from a run whose quantizer used seed 0.
    """
    path, flags = recorded_resume_flags(args)
    if path is None:
        return args.seed
    if flags is None or "quantizer_seed" not in flags:
        logger.info("checkpoint %s predates --seed seeding the quantizer: its quantizer seed 0 is kept", path)
        return 0
    return args.seed


def check_loss_args(args: argparse.Namespace) -> None:
    """Loss flags that would be ignored, or that would fail only once the discriminator starts, fail now."""
    if args.adversarial_weight == 0:
        ignored = [flag for flag, value, default in (
            ("--disc_start", args.disc_start, 0), ("--disc_loss", args.disc_loss, "hinge"),
            ("--disc_learning_rate", args.disc_learning_rate, None), ("--lecam_weight", args.lecam_weight, 0.0),
        ) if value != default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set the discriminator, which only runs with --adversarial_weight "
                             "> 0")
    else:
        if args.disc_learning_rate is not None and not args.disc_learning_rate > 0:
            raise ValueError(f"--disc_learning_rate must be > 0, got {args.disc_learning_rate}")
        smallest = NLayerDiscriminator.smallest_input(VQGANLossConfig.disc_layers)
        if args.resolution < smallest:
            raise ValueError(f"--resolution {args.resolution} is too small for the {VQGANLossConfig.disc_layers}-layer "
                             f"PatchGAN discriminator of --adversarial_weight: use at least {smallest}")
    if args.perceptual_weight == 0 and args.lpips_weights is not None:
        raise ValueError("--lpips_weights is only used with --perceptual_weight > 0")
    if args.perceptual_weight > 0 and args.resolution < SMALLEST_INPUT["vgg"]:
        raise ValueError(f"--resolution {args.resolution} is too small for the LPIPS loss (its VGG trunk needs at least "
                         f"{SMALLEST_INPUT['vgg']} pixels): use a larger --resolution or --perceptual_weight 0")


def load_data(args: argparse.Namespace, channels: int | None = None, augment: bool = True):
    """Train/validation splits with transforms; returns (datasets, channels, source description).

    With `augment=False` the train split gets the validation split's deterministic transform (for evaluation)."""
    datasets = load_image_dataset(
        dataset_name=args.dataset_name, train_data_dir=args.train_data_dir, embedded=args.dataset,
        dataset_config_name=args.dataset_config_name, image_column=args.image_column, label_column=args.label_column,
        validation_split=args.validation_split, resolution=args.resolution, seed=args.seed, cache_dir=args.cache_dir,
        strict_data=args.strict_data, max_samples=args.max_train_samples,
    )
    if channels is None:
        channels = infer_channels(datasets["train"])
        logger.info("training on %s images (%d channel%s; set --in_channels to choose)",
                    "grayscale" if channels == 1 else "RGB", channels, "" if channels == 1 else "s")
    datasets = set_image_transforms(datasets, resolution=args.resolution, channels=channels,
                                    random_flip=augment and not args.no_random_flip, random_crop=augment,
                                    seed=args.seed)
    source = args.dataset or args.dataset_name or args.train_data_dir
    return datasets, channels, source


def train_tokenizer(args: argparse.Namespace) -> Path:
    """Run the training described by `args`; returns the folder of the exported tokenizer."""
    check_common_args(args)
    for name in ("num_validation_images", "max_validation_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    check_loss_args(args)
    # Before anything is written: the config's layout, not its channels or seed, sets the downsampling factor.
    check_resolution_flag(args.resolution, build_tokenizer_config(args, args.in_channels or 3, 0).downsample_factor)
    accelerator = make_accelerator(args)
    with accelerator.main_process_first():
        datasets, channels, source = load_data(args, args.in_channels)
    args.quantizer_seed = resolve_quantizer_seed(args)  # recorded with the checkpoints' flags
    config = build_tokenizer_config(args, channels, args.quantizer_seed)
    model = VQTokenizer(config)
    loss_fn = VQGANLoss(VQGANLossConfig(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, perceptual_weight=args.perceptual_weight,
        adversarial_weight=args.adversarial_weight, disc_start=args.disc_start, disc_loss=args.disc_loss,
        lecam_weight=args.lecam_weight, lpips_trunk_weights=args.lpips_weights, image_channels=config.in_channels,
    ))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_loader = training_dataloader(datasets["train"], args, collate_images)
    val_loader = evaluation_dataloader(datasets["validation"], args.train_batch_size, collate_images)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 weight_decay=args.adam_weight_decay)
    scheduler = make_scheduler(args, optimizer, accelerator)
    model, optimizer, scheduler, train_loader, val_loader = accelerator.prepare(
        model, optimizer, scheduler, train_loader, val_loader)
    loss_fn.to(accelerator.device)
    disc = None
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    if loss_fn.uses_discriminator:
        disc_optimizer = torch.optim.Adam(loss_fn.discriminator.parameters(),
                                          lr=args.learning_rate if args.disc_learning_rate is None
                                          else args.disc_learning_rate, betas=(0.5, 0.9))
        disc = DiscriminatorStep(accelerator, accelerator.prepare(disc_optimizer), loss_fn.discriminator,
                                 NonFiniteGuard(args.max_nonfinite_steps, what="discriminator loss"))

    ema = ExponentialMovingAverage(unwrap_float32(accelerator, model), args.ema_decay) if args.use_ema else None
    # The loss module holds the discriminator and LeCam statistics: checkpointed, never exported.
    extra_state = {"loss": loss_fn, **({"ema": ema} if ema else {})}
    if disc is not None and disc.scaler is not None:
        extra_state["discriminator_scaler"] = disc  # fp16: its own loss scale, for an exact resume
    step = maybe_resume(accelerator, args, guard, extra_state, outputs=("tokenizer",))
    init_trackers(accelerator, args, "vqstack-tokenizer")

    def micro_step(batch: dict, step: int) -> dict:
        return _train_micro_step(accelerator, model, loss_fn, optimizer, scheduler, disc, batch, step, args, guard)

    def report(logs: dict, step: int) -> None:
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "rec", "usage", "perplexity")})
        accelerator.log(logs, step=step)

    bar = progress_bar(accelerator, args, step, "tokenizer")
    step, last_metrics = run_training_steps(
        accelerator, args, model, step=step, data=batches(accelerator, train_loader, step), guard=guard,
        extra_state=extra_state, ema=ema, bar=bar, micro_step=micro_step, report=report,
        validate=lambda step: _validate(accelerator, model, val_loader, args, step, loss_fn.perceptual),
    )

    def annotate(tokenizer: VQTokenizer) -> None:
        tokenizer.training_info = {
            # seed and validation_split decide the held-out split: evaluate-tokenizer defaults to them
            "dataset": source, "resolution": args.resolution, "seed": args.seed,
            "validation_split": args.validation_split, "train_steps": step,
            "batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
            "ema_weights": bool(ema), "skipped_nonfinite_steps": guard.skipped, "validation": last_metrics,
        }

    return export_trained_model(accelerator, model, ema, args, "tokenizer", annotate)


def _train_micro_step(accelerator, model, loss_fn, optimizer, scheduler, disc, batch, step, args, guard):
    pixels = batch["pixel_values"]
    if args.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    with accelerator.accumulate(model):
        last_layer = unwrap_float32(accelerator, model).get_last_layer()
        # The generator's GAN term reaches the reconstruction through the discriminator but must leave no
        # gradients on it: they would mix with the discriminator's own, accumulated over the micro-batches.
        with frozen(loss_fn.discriminator), accelerator.autocast():
            out = model(pixels)
            loss, logs = loss_fn.generator_loss(pixels, out.reconstruction, out.quantizer_loss, last_layer, step)
        if guard.is_bad(accelerator, loss):
            # no backward; at the step's last micro-batch, the gradients of the whole step (the generator's and the
            # discriminator's) are dropped and neither optimizer steps
            if accelerator.sync_gradients:
                optimizer.zero_grad(set_to_none=True)
                if disc is not None:
                    disc.drop_step()
            return {"skipped_nonfinite_steps": guard.skipped}
        apply_gradients(accelerator, model, loss, optimizer, scheduler, args)
        if disc is not None and loss_fn.discriminator_active(step):
            with accelerator.autocast():
                d_loss, d_logs = loss_fn.discriminator_loss(pixels, out.reconstruction.detach(), step)
            disc.accumulate(d_loss)
            logs.update(d_logs)
    logs.update(loss=float(loss.detach()), usage=float(out.stats.usage), perplexity=float(out.stats.perplexity),
                lr=scheduler.get_last_lr()[0])
    return logs


class DiscriminatorStep:
    """The discriminator's side of each step: its optimizer, its non-finite guard and, under fp16, a loss scaler of
    its own.

    accelerate's GradScaler is updated by the tokenizer's optimizer step, before the last micro-batch's
    discriminator backward: shared, it unscaled the micro-batches accumulated before that update with the new scale
    (wrong weights whenever the scale changed), and it was updated twice per step.
    """

    def __init__(self, accelerator, optimizer, discriminator: torch.nn.Module, guard: NonFiniteGuard):
        self.accelerator, self.optimizer, self.discriminator, self.guard = accelerator, optimizer, discriminator, guard
        self.scaler = None
        shared = accelerator.scaler
        if shared is not None:
            optimizer.scaler = None  # the prepared optimizer steps plainly; self.scaler unscales and skips for it
            self.scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=shared.get_scale(),
                                               growth_factor=shared.get_growth_factor(),
                                               backoff_factor=shared.get_backoff_factor(),
                                               growth_interval=shared.get_growth_interval())

    def accumulate(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; at the step's last micro-batch, average over processes and step."""
        accelerator = self.accelerator
        bad = self.guard.is_bad(accelerator, loss)
        if not bad:
            if self.scaler is None:
                accelerator.backward(loss)  # scaled by 1 / gradient_accumulation_steps
            else:
                (self.scaler.scale(loss) / accelerator.gradient_accumulation_steps).backward()
        if accelerator.sync_gradients:  # the last micro-batch of the step
            if not bad:
                _average_gradients(accelerator, self.discriminator)
                if self.scaler is None:
                    self.optimizer.step()
                else:
                    self.scaler.step(self.optimizer.optimizer)  # skipped when the unscaled gradients are not finite
                    self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)

    def drop_step(self) -> None:
        """The generator's step was skipped (at its last micro-batch): drop the discriminator's step too."""
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.drop_step()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The fp16 scaler's state, as tensors (checkpointed as `discriminator_scaler.safetensors`)."""
        if self.scaler is None:
            return {}
        return {key: torch.tensor(value) for key, value in self.scaler.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict({key: value.item() for key, value in state.items()})


@contextlib.contextmanager
def frozen(module: torch.nn.Module | None) -> Iterator[None]:
    """Parameters of `module` do not require gradients inside the block (gradients still flow through it)."""
    if module is None:
        yield
        return
    flags = [(parameter, parameter.requires_grad) for parameter in module.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _average_gradients(accelerator, module: torch.nn.Module) -> None:
    """The discriminator is not DDP-wrapped (its loss is not its forward), so its gradients are averaged here."""
    if accelerator.num_processes == 1:
        return
    for parameter in module.parameters():
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def _validate(accelerator, model, val_loader, args, step, perceptual) -> dict:
    metrics, (originals, reconstructions) = evaluate_tokenizer(
        unwrap_float32(accelerator, model), val_loader, accelerator, max_batches=args.max_validation_batches,
        perceptual=perceptual, sample_images=args.num_validation_images)
    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
    if accelerator.is_main_process:
        # --num_validation_images originals (fewer when validation holds fewer) above their reconstructions
        grid = image_grid(torch.cat([originals, reconstructions]), columns=originals.shape[0], scale=2)
        folder = append_validation_metrics(args, step, metrics)
        save_image(grid, folder / f"reconstructions-{step:06d}.png")
        accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_tokenizer(build_parser().parse_args(argv))
