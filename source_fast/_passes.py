"""One forward/backward pass over a dataset, yielding captured layer inputs and output gradients."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import enum
import functools
import hashlib
import itertools
import json
import math
import numbers
import os
import random
import re
import weakref
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, SequentialSampler, Subset, TensorDataset,
    default_collate,
)

from ._dist import rank_and_world
from ._io import note
from ._warn import warn
from .capture import CONVOLUTIONS, Captured, Capturer, LayerSpec, all_finite
from .task import Task
from .trajectory import Trajectory


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """The batch with fn applied to every tensor in it, in its own structure."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuilt(batch, {k: _map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        moved = [_map_tensors(v, fn) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device))


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors: a CUDA device's free memory; on CPU, MemAvailable (free plus
    reclaimable cache) where Linux reports it, else free pages, else 0 (unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


@contextlib.contextmanager
def reuse_large_blocks(device: torch.device) -> Iterator[None]:
    """On CPU under glibc, freed blocks of any size stay in the heap for the next allocation while
    the block runs, then go back to the system. glibc hands every block over 32 MB back at once, so
    each batch's per-layer tiles and rotated tokens fault their pages in anew: 16 s of system time in
    a 60 s CPU scoring run (45 s with this). Process-wide while it runs; a no-op on GPUs and elsewhere."""
    libc = _glibc()
    if device.type != "cpu" or libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:  # glibc's own ceilings for its dynamic thresholds, and the memory back to the system
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def _glibc() -> Any:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt differ or are missing
        return libc
    except (OSError, AttributeError):
        return None


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def check_model_and_task(model: Any, task: Any, trajectory: Any) -> None:
    """The first three arguments of fit_factors, score and self_score, each the kind of thing it must be,
    before anything reads them."""
    if not isinstance(model, nn.Module):
        hint = " (a state_dict? give the model, and its weights as the trajectory's checkpoints)" if isinstance(
            model, Mapping) else ""
        raise TypeError(f"model must be an nn.Module, got a {type(model).__name__}{hint}")
    if isinstance(task, type):
        raise TypeError(f"task is the class {task.__name__}: give an instance of it, {task.__name__}()")
    if not callable(getattr(task, "compute_train_loss", None)):
        raise TypeError(f"task must be a source_fast.Task (or kronfluence Task), got a {type(task).__name__}")
    if not isinstance(trajectory, Trajectory):
        raise TypeError(f"trajectory must be a source_fast.Trajectory, got a {type(trajectory).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's parameters are on the meta device (built under torch.device('meta') or "
                         "init_empty_weights): make them real first, model.to_empty(device=...) or load the model "
                         "whole; the checkpoints then give the weights")


def check_count(option: str, value: Any, none_ok: bool = False, unit: str = "integer") -> None:
    """A positive integer option (not a bool, which is an int to Python), or None where none_ok."""
    if (value is not None or not none_ok) and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                               or value < 1):
        raise ValueError(f"{option} must be a positive {unit}{' or None' if none_ok else ''}, got {value!r}")


# ---- the three forms of data: map-style datasets, re-iterable streams of examples, DataLoaders ----
#
# Map-style (len() and indexing) is addressed by position: shards, ranks and resumes pick index ranges.
# A stream (an IterableDataset, or any object whose iter() starts over) is read from the start on every
# pass; anything that needs positions (shards, chunks) buffers a bounded number of its examples. A
# DataLoader brings its own batch size, collate_fn and workers; it must read its dataset in order,
# since scores are indexed by position.


def _check_loader(loader: DataLoader) -> None:
    """A DataLoader must yield its dataset's examples once each, in the dataset's order."""
    if loader.batch_size is None:
        drawn = getattr(loader.batch_sampler, "sampler", None)  # a Trainer's get_train_dataloader() draws at random
        if drawn is not None and not isinstance(drawn, SequentialSampler):
            raise ValueError(f"the DataLoader's batch_sampler draws from a {type(drawn).__name__}, which shuffles or "
                             "samples; scores are indexed by position: give the dataset itself (with "
                             "collate_fn=trainer.data_collator for a Trainer's), or a DataLoader with shuffle=False")
        raise ValueError("the DataLoader has batch_size=None or a batch_sampler: give it batch_size= and no sampler")
    if loader.drop_last:
        raise ValueError("the DataLoader has drop_last=True, which would leave out the examples of a short last batch")
    if isinstance(loader.sampler, DistributedSampler):  # DDP's habit: the library splits the data itself
        raise ValueError("the DataLoader has a DistributedSampler: give every rank a DataLoader over the whole dataset "
                         "(shuffle=False, no sampler); under torch.distributed source_fast gives each rank its share")
    if not isinstance(loader.dataset, IterableDataset) and not isinstance(loader.sampler, SequentialSampler):
        raise ValueError(  # noqa: TRY004 (the loader's setting is wrong, not the argument's type)
            "the DataLoader shuffles or samples its dataset; scores are indexed by position, so use shuffle=False and no sampler"
        )
    if getattr(loader, "in_order", True) is False:
        raise ValueError("the DataLoader has in_order=False: batches from its workers would land on the wrong rows")
    if isinstance(loader.dataset, IterableDataset) and type(loader) is not DataLoader:
        raise ValueError(f"the data is a {type(loader).__name__} (a DataLoader subclass) over a stream, whose own way "
                         "of iterating would be lost where source_fast reads the stream again in pieces: give the "
                         "IterableDataset with collate_fn=, or a plain DataLoader over it")
    if isinstance(loader.dataset, IterableDataset) and loader.num_workers > 0:
        raise ValueError(
            "the DataLoader reads an IterableDataset with num_workers > 0: each worker yields its own copy or share of "
            "the stream, in an order source_fast cannot index; use num_workers=0, or a map-style dataset with workers"
        )


