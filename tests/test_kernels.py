"""Triton kernels vs the float64 reference and the same-precision torch path.

On CPU these run under TRITON_INTERPRET=1 (conftest), where bf16 dots are upcast (DESIGN V2): they check
indexing, masking and strides; the native MMA paths are the `cuda` cases at the end.

Tolerances. The float64 reference sees exactly the same (already rounded) 16-bit inputs, and every
kernel accumulates in fp32, so the only error is fp32 accumulation, plus TF32 rounding where a kernel
feeds fp32 operands to tl.dot for 16-bit inputs (the T = 1 Λ path, the query contraction of
pairwise_scores: 2^-11 relative per operand). The bound is therefore norm-wise, relative to max|ref|:
1e-5 for fp32 (full-precision dots: torch's default matmul precision is "highest") and 2e-3 for
16-bit inputs (TF32); an error within 2x the same-precision torch path's also passes (the flash-attention
rule), and the SQNR must clear 90 dB (fp32) / 50 dB (16-bit) regardless.
"""

from __future__ import annotations

import math

import pytest
import torch

from source_fast import _dispatch, ops, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 1), (3, 5, 17, 9), (2, 7, 33, 65), (5, 1, 20, 13)]  # n, t, d_a, d_out: odd, <= 65 (V6)
TOL = {torch.float32: (1e-5, 90.0), torch.float16: (2e-3, 50.0), torch.bfloat16: (2e-3, 50.0)}


def _require_triton(op: str, device: torch.device, dtype: torch.dtype) -> None:
    reasons = _dispatch.unsupported_reasons("triton", op, device, dtype)
    if reasons:
        pytest.skip("; ".join(reasons))


