"""Loads the optional native extension `source_fast._C` and remembers why it is missing."""

from __future__ import annotations

import importlib.util
import os

import torch  # must come first: _C links against libtorch/libc10

_C = None
load_error: str | None = None
# Not even loaded when disabled at import (a broken build must be avoidable); _dispatch also reads the
# switch at every call, so setting it later takes effect too.
if os.environ.get("SOURCE_FAST_DISABLE_EXT") == "1":
    load_error = "disabled by SOURCE_FAST_DISABLE_EXT=1 when source_fast was imported"
elif importlib.util.find_spec("source_fast._C") is None:
    # (Importing it anyway would report "a circular import", Python's words for a missing submodule
    # while its package initialises.)
    load_error = ("not built: install with `pip install --no-build-isolation` and a C++ compiler "
                  "(SOURCE_FAST_REQUIRE_EXT=1 shows why a build fails)")
else:
    try:
        from source_fast import _C  # type: ignore[attr-defined, no-redef]
    except ImportError as exc:  # built, but for another torch, say
        load_error = f"{type(exc).__name__}: {exc}"


def has_op(name: str, device_type: str) -> bool:
    """Whether `torch.ops.source_fast.<name>` has a compiled kernel for this device type."""
    if _C is None:
        return False
    op = getattr(torch.ops.source_fast, name, None)
    if op is None:
        return False
    key = {"cuda": "CUDA", "cpu": "CPU"}.get(device_type)
    return key is not None and op.default.has_kernel_for_dispatch_key(key)


def build_info() -> dict | None:
    return None if _C is None else dict(_C.build_info())
