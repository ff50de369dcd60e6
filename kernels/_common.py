"""Shared pieces of the Triton kernels: interpreter detection, autotune lists, dot precision, and
the @triton.jit helpers the kernels share (the dot, the per-example tile, a block's kept examples)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Read once: @triton.jit builds interpreted or compiled kernels by the environment at import, and what
# the launches pass (bf16 dots upcast under the interpreter, one autotune config) must match that.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def is_interpret() -> bool:
    return _INTERPRET


def autotune_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """The autotuner benchmarks when given more than one config, which needs a GPU driver: the
    interpreter gets the first (conservative) config only (DESIGN V3)."""
    return configs[:1] if is_interpret() else configs


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot on fp32 operands: follows torch.get_float32_matmul_precision(), so the
    kernel and the torch reference make the same TF32 choice ("highest" means full fp32, "ieee")."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; 0 off CUDA (the interpreter runs programs one by one, so
    splitting a reduction there buys nothing; tests patch this to exercise the split paths)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, work: int, device: torch.device) -> int:
    """How many ways to split a reduction (over examples or tiles) so that about two waves of
    programs run: `programs` is the grid without the split, `work` the number of items split."""
    wanted = triton.cdiv(2 * num_sms(device), max(programs, 1))
    return max(1, min(wanted, work))


def mask_u8(mask: torch.Tensor | None, n: int, t: int, device: torch.device) -> torch.Tensor | None:
    """Checks a (n, t) token mask and returns it as uint8 0/1 (dropped tokens are mask == 0). The mask is
    n·t elements, negligible next to the (n, t, d) inputs, so this conversion costs nothing noticeable."""
    if mask is None:
        return None
    if tuple(mask.shape) != (n, t):
        raise ValueError(f"mask must be (n, t) = ({n}, {t}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device}, the inputs on {device}")
    return (mask != 0).view(torch.uint8)


# CUDA's limits on grid axes 1 and 2, and on axis 0: launchers chunk whatever they put there.
MAX_GRID_YZ = 65535
MAX_GRID_X = 2**31 - 1


def int32_safe(x: torch.Tensor, name: str, widened: tuple[int, ...] = (0,), *, copy: bool = True) -> torch.Tensor:
    """x, or a contiguous copy of it, such that the kernels' element offsets fit in int32.

    Kernels widen the index of the dims in `widened` (examples, queries, batch) to int64 and compute
    the rest as int32 products summed together, so Σ (size − 1)·stride over the other dims must stay
    below 2^31. Odd layouts (a feature-major view of a big tensor, say) can pass it; a contiguous
    copy brings it down to one example's size. Outputs (copy=False) cannot be copied: they raise."""

    def reach(t: torch.Tensor) -> int:
        return sum((size - 1) * abs(stride) for dim, (size, stride) in enumerate(zip(t.shape, t.stride()))
                   if dim not in widened and size > 0)

    if reach(x) < 2**31:
        return x
    if copy:
        x = x.contiguous()
        if reach(x) < 2**31:
            return x
    raise ValueError(
        f"{name} {tuple(x.shape)} with strides {x.stride()}: offsets within one "
        f"{'example' if widened else 'matrix'} reach {reach(x)}, past the kernels' 32-bit offsets (2^31)"
        + ("" if copy else "; pass a contiguous tensor")
    )


def check_tokens(a: torch.Tensor, g: torch.Tensor, a_name: str, g_name: str) -> None:
    """a (n, t, d_a) and g (n, t, d_out) must share n, t, device and dtype (tl.dot needs one operand dtype)."""
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"{a_name} and {g_name} must be 3-D (n, t, d); got {tuple(a.shape)} and {tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"{a_name} and {g_name} must share (n, t); got {tuple(a.shape)} and {tuple(g.shape)}")
    if a.dtype != g.dtype:
        raise ValueError(f"{a_name} and {g_name} must share a dtype; got {a.dtype} and {g.dtype}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{a_name} must be float32, float16 or bfloat16; got {a.dtype}")
    if a.device != g.device:
        raise ValueError(f"{a_name} is on {a.device}, {g_name} on {g.device}")


@triton.jit
def _kept_examples(mask_ptr, stride_mn, n, pid_e, BLOCK_E: tl.constexpr, HAS_MASK: tl.constexpr):
    """A one-token kernel's block of examples: (offsets, in range and kept, offsets as int64 — e · stride
    overflows int32 for large n·d). A dropped example reads nothing and scores exactly 0."""
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < n
    e64 = offs_e.to(tl.int64)
    if HAS_MASK:
        e_ok &= tl.load(mask_ptr + e64 * stride_mn, mask=e_ok, other=0) != 0
    return offs_e, e_ok, e64


@triton.jit
def _mma(a, b, acc, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # The interpreter multiplies raw bf16 bit patterns in tl.dot (DESIGN V2): upcast there only.
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _example_tile(
    a_ptr, g_ptr, mask_ptr, i, offs_m, offs_n, T, d_out, d_a,
    stride_an, stride_at, stride_ad, stride_gn, stride_gt, stride_gd, stride_mn, stride_mt,
    HAS_MASK: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of the per-example gradient G_i = Σ_t g_t a_tᵀ, in fp32 registers."""
    i = tl.cast(i, tl.int64)  # i · stride overflows int32 for large n·t·d (i is a plain int when interpreted)
    offs_t = tl.arange(0, BLOCK_T)
    row_ok = offs_m < d_out
    col_ok = offs_n < d_a
    tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + offs_t
        tok = t < T
        if HAS_MASK:
            tok &= tl.load(mask_ptr + i * stride_mn + t * stride_mt, mask=tok, other=0) != 0
        # g is loaded transposed, (BLOCK_M, BLOCK_T), so the token sum is a plain dot.
        g_t = tl.load(
            g_ptr + i * stride_gn + t[None, :] * stride_gt + offs_m[:, None] * stride_gd,
            mask=row_ok[:, None] & tok[None, :], other=0.0,
        )
        a = tl.load(
            a_ptr + i * stride_an + t[:, None] * stride_at + offs_n[None, :] * stride_ad,
            mask=tok[:, None] & col_ok[None, :], other=0.0,
        )
        tile = _mma(g_t, a, tile, UPCAST_DOT, DOT_PRECISION)
    return tile