def _sqnr_db(actual: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (actual.double() - ref).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


def _assert_close(actual: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == torch.float32 and actual.shape == ref64.shape
    rtol, floor_db = TOL[dtype]
    ref64 = ref64.to(actual.device)
    err = (actual.double() - ref64).abs().max().item() if actual.numel() else 0.0
    base = (baseline.double().to(actual.device) - ref64).abs().max().item() if actual.numel() else 0.0
    scale = ref64.abs().max().item() if actual.numel() else 0.0
    db = _sqnr_db(actual, ref64) if actual.numel() else math.inf
    msg = f"max|Δ|={err:.3g} vs torch-same-precision {base:.3g}, max|ref|={scale:.3g} (sqnr {db:.1f} dB)"
    assert torch.isfinite(actual).all(), msg
    assert err <= max(rtol * scale, 2.0 * base) + 1e-30, msg
    assert db >= floor_db or scale == 0.0, msg


def _tokens(n, t, d, dtype, device, layout):
    """(n, t, d) in one of three layouts: contiguous, sliced from a wider tensor, or feature-major."""
    if layout == "contiguous":
        return torch.randn(n, t, d, device=device).to(dtype)
    if layout == "sliced":
        return torch.randn(n, 2 * t, d + 5, device=device).to(dtype)[:, ::2, 3 : 3 + d]
    return torch.randn(d, n, t, device=device).to(dtype).permute(1, 2, 0)


def _mask(n, t, device, kind):
    if kind is None:
        return None
    keep = torch.rand(n, t, device=device) > 0.3
    keep[0, 0] = True
    # A float mask must act like `mask != 0` (the reference's rule), not scale tokens.
    return keep if kind == "bool" else keep.float() * 0.5


# (layout, mask kind) pairs: every layout meets a mask somewhere, without the full product.
VARIANTS = [("contiguous", None), ("sliced", "bool"), ("feature_major", "float")]


@pytest.mark.parametrize("n, t, d_a, d_out", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_accumulate_lambda_matches_reference(n, t, d_a, d_out, dtype, layout, mask_kind, device):
    _require_triton("accumulate_lambda_", device, dtype)
    a = _tokens(n, t, d_a, dtype, device, layout)
    g = _tokens(n, t, d_out, dtype, device, layout)
    mask = _mask(n, t, device, mask_kind)
    start = torch.rand(d_out, d_a, device=device)
    lam = start.clone()
    ops.accumulate_lambda_(lam, a, g, mask, 0.25, backend="triton")
    ref64 = start.double().cpu()
    reference.accumulate_lambda_(ref64, a.double().cpu(), g.double().cpu(), None if mask is None else mask.cpu(), 0.25)
    same = start.clone()
    reference.accumulate_lambda_(same, a, g, mask, 0.25)
    _assert_close(lam, ref64, same, dtype)


@pytest.mark.parametrize("n, t, d_a, d_out", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_self_scores_matches_reference(n, t, d_a, d_out, dtype, layout, mask_kind, device):
    _require_triton("self_scores", device, dtype)
    a = _tokens(n, t, d_a, dtype, device, layout)
    g = _tokens(n, t, d_out, dtype, device, layout)
    mask = _mask(n, t, device, mask_kind)
    scale = torch.rand(d_out, d_a + 3, device=device)[:, 1 : 1 + d_a]  # strided scale too
    out = ops.self_scores(a, g, scale, mask, backend="triton")
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.self_scores(a.double().cpu(), g.double().cpu(), scale.double().cpu(), m64)
    _assert_close(out, ref64, reference.self_scores(a, g, scale, mask), dtype)


@pytest.mark.parametrize("n, t, d_a, d_out", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_pairwise_scores_matches_reference(n, t, d_a, d_out, dtype, layout, mask_kind, device):
    _require_triton("pairwise_scores", device, dtype)
    a = _tokens(n, t, d_a, dtype, device, layout)
    g = _tokens(n, t, d_out, dtype, device, layout)
    mask = _mask(n, t, device, mask_kind)
    q = 3 if layout == "contiguous" else 17  # 17 > BLOCK_Q of the first config: several query blocks
    u = torch.randn(q, d_a, d_out, device=device).transpose(1, 2)  # float32, feature-major
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.pairwise_scores(a.double().cpu(), g.double().cpu(), u.double().cpu(), m64)
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u, mask), dtype)


@pytest.mark.parametrize("n, t, d_a, d_out", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_pairwise_one_query_matches_reference(n, t, d_a, d_out, dtype, layout, mask_kind, device):
    """One query takes the one-token kernel over all tokens as rows, summed per example."""
    _require_triton("pairwise_scores", device, dtype)
    a = _tokens(n, t, d_a, dtype, device, layout)
    g = _tokens(n, t, d_out, dtype, device, layout)
    mask = _mask(n, t, device, mask_kind)
    u = torch.randn(1, d_a, d_out, device=device).transpose(1, 2)
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.pairwise_scores(a.double().cpu(), g.double().cpu(), u.double().cpu(), m64)
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u, mask), dtype)


@pytest.mark.parametrize("n, t", [(70, 1), (7, 6)])
def test_split_reductions_match_unsplit(n, t, device, monkeypatch):
    """Pretending to have many SMs forces the split paths (workspace slabs summed in a fixed order).
    The sizes make every launcher split: examples for Λ (blocks of 32 with t = 1), tiles of
    150 × 130 for self-influence and pairwise, d_a blocks for one token; split_count is spied to
    prove it."""
    _require_triton("accumulate_lambda_", device, torch.float32)
    from source_fast.kernels import _common, lam, pairwise, self_influence

    a = torch.randn(n, t, 130, device=device)
    g = torch.randn(n, t, 150, device=device)
    mask = torch.rand(n, t, device=device) > 0.2
    u = torch.randn(4, 150, 130, device=device)
    scale = torch.rand(150, 130, device=device)

    def run():
        lam_ = torch.zeros(150, 130, device=device)
        ops.accumulate_lambda_(lam_, a, g, mask, backend="triton")
        return (lam_, ops.self_scores(a, g, scale, mask, backend="triton"),
                ops.pairwise_scores(a, g, u, mask, backend="triton"))

    unsplit = run()
    splits = []

    def spy(programs, work, dev):
        splits.append(split_count(programs, work, dev))
        return splits[-1]

    split_count = _common.split_count
    monkeypatch.setattr(_common, "num_sms", lambda device: 8)
    for module in (lam, self_influence, pairwise):
        monkeypatch.setattr(module, "split_count", spy)
    split = run()
    assert len(splits) == 3 and min(splits) > 1, splits
    for got, want in zip(split, unsplit):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("t", [1, 4])
def test_nan_in_dropped_tokens_is_never_read(t, device):
    """Masked tokens are dropped, not multiplied by 0, in the kernels and the reference alike."""
    _require_triton("pairwise_scores", device, torch.float32)
    a, g = torch.randn(5, t, 9, device=device), torch.randn(5, t, 7, device=device)
    mask = torch.rand(5, t, device=device) > 0.4
    mask[0, 0], mask[1, 0] = True, False
    clean_a, clean_g = torch.where(mask[..., None], a, 0), torch.where(mask[..., None], g, 0)
    a[~mask], g[~mask] = float("nan"), float("inf")
    u, scale = torch.randn(3, 7, 9, device=device), torch.rand(7, 9, device=device)
    for backend in ("triton", "torch"):
        lam, want = torch.zeros(7, 9, device=device), torch.zeros(7, 9, device=device)
        ops.accumulate_lambda_(lam, a, g, mask, backend=backend)
        ops.accumulate_lambda_(want, clean_a, clean_g, backend=backend)
        torch.testing.assert_close(lam, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ops.self_scores(a, g, scale, mask, backend=backend),
                                   ops.self_scores(clean_a, clean_g, scale, backend=backend), rtol=1e-5, atol=1e-6)
        for q in (u, u[:1]):
            torch.testing.assert_close(ops.pairwise_scores(a, g, q, mask, backend=backend),
                                       ops.pairwise_scores(clean_a, clean_g, q, backend=backend), rtol=1e-5, atol=1e-5)


def _far_strided(shape, stride, dtype, device):
    """A view whose last element sits just past 2^31 elements into its storage (4 GiB of bf16, of
    which only the viewed elements are ever touched), filled with random values."""
    reach = sum((s - 1) * st for s, st in zip(shape, stride))
    assert reach >= 2**31
    storage = torch.empty(reach + 1, dtype=dtype, device=device)
    view = storage.as_strided(shape, stride)
    view.copy_(torch.randn(shape, device=device).to(dtype))
    return view


def test_offsets_past_int32_within_one_example(device):
    """Kernels widen the example / query index to int64 and keep in-example offsets int32: a layout
    whose in-example offsets pass 2^31 (feature-major views of big tensors) is copied first."""
    _require_triton("pairwise_scores", device, torch.bfloat16)
    dtype, big = torch.bfloat16, 2**25 + 1  # 64 · big ≥ 2^31
    for t in (1, 3):
        a = _far_strided((2, t, 65), (1, 2, big), dtype, device)
        g = torch.randn(2, t, 6, device=device).to(dtype)
        u, scale = torch.randn(3, 6, 65, device=device), torch.rand(6, 65, device=device)
        lam = torch.zeros(6, 65, device=device)
        ops.accumulate_lambda_(lam, a, g, backend="triton")
        ref = torch.zeros(6, 65, device=device)
        ops.accumulate_lambda_(ref, a.contiguous(), g, backend="triton")
        assert torch.equal(lam, ref)
        assert torch.equal(ops.self_scores(a, g, scale, backend="triton"),
                           ops.self_scores(a.contiguous(), g, scale, backend="triton"))
        for q in (u, u[:1]):
            assert torch.equal(ops.pairwise_scores(a, g, q, backend="triton"),
                               ops.pairwise_scores(a.contiguous(), g, q, backend="triton"))


def test_outputs_past_int32_are_refused():
    from source_fast.kernels._common import int32_safe

    wide = torch.empty(2**31 + 3, dtype=torch.uint8).as_strided((2, 3), (2**31, 1))  # 2 GiB, untouched
    with pytest.raises(ValueError, match=r"lam \(2, 3\) with strides \(2147483648, 1\).*pass a contiguous tensor"):
        int32_safe(wide, "lam", (), copy=False)
    assert int32_safe(wide, "lam", (0,), copy=False) is wide  # the widened dim may be as far as it likes


def test_grid_axis_limits_are_chunked(device, monkeypatch):
    """Query blocks (pairwise) sit on grid axis 1, limited to 65535 on CUDA: past it the launcher
    splits the launch. A tiny limit exercises that here."""
    _require_triton("pairwise_scores", device, torch.float32)
    from source_fast.kernels import pairwise

    a, g = torch.randn(3, 4, 9, device=device), torch.randn(3, 4, 7, device=device)
    u = torch.randn(40, 7, 9, device=device)
    whole = ops.pairwise_scores(a, g, u, backend="triton")
    monkeypatch.setattr(pairwise, "MAX_GRID_YZ", 1)  # one 16-query block per launch
    torch.testing.assert_close(ops.pairwise_scores(a, g, u, backend="triton"), whole, rtol=0, atol=0)


def test_empty_batch_is_a_no_op(device):
    _require_triton("accumulate_lambda_", device, torch.float32)
    lam = torch.ones(3, 4, device=device)
    empty_a, empty_g = torch.zeros(0, 2, 4, device=device), torch.zeros(0, 2, 3, device=device)
    ops.accumulate_lambda_(lam, empty_a, empty_g, backend="triton")
    assert (lam == 1).all()
    out = ops.self_scores(torch.zeros(0, 2, 4, device=device), torch.zeros(0, 2, 3, device=device),
                          torch.ones(3, 4, device=device), backend="triton")
    assert out.shape == (0,)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_width_layers_score_zero(backend, device):
    """d_out or d_a = 0 (nothing to score): zeros of (n, q) from every path, for one token or many."""
    if backend == "triton":
        _require_triton("pairwise_scores", device, torch.float32)
    for t, q, d_out, d_a in [(3, 4, 0, 5), (3, 4, 5, 0), (1, 64, 0, 5)]:
        a, g = torch.randn(2, t, d_a, device=device), torch.randn(2, t, d_out, device=device)
        out = ops.pairwise_scores(a, g, torch.randn(q, d_out, d_a, device=device), backend=backend)
        assert out.shape == (2, q) and not out.any()


def test_float64_weights_keep_the_references_float64(device):
    """scale / u in float64 (a model with a float64 parameter gets float64 factors) make the reference
    compute and return float64; the kernels return float32, so a forced kernel refuses them."""
    _require_triton("pairwise_scores", device, torch.float32)
    a, g = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 5, device=device)
    u, scale = torch.randn(6, 5, 4, dtype=torch.float64, device=device), torch.rand(5, 4, dtype=torch.float64, device=device)
    assert ops.pairwise_scores(a, g, u).dtype == ops.self_scores(a, g, scale).dtype == torch.float64
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run pairwise_scores .*float64"):
        ops.pairwise_scores(a, g, u, backend="triton")
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run self_scores .*float64"):
        ops.self_scores(a, g, scale, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("alpha", [1e39, -1e39, math.inf, math.nan])
def test_lambda_alpha_beyond_float32_is_refused(backend, alpha, device):
    """Λ accumulates in float32: an alpha float32 cannot hold would write inf and NaN (0·inf)."""
    if backend == "triton":
        _require_triton("accumulate_lambda_", device, torch.float32)
    lam = torch.zeros(3, 4, device=device)
    with pytest.raises(ValueError, match="accumulate_lambda_: alpha must be finite \\(in float32\\)"):
        ops.accumulate_lambda_(lam, torch.randn(2, 1, 4, device=device), torch.randn(2, 1, 3, device=device),
                               alpha=alpha, backend=backend)
    assert not lam.any()


@pytest.mark.parametrize("call, match", [
    (lambda k: k.accumulate_lambda_(torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 6, 3)), r"share \(n, t\)"),
    (lambda k: k.accumulate_lambda_(torch.zeros(3, 5), torch.zeros(2, 5, 4), torch.zeros(2, 5, 3)), r"lam must be"),
    (lambda k: k.accumulate_lambda_(torch.zeros(3, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 3).half()), "dtype"),
    (lambda k: k.self_scores(torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), torch.zeros(4, 3)), r"scale must be"),
    (lambda k: k.self_scores(torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), torch.zeros(3, 4), torch.ones(5, 2)),
     r"mask must be"),
    (lambda k: k.pairwise_scores(torch.zeros(2, 5, 4), torch.zeros(2, 5, 3), torch.zeros(2, 4, 3)), r"u must be"),
])
def test_launchers_reject_bad_arguments(call, match):
    from source_fast import _triton

    if _triton.import_error():
        pytest.skip(_triton.import_error())
    with pytest.raises(ValueError, match=match):
        call(_triton.kernels())


