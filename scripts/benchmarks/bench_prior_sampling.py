"""Sampling speed of the vqstack priors, printed as markdown tables.

- TransformerPrior: the cached sampling loop (`prior.sample`) against `transformers`' `generate()` (KV cache,
  do_sample, top_k) on an identical `GPT2LMHeadModel`, and against the no-cache loop (`use_cache=False`).
  The GPT2LMHeadModel is built from `prior.gpt2_config()` and receives the prior's backbone weights; its
  lm_head covers all K + special ids, with the prior's (bias-free) head in the first K rows and zeros for the
  special rows, so both compute the same code logits (checked below) and differ only by the extra rows of the
  head matmul (11 of 1035 rows in the default setting).
- PixelCNNPrior: cached raster sampling against the naive loop (one full forward per position).

Each method draws the same batch of the same grid with the same filters. Fast methods are warmed up once, then
timed in `--repeats` round-robin rounds and reported by their best round (the CPU may be shared; the best
round is the least disturbed one). The slow reference loops are timed once. Thread count is torch's default
unless `--threads` is given.

    python scripts/benchmarks/bench_prior_sampling.py           # 16x16 grid, K=1024, batch 16 (minutes)
    python scripts/benchmarks/bench_prior_sampling.py --quick   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from prior import (  # noqa: E402
    PixelCNNConfig,
    PixelCNNPrior,
    TransformerPrior,
    TransformerPriorConfig,
    filter_logits,
    sample_from_logits,
)
from prior.transformer import ATTENTION_NAME  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny grid and batch: a smoke run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grid", type=int, default=16, help="grid side h = w")
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--num-classes", type=int, default=9, help="9 classes -> 1035 input ids with K=1024")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true", help="skip the slow no-cache loops")
    parser.add_argument("--naive-positions", type=int, default=16, help="positions timed in the naive PixelCNN")
    parser.add_argument("--bf16", action="store_true", help="also time the transformer prior cast to bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.grid, args.codebook_size, args.repeats = 4, 6, 256, 1
    for name in ("batch_size", "grid", "codebook_size", "num_classes", "top_k", "repeats", "naive_positions"):
        if getattr(args, name) < 1:  # the class-conditional priors and guidance it times need num_classes >= 1
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def measure(methods: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each method: one warm-up each, then `repeats` round-robin rounds, best kept.

    Round-robin rather than one method after the other, so that a change in the load of a shared CPU
    affects every method alike.
    """
    for run in methods.values():
        run()
    best = dict.fromkeys(methods, float("inf"))
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def seconds_once(run: Callable[[], object]) -> float:
    """One timed call without warm-up, for the slow reference loops."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def identical_gpt2(prior: TransformerPrior, attn_implementation: str) -> GPT2LMHeadModel:
    """A GPT2LMHeadModel with the prior's architecture and weights (special rows of the head are zero)."""
    config = prior.gpt2_config()
    config._attn_implementation = attn_implementation
    model = GPT2LMHeadModel(config).eval()
    model.transformer.load_state_dict(prior.backbone.state_dict(), strict=True)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[: prior.config.codebook_size] = prior.head.weight
    return model


def check_parity(prior: TransformerPrior, model: GPT2LMHeadModel, labels: torch.Tensor) -> None:
    """Both models must give the same code logits on the same sequences."""
    codes = torch.randint(0, prior.config.codebook_size, (labels.shape[0], *prior.config.grid_shape))
    with torch.no_grad():
        ours = prior(codes, labels).logits.flatten(1, 2)  # (B, h*w, K)
        input_ids = torch.cat([labels[:, None] + prior.config.codebook_size, codes.flatten(1)[:, :-1]], dim=1)
        theirs = model(input_ids=input_ids).logits[..., : prior.config.codebook_size]
    max_difference = (ours - theirs).abs().max().item()
    if max_difference > 1e-4:
        raise RuntimeError(f"GPT2LMHeadModel does not reproduce the prior's logits (max |diff| {max_difference})")


