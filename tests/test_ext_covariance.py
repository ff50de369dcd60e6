"""torch.ops.source_fast.covariance_accumulate_ (the C++/CUDA extension) against float64 truth.

Tolerance. fp16/bf16 → fp32 is exact, and so is every product of two fp16/bf16 values in fp32, so
for every input dtype the only error is fp32 accumulation. The float64 truth is computed from the
same (already rounded) inputs, and the bound is the one for fp32 dot products: |error| ≤ γ·Σ|aᵢbᵢ|
with γ ≈ rows·2⁻²⁴ in the worst case and ≈ √rows·2⁻²⁴ in practice. The tests use
    max|ext - truth| ≤ 1e-5 · (|alpha|·max(|X̂|ᵀ|X̂|) + max|cov₀|)
(the cov₀ term covers the one rounding of the in-place add), which holds with margin for the
≤ 5000-row cases here; the torch fp32 path's own error is printed next to it on failure.
Exception: fp16/bf16 on CUDA run on tensor cores, which align each k-step's products and truncate
(round toward zero), so the error on the positive diagonal sums Σx² grows in one direction, up to
one fp32 ulp per row: there the bound's 1e-5 becomes max(1e-5, rows·2⁻²³) (2.4e-4 at 2048 rows; a
model of the truncation with no guard bits gives 2.3e-5, so real bugs, O(1) relative, still fail).
"""

from __future__ import annotations

import os

import pytest
import torch

from source_fast import _dispatch, _ext, ops, reference

REQUIRE_EXT = os.environ.get("SOURCE_FAST_REQUIRE_EXT") == "1"
RTOL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Without SOURCE_FAST_REQUIRE_EXT=1 a missing extension skips these tests (pure-Python installs);
# with it, nothing skips and test_extension_loaded fails loudly.
pytestmark = pytest.mark.skipif(
    _ext.load_error is not None and not REQUIRE_EXT, reason=f"extension not loaded: {_ext.load_error}"
)


def _op():
    return torch.ops.source_fast.covariance_accumulate_


def _truth(cov0, x, mask, ones, alpha):
    """(cov₀ + alpha·X̂ᵀX̂ in float64 built the obvious way, max(|X̂|ᵀ|X̂|) for the error bound)."""
    xd = x.double()
    if ones:
        xd = torch.cat([xd, xd.new_ones(xd.shape[0], 1)], dim=1)
    if mask is not None:
        xd = xd[mask != 0]
    return cov0.double() + alpha * (xd.T @ xd), (xd.abs().T @ xd.abs()).max()


