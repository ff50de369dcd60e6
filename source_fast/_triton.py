"""Lazy access to the Triton kernels (`source_fast.kernels`).

Triton decides between compiling and interpreting when `@triton.jit` runs, i.e. when the kernel
module is imported, so nothing imports it before first use (TRITON_INTERPRET must be settled by then).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.cache
def import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


_imported_interpreted: bool | None = None  # the mode the kernels were decorated in, once imported


def interpreting() -> bool:
    """Whether the kernels run interpreted: fixed when they are imported, the environment's setting before."""
    if _imported_interpreted is not None:
        return _imported_interpreted
    return os.environ.get("TRITON_INTERPRET") == "1"


def late_mode_change() -> str | None:
    """Why TRITON_INTERPRET as set now does not apply: it changed after the kernels were imported."""
    now = os.environ.get("TRITON_INTERPRET") == "1"
    if _imported_interpreted is None or now == _imported_interpreted:
        return None
    return (f"TRITON_INTERPRET is {'1' if now else 'unset'} now, but source_fast.kernels was imported "
            f"{'interpreted' if _imported_interpreted else 'compiled'}, which Triton fixes at import: set it before "
            "the first kernel call")


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device (cuda:1 tensors while
    cuda:0 is current would otherwise run on the wrong GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def kernels():
    global _imported_interpreted
    import source_fast.kernels as k  # decorates the @triton.jit functions now
    from source_fast.kernels._common import is_interpret

    _imported_interpreted = is_interpret()
    return k
