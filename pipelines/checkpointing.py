"""Atomic, pruned `accelerate` checkpoints: a run killed at any moment resumes from the last complete one.

Each checkpoint is written by `accelerator.save_state` into `checkpoint-<step>.tmp`, then renamed to
`checkpoint-<step>` in one `os.replace`. A folder without the `.tmp` suffix is therefore always complete; a
leftover `.tmp` folder (from a crash, a full disk, a permission error) is ignored and cleaned up later.
Older checkpoints are deleted only after a newer one is complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like checkpoint-1000)")
    return int(match.group(1))


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str | None, *, quiet: bool = False) -> Path | None:
    """The checkpoint to resume from: a path, "latest" (None when there is none yet), or None.

    "latest" with no checkpoint yet logs that a new run starts, unless `quiet` (a look-up before the resume itself)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            if not quiet:
                logger.info("no checkpoint in %s yet: starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir() and (Path(output_dir) / path).is_dir():
        path = Path(output_dir) / path  # a checkpoint named relative to --output_dir (e.g. checkpoint-1000)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder")
    checkpoint_step(path)
    return path


def check_output_dir(accelerator: Accelerator, output_dir: str | Path, resume: Path | None, overwrite: bool) -> None:
    """Refuse to mix runs: checkpoints in `output_dir` beyond the resume point (all of them for a new run) belong
    to another run, and "latest" or pruning would otherwise pick them over this run's own.

    With `overwrite` they are deleted instead (main process).
    """
    start = checkpoint_step(resume) if resume is not None else -1
    foreign = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > start]
    if not foreign:
        return
    names = ", ".join(path.name for path in foreign)
    if not overwrite:
        what = f"newer than {resume}" if resume is not None else "from an earlier run"
        raise FileExistsError(
            f"{output_dir} holds checkpoints {what} ({names}). Resume them with --resume_from_checkpoint latest, "
            "choose another --output_dir, or pass --overwrite_output_dir to delete them and start over"
        )
    if accelerator.is_main_process:
        for path in foreign:
            logger.info("--overwrite_output_dir: removing %s", path)
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, total_limit: int | None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step> atomically, then keep only the newest `total_limit` checkpoints.

    `extra(folder)` writes further files (run on the main process) before the folder is made visible.

    A failure while writing (disk full, permissions) propagates after removing the partial folder; the
    previous checkpoints are untouched.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary), safe_serialization=True)
        if extra is not None and accelerator.is_main_process:
            extra(temporary)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(temporary)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(temporary, final)
        _prune(output_dir, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush every file so that the rename never exposes data still in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(output_dir: Path, total_limit: int | None, keep: Path) -> None:
    """Delete leftover .tmp folders and the oldest checkpoints beyond `total_limit`, never `keep` (just written)."""
    for stale in output_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None or total_limit <= 0:
        return
    checkpoints = [path for path in list_checkpoints(output_dir) if path != keep]
    for old in checkpoints[: max(0, len(checkpoints) + 1 - total_limit)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", old, total_limit)
        shutil.rmtree(old)
