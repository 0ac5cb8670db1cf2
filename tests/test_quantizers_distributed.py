"""Two CPU processes (gloo) training one VectorQuantizer on different data keep bit-identical codebooks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenizer.quantizers import QuantizerConfig, build_quantizer

WORLD_SIZE = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_steps(batches: list[torch.Tensor]) -> tuple[dict, int]:
    # EMA + k-means + restarts after one unused step: every synchronized path runs within a few steps.
    config = QuantizerConfig(codebook_size=64, codebook_dim=4, dead_code_steps=1, kmeans_iters=3)
    torch.manual_seed(0)  # same initial weights on both ranks, as DDP would broadcast them
    quantizer = build_quantizer(config, embed_dim=8)
    restarted = sum(int(quantizer(z).stats.dead_codes) for z in batches)
    return quantizer.state_dict(), restarted


def _train(rank: int, port: int, results: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different data per rank; 32 tokens per step, fewer than the codes
    batches = [torch.randn(2, 8, 4, 4) + rank for _ in range(STEPS)]
    alone, _ = _run_steps(batches)  # control: the same steps before the process group exists
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        synced, restarted = _run_steps(batches)
    finally:
        dist.destroy_process_group()
    torch.save({"alone": alone, "synced": synced, "restarted": restarted}, f"{results}/rank{rank}.pt")


@pytest.mark.slow
def test_codebooks_stay_identical_across_processes(tmp_path):
    mp.spawn(_train, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE))
    # Without synchronization the ranks' codebooks drift apart: the check below is not vacuous.
    assert not torch.equal(rank0["alone"]["codebook"], rank1["alone"]["codebook"])
    assert rank0["restarted"] > 0 and rank0["restarted"] == rank1["restarted"]
    assert bool(rank0["synced"]["initialized"])
    for name, tensor in rank0["synced"].items():
        if name.startswith("project_"):
            continue  # projections learn by gradient; DDP (not the quantizer) all-reduces those
        assert torch.equal(tensor, rank1["synced"][name]), name


def _lecam(rank: int, port: int, results: str) -> None:
    from tokenizer.losses import LeCamRegularizer

    torch.set_num_threads(1)
    logits = [(torch.full((2, 1, 3, 3), float(rank + step)), torch.full((2, 1, 3, 3), -float(rank))) for step in range(3)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        lecam = LeCamRegularizer(decay=0.5)
        for real, fake in logits:
            lecam.update(real, fake)
    finally:
        dist.destroy_process_group()
    torch.save(lecam.state_dict(), f"{results}/lecam{rank}.pt")


@pytest.mark.slow
def test_lecam_emas_follow_the_mean_over_processes(tmp_path):
    mp.spawn(_lecam, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"lecam{rank}.pt") for rank in range(WORLD_SIZE))
    # real means over both ranks: 0.5, 1.5, 2.5 -> EMA 0.5 -> 1.0 -> 1.75; fake means: -0.5 every step
    for state in (rank0, rank1):
        assert state["ema_real"].item() == pytest.approx(1.75) and state["ema_fake"].item() == pytest.approx(-0.5)