# ---- one token per example (t == 1): the GEMM-shaped kernels -----------------------------------------
# With t == 1 both launchers take their own kernels (_pairwise_t1_kernel: a @ U_qᵀ with a g row-dot
# epilogue; _self_scores_t1_kernel: (g̃∘g̃) @ scale with an ã² row-dot epilogue). Sizes are odd and straddle
# the 64-wide blocks of the first (interpreted) config: 1, less than a block, more than two blocks (masked
# tails in every dimension). Tolerances are the module's: the kernels accumulate in fp32 and, on CUDA, dot
# fp32 operands as TF32 for 16-bit inputs (bf16/fp16 values are exact in TF32, so only U or the squares and
# scale are rounded: ≤ 2^-10 relative per operand, inside 2e-3 of max|ref| even when, as for the all-positive
# self-influence sums, the truncation errors do not cancel) and in full fp32 for fp32 inputs (1e-5).

T1_SHAPES = [(1, 1, 1), (5, 17, 33), (70, 130, 257), (70, 1, 33), (5, 130, 1), (1, 17, 257)]  # n, d_a, d_out


def _t1_inputs(n, d_a, d_out, dtype, device, layout, mask_kind):
    a = _tokens(n, 1, d_a, dtype, device, layout)
    g = _tokens(n, 1, d_out, dtype, device, layout)
    mask = _mask(n, 1, device, mask_kind)
    if mask is not None and n > 1:
        mask[-1, 0] = 0  # t == 1: a dropped token is a whole dropped example; make sure one is
    return a, g, mask


