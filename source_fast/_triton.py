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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device (cuda:1 tensors while
    cuda:0 is current would otherwise run on the wrong GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def kernels():
    import source_fast.kernels as k  # decorates the @triton.jit functions now

    return k
