"""What every vqstack training loop shares: flags, the Accelerator, data order, EMA, fault guards, resume.

The tokenizer and prior loops (`train_tokenizer.py`, `train_prior.py`) differ only in their model and loss;
everything that makes a run reproducible and resumable lives here, so it is written and tested once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    SCALER_NAME,
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    set_seed,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from tokenizer.weights import write_file_atomically

from .checkpointing import check_output_dir, checkpoint_step, resolve_resume, save_checkpoint
from .hub import hub_push_errors

logger = logging.getLogger(__name__)
TRAINING_STATE_NAME = "training_state.json"
DEFAULT_EMA_DECAY = 0.999


def add_common_training_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by all training scripts, named as in the diffusers examples."""
    group = parser.add_argument_group("training")
    group.add_argument("--output_dir", type=str, required=True, help="where checkpoints, logs and the model go")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--train_batch_size", type=int, default=32, help="per-device batch size")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--max_train_steps", type=int, default=1000, help="optimizer steps")
    group.add_argument("--learning_rate", type=float, default=2e-4)
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       choices=["constant", "constant_with_warmup", "linear", "cosine"])
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.99)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "bf16", "fp16"])
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=3)
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help='a checkpoint folder, or "latest" to continue from the newest one in --output_dir')
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="start over in an --output_dir that holds checkpoints of another run, deleting them")
    group.add_argument("--validation_steps", type=int, default=500)
    group.add_argument("--use_ema", action="store_true", help="keep an exponential moving average of the weights")
    group.add_argument("--ema_decay", type=float, default=DEFAULT_EMA_DECAY, help="with --use_ema")
    group.add_argument("--report_to", type=str, default="none",
                       help='tracker for accelerate ("tensorboard", "wandb", "all" or "none")')
    group.add_argument("--max_nonfinite_steps", type=int, default=10,
                       help="stop after this many consecutive steps with a NaN/Inf loss (each one is skipped)")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id", type=str, default=None)
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def check_common_args(args: argparse.Namespace) -> None:
    """Fail early, naming the flag, before any work is done."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                "validation_steps", "max_nonfinite_steps"]
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not 0 <= args.seed < 2**32:  # numpy's seed range (accelerate's set_seed seeds numpy too)
        raise ValueError(f"--seed must lie in [0, 2**32), got {args.seed}")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):
        raise ValueError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if args.lr_warmup_steps > 0 and args.lr_scheduler == "constant":
        raise ValueError("--lr_scheduler constant has no warmup, so --lr_warmup_steps would be ignored; use "
                         "--lr_scheduler constant_with_warmup (or linear, cosine)")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. 'your-name/your-model')")
    # Flags of a feature that is off would be ignored: refuse them, as the discriminator's flags without a GAN are.
    if not args.use_ema and args.ema_decay != DEFAULT_EMA_DECAY:
        raise ValueError(f"--ema_decay {args.ema_decay} applies with --use_ema only; add --use_ema or drop --ema_decay")
    ignored = [f"--{name}" for name in ("hub_model_id", "hub_token") if getattr(args, name) and not args.push_to_hub]
    if ignored:
        verb, pronoun = ("applies", "it") if len(ignored) == 1 else ("apply", "them")
        raise ValueError(f"{' and '.join(ignored)} {verb} with --push_to_hub only; add --push_to_hub or drop {pronoun}")


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator for this run: devices, processes, precision, accumulation, trackers, seedable data order."""
    log_with = None if args.report_to == "none" else args.report_to
    # Jobs may run one after another in one process (quickstart, tests) with different precisions; the process
    # group (PartialState) is kept, only the per-job accelerator settings are reset.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=cpu_only_multiprocess(),
        mixed_precision=args.mixed_precision,
        # Every `gradient_accumulation_steps` micro-batches make one optimizer step, across epoch boundaries too:
        # by default accelerate also steps at the end of each epoch, which would make step counts drift and
        # break resuming from a checkpoint.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / "logs")),
        # The sampler's order depends only on (seed, epoch), so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def cpu_only_multiprocess() -> bool:
    """True for `accelerate launch --multi_gpu --num_processes N` on a machine without any accelerator.

    accelerate then needs `cpu=True` to pick the gloo backend (its `--cpu` launcher alone starts one process).
    """
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available() or (
        hasattr(torch, "xpu") and torch.xpu.is_available())
    return not has_accelerator and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, accelerator: Accelerator):
    """The learning-rate schedule over `max_train_steps` optimizer steps.

    Once prepared, accelerate steps a scheduler once per process at every optimizer step, so the schedule is
    laid out over `num_processes` times as many steps (as in the diffusers training examples).
    """
    from transformers import get_scheduler

    processes = accelerator.num_processes
    return get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * processes,
                         num_training_steps=args.max_train_steps * processes)