def _assert_dropped_rows_zero(out, mask):
    """A dropped example reads nothing and its score is exactly 0, not a rounding residue."""
    if mask is not None:
        assert (out[(mask[:, 0] == 0).to(out.device)] == 0).all()


@pytest.mark.parametrize("n, d_a, d_out", T1_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_pairwise_scores_t1_matches_reference(n, d_a, d_out, dtype, layout, mask_kind, device):
    _require_triton("pairwise_scores", device, dtype)
    a, g, mask = _t1_inputs(n, d_a, d_out, dtype, device, layout, mask_kind)
    if layout == "contiguous":
        u = torch.randn(1, d_out, d_a, device=device)  # Q = 1
    else:  # Q = 17 (several query programs), feature-major or every other query of a wider batch
        wide = torch.randn(34, d_a, d_out, device=device).transpose(1, 2)
        u = wide[::2] if layout == "sliced" else wide[:17]
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.pairwise_scores(a.double().cpu(), g.double().cpu(), u.double().cpu(), m64)
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u, mask), dtype)
    _assert_dropped_rows_zero(out, mask)


@pytest.mark.parametrize("n, d_a, d_out", T1_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
def test_self_scores_t1_matches_reference(n, d_a, d_out, dtype, layout, mask_kind, device):
    _require_triton("self_scores", device, dtype)
    a, g, mask = _t1_inputs(n, d_a, d_out, dtype, device, layout, mask_kind)
    if layout == "feature_major":
        scale = torch.rand(d_a, d_out, device=device).T  # column-major scale
    else:
        scale = torch.rand(d_out, d_a + 3, device=device)[:, 1 : 1 + d_a]
    out = ops.self_scores(a, g, scale, mask, backend="triton")
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.self_scores(a.double().cpu(), g.double().cpu(), scale.double().cpu(), m64)
    _assert_close(out, ref64, reference.self_scores(a, g, scale, mask), dtype)
    _assert_dropped_rows_zero(out, mask)


def test_t1_fully_masked_batch_scores_zero(device):
    _require_triton("pairwise_scores", device, torch.bfloat16)
    a = torch.randn(9, 1, 20, device=device, dtype=torch.bfloat16)
    g = torch.randn(9, 1, 12, device=device, dtype=torch.bfloat16)
    mask = torch.zeros(9, 1, dtype=torch.bool, device=device)
    pw = ops.pairwise_scores(a, g, torch.randn(3, 12, 20, device=device), mask, backend="triton")
    si = ops.self_scores(a, g, torch.rand(12, 20, device=device), mask, backend="triton")
    assert pw.shape == (9, 3) and (pw == 0).all()
    assert si.shape == (9,) and (si == 0).all()


class _LaunchSpy:
    """Stands in for an autotuned kernel in its module and counts `kernel[grid](...)` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("t, q", [(1, 2), (2, 2), (3, 1)])
def test_t1_inputs_take_the_t1_kernels(t, q, device, monkeypatch):
    """t == 1 must launch the GEMM-shaped kernels (and only them); t > 1 the token-tile kernels, except
    pairwise scores of one query, which run the one-token kernel over every token."""
    _require_triton("pairwise_scores", device, torch.float32)
    from source_fast.kernels import pairwise, self_influence

    spies = {}
    for mod, name in [(pairwise, "_pairwise_kernel"), (pairwise, "_pairwise_t1_kernel"),
                      (self_influence, "_self_scores_kernel"), (self_influence, "_self_scores_t1_kernel")]:
        spies[name] = _LaunchSpy(getattr(mod, name))
        monkeypatch.setattr(mod, name, spies[name])
    a, g = torch.randn(4, t, 10, device=device), torch.randn(4, t, 6, device=device)
    ops.pairwise_scores(a, g, torch.randn(q, 6, 10, device=device), backend="triton")
    ops.self_scores(a, g, torch.rand(6, 10, device=device), backend="triton")
    launched = {name: spy.launches for name, spy in spies.items()}
    pairwise_t1, self_t1 = int(t == 1 or q == 1), int(t == 1)
    assert launched == {"_pairwise_kernel": 1 - pairwise_t1, "_pairwise_t1_kernel": pairwise_t1,
                        "_self_scores_kernel": 1 - self_t1, "_self_scores_t1_kernel": self_t1}


def test_t1_split_reductions_match_unsplit_and_repeat(device, monkeypatch):
    """Pretending to have many SMs splits the d_out (pairwise) and d_a (self) blocks over programs; the
    slabs are summed in a fixed order, so repeated runs agree bit for bit."""
    _require_triton("pairwise_scores", device, torch.float32)
    from source_fast.kernels import _common

    a = torch.randn(9, 1, 150, device=device)
    g = torch.randn(9, 1, 200, device=device)
    mask = torch.rand(9, 1, device=device) > 0.2
    u = torch.randn(2, 200, 150, device=device)
    scale = torch.rand(200, 150, device=device)
    p_unsplit = ops.pairwise_scores(a, g, u, mask, backend="triton")
    s_unsplit = ops.self_scores(a, g, scale, mask, backend="triton")
    monkeypatch.setattr(_common, "num_sms", lambda device: 8)
    p_split = ops.pairwise_scores(a, g, u, mask, backend="triton")
    s_split = ops.self_scores(a, g, scale, mask, backend="triton")
    # Only the summation order differs: fp32 round-off of sums of ~150-200 unit-scale products.
    torch.testing.assert_close(p_split, p_unsplit, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(s_split, s_unsplit, rtol=1e-5, atol=1e-4)
    assert torch.equal(ops.pairwise_scores(a, g, u, mask, backend="triton"), p_split)
    assert torch.equal(ops.self_scores(a, g, scale, mask, backend="triton"), s_split)


# Long sequences can take _pairwise_gemm_kernel (opt-in, SOURCE_FAST_PAIRWISE_GEMM=1): one example's
# 128×128 tile (the interpreter's config) per program over tokens, then an fp32 epilogue per query into
# per-tile partials. The shapes are not multiples of the tile or the 64-token step; the tests call the
# launcher directly, past the rule that picks it (which the dispatch test below checks).
GEMM_SHAPES = [(3, 70, 150, 130), (2, 7, 33, 65), (4, 1, 20, 13)]  # n, t, d_a, d_out


def _gemm_scores(a, g, u, mask):
    from source_fast.kernels import _common, pairwise

    return pairwise._pairwise_scores_gemm(a, g, u, _common.mask_u8(mask, a.shape[0], a.shape[1], a.device))


@pytest.mark.parametrize("n, t, d_a, d_out", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, mask_kind", VARIANTS)
@pytest.mark.parametrize("q", [1, 17])
def test_pairwise_gemm_matches_reference(n, t, d_a, d_out, dtype, layout, mask_kind, q, device):
    _require_triton("pairwise_scores", device, dtype)
    a = _tokens(n, t, d_a, dtype, device, layout)
    g = _tokens(n, t, d_out, dtype, device, layout)
    mask = _mask(n, t, device, mask_kind)
    if mask is not None:
        mask[-1] = 0  # an example with every token dropped scores exactly 0
    u = torch.randn(q, d_out, d_a, device=device)
    if layout != "contiguous":
        u = torch.randn(q, d_a, d_out, device=device).transpose(1, 2)  # feature-major
    if q == 1:
        u = u.to(dtype)  # U in the inputs' dtype: the epilogue upcasts it
    out = _gemm_scores(a, g, u, mask)
    m64 = None if mask is None else mask.cpu()
    ref64 = reference.pairwise_scores(a.double().cpu(), g.double().cpu(), u.double().cpu(), m64)
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u, mask), dtype)
    if mask is not None:
        assert torch.equal(out[-1], torch.zeros(q, device=device))


@pytest.mark.parametrize("gemm, t, q", [("1", 64, 8), ("1", 64, 9), ("0", 64, 8), ("1", 63, 2)])
def test_pairwise_gemm_is_opt_in_and_follows_the_rule(gemm, t, q, device, monkeypatch):
    """SOURCE_FAST_PAIRWISE_GEMM=1 sends t ≥ 64, t ≥ 8·q, d_out, d_a ≥ 64 to _pairwise_gemm_kernel; anything
    else (and everything without the flag) to the token-tile kernel. Both give the same scores, and the GEMM
    kernel's per-tile partials are summed in a fixed order: reruns agree bit for bit."""
    _require_triton("pairwise_scores", device, torch.float32)
    from source_fast.kernels import pairwise

    monkeypatch.setenv("SOURCE_FAST_PAIRWISE_GEMM", gemm)
    spies = {}
    for name in ("_pairwise_kernel", "_pairwise_gemm_kernel"):
        spies[name] = _LaunchSpy(getattr(pairwise, name))
        monkeypatch.setattr(pairwise, name, spies[name])
    a, g = torch.randn(3, t, 130, device=device), torch.randn(3, t, 70, device=device)
    mask = torch.rand(3, t, device=device) > 0.2
    u = torch.randn(q, 70, 130, device=device)
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    taken = int(gemm == "1" and t >= 64 and t >= 8 * q)
    assert {k: s.launches for k, s in spies.items()} == {"_pairwise_kernel": 1 - taken, "_pairwise_gemm_kernel": taken}
    ref64 = reference.pairwise_scores(a.double().cpu(), g.double().cpu(), u.double().cpu(), mask.cpu())
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u, mask), torch.float32)
    if taken:
        assert torch.equal(ops.pairwise_scores(a, g, u, mask, backend="triton"), out)


