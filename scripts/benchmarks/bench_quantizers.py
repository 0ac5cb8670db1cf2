"""Benchmark of the vqstack quantizers against vector-quantize-pytorch and a taming-style quantizer.

Two parts, each printed as a markdown table:

- speed: forward+backward tokens/s of one quantizer step on `--tokens` random latents of dim 256 for
  several codebook sizes, and the peak extra memory of that step. Each (method, K) runs in its own
  subprocess; the memory column is the growth of the process's peak resident set size (VmHWM, reset
  after the warm-up step) during the timed steps over the resident size right before them, i.e. the
  temporaries a step allocates (distance matrices, gradients) as the OS sees them. Memory the allocator
  kept from the warm-up step and reuses is not counted, so the column is a lower bound.
- utilization: the same small autoencoder trained with each quantizer for the same budget on 32x32
  natural-image patches (Adam, L1 + quantizer loss), then codebook usage, perplexity and PSNR on
  held-out patches.

    python scripts/benchmarks/bench_quantizers.py            # full run (long on a 2-core CPU)
    python scripts/benchmarks/bench_quantizers.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tokenizer.quantizers import QuantizerConfig, build_quantizer  # noqa: E402

SPEED_DIM = 256
SPEED_METHODS = ("vqstack-default", "vqstack-plain", "vqstack-plain-bf16", "vqp-ema", "taming")


# ----------------------------------------------------------------------------------------- peers
class TamingQuantizer(nn.Module):
    """The taming-transformers VectorQuantizer recipe: full distance matrix, argmin, STE, codebook loss."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.beta = beta

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, D, h, w) -> (quantized, indices, loss)."""
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.view(-1, z.shape[-1])  # (N, D)
        weight = self.embedding.weight
        distances = (
            flat.pow(2).sum(dim=1, keepdim=True) + weight.pow(2).sum(dim=1) - 2 * flat @ weight.t()
        )  # (N, K)
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape)
        loss = self.beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z.detach(), z_q)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), indices.view(z.shape[:-1]), loss


class VQPQuantizer(nn.Module):
    """vector-quantize-pytorch's VectorQuantize behind the (quantized, indices, loss) convention."""

    def __init__(self, codebook_size: int, dim: int, **options) -> None:
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.inner = VectorQuantize(dim=dim, codebook_size=codebook_size, **options)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, dim, height, width = z.shape
        tokens = z.permute(0, 2, 3, 1).reshape(batch, height * width, dim)  # (B, h*w, D)
        quantized, indices, loss = self.inner(tokens)
        quantized = quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        return quantized, indices.reshape(batch, height, width), loss.sum()


