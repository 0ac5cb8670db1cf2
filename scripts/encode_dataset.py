"""Pre-tokenize an image dataset with a saved tokenizer: `accelerate launch scripts/encode_dataset.py --help`."""

from pipelines.cli import run_script
from pipelines.encode import main

if __name__ == "__main__":
    run_script("encode_dataset.py", main)