def _same_layout_copy(t):
    """A copy with t's strides (clone() makes sliced views contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _check(covs0, xs, masks, ones, alpha):
    """Runs the op and the torch fp32 reference on copies of covs0 and compares both to float64."""
    covs = [_same_layout_copy(c) for c in covs0]
    _op()(covs, xs, masks, ones, alpha)
    ref = [_same_layout_copy(c) for c in covs0]
    reference.covariance_accumulate_(ref, xs, masks, ones, alpha)
    for i, (cov, base, cov0, x, mask, one) in enumerate(zip(covs, ref, covs0, xs, masks, ones)):
        truth, scale = _truth(cov0, x, mask, one, alpha)
        rtol = max(RTOL, x.shape[0] * 2**-23) if x.is_cuda and x.dtype != torch.float32 else RTOL
        bound = rtol * (abs(alpha) * scale + cov0.abs().max()).item()
        err = (cov.double() - truth).abs().max().item()
        base_err = (base.double() - truth).abs().max().item()
        assert err <= bound, (
            f"layer {i} ({x.dtype}, {tuple(x.shape)}, ones={one}, mask={mask is not None}): "
            f"max|Δ|={err:.3g} > bound {bound:.3g}; torch fp32 path max|Δ|={base_err:.3g}"
        )
    return covs


def _symmetric(n, device="cpu"):
    c = torch.randn(n, n, device=device)
    return c + c.T


def test_extension_loaded():
    if not REQUIRE_EXT:
        pytest.skip("SOURCE_FAST_REQUIRE_EXT is not 1")
    assert _ext._C is not None, _ext.load_error
    assert _ext.has_op("covariance_accumulate_", "cpu")


# (rows, d, ones, mask kind): d = 300 spans two 256-wide column panels; the (200, 300) layer is
# more than half of the call's work, so with 2+ threads one call runs both CPU schedules (a
# dominant layer alone with multi-threaded BLAS, the rest one layer per thread).
RAGGED = [
    (37, 5, True, None),
    (1, 1, True, "bool"),
    (64, 17, False, "float"),
    (200, 300, True, "bool"),
    (13, 64, True, "none_kept"),
    (90, 300, False, None),
    (0, 8, True, None),
    (50, 33, True, "int"),
]


def _mask(kind, rows, device="cpu"):
    if kind is None:
        return None
    if kind == "bool":
        return torch.rand(rows, device=device) > 0.4
    if kind == "float":  # zeros and non-zeros of mixed sign: only exact zeros drop a row
        return torch.randint(-1, 2, (rows,), device=device).float() * torch.rand(rows, device=device)
    if kind == "int":
        return torch.randint(0, 3, (rows,), device=device)
    assert kind == "none_kept"
    return torch.zeros(rows, dtype=torch.bool, device=device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_ragged_layers_match_float64(dtype, alpha):
    xs = [torch.randn(rows, d).to(dtype) for rows, d, _, _ in RAGGED]
    masks = [_mask(kind, rows) for rows, _, _, kind in RAGGED]
    ones = [one for _, _, one, _ in RAGGED]
    covs0 = [_symmetric(d + one) for (_, d, one, _) in RAGGED]
    covs = _check(covs0, xs, masks, ones, alpha)
    for i, cov in enumerate(covs):
        assert torch.equal(cov, cov.T), f"layer {i}: result is not exactly symmetric"


def _views(dtype):
    """Non-contiguous (rows, d) inputs: a column slice, a row-strided slice, a transposed view, and
    one with neither stride equal to 1."""
    wide = torch.randn(70, 90).to(dtype)
    return {
        "column_slice": wide[:, 5:48],
        "row_stride": wide[::3, :41],
        "transposed": torch.randn(29, 61).to(dtype).T,
        "no_unit_stride": wide[::2, ::3],
    }


@pytest.mark.parametrize("view", ["column_slice", "row_stride", "transposed", "no_unit_stride"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_non_contiguous_inputs(view, dtype, masked):
    x = _views(dtype)[view]
    assert not x.is_contiguous()
    mask = (torch.rand(x.shape[0]) > 0.5) if masked else None
    _check([_symmetric(x.shape[1] + 1)], [x], [mask], [True], 0.5)


def test_strided_and_non_symmetric_covs():
    """covs may be views, and a non-symmetric cov still gets exactly cov₀ + alpha·X̂ᵀX̂ (each
    triangle its own old value plus the same increment)."""
    xs = [torch.randn(40, 20), torch.randn(40, 11)]
    covs0 = [torch.randn(30, 30)[3:24, 2:23], torch.randn(12, 12).T]
    covs = _check(covs0, xs, [None, torch.rand(40) > 0.5], [True, True], 1.0)
    assert [c.stride() for c in covs] == [(30, 1), (1, 12)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_cross_conversion_blocks(dtype):
    """Enough kept rows (about 4500) that masked and bf16 inputs are gathered/converted in two
    blocks (a block is 2²² elements: 4072 rows of width 1030)."""
    x = torch.randn(5000, 1030).to(dtype)
    mask = torch.rand(5000) > 0.1
    _check([torch.zeros(1031, 1031)], [x], [mask], [True], 1.0)


def test_empty_call_is_a_no_op():
    # The dispatcher needs a tensor to pick a kernel, so the raw op cannot take empty lists;
    # ops.covariance_accumulate_ returns before dispatching.
    ops.covariance_accumulate_([], [], [], [], backend="ext")


def test_opcheck():
    xs = [torch.randn(7, 3), torch.randn(5, 4).half(), torch.randn(6, 2).bfloat16()]
    covs = [torch.zeros(4, 4), torch.zeros(4, 4), _symmetric(2)]
    args = (covs, xs, [torch.rand(7) > 0.3, None, torch.rand(6)], [True, False, False], 0.5)
    torch.library.opcheck(_op().default, args)


def _good_layers():
    xs = [torch.randn(6, 3), torch.randn(5, 4)]
    return [torch.zeros(4, 4), torch.zeros(5, 5)], xs, [None, torch.ones(5)], [True, True]


# Each case breaks layer 1 only; the error must name it.
BAD_LAYER_1 = {
    "x_dtype_float64": (lambda c, x, m, o: x.__setitem__(1, x[1].double()), "float32, float16 or bfloat16"),
    "x_dtype_int": (lambda c, x, m, o: x.__setitem__(1, x[1].int()), "float32, float16 or bfloat16"),
    "x_not_2d": (lambda c, x, m, o: x.__setitem__(1, x[1].reshape(5, 2, 2)), r"\(rows, d\)"),
    "cov_not_float32": (lambda c, x, m, o: c.__setitem__(1, c[1].double()), "covs must be float32"),
    "cov_not_square": (lambda c, x, m, o: c.__setitem__(1, torch.zeros(5, 4)), "square"),
    "cov_wrong_size": (lambda c, x, m, o: c.__setitem__(1, torch.zeros(4, 4)), r"must be \(5, 5\)"),
    "cov_without_ones_slot": (lambda c, x, m, o: o.__setitem__(1, False), r"must be \(4, 4\)"),
    "cov_expanded": (lambda c, x, m, o: c.__setitem__(1, torch.zeros(1, 5).expand(5, 5)), "overlapping"),
    "mask_wrong_length": (lambda c, x, m, o: m.__setitem__(1, torch.ones(4)), r"mask must be \(5,\)"),
    "mask_2d": (lambda c, x, m, o: m.__setitem__(1, torch.ones(5, 1)), r"mask must be \(5,\)"),
    "cov_other_device": (lambda c, x, m, o: c.__setitem__(1, torch.zeros(5, 5, device="meta")), "must be on cpu"),
    "mask_other_device": (lambda c, x, m, o: m.__setitem__(1, torch.ones(5, device="meta")), "must be on cpu"),
    "mask_float8": (lambda c, x, m, o: m.__setitem__(1, torch.ones(5).to(torch.float8_e4m3fn)), "float16 or wider"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYER_1))
def test_bad_input_names_the_layer(case):
    covs, xs, masks, ones = _good_layers()
    breaker, message = BAD_LAYER_1[case]
    breaker(covs, xs, masks, ones)
    with pytest.raises(RuntimeError, match=rf"covariance_accumulate_: layer 1: .*{message}"):
        _op()(covs, xs, masks, ones)


def test_compiled_with_dynamic_shapes_compiles_once():
    """The Meta kernel checks symbolic sizes: every batch's row count must not be pinned (a recompile
    per batch shape, then a fall-back to eager)."""
    from torch._dynamo.testing import CompileCounter

    def accumulate(cov, x, mask):
        _op()([cov], [x], [mask], [True])
        return cov

    counter = CompileCounter()
    compiled = torch.compile(accumulate, backend=counter, fullgraph=True, dynamic=True)
    for rows in (10, 17, 33):
        x, mask = torch.randn(rows, 5), torch.rand(rows) > 0.3
        expected = torch.zeros(6, 6)
        _op()([expected], [x], [mask], [True])
        torch.testing.assert_close(compiled(torch.zeros(6, 6), x, mask), expected, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_layers_sharing_a_cov_are_refused():
    """Layers are accumulated concurrently, so a shared or overlapping cov would be a data race."""
    covs, xs, masks, ones = _good_layers()
    big = torch.zeros(5, 5)
    with pytest.raises(RuntimeError, match="layers 0 and 1: covs share memory"):
        _op()([big[:4, :4], big], xs, masks, ones)


def test_thousands_of_layers_viewing_one_input_and_one_stack_of_covs():
    """A grouped convolution's groups are layers whose inputs are column slices of one tensor (they may
    overlap each other: only covs are written) and whose covs may be slices of one stack: accepted,
    each layer as the reference computes it; a cov overlapping another, or an input, anywhere in the
    list is refused by the indices of the pair."""
    layers, d = 3000, 3
    x = torch.randn(7, layers * d + 1)
    xs = [x[:, i * d : i * d + d + 1] for i in range(layers)]  # neighbours share a column
    stack = torch.zeros(layers, d + 2, d + 2)
    covs = list(stack.unbind(0))
    _op()(covs, xs, [None] * layers, [True] * layers)
    expected = torch.zeros(layers, d + 2, d + 2)
    reference.covariance_accumulate_(list(expected.unbind(0)), xs, [None] * layers, [True] * layers)
    torch.testing.assert_close(stack, expected, rtol=1e-6, atol=1e-5)
    flat = torch.zeros(layers * (d + 2) ** 2 + 1)
    shifted = [flat[i * (d + 2) ** 2 : (i + 1) * (d + 2) ** 2].view(d + 2, d + 2) for i in range(layers)]
    shifted[2100] = flat[2099 * (d + 2) ** 2 + 1 : 2100 * (d + 2) ** 2 + 1].view(d + 2, d + 2)  # one element into 2099's
    with pytest.raises(RuntimeError, match="layers 2099 and 2100: covs share memory"):
        _op()(shifted, xs, [None] * layers, [True] * layers)
    inputs = list(xs)
    inputs[1500] = stack[700, :, : d + 1]
    with pytest.raises(RuntimeError, match="layer 1500's xs shares memory with layer 700's cov"):
        _op()(covs, inputs, [None] * layers, [True] * layers)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e39, -1e300])
def test_non_finite_alpha_is_refused(alpha):
    """The backends would disagree on it (a layer with no kept rows: skipped on CPU, += NaN·0 on CUDA).
    The kernels scale in float32, where 1e39 is infinite too."""
    covs, xs, masks, ones = _good_layers()
    before = [c.clone() for c in covs]
    with pytest.raises(RuntimeError, match=r"covariance_accumulate_: alpha must be finite \(in float32\)"):
        _op()(covs, xs, masks, ones, alpha)
    with pytest.raises(ValueError, match=r"covariance_accumulate_: alpha must be finite \(in float32\)"):
        reference.covariance_accumulate_(covs, xs, masks, ones, alpha)
    assert all(torch.equal(a, b) for a, b in zip(covs, before))


def test_the_covs_written_are_seen_by_autograd():
    """As for torch's in-place ops: the covs' versions go up, so a backward through a cov saved before
    the op changed it raises, and a cov that requires grad is refused, not changed behind autograd."""
    x = torch.randn(20, 5)
    cov = torch.ones(6, 6)
    _op()([cov], [x], [None], [True])
    assert cov._version == 1
    w = torch.randn(6, 6, requires_grad=True)
    saved = torch.ones(6, 6)
    y = (w * saved).sum()  # mul saves `saved` for w's gradient
    _op()([saved], [x], [None], [True])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    leaf = torch.zeros(6, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="layer 0: cov requires grad, and the op is not differentiable"):
        _op()([leaf], [x], [None], [True])
    with torch.no_grad():
        _op()([leaf], [x], [None], [True])
    with torch.inference_mode():  # no version counters there; the op still runs
        inf_cov = torch.zeros(6, 6)
        _op()([inf_cov], [x], [None], [True])
    torch.testing.assert_close(leaf.detach(), inf_cov)


def test_float64_covs_go_to_the_reference():
    """A model with one float64 parameter gets float64 factors while its layers' inputs stay float32:
    the extension takes float32 covs only, so auto sends such calls to the reference and a forced
    extension says why. Before, auto chose the extension by the inputs' dtype and the fit failed."""
    import source_fast as sf
    from _helpers import ClassifyTask, classification_data

    x = torch.randn(20, 5)
    cov = torch.zeros(6, 6, dtype=torch.float64)
    ops.covariance_accumulate_([cov], [x], [None], [True])
    truth, _ = _truth(torch.zeros(6, 6), x, None, True, 1.0)
    torch.testing.assert_close(cov, truth)
    with pytest.raises(NotImplementedError, match=r"backend 'ext' cannot run covariance_accumulate_: .* got cov 0 torch.float64"):
        ops.covariance_accumulate_([cov], [x], [None], [True], backend="ext")

    class Tempered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)
            self.temperature = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x))) * self.temperature.float()

    torch.manual_seed(0)
    model = Tempered()
    data = classification_data(20, 4, 3, dtype=torch.float32)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical", batch_size=7)
    assert factors.segments[0]["fc1"].a_cov.dtype == torch.float64


