"""Chooses the backend for each op: "torch" (reference), "triton" (source_fast.kernels) or "ext"
(torch.ops.source_fast from the C++/CUDA extension).

auto picks the first backend in PRIORITY[op] that has no unsupported reasons; a forced backend
runs or raises NotImplementedError listing the reasons, never falls back silently.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, get_args

import torch

from . import _ext, _triton

Backend = Literal["torch", "triton", "ext"]
BackendArg = Literal["auto", "torch", "triton", "ext"]

PRIORITY: dict[str, tuple[Backend, ...]] = {
    "covariance_accumulate_": ("ext", "torch"),
    "accumulate_lambda_": ("triton", "torch"),
    "self_scores": ("triton", "torch"),
    "pairwise_scores": ("triton", "torch"),
}

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _global_backend() -> str | None:
    value = os.environ.get("SOURCE_FAST_BACKEND")
    if value in (None, ""):
        return None
    if value != "torch":
        raise ValueError(f"SOURCE_FAST_BACKEND={value!r} is not valid; the only valid value is 'torch'")
    return value


def env_flag(name: str) -> bool:
    """An on/off switch from the environment: 1 is on, 0 or unset off; anything else is refused rather
    than read as off (SOURCE_FAST_DISABLE_TRITON=true must not leave Triton on unnoticed)."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r} is not valid: use 1 (on), or 0 or unset (off)")
    return value == "1"


def unsupported_reasons(backend: Backend, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why `backend` cannot run `op` here (empty list: it can)."""
    if op not in PRIORITY:
        raise ValueError(f"unknown op {op!r}; valid: {sorted(PRIORITY)}")
    if backend == "torch":
        return []
    reasons = []
    if backend not in PRIORITY[op]:
        reasons.append(f"{op} has no {backend} implementation")
    if backend == "triton":
        if env_flag("SOURCE_FAST_DISABLE_TRITON"):
            reasons.append("disabled by SOURCE_FAST_DISABLE_TRITON=1")
        err = _triton.import_error()
        if err:
            reasons.append(err)
        if device.type != "cuda" and not (device.type == "cpu" and _triton.interpreting()):
            late = _triton.late_mode_change()
            reasons.append(f"device is {device.type}, and Triton runs on CUDA (or on CPU under TRITON_INTERPRET=1)"
                           + (f"; {late}" if late else ""))
        if dtype not in _KERNEL_DTYPES:
            reasons.append(f"dtype {dtype} is not one of float32/float16/bfloat16")
        if dtype == torch.bfloat16 and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            reasons.append("bfloat16 needs compute capability 8.0 or newer")
    elif backend == "ext":
        if env_flag("SOURCE_FAST_DISABLE_EXT"):
            reasons.append("disabled by SOURCE_FAST_DISABLE_EXT=1")
        if dtype not in _KERNEL_DTYPES:
            reasons.append(f"dtype {dtype} is not one of float32/float16/bfloat16")
        if _ext.load_error:
            reasons.append(f"extension not loaded: {_ext.load_error}")
        elif not _ext.has_op(op, device.type):
            reasons.append(f"extension was built without a {device.type} kernel for {op}")
    return reasons


@functools.lru_cache(maxsize=None)
def _auto(op: str, device_type: str, device_index: int | None, dtype: torch.dtype, flags: tuple) -> Backend:
    """`flags` (the environment switches unsupported_reasons reads) are part of the cache key, so
    setting one after a first call still takes effect."""
    del flags
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    for backend in PRIORITY[op]:
        # auto never picks the Triton interpreter, not even for CUDA tensors: it is for tests, copies
        # CUDA tensors to the host and back, and is far slower than torch.
        if backend == "triton" and (device.type != "cuda" or _triton.interpreting()):
            continue
        if not unsupported_reasons(backend, op, device, dtype):
            return backend
    return "torch"


def why_not_auto(backend: Backend, op: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the automatic choice does not take `backend` for `op` here (for `source_fast.info`)."""
    if _global_backend() == "torch" and backend != "torch":
        return ["SOURCE_FAST_BACKEND=torch"]
    reasons = unsupported_reasons(backend, op, device, dtype)
    if not reasons and backend == "triton" and (device.type != "cuda" or _triton.interpreting()):
        reasons.append("auto never uses the Triton interpreter")
    chosen = select(op, device, dtype)
    if not reasons and PRIORITY[op].index(backend) > PRIORITY[op].index(chosen):
        reasons.append(f"{chosen} comes first for {op}")
    return reasons


def check_backend(backend: str) -> None:
    if backend not in get_args(BackendArg):
        raise ValueError(f"unknown backend {backend!r}; valid: {sorted(get_args(BackendArg))}")


def select(op: str, device: torch.device, dtype: torch.dtype, backend: BackendArg = "auto") -> Backend:
    check_backend(backend)
    if backend == "auto":
        # SOURCE_FAST_BACKEND=torch forces the reference for every automatic choice (debugging).
        if _global_backend() == "torch":
            return "torch"
        flags = (env_flag("SOURCE_FAST_DISABLE_TRITON"), env_flag("SOURCE_FAST_DISABLE_EXT"), _triton.interpreting())
        return _auto(op, device.type, device.index, dtype, flags)
    reasons = unsupported_reasons(backend, op, device, dtype)
    if reasons:
        raise NotImplementedError(
            f"backend {backend!r} cannot run {op} on {device} with {dtype}: " + "; ".join(reasons)
        )
    return backend
