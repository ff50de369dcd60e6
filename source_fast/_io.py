"""Atomic writes: build a file or folder under a temporary name in the target folder, then rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask. Linux reports it in /proc without changing it; elsewhere it can only be read
    by setting it and putting it back, which a thread creating a file in between would see."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The permissions open()/mkdir() would give a new file/folder: 0666/0777 less the umask.
    mkstemp and mkdtemp create theirs private (0600/0700), so results are set to this before the rename."""
    return (0o777 if directory else 0o666) & ~_umask()


def _fsync(path: str | os.PathLike) -> None:
    """Flushes a file's data, or a folder's entries, to the disk. A rename is atomic but not durable:
    after a power cut the new name can point at a file whose data never reached the disk (an empty
    manifest or factor file), unless the data is synced before the rename and the folder after it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder; the data itself was synced
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


# The temp files of our atomic writes: `.NAME.sf-XXXXXXXX.tmp`. The mark keeps a user's own `.draft.tmp`, in a
# folder given to source_fast, out of what a killed run's leftovers are cleared with (remove_stale_temps).
TEMP_MARK = ".sf-"


def own_temps(name: str = "*") -> str:
    """The glob of our atomic writes' temp files for `name` (any name by default)."""
    return f".{name}{TEMP_MARK}*.tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_mode())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _say_writing(exc, path)
        raise


def write_named_by_content(folder: Path, stem: str, suffix: str, write: Callable[[Path], None]) -> tuple[str, str]:
    """Writes a file with `write(temporary path)` and renames it to `<stem>.<sha256[:16]><suffix>` in
    `folder`: a file of that name is complete whenever it exists, so a small index file renamed after
    it can be the single commit point of a save. Returns (the file's name, its sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}{TEMP_MARK}", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(Path(tmp))
        digest = sha256_file(tmp)
        name = f"{stem}.{digest[:16]}{suffix}"
        os.chmod(tmp, default_mode())
        _fsync(tmp)
        os.replace(tmp, folder / name)
        _fsync(folder)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _say_writing(exc, folder / f"{stem}.*{suffix}")
        raise
    return name, digest


def note(exc: BaseException, text: str) -> None:
    """Adds where source_fast was to an exception, beside its own words (Python 3.11+; one that takes no
    notes, with __notes__ not a list, say, goes on without)."""
    with contextlib.suppress(Exception):
        exc.add_note(text)


def _say_writing(exc: BaseException, path: Path) -> None:
    """A full disk's or a quota's error from a writer (safetensors' says only "No space left on device")
    names the file being written."""
    if isinstance(exc, Exception):  # not an interrupt
        note(exc, f"source_fast: while writing {path}")


NO_FLOCK = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL)  # a file system without locks (Lustre)


@contextlib.contextmanager
def folder_lock(folder: Path, name: str) -> Iterator[bool]:
    """An exclusive lock on `folder/name` (POSIX flock) while the block runs: writers of one folder,
    in threads or processes, take turns. The lock file stays (removing it would let a waiter lock a
    file that is gone). Yields whether it is held: where flock does not exist (no fcntl, or a file
    system without locks) the block runs unlocked, and must not delete what another writer may be
    writing."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(folder / name, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            locked = False
        if not locked:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# safetensors' save_file writes `.tmpXXXXXX` beside the path it is given, then renames it there: a kill
# in between leaves one, which the temps of our own atomic writes (`.NAME.XXXX.tmp`) do not match.
SAFETENSORS_TEMP = ".tmp??????"


def remove_stale_temps(folder: Path, *patterns: str) -> None:
    """Deletes the temp files of atomic writes that a killed process never renamed (call it only while
    no live writer of the folder can have some: under its lock, or before any rank writes). A name
    like safetensors' temps is not enough (a user's `.tmpfiles` is one): the file must also be empty
    or start as a safetensors file does."""
    for pattern in patterns:
        for stale in folder.glob(pattern):
            if stale.is_file() and (not fnmatch.fnmatch(stale.name, SAFETENSORS_TEMP) or _safetensors_start(stale)):
                stale.unlink(missing_ok=True)


def _safetensors_start(path: Path) -> bool:
    """Empty or zeros (safetensors sizes its temp file before writing it), or an 8-byte little-endian
    header length followed by the header's JSON `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return not head.strip(b"\0") or (len(head) == 9 and head[8:] == b"{")


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where
    the C library or the file system does not offer it."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without it
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def check_folder(path: str | os.PathLike, what: str) -> None:
    """Refuses, before any work, an output folder that is a file (it would fail only when written)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{what} {os.fspath(path)!r} is a file; give a folder (new or from the same run)")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path`; it takes `path`'s place only if the block succeeds.

    A new `path` appears in one rename. An existing one is exchanged with the new folder in one atomic
    step where Linux renameat2(RENAME_EXCHANGE) is available (readers see the old or the new folder,
    never a mix or nothing), then deleted; elsewhere it is moved aside first, so `path` is missing for
    the moment between the two renames. A crash before the swap leaves a hidden `.<name>.*.tmp` folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        for inner in [*tmp.rglob("*"), tmp]:
            _fsync(inner)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # it holds the old folder now
        else:
            # A non-empty folder cannot be renamed over: move the old one aside, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