def test_pairwise_gemm_grid_limit_is_chunked(device, monkeypatch):
    """Tiles × examples share grid axis 0 (2^31 - 1 programs): past it the launcher splits the examples."""
    _require_triton("pairwise_scores", device, torch.float32)
    from source_fast.kernels import pairwise

    a, g = torch.randn(5, 6, 70, device=device), torch.randn(5, 6, 130, device=device)
    mask = torch.rand(5, 6, device=device) > 0.2
    u = torch.randn(3, 130, 70, device=device)
    whole = _gemm_scores(a, g, u, mask)
    monkeypatch.setattr(pairwise, "MAX_GRID_X", 2 * 3 * 2)  # 6 tiles of 64² at most: two examples a launch
    assert torch.equal(_gemm_scores(a, g, u, mask), whole)


# ---- realistic sizes, native bf16/fp16 MMA: GPU only -------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("t, d_a, d_out", [(512, 1024, 1024), (128, 1024, 4096), (1, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_lambda_and_self_scores_at_scale(t, d_a, d_out, dtype):
    dev = torch.device("cuda")
    n = 32 if t == 1 else 4
    a = torch.randn(n, t, d_a, device=dev, dtype=dtype)
    g = torch.randn(n, t, d_out, device=dev, dtype=dtype)
    mask = torch.rand(n, t, device=dev) > 0.1
    lam = torch.zeros(d_out, d_a, device=dev)
    ops.accumulate_lambda_(lam, a, g, mask, backend="triton")
    ref64 = torch.zeros(d_out, d_a, device=dev, dtype=torch.float64)
    reference.accumulate_lambda_(ref64, a.double(), g.double(), mask)
    same = torch.zeros(d_out, d_a, device=dev)
    reference.accumulate_lambda_(same, a, g, mask)
    _assert_close(lam, ref64, same, dtype)
    scale = torch.rand(d_out, d_a, device=dev)
    out = ops.self_scores(a, g, scale, mask, backend="triton")
    _assert_close(out, reference.self_scores(a.double(), g.double(), scale.double(), mask),
                  reference.self_scores(a, g, scale, mask), dtype)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("t, d_a, d_out, q", [(256, 1024, 1024, 20), (1, 4096, 1024, 20), (256, 1024, 1024, 1)])