def transformer_rows(args: argparse.Namespace) -> list[tuple[str, float]]:
    config = TransformerPriorConfig(
        grid_shape=(args.grid, args.grid), codebook_size=args.codebook_size, num_classes=args.num_classes,
        **({"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128} if args.quick else {}),
    )
    prior = TransformerPrior(config).eval()
    labels = torch.arange(args.batch_size) % args.num_classes
    num_new = config.num_tokens
    print(
        f"TransformerPrior: {prior.num_parameters() / 1e6:.2f}M parameters, vocab {config.vocab_size}, "
        f"{args.batch_size} x {num_new} new tokens, top_k={args.top_k}, {torch.get_num_threads()} threads",
        file=sys.stderr,
    )

    def generate(model: GPT2LMHeadModel) -> Callable[[], None]:
        def run() -> None:
            first = (labels + config.codebook_size)[:, None]  # (B, 1)
            with torch.no_grad():
                output = model.generate(
                    input_ids=first, attention_mask=torch.ones_like(first), do_sample=True, top_k=args.top_k,
                    max_new_tokens=num_new, use_cache=True, pad_token_id=config.start_token_id,
                )
            assert output.shape == (args.batch_size, num_new + 1), output.shape

        return run

    methods = {}
    # generate() with transformers' default attention (sdpa), eager, and the prior's own attention function.
    for attn_implementation in ("sdpa", "eager", ATTENTION_NAME):
        model = identical_gpt2(prior, attn_implementation)
        check_parity(prior, model, labels)
        methods[f"transformers generate() (KV cache, attn={attn_implementation})"] = generate(model)
    methods["TransformerPrior.sample (KV cache, fp32)"] = lambda: prior.sample(
        args.batch_size, labels=labels, top_k=args.top_k
    )
    if args.bf16:  # a different precision: both sides cast to bf16, reported in their own rows
        prior_bf16 = copy.deepcopy(prior).to(torch.bfloat16)
        model_bf16 = identical_gpt2(prior, "sdpa").to(torch.bfloat16)
        methods["transformers generate() (KV cache, attn=sdpa), model cast to bf16"] = generate(model_bf16)
        methods["TransformerPrior.sample, prior cast to bf16"] = lambda: prior_bf16.sample(
            args.batch_size, labels=labels, top_k=args.top_k
        )
    timings = measure(methods, args.repeats)
    if not args.skip_naive:
        timings["TransformerPrior.sample(use_cache=False)"] = seconds_once(
            lambda: prior.sample(args.batch_size, labels=labels, top_k=args.top_k, use_cache=False)
        )
    return [(name, args.batch_size * num_new / seconds) for name, seconds in timings.items()]


def pixelcnn_rows(args: argparse.Namespace) -> list[tuple[str, float]]:
    config = PixelCNNConfig(
        grid_shape=(args.grid, args.grid), codebook_size=args.codebook_size, num_classes=args.num_classes,
        **({"hidden_channels": 32, "num_layers": 3, "output_channels": 64} if args.quick else {}),
    )
    prior = PixelCNNPrior(config).eval()
    labels = torch.arange(args.batch_size) % args.num_classes
    print(
        f"PixelCNNPrior: {prior.num_parameters() / 1e6:.2f}M parameters, {config.num_layers} layers, "
        f"{config.hidden_channels} channels, {args.batch_size} x {config.num_tokens} tokens",
        file=sys.stderr,
    )
    cached = measure({"cached": lambda: prior.sample(args.batch_size, labels=labels, top_k=args.top_k)}, args.repeats)
    rows = [("PixelCNNPrior.sample (cached)", args.batch_size * config.num_tokens / cached["cached"])]
    if not args.skip_naive:
        # The naive loop runs one full forward over the whole grid per position, a cost that does not depend
        # on the position; timing its first `--naive-positions` steps gives its tokens/s without waiting for
        # the whole grid (minutes at 16x16).
        positions = min(args.naive_positions, config.num_tokens)
        seconds = seconds_once(lambda: naive_pixelcnn_prefix(prior, labels, positions, args.top_k))
        rows.append((f"PixelCNNPrior.sample(use_cache=False), first {positions} positions",
                     args.batch_size * positions / seconds))
    return rows


@torch.no_grad()
def naive_pixelcnn_prefix(prior: PixelCNNPrior, labels: torch.Tensor, positions: int, top_k: int) -> None:
    """The first `positions` steps of `prior.sample(..., use_cache=False)`, the same loop as `Prior.sample`."""
    stream = prior._logit_stream(labels, labels.shape[0], use_cache=False)
    logits = next(stream)
    for _ in range(positions - 1):
        logits = stream.send(sample_from_logits(filter_logits(logits, top_k=top_k)))
    stream.close()


def print_table(title: str, rows: list[tuple[str, float]], reference: str) -> None:
    """Markdown table of tokens/s with ratios to the fastest row whose name contains `reference`."""
    reference_rate = max((rate for name, rate in rows if reference in name), default=None)
    print(f"\n### {title}\n")
    print(f"| method | tokens/s | vs fastest {reference} |")
    print("|---|---:|---:|")
    for name, tokens_per_second in rows:
        ratio = f"{tokens_per_second / reference_rate:.2f}x" if reference_rate else "-"
        print(f"| {name} | {tokens_per_second:,.0f} | {ratio} |")


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"grid {args.grid}x{args.grid}, K={args.codebook_size}, batch {args.batch_size}, top_k={args.top_k}, "
        f"best of {args.repeats}, {torch.get_num_threads()} threads"
    )
    print_table("TransformerPrior sampling", transformer_rows(args), reference="generate()")
    print_table("PixelCNNPrior sampling", pixelcnn_rows(args), reference="use_cache=False")


if __name__ == "__main__":
    main()
