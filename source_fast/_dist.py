"""torch.distributed helpers: a no-op in a single process, sums and barriers across ranks (data
sharding is _passes.rank_share)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._io import NO_FLOCK
from ._warn import warn


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


def _reduced(values: list[int], op: dist.ReduceOp, device: torch.device) -> list[int]:
    """`values` reduced over the ranks by `op`, in float64 (exact below 2**52)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


def all_reduce_int(value: int, device: torch.device) -> int:
    if rank_and_world()[1] == 1:
        return value
    return _reduced([value], dist.ReduceOp.SUM, device)[0]


def gather_shares(t: torch.Tensor, dim: int, strided: bool) -> torch.Tensor:
    """Every rank's `t` (its share of the examples along `dim`) put together in the examples' order:
    contiguous shares one after another in rank order, or `strided` shares (every world-th example,
    a stream's) interleaved. Other dimensions are zero-padded to the largest, as a rank whose
    sequences were shorter has fewer per-token columns (padded tokens score 0). Every rank gets all."""
    world = rank_and_world()[1]
    if world == 1:
        return t
    shape = torch.tensor(t.shape, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    largest = torch.stack(shapes).amax(0).tolist()
    padded = t.new_zeros(largest)
    padded[tuple(slice(0, n) for n in t.shape)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    parts = [part.narrow(dim, 0, int(n[dim])) for part, n in zip(parts, shapes)]
    if not strided:
        return torch.cat(parts, dim)
    out = padded.new_zeros(largest[:dim] + [sum(p.shape[dim] for p in parts)] + largest[dim + 1:])
    for rank, part in enumerate(parts):  # rank r holds examples r, r + world, r + 2·world, ...
        out.index_copy_(dim, torch.arange(rank, out.shape[dim], world, device=t.device), part)
    return out


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def same_on_all_ranks(value: int, device: torch.device) -> bool:
    """Whether every rank holds the same `value` (below 2**52, exact in float64)."""
    if rank_and_world()[1] == 1:
        return True
    largest, minus_smallest = _reduced([value, -value], dist.ReduceOp.MAX, device)
    return largest == -minus_smallest


def min_on_ranks(value: int, device: torch.device) -> int:
    """The smallest of the ranks' `value`s (below 2**52, exact in float64), on every rank."""
    if rank_and_world()[1] == 1:
        return value
    return _reduced([value], dist.ReduceOp.MIN, device)[0]


def differing_on_ranks(inputs: dict[str, Any], device: torch.device) -> list[str]:
    """The names in `inputs` whose values (JSON, keys sorted: a dict's order is not its value; numpy
    and torch numbers as numbers) differ between ranks; every rank compares every one, so all get the
    same answer and none waits."""
    def plain(value: Any) -> Any:
        return value.tolist() if isinstance(value, (np.generic, np.ndarray, torch.Tensor)) else repr(value)

    def same(value: Any) -> bool:
        text = json.dumps(value, sort_keys=True, default=plain)
        return same_on_all_ranks(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16), device)

    return [name for name, value in inputs.items() if not same(value)]


@contextlib.contextmanager
def fail_together(device: torch.device) -> Iterator[None]:
    """Under torch.distributed, checks that may fail on some ranks only (ranks given other inputs, a
    checkpoint one node cannot read): the error is raised on its rank and every other rank raises
    too, saying which rank failed, instead of waiting in the next collective for a rank that is gone.
    For short work before the passes: every rank waits at the end of the block for all the others.
    (A pass that fails on one rank ends it at once; torchrun then stops the others.) The block itself
    must hold no collective."""
    rank, world = rank_and_world()
    if world == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 (raised below, after the ranks have compared)
        error = exc
    failed = _reduced([rank + 1 if error is not None else 0], dist.ReduceOp.MAX, device)[0]  # the highest failed rank + 1
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"rank {rank}: rank {failed - 1} failed (its error says why), so this rank stops too")


_held: set[tuple[str, str, int]] = set()  # (folder, what, thread) this process holds: nested holds are one run
_lock_files: set = set()  # the open lock files: a forked child (a fork pool's worker) must not hold them


def _close_inherited_locks() -> None:
    # A forked child shares the parent's open file description, and flock is released only when every
    # descriptor of it is closed: a worker forked during the run would hold the lock after the run ends.
    for f in _lock_files:
        f.close()
    _lock_files.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


@contextlib.contextmanager
def sole_writer(folder: Path, what: str, device: torch.device | None) -> Iterator[None]:
    """One live `what` run per folder: rank 0 holds folder/.{what}.lock (POSIX flock) while the run
    lasts. A second run into the folder (a rerun started while a killed torchrun's workers, which run
    in sessions of their own, still write) would delete the first's temp files and race it for the
    same files: refused, on every rank together (their collectives on `device`). With device None the
    run is this process's alone, not the ranks' together: it locks and raises by itself. Where the
    file system has no flock (a Lustre mount without it), the run goes unlocked with a warning. Within
    one thread, holding it again (a caller that also cleans the folder up afterwards, around the run
    itself) is the same run."""
    key = (os.path.abspath(folder), what, threading.get_ident())
    if key in _held:
        yield
        return
    _held.add(key)
    try:
        with _locked(folder, what, device):
            yield
    finally:
        _held.discard(key)


@contextlib.contextmanager
def _locked(folder: Path, what: str, device: torch.device | None) -> Iterator[None]:
    rank = rank_and_world()[0] if device is not None else 0
    lock, busy, problem = None, 0, None
    if rank == 0:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock = open(folder / f".{what}.lock", "a")  # noqa: SIM115 (held across the run, closed below)
                _lock_files.add(lock)
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = 1
            except OSError as exc:
                if exc.errno in NO_FLOCK:
                    warn(f"{folder}: the file system does not lock files ({exc.strerror}): a second {what} run into "
                         "this folder at the same time would not be refused")
                else:  # every rank raises below, none waits for rank 0
                    problem = f"{folder}: cannot create its lock file ({exc})"
    try:
        state = busy + 2 * (problem is not None)
        if device is not None:
            state = all_reduce_int(state, device)  # rank 0's, seen by every rank
        if state == 2:
            raise ValueError(problem if rank == 0 else f"rank {rank}: rank 0 could not lock {folder} (its error says why)")
        if state:
            if device is not None:
                who = "one still going, or the workers of a killed torchrun, which run in sessions of their own"
            elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                who = (f"one still going, or another rank of this torch.distributed job: {what} is not split "
                       "across ranks, run it on one rank")
            else:
                who = "one still going"
            raise ValueError(f"{folder} is being written by another {what} run ({who}): stop it or let it finish, "
                             "then run again")
        yield
    finally:
        if lock is not None:
            _lock_files.discard(lock)
            lock.close()  # releases the flock
