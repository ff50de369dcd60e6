"""torch.distributed helpers: a no-op in a single process, sums and barriers across ranks (data
sharding is _passes.rank_share)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:  # launched by torchrun, yet each process would do the whole job
        raise RuntimeError(f"WORLD_SIZE={world} (torchrun) but no torch.distributed process group: call "
                           "torch.distributed.init_process_group() before source_fast (the source-fast CLI does), or "
                           "every process does all the work into the same files")
    return 0, 1


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    if rank_and_world()[1] == 1:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_int(value: int, device: torch.device) -> int:
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether every rank holds the same `value` (below 2**52, exact in float64)."""
    if rank_and_world()[1] == 1:
        return True
    t = torch.tensor([value, -value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()) == -int(t[1].item())
