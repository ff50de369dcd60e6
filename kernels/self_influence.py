"""Self-influence: Σ_ij scale_ij (G̃_n)_ij² per example, the per-example tile formed in registers only.

Grid over (examples, splits of the tile list): each program walks its share of the (d_out, d_a) tiles
for one example and reduces scale ⊙ tile² to one number. Splits write disjoint slots of a tiny
(split, n) workspace summed in a fixed order, so the result is deterministic (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _example_tile, autotune_configs, check_tokens, dot_precision, is_interpret, mask_u8, split_count

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
        acc += s.to(tl.float32) * tile * tile
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + i.to(tl.int64) * stride_on, tl.sum(acc))


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
