"""`vqstack push`: upload a saved tokenizer, prior or pipeline folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder written by save_pretrained (tokenizer, prior or pipeline)")
    parser.add_argument("--repo_id", type=str, required=True, help="e.g. 'your-name/vqstack-digits'")
    parser.add_argument("--token", type=str, default=None)
    # None (no flag) leaves the choice to the Hub: the account's or organization's default visibility.
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    return parser


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Load what `folder` holds (validating it) and push it with its generated model card.

    A prior's config.json names its `prior_type`; any other config.json is taken for a tokenizer's.
    """
    folder = Path(folder)
    if (folder / "pipeline.json").is_file():
        from .generation import GenerationPipeline

        return GenerationPipeline.from_pretrained(folder).push_to_hub(repo_id, token=token, private=private)
    config = folder / "config.json"
    if config.is_file():
        try:
            is_prior = "prior_type" in json.loads(config.read_text())
        except (json.JSONDecodeError, TypeError):
            is_prior = False  # the tokenizer loader names the malformed file
        if is_prior:
            from prior import load_prior

            return str(load_prior(folder).push_to_hub(repo_id, token=token, private=private))
        from tokenizer import VQTokenizer

        return str(VQTokenizer.from_pretrained(folder).push_to_hub(repo_id, token=token, private=private))
    raise FileNotFoundError(f"{folder} is not a saved tokenizer, prior or pipeline (no config.json / pipeline.json)")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(push_folder(args.folder, args.repo_id, token=args.token, private=args.private))
