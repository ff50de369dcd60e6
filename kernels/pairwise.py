"""Pairwise scores ⟨G_n, U_q⟩ in the parameter basis, G_n = Σ_t g_t a_tᵀ formed on chip only.

Each program owns a block of examples × a block of queries and walks (its share of) the (d_out, d_a)
tiles. Per tile it forms the BLOCK_E example tiles with one batched (3-D) tl.dot over tokens, flattens
them to (BLOCK_E, BLOCK_M·BLOCK_N) and multiplies by the matching (BLOCK_M·BLOCK_N, BLOCK_Q) slice of the
queries: the query contraction runs on tensor cores too, and each query tile is read once per example
block instead of once per example. Splits over the tile list write disjoint (n, q) slabs summed in a
fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _mma, autotune_configs, check_tokens, dot_precision, is_interpret, mask_u8, split_count

# Small tiles on purpose: the 3-D operand loads carry a 64-bit pointer per element, and larger tiles
# spill on sm_90 (tests/test_kernels_sm90.py records registers and spills per config).
_CONFIGS = [
    triton.Config({"BLOCK_E": e, "BLOCK_Q": 16, "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_T": bt}, num_warps=w, num_stages=2)
    for e, bn, bt, w in [(16, 32, 32, 8), (16, 16, 32, 4), (32, 16, 32, 8), (16, 32, 16, 4)]
]
# Extremes over the configs, for the split heuristic: fewest programs, most tiles.
_MAX_BLOCK_E, _MAX_BLOCK_Q = 32, 16
_MIN_TILE = (16, 16)


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["T", "d_out", "d_a", "Q"])
@triton.jit
def _pairwise_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, u_ptr, out_ptr,
    # Sizes
    n, T, d_out, d_a, Q,
    # Strides (elements)
    stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
    stride_uq, stride_um, stride_ud, stride_os, stride_on, stride_oq,
    # Meta-parameters
    HAS_MASK: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_e = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_split = tl.num_programs(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_M * BLOCK_N)  # (row, col) of a tile, flattened row-major
    e_ok = offs_e < n
    q_ok = offs_q < Q
    e64 = offs_e.to(tl.int64)  # e · stride overflows int32 for large n·t·d
    q64 = offs_q.to(tl.int64)
    tiles_n = tl.cdiv(d_a, BLOCK_N)
    n_tiles = tl.cdiv(d_out, BLOCK_M) * tiles_n
    acc = tl.zeros((BLOCK_E, BLOCK_Q), dtype=tl.float32)
    for tile_id in range(pid_s, n_tiles, n_split):
        offs_m = (tile_id // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile_id % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < d_out
        col_ok = offs_n < d_a
        tiles = tl.zeros((BLOCK_E, BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + offs_t
            tok = e_ok[:, None] & (t[None, :] < T)  # (BLOCK_E, BLOCK_T)
            if HAS_MASK:
                tok &= tl.load(mask_ptr + e64[:, None] * stride_mn + t[None, :] * stride_mt, mask=tok, other=0) != 0
            g_t = tl.load(  # (BLOCK_E, BLOCK_M, BLOCK_T): g transposed per example
                g_ptr + e64[:, None, None] * stride_gn + t[None, None, :] * stride_gt
                + offs_m[None, :, None] * stride_gd,
                mask=tok[:, None, :] & row_ok[None, :, None], other=0.0,
            )
            a = tl.load(  # (BLOCK_E, BLOCK_T, BLOCK_N)
                a_ptr + e64[:, None, None] * stride_an + t[None, :, None] * stride_at
                + offs_n[None, None, :] * stride_ad,
                mask=tok[:, :, None] & col_ok[None, None, :], other=0.0,
            )
            tiles = _mma(g_t, a, tiles, UPCAST_DOT, DOT_PRECISION)
        rows = (tile_id // tiles_n) * BLOCK_M + offs_k // BLOCK_N
        cols = (tile_id % tiles_n) * BLOCK_N + offs_k % BLOCK_N
        u = tl.load(  # (BLOCK_M·BLOCK_N, BLOCK_Q): the same tile of each query, flattened the same way
            u_ptr + q64[None, :] * stride_uq + rows[:, None] * stride_um + cols[:, None] * stride_ud,
            mask=q_ok[None, :] & (rows < d_out)[:, None] & (cols < d_a)[:, None], other=0.0,
        )
        # fp32 operands: TF32 for 16-bit inputs (the tiles are fp32 sums; rounding them to bf16 would
        # add error the same-precision torch path does not have), full fp32 when torch asks for it.
        acc = tl.dot(tl.reshape(tiles, (BLOCK_E, BLOCK_M * BLOCK_N)), u.to(tl.float32), acc,
                     input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + e64[:, None] * stride_on + q64[None, :] * stride_oq
    tl.store(out_ptrs, acc, mask=e_ok[:, None] & q_ok[None, :])


def pairwise_scores(
    a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """scores[n, q] = ⟨G_n, U_q⟩ = Σ_t g_tᵀ U_q a_t, with no G_n written to memory.

    a:    (n, t, d_a)       layer inputs, float32/float16/bfloat16, any strides
    g:    (n, t, d_out)     output gradients, same dtype
    u:    (q, d_out, d_a)   preconditioned queries, any float dtype (float32 from precondition_queries)
    mask: (n, t) or None; tokens with mask == 0 are dropped
    Returns (n, q) float32.
    """
    check_tokens(a, g, "a", "g")
    n, t, d_a = a.shape
    d_out = g.shape[2]
    if u.dim() != 3 or tuple(u.shape[1:]) != (d_out, d_a):
        raise ValueError(f"u must be (q, d_out, d_a) = (q, {d_out}, {d_a}); got {tuple(u.shape)}")
    if u.device != a.device:
        raise ValueError(f"u is on {u.device}, a on {a.device}")
    m = mask_u8(mask, n, t, a.device)
    q = u.shape[0]
    if n == 0 or q == 0 or t == 0 or d_out == 0 or d_a == 0:
        return torch.zeros((n, q), device=a.device, dtype=torch.float32)
    programs = triton.cdiv(n, _MAX_BLOCK_E) * triton.cdiv(q, _MAX_BLOCK_Q)
    tiles = triton.cdiv(d_out, _MIN_TILE[0]) * triton.cdiv(d_a, _MIN_TILE[1])
    split = split_count(programs, tiles, a.device)
    out = torch.empty((split, n, q), device=a.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_E"]), triton.cdiv(q, meta["BLOCK_Q"]), split)

    _pairwise_kernel[grid](
        a, g, m if m is not None else a, u, out,  # the mask pointer is unread without HAS_MASK
        n, t, d_out, d_a, q,
        *a.stride(), *g.stride(), *(m.stride() if m is not None else (0, 0)),
        *u.stride(), *out.stride(),
        HAS_MASK=m is not None, UPCAST_DOT=is_interpret(), DOT_PRECISION=dot_precision(a.dtype),
    )
    return out[0] if split == 1 else out.sum(0)
