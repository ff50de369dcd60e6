"""Self-influence: Σ_ij scale_ij (G̃_n)_ij² per example, the per-example tile formed in registers only.

Grid over (examples, splits of the tile list): each program walks its share of the (d_out, d_a) tiles
for one example and reduces scale ⊙ tile² to one number. Splits write disjoint slots of a tiny
(split, n) workspace summed in a fixed order, so the result is deterministic (no atomics).

One token per example (t == 1, MLPs) takes _self_scores_t1_kernel instead: Σ_j ã_j² ((g̃∘g̃) @ scale)_j,
one GEMM over d_out with an epilogue, no rank-one tiles padded to BLOCK_T tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _example_tile, _kept_examples, autotune_configs, check_tokens, dot_precision, int32_safe, is_interpret, mask_u8,
    split_count,
)

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8, num_stages=3),
]

# The split heuristic counts tiles at the smallest config's size (the most tiles any config has).
_MIN_BLOCK = 64


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["T", "d_out", "d_a"])
@triton.jit
def _self_scores_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, scale_ptr, out_ptr,
    # Sizes
    T, d_out, d_a,
    # Strides (elements)
    stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
    stride_sm, stride_sd, stride_os, stride_on,
    # Meta-parameters
    HAS_MASK: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    tiles_n = tl.cdiv(d_a, BLOCK_N)
    n_tiles = tl.cdiv(d_out, BLOCK_M) * tiles_n
    # Elementwise accumulator, reduced once at the end: one cross-thread reduction per program.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile_id in range(pid_s, n_tiles, n_split):
        offs_m = (tile_id // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile_id % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        tile = _example_tile(
            a_ptr, g_ptr, mask_ptr, i, offs_m, offs_n, T, d_out, d_a,
            stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
            HAS_MASK, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_T,
        )
        s_mask = (offs_m[:, None] < d_out) & (offs_n[None, :] < d_a)
        s = tl.load(scale_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sd, mask=s_mask, other=0.0)
        # Padded lanes of the tile are 0 · x, NaN where x is inf: keep them out (the reference gives +inf there).
        acc += tl.where(s_mask, s.to(tl.float32) * tile * tile, 0.0)
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + i.to(tl.int64) * stride_on, tl.sum(acc))


# One token per example. BLOCK_E × BLOCK_N is the MMA tile (examples × d_a columns), BLOCK_K the d_out
# step. The first config is the interpreter's and must not spill on sm_90; tiles past 64×64 take 8 warps: with
# 4, 128×64 sits at 240-255 registers (tests/test_kernels_sm90.py records them).
_T1_CONFIGS = [
    triton.Config({"BLOCK_E": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_E": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_E": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_E": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# Extremes over the T = 1 configs, for the split heuristic: fewest programs, most d_a blocks.
_T1_MAX_BLOCK_E, _T1_MIN_BLOCK_N = 128, 64


@triton.autotune(configs=autotune_configs(_T1_CONFIGS), key=["d_out", "d_a"])
@triton.jit
def _self_scores_t1_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, scale_ptr, out_ptr,
    # Sizes
    n, d_out, d_a,
    # Strides (elements): token 0 of each example only
    stride_an, stride_ad, stride_gn, stride_gd, stride_mn,
    stride_sm, stride_sd, stride_os, stride_on,
    # Meta-parameters
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per example: G̃_n = g̃_n ã_nᵀ is rank one, so Σ_ij scale_ij g̃_ni² ã_nj² =
    Σ_j ã_nj² ((g̃∘g̃) @ scale)_nj, a GEMM over d_out with an epilogue that multiplies by ã² and reduces
    over d_a: 2·n·d_out·d_a flops instead of forming n rank-one tiles padded from 1 token to BLOCK_T.

    Program (example block, split) walks its share of the d_a blocks; per block it forms
    (BLOCK_E, BLOCK_N) = (g̃∘g̃)[E, :] @ scale[:, N] and reduces ã²[E, N] ⊙ it over N into a per-example
    partial. Split partials go to disjoint slots of a (split, n) workspace summed in a fixed order.
    The squares are formed in fp32 on load and dotted as fp32, as in the T = 1 Λ kernel: squaring fp16
    in fp16 overflows above 256 and flushes values below 2.4e-4. The dot is TF32 for 16-bit inputs, and
    for fp32 inputs unless torch's matmul precision is "highest" (dot_precision)."""
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_e, e_ok, e64 = _kept_examples(mask_ptr, stride_mn, n, pid_e, BLOCK_E, HAS_MASK)
    offs_k = tl.arange(0, BLOCK_K)
    g_rows = g_ptr + e64[:, None] * stride_gn
    part = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for nb in range(pid_s, tl.cdiv(d_a, BLOCK_N), n_split):
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < d_a
        # ã is loaded ahead of the d_out loop: its latency hides behind the MMAs, and the epilogue stays in
        # the MMA layout on sm_90 (as in _pairwise_t1_kernel).
        a = tl.load(a_ptr + e64[:, None] * stride_an + offs_n[None, :] * stride_ad,
                    mask=e_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_out, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < d_out
            g = tl.load(g_rows + k[None, :] * stride_gd, mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            g = g.to(tl.float32)
            s = tl.load(scale_ptr + k[:, None] * stride_sm + offs_n[None, :] * stride_sd,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(g * g, s.to(tl.float32), acc, input_precision=DOT_PRECISION)
        a = a.to(tl.float32)
        part += tl.sum(tl.where(col_ok[None, :], acc * (a * a), 0.0), axis=1)  # padded columns: 0 · inf
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + e64 * stride_on, part, mask=offs_e < n)


def self_scores(
    a_rot: torch.Tensor, g_rot: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-example Σ_ij scale_ij (G̃_n)_ij², G̃_n = Σ_t g̃_t ã_tᵀ.

    a_rot: (n, t, d_a)   rotated layer inputs, float32/float16/bfloat16, any strides
    g_rot: (n, t, d_out) rotated output gradients, same dtype
    scale: (d_out, d_a)  per-entry weights (SOURCE F or the EK-FAC inverse), any float dtype
    mask:  (n, t) or None; tokens with mask == 0 are dropped
    Returns (n,) float32.
    """
    check_tokens(a_rot, g_rot, "a_rot", "g_rot")
    n, t, d_a = a_rot.shape
    d_out = g_rot.shape[2]
    if tuple(scale.shape) != (d_out, d_a):
        raise ValueError(f"scale must be (d_out, d_a) = ({d_out}, {d_a}); got {tuple(scale.shape)}")
    if scale.device != a_rot.device:
        raise ValueError(f"scale is on {scale.device}, a_rot on {a_rot.device}")
    m = mask_u8(mask, n, t, a_rot.device)
    if n == 0 or t == 0 or d_out == 0 or d_a == 0:
        return torch.zeros(n, device=a_rot.device, dtype=torch.float32)
    a_rot, g_rot = int32_safe(a_rot, "a_rot"), int32_safe(g_rot, "g_rot")
    scale = int32_safe(scale, "scale", ())
    if t == 1:
        return _self_scores_t1(a_rot, g_rot, scale, m)
    tiles = triton.cdiv(d_out, _MIN_BLOCK) * triton.cdiv(d_a, _MIN_BLOCK)
    split = split_count(n, tiles, a_rot.device)
    out = torch.empty((split, n), device=a_rot.device, dtype=torch.float32)
    _self_scores_kernel[(n, split)](
        a_rot, g_rot, m if m is not None else a_rot, scale, out,  # the mask pointer is unread without HAS_MASK
        t, d_out, d_a,
        *a_rot.stride(), *g_rot.stride(), *(m.stride() if m is not None else (0, 0)),
        *scale.stride(), *out.stride(),
        HAS_MASK=m is not None, UPCAST_DOT=is_interpret(), DOT_PRECISION=dot_precision(a_rot.dtype),
    )
    return out[0] if split == 1 else out.sum(0)


def _self_scores_t1(
    a_rot: torch.Tensor, g_rot: torch.Tensor, scale: torch.Tensor, m: torch.Tensor | None
) -> torch.Tensor:
    """self_scores for one token per example (checked, non-empty arguments): see _self_scores_t1_kernel."""
    n, _, d_a = a_rot.shape
    d_out = g_rot.shape[2]
    split = split_count(triton.cdiv(n, _T1_MAX_BLOCK_E), triton.cdiv(d_a, _T1_MIN_BLOCK_N), a_rot.device)
    out = torch.empty((split, n), device=a_rot.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_E"]), split)

    _self_scores_t1_kernel[grid](
        a_rot, g_rot, m if m is not None else a_rot, scale, out,  # the mask pointer is unread without HAS_MASK
        n, d_out, d_a,
        a_rot.stride(0), a_rot.stride(2), g_rot.stride(0), g_rot.stride(2), m.stride(0) if m is not None else 0,
        *scale.stride(), *out.stride(),
        HAS_MASK=m is not None, DOT_PRECISION=dot_precision(a_rot.dtype),
    )
    return out[0] if split == 1 else out.sum(0)
