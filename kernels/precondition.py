"""Query preconditioning for one segment: rotate into the eigenbasis, scale, rotate back.

    W   = V Q_A                                  (batched GEMM)
    R   = Q_Sᵀ W, epilogue: R_u = s(Λ) ⊙ R and, for SOURCE, R_v = exp(−cσ) ⊙ R
    out = Q_S R Q_Aᵀ for R_u (and R_v) together  (two batched GEMMs)

One batched-GEMM kernel serves all four products: transposes are stride swaps, a shared matrix has
batch stride 0, and the eigenvalue scaling is a constexpr-selected epilogue on the second product, so
the scaled tiles never make a round trip through memory. Intermediates are float32 (the contract's
output dtype), so 16-bit inputs only enter the first product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    MAX_GRID_YZ,
    _clamp_lam,
    _mma,
    _source_scale,
    autotune_configs,
    dot_precision,
    int32_safe,
    is_interpret,
)

_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]

# Epilogues of _bmm_kernel.
_PLAIN, _EKFAC, _SOURCE = 0, 1, 2


def _prune(configs, named_args, **kwargs):
    # The SOURCE epilogue keeps several fp32 temporaries per accumulator element: a 128×128 tile spills
    # on sm_90 (tests/test_kernels_sm90.py), so it is not even tried there.
    if kwargs.get("EPILOGUE") != _SOURCE:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 128]


@triton.autotune(configs=autotune_configs(_CONFIGS), key=["M", "N", "K", "EPILOGUE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bmm_kernel(
    # Pointers
    a_ptr, b_ptr, c_ptr, lam_ptr,
    # Sizes
    M, N, K,
    # Strides (elements); the second output (SOURCE shrink) sits at c_ptr + stride_c2
    stride_ab, stride_am, stride_ak, stride_bb, stride_bk, stride_bn, stride_cb, stride_cm, stride_cn,
    stride_c2, stride_lm, stride_ln,
    # Scalars
    horizon, damping,
    # Meta-parameters
    EPILOGUE: tl.constexpr, CAST_F32: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[b] = A[b] @ B[b] in fp32, then the epilogue: plain, 1/σ (EK-FAC) or (F(σ), exp(−cσ)) (SOURCE)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # b · stride overflows int32 for many large queries
    tiles_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < M
    col_ok = offs_n < N
    a_base = a_ptr + b * stride_ab + offs_m[:, None] * stride_am
    b_base = b_ptr + b * stride_bb + offs_n[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(a_base + k[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(b_base + k[:, None] * stride_bk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if CAST_F32:  # operands of different dtypes (fp32 intermediate × 16-bit eigenvectors)
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = _mma(x, y, acc, UPCAST_DOT, DOT_PRECISION)
    out_mask = row_ok[:, None] & col_ok[None, :]
    c_ptrs = c_ptr + b * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if EPILOGUE == 0:
        tl.store(c_ptrs, acc, mask=out_mask)
    else:
        lam = tl.load(lam_ptr + offs_m[:, None] * stride_lm + offs_n[None, :] * stride_ln, mask=out_mask, other=0.0)
        lam = lam.to(tl.float32)
        if EPILOGUE == 1:
            tl.store(c_ptrs, acc / (_clamp_lam(lam) + damping), mask=out_mask)
        else:
            factor, shrink = _source_scale(lam, damping, horizon)
            tl.store(c_ptrs, acc * factor, mask=out_mask)
            tl.store(c_ptrs + stride_c2, acc * shrink, mask=out_mask)


def _bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, lam=None, horizon=None, damping=0.0, out2_stride=0):
    """out[i] = a[i] @ b[i] for 3-D views (a 2-D operand is shared across the batch via batch stride 0)."""
    batch, m, n = out.shape
    k = a.shape[-1]
    # The batch index is int64 in the kernel, the rest int32 (a shared 2-D operand has no batch dim).
    a = int32_safe(a, "query operand" if a.dim() == 3 else "eigenvectors", (0,) if a.dim() == 3 else ())
    b = int32_safe(b, "query operand" if b.dim() == 3 else "eigenvectors", (0,) if b.dim() == 3 else ())
    int32_safe(out, "output", copy=False)
    if lam is not None:
        lam = int32_safe(lam, "lam", ())
    if batch > MAX_GRID_YZ:  # the batch is grid axis 1: launch it in chunks
        for s in range(0, batch, MAX_GRID_YZ):
            e = min(batch, s + MAX_GRID_YZ)
            _bmm(a[s:e] if a.dim() == 3 else a, b[s:e] if b.dim() == 3 else b, out[s:e], lam=lam, horizon=horizon,
                 damping=damping, out2_stride=out2_stride)
        return
    a_strides = a.stride() if a.dim() == 3 else (0, *a.stride())
    b_strides = b.stride() if b.dim() == 3 else (0, *b.stride())
    epilogue = _PLAIN if lam is None else (_EKFAC if horizon is None else _SOURCE)
    # Mixed operands are multiplied in fp32 and follow torch's fp32 matmul precision, like the reference;
    # two 16-bit operands go to the native MMA.
    wide = torch.float32 if a.dtype != b.dtype else a.dtype

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)

    _bmm_kernel[grid](
        a, b, out, lam if lam is not None else out,  # lam is unread by the plain epilogue
        m, n, k,
        *a_strides, *b_strides, *out.stride(),
        out2_stride, *(lam.stride() if lam is not None else (0, 0)),
        float(horizon) if horizon is not None else 0.0, float(damping),
        EPILOGUE=epilogue, CAST_F32=a.dtype != b.dtype, UPCAST_DOT=is_interpret(), DOT_PRECISION=dot_precision(wide),
    )


def precondition_queries(
    v: torch.Tensor,
    q_s: torch.Tensor,
    q_a: torch.Tensor,
    lam: torch.Tensor,
    *,
    horizon: float | None = None,
    damping: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate query gradients into the eigenbasis, scale, rotate back (one segment of the walk).

    v:   (q, d_out, d_a)  query gradients in the parameter basis, float32/float16/bfloat16, any strides
    q_s: (d_out, d_out)   eigenvectors of S in columns; q_a: (d_a, d_a) eigenvectors of A in columns
    lam: (d_out, d_a)     eigenvalues Λ (negative round-off is clamped to 0)
    q_s, q_a and lam may be float64 (the fitted factors); the kernels compute in float32.
    horizon: c of the segment (SOURCE), or None (EK-FAC); damping: δ added to the clamped Λ
    Returns (u, v_next), float32 (q, d_out, d_a):
      u      = Q_S [s(Λ) ⊙ (Q_Sᵀ v Q_A)] Q_Aᵀ, s = 1/(Λ+δ) (EK-FAC) or F(Λ+δ) (SOURCE)
      v_next = Q_S [exp(−c(Λ+δ)) ⊙ (Q_Sᵀ v Q_A)] Q_Aᵀ for SOURCE, None for EK-FAC
    """
    if v.dim() != 3:
        raise ValueError(f"v must be (q, d_out, d_a); got {tuple(v.shape)}")
    q, d_out, d_a = v.shape
    if tuple(q_s.shape) != (d_out, d_out) or tuple(q_a.shape) != (d_a, d_a):
        raise ValueError(
            f"q_s must be ({d_out}, {d_out}) and q_a ({d_a}, {d_a}) for v {tuple(v.shape)}; "
            f"got {tuple(q_s.shape)} and {tuple(q_a.shape)}"
        )
    if tuple(lam.shape) != (d_out, d_a):
        raise ValueError(f"lam must be (d_out, d_a) = ({d_out}, {d_a}); got {tuple(lam.shape)}")
    if v.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"v must be float32, float16 or bfloat16; got {v.dtype}")
    for name, x in (("v", v), ("q_s", q_s), ("q_a", q_a), ("lam", lam)):
        if not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}")
        if x.device != v.device:
            raise ValueError(f"{name} is on {x.device}, v on {v.device}")
    n_out = 1 if horizon is None else 2
    if q == 0 or d_out == 0 or d_a == 0:
        out = torch.zeros((n_out, q, d_out, d_a), device=v.device, dtype=torch.float32)
        return out[0], (out[1] if horizon is not None else None)
    w = torch.empty((q, d_out, d_a), device=v.device, dtype=torch.float32)
    _bmm(v, q_a, w)
    # rot[0] = s(Λ) ⊙ (Q_Sᵀ W); rot[1] = exp(−cσ) ⊙ (Q_Sᵀ W) for SOURCE: scaled in the GEMM epilogue.
    rot = torch.empty((n_out, q, d_out, d_a), device=v.device, dtype=torch.float32)
    _bmm(q_s.T, w, rot[0], lam=lam, horizon=horizon, damping=damping, out2_stride=rot.stride(0) if n_out == 2 else 0)
    rot = rot.view(n_out * q, d_out, d_a)
    back = torch.empty_like(rot)
    _bmm(q_s, rot, back)
    _bmm(back, q_a.T, rot)  # rot is consumed: reuse it for the result
    out = rot.view(n_out, q, d_out, d_a)
    return out[0], (out[1] if horizon is not None else None)