def test_cuda_pairwise_at_scale(t, d_a, d_out, q):
    dev = torch.device("cuda")
    a = torch.randn(48, t, d_a, device=dev, dtype=torch.bfloat16)
    g = torch.randn(48, t, d_out, device=dev, dtype=torch.bfloat16)
    u = torch.randn(q, d_out, d_a, device=dev)
    out = ops.pairwise_scores(a, g, u, backend="triton")
    ref64 = reference.pairwise_scores(a.double(), g.double(), u.double())
    _assert_close(out, ref64, reference.pairwise_scores(a, g, u), torch.bfloat16)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_pairwise_gemm_at_scale(dtype, monkeypatch):
    """The wgmma tile kernel (SOURCE_FAST_PAIRWISE_GEMM=1) compiled and autotuned at a GPT-2-like size, with
    tails in every dimension (d_out, d_a not multiples of 64, t not of the token step) and a mask."""
    monkeypatch.setenv("SOURCE_FAST_PAIRWISE_GEMM", "1")
    from source_fast.kernels import pairwise

    dev = torch.device("cuda")
    n, t, d_a, d_out, q = 6, 300, 1030, 770, 20
    a = torch.randn(n, t, d_a, device=dev).to(dtype)
    g = torch.randn(n, t, d_out, device=dev).to(dtype)
    mask = torch.rand(n, t, device=dev) > 0.1
    mask[-1] = False
    u = torch.randn(q, d_out, d_a, device=dev)
    spy = _LaunchSpy(pairwise._pairwise_gemm_kernel)
    monkeypatch.setattr(pairwise, "_pairwise_gemm_kernel", spy)
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    assert spy.launches == 1
    _assert_close(out, reference.pairwise_scores(a.double(), g.double(), u.double(), mask),
                  reference.pairwise_scores(a, g, u, mask), dtype)
    assert torch.equal(out[-1], torch.zeros(q, device=dev))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_t1_kernels_at_scale(dtype):
    """One token per example at MLP sizes, every dtype: TF32 MMA (16-bit) or full fp32 (fp32 inputs)."""
    dev = torch.device("cuda")
    n, d_a, d_out, q = 1000, 1030, 770, 20  # not multiples of the blocks: masked tails on the tensor cores
    a = torch.randn(n, 1, d_a, device=dev).to(dtype)
    g = torch.randn(n, 1, d_out, device=dev).to(dtype)
    mask = torch.rand(n, 1, device=dev) > 0.1
    u = torch.randn(q, d_out, d_a, device=dev)
    out = ops.pairwise_scores(a, g, u, mask, backend="triton")
    _assert_close(out, reference.pairwise_scores(a.double(), g.double(), u.double(), mask),
                  reference.pairwise_scores(a, g, u, mask), dtype)
    scale = torch.rand(d_out, d_a, device=dev)
    out = ops.self_scores(a, g, scale, mask, backend="triton")
    _assert_close(out, reference.self_scores(a.double(), g.double(), scale.double(), mask),
                  reference.self_scores(a, g, scale, mask), dtype)


