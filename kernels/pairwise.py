"""Pairwise scores ⟨G_n, U_q⟩ in the parameter basis, G_n = Σ_t g_t a_tᵀ formed on chip only.

Each program owns a block of examples × a block of queries and walks (its share of) the (d_out, d_a)
tiles. Per tile it forms the BLOCK_E example tiles with one batched (3-D) tl.dot over tokens, flattens
them to (BLOCK_E, BLOCK_M·BLOCK_N) and multiplies by the matching (BLOCK_M·BLOCK_N, BLOCK_Q) slice of the
queries: the query contraction runs on tensor cores too, and each query tile is read once per example
block instead of once per example. Splits over the tile list write disjoint (n, q) slabs summed in a
fixed order (deterministic, no atomics).

One token per example (t == 1, MLPs) takes _pairwise_t1_kernel instead: there G_n is rank one and the
scores are g_nᵀ (U_q a_n), one GEMM per query with a row-dot epilogue, no token padding. So does a single
query (q == 1) at any t, with every token a row and the rows summed per example.

Long sequences can take _pairwise_gemm_kernel (opt-in, SOURCE_FAST_PAIRWISE_GEMM=1, until a GPU timing
decides; see _use_gemm_kernel): one example's (BLOCK_M, BLOCK_N) tile of G_n per program, a plain 2-D
GEMM over tokens that lowers to wgmma on sm_90 (the 3-D batched dots above lower to mma.sync), then an
epilogue that dots the tile with each query's matching block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from source_fast._dispatch import env_flag

from ._common import (
    MAX_GRID_X, MAX_GRID_YZ, _example_tile, _kept_examples, _mma, autotune_configs, check_tokens, dot_precision, int32_safe,
    is_interpret, mask_u8, split_count,
)

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
        # Padded rows and columns of the tiles are 0 · x, NaN where an example holds an inf: zero them, as
        # the padded U entries they meet are 0 (0 · NaN would poison the example's scores).
        flat = tl.where(((rows < d_out) & (cols < d_a))[None, :], tl.reshape(tiles, (BLOCK_E, BLOCK_M * BLOCK_N)), 0.0)
        acc = tl.dot(flat, u.to(tl.float32), acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + e64[:, None] * stride_on + q64[None, :] * stride_oq
    tl.store(out_ptrs, acc, mask=e_ok[:, None] & q_ok[None, :])


# One token per example. BLOCK_E × BLOCK_M is the MMA tile (examples × d_out rows of one query), BLOCK_K
# the d_a step. The first config is the interpreter's and must not spill on sm_90; tiles past 64×64 take 8
# warps: with 4, 128×64 sits at 240-255 registers (tests/test_kernels_sm90.py records them).
_T1_CONFIGS = [
    triton.Config({"BLOCK_E": 64, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_E": 128, "BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_E": 128, "BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_E": 64, "BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
# Extremes over the T = 1 configs, for the split heuristic: fewest programs, most d_out blocks.
_T1_MAX_BLOCK_E, _T1_MIN_BLOCK_M = 128, 64


@triton.autotune(configs=autotune_configs(_T1_CONFIGS), key=["d_out", "d_a", "Q"])
@triton.jit
def _pairwise_t1_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, u_ptr, out_ptr,
    # Sizes
    n, d_out, d_a, Q,
    # Strides (elements): token 0 of each example only
    stride_an, stride_ad, stride_gn, stride_gd, stride_mn,
    stride_uq, stride_um, stride_ud, stride_os, stride_on, stride_oq,
    # Meta-parameters
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One token per example: scores[n, q] = g_nᵀ (U_q a_n), a GEMM with a row-dot epilogue.

    Program ((query, example block), split) walks its share of the d_out blocks; per block it forms
    (BLOCK_E, BLOCK_M) = a[E, :] @ U_q[M, :]ᵀ over d_a (a real MMA tile, where the token-tile kernel would
    pad one token to BLOCK_T), multiplies by g[E, M] and reduces over M into a per-example partial. The
    split partials go to disjoint (n, q) slabs summed in a fixed order (deterministic, no atomics).
    Consecutive programs share the query and the d_out blocks, so each U_q block is read from HBM about
    once and then from L2 by the other example blocks.

    Precision: U is fp32, so the dot takes fp32 operands, TF32 for 16-bit inputs (the rule of the token
    kernel's query contraction), full fp32 when torch's matmul precision is "highest". bf16 and fp16 values
    are exact in TF32 (8 and 11 significant bits, within TF32's 11 and its 8-bit exponent), so for 16-bit
    inputs only U is rounded (TF32 keeps 2^-10 relative or better); rounding U to bf16 instead, for a bf16
    MMA at twice the rate, would cost 2^-8, and fp16 cannot hold U's range. Both operands are fp32 here,
    so the interpreter needs no upcast (_mma)."""
    # Axis 0 is (query, example block), example blocks fastest: no 65535 limit on the number of queries,
    # and neighbouring programs read the same U_q blocks.
    blocks_e = tl.cdiv(n, BLOCK_E)
    pid = tl.program_id(0)
    pid_e = pid % blocks_e
    q = (pid // blocks_e).to(tl.int64)  # q · stride_uq overflows int32 for large q·d_out·d_a
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_e, e_ok, e64 = _kept_examples(mask_ptr, stride_mn, n, pid_e, BLOCK_E, HAS_MASK)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + e64[:, None] * stride_an
    u_q = u_ptr + q * stride_uq
    part = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for mb in range(pid_s, tl.cdiv(d_out, BLOCK_M), n_split):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < d_out
        # g is loaded ahead of the d_a loop: its latency hides behind the MMAs, and on sm_90 the product
        # and row sum then stay in the MMA layout (loaded after the loop, Triton converted the fp32
        # (BLOCK_E, BLOCK_M) product to the load's layout through shared memory, and 27 more registers).
        g = tl.load(g_ptr + e64[:, None] * stride_gn + offs_m[None, :] * stride_gd,
                    mask=e_ok[:, None] & row_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_E, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, d_a, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < d_a
            a = tl.load(a_rows + k[None, :] * stride_ad, mask=e_ok[:, None] & k_ok[None, :], other=0.0)
            u = tl.load(u_q + offs_m[:, None] * stride_um + k[None, :] * stride_ud,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a.to(tl.float32), tl.trans(u.to(tl.float32)), acc, input_precision=DOT_PRECISION)
        part += tl.sum(tl.where(row_ok[None, :], acc * g.to(tl.float32), 0.0), axis=1)  # padded rows: 0 · inf
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + e64 * stride_on + q * stride_oq
    tl.store(out_ptrs, part, mask=offs_e < n)


# One example's tile per program. BLOCK_M × BLOCK_N is the wgmma tile of G_n (d_out rows × d_a columns),
# BLOCK_T the token step (the GEMM's K). The first config is the interpreter's and must not spill on sm_90
# (tests/test_kernels_sm90.py records registers and spills per config).
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_T": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_T": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_T": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_T": 64}, num_warps=4, num_stages=4),
]
# The smallest tile over the configs: the most tiles, which sizes the partials buffer.
_GEMM_MIN_BLOCK = 64


