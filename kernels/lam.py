"""Λ accumulation: lam += alpha · Σ_n (G̃_n)², G̃_n = Σ_t g̃_t ã_tᵀ, without writing any G̃_n to memory.

Grid over (d_out, d_a) tiles; each program walks the examples, forms the example's tile in registers
(a tl.dot over tokens), squares it and accumulates in fp32. When the tile grid alone cannot fill the
GPU, the examples are split over a third grid axis into a small fp32 workspace (one (d_out, d_a) slab
per split, summed in a fixed order afterwards), which keeps the result deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    _example_tile, autotune_configs, check_tokens, dot_precision, int32_safe, is_interpret, mask_u8, split_count,
)

# Sizes the split heuristic assumes: the largest tile in the configs below (fewest programs).
_MAX_BLOCK = 128

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
]


# restore_value: with one split the kernel adds into lam in place, and autotuning runs it repeatedly.
@triton.autotune(configs=autotune_configs(_CONFIGS), key=["T", "d_out", "d_a", "ACCUMULATE"], restore_value=["out_ptr"])
@triton.jit
def _lambda_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, out_ptr,
    # Sizes
    n, T, d_out, d_a,
    # Strides (elements)
    stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
    stride_os, stride_om, stride_od,
    # Scalars
    alpha,
    # Meta-parameters
    HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(pid_s, n, n_split):
        tile = _example_tile(
            a_ptr, g_ptr, mask_ptr, i, offs_m, offs_n, T, d_out, d_a,
            stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
            HAS_MASK, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_T,
        )
        acc += tile * tile
    acc *= alpha
    out_mask = (offs_m[:, None] < d_out) & (offs_n[None, :] < d_a)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_od
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


_T1_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]


@triton.autotune(configs=autotune_configs(_T1_CONFIGS), key=["d_out", "d_a", "ACCUMULATE"], restore_value=["out_ptr"])
@triton.jit
def _lambda_t1_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, out_ptr,
    # Sizes
    n, d_out, d_a,
    # Strides (elements): token 0 of each example only
    stride_an, stride_ad, stride_gn, stride_gd, stride_mn,
    stride_os, stride_om, stride_od,
    # Scalars
    alpha,
    # Meta-parameters
    HAS_MASK: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per example: Σ_n (g_n ⊗ a_n)² = (g∘g)ᵀ (a∘a), a GEMM whose K dimension is the examples.
    The squares are formed in fp32 and dotted as fp32: squaring fp16 in fp16 overflows above 256 and
    flushes gradients below 2.4e-4 to zero. The dot is TF32 for 16-bit inputs (dot_precision), and for
    fp32 inputs unless torch's matmul precision is "highest"."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < d_out
    col_ok = offs_n < d_a
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_s * BLOCK_K, n, n_split * BLOCK_K):
        k = k0 + offs_k
        ok = k < n
        k = k.to(tl.int64)
        if HAS_MASK:
            ok &= tl.load(mask_ptr + k * stride_mn, mask=ok, other=0) != 0
        g_t = tl.load(g_ptr + k[None, :] * stride_gn + offs_m[:, None] * stride_gd,
                      mask=row_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + k[:, None] * stride_an + offs_n[None, :] * stride_ad,
                    mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g_t * g_t, a * a, acc, input_precision=DOT_PRECISION)
    acc *= alpha
    out_mask = row_ok[:, None] & col_ok[None, :]
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_od
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, acc, mask=out_mask)


def accumulate_lambda_(
    lam: torch.Tensor, a_rot: torch.Tensor, g_rot: torch.Tensor, mask: torch.Tensor | None = None, alpha: float = 1.0
) -> None:
    """lam += alpha · Σ_n (G̃_n)² elementwise, G̃_n = Σ_t g̃_t ã_tᵀ (no G̃_n is written to memory).

    lam:   (d_out, d_a) float32, updated in place
    a_rot: (n, t, d_a)   rotated layer inputs, float32/float16/bfloat16, any strides
    g_rot: (n, t, d_out) rotated output gradients, same dtype
    mask:  (n, t) or None; tokens with mask == 0 are dropped
    """
    check_tokens(a_rot, g_rot, "a_rot", "g_rot")
    n, t, d_a = a_rot.shape
    d_out = g_rot.shape[2]
    if lam.dtype != torch.float32 or tuple(lam.shape) != (d_out, d_a):
        raise ValueError(f"lam must be float32 ({d_out}, {d_a}); got {lam.dtype} {tuple(lam.shape)}")
    if lam.device != a_rot.device:
        raise ValueError(f"lam is on {lam.device}, a_rot on {a_rot.device}")
    if not math.isfinite(alpha) or abs(alpha) > torch.finfo(torch.float32).max:  # the kernel scales in float32
        raise ValueError(f"accumulate_lambda_: alpha must be finite (in float32), got {alpha}")
    m = mask_u8(mask, n, t, a_rot.device)
    if n == 0 or t == 0 or d_out == 0 or d_a == 0:
        return
    a_rot, g_rot = int32_safe(a_rot, "a_rot"), int32_safe(g_rot, "g_rot")
    int32_safe(lam, "lam", (), copy=False)
    tiles = triton.cdiv(d_out, _MAX_BLOCK) * triton.cdiv(d_a, _MAX_BLOCK)
    if t == 1:
        split = split_count(tiles, triton.cdiv(n, 32), a_rot.device)
    else:
        split = split_count(tiles, n, a_rot.device)
    # One split adds straight into lam; several write disjoint fp32 slabs that are summed in a fixed order.
    out = lam if split == 1 else torch.empty((split, d_out, d_a), device=lam.device, dtype=torch.float32)
    mask_arg = m if m is not None else a_rot  # never read when HAS_MASK is False
    m_strides = m.stride() if m is not None else (0, 0)
    out_strides = (0, *lam.stride()) if split == 1 else out.stride()

    def grid(meta):
        return (triton.cdiv(d_out, meta["BLOCK_M"]), triton.cdiv(d_a, meta["BLOCK_N"]), split)

    if t == 1:
        _lambda_t1_kernel[grid](
            a_rot, g_rot, mask_arg, out,
            n, d_out, d_a,
            a_rot.stride(0), a_rot.stride(2), g_rot.stride(0), g_rot.stride(2), m_strides[0],
            *out_strides,
            float(alpha),
            HAS_MASK=m is not None, ACCUMULATE=split == 1,
            DOT_PRECISION=dot_precision(a_rot.dtype),
        )
    else:
        _lambda_kernel[grid](
            a_rot, g_rot, mask_arg, out,
            n, t, d_out, d_a,
            *a_rot.stride(), *g_rot.stride(), *m_strides,
            *out_strides,
            float(alpha),
            HAS_MASK=m is not None, ACCUMULATE=split == 1,
            UPCAST_DOT=is_interpret(), DOT_PRECISION=dot_precision(a_rot.dtype),
        )
    if split > 1:
        lam.add_(out.sum(0))