def test_xs_that_share_memory_with_a_cov_are_refused():
    """A cov is written while other layers (run concurrently, in cost order) may still read their xs."""
    covs, xs, masks, ones = _good_layers()
    with pytest.raises(RuntimeError, match="layer 0's xs shares memory with layer 1's cov"):
        _op()(covs, [covs[1][: xs[0].shape[0], : xs[0].shape[1]], xs[1]], masks, ones)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_masks(dtype):
    """Every integer mask means `!= 0`; nonzero() has no unsigned 16/32/64-bit kernel to lean on."""
    x = torch.randn(40, 6)
    keep = torch.rand(40) > 0.5
    mask = (keep.to(torch.int64) * torch.randint(1, 2**15, (40,))).to(dtype)  # non-zero values of any size
    cov = torch.zeros(7, 7)
    _op()([cov], [x], [mask], [True])
    truth, _ = _truth(torch.zeros(7, 7), x, keep, True, 1.0)
    torch.testing.assert_close(cov.double(), truth, rtol=1e-6, atol=1e-5)


def test_inputs_that_require_grad():
    """Layer inputs captured from a model in training carry requires_grad; the op reads them as data."""
    x = torch.randn(30, 5, requires_grad=True)
    cov = torch.zeros(6, 6)
    _op()([cov], [x], [None], [True])
    truth, _ = _truth(torch.zeros(6, 6), x.detach(), None, True, 1.0)
    torch.testing.assert_close(cov.double(), truth, rtol=1e-6, atol=1e-5)