@pytest.mark.parametrize("t, q", [(1, 3), (1, 70), (5, 3), (2, 1)])  # token sum, tiles (one token, many queries), tiles, token sum
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_layout", ["plain", "feature_major"])
@pytest.mark.parametrize("blocks", ["whole", "bands of 3 rows, examples 2 at a time", "one row, one example"])
def test_reference_pairwise_paths_match_float64(t, q, dtype, query_layout, blocks, monkeypatch):
    """The reference picks one of two contractions by shape (one token with 64+ queries takes the
    tiles: measured faster); each must give Σ_t g_tᵀ U_q a_t, formed here explicitly in float64.
    Inputs are rounded to `dtype` first and the reference accumulates in fp32: 1e-5 of max|ref|.
    The tiles are formed in bands of their rows (d_a's with the feature-major layout, d_out's with
    the plain one), a block of examples at a time: 3 rows (11 and 19 are not multiples) of 2 examples."""
    row_bytes = 4 * (11 if query_layout == "feature_major" else 19)  # a tile row, fp32: d_out or d_a entries
    monkeypatch.setattr(reference, "_MIN_BAND", 3)
    block_bytes = {"whole": 1 << 30, "one row, one example": 1, "bands of 3 rows, examples 2 at a time": 6 * row_bytes}
    monkeypatch.setattr(reference, "TOKEN_BLOCK_BYTES", block_bytes[blocks])
    g0 = torch.Generator().manual_seed(t * 100 + q)
    n, d_a, d_out = 6, 19, 11
    a = torch.randn(n, t, d_a, generator=g0).to(dtype)
    g = torch.randn(n, t, d_out, generator=g0).to(dtype)
    mask = torch.rand(n, t, generator=g0) > 0.3
    u = torch.randn(q, d_out, d_a, generator=g0)
    if query_layout == "feature_major":  # as scoring lays the queries out on CPU
        u = u.transpose(1, 2).contiguous().transpose(1, 2)
    keep = mask[..., None].double()
    tiles = torch.einsum("nto,nti->noi", g.double() * keep, a.double() * keep)
    ref = torch.einsum("noi,qoi->nq", tiles, u.double())
    out = reference.pairwise_scores(a, g, u, mask)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("t, q", [(1, 2), (3, 1), (3, 2), (70, 2)])
