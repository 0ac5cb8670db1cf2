"""torch.distributed helpers that are no-ops in a single process.

They keep codebooks bit-identical across data-parallel processes: EMA statistics are summed before the
update, while k-means seeds and restart samples are drawn once (rank 0) and broadcast.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum `tensor` over processes, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_finite(tensor: Tensor) -> bool:
    """True when `tensor` holds no NaN/Inf on any process (every process gets the same answer)."""
    flag = (~torch.isfinite(tensor)).any().to(torch.float32).reshape(1)
    return float(all_reduce_sum_(flag).item()) == 0.0


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """Overwrite `tensor` with rank `src`'s copy, in place."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def gather_rows(rows: Tensor) -> Tensor:
    """Concatenate the (N, d) rows of every process; each contributes min(N over processes) rows."""
    if not is_distributed():
        return rows
    count = torch.tensor(rows.shape[0], device=rows.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    local = rows[: int(count)].contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.cat(gathered)  # (world * min N, d)
