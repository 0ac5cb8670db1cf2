"""Generate images with a saved pipeline: `accelerate launch scripts/generate.py --help`."""

from pipelines.cli import run_script
from pipelines.generation import main

if __name__ == "__main__":
    run_script("generate.py", main)