def test_mismatched_list_lengths():
    covs, xs, masks, ones = _good_layers()
    with pytest.raises(RuntimeError, match="got 2 covs, 2 xs, 1 masks and 2 append_ones flags"):
        _op()(covs, xs, masks[:1], ones)


def test_ops_backend_ext_and_auto_choice():
    xs = [torch.randn(20, 9).bfloat16(), torch.randn(15, 4)]
    masks = [torch.rand(20) > 0.5, None]
    covs0 = [_symmetric(10), _symmetric(4)]
    direct = [c.clone() for c in covs0]
    _op()(direct, xs, masks, [True, False], 2.0)
    via_ops = [c.clone() for c in covs0]
    ops.covariance_accumulate_(via_ops, xs, masks, [True, False], 2.0, backend="ext")
    for a, b in zip(direct, via_ops):
        assert torch.equal(a, b)
    if os.environ.get("SOURCE_FAST_DISABLE_EXT") != "1" and os.environ.get("SOURCE_FAST_BACKEND") != "torch":
        assert _dispatch.select("covariance_accumulate_", torch.device("cpu"), torch.float32) == "ext"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pipeline", ["0", "1"], ids=["general", "pipelined"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_float64(dtype, pipeline, monkeypatch):
    # SOURCE_FAST_COV_PIPELINE=1 sends fp16/bf16 layers with aligned rows and d % 8 == 0 to the
    # cp.async kernel (read by the binding at every call); the rest still take the general one.
    monkeypatch.setenv("SOURCE_FAST_COV_PIPELINE", pipeline)
    if not _ext.has_op("covariance_accumulate_", "cuda"):
        pytest.skip(f"extension has no CUDA kernel (build_info: {_ext.build_info()})")
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("bfloat16 needs compute capability 8.0")
    dev = "cuda"
    # GPT-2-like widths plus odd ones that leave partial 128-wide tiles, aligned and unaligned
    # row pitches (16-byte vector loads vs element loads), a transposed view, and every mask kind.
    wide = torch.randn(1100, 3100, device=dev).to(dtype)
    cases = [
        (torch.randn(2048, 768, device=dev).to(dtype), _mask("bool", 2048, dev), True),
        (wide[:1000, 1:3073], _mask("float", 1000, dev), True),
        (torch.randn(777, 130, device=dev).to(dtype).T.contiguous().T, None, False),
        (torch.randn(300, 257, device=dev).to(dtype), _mask("int", 300, dev), True),
        (torch.randn(5, 1, device=dev).to(dtype), _mask("none_kept", 5, dev), True),
        (torch.randn(1, 3, device=dev).to(dtype), None, True),
        # Pipelined-kernel shapes: the ones column opening a tile of its own (d = 256), inside a
        # tile (d = 136), a padded row pitch (264), fewer rows than the pipeline's depth, a row
        # count that leaves a partial last slab.
        (torch.randn(1001, 256, device=dev).to(dtype), _mask("float", 1001, dev), True),
        (torch.randn(333, 136, device=dev).to(dtype), None, True),
        (torch.randn(300, 264, device=dev).to(dtype)[:, :256], _mask("bool", 300, dev), False),
        (torch.randn(7, 8, device=dev).to(dtype), None, True),
    ]
    xs = [x for x, _, _ in cases]
    masks = [m for _, m, _ in cases]
    ones = [o for _, _, o in cases]
    covs0 = [_symmetric(x.shape[1] + o, dev) for x, _, o in cases]
    covs = _check(covs0, xs, masks, ones, 0.75)
    for i, cov in enumerate(covs):
        assert torch.equal(cov, cov.T), f"layer {i}: CUDA result is not exactly symmetric"
    # Deterministic: one writer per element, so a rerun is bit-identical.
    again = [c.clone() for c in covs0]
    _op()(again, xs, masks, ones, 0.75)
    for i, (a, b) in enumerate(zip(covs, again)):
        assert torch.equal(a, b), f"layer {i}: CUDA result differs between runs"
    torch.library.opcheck(_op().default, ([c.clone() for c in covs0[3:]], xs[3:], masks[3:], ones[3:], 0.5))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_pipelined_kernel_is_bit_identical_to_the_general_one(dtype, monkeypatch):
    """Same shared-memory contents, same WMMA k order, same epilogue: the cp.async kernel must give the
    general kernel's floats exactly (a far tighter check than the float64 bound)."""
    if not _ext.has_op("covariance_accumulate_", "cuda"):
        pytest.skip(f"extension has no CUDA kernel (build_info: {_ext.build_info()})")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the pipelined kernel needs compute capability 8.0")
    dev = "cuda"
    xs = [torch.randn(1001, 256, device=dev).to(dtype), torch.randn(333, 136, device=dev).to(dtype),
          torch.randn(300, 264, device=dev).to(dtype)[:, :256], torch.randn(7, 8, device=dev).to(dtype),
          torch.randn(2048, 768, device=dev).to(dtype)]
    masks = [_mask("float", 1001, dev), None, _mask("bool", 300, dev), None, _mask("int", 2048, dev)]
    ones = [True, True, False, True, True]
    results = {}
    for pipeline in ("0", "1"):
        monkeypatch.setenv("SOURCE_FAST_COV_PIPELINE", pipeline)
        covs = [torch.zeros(x.shape[1] + o, x.shape[1] + o, device=dev) for x, o in zip(xs, ones)]
        _op()(covs, xs, masks, ones, 0.5)
        results[pipeline] = covs
    for i, (a, b) in enumerate(zip(results["0"], results["1"])):
        assert torch.equal(a, b), f"layer {i}: pipelined and general kernels differ by {(a - b).abs().max().item():.3g}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_is_refused():
    if not _ext.has_op("covariance_accumulate_", "cuda"):
        pytest.skip(f"extension has no CUDA kernel (build_info: {_ext.build_info()})")
    x, cov = torch.randn(64, 16, device="cuda"), torch.zeros(17, 17, device="cuda")
    _op()([cov], [x], [None], [True], 1.0)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            _op()([cov], [x], [None], [True], 1.0)
