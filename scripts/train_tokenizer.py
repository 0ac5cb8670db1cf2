"""Train a vqstack image tokenizer: `accelerate launch scripts/train_tokenizer.py --help`."""

from pipelines.cli import run_script
from pipelines.train_tokenizer import main

if __name__ == "__main__":
    run_script("train_tokenizer.py", main)