def _rebuild(loader: DataLoader, dataset: Any) -> DataLoader:
    """A DataLoader with `loader`'s settings over another dataset (a slice, or buffered examples)."""
    workers = loader.num_workers if not isinstance(dataset, list) else 0  # buffered: already in memory
    extra = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers} if workers else {}
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
                      num_workers=workers, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context if workers else None,
                      timeout=loader.timeout if workers else 0, **extra)


def is_stream(data: Any) -> bool:
    """True for data read front to back (no len() and indexing); raises for what cannot be read twice
    or in order. Every function here asks this first, so every DataLoader is checked."""
    if isinstance(data, DataLoader):
        _check_loader(data)
        return is_stream(data.dataset)
    if isinstance(data, IterableDataset):
        return True
    if isinstance(data, Mapping) and set(data) != set(range(len(data))):  # keyed by names, not example indices
        raise TypeError(f"data is a {type(data).__name__} with keys {list(data)[:5]}, which looks like one batch: "
                        "pass the examples, a dataset or a list of them (a DataLoader or collate_fn batches them)")
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return False
    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-shot iterator ({type(data).__name__}); source_fast reads the data several times (once "
            "per checkpoint): pass a dataset, an IterableDataset or any object whose iter() starts over"
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a dataset (len() and indexing), an iterable of examples or a DataLoader; got {type(data).__name__}"
        )
    return True


def length(data: Any) -> int | None:
    """The number of examples, or None for a stream (a DataLoader's len() counts batches, not this)."""
    if is_stream(data):
        return None
    return len(data.dataset if isinstance(data, DataLoader) else data)


