"""The `vqstack` command line: one subcommand per job, each a thin layer over a `pipelines` module.

`vqstack <command> --help` shows a command's flags; the same flags work with the matching
`accelerate launch scripts/<script>.py` entry point.
"""

from __future__ import annotations

import sys
from importlib import import_module

# command -> (module with build_parser() and main(argv), one-line summary)
COMMANDS = {
    "quickstart": ("pipelines.quickstart", "train a tokenizer and a prior on an embedded dataset, then sample"),
    "train-tokenizer": ("pipelines.train_tokenizer", "train an image tokenizer (accelerate-launchable)"),
    "evaluate-tokenizer": ("pipelines.evaluate", "PSNR / SSIM / codebook usage (+ LPIPS, rFID with local weights) of a saved tokenizer, as JSON"),
    "encode": ("pipelines.encode", "pre-tokenize an image dataset into index grids"),
    "train-prior": ("pipelines.train_prior", "train a PixelCNN or Transformer prior on index grids"),
    "generate": ("pipelines.generation", "sample images with a saved pipeline; writes PNGs and a grid"),
    "reconstruct": ("pipelines.reconstruct", "tokenize and reconstruct image files"),
    "push": ("pipelines.hub", "upload a saved tokenizer, prior or pipeline to the Hugging Face Hub"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vqstack <command> [options]", "", "Discrete image generation: VQ tokenizers and priors.", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `vqstack <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"vqstack: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(COMMANDS[command][0])
    program = sys.argv[0]
    sys.argv[0] = f"vqstack {command}"  # argparse names the program after argv[0] in usage and errors
    try:
        module.main(rest)
    finally:
        sys.argv[0] = program
    return 0


if __name__ == "__main__":
    sys.exit(main())