class VQStackQuantizer(nn.Module):
    """A vqstack quantizer behind the same (quantized, indices, loss) convention."""

    def __init__(self, config: QuantizerConfig, dim: int) -> None:
        super().__init__()
        self.inner = build_quantizer(config, dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.inner(z)
        return out.quantized, out.indices, out.loss


PLAIN_VQ = dict(codebook_dim=None, use_ema=False, normalize_codes=False, kmeans_init=False, dead_code_steps=0,
                entropy_weight=0.0)


def make_quantizer(method: str, codebook_size: int, dim: int) -> nn.Module:
    """The quantizer a benchmark row names."""
    if method == "vqstack-default":
        return VQStackQuantizer(QuantizerConfig(codebook_size=codebook_size), dim)
    if method == "vqstack-plain":
        return VQStackQuantizer(QuantizerConfig(codebook_size=codebook_size, **PLAIN_VQ), dim)
    if method == "vqstack-plain-bf16":
        config = QuantizerConfig(codebook_size=codebook_size, search_dtype="bfloat16", **PLAIN_VQ)
        return VQStackQuantizer(config, dim)
    if method == "vqstack-fsq":
        return VQStackQuantizer(QuantizerConfig(kind="fsq", codebook_size=codebook_size), dim)
    if method == "vqstack-lfq":
        config = QuantizerConfig(kind="lfq", codebook_size=codebook_size, entropy_weight=0.1,
                                 entropy_temperature=0.1)  # weight as in MAGVIT-v2
        return VQStackQuantizer(config, dim)
    if method == "vqp-ema":
        return VQPQuantizer(codebook_size, dim)  # its defaults: EMA (decay 0.8), no k-means
    if method == "vqp-ema-kmeans-cosine":
        return VQPQuantizer(codebook_size, dim, decay=0.99, kmeans_init=True, use_cosine_sim=True,
                            threshold_ema_dead_code=2)
    if method == "taming":
        return TamingQuantizer(codebook_size, dim)
    raise ValueError(f"method={method!r} is not a benchmark row")


# ------------------------------------------------------------------------------------------ speed
def current_rss_kib() -> int:
    """Resident set size now, in KiB (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS mark (VmHWM) so that the warm-up's peak is not counted."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_kib() -> int:
    """Peak resident set size since the last `reset_peak_rss`, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def speed_worker(method: str, codebook_size: int, tokens: int, steps: int) -> dict:
    """Time `steps` forward+backward passes after one warm-up step; runs inside its own process."""
    torch.manual_seed(0)
    side = int(math.isqrt(tokens))  # a square count (checked in main): exactly `tokens` latents
    batch = 1
    quantizer = make_quantizer(method, codebook_size, SPEED_DIM).train()
    z = torch.randn(batch, SPEED_DIM, side, side, requires_grad=True)  # (B, D, h, w)
    upstream = torch.randn(batch, SPEED_DIM, side, side)

    def step() -> None:
        quantized, _, loss = quantizer(z)
        ((quantized * upstream).mean() + loss).backward()
        z.grad = None
        for parameter in quantizer.parameters():
            parameter.grad = None

    step()  # warm-up: k-means init and allocator growth are not timed
    reset_peak_rss()
    baseline = current_rss_kib()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = peak_rss_kib()
    # The median step resists the bursts of other processes on a shared machine.
    return {"tokens_per_s": batch * side * side / float(np.median(seconds)),
            "peak_extra_mib": max(0, peak - baseline) / 1024}


def taming_bytes(codebook_size: int, tokens: int) -> int:
    """Its (N, K) float32 temporaries: the matmul, the sum of norms and the difference, alive at once."""
    return 3 * 4 * codebook_size * tokens


def run_speed(sizes: list[int], tokens: int, steps: int, memory_cap_gib: float) -> list[dict]:
    rows = []
    for codebook_size in sizes:
        for method in SPEED_METHODS:
            row = {"K": codebook_size, "method": method}
            if method == "taming" and taming_bytes(codebook_size, tokens) > memory_cap_gib * 2**30:
                row["skipped"] = f"needs ~{taming_bytes(codebook_size, tokens) / 2**30:.1f} GiB of (N, K) temporaries"
                rows.append(row)
                continue
            command = [sys.executable, __file__, "--speed-worker", method, str(codebook_size), str(tokens), str(steps)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                row["skipped"] = f"failed: {result.stderr.strip().splitlines()[-1:]}"
            else:
                row.update(json.loads(result.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(f"  speed {row}", file=sys.stderr, flush=True)
    return rows


def print_speed_table(rows: list[dict], tokens: int) -> None:
    print(f"\n### Speed: forward+backward of one quantizer step, {tokens} tokens of dim {SPEED_DIM}, float32\n")
    print("tokens/s from the median step; memory: peak RSS growth during the timed steps (see module doc).\n")
    print("| K | method | tokens/s | peak extra memory (MiB) |")
    print("|---:|---|---:|---:|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['K']} | {row['method']} | skipped: {row['skipped']} | |")
        else:
            print(f"| {row['K']} | {row['method']} | {row['tokens_per_s']:,.0f} | {row['peak_extra_mib']:,.0f} |")


# ------------------------------------------------------------------------------------ utilization
def load_patches(num_train: int, num_validation: int) -> tuple[Tensor, Tensor, str]:
    """(N, 3, 32, 32) train and held-out patches in [-1, 1], and where they come from."""
    try:
        from pipelines.data import load_embedded_dataset
    except ImportError:
        load_embedded_dataset = None
    if load_embedded_dataset is not None:
        splits = load_embedded_dataset("natural-patches", resolution=32, num_train=num_train,
                                       num_validation=num_validation)
        arrays = [np.stack([np.asarray(image.convert("RGB")) for image in splits[name]["image"]])
                  for name in ("train", "validation")]
        source = "pipelines.data natural-patches"
    else:
        arrays = [_skimage_crops(names, count, seed) for names, count, seed in
                  ((("astronaut", "chelsea", "rocket"), num_train, 0), (("coffee",), num_validation, 1))]
        source = "random crops of scikit-image photos (train: astronaut/chelsea/rocket, held out: coffee)"
    train, validation = (torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1.0 for a in arrays)
    return train, validation, source


def _skimage_crops(names: tuple[str, ...], count: int, seed: int) -> np.ndarray:
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)()[:, :, :3] for name in names]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(photo.shape[0] - 32), rng.integers(photo.shape[1] - 32)
        crops.append(photo[top:top + 32, left:left + 32])
    return np.stack(crops)


class ConvAutoencoder(nn.Module):
    """Fallback f4 autoencoder when `tokenizer.VQTokenizer` is not available."""

    def __init__(self, latent_channels: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(64, latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, 64, 3, 1, 1), nn.SiLU(), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.SiLU(),
            nn.ConvTranspose2d(32, 3, 4, 2, 1),
        )


def make_autoencoder(latent_channels: int) -> tuple[nn.Module, str]:
    """The lead tokenizer's 'tiny' preset (its encoder and decoder) when it exists, else a small conv AE."""
    try:
        from tokenizer import VQTokenizer
    except ImportError:
        return ConvAutoencoder(latent_channels), "conv autoencoder defined in this benchmark"
    model = VQTokenizer.from_preset("tiny", latent_channels=latent_channels)
    return model, "tokenizer.VQTokenizer preset 'tiny' (encoder/decoder)"


@dataclass
class UtilizationResult:
    method: str
    codebook_size: int
    usage: float  # fraction of codes used on held-out patches
    perplexity: float  # exp(entropy) of the held-out code histogram
    psnr: float  # held-out reconstruction PSNR in dB (pixels in [-1, 1], peak-to-peak 2)
    seconds: float


def train_and_evaluate(method: str, train: Tensor, validation: Tensor, *, steps: int, batch_size: int,
                       codebook_size: int, latent_channels: int) -> UtilizationResult:
    torch.manual_seed(0)
    autoencoder, _ = make_autoencoder(latent_channels)
    quantizer = make_quantizer(method, codebook_size, latent_channels)
    parameters = list(autoencoder.encoder.parameters()) + list(autoencoder.decoder.parameters())
    optimizer = torch.optim.Adam(parameters + list(quantizer.parameters()), lr=2e-4)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):
        images = train[torch.randint(len(train), (batch_size,), generator=generator)]
        quantized, _, quantizer_loss = quantizer(autoencoder.encoder(images))
        loss = (autoencoder.decoder(quantized) - images).abs().mean() + quantizer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return _evaluate(method, autoencoder, quantizer, validation, seconds)


@torch.no_grad()
def _evaluate(method: str, autoencoder: nn.Module, quantizer: nn.Module, validation: Tensor,
              seconds: float) -> UtilizationResult:
    autoencoder.eval()
    quantizer.eval()
    counts, squared_error = None, 0.0
    for images in validation.split(256):
        quantized, indices, _ = quantizer(autoencoder.encoder(images))
        reconstruction = autoencoder.decoder(quantized).clamp(-1.0, 1.0)
        squared_error += (reconstruction - images).pow(2).sum().item()
        batch_counts = torch.bincount(indices.reshape(-1), minlength=_codebook_size(quantizer)).double()
        counts = batch_counts if counts is None else counts + batch_counts
    probs = counts / counts.sum()
    perplexity = math.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum().item())
    mse = squared_error / validation.numel()
    return UtilizationResult(method, len(counts), (counts > 0).double().mean().item(), perplexity,
                             10 * math.log10(4.0 / mse), seconds)