def training_dataloader(dataset, args: argparse.Namespace, collate_fn) -> DataLoader:
    """Shuffled, fixed-size batches. The loader has its own generator: creating an iterator (at start, at each
    epoch, after a resume) then never draws from the global RNG that augmentations use, so a resumed run
    sees exactly the random crops and flips of an uninterrupted one."""
    return DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate_fn,
                      num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))


def evaluation_dataloader(dataset, batch_size: int, collate_fn) -> DataLoader:
    """In-order batches; its own generator keeps evaluation from drawing on the global RNG mid-training."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(0))


def batches(accelerator: Accelerator, dataloader, start_step: int) -> Iterator[Any]:
    """Endless batches in (seed, epoch) order, starting right after `start_step` optimizer steps."""
    per_epoch = len(dataloader)
    if per_epoch == 0:
        examples = len(dataloader.dataset) if hasattr(dataloader.dataset, "__len__") else "too few"
        per_step = getattr(dataloader, "total_batch_size", None) or dataloader.batch_size  # all processes together
        raise ValueError(f"the training split has {examples} example(s), fewer than one batch of {per_step} "
                         f"({accelerator.num_processes} process(es) together): lower --train_batch_size, or train "
                         "on more images")
    epoch, skip = divmod(start_step * accelerator.gradient_accumulation_steps, per_epoch)
    augmentation = getattr(dataloader.dataset, "augmentation", None)
    while True:
        dataloader.set_epoch(epoch)
        if augmentation is not None:
            augmentation.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yield from loader
        epoch, skip = epoch + 1, 0


class ExponentialMovingAverage:
    """EMA of a model's floating-point parameters and buffers (Polyak averaging).

    The decay warms up as in diffusers' `EMAModel`: update n (from 0) uses min(decay, (1 + n) / (10 + n)), so that
    the average soon forgets the random initialization (with a fixed 0.999, 37% of it would remain after 1000 steps).
    """

    _UPDATES_KEY = "__num_updates__"  # not a valid module state-dict key, so it cannot collide with one

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for key, value in model.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), weight)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in self.shadow.items()}}, strict=True)

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block `model` holds the EMA weights; its own are put back, bit for bit, afterwards."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                state = model.state_dict()
                for key, value in backup.items():
                    state[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, self._UPDATES_KEY: torch.tensor(self.num_updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        updates = state.pop(self._UPDATES_KEY, None)
        if set(state) != set(self.shadow):
            raise ValueError("the checkpoint's EMA tensors do not match the model")
        self.shadow = {k: v.float() for k, v in state.items()}
        # Checkpoints from before the warmup have no count: their EMA is past any warmup.
        self.num_updates = int(updates) if updates is not None else 1_000_000_000


class NonFiniteGuard:
    """Skips optimizer steps whose loss is NaN/Inf and stops the run after `limit` consecutive ones.

    A step is skipped whole: one non-finite micro-batch voids the gradients of every micro-batch accumulated into
    the same optimizer step. All processes agree (the flag is summed over processes), so none of them steps alone.
    """

    def __init__(self, limit: int, what: str = "loss"):
        self.limit = limit
        self.what = what
        self.consecutive = 0
        self.skipped = 0
        self._step_is_bad = False  # a micro-batch of the optimizer step being accumulated was non-finite

    def is_bad(self, accelerator: Accelerator, loss: torch.Tensor) -> bool:
        """True when this micro-batch's loss, or an earlier one of the same optimizer step, is non-finite on any
        process: the caller then skips its backward and, at the step's last micro-batch (`sync_gradients`),
        drops the accumulated gradients instead of stepping. Steps are counted at their last micro-batch."""
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
        self._step_is_bad |= bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if not accelerator.sync_gradients:
            return self._step_is_bad
        bad, self._step_is_bad = self._step_is_bad, False
        if not bad:
            self.consecutive = 0
            return False
        self.consecutive += 1
        self.skipped += 1
        warnings.warn(f"non-finite {self.what} ({loss.item()}): optimizer step skipped ({self.skipped} skipped so far)",
                      stacklevel=2)
        if self.consecutive >= self.limit:
            raise FloatingPointError(
                f"the {self.what} was NaN/Inf for {self.consecutive} consecutive steps (--max_nonfinite_steps="
                f"{self.limit}); stopping without saving these weights. Lower --learning_rate, use --mixed_precision "
                "no, or resume from the last checkpoint."
            )
        return True

    def drop_step(self) -> None:
        """Forget a non-finite micro-batch of the current step: another guard's skip drops this step already."""
        self._step_is_bad = False