@pytest.mark.parametrize("side", ["a", "g"])
def test_inf_in_a_kept_token_gives_the_references_inf_not_nan(t, q, side, device, monkeypatch):
    """An inf in a kept token of example 0 (all inputs positive, so no inf − inf): first principles and the
    reference give +inf for that example; the kernels' padded tile lanes (0 · inf) must not turn it into NaN,
    whatever the sizes modulo the blocks (7, 9 here: padding in every dimension). Other examples unaffected."""
    _require_triton("pairwise_scores", device, torch.float32)
    monkeypatch.setenv("SOURCE_FAST_PAIRWISE_GEMM", "1" if t == 70 else "0")
    d_a, d_out = (65, 66) if t == 70 else (9, 7)  # t = 70: the opt-in GEMM kernel takes it (d ≥ 64, t ≥ 8q)
    a = torch.rand(3, t, d_a, device=device) + 0.5
    g = torch.rand(3, t, d_out, device=device) + 0.5
    (a if side == "a" else g)[0, 0, 4] = math.inf
    u, scale = torch.rand(q, d_out, d_a, device=device) + 0.1, torch.rand(d_out, d_a, device=device) + 0.1
    for got, want in [(ops.pairwise_scores(a, g, u, backend="triton"), reference.pairwise_scores(a, g, u)),
                      (ops.self_scores(a, g, scale, backend="triton"), reference.self_scores(a, g, scale))]:
        assert torch.isinf(want[0]).all() and torch.isinf(got[0]).all(), got[0]
        torch.testing.assert_close(got[1:], want[1:], rtol=1e-5, atol=1e-4)
