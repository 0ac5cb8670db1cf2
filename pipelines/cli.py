"""The `vqstack` command line: one subcommand per job, each a thin layer over a `pipelines` module.

`vqstack <command> --help` shows a command's flags; the same flags work with the matching
`accelerate launch scripts/<script>.py` entry point.

Bad input (a `ValueError` or `OSError`: a wrong flag value, a missing file, an unreachable Hub) ends the command
with one line, `vqstack <command>: error: <message>`, and exit status 1. Set `VQSTACK_TRACEBACK=1` to get the
full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
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
    lines += ["", "Run `vqstack <command> --help` for the options of a command.",
              "Errors print one line; set VQSTACK_TRACEBACK=1 for the full traceback."]
    return "\n".join(lines)


# What bad input raises: flag values, files and folders, the network. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


def run_reporting_errors(program: str, function: Callable[[], object]) -> int:
    """Run `function`; bad input (`USER_ERRORS`) prints `<program>: error: <message>` and returns 1, else 0.

    The traceback is shown instead when the environment sets VQSTACK_TRACEBACK to anything but "" or "0".
    """
    try:
        function()
    except USER_ERRORS as error:
        if os.environ.get("VQSTACK_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"{program}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    return 0


def run_script(program: str, main: Callable[[], object]) -> None:
    """The `scripts/*.py` entry points: `main()` with errors reported as `vqstack` reports them."""
    sys.exit(run_reporting_errors(program, main))


def console_main() -> int:
    """The `vqstack` executable: `main()` with one-line errors (see the module docstring)."""
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        return main(argv)
    return run_reporting_errors(f"vqstack {argv[0]}", lambda: main(argv))


def main(argv: list[str] | None = None) -> int:
    """Run a `vqstack` command; errors propagate as exceptions (`console_main` is the executable)."""
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
    sys.exit(console_main())
