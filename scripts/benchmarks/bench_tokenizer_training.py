"""Benchmark: training a vqstack tokenizer against its peers at a fixed budget, on this CPU.

Every system trains in the same run, on the same batches (same data, same order), for the same number of Adam
steps at the same learning rate, with the same loss (L1 reconstruction + the system's own VQ loss):

- vqstack: `VQTokenizer` with the "small-f4" preset (VQGAN layout plus DC-AE's parameter-free resampling and
  latent shortcuts) and its default quantizer (EMA, k-means init, 4-d cosine lookup, dead-code restarts,
  entropy penalty), trained under bf16 autocast. The quantizer keeps its
  arithmetic in float32 inside autocast by design. Tensors stay in the default (NCHW) layout: on this CPU
  PyTorch's GroupNorm is about 5x slower on channels_last bf16 tensors than on NCHW ones, which costs more
  than channels_last saves in the convolutions (measured: 31.4 vs 34.0 img/s).
- the peers the targets compare against: diffusers `VQModel` with the same depth and widths (vanilla VQ), and
  the same `VQModel` autoencoder with vector-quantize-pytorch's `VectorQuantize` (EMA, k-means init, cosine
  lookup, dead-code threshold 2, its default rotation-trick gradient) in place of its codebook. Each in float32
  as a user would run it, and under bf16 autocast as an extra row. The vector-quantize-pytorch peer also runs
  tuned (`TUNED_PEER_OPTIONS`: the 4-d lookup vqstack uses, commitment weight 0.25), and the targets count it.
- ablation rows, not peers: the vqstack autoencoder with vector-quantize-pytorch's `VectorQuantize` as its
  quantizer, under bf16 autocast (the vqstack row's precision) and in float32. Against the vqstack row it
  isolates what the vqstack quantizer adds on its own.
- `--proposal`: the vqstack row again with a proposed change to the tokenizer applied on a local copy of the
  model (see `apply_zero_init_residuals`), to measure the change before it lands in `tokenizer/`.

The systems take their steps in turn (step 1 of every system, then step 2, ...), so that the load of other
processes on a shared machine falls on all of them alike. Train images/s comes from the median step time after
the warm-up steps (which hold the k-means initialization and the allocator's growth); the median resists bursts
of other processes. Everything is measured in float32 eval mode on held-out patches cut from photos that no
training patch comes from. PSNR and SSIM come from photos that the screening of vqstack's settings never saw
either (`UNSEEN_PHOTOS`); codebook usage (fraction of the codes used over the whole set) and perplexity come from
the dataset's held-out RGB photos, and PSNR there is reported too. Each seed sets initialization, batch order,
every row's random stream and vqstack's quantizer seed.

    python scripts/benchmarks/bench_tokenizer_training.py              # full run: 400 steps, batch 32
    python scripts/benchmarks/bench_tokenizer_training.py --seeds 10 11 12 --ablation none --tuned_peer bf16
                                                                       # the README's table
    python scripts/benchmarks/bench_tokenizer_training.py --quick      # smoke run: 4 steps of batch 8, a few minutes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from pipelines.data import collate_images, load_embedded_dataset, set_image_transforms  # noqa: E402
from pipelines.data.embedded import Photo, sample_patches  # noqa: E402
from pipelines.metrics import CodeHistogram, psnr, ssim  # noqa: E402
from tokenizer import VQTokenizer, VQTokenizerConfig  # noqa: E402
from tokenizer.blocks import AttentionBlock, ResnetBlock  # noqa: E402

PRESET = "small-f4"
RESOLUTION = 32
LEARNING_RATE = 2e-4  # the same for every system: the budget is steps, not tuning
# Targets of the vqstack row against the best peer row.
TARGET_PSNR_GAIN_DB = 1.5
TARGET_USAGE = 0.99
TARGET_SPEEDUP = 1.5
PARAMETER_TOLERANCE = 0.10  # peers must match vqstack's parameter count within this fraction
PEER_ROLES = ("peer", "tuned peer")


# ------------------------------------------------------------------------------------------ systems
class VQStackAutoencoder(nn.Module):
    """A `VQTokenizer` behind the benchmark's `forward(images) -> (reconstruction, indices, vq_loss)`."""

    def __init__(self, tokenizer: VQTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.tokenizer(images)
        return out.reconstruction, out.indices, out.quantizer_loss


def diffusers_vq_model(config: VQTokenizerConfig) -> nn.Module:
    """diffusers `VQModel` with the layout of the vqstack preset.

    Widths per level, ResNet blocks per level (the diffusers decoder also uses one more per level), mid-block
    attention, GroupNorm groups, latent channels and codebook size all come from the vqstack config.
    """
    from diffusers import VQModel

    levels = len(config.channel_multipliers)
    return VQModel(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.widths,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        vq_embed_dim=config.latent_channels,
        num_vq_embeddings=config.codebook_size,
        norm_num_groups=config.norm_groups,
        mid_block_add_attention=config.mid_attention,
        sample_size=RESOLUTION,
    )


# vector-quantize-pytorch options of the tuned peer rows: a 4-d lookup (the library's `codebook_dim`, the same
# dimension as vqstack's default) and a commitment weight of 0.25 (VQ-VAE's beta). In a screening run (seed 2,
# one thread, float32) these raised the peer from 19.72 to 21.04 dB held-out PSNR and from 91% to 97% usage.
TUNED_PEER_OPTIONS = {"codebook_dim": 4, "commitment_weight": 0.25}


def vqp_quantizer(config: VQTokenizerConfig, **options: float) -> nn.Module:
    """vector-quantize-pytorch's `VectorQuantize` as the issue names it: EMA (decay 0.99), k-means init, cosine lookup.

    Plus dead-code restarts at its recommended threshold of 2 uses per step (here the mean uses per code and step,
    so it restarts many codes every step), and its defaults otherwise: a 64-d lookup, `commitment_weight` 1.0 and
    the rotation-trick gradient. `options` override these (`TUNED_PEER_OPTIONS` for the tuned rows).
    """
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(
        dim=config.latent_channels, codebook_size=config.codebook_size, decay=0.99, kmeans_init=True,
        use_cosine_sim=True, threshold_ema_dead_code=2, **options,
    )


def vqp_quantize(quantizer: nn.Module, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, D, h, w) latents through a `VectorQuantize`: quantized (B, D, h, w), indices (B, h, w), loss."""
    batch, dim, height, width = latents.shape
    tokens = latents.permute(0, 2, 3, 1).reshape(batch, height * width, dim)  # (B, h*w, D)
    quantized, indices, vq_loss = quantizer(tokens)
    quantized = quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2)  # (B, D, h, w)
    return quantized, indices.reshape(batch, height, width), vq_loss.sum()


class DiffusersAutoencoder(nn.Module):
    """diffusers `VQModel` (encoder, quant_conv, vanilla VQ, post_quant_conv, decoder)."""

    def __init__(self, config: VQTokenizerConfig) -> None:
        super().__init__()
        self.model = diffusers_vq_model(config)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        latents = self.model.encode(images).latents  # (B, D, h, w)
        quantized, vq_loss, (_, _, indices) = self.model.quantize(latents)
        reconstruction = self.model.decoder(self.model.post_quant_conv(quantized))  # (B, C, H, W)
        batch, _, height, width = latents.shape
        return reconstruction, indices.reshape(batch, height, width), vq_loss


class DiffusersVQPAutoencoder(nn.Module):
    """The `VQModel` autoencoder (encoder, quant_conv, post_quant_conv, decoder) around vector-quantize-pytorch."""

    def __init__(self, config: VQTokenizerConfig, **quantizer_options: float) -> None:
        super().__init__()
        model = diffusers_vq_model(config)
        self.encoder, self.quant_conv = model.encoder, model.quant_conv
        self.post_quant_conv, self.decoder = model.post_quant_conv, model.decoder
        self.quantizer = vqp_quantizer(config, **quantizer_options)  # replaces the VQModel's own codebook

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, vq_loss = vqp_quantize(self.quantizer, self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(quantized)), indices, vq_loss


class VQPAutoencoder(nn.Module):
    """The vqstack encoder and decoder around vector-quantize-pytorch's `VectorQuantize` (the ablation row)."""

    def __init__(self, config: VQTokenizerConfig) -> None:
        super().__init__()
        tokenizer = VQTokenizer(config)
        self.encoder, self.decoder = tokenizer.encoder, tokenizer.decoder
        self.quantizer = vqp_quantizer(config)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, vq_loss = vqp_quantize(self.quantizer, self.encoder(images))
        return self.decoder(quantized), indices, vq_loss


def apply_zero_init_residuals(model: nn.Module) -> nn.Module:
    """Proposed vqstack change: every residual branch starts at zero, so each block starts as the identity.

    The last conv of each ResNet block and the output projection of each attention block are zero-initialized
    (the `zero_module` of Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", and of Goyal et al. 2017 for
    ResNets): at step 0 the network is a shallow conv stack whose gradients reach every layer unattenuated,
    which matters most in a short training budget.
    """
    for module in model.modules():
        if isinstance(module, ResnetBlock):
            nn.init.zeros_(module.conv2.weight)
            nn.init.zeros_(module.conv2.bias)
        elif isinstance(module, AttentionBlock):
            nn.init.zeros_(module.proj.weight)
            nn.init.zeros_(module.proj.bias)
    return model


@dataclass
class SystemSpec:
    """One row of the benchmark: how to build the model and how to run it."""

    name: str
    build: Callable[[int], nn.Module]  # seed -> model (vqstack seeds its quantizer's own generators with it)
    bf16: bool  # bf16 autocast (AMX matmuls and convs on this CPU)
    channels_last: bool
    role: str  # "vqstack", "peer" or "tuned peer" (what the targets compare against), "ablation" (not a peer)
    codebook_size: int


def system_specs(config: VQTokenizerConfig, *, proposal: bool, ablation: str = "all",
                 tuned_peer: str = "all") -> list[SystemSpec]:
    """The benchmark rows.

    The peers are the two systems the targets name: diffusers `VQModel` (vanilla VQ) and the same `VQModel`
    autoencoder with vector-quantize-pytorch as its quantizer, each in float32 and, as extra rows, under bf16
    autocast; plus the vector-quantize-pytorch peer with `TUNED_PEER_OPTIONS` (`tuned_peer`: both precisions,
    only bf16, or none). The ablation rows put vector-quantize-pytorch inside the vqstack autoencoder instead: it isolates
    what the vqstack quantizer adds on its own, and is reported next to the peers but is not one of them.
    """
    size = config.codebook_size

    def vqstack(seed: int) -> nn.Module:
        # The benchmark seed also seeds the quantizer's own generators (k-means seeding, restart samples).
        quantizer = dataclasses.replace(config.quantizer, seed=seed % 2**32)
        return VQStackAutoencoder(VQTokenizer(dataclasses.replace(config, quantizer=quantizer)))

    tuned = "VQModel AE + vector-quantize-pytorch, tuned (4-d lookup, commitment 0.25)"
    specs = [
        SystemSpec("vqstack (default)", vqstack, True, False, "vqstack", size),
        SystemSpec("diffusers VQModel", lambda seed: DiffusersAutoencoder(config), False, False, "peer", size),
        SystemSpec("diffusers VQModel", lambda seed: DiffusersAutoencoder(config), True, False, "peer", size),
        SystemSpec("VQModel AE + vector-quantize-pytorch", lambda seed: DiffusersVQPAutoencoder(config), False,
                   False, "peer", size),
        SystemSpec("VQModel AE + vector-quantize-pytorch", lambda seed: DiffusersVQPAutoencoder(config), True,
                   False, "peer", size),
        SystemSpec(tuned, lambda seed: DiffusersVQPAutoencoder(config, **TUNED_PEER_OPTIONS), False, False,
                   "tuned peer", size),
        SystemSpec(tuned, lambda seed: DiffusersVQPAutoencoder(config, **TUNED_PEER_OPTIONS), True, False,
                   "tuned peer", size),
        SystemSpec("vqstack AE + vector-quantize-pytorch (ablation)", lambda seed: VQPAutoencoder(config), True,
                   False, "ablation", size),
        SystemSpec("vqstack AE + vector-quantize-pytorch (ablation)", lambda seed: VQPAutoencoder(config), False,
                   False, "ablation", size),
    ]
    if ablation != "all":  # "bf16": only the ablation at the vqstack row's precision; "none": no ablation row
        specs = [s for s in specs if s.role != "ablation" or (ablation == "bf16" and s.bf16)]
    if tuned_peer != "all":  # the same choices for the tuned peer rows
        specs = [s for s in specs if s.role != "tuned peer" or (tuned_peer == "bf16" and s.bf16)]
    if proposal:
        specs.insert(1, SystemSpec("vqstack + zero-init residuals (proposal)",
                                   lambda seed: apply_zero_init_residuals(vqstack(seed)), True, False, "vqstack", size))
    return specs


# ------------------------------------------------------------------------------------------ training
@dataclass
class RunningSystem:
    """A system being trained: its model, optimizer and measured step times."""

    spec: SystemSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer
    rng_state: Tensor  # the system's own CPU random stream, carried from one of its steps to the next
    step_seconds: list[float] = field(default_factory=list)

    @property
    def precision(self) -> str:
        layout = ", channels_last" if self.spec.channels_last else ""
        return ("bf16 autocast" if self.spec.bf16 else "fp32") + layout


@contextlib.contextmanager
def own_random_stream(state: Tensor) -> Iterator[Callable[[], Tensor]]:
    """Run a block on the random stream `state` and restore the caller's stream afterwards.

    Yields a function that returns the stream's state at the end of the block, so that a system's next block
    continues its own stream. Every row draws its initialization and any other randomness from torch's global
    generator from its own stream (the peers' k-means samples and dead-code restarts too): a row's result does not
    depend on which other rows run in the same benchmark, or in which order. vqstack's quantizer draws its k-means
    seeding and restart samples from generators seeded by `QuantizerConfig.seed` instead, set to the benchmark
    seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(state)
        yield torch.get_rng_state


def start_system(spec: SystemSpec, seed: int) -> RunningSystem:
    """Build a system's model in train mode (in its memory layout) and its Adam optimizer, on its own stream."""
    with own_random_stream(torch.Generator().manual_seed(seed).get_state()) as final_state:
        model = spec.build(seed).train()
        if spec.channels_last:
            model = model.to(memory_format=torch.channels_last)
        state = final_state()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    return RunningSystem(spec, model, optimizer, state)


def precision_context(spec: SystemSpec) -> contextlib.AbstractContextManager:
    """bf16 autocast for the bf16 rows, a no-op for the float32 rows."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16)


def as_layout(images: Tensor, spec: SystemSpec) -> Tensor:
    """(B, C, H, W) images in the memory layout of the system (channels_last or contiguous)."""
    return images.contiguous(memory_format=torch.channels_last if spec.channels_last else torch.contiguous_format)


def train_step(system: RunningSystem, images: Tensor) -> float:
    """One Adam step on L1 + VQ loss; returns the loss."""
    images = as_layout(images, system.spec)
    with own_random_stream(system.rng_state) as final_state:
        start = time.perf_counter()
        with precision_context(system.spec):
            reconstruction, _, vq_loss = system.model(images)
            loss = F.l1_loss(reconstruction.float(), images) + vq_loss.float()
        system.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        system.optimizer.step()
        system.step_seconds.append(time.perf_counter() - start)
        system.rng_state = final_state()
    return loss.item()


def batches(train: Tensor, steps: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """The same `steps` random batches for every system: (batch_size, C, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield train[torch.randint(len(train), (batch_size,), generator=generator)]


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class Result:
    """What the table reports for one system."""

    name: str
    precision: str
    role: str
    parameters: int
    images_per_s: float
    psnr: float
    ssim: float
    usage: float
    perplexity: float
    final_loss: float
    psnr_screened: float  # PSNR on the held-out photos the screening runs were scored on


@torch.no_grad()
def evaluate(system: RunningSystem, validation: Tensor, batch_size: int = 250) -> tuple[float, float, float, float]:
    """PSNR, SSIM (means over images), codebook usage and perplexity over the held-out set, in float32."""
    system.model.eval()
    histogram = CodeHistogram(system.spec.codebook_size)
    psnrs, ssims = [], []
    with own_random_stream(system.rng_state):
        for images in validation.split(batch_size):
            reconstruction, indices, _ = system.model(images)
            psnrs.append(psnr(reconstruction, images))
            ssims.append(ssim(reconstruction, images))
            histogram.update(indices)
    return float(torch.cat(psnrs).mean()), float(torch.cat(ssims).mean()), histogram.usage(), histogram.perplexity()


def steady_images_per_s(system: RunningSystem, batch_size: int, warmup_steps: int) -> float:
    """Images/s of the median step after the warm-up steps."""
    steady = system.step_seconds[warmup_steps:] or system.step_seconds
    return batch_size / statistics.median(steady)


def run(specs: list[SystemSpec], train: Tensor, validation: Tensor, unseen: Tensor, *, steps: int,
        batch_size: int, warmup_steps: int, seed: int) -> list[Result]:
    """Train every system in turn, step by step, then evaluate each.

    PSNR and SSIM come from `unseen` (patches of photos that neither training nor the screening of vqstack's
    settings saw), codebook usage and perplexity from `validation` (RGB patches of the embedded dataset's
    held-out photos: the grayscale `unseen` patches cannot use the codes of colours). PSNR on `validation` is
    reported too.
    """
    systems = [start_system(spec, seed) for spec in specs]
    losses = [float("nan")] * len(systems)
    for step, images in enumerate(batches(train, steps, batch_size, seed), start=1):
        for index, system in enumerate(systems):
            losses[index] = train_step(system, images)
        if step == 1 or step % 25 == 0 or step == steps:
            summary = ", ".join(f"{loss:.3f}" for loss in losses)
            print(f"  step {step}/{steps}: losses {summary}", file=sys.stderr, flush=True)
    results = []
    for system, loss in zip(systems, losses):
        psnr_unseen, ssim_unseen, _, _ = evaluate(system, unseen)
        psnr_screened, _, usage, perplexity = evaluate(system, validation)
        results.append(Result(system.spec.name, system.precision, system.spec.role,
                              sum(p.numel() for p in system.model.parameters()),
                              steady_images_per_s(system, batch_size, warmup_steps), psnr_unseen, ssim_unseen,
                              usage, perplexity, loss, psnr_screened))
    return results


# ------------------------------------------------------------------------------------------ data
def load_patches(num_train: int, num_validation: int, seed: int) -> tuple[Tensor, Tensor]:
    """Train and held-out (N, 3, 32, 32) natural-image patches in [-1, 1], materialized once for all systems."""
    splits = set_image_transforms(
        load_embedded_dataset("natural-patches", resolution=RESOLUTION, seed=seed, num_train=num_train,
                              num_validation=num_validation),
        resolution=RESOLUTION, channels=3, seed=seed,
    )
    train = collate_images(list(splits["train"]))["pixel_values"]  # (N, 3, 32, 32)
    validation = collate_images(list(splits["validation"]))["pixel_values"]
    return train, validation


# Photos for the PSNR targets that no training patch comes from and that no screening run of vqstack's settings
# was scored on (those used the embedded dataset's held-out photos, coffee and flower). scikit-image ships no
# other natural colour photograph, so these are its grayscale photographs, read as RGB (three equal channels).
UNSEEN_PHOTOS = tuple(Photo("skimage", name) for name in
                      ("camera.png", "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png"))


def load_unseen_patches(count: int, seed: int) -> Tensor:
    """(count, 3, 32, 32) patches in [-1, 1] cut from `UNSEEN_PHOTOS` (at the dataset's pyramid scales)."""
    rng = np.random.default_rng([seed, 2])  # streams 0 and 1 are the embedded dataset's train and validation
    patches = sample_patches([photo.load() for photo in UNSEEN_PHOTOS], RESOLUTION, count, rng)  # (n, r, r, 3)
    return torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------ report
def _mean_spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """`mean ± standard deviation` over seeds (just the value for one seed)."""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def print_results(runs: list[list[Result]], *, seeds: list[int], steps: int, batch_size: int, warmup_steps: int,
                  num_train: int, num_validation: int) -> None:
    """The results table (mean ± spread over seeds, and PSNR of each seed), then the targets table.

    `runs[s][i]` is row i of the run with seed `seeds[s]`; every run has the same rows in the same order.
    """
    rows = list(zip(*runs))  # rows[i][s]: row i, seed s
    print(f"\n### Tokenizer training at a fixed budget: {steps} Adam steps (lr {LEARNING_RATE:g}), batch {batch_size}, "
          f"L1 + VQ loss, {RESOLUTION}x{RESOLUTION} patches\n")
    unseen = ", ".join(photo.file_name.removesuffix(".png") for photo in UNSEEN_PHOTOS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Data: {num_train} train patches "
          f"(natural-patches). PSNR and SSIM: {num_validation} patches of photos that neither training nor the "
          f"screening of vqstack's settings saw (scikit-image's grayscale {unseen}, read as RGB). Usage, perplexity "
          f"and 'PSNR, screened photos': the dataset's {num_validation} held-out RGB patches (coffee, flower; the "
          f"photos the screening was scored on). Float32 eval. Train images/s: median step after {warmup_steps} "
          f"warm-up steps. Seeds {seeds} (initialization, batch order, every row's own random stream and "
          f"vqstack's quantizer seed; the same patches for every seed): "
          f"{'mean ± standard deviation over seeds' if len(seeds) > 1 else 'one seed'}.\n")
    print("| system | role | precision | params | train img/s | PSNR (dB) | PSNR per seed | SSIM "
          "| PSNR, screened photos (dB) | usage (%) | perplexity | final loss |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        first = row[0]
        print(f"| {first.name} | {first.role} | {first.precision} | {first.parameters / 1e6:.2f}M "
              f"| {_mean_spread([r.images_per_s for r in row], digits=1)} | {_mean_spread([r.psnr for r in row])} "
              f"| {', '.join(f'{r.psnr:.2f}' for r in row)} | {_mean_spread([r.ssim for r in row], digits=3)} "
              f"| {_mean_spread([r.psnr_screened for r in row])} "
              f"| {_mean_spread([r.usage for r in row], scale=100, digits=1)} "
              f"| {_mean_spread([r.perplexity for r in row], digits=0)} | {_mean_spread([r.final_loss for r in row], digits=3)} |")
    print_targets(runs)


def _peer_margins(run: list[Result], row: Result) -> dict[str, float]:
    """One run's margins of a vqstack row over that run's peers (PSNR in dB, speed as a ratio)."""
    peers = [r for r in run if r.role in PEER_ROLES]
    fp32_peers = [r for r in peers if r.precision == "fp32"] or peers
    return {
        "psnr_fp32": row.psnr - max(p.psnr for p in fp32_peers),
        "psnr_all": row.psnr - max(p.psnr for p in peers),
        "usage": row.usage,
        "speed_fp32": row.images_per_s / max(p.images_per_s for p in fp32_peers),
        "speed_all": row.images_per_s / max(p.images_per_s for p in peers),
        "params": max(abs(p.parameters - row.parameters) / row.parameters for p in peers),
    }


TARGET_THRESHOLDS = {"psnr_fp32": TARGET_PSNR_GAIN_DB, "psnr_all": TARGET_PSNR_GAIN_DB, "usage": TARGET_USAGE,
                     "speed_fp32": TARGET_SPEEDUP, "speed_all": TARGET_SPEEDUP}


def _target_cell(margins: list[dict[str, float]], key: str) -> str:
    """Verdict of one target over the seeds' margins (met only if met in every seed), with mean and worst."""
    values = [m[key] for m in margins]
    worst, mean = min(values), statistics.fmean(values)
    if key.startswith("psnr"):
        text = f"{mean:+.2f} dB, worst {worst:+.2f} dB"
    elif key == "usage":
        text = f"{100 * mean:.1f}%, worst {100 * worst:.1f}%"
    else:
        text = f"{mean:.2f}x, worst {worst:.2f}x"
    return f"{_verdict(worst >= TARGET_THRESHOLDS[key])} ({text})"


def print_targets(runs: list[list[Result]]) -> None:
    """One line per vqstack row: each target, met only if it is met in every seed, with the mean and worst margin.

    Margins are paired: each seed's vqstack row against the peers of the same seed.
    """
    print("\n### Targets (met = met in every seed; mean and worst seed in brackets)\n")
    print("| vqstack row | PSNR >= best fp32 peer + 1.5 dB | PSNR >= best peer (any precision) + 1.5 dB "
          "| usage >= 99% | img/s >= 1.5x fastest fp32 peer | img/s >= 1.5x fastest peer (any precision) "
          "| params within 10% of every peer |")
    print("|---|---|---|---|---|---|---|")
    for index, row in enumerate(runs[0]):
        if row.role != "vqstack":
            continue
        margins = [_peer_margins(run, run[index]) for run in runs]
        worst_mismatch = max(m["params"] for m in margins)
        cells = " | ".join(_target_cell(margins, key) for key in TARGET_THRESHOLDS)
        print(f"| {row.name} | {cells} | {_verdict(worst_mismatch <= PARAMETER_TOLERANCE)} "
              f"(max {100 * worst_mismatch:.1f}%) |")
    ablations = [i for i, r in enumerate(runs[0]) if r.role == "ablation"]
    if ablations:
        print("\nAblation (not a target): the vqstack quantizer against vector-quantize-pytorch inside the same "
              "vqstack autoencoder, paired by seed.\n")
        for index, row in enumerate(runs[0]):
            if row.role != "vqstack":
                continue
            for a in ablations:
                ablation = runs[0][a]
                same = "same precision" if ablation.precision == row.precision else f"{row.precision} vs {ablation.precision}"
                gains = [run[index].psnr - run[a].psnr for run in runs]
                print(f"- {row.name} vs {ablation.name}, {same}: PSNR {_mean_spread(gains)} dB "
                      f"({', '.join(f'{g:+.2f}' for g in gains)}), usage "
                      f"{_mean_spread([run[index].usage for run in runs], scale=100, digits=1)}% vs "
                      f"{_mean_spread([run[a].usage for run in runs], scale=100, digits=1)}%")


def _verdict(passed: bool) -> str:
    return "met" if passed else "NOT met"


# ------------------------------------------------------------------------------------------ main
def positive_int(text: str) -> int:
    """argparse type: an int >= 1, refused with the offending text otherwise."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, small batch, few patches")
    parser.add_argument("--steps", type=positive_int, default=None, help="Adam steps per system (default 400)")
    parser.add_argument("--batch_size", "--batch-size", type=positive_int, default=None,
                        help="images per step (default 32)")
    parser.add_argument("--warmup_steps", "--warmup-steps", type=int, default=None,
                        help="first steps left out of images/s (default: 5%% of the steps, at least 1)")
    parser.add_argument("--num_train", "--num-train", type=positive_int, default=None)
    parser.add_argument("--num_validation", "--num-validation", type=positive_int, default=None)
    parser.add_argument("--proposal", action="store_true", help="add the row with the proposed vqstack change")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one full run per seed (initialization, batch order, every row's random stream); "
                             "the tables give mean ± spread, and a target is met only if met in every seed")
    parser.add_argument("--data_seed", "--data-seed", type=int, default=0,
                        help="seed of the train and held-out patches, the same for every run")
    parser.add_argument("--ablation", choices=("all", "bf16", "none"), default="all",
                        help="ablation rows: both precisions, only bf16 (the vqstack row's), or none")
    parser.add_argument("--tuned_peer", "--tuned-peer", choices=("all", "bf16", "none"), default="all",
                        help="rows of the vector-quantize-pytorch peer with TUNED_PEER_OPTIONS: both precisions, "
                             "only bf16, or none")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.quick else 400)
    args.batch_size = args.batch_size or (8 if args.quick else 32)
    args.num_train = args.num_train or (256 if args.quick else 20_000)
    args.num_validation = args.num_validation or (64 if args.quick else 1_000)
    if args.warmup_steps is None:
        args.warmup_steps = min(max(1, args.steps // 20), args.steps - 1)  # at least one timed step
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup_steps must lie in [0, steps={args.steps}), got {args.warmup_steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    train, validation = load_patches(args.num_train, args.num_validation, args.data_seed)
    unseen = load_unseen_patches(args.num_validation, args.data_seed)
    specs = system_specs(VQTokenizerConfig.from_preset(PRESET), proposal=args.proposal, ablation=args.ablation,
                         tuned_peer=args.tuned_peer)
    runs = []
    for seed in args.seeds:
        print(f"seed {seed}:", file=sys.stderr, flush=True)
        runs.append(run(specs, train, validation, unseen, steps=args.steps, batch_size=args.batch_size,
                        warmup_steps=args.warmup_steps, seed=seed))
        for r in runs[-1]:  # each seed's results as soon as they exist: a long run shows them before it ends
            print(f"  seed {seed}: {r.name}, {r.precision}: PSNR {r.psnr:.2f} dB (screened photos "
                  f"{r.psnr_screened:.2f} dB), usage {100 * r.usage:.1f}%, "
                  f"{r.images_per_s:.1f} img/s", file=sys.stderr, flush=True)
    print_results(runs, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
                  warmup_steps=args.warmup_steps, num_train=args.num_train, num_validation=args.num_validation)


if __name__ == "__main__":
    main()