def digest_tensors(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def digest_examples(data: Any, limit: int | None = 16) -> str:
    """A fingerprint of a dataset: its length and up to `limit` evenly spaced examples (a stream:
    its first `limit` examples); limit None: every example, read one at a time."""
    source = data.dataset if isinstance(data, DataLoader) else data
    n = length(data)
    if n is None:
        examples = itertools.islice(source, limit)
    elif limit is None:
        examples = (source[i] for i in range(n))
    else:
        examples = (source[i] for i in sorted({i * (n - 1) // max(1, limit - 1) for i in range(min(n, limit))}))
    return f"{'stream' if n is None else n}:{digest_tensors(x for example in examples for x in _leaves(example))}"


def _leaves(x: Any, depth: int = 0) -> Iterator[Tensor]:
    """An example's values as tensors to hash, in order. A list of numbers (token ids) is one array:
    a tensor per number took 6.5 µs each, 1.8 hours for a million 512-token examples.
    depth: 1 below the attributes of an object whose repr is its memory address."""
    if isinstance(x, (list, tuple)) and x and type(x[0]) in (int, float):
        try:  # (an index, a tensor) is not a list of numbers: numpy refuses the ragged array
            numbers = np.asarray(x)
        except ValueError:
            numbers = None
        if numbers is not None and numbers.ndim == 1 and numbers.dtype.kind in "iuf":
            yield torch.from_numpy(numbers)
            return
    if isinstance(x, Mapping):
        x = list(x.values())
        if x and type(x[0]) in (int, float) and all(type(v) is type(x[0]) for v in x):
            yield torch.from_numpy(np.asarray(x))  # the same bytes as one tensor per value, at once
            return
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v, depth)
    elif isinstance(x, _PLAIN):
        yield _as_tensor(x)
    elif _is_image(x):  # PIL's repr holds its address: by pixels, mode, size and palette instead
        palette = x.getpalette() if x.mode == "P" else None
        yield _as_tensor(f"{type(x).__qualname__} {x.mode} {x.size} {palette}")
        yield torch.frombuffer(bytearray(x.tobytes()), dtype=torch.uint8)
    elif not hasattr(x, "__dict__"):
        yield _as_tensor(x)
    elif not _ADDRESS.search(text := repr(x)):
        yield _as_tensor(text)  # the bytes _as_tensor(x) hashes, its repr taken once
    else:
        # A repr with a memory address (`<Record object at 0x7f...>`, a partial of a function) differs
        # between processes (ranks, a resumed run): the repr without it, and the attributes, which a
        # default repr leaves out. The example's own attributes whole; an object below them by its own
        # tensors, arrays, numbers and text only: an attribute leading back to the dataset (or round to
        # the example) would otherwise be read whole for every example, or for ever.
        yield _as_tensor(_ADDRESS.sub("", text))
        for name, value in sorted(vars(x).items()):
            if depth == 0 or isinstance(value, _PLAIN):
                yield _as_tensor(name)
                yield from _leaves(value, depth + 1)


_PLAIN = (Tensor, np.ndarray, np.generic, int, float, bool, bytes, str, type(None))


def _is_image(x: Any) -> bool:
    return all(hasattr(x, k) for k in ("mode", "size", "getpalette")) and callable(getattr(x, "tobytes", None))


def describe_model(model: nn.Module) -> list[list]:
    """A model for the ranks' comparisons: its parameters' and buffers' names, shapes and dtypes."""
    return [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]


def describe_task(task: Any, collate_fn: Callable | None = None) -> str:
    """A task for fingerprints: its class and settings (another loss, normalisation or class weight is
    another run), and the collate function (`collate`). Plain values (numpy scalars, dtypes and enums
    too), lists, sets, dicts and dataclasses are taken as they are, tensors and arrays by content;
    other objects (a model, a tokenizer) count by type only."""
    def describe(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (np.generic, torch.dtype, enum.Enum)):
            return f"{type(v).__qualname__} {v}"
        if isinstance(v, (list, tuple)):
            return [describe(x) for x in v]
        if isinstance(v, (set, frozenset)):
            return sorted((describe(x) for x in v), key=repr)
        if isinstance(v, Mapping):
            return {str(k): describe(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: describe(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Tensor):
            if v.is_meta or v.layout != torch.strided:  # no values to read: shape and dtype say what they can
                return f"Tensor {tuple(v.shape)} {v.dtype} {v.layout} {v.device.type}"
            return f"Tensor {tuple(v.shape)} {v.dtype} {digest_tensors([v])}"
        if isinstance(v, np.ndarray):
            if v.dtype.kind == "O":  # objects have no bytes to hash (their reprs may hold addresses)
                return f"ndarray {v.shape} object"
            return f"ndarray {v.shape} {v.dtype} {hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()[:16]}"
        return type(v).__qualname__

    def collate(fn: Any) -> Any:
        """By name; a partial by its function and arguments, and a lambda or a local function (every one
        of them is named alike) by its code too."""
        if fn is None:
            return None
        if isinstance(fn, list):  # one per segment, where the segments' loaders batch otherwise
            return [collate(f) for f in fn]
        if isinstance(fn, functools.partial):
            return [collate(fn.func), describe(list(fn.args)), describe(fn.keywords)]
        name = getattr(fn, "__qualname__", type(fn).__qualname__)
        code = getattr(fn, "__code__", None)
        if code is not None and ("<lambda>" in name or "<locals>" in name):
            body = code.co_code + repr([describe(c) for c in code.co_consts]).encode()
            return f"{name} {hashlib.sha256(body).hexdigest()[:16]}"
        return name

    settings = {k: describe(v) for k, v in sorted(getattr(task, "__dict__", {}).items())}
    cls = type(task)
    return json.dumps([f"{cls.__module__}.{cls.__qualname__}", settings, collate(collate_fn)], sort_keys=True)


def own_collate(data: Any, collate_fn: Callable | None) -> Callable | None:
    """The collate function that batches `data`: the one given, else a DataLoader's own (None for torch's
    default): a resumed run given the loader is compared on it too."""
    if collate_fn is None and isinstance(data, DataLoader) and data.collate_fn is not default_collate:
        return data.collate_fn
    return collate_fn


def segments_collate(trajectory: Any, collate_fn: Callable | None) -> Callable | list | None:
    """The collate function a fit batches its segments' data with (own_collate): one, or a list of one per
    segment where their loaders differ."""
    each = [own_collate(seg.data, collate_fn) for seg in trajectory.segments]
    return each[0] if all(c is each[0] for c in each) else each


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=>)")  # `<... at 0x7f...>`, as object.__repr__ ends


def _as_tensor(leaf: Any) -> Tensor:
    """Any leaf of an example as bytes to hash: tensors and arrays by value, text by its UTF-8, the rest by repr."""
    if isinstance(leaf, Tensor):
        return leaf
    if isinstance(leaf, (int, float, bool)) or (isinstance(leaf, (np.ndarray, np.generic)) and leaf.dtype.kind in "biuf"):
        return torch.as_tensor(np.asarray(leaf))
    raw = leaf if isinstance(leaf, bytes) else (leaf if isinstance(leaf, str) else repr(leaf)).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


class _Examples(IterableDataset):
    """A stream's examples, optionally only those whose position passes `keep`. `given` counts those
    handed out, so that run_pass knows how many examples each batch of a stream holds (read in the
    main process: a stream's loader has no workers)."""

    def __init__(self, data: Any, keep: Callable[[int], bool] | None = None):
        self.data, self.keep, self.given = data, keep, 0

    def __iter__(self):
        for i, example in enumerate(self.data):
            if i == 0:
                _same_first_example(self.data, example)
            if self.keep is None or self.keep(i):
                self.given += 1
                yield example


# Each stream's first example, as its first pass read it (a digest).
_FIRST_EXAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_first_example(stream: Any, example: Any) -> None:
    """Warns, once per stream, when a pass begins with another example than the first pass did: the
    passes line a stream's examples up by position, so one that reshuffles gives score columns in no
    recoverable order and mixes the examples' sums."""
    try:
        first = _FIRST_EXAMPLES.get(stream)
    except TypeError:  # not weakly referable or not hashable: unchecked
        return
    digest = digest_examples([example], limit=None)
    if first is None:
        _FIRST_EXAMPLES[stream] = digest
    elif first != digest and first != "warned":
        _FIRST_EXAMPLES[stream] = "warned"
        warn(f"the stream {type(stream).__name__} began this pass with another example than its first pass: a stream "
             "must yield the same examples in the same order on every pass (one that reshuffles gives score columns "
             "in no recoverable order; one that augments at random, other examples on every pass)")


@contextlib.contextmanager
def _noted(where: Callable[[], str]) -> Iterator[None]:
    """Says where an error the block raises happened, unless something already has (the capture's own
    checks after the pass, of masks and outputs, name the module only)."""
    try:
        yield
    except Exception as exc:
        if not getattr(exc, "__notes__", None) and not str(exc).startswith(where()):
            note(exc, f"source_fast: on {where()}")
        raise


def _batches(loader: DataLoader, where: Callable[[int], str]) -> Iterator[Any]:
    """The loader's batches; default_collate's error on examples of different lengths says what to do."""
    it = iter(loader)
    for b in itertools.count():
        try:
            yield next(it)
        except StopIteration:
            return
        except Exception as exc:
            if not isinstance(exc, RuntimeError) or not any(m in str(exc) for m in (
                    "stack expects each tensor to be equal size", "each element in list of batch should be of equal size")):
                note(exc, f"source_fast: raised while reading {where(b)} (the data and its collate_fn)"
                      + _text_columns(loader.dataset))
                raise
            source = loader.dataset
            # (X, y): a tuple of columns of N rows each, not N examples (a list of examples is the usual
            # sequence, and examples of different sizes, one image each, can share their first size).
            if isinstance(source, tuple) and all(isinstance(x, Tensor) and x.dim() for x in source) and \
                    len({x.shape[0] for x in source}) == 1:
                raise RuntimeError(f"{where(b)}: {exc}\nthe data is a tuple of {len(source)} tensors of {source[0].shape[0]} "
                                   f"rows each, read as {len(source)} examples (a tuple is a sequence of examples): give "
                                   "columns as torch.utils.data.TensorDataset(X, y)") from exc
            raise RuntimeError(f"{where(b)}: {exc}\nexamples of different lengths need a collate_fn that pads them "
                               "(and an attention mask the task returns): pass collate_fn=, or a DataLoader with one"
                               ) from exc


def _text_columns(dataset: Any) -> str:
    """A hint for a collate_fn's error: examples that still hold text, which Hugging Face's Trainer
    drops before its collator sees them (remove_unused_columns) and source_fast does not."""
    try:
        first = dataset[0] if not isinstance(dataset, IterableDataset) else None
    except Exception:
        return ""
    if not isinstance(first, Mapping):
        return ""
    text = [k for k, v in first.items() if isinstance(v, str) or (isinstance(v, list) and v and isinstance(v[0], str))]
    return (f"; the examples hold text columns {text}, which Hugging Face's Trainer drops before its collator "
            "(remove_unused_columns): drop them too (datasets' remove_columns)") if text else ""


def make_loader(data: Any, batch_size: int, collate_fn: Callable | None) -> DataLoader:
    """Batches of `data` in order (a DataLoader's own batches; batch_size then does not apply)."""
    if isinstance(data, DataLoader):
        if collate_fn is not None and collate_fn != data.collate_fn:  # ==: a bound method is new at each access
            raise ValueError("data is a DataLoader with a collate_fn of its own, and collate_fn= gives another: pass "
                             "the loader's (it then batches the data given as datasets, e.g. the queries), or wrap "
                             "that data in a DataLoader too")
        is_stream(data)  # checks its settings
        return data
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if is_stream(data):
        return DataLoader(_Examples(data), batch_size=batch_size, collate_fn=collate_fn)
    rows = _TensorRows.of(data) if collate_fn is None else None
    if rows is not None:  # the batch sampler hands each batch's indices to one __getitem__
        return DataLoader(rows, batch_size=None, sampler=BatchSampler(SequentialSampler(rows), batch_size, False))
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


class _TensorRows(Dataset):
    """A TensorDataset (or a Subset of one) read a batch at a time: each tensor indexed once per batch
    rather than an example at a time and then stacked by default_collate (1.2-1.3x on a digits fit,
    where per-example reads were 30 % of it). The batches are default_collate's: a list of new tensors
    (indexing copies, so a task that edits its batch in place leaves the data alone), and the
    DataLoader around it draws its one random number per pass as before, so sampled labels stay the same."""

    def __init__(self, tensors: tuple[Tensor, ...], rows: Tensor):
        self.tensors, self.rows = tensors, rows

    @classmethod
    def of(cls, data: Any) -> _TensorRows | None:
        rows = None
        while type(data) is Subset:  # a subclass may read its examples otherwise
            index = torch.as_tensor(list(data.indices), dtype=torch.long)
            rows = index if rows is None else index[rows]
            data = data.dataset
        if type(data) is not TensorDataset:  # a subclass may read its examples otherwise
            return None
        return cls(data.tensors, torch.arange(len(data)) if rows is None else rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, batch: list[int]) -> list[Tensor]:
        rows = self.rows[batch]
        return [t[rows] for t in self.tensors]


def subset(data: Any, indices: Sequence[int]) -> Any:
    """The examples of map-style `data` at `indices`, in the same form (a DataLoader stays one)."""
    if isinstance(data, DataLoader):
        return _rebuild(data, Subset(data.dataset, list(indices)))
    return Subset(data, list(indices))


def rank_share(data: Any) -> Any:
    """This rank's share under torch.distributed: a contiguous slice of a map-style dataset, every
    world-th example of a stream (each rank reads the whole stream and keeps its own)."""
    rank, world = rank_and_world()
    if world == 1:
        return data
    if not is_stream(data):
        n = length(data)
        return subset(data, range(rank * n // world, (rank + 1) * n // world))
    source = data.dataset if isinstance(data, DataLoader) else data
    mine = _Examples(source, lambda i: i % world == rank)
    return _rebuild(data, mine) if isinstance(data, DataLoader) else mine


def share_start(data: Any) -> int | None:
    """Where rank_share(data) begins in `data`: None for a stream's strided share under torch.distributed."""
    rank, world = rank_and_world()
    if world == 1:
        return 0
    return None if is_stream(data) else rank * length(data) // world


def materialize(data: Any) -> Any:
    """Map-style data as is; a stream's examples in a list (for queries: few, and read once, so even a
    one-shot iterator will do)."""
    if isinstance(data, Iterator):
        return list(data)
    if not is_stream(data):
        return data
    if isinstance(data, DataLoader):
        return _rebuild(data, list(data.dataset))
    return list(data)


def chunks(data: Any, size: int) -> Iterator[tuple[int, Any]]:
    """(first position, map-style piece) of at most `size` examples each, in order: slices of a map-style
    dataset, or a stream's examples buffered `size` at a time (memory bounded by `size`)."""
    if not is_stream(data):
        n = length(data)
        for start in range(0, n, size):
            yield start, subset(data, range(start, min(n, start + size)))
        return
    source = data.dataset if isinstance(data, DataLoader) else data
    start, buffer = 0, []
    for example in source:
        buffer.append(example)
        if len(buffer) == size:
            yield start, _rebuild(data, buffer) if isinstance(data, DataLoader) else buffer
            start, buffer = start + size, []
    if buffer:
        yield start, _rebuild(data, buffer) if isinstance(data, DataLoader) else buffer


def check_summed(model: nn.Module, task: Task, data: Any, collate_fn: Callable | None, batch_size: int,
                 objective: str) -> None:
    """Refuses a task whose loss (or measurement) is the mean over the batch, not its sum. Every
    per-example gradient, so every score, assumes a sum; a mean (torch's losses' default reduction,
    HF models' own `.loss`, a mean over tokens) scales each example's gradient by about 1/batch size,
    so scores would depend on batch_size and the last batch's rows weigh more, with no error of their
    own. Checked on the first four examples, together against two pairs (two, not one: a model that
    squeezes its batch axis breaks on one), or, with batches of two or three or data of two or three
    examples, on the first two against each alone (a collate_fn need not take more than the batch
    size); with batches of one a mean is the sum. In eval mode, with autograd on (a task may differentiate inside its loss), the caller's
    random state kept. Only a clear mean is refused: not the halves' sum, and where all three losses
    have one sign no larger than the larger half's (a mean of the halves weighted by their examples or
    tokens lies between them), else about half the halves' sum. Data or tasks that fail here (a dataset opened in its workers) and losses at rounding's scale
    are left alone: the passes say what fails, and where."""
    size = data.batch_size if isinstance(data, DataLoader) else batch_size
    if size is None or size < 2:
        return
    collate = data.collate_fn if isinstance(data, DataLoader) else collate_fn or default_collate
    device, training = model_device(model), model.training
    values = []
    model.eval()  # as the passes run it: no dropout, no BatchNorm statistics updated
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            first = _first_examples(data, 4 if size >= 4 else 2)
            if len(first) < 2:  # a mean over one example is its sum
                return
            if not _same(collate(first), collate(first)):  # a random collator (masked LM): no losses to compare
                return
            k = 4 if len(first) >= 4 else 2
            first = first[:k]
            for piece in (first, first[: k // 2], first[k // 2 :]):
                batch = to_device(collate(piece), device)
                out = task.compute_measurement(batch, model) if objective == "measurement" else \
                    task.compute_train_loss(batch, model, False)
                values.append(float(out.detach()) if isinstance(out, torch.Tensor) and out.numel() == 1 else math.nan)
    except Exception:  # noqa: BLE001 (the pass reports it, naming the pass and the batch)
        return
    finally:
        model.train(training)
    together, one, two = values
    if not all(map(math.isfinite, values)) or max(map(abs, values)) < 1e-8:
        return  # not a finite scalar (the passes say so), or a loss at rounding's scale
    # 5 %: 16-bit models round a loss computed on 4 rows and on 2 differently. A mean over examples or
    # tokens is the halves' mean weighted by their examples or tokens: between them, where a sum of
    # losses of one sign exceeds both.
    summed = one + two
    if abs(together - summed) <= 0.05 * (abs(together) + abs(one) + abs(two)):
        return
    one_sign = min(values) > 0 or max(values) < 0
    mean = (abs(together) <= 1.05 * max(abs(one), abs(two)) if one_sign
            else abs(together - summed / 2) <= 0.25 * abs(summed / 2))
    if not mean:
        return
    kind = "compute_measurement" if objective == "measurement" else "compute_train_loss"
    halves = "two halves" if k == 4 else "two examples alone"
    raise ValueError(
        f"the task's {kind} is the mean over the batch, not its sum: on the first {k} examples it returns "
        f"{together:.6g}, and {one:.6g} + {two:.6g} = {summed:.6g} on their {halves}; source_fast, like "
        "kronfluence, needs it summed over the batch's examples (e.g. reduction='sum', and a language model's "
        "token losses summed per example, not HF's mean `.loss`): a mean scales each example's gradient by "
        "1/batch size"
    )


def _first_examples(data: Any, k: int) -> list:
    """The first k examples of a dataset, a stream or a DataLoader's dataset (fewer if it holds fewer)."""
    source = data.dataset if isinstance(data, DataLoader) else data
    if is_stream(data):
        return list(itertools.islice(source, k))
    return [source[i] for i in range(min(k, length(data)))]


def check_collate_order(data: Any, collate_fn: Callable | None, batch_size: int) -> None:
    """Refuses a collate_fn that sorts its batch (by length, to pad less, say): the passes give a batch's
    rows to its examples in order, so every score of a sorted batch's examples would go to another of
    them, with no error of its own. Seen on the first examples (up to 8): collated in reverse order, or
    a pair of them the other way round, a sorting collator gives the very batch it gives in order, where
    one that keeps the order gives another, unless the examples collate alike (each is collated alone to
    tell). Unseen: examples that all tie on the sort key, and a collator that draws random numbers
    (masking for a masked LM: two collations of the same examples differ), which is left alone. The
    caller's random states are kept (not a collator's own generator)."""
    collate = data.collate_fn if isinstance(data, DataLoader) else collate_fn
    size = data.batch_size if isinstance(data, DataLoader) else batch_size
    if collate is None or collate is default_collate or size is None or size < 2:
        return
    state = random.getstate(), np.random.get_state()
    found = None
    try:
        with torch.random.fork_rng(devices=[]):
            first = _first_examples(data, min(size, 8))
            batch = collate(first) if len(first) >= 2 else None
            if batch is not None and _same(batch, collate(first)):  # else nothing to reorder, or random
                alone = [collate([e]) for e in first]
                k = len(first)
                if any(not _same(alone[i], alone[k - 1 - i]) for i in range(k // 2)) and _same(
                        batch, collate(first[::-1])):
                    found = f"the first {k} examples collated in reverse order give the same batch as in order"
                else:
                    found = next((f"examples {i} and {j} collated in either order give the same batch"
                                  for i, j in itertools.combinations(range(k), 2) if not _same(alone[i], alone[j])
                                  and _same(collate([first[i], first[j]]), collate([first[j], first[i]]))), None)
    except Exception:  # noqa: BLE001 (the passes report a collate_fn's error, naming the batch)
        pass
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    if found is not None:
        name = getattr(collate, "__qualname__", type(collate).__qualname__)
        raise ValueError(
            f"collate_fn {name} reorders its batch: {found} (a collator that sorts by length?); source_fast reads a "
            "batch's rows as its examples in the order given, so every score would belong to another example of its "
            "batch: collate in order (sort the data beforehand, if padding is the reason)")


def _same(x: Any, y: Any) -> bool:
    """Equal batches: the same structure, tensors of one shape, dtype and values (NaN equal to NaN);
    values that cannot be compared count as equal."""
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape != y.shape or x.dtype != y.dtype:
            return False
        return torch.equal(x, y) or (x.is_floating_point() and bool(((x == y) | (x.isnan() & y.isnan())).all()))
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return type(x) is type(y) and all(_same(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    try:
        return bool(np.array_equal(x, y)) if isinstance(x, np.ndarray) else bool(x == y)
    except Exception:  # noqa: BLE001
        return True


def _nonfinite_row(batch: Any) -> int | None:
    """The first example of a batch with a NaN or infinite value in a floating-point tensor whose first
    axis is the examples' (dicts, lists and tuples searched), or None. Only on the way to an error."""
    rows: list[int] = []

    def search(x: Any) -> None:
        if isinstance(x, Tensor) and x.is_floating_point() and x.dim() > 0 and x.shape[0] > 0:
            bad = ~torch.isfinite(x.detach().reshape(x.shape[0], -1)).all(1)
            if bool(bad.any()):
                rows.append(int(bad.nonzero()[0]))
        elif isinstance(x, Mapping):
            for v in x.values():
                search(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                search(v)

    search(batch)
    return min(rows) if rows else None


def _example(first: int | None, start: int, row: int) -> str:
    return f"example {first + start + row}" if first is not None else f"the batch's example {row}"


# A task (view) may carry a constant factor for its loss, the kronfluence shim's float16 loss scaling
# (kronfluence's `amp_scale`): run_pass multiplies the loss by it before backward, so that float16
# output gradients do not underflow, and the capture divides the output gradients by it again.
LOSS_SCALE = "_source_fast_loss_scale"


def _reversed_examples(batch: Any, n: int, vectors: bool = True) -> Any:
    """The batch with its n examples in reverse order: every tensor whose first dimension is n flipped
    there (1-D ones too where `vectors`: a length n may be a sequence's, not the examples'), and every
    list of n examples (texts, numbers, dicts, a tensor each of another length) reversed as a whole."""
    if isinstance(batch, Tensor):
        return batch.flip(0) if batch.dim() > (0 if vectors else 1) and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return _rebuilt(batch, {k: _reversed_examples(v, n, vectors) for k, v in batch.items()})
    if isinstance(batch, list) and len(batch) == n and not all(
            isinstance(v, Tensor) and v.dim() and v.shape[0] == n for v in batch):  # not columns of n rows each
        return batch[::-1]
    if isinstance(batch, (list, tuple)):
        values = [_reversed_examples(v, n, vectors) for v in batch]
        return type(batch)(*values) if hasattr(batch, "_fields") else type(batch)(values)
    return batch


def _rebuilt(batch: Mapping, values: dict) -> Any:
    """A mapping of `batch`'s own type holding `values`: the type the task may rely on, transformers'
    BatchEncoding (what its collators and tokenizer.pad return; a UserDict, not a dict), OrderedDict, ...
    whose copies are new mappings (another MutableMapping's shallow copy could write into the caller's
    batch); other mappings as dicts."""
    if type(batch) is dict or not isinstance(batch, (dict, UserDict)):
        return values
    out = copy.copy(batch)
    out.update(values)
    return out


def check_order(capturer: Capturer, task: Task, objective: str, batch: Any, n: int, records: dict[str, Captured],
                names: list[str], where: str, reverse: bool = True, vectors: bool = True) -> dict[str, str]:
    """capturer.check_order on the batch with its examples reversed (how a layer's rows belong to the
    examples: see run_pass; `vectors`: 1-D tensors of length n too), or as it is (reverse=False: whether
    the forward pass draws random numbers). The caller's random state is kept (torch's, numpy's and
    Python's): the pass's sampled labels stay the same."""
    backwards = _reversed_examples(batch, n, vectors) if reverse else _map_tensors(batch, torch.clone)
    device = model_device(capturer.model)

    def forward() -> None:
        if objective == "measurement":
            task.compute_measurement(backwards, capturer.model)
        else:
            task.compute_train_loss(backwards, capturer.model, objective == "fisher")

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return capturer.check_order(records, names, n, forward, reverse)
    except Exception as exc:
        note(exc, f"source_fast: raised in the task on {where} with its examples reversed (to check which examples "
                   f"the rows of modules {names} belong to)")
        raise
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _order(capturer: Capturer, task: Task, objective: str, batch: Any, n: int, records: dict[str, Captured],
           names: list[str], where: str) -> dict[str, str]:
    """check_order's findings, with second looks at rows out of order: with 1-D tensors of length n left
    as they are (a sequence's positions when it has as many tokens as examples), and with the batch as it
    was, run again ("random" where its rows differ: a forward pass that draws random numbers, as a
    diffusion loss's noise, moves rows whatever their order)."""
    found = check_order(capturer, task, objective, batch, n, records, names, where)
    moved = [name for name in names if found.get(name, "out of order") == "out of order"]
    if moved:
        found.update(check_order(capturer, task, objective, batch, n, records, moved, where, vectors=False))
        moved = [name for name in moved if found.get(name, "out of order") == "out of order"]
    if moved:
        again = check_order(capturer, task, objective, batch, n, records, moved, where, reverse=False)
        found.update({name: "random" for name in moved if again.get(name) != "same"})
    return {name: found.get(name, "out of order") for name in names}


def _widths(batch: Any, n: int) -> set[int]:
    """The second dimensions of the batch's tensors that hold its n examples first (tokens per example)."""
    widths: set[int] = set()
    _map_tensors(batch, lambda t: widths.add(t.shape[1]) if t.dim() >= 2 and t.shape[0] == n else None)
    return widths


def _judge_order(name: str, found: str, folded: bool, selected: bool, n: int, where: str) -> None:
    """Refuses a layer whose rows check_order did not find to be the examples' (see run_pass). Rows that
    stay as they were are those of a layer fed the examples first only where nothing else is in question."""
    if found == "random" and folded:
        raise ValueError(
            f"{where}: module {name!r} takes several rows per example for the batch's {n} examples, whose order is "
            "checked by a forward pass with the examples reversed; "
            "the task or the model draws random numbers in its forward pass (noise added to the inputs?), so its rows "
            "cannot be checked: name the modules to track in the task's get_influence_tracked_modules, without it")
    if found == "unmoved" and selected and not folded:
        raise ValueError(
            f"{where}: module {name!r} sees rows picked by index (a mixture of experts' share of the tokens?), as many "
            f"as the batch's {n} examples, and with the examples reversed they stay as they were: they are not the "
            "examples; a tracked layer's input must hold the examples first, or each example's rows one after another")
    if found == "out of order" and not folded:
        raise ValueError(
            f"{where}: module {name!r} sees as many rows as the batch's {n} examples, but with the examples reversed "
            "its rows are not reversed: they are not the examples (a layer fed (tokens, batch, features) with as many "
            "tokens as examples, as XLNet's can be; a mixture of experts' share of the tokens?), or the task's forward "
            "pass depends on the examples' order (noise from a fixed seed, a batch sorted by length); a tracked "
            "layer's input must hold the examples first, or each example's rows one after another")
    if found == "out of order":
        raise ValueError(
            f"{where}: module {name!r} takes several rows per example for the batch's {n} examples (its input's "
            "first dimension is a multiple of theirs), but not one example's rows after another's: with the "
            "examples reversed its rows are not the same blocks reversed (a layer fed (tokens, batch, features), as "
            "XLNet's are, flattened; a mixture of experts' share of the tokens, which differs with them?), or the "
            "task's forward pass depends on the examples' order (noise from a fixed seed, a batch sorted by length); a "
            "tracked layer's input must hold the examples first, or each example's rows one after another (examples × "
            "tokens, as OPT's fc1 takes)")
    if found == "unmoved" and folded:
        raise ValueError(
            f"{where}: module {name!r} takes several rows per example for the batch's {n} examples (its input's first "
            "dimension is a multiple of theirs), and with the examples reversed its rows stay as they were: its input "
            "is not the examples' own (a table all examples share?), or the examples are not in the batch's tensors "
            "with the examples first nor in a list of them (what is reversed to check which example each row belongs "
            "to)")


def advance(progress: Any, lead: Captured, n: int, tokens: int) -> int:
    """A pass's progress bar moved on by n examples, showing the tokens per second of its first tracked
    layer (`lead`; masked tokens not counted). Returns the tokens so far, `tokens` before."""
    tokens += lead.a.shape[0] * lead.a.shape[1] if lead.mask is None else int((lead.mask != 0).sum())
    progress.set_postfix_str(f"{tokens / max(progress.format_dict['elapsed'], 1e-9):.0f} tok/s", refresh=False)
    progress.update(n)
    return tokens


def run_pass(
    model: nn.Module,
    task: Task,
    specs: list[LayerSpec],
    loader: DataLoader,
    objective: str,
    what: str,
    progress: Any | None = None,
    first: int | None = 0,
) -> Iterator[tuple[int, int, dict[str, Captured]]]:
    """For each batch: (first example index, batch size, captured layers) after one backward of the
    objective: "fisher" (sampled labels), "train" (true labels) or "measurement".
    first: the position of the loader's first example in the data the user gave (a shard's, a rank's
    share's), for errors that name the examples; None where the loader's are not a run of them."""
    device = model_device(model)
    scale = float(getattr(task, LOSS_SCALE, 1.0))
    capturer = Capturer(model, specs, scale)
    rank, world = rank_and_world()

    def where(b: int, start: int) -> str:
        examples = "" if first is None else f" (examples from {first + start})"
        return f"{f'rank {rank}: ' if world > 1 else ''}{what}, batch {b}{examples}"

    total = None if isinstance(loader.dataset, IterableDataset) else len(loader.dataset)
    batch_size = loader.batch_size or loader.sampler.batch_size  # _TensorRows' batches come from its sampler
    if total is None and not isinstance(loader.dataset, _Examples):  # a stream's batches are counted as read
        loader = _rebuild(loader, _Examples(loader.dataset))
    given = 0 if total is not None else loader.dataset.given  # its count before this pass
    start = tokens = 0
    settled: set[str] = set()  # layers fed the examples first, as one batch's check_order showed
    unchecked: dict[str, int] = {}  # layers whose rows check_order could not see (alike): on how many batches
    batches_of_many = 0
    leads = [s for s in specs if s.group == 0]  # a layer per module: a grouped convolution's first group
    for b, batch in enumerate(_batches(loader, lambda b: where(b, start))):
        # The examples the batch holds: a stream's last batch may be short.
        n = min(batch_size, total - start) if total is not None else loader.dataset.given - given - start
        batch = to_device(batch, device)
        # For check_order, the batch as given: the task may take keys out of it or edit its tensors in place.
        given_batch = _map_tensors(batch, torch.clone)
        try:
            mask = task.get_attention_mask(batch)
        except Exception as exc:
            note(exc, f"source_fast: raised by the task's get_attention_mask on {where(b, start)}")
            raise
        with _noted(lambda: where(b, start)), capturer.capture(mask, n) as records:
            try:
                if objective == "measurement":
                    out = task.compute_measurement(batch, model)
                else:
                    out = task.compute_train_loss(batch, model, objective == "fisher")
            except Exception as exc:  # the task's or the model's own error: say which pass and batch
                call = "compute_measurement" if objective == "measurement" else "compute_train_loss"
                # NaN in the inputs may be what the task refused (a sampler's dump of NaN logits says less).
                row = None if isinstance(exc, torch.OutOfMemoryError) else _nonfinite_row(batch)
                note(exc, f"source_fast: raised in the task's {call} (the model's forward) on {where(b, start)}"
                      + ("" if row is None else f"; {_example(first, start, row)} has NaN or infinite values"))
                raise
            if not isinstance(out, torch.Tensor) or out.dim() != 0:
                raise ValueError(f"{where(b, start)}: the task must return a scalar tensor (summed over the batch)")
            missing = list(dict.fromkeys(s.module for s in specs if s.module not in records))
            if missing:
                raise ValueError(
                    f"{where(b, start)}: tracked modules {missing} did not run in the forward pass, or only under "
                    "torch.no_grad (a module whose weights its parent uses without calling it, as nn.MultiheadAttention "
                    "does its out_proj, cannot be tracked; torch.utils.checkpoint with use_reentrant=True runs its "
                    "forward under no_grad: use use_reentrant=False): name the modules to track in the task's "
                    "get_influence_tracked_modules()")
            if not out.requires_grad:
                raise ValueError(f"{where(b, start)}: the loss does not depend on any tracked module")
            capturer.forward_done()
            (out * scale if scale != 1 else out).backward()
        for spec in specs:
            rec = records[spec.name]
            if rec.g is None:
                raise ValueError(f"{where(b, start)}: module {spec.name!r} received no gradient from the loss")
            if rec.a.shape[0] != n:
                raise ValueError(
                    f"{where(b, start)}: module {spec.name!r} saw {rec.a.shape[0]} rows (its input's first "
                    f"dimension), but the batch holds {n} examples; a tracked layer's input must hold the examples "
                    "first, or each example's rows one after another (examples × tokens, as OPT's fc1 takes), not a "
                    "layer fed (tokens, batch, features), as XLNet's are"
                    + ("" if total is not None else " (a DataLoader over a stream batches single examples, "
                       "batch_size at a time, not ready-made batches)")
                )
        # Which example each row belongs to, seen by reversing the examples, where counting rows cannot tell:
        # layers read as examples × tokens, and those fed as many tokens as examples (a layer fed (tokens, batch,
        # features), as XLNet's, passes as (examples, tokens, features) then), until one batch shows their
        # order; layers fed rows picked by index on every batch (a mixture of experts' share of the tokens
        # changes with them, and may be as many rows as examples, or a multiple).
        # Rows a 2-D input holds per example that are no width of the batch's own tensors (OPT's fc1 takes
        # input_ids' tokens) are an expert's share too, whose first layer shows no index op when no tracked
        # layer comes before it (autograd keeps no history there).
        # Per module: a grouped convolution's groups share their rows, checked once on its whole input.
        widths = _widths(given_batch, n)
        lead = {s.module: (s, records[s.name]) for s in leads}
        every = [m for m, (_, r) in lead.items() if r.selected or (
            m in capturer.folded and not r.regrouped and r.a.shape[1] not in widths)]
        once = [m for m, (s, r) in lead.items() if m not in settled and m not in every and (
            m in capturer.folded or (s.kind not in CONVOLUTIONS and r.a.shape[1] == n))]
        if n > 1 and every + once:  # one example's rows are its own
            batches_of_many += 1
            found = _order(capturer, task, objective, given_batch, n, capturer.whole(every + once),
                           every + once, where(b, start))
            for name in every + once:
                folded = name in capturer.folded
                _judge_order(name, found[name], folded, lead[name][1].selected, n, where(b, start))
                if found[name] == "alike" and (folded or name in every):
                    unchecked[name] = unchecked.get(name, 0) + 1
                elif name in once:
                    settled.add(name)
        # One device sync per batch for every finiteness check (a sync per layer would stall a GPU);
        # the slow path below runs only to name what went wrong.
        # The layers' inputs too: a finite loss can hide an infinite input (tanh saturates on it), and the
        # example's gradient tile G_nᵀA_n would be NaN, its scores NaN with no error (masked tokens' are 0).
        whole = capturer.whole(list(lead))  # per module: a grouped convolution's groups share one record
        finite = torch.stack([torch.isfinite(out.detach())] + [all_finite(r.g) for r in whole.values()]
                             + [all_finite(r.a) for r in whole.values()])
        if not bool(finite.all()):
            half = any(records[s.name].half or records[s.name].g.dtype == torch.float16 for s in specs)
            hint = (" (float16 holds values up to 65504: a float16 model's activations, logits or gradients, or "
                    "those of float16 autocast, may overflow; bfloat16 and float32 do not at these values"
                    + (f"; the loss was scaled by {scale:g} before backward (amp_scale): a smaller scale may keep the "
                       "gradients finite" if scale != 1 else "") + ")") if half else ""
            if not math.isfinite(out.item()):
                row = _nonfinite_row(batch)
                cause = "" if row is None else f" ({_example(first, start, row)} has NaN or infinite values)"
                raise FloatingPointError(f"{where(b, start)}: the {objective} loss is {out.item()}{cause}{hint}")
            for name, r in whole.items():
                bad = ~torch.isfinite(r.a.reshape(r.a.shape[0], -1)).all(1)
                if bool(bad.any()):
                    row = int(bad.nonzero()[0])
                    raise FloatingPointError(
                        f"{where(b, start)}: the input of module {name!r} holds NaN or infinite values for "
                        f"{_example(first, start, row)}, though the {objective} loss is finite (a padded position "
                        "get_attention_mask does not mask, or an input a later layer saturates, as tanh does on inf): "
                        f"its gradient and scores would be NaN{hint}")
            # Backward runs from the last layer to the first: the last non-finite one is where it entered.
            for spec in reversed(specs):
                if not torch.isfinite(records[spec.name].g).all():
                    raise FloatingPointError(f"{where(b, start)}: non-finite gradient at module {spec.name!r}{hint}")
        yield start, n, records
        start += n
        if progress is not None:  # not `first`: where() reads that (the loader's first example)
            tokens = advance(progress, records[specs[0].name], n, tokens)
    unsure = {name: count for name, count in unchecked.items() if name not in settled}
    if unsure:
        warn(f"{what}: modules {sorted(unsure)} take several rows per example, or rows picked by index, and on "
             f"{max(unsure.values())} of {batches_of_many} batches their examples' rows were alike, so which example "
             "each row belongs to could not be checked there")
