"""Passes over the data kept on disk, so that scoring layer group by layer group runs each forward and
backward pass once.

Every method score() runs on per-example gradients is block-diagonal over layers: the scores are a sum
of each layer's. When the prepared queries of every layer do not fit in memory at once, score() takes
the layers a group at a time instead of the queries a block at a time. A pass over the training data
then reads each layer's inputs and output gradients once for all the queries (each training example's
gradient tile is formed once, and the queries' basis is chosen for all of them), where blocks of queries
re-run the model over the training data once per block. What makes that possible is this cache: the
first group's passes record every tracked layer's tokens to files, and the later groups read only their
own layers' back (a pass of GPT-2 small on the CPU takes ~7 s per 1,000 tokens; reading its 48 layers'
tokens back, 0.6 MB per token, takes a fraction of that).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ._io import TEMP_MARK
from ._passes import model_device, run_pass
from .capture import Captured, LayerSpec
from .task import Task

# Disk left free for everything else: the cache gives up (NoRoom) rather than fill the disk.
DISK_MARGIN = 1 << 30


class NoRoom(Exception):
    """The cache would leave less than DISK_MARGIN free: score() goes back to blocks of queries."""


@dataclass(frozen=True)
class _Stored:
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Layer:
    a: _Stored
    g: _Stored
    mask: Tensor | None  # (n, t): small, kept in memory
    half: bool
    calls: int
    call: int
    regrouped: bool
    selected: bool


class PassCache:
    """Records each pass over data once, every layer of `specs`, and replays it for any subset of them.

    Passes are told apart by their order within a round (round(): one layer group's turn) and, for the
    queries' passes ("measurement"), by the round's queries: a round asks for the same passes in the same
    order as every other round, the training passes whatever its queries are. Files go to a fresh folder
    in tempfile's directory (TMPDIR), removed by close()."""

    def __init__(self, specs: list[LayerSpec], directory: str | None = None):
        self.specs = specs
        self.folder = Path(tempfile.mkdtemp(prefix=f"source_fast_passes{TEMP_MARK}", dir=directory))
        self._files: dict[str, Any] = {}  # a file per layer, written in batch order
        self._done: dict[tuple, list[tuple[int, int, dict[str, _Layer]]]] = {}
        self._queries: tuple = ()
        self._count: dict[str, int] = {}
        self.bytes_written = 0
        # Per pass of the queries (its `what`), by query number: whose measurement had no gradient at any
        # layer of the groups so far; score() warns after the last group (one group's layers are not all).
        self.zero_rows: dict[str, Tensor] = {}

    def round(self, queries: range) -> None:
        """A new layer group's turn, over the queries `queries`."""
        self._queries = (queries.start, queries.stop)
        self._count = {}

    def run(self, model: nn.Module, task: Task, specs: list[LayerSpec], loader: DataLoader, objective: str,
            what: str, progress: Any | None = None, first: int | None = 0
            ) -> Iterator[tuple[int, int, dict[str, Captured]]]:
        """run_pass's batches for `specs`: the pass itself the first time (recording every layer), the
        recording after that."""
        k = self._count.get(objective, 0)
        self._count[objective] = k + 1
        key = (objective, k) + (self._queries if objective == "measurement" else ())
        if key in self._done:
            return self._replay(self._done[key], specs, model_device(model), progress)
        return self._record(key, model, task, specs, loader, objective, what, progress, first)

    def _record(self, key, model, task, specs, loader, objective, what, progress, first):
        total = None if isinstance(loader.dataset, IterableDataset) else len(loader.dataset)
        batches = []
        for start, n, records in run_pass(model, task, self.specs, loader, objective, what, progress, first):
            size = sum(r.a.nbytes + r.g.nbytes for r in records.values())
            later = 0 if total is None else size * max(0, total - start - n) // max(n, 1)
            free = shutil.disk_usage(self.folder).free
            if free - size - later < DISK_MARGIN:
                raise NoRoom(f"{self.folder} has {free} bytes free; this pass needs about {size + later} more")
            layers = {}
            for s in self.specs:
                r = records[s.name]
                layers[s.name] = _Layer(self._write(s.name, r.a), self._write(s.name, r.g),
                                        None if r.mask is None else r.mask.cpu(), r.half, r.calls, r.call,
                                        r.regrouped, r.selected)
            batches.append((start, n, layers))
            yield start, n, {s.name: records[s.name] for s in specs}
        for f in self._files.values():
            f.flush()
        self._done[key] = batches

    def _write(self, name: str, t: Tensor) -> _Stored:
        if name not in self._files:
            self._files[name] = open(self.folder / f"{len(self._files)}.bin", "wb")
        f = self._files[name]
        t = t.detach().contiguous().cpu()
        stored = _Stored(f.tell(), tuple(t.shape), t.dtype)
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self.bytes_written += t.nbytes
        return stored

    def _replay(self, batches, specs, device, progress):
        readers = {s.name: open(self._files[s.name].name, "rb") for s in specs}
        try:
            for start, n, layers in batches:
                records = {}
                for s in specs:
                    m = layers[s.name]
                    records[s.name] = Captured(
                        a=_read(readers[s.name], m.a).to(device), g=_read(readers[s.name], m.g).to(device),
                        mask=None if m.mask is None else m.mask.to(device), half=m.half, calls=m.calls,
                        call=m.call, regrouped=m.regrouped, selected=m.selected)
                yield start, n, records
                if progress is not None:
                    progress.update(n)
        finally:
            for f in readers.values():
                f.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PassCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(f, stored: _Stored) -> Tensor:
    out = torch.empty(stored.shape, dtype=stored.dtype)
    if out.numel():
        f.seek(stored.offset)
        view = out.reshape(-1).view(torch.uint8).numpy()
        if f.readinto(view.data) != out.nbytes:
            raise OSError(f"{f.name}: the pass cache was cut short (another process removed or truncated it?)")
    return out


def pass_of(passes: PassCache | None):
    """run_pass, or the cache's stand-in for it."""
    return run_pass if passes is None else passes.run

