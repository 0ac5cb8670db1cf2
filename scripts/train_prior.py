"""Train a prior on pre-tokenized index grids: `accelerate launch scripts/train_prior.py --help`."""

from pipelines.cli import run_script
from pipelines.train_prior import main

if __name__ == "__main__":
    run_script("train_prior.py", main)
