"""Pre-tokenize an image dataset with a saved tokenizer: `accelerate launch scripts/encode_dataset.py --help`."""

from pipelines.encode import main

if __name__ == "__main__":
    main()