def _codebook_size(quantizer: nn.Module) -> int:
    if isinstance(quantizer, VQPQuantizer):
        return quantizer.inner.codebook_size
    if isinstance(quantizer, TamingQuantizer):
        return quantizer.embedding.num_embeddings
    return quantizer.inner.codebook_size


def print_utilization_table(results: list[UtilizationResult], steps: int, batch_size: int, model: str,
                            source: str, num_validation: int) -> None:
    print(f"\n### Codebook utilization after {steps} steps (batch {batch_size}, Adam 2e-4, L1 + quantizer loss)\n")
    print(f"Model: {model}. Data: {source}; metrics on {num_validation} held-out patches.\n")
    print("| quantizer | codebook size | usage (held out) | perplexity | PSNR (dB) | train time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for result in results:
        print(f"| {result.method} | {result.codebook_size} | {100 * result.usage:.1f}% | {result.perplexity:.0f} | "
              f"{result.psnr:.2f} | {result.seconds:.0f} |")


UTILIZATION_METHODS = ("vqstack-default", "vqstack-plain", "vqstack-fsq", "vqstack-lfq", "vqp-ema-kmeans-cosine")


def run_utilization(methods: list[str], *, steps: int, batch_size: int, codebook_size: int,
                    num_train: int, num_validation: int, latent_channels: int) -> None:
    train, validation, source = load_patches(num_train, num_validation)
    _, model = make_autoencoder(latent_channels)
    results = []
    for method in methods:
        result = train_and_evaluate(method, train, validation, steps=steps, batch_size=batch_size,
                                    codebook_size=codebook_size, latent_channels=latent_channels)
        print(f"  utilization {result}", file=sys.stderr, flush=True)
        results.append(result)
    print_utilization_table(results, steps, batch_size, model, source, num_validation)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke run")
    parser.add_argument("--part", choices=("all", "speed", "utilization"), default="all")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="codebook sizes of the speed part")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per speed step, a square number: one (tokens**0.5)^2 grid (default 8100 = 90^2)")
    parser.add_argument("--speed-steps", type=int, default=None, help="timed steps per speed row (default 5)")
    parser.add_argument("--memory-cap-gib", type=float, default=4.0, help="skip taming rows needing more")
    parser.add_argument("--steps", type=int, default=None, help="training steps per quantizer (default 400)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(UTILIZATION_METHODS), help="utilization rows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--speed-worker", nargs=4, metavar=("METHOD", "K", "TOKENS", "STEPS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the speed subprocesses
    if args.speed_worker:
        method, codebook_size, tokens, steps = args.speed_worker
        print(json.dumps(speed_worker(method, int(codebook_size), int(tokens), int(steps))))
        return
    sizes = args.sizes or ([1024, 4096] if args.quick else [1024, 16384, 65536])
    tokens = args.tokens if args.tokens is not None else (1024 if args.quick else 8100)
    if tokens < 1 or math.isqrt(tokens) ** 2 != tokens:
        raise SystemExit(f"--tokens must be a positive square number (the latents are one square grid), got {tokens}")
    speed_steps = args.speed_steps or (1 if args.quick else 5)
    steps = args.steps or (20 if args.quick else 400)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if args.part in ("all", "speed"):
        print_speed_table(run_speed(sizes, tokens, speed_steps, args.memory_cap_gib), tokens)
    if args.part in ("all", "utilization"):
        run_utilization(args.methods, steps=steps, batch_size=args.batch_size, codebook_size=1024,
                        num_train=2000 if args.quick else 20000, num_validation=200 if args.quick else 1000,
                        latent_channels=16)


if __name__ == "__main__":
    main()