def save_training_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int, guard: NonFiniteGuard,
                             extra_state: dict[str, Any], model: nn.Module) -> Path:
    """`accelerator.save_state` plus our step counter and `extra_state` objects (EMA, loss modules), each as
    `<name>.safetensors`, all inside one atomic checkpoint folder. Non-finite weights are never saved."""
    for name, tensor in unwrap_float32(accelerator, model).state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"weight {name} contains NaN/Inf at step {step}: refusing to overwrite good "
                                     "checkpoints with it; resume from the last checkpoint with a lower learning rate")

    def extra(folder: Path) -> None:
        state = {"global_step": step, "skipped_nonfinite_steps": guard.skipped, "flags": _recorded_flags(args)}
        (folder / TRAINING_STATE_NAME).write_text(json.dumps(state) + "\n")
        for name, obj in extra_state.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in obj.state_dict().items()}
            save_file(tensors, str(folder / f"{name}.safetensors"))

    return save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, extra=extra)


def maybe_resume(accelerator: Accelerator, args: argparse.Namespace, guard: NonFiniteGuard,
                 extra_state: dict[str, Any], outputs: tuple[str, ...] = ()) -> int:
    """Load the checkpoint named by --resume_from_checkpoint; return the step to continue from (0 for a new run).

    `outputs` are the folders the run exports into --output_dir (besides validation/): a new run (no
    --resume_from_checkpoint) refuses to replace those of an earlier run unless --overwrite_output_dir is given.
    """
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    check_output_dir(accelerator, args.output_dir, path, args.overwrite_output_dir)
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        _refuse_earlier_outputs(args.output_dir, ("validation", *outputs))
    elif path is None and args.overwrite_output_dir:
        # An earlier run's exported model would otherwise stay beside this run's, looking like its result (a
        # pipeline/ that this run does not write, for one).
        if accelerator.is_main_process:
            for name in outputs:
                shutil.rmtree(Path(args.output_dir) / name, ignore_errors=True)
        accelerator.wait_for_everyone()
    if path is not None:
        _check_checkpoint_matches(accelerator, path, extra_state)
    # The validation log and images past the starting point come from another run, or from this run beyond its
    # checkpoint: the steps about to run would otherwise be logged twice.
    trim_validation_log(accelerator, args, checkpoint_step(path) if path is not None else 0)
    if path is None:
        return 0
    accelerator.load_state(str(path))
    state = read_training_state(path)
    for name, obj in extra_state.items():
        # read on the CPU: safetensors refuses accelerate's "cpu:0" device of CPU multi-process runs;
        # load_state_dict copies the values onto the module's own device
        tensors = load_file(str(path / f"{name}.safetensors"), device="cpu")
        try:
            obj.load_state_dict(tensors)  # nn.Module.load_state_dict is strict by default
        except (RuntimeError, KeyError, ValueError) as error:
            raise ValueError(f"{path / f'{name}.safetensors'} does not match this run's {name} state ({error}). "
                             "It was written with other flags (e.g. --adversarial_weight, --lecam_weight); resume "
                             "with the flags of the run that wrote it, or start a new run") from None
    if "ema" not in extra_state and (path / "ema.safetensors").is_file():
        logger.warning("checkpoint %s holds EMA weights, but this run has no --use_ema: they are not used", path)
    guard.skipped = state.get("skipped_nonfinite_steps", 0)
    _warn_changed_flags(path, state.get("flags"), _recorded_flags(args))
    accelerator.print(f"resumed from {path} at step {state['global_step']}")
    return int(state["global_step"])


