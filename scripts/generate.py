"""Generate images with a saved pipeline: `accelerate launch scripts/generate.py --help`."""

from pipelines.generation import main

if __name__ == "__main__":
    main()
