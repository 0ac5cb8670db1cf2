"""Constant memory under load: encode/decode a stream of generated images, then pre-tokenize a stream to disk.

Prints resident memory (RSS) after warm-up and at every tenth of the run, and the peak (VmHWM). With bounded
memory, RSS after 100k images equals RSS after the first few thousand, however many images flow through.

    python scripts/benchmarks/bench_stream_memory.py            # 100k images
    python scripts/benchmarks/bench_stream_memory.py --quick    # 5k images
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from pipelines.encode import encode_stream
from tokenizer import VQTokenizer


def memory_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def generated_images(count: int, size: int, seed: int = 0):
    """`count` distinct RGB images made on the fly (gradients plus noise), never all in memory."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for index in range(count):
        base = rng.uniform(0.2, 1.0, size=3) * ramp[:, None, None] + rng.normal(0, 12, size=(size, size, 3))
        yield {"image": Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), "label": index % 10}


def stream_encode_decode(tokenizer: VQTokenizer, count: int, size: int, batch_size: int) -> list[tuple[int, float]]:
    samples = []
    stream = datasets.IterableDataset.from_generator(generated_images, gen_kwargs={"count": count, "size": size})
    seen = 0
    with torch.no_grad():
        for batch in stream.iter(batch_size=batch_size):
            pixels = tokenizer.image_processor.preprocess(batch["image"])
            images = tokenizer.decode(tokenizer.encode(pixels).indices)
            tokenizer.image_processor.postprocess(images, "np")
            seen += len(batch["image"])
            if seen % max(count // 10, batch_size) < batch_size or seen == count:
                samples.append((seen, memory_mb()[0]))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=100_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for name in ("num_images", "resolution", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    count = 5_000 if args.quick else args.num_images  # --quick: 5,000 images whatever --num_images says
    torch.manual_seed(0)
    tokenizer = VQTokenizer.from_preset("tiny").eval()
    start_rss, _ = memory_mb()

    began = time.perf_counter()
    samples = stream_encode_decode(tokenizer, count, args.resolution, args.batch_size)
    elapsed = time.perf_counter() - began
    rss, peak = memory_mb()
    print(f"## Streaming encode + decode of {count:,} generated {args.resolution}x{args.resolution} images\n")
    print(f"{count / elapsed:,.0f} images/s; RSS before the stream {start_rss:.0f} MiB\n")
    print("| images seen | RSS (MiB) |\n|---:|---:|")
    for seen, mb in samples:
        print(f"| {seen:,} | {mb:.0f} |")
    first = samples[0][1]
    print(f"\nRSS growth from the first sample to the end: {rss - first:+.0f} MiB; peak RSS {peak:.0f} MiB; "
          f"raw pixels streamed: {count * args.resolution**2 * 3 / 2**20:,.0f} MiB\n")

    with tempfile.TemporaryDirectory() as tmp:
        stream = datasets.IterableDataset.from_generator(generated_images,
                                                         gen_kwargs={"count": count, "size": args.resolution})
        before, _ = memory_mb()
        began = time.perf_counter()
        encoded = encode_stream(tokenizer, stream, Path(tmp) / "train", resolution=args.resolution,
                                batch_size=args.batch_size, shard_size=max(count // 10, 1000))
        elapsed = time.perf_counter() - began
        after, peak = memory_mb()
        on_disk = sum(p.stat().st_size for p in (Path(tmp) / "train").rglob("*") if p.is_file())
        print(f"## Pre-tokenization of a {count:,}-image stream to disk (encode_stream)\n")
        print("| images | images/s | RSS before (MiB) | RSS after (MiB) | peak RSS (MiB) | tokens on disk (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|")
        print(f"| {len(encoded):,} | {count / elapsed:,.0f} | {before:.0f} | {after:.0f} | {peak:.0f} | "
              f"{on_disk / 2**20:.0f} |")


if __name__ == "__main__":
    main()