# Secrets: never written to a checkpoint, a log or a tracker.
_SECRET_FLAGS = frozenset({"hub_token"})
# Flags that say where and how often to write, not what to train: a resume may change them freely.
# --max_train_steps too, unless the learning-rate schedule is laid out over it (see `_recorded_flags`).
_BOOKKEEPING_FLAGS = _SECRET_FLAGS | frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_train_steps", "checkpointing_steps",
    "checkpoints_total_limit", "validation_steps", "report_to", "push_to_hub", "hub_model_id",
    "no_progress", "dataloader_num_workers", "max_nonfinite_steps",
    # what validation writes: the tokenizer's reconstructions and metrics, the prior's sample grid (drawn from a
    # generator of its own, so the training stream does not depend on them)
    "num_validation_images", "max_validation_batches", "num_validation_samples", "guidance_scale", "temperature",
    "top_k",
})
DERIVED_FLAGS = frozenset({"quantizer_seed", "tokens_tokenizer_sha256"})  # recorded with the flags, set by the scripts
SCHEDULES_WITHOUT_TOTAL = frozenset({"constant", "constant_with_warmup"})  # the others decay over max_train_steps


def _recorded_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {name: value for name, value in vars(args).items() if name not in _BOOKKEEPING_FLAGS}
    if getattr(args, "lr_scheduler", "constant") not in SCHEDULES_WITHOUT_TOTAL:
        flags["max_train_steps"] = args.max_train_steps  # a decaying schedule is laid out over it
    return json.loads(json.dumps(flags, default=str))  # as written and read back


def recorded_resume_flags(args: argparse.Namespace) -> tuple[Path | None, dict[str, Any] | None]:
    """(the checkpoint --resume_from_checkpoint names, the flags it recorded), for checks that run before
    `maybe_resume` (which logs the look-up). (None, None) for a new run; the flags are None for a checkpoint written
    before they were recorded."""
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint, quiet=True)
    return (None, None) if path is None else (path, read_training_state(path).get("flags"))