@triton.autotune(configs=autotune_configs(_GEMM_CONFIGS), key=["T", "d_out", "d_a", "Q"])
@triton.jit
def _pairwise_gemm_kernel(
    # Pointers
    a_ptr, g_ptr, mask_ptr, u_ptr, out_ptr,
    # Sizes
    n, T, d_out, d_a, Q,
    # Strides (elements)
    stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
    stride_uq, stride_um, stride_ud, stride_os, stride_on, stride_oq,
    # Meta-parameters
    HAS_MASK: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Long sequences: program (tile, example) forms one (BLOCK_M, BLOCK_N) tile of G_n = Σ_t g_t a_tᵀ as a
    2-D GEMM over tokens (16-bit operands straight into wgmma, fp32 accumulator; dropped tokens load as 0),
    then, per query, Σ tile ⊙ U_q[tile] in fp32 into out[tile, n, q]. Each (tile, example, query) slot is
    written by exactly one program and the launcher sums the tiles in a fixed order: deterministic, no
    atomics.

    One grid axis, examples fastest: the programs resident together hold the same tiles of several
    examples, so each U_q block comes from HBM about once and from L2 for the other examples. U is the
    larger operand per tile: q·BLOCK_M·BLOCK_N·4 bytes (1 MiB at q = 16, 128×128) against the tokens'
    t·(BLOCK_M + BLOCK_N)·2 (256 KiB at t = 512, bf16), which one example's tiles would share instead
    (tiles fastest). The one axis also has no 65535 limit (grid axes 1 and 2).

    Precision: the epilogue is fp32 FMA on fp32 operands (no TF32 rounding of U, unlike the tile kernel's
    query contraction); the tile GEMM is exact products with fp32 sums for 16-bit inputs, TF32 or full
    fp32 for fp32 inputs as torch's matmul precision says (dot_precision)."""
    pid = tl.program_id(0)
    i = pid % n
    tile_id = pid // n
    tiles_n = tl.cdiv(d_a, BLOCK_N)
    offs_m = (tile_id // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile_id % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = _example_tile(
        a_ptr, g_ptr, mask_ptr, i, offs_m, offs_n, T, d_out, d_a,
        stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
        HAS_MASK, UPCAST_DOT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_T,
    )
    # The epilogue works on the tile flattened, in the 1-D layout of the U loads: Triton then converts the
    # tile once, here, where a 2-D product kept it in the MMA layout and converted every U_q block through
    # shared memory inside the query loop (64 KiB per query at 128×128; seen in the sm_90 TTGIR, Triton 3.6
    # and 3.9), which would cost the shared-memory bandwidth the U loads need.
    offs_k = tl.arange(0, BLOCK_M * BLOCK_N)
    rows = (tile_id // tiles_n) * BLOCK_M + offs_k // BLOCK_N
    cols = (tile_id % tiles_n) * BLOCK_N + offs_k % BLOCK_N
    flat = tl.reshape(tile, (BLOCK_M * BLOCK_N,))
    # 32-bit offsets within one query (int32_safe) and a scalar base pointer stepped per query: a block of
    # 64-bit pointers would take two registers per element next to the fp32 tile.
    u_offs = rows * stride_um + cols * stride_ud
    u_ok = (rows < d_out) & (cols < d_a)
    u_q = u_ptr
    out_q = out_ptr + tile_id.to(tl.int64) * stride_os + i.to(tl.int64) * stride_on  # tiles·n·q may pass 2^31
    # U_q+1 is loaded before U_q is reduced (the launcher has Q ≥ 1): the U reads bound this kernel, and with
    # one CTA of a 128×128 config per SM only one query's block would be in flight otherwise.
    u = tl.load(u_q + u_offs, mask=u_ok, other=0.0)
    for _ in range(1, Q):
        u_q += stride_uq
        u_next = tl.load(u_q + u_offs, mask=u_ok, other=0.0)
        tl.store(out_q, tl.sum(tl.where(u_ok, flat * u.to(tl.float32), 0.0)))  # padded lanes: 0 · inf
        out_q += stride_oq
        u = u_next
    tl.store(out_q, tl.sum(tl.where(u_ok, flat * u.to(tl.float32), 0.0)))


def pairwise_scores(
    a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """scores[n, q] = ⟨G_n, U_q⟩ = Σ_t g_tᵀ U_q a_t, with no G_n written to memory.

    a:    (n, t, d_a)       layer inputs, float32/float16/bfloat16, any strides
    g:    (n, t, d_out)     output gradients, same dtype
    u:    (q, d_out, d_a)   preconditioned queries, any float dtype (the engine's preconditioned queries are float32)
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
    a, g, u = int32_safe(a, "a"), int32_safe(g, "g"), int32_safe(u, "u")
    if t == 1:
        return _pairwise_scores_t1(a, g, u, m)
    if q == 1:
        # One query: the token sum Σ_t g_tᵀ (U a_t) costs t·d_out·d_a against (t + 1)·d_out·d_a for the
        # per-example tiles, and runs as full GEMM tiles: every token is a row of the one-token kernel.
        rows = _pairwise_scores_t1(a.reshape(n * t, 1, d_a), g.reshape(n * t, 1, d_out), u,
                                   None if m is None else m.reshape(n * t, 1))
        return rows.view(n, t).sum(1, keepdim=True)
    if _use_gemm_kernel(t, d_out, d_a, q):
        return _pairwise_scores_gemm(a, g, u, m)
    # Query blocks go on grid axis 1: more than MAX_GRID_YZ of them run as several launches.
    chunk = MAX_GRID_YZ * _MAX_BLOCK_Q
    if q > chunk:
        return torch.cat([pairwise_scores(a, g, u[s : s + chunk], mask) for s in range(0, q, chunk)], dim=1)
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


def _pairwise_scores_t1(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """pairwise_scores for one token per example (checked, non-empty arguments): see _pairwise_t1_kernel."""
    n, _, d_a = a.shape
    q, d_out = u.shape[0], u.shape[1]
    programs = triton.cdiv(n, _T1_MAX_BLOCK_E) * q
    split = split_count(programs, triton.cdiv(d_out, _T1_MIN_BLOCK_M), a.device)
    out = torch.empty((split, n, q), device=a.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_E"]) * q, split)

    _pairwise_t1_kernel[grid](
        a, g, m if m is not None else a, u, out,  # the mask pointer is unread without HAS_MASK
        n, d_out, d_a, q,
        a.stride(0), a.stride(2), g.stride(0), g.stride(2), m.stride(0) if m is not None else 0,
        *u.stride(), *out.stride(),
        HAS_MASK=m is not None, DOT_PRECISION=dot_precision(a.dtype),
    )
    return out[0] if split == 1 else out.sum(0)


# When _pairwise_gemm_kernel takes a call (with SOURCE_FAST_PAIRWISE_GEMM=1; see _use_gemm_kernel).
_GEMM_MIN_T = 64  # tokens: the K of its tile GEMM
_GEMM_MIN_D = 64  # d_out and d_a: one full tile of the smallest config
_GEMM_TOKENS_PER_QUERY = 8  # t / q: the tile GEMM against the epilogue's U traffic


def _use_gemm_kernel(t: int, d_out: int, d_a: int, q: int) -> bool:
    """Whether pairwise scores of t ≥ 2 tokens and q ≥ 2 queries take _pairwise_gemm_kernel.

    Opt-in (SOURCE_FAST_PAIRWISE_GEMM=1) until it has been timed against _pairwise_kernel on a GPU. Per
    example and per element of (d_out, d_a), for 16-bit inputs and fp32 U:
      - its tile GEMM does 2·t FLOPs on wgmma and reads 2·t·(1/BLOCK_M + 1/BLOCK_N) bytes of a and g: 64
        FLOP/B at 128×128, where the token-tile kernel's 16×32 tiles get 10.7 on mma.sync (6-7 % of roofline
        on the first H200 run, about 16-33 TFLOP/s);
      - its epilogue does 2·q fp32 FLOPs on the FMA units and reads 4·q bytes of U, from L2 for all but
        about one example per tile; the token-tile kernel contracts queries on tensor cores, reading U once
        per block of 16-32 examples.
    At 742 TFLOP/s (bf16, measured) the tile GEMM is the small part: this kernel runs at about 4·q bytes
    per L2 bandwidth (a few TB/s), the token-tile kernel at about 2·t FLOPs per 25 TFLOP/s, so this one wins
    from t ≈ 2·25/6 · q ≈ 8·q (t = 512, q = 16: by about 5x on paper). t ≥ 64: shorter sequences give the
    GEMM only one or two token steps; d_out, d_a ≥ 64: a smaller layer would be mostly tile padding. The
    three constants are estimates for the GPU timing to settle."""
    if not env_flag("SOURCE_FAST_PAIRWISE_GEMM"):
        return False
    return t >= _GEMM_MIN_T and min(d_out, d_a) >= _GEMM_MIN_D and t >= _GEMM_TOKENS_PER_QUERY * q


def _pairwise_scores_gemm(a: torch.Tensor, g: torch.Tensor, u: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """pairwise_scores through _pairwise_gemm_kernel (checked, non-empty arguments, any t and q)."""
    n, t, d_a = a.shape
    q, d_out = u.shape[0], u.shape[1]
    max_tiles = triton.cdiv(d_out, _GEMM_MIN_BLOCK) * triton.cdiv(d_a, _GEMM_MIN_BLOCK)
    # Grid axis 0 holds tiles × examples, at most MAX_GRID_X: more examples than that run as several launches.
    chunk = max(1, MAX_GRID_X // max_tiles)
    if n > chunk:
        return torch.cat([_pairwise_scores_gemm(a[s : s + chunk], g[s : s + chunk], u,
                                                None if m is None else m[s : s + chunk]) for s in range(0, n, chunk)])
    # Sized for the smallest tile; the launch fills the first `tiles` slabs of its config (the grid function
    # sees the config the autotuner launches last, which is the one kept), and only those are summed, so
    # what other configs left behind while being benchmarked is never read.
    out = torch.empty((max_tiles, n, q), device=a.device, dtype=torch.float32)
    tiles = 0

    def grid(meta):
        nonlocal tiles
        tiles = triton.cdiv(d_out, meta["BLOCK_M"]) * triton.cdiv(d_a, meta["BLOCK_N"])
        return (tiles * n,)

    _pairwise_gemm_kernel[grid](
        a, g, m if m is not None else a, u, out,  # the mask pointer is unread without HAS_MASK
        n, t, d_out, d_a, q,
        *a.stride(), *g.stride(), *(m.stride() if m is not None else (0, 0)),
        *u.stride(), *out.stride(),
        HAS_MASK=m is not None, UPCAST_DOT=is_interpret(), DOT_PRECISION=dot_precision(a.dtype),
    )
    return out[:tiles].sum(0)
