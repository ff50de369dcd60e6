"""Passes over the data kept on disk, so that scoring layer group by layer group runs each forward and
backward pass once.

Every method score() runs on per-example gradients is block-diagonal over layers: the scores are a sum
of each layer's. When the prepared queries of every layer do not fit in memory at once, score() takes
the layers a group at a time instead of the queries a block at a time. A pass over the training data
then reads each layer's inputs and output gradients once for all the queries (each training example's
gradient tile is formed once, and the queries' basis is chosen for all of them), where blocks of queries
re-run the model over the training data once per block. What makes that possible is this cache: the
first group's passes record the tokens of the layers the later groups score, and each later group reads
only its own layers' back (a pass of GPT-2 small on the CPU takes ~7 s per 1,000 tokens; reading its 48
layers' tokens back, 0.6 MB per token, takes a fraction of that).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from ._io import TEMP_MARK
from ._passes import available_memory, model_device, run_pass
from .capture import Captured, LayerSpec
from .task import Task

# Disk left free for everything else: the cache gives up (NoRoom) rather than fill the disk.
DISK_MARGIN = 1 << 30


class NoRoom(Exception):
    """The cache would leave less than DISK_MARGIN free: score() goes back to blocks of queries."""


def _file_system(path: Path) -> str:
    """The type of the file system `path` is on (the longest mount point over it, the last mounted
    there), from /proc/self/mounts; "" where that cannot be read."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return ""
    path_ = os.path.realpath(path)
    best, kind = "", ""
    for point, fs in mounts:
        point = point.replace("\\040", " ")  # the mounts file's escape for a space
        if (path_ == point or path_.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fs
    return kind


# The caches whose file is open, for _leave_in_child.
_OPEN: weakref.WeakSet[PassCache] = weakref.WeakSet()


def _leave_in_child() -> None:
    """In a forked child (a DataLoader's worker started during a pass) every open cache's descriptor is
    pointed at /dev/null: the child never reads the passes, and its copy of the descriptor would keep the
    file's space (memory, on a tmpfs) and its lock after close() removed it, for as long as the worker
    lives (persistent_workers). Not closed: the child's copy of the file object may still flush the
    parent's buffered bytes, which now go nowhere."""
    if not _OPEN:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for cache in list(_OPEN):
            try:
                os.dup2(null, cache._file.fileno())
            except (OSError, ValueError):  # closed meanwhile
                pass
    finally:
        os.close(null)


os.register_at_fork(after_in_child=_leave_in_child)

_FOLDER_START = f"source_fast_passes{TEMP_MARK}"
_FILE = "passes.bin"


def _folder_prefix(pid: int) -> str:
    """The passes' folder names the process and host that made it: a process killed outright (a preempted
    score_corpus job) leaves its folder, up to a shard's layer tokens, which the next cache removes."""
    return f"{_FOLDER_START}{pid}-{socket.gethostname()}-"


def _remove_dead_processes_folders(directory: Path) -> None:
    """Removes this user's passes' folders made on this host by caches that have ended: no process holds
    their file locked, and the process number in the name runs no process here. The lock alone tells for a
    process in another PID namespace (a container sharing /tmp and the host name: its number means
    nothing here); the number alone for a cache of an earlier version, which took no lock. Another host's
    folders under a shared TMPDIR stay (a lock may not reach across hosts), and so do folders on a file
    system without locks. Best effort: nothing here fails the cache."""
    host = socket.gethostname()
    for folder in directory.glob(f"{_FOLDER_START}*"):
        # The name: the process number, the host's name, mkdtemp's random end (which has no "-").
        pid, _, rest = folder.name[len(_FOLDER_START):].partition("-")
        if rest.rpartition("-")[0] != host or _runs(pid):
            continue
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_uid != os.getuid():
                continue
            fd = os.open(folder / _FILE, os.O_RDONLY)
        except OSError:  # gone meanwhile, or its cache has not made its file yet
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a running cache, or no locks on this file system
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _runs(pid: str) -> bool:
    """Whether a process numbered `pid` (as a folder's name spells it) runs here: a number no process can
    have (not ASCII digits, too large) runs none."""
    if not (pid.isascii() and pid.isdigit() and len(pid) <= 9):
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError)
        return True
    return True


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
    """Records each pass over data once, the layers later layer groups need, and replays it for any
    subset of them.

    Passes are told apart by their order within a round (round(): one layer group's turn) and, for the
    queries' passes ("measurement"), by the round's queries: a round asks for the same passes in the same
    order as every other round, the training passes whatever its queries are. Every layer's tokens go to
    one file (one descriptor however many layers are tracked) in a fresh folder in tempfile's directory
    (TMPDIR), removed by close(). Anything the disk refuses (no folder, a full disk or quota, a file
    size limit) raises NoRoom: the cache only saves passes, score() can do without it."""

    def __init__(self, specs: list[LayerSpec], directory: str | None = None,
                 check: Callable[[dict[str, Captured]], None] | None = None):
        self.specs = specs
        self._check = check  # called with every recorded batch's records of every layer
        # First, so that an interrupt there leaves no folder of this cache; tidying up after killed processes
        # cannot be a reason to do without the cache.
        try:
            _remove_dead_processes_folders(Path(directory or tempfile.gettempdir()))
        except Exception:  # noqa: BLE001 (best effort; a missing temporary directory is said below)
            pass
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=_folder_prefix(os.getpid()), dir=directory))
            self._file = open(self.folder / _FILE, "w+b")
        except OSError as exc:
            if hasattr(self, "folder"):
                shutil.rmtree(self.folder, ignore_errors=True)
            # Not gettempdir(): with no usable temporary directory at all it raises again.
            raise NoRoom(f"no folder for them in {directory or tempfile.tempdir or 'the temporary directory'} "
                         f"({exc})") from exc
        _OPEN.add(self)
        # A TMPDIR on tmpfs (/tmp on many systems) keeps the passes in memory, which the scoring needs too.
        self._in_memory = _file_system(self.folder) in ("tmpfs", "ramfs")
        try:  # held while this cache lives: the folder's process runs (_remove_dead_processes_folders)
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # no locks on this file system: no other cache removes the folder either
            pass
        self._done: dict[tuple, list[tuple[int, int, dict[str, _Layer]]]] = {}
        self._queries: tuple = ()
        self._count: dict[str, int] = {}
        self._kept = {s.name for s in specs}
        self._training_left: int | None = None
        self.bytes_written = 0
        # A stream's pieces (their sizes), once read: later rounds replay them without reading the stream.
        self.stream_pieces: list[int] | None = None

    def round(self, queries: range, later: set[str]) -> None:
        """A new layer group's turn, over the queries `queries`; `later`: the layers of the turns after
        it, the only ones the passes recorded from now on keep."""
        self._queries = (queries.start, queries.stop)
        self._count = {}
        self._kept = later
        self._training_left = None

    def expect_training(self, examples: int | None) -> None:
        """The training examples this round's passes read from now on, all passes together (checkpoints
        × rows; None: not known): the disk is checked for them all at the first batch, not a pass at a
        time, which would leave the passes already run for nothing."""
        self._training_left = examples

    def run(self, model: nn.Module, task: Task, specs: list[LayerSpec], loader: DataLoader, objective: str,
            what: str, progress: Any | None = None, first: int | None = 0
            ) -> Iterator[tuple[int, int, dict[str, Captured]]]:
        """run_pass's batches for `specs`: the pass itself the first time (recording the kept layers),
        the recording after that (the loader is then not read)."""
        k = self._count.get(objective, 0)
        self._count[objective] = k + 1
        key = (objective, k) + (self._queries if objective == "measurement" else ())
        if key in self._done:
            return self._replay(self._done[key], specs, model_device(model), progress)
        return self._record(key, model, task, specs, loader, objective, what, progress, first)

    def _record(self, key, model, task, specs, loader, objective, what, progress, first):
        total = None if isinstance(loader.dataset, IterableDataset) else len(loader.dataset)
        kept = [s for s in self.specs if s.name in self._kept]
        batches = []
        for start, n, records in run_pass(model, task, self.specs, loader, objective, what, progress, first):
            if self._check is not None:
                self._check(records)
            size = sum(records[s.name].a.nbytes + records[s.name].g.nbytes for s in kept)
            if objective == "train" and self._training_left is not None:
                left, self._training_left = self._training_left, self._training_left - n
            else:
                left = None if total is None else total - start
            later = 0 if left is None else size * max(0, left - n) // max(n, 1)
            free = shutil.disk_usage(self.folder).free
            where = f"{self.folder} has {free} bytes free"
            if self._in_memory:  # the passes may take half the memory left, the scoring the rest
                free = min(free, available_memory(torch.device("cpu")) // 2)
                where = f"{self.folder} is on a tmpfs, in memory: the passes may take {free} bytes (half the available)"
            if size and free - size - later < DISK_MARGIN:
                raise NoRoom(f"{where}; the passes need about {size + later} more")
            layers = {}
            for s in kept:
                r = records[s.name]
                layers[s.name] = _Layer(self._write(r.a), self._write(r.g), None if r.mask is None else r.mask.cpu(),
                                        r.half, r.calls, r.call, r.regrouped, r.selected)
            batches.append((start, n, layers))
            yield start, n, {s.name: records[s.name] for s in specs}
        try:
            self._file.flush()
        except OSError as exc:
            raise NoRoom(f"writing to {self.folder} failed ({exc})") from exc
        self._done[key] = batches

    def _write(self, t: Tensor) -> _Stored:
        t = t.detach().contiguous().cpu()
        stored = _Stored(self._file.tell(), tuple(t.shape), t.dtype)
        if t.numel():
            try:
                self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
            except OSError as exc:  # a quota or a file size limit: the free space said nothing of them
                raise NoRoom(f"writing to {self.folder} failed ({exc})") from exc
        self.bytes_written += t.nbytes
        return stored

    def _replay(self, batches, specs, device, progress):
        # Through the descriptor written to, not the file's name: the file outlives its folder's removal.
        fd = self._file.fileno()
        for start, n, layers in batches:
            records = {}
            for s in specs:
                m = layers[s.name]
                records[s.name] = Captured(
                    a=_read(fd, m.a).to(device), g=_read(fd, m.g).to(device),
                    mask=None if m.mask is None else m.mask.to(device), half=m.half, calls=m.calls,
                    call=m.call, regrouped=m.regrouped, selected=m.selected)
            yield start, n, records
            if progress is not None:
                progress.update(n)

    def close(self) -> None:
        _OPEN.discard(self)
        try:
            self._file.close()
        except OSError:  # its unwritten end (a full disk): the folder goes all the same
            pass
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PassCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(fd: int, stored: _Stored) -> Tensor:
    out = torch.empty(stored.shape, dtype=stored.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):  # a read returns at most about 2 GiB
        got = os.preadv(fd, [view[done:]], stored.offset + done)
        if got == 0:
            raise OSError("the passes' file was cut short (truncated by another process?)")
        done += got
    return out


def pass_of(passes: PassCache | None):
    """run_pass, or the cache's stand-in for it."""
    return run_pass if passes is None else passes.run