def read_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's `training_state.json`: its step, skipped steps and (unless written before they were
    recorded) the flags it was written with."""
    state_path = path / TRAINING_STATE_NAME
    try:
        return json.loads(state_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no {TRAINING_STATE_NAME}: not a complete vqstack checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{state_path} is not valid JSON: {error}") from error


def _warn_changed_flags(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """A resume continues the run exactly only with the flags that wrote the checkpoint: name any that differ."""
    if saved is None:  # a checkpoint written before the flags were recorded
        return
    if "max_train_steps" not in saved and saved.get("lr_scheduler") == current.get("lr_scheduler"):
        current = {name: value for name, value in current.items() if name != "max_train_steps"}  # not recorded then
    # Derived, not flags: the quantizer seed from --seed and the checkpoint (see train_tokenizer), so a change of
    # --seed is named as such; the token data's tokenizer digest is checked by train_prior itself.
    # Bookkeeping flags too: checkpoints written before a flag became one (the validation flags) recorded it.
    # (--max_train_steps is recorded, and compared, when the schedule is laid out over it: see `_recorded_flags`.)
    ignored = DERIVED_FLAGS | (_BOOKKEEPING_FLAGS - {"max_train_steps"})
    saved, current = ({name: value for name, value in flags.items() if name not in ignored} for flags in (saved, current))
    changed = sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))
    if changed:
        logger.warning("resuming from %s with flags other than the run that wrote it: %s. The run continues with the "
                       "new values, so it will not match an uninterrupted run", path,
                       ", ".join(f"--{name} {saved.get(name)!r} -> {current.get(name)!r}" for name in changed))


def _refuse_earlier_outputs(output_dir: str | Path, names: tuple[str, ...]) -> None:
    """A new run would wipe the validation log of an earlier run there and overwrite its exported model."""
    found = [name for name in names if (Path(output_dir) / name).is_dir() and any((Path(output_dir) / name).iterdir())]
    if found:
        raise FileExistsError(
            f"{output_dir} holds the outputs of an earlier run ({', '.join(f'{name}/' for name in found)}) and no "
            "checkpoint to resume. Choose another --output_dir, pass --overwrite_output_dir to replace them, or "
            "--resume_from_checkpoint latest to continue a run that stopped before its first checkpoint"
        )


def _check_checkpoint_matches(accelerator: Accelerator, path: Path, extra_state: dict[str, Any]) -> None:
    """The checkpoint holds what this run will load: its optimizers (the discriminator's is the second) and
    extra states. Checked before loading anything, so that a mismatch names the flags instead of a file."""
    if accelerator.scaler is not None and not (path / SCALER_NAME).is_file():
        raise ValueError(f"checkpoint {path} was written without fp16 loss scaling (by a run with --mixed_precision no "
                         "or bf16), so it has no gradient scaler state to resume with --mixed_precision fp16: resume "
                         "with the precision of the run that wrote it, or start a new run from its exported model")
    saved = len(list(path.glob("optimizer*")))  # optimizer.bin, optimizer_1.bin (or sharded folders)
    if saved and saved != len(accelerator._optimizers):
        raise ValueError(
            f"checkpoint {path} holds {saved} optimizer(s), this run has {len(accelerator._optimizers)}: it was "
            "written with a different --adversarial_weight (the discriminator has its own optimizer). Resume with "
            "the flags of the run that wrote it, or start a new run from its exported model")
    for name in extra_state:
        if not (path / f"{name}.safetensors").is_file():
            flag = " (it was written by a run without --use_ema)" if name == "ema" else ""
            raise FileNotFoundError(f"checkpoint {path} has no {name}.safetensors{flag}; resume with the flags of the "
                                    "run that wrote it, or start a new run")


def unwrap_float32(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare model (no DDP / autocast wrapper), for export."""
    return accelerator.unwrap_model(model, keep_fp32_wrapper=False)


def progress_bar(accelerator: Accelerator, args: argparse.Namespace, start: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=args.max_train_steps, initial=start, desc=description,
                disable=args.no_progress or not accelerator.is_local_main_process, dynamic_ncols=True)


def init_trackers(accelerator: Accelerator, args: argparse.Namespace, project: str) -> None:
    """Start the --report_to trackers with the run's scalar arguments as its config (main process only)."""
    if accelerator.is_main_process:
        accelerator.init_trackers(project, config={k: v for k, v in vars(args).items()
                                                   if k not in _SECRET_FLAGS and isinstance(v, (int, float, str, bool))})


def apply_gradients(accelerator: Accelerator, model: nn.Module, loss: torch.Tensor, optimizer, scheduler,
                    args: argparse.Namespace) -> None:
    """Backward, clip (when --max_grad_norm > 0, at the accumulation boundary), optimizer and scheduler step."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and args.max_grad_norm > 0:
        if accelerator.scaler is not None:
            # fp16: unscale this optimizer only. accelerate's clip_grad_norm_ unscales every prepared optimizer, so
            # a discriminator's gradients accumulated so far would be unscaled here and again at its own step.
            accelerator.unscale_gradients(optimizer=optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        else:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run_training_steps(accelerator: Accelerator, args: argparse.Namespace, model: nn.Module, *, step: int,
                       data: Iterator[Any], guard: NonFiniteGuard, extra_state: dict[str, Any],
                       ema: ExponentialMovingAverage | None, bar, micro_step: Callable[[Any, int], Any],
                       report: Callable[[Any, int], None], validate: Callable[[int], dict]) -> tuple[int, dict]:
    """The step loop shared by every trainer, from `step` to --max_train_steps; returns (step, last metrics).

    Each step runs --gradient_accumulation_steps calls of `micro_step(batch, step)`, updates the EMA, and hands
    the last micro step's result to `report(result, step)`. The checkpoint is written before validation runs,
    so that its saved RNG state is the one training continues from (resuming equals an uninterrupted run).
    """
    metrics: dict = last_validation_metrics(args, step)  # kept when no step is left to run (a finished run)
    while step < args.max_train_steps:
        for _ in range(args.gradient_accumulation_steps):
            result = micro_step(next(data), step)
        step += 1
        if ema is not None:
            ema.update(unwrap_float32(accelerator, model))
        bar.update(1)
        report(result, step)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            save_training_checkpoint(accelerator, args, step, guard, extra_state, model)
        if step % args.validation_steps == 0 or step == args.max_train_steps:
            # Validation measures the weights that will be exported: the EMA's when it is kept.
            weights = ema.applied_to(unwrap_float32(accelerator, model)) if ema is not None else contextlib.nullcontext()
            with weights:
                metrics = validate(step)
    bar.close()
    return step, metrics


VALIDATION_LOG = "metrics.jsonl"
_STEP_FILE = re.compile(r"-(\d+)\.[a-z]+$")  # validation images are named <kind>-<step>.png


def _read_validation_log(path: Path) -> list[dict]:
    entries = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash while it was being appended
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def trim_validation_log(accelerator: Accelerator, args: argparse.Namespace, start_step: int) -> None:
    """Drop the validation entries and images of steps after `start_step` (main process), in one rename."""
    folder = Path(args.output_dir) / "validation"
    if accelerator.is_main_process and folder.is_dir():
        log = folder / VALIDATION_LOG
        if log.is_file():
            kept = [entry for entry in _read_validation_log(log) if entry["step"] <= start_step]
            write_file_atomically(log, "".join(json.dumps(entry) + "\n" for entry in kept))
        for path in folder.iterdir():
            match = _STEP_FILE.search(path.name)
            if match and int(match.group(1)) > start_step:
                path.unlink()
    accelerator.wait_for_everyone()


def last_validation_metrics(args: argparse.Namespace, step: int) -> dict:
    """The metrics logged by validation at `step` ({} when it did not run then)."""
    log = Path(args.output_dir) / "validation" / VALIDATION_LOG
    entries = [entry for entry in _read_validation_log(log) if entry["step"] == step] if log.is_file() else []
    return {key: value for key, value in entries[-1].items() if key != "step"} if entries else {}


def append_validation_metrics(args: argparse.Namespace, step: int, metrics: dict) -> Path:
    """Append `{"step": step, **metrics}` to <output_dir>/validation/metrics.jsonl; returns the folder."""
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / VALIDATION_LOG, "a") as handle:
        handle.write(json.dumps({"step": step, **metrics}) + "\n")
    return folder


def export_trained_model(accelerator: Accelerator, model: nn.Module, ema: ExponentialMovingAverage | None,
                         args: argparse.Namespace, name: str, annotate: Callable[[nn.Module], None],
                         push: bool = True) -> Path:
    """Save the trained model (EMA weights when kept) to <output_dir>/<name>, push it with --push_to_hub (unless
    `push` is False: the caller pushes something else), and end the trackers. `annotate(model)` attaches the run's
    metadata before saving."""
    accelerator.wait_for_everyone()
    folder = Path(args.output_dir) / name
    if accelerator.is_main_process:
        trained = unwrap_float32(accelerator, model)
        if ema is not None:
            ema.copy_to(trained)
        annotate(trained)
        trained.save_pretrained(folder)
        if args.push_to_hub and push:
            with hub_push_errors(folder, args.hub_model_id):
                trained.push_to_hub(args.hub_model_id, token=args.hub_token)
    accelerator.end_training()
    return folder
