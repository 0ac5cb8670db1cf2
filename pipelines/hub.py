"""`vqstack push`: upload a saved tokenizer, prior or pipeline folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from tokenizer.model_card import GENERATED_CARD_MARKER
from tokenizer.weights import create_model_repo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by save_pretrained (tokenizer, prior or pipeline)")
    parser.add_argument("--repo_id", type=str, required=True, help="e.g. 'your-name/vqstack-digits'")
    parser.add_argument("--token", type=str, default=None)
    # None (no flag) leaves the choice to the Hub: the account's or organization's default visibility.
    parser.add_argument("--private", action="store_true", default=None,
                        help="create the repo as private; an existing public repo is refused")
    return parser


# The HTTP libraries huggingface_hub has been built on: their transport errors (no network, DNS, timeouts) reach the
# caller raw, naming neither the Hub nor the repo.
_HTTP_LIBRARIES = frozenset({"httpx", "httpx2", "requests", "urllib3"})


def _is_network_error(error: BaseException) -> bool:
    if isinstance(error, HfHubHTTPError):  # the Hub answered: its message says why
        return False
    # requests' ConnectionError and Timeout are OSErrors too: the library that raised, not the type, decides
    return any(cls.__module__.split(".")[0] in _HTTP_LIBRARIES for cls in type(error).__mro__)


@contextlib.contextmanager
def hub_push_errors(folder: str | Path, repo_id: str, private: bool | None = None) -> Iterator[None]:
    """Turn a failure to reach the Hub during a push of `folder` into a `ConnectionError` that names the Hub, the
    repo and the saved folder, and gives the `vqstack push` command (with `--private` when `private`) to retry."""
    try:
        yield
    except Exception as error:
        if not _is_network_error(error):
            raise
        retry = f"vqstack push {folder} --repo_id {repo_id}" + (" --private" if private else "")
        raise ConnectionError(
            f"could not reach the Hugging Face Hub to push to {repo_id!r} ({type(error).__name__}: {error}). Nothing "
            f"was lost: {folder} is saved; push it once the Hub is reachable, with `{retry}`") from error


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Load what `folder` holds (validating it) and push it.

    With a generated model card (or none), the loaded model is pushed with a freshly generated card (a pipeline's
    with a sample grid). A hand-written README.md is the author's: the folder is then uploaded as it is, card and
    files unchanged. A prior's config.json names its `prior_type`; any other config.json is taken for a tokenizer's.
    """
    folder = Path(folder)
    model, stale = _load_folder(folder)
    card = folder / "README.md"
    api = HfApi(token=token)
    with hub_push_errors(folder, repo_id, private):
        if card.is_file() and GENERATED_CARD_MARKER not in card.read_text(errors="replace"):
            repo = create_model_repo(api, repo_id, private)
            return str(api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                         commit_message=f"Upload {folder.name} (vqstack)", delete_patterns=stale))
        return str(model.push_to_hub(repo_id, token=token, private=private))  # refuses an existing public repo too


def _load_folder(folder: Path):
    """(the loaded tokenizer, prior or pipeline, the files an earlier push may have left stale)."""
    if (folder / "pipeline.json").is_file():
        from .generation import STALE_HUB_FILES, GenerationPipeline

        return GenerationPipeline.from_pretrained(folder, torch_dtype="auto"), STALE_HUB_FILES
    config = folder / "config.json"
    if config.is_file():
        try:
            is_prior = "prior_type" in json.loads(config.read_text())
        except (json.JSONDecodeError, TypeError):
            is_prior = False  # the tokenizer loader names the malformed file
        if is_prior:
            from prior import load_prior
            from prior.base import TRAINING_METRICS_NAME

            return load_prior(folder, torch_dtype="auto"), [TRAINING_METRICS_NAME]
        from tokenizer import VQTokenizer
        from tokenizer.modeling import TRAINING_INFO_NAME

        # In the precision it was saved in: a bf16 folder is pushed as bf16, not as float32 weights twice its size.
        return VQTokenizer.from_pretrained(folder, torch_dtype="auto"), [TRAINING_INFO_NAME]
    raise FileNotFoundError(f"{folder} is not a saved tokenizer, prior or pipeline (no config.json / pipeline.json)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(push_folder(args.folder, args.repo_id, token=args.token, private=args.private))
