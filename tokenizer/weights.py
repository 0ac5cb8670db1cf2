"""Reading and writing model files safely: safetensors only, strict key/shape/dtype checks, clear errors, Hub or
local folder, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class WeightsError(ValueError):
    """A weights file is missing, corrupt, or does not match the model built from its config."""


def resolve_file(model_id: str, filename: str, *, required: bool = True, **hub_kwargs) -> Path | None:
    """Path of `filename` in a local folder, or downloaded from the Hub repo `model_id`.

    Returns None for a missing optional file. A missing required file, or a Hub that cannot be reached,
    raises an error naming the file and what to do.
    """
    if os.path.isdir(model_id):
        path = Path(model_id) / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{filename} not found in {model_id!r}; it is needed to load this model")
        return None
    if os.path.exists(model_id) or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise FileNotFoundError(f"{model_id!r} is neither a folder written by save_pretrained nor a Hub repo id "
                                "like 'user/name'")
    try:
        return Path(hf_hub_download(repo_id=model_id, filename=filename, **hub_kwargs))
    except LocalEntryNotFoundError as error:
        if not required:
            return None
        raise hub_unreachable_error(model_id, filename, error) from error
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"{filename} not found in Hub repo {model_id!r}") from None
        return None


def hub_unreachable_error(repo_id: str, what: str, error: BaseException) -> OSError:
    """The error for a download from the Hub repo `repo_id` that found neither the network nor a cached copy."""
    return OSError(f"no local folder {repo_id!r} exists, and as a Hub repo id it failed: could not download {what} "
                   f"from the Hub repo {repo_id!r} (no network or repo not cached): "
                   f"{error}. Download the repo elsewhere (e.g. `hf download {repo_id} --local-dir DIR`), copy the "
                   "folder here and pass its path instead.")


def create_model_repo(api: HfApi, repo_id: str, private: bool | None) -> str:
    """Create the model repo `repo_id` unless it exists, and return its full id. With `private`, an existing public
    repo is refused: `create_repo(private=True, exist_ok=True)` leaves an existing repo's visibility as it is, so an
    upload would go up public. The check reads the id `create_repo` returns, so that a bare name is looked up in the
    account's own namespace."""
    repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if private and not api.repo_info(repo, repo_type="model").private:
        raise PermissionError(f"a private push was asked for, but the Hub repo {repo!r} already exists and is public: "
                              "nothing was uploaded. Make it private on the Hub (or with HfApi.update_repo_settings) "
                              "first, or push to a new repo id")
    return repo


def write_file_atomically(path: str | Path, data: bytes | str) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: an interrupted save never
    leaves a half-written file, and the file gets the permissions of the user's umask."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_state_dict_strict(model: torch.nn.Module, path: str | Path) -> torch.dtype | None:
    """Load a safetensors file into `model`, refusing missing, unexpected or mis-shaped tensors; returns the
    floating dtype that most of the file's weights are stored in (None if it holds no floating tensor)."""
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"could not read weights file {path}: it is corrupt, truncated or not a "
                           f"safetensors file ({error})") from error
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    # Floating-point precision may differ (a bf16 file loads into float32), the kind of number may not: an
    # integer tensor where weights are expected would otherwise be cast silently.
    mistyped = [f"{k}: file {state[k].dtype} vs model {expected[k].dtype}"
                for k in sorted(set(state) & set(expected)) if not _same_dtype_kind(state[k].dtype, expected[k].dtype)]
    problems = []
    if mistyped:
        problems.append(f"wrong dtype {_preview(mistyped)}")
    if missing:
        problems.append(f"missing tensors {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_preview(unexpected)}")
    if mis_shaped:
        problems.append(f"mis-shaped tensors {_preview(mis_shaped)}")
    if problems:
        raise WeightsError(f"weights file {path} does not match the model built from its config: "
                           + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    elements: dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + tensor.numel()
    return max(elements, key=elements.__getitem__, default=None)


def _preview(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def _same_dtype_kind(file_dtype: torch.dtype, model_dtype: torch.dtype) -> bool:
    """Both floating point (any precision), or the very same non-floating dtype."""
    if file_dtype.is_floating_point or model_dtype.is_floating_point:
        return file_dtype.is_floating_point and model_dtype.is_floating_point
    return file_dtype == model_dtype
