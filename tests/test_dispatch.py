"""Backend choice: auto never picks the interpreter, forced backends run or say why, switches work."""

import pytest
import torch

from source_fast import _dispatch, _ext, _triton, ops

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def kernels_not_imported(monkeypatch):
    """These tests set TRITON_INTERPRET to stand for how the kernels would be imported: as if they had
    not been yet (once imported, their mode is fixed, whatever the environment says later)."""
    monkeypatch.setattr(_triton, "_imported_interpreted", None)


def test_auto_on_cpu_uses_torch_for_kernel_ops_and_the_extension_for_covariances():
    for op in ("accumulate_lambda_", "self_scores", "pairwise_scores"):
        assert _dispatch.select(op, CPU, torch.float32) == "torch"  # never the Triton interpreter
    expected = "ext" if _ext.load_error is None else "torch"
    assert _dispatch.select("covariance_accumulate_", CPU, torch.float32) == expected
    assert _dispatch.select("covariance_accumulate_", CPU, torch.float64) == "torch"  # kernels are fp32/16


def test_forced_backend_that_cannot_run_lists_the_reasons(monkeypatch):
    with pytest.raises(NotImplementedError, match=r"backend 'ext' cannot run pairwise_scores .*has no ext implementation"):
        _dispatch.select("pairwise_scores", CPU, torch.float32, "ext")
    with pytest.raises(NotImplementedError, match=r"dtype torch.float64 is not one of float32/float16/bfloat16"):
        _dispatch.select("pairwise_scores", CPU, torch.float64, "triton")
    monkeypatch.setenv("SOURCE_FAST_DISABLE_TRITON", "1")
    with pytest.raises(NotImplementedError, match="disabled by SOURCE_FAST_DISABLE_TRITON=1"):
        _dispatch.select("self_scores", CPU, torch.float32, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("SOURCE_FAST_DISABLE_TRITON")
    with pytest.raises(NotImplementedError, match="device is cpu, and Triton runs on CUDA"):
        ops.pairwise_scores(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3), torch.zeros(1, 3, 2), backend="triton")


def test_auto_for_cuda_tensors_follows_the_switches_and_skips_the_interpreter(monkeypatch):
    """No GPU needed: auto only reads the environment and the device type here. The interpreter
    never serves CUDA tensors, and a switch set after a first call takes effect (it is in the key)."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.select("pairwise_scores", cuda, torch.float32) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _dispatch.select("pairwise_scores", cuda, torch.float32) == "triton"
    monkeypatch.setenv("SOURCE_FAST_DISABLE_TRITON", "1")
    assert _dispatch.select("pairwise_scores", cuda, torch.float32) == "torch"


def test_forced_kernel_names_the_mixed_dtypes():
    a, g = torch.zeros(1, 2, 3, dtype=torch.bfloat16), torch.zeros(1, 2, 4, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match=r"one dtype for a bfloat16, g float16"):
        ops.pairwise_scores(a, g, torch.zeros(1, 4, 3), backend="triton")
    with pytest.raises(NotImplementedError, match=r"one dtype for a_rot bfloat16, g_rot float16"):
        ops.self_scores(a, g, torch.zeros(4, 3), backend="triton")
    with pytest.raises(NotImplementedError, match=r"lam must be float32, got torch.float64"):
        ops.accumulate_lambda_(torch.zeros(4, 3, dtype=torch.float64), a.float(), g.float(), backend="triton")
    # The reference takes mixed dtypes (in float64 here), so auto and torch run them.
    assert ops.pairwise_scores(a, g, torch.zeros(1, 4, 3)).shape == (1, 1)


def test_global_switch_and_bad_values(monkeypatch):
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "torch")
    assert _dispatch.select("covariance_accumulate_", CPU, torch.float32) == "torch"
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SOURCE_FAST_BACKEND='cuda' is not valid; the only valid value is 'torch'"):
        _dispatch.select("pairwise_scores", CPU, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'fast'; valid:"):
        _dispatch.select("pairwise_scores", CPU, torch.float32, "fast")
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        _dispatch.unsupported_reasons("torch", "nope", CPU, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'fast'; valid:"):
        ops.covariance_accumulate_([], [], [], [], backend="fast")  # nothing to do, still a wrong name


def test_info_says_why_auto_skips_each_backend(monkeypatch):
    """Every backend auto passes over has a reason: unsupported here, the interpreter, the global
    switch, or a faster one first (the Triton kernel before torch for pairwise_scores on CUDA)."""
    from source_fast import info

    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "(triton: auto never uses the Triton interpreter)" in info.report()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _dispatch.why_not_auto("torch", "pairwise_scores", cuda, torch.float32) == [
        "triton comes first for pairwise_scores"]
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "torch")
    assert "(triton: SOURCE_FAST_BACKEND=torch)" in info.report()
    monkeypatch.setenv("SOURCE_FAST_BACKEND", "bogus")
    assert "backend chosen automatically: none (SOURCE_FAST_BACKEND='bogus' is not valid" in info.report()


def test_inputs_that_require_grad_take_the_reference(monkeypatch):
    """The kernels record no autograd graph: auto computes with the reference (which does), a forced
    kernel is refused, and under no_grad nothing changes."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = torch.randn(2, 3, 4, requires_grad=True)
    g, scale = torch.randn(2, 3, 5), torch.rand(5, 4)
    out = ops.self_scores(a, g, scale)
    out.sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match=r"backend 'triton' cannot run self_scores: a_rot require grad.*no_grad"):
        ops.self_scores(a, g, scale, backend="triton")
    lam = torch.zeros(5, 4, requires_grad=True)  # a leaf updated in place: torch's own refusal
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        ops.accumulate_lambda_(lam, a.detach(), g)
    with pytest.raises(NotImplementedError, match=r"cannot run accumulate_lambda_: lam require grad"):
        ops.accumulate_lambda_(lam, a.detach(), g, backend="triton")
    with torch.no_grad():
        assert ops.self_scores(a, g, scale, backend="triton").shape == (2,)


def test_lambda_accumulator_must_be_a_float32_tensor_of_its_own():
    a, g = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    for backend in ("auto", "triton", "torch"):
        with pytest.raises(ValueError, match=r"lam \(strides \(0, 1\)\) has elements that share memory"):
            ops.accumulate_lambda_(torch.zeros(1, 4).expand(5, 4), a, g, backend=backend)
    with pytest.raises(ValueError, match="lam must be float32 \\(or float64\\), got torch.float16: a 16-bit"):
        ops.accumulate_lambda_(torch.zeros(5, 4, dtype=torch.float16), a, g)
    with pytest.raises(ValueError, match=r"mask must be \(n, t\) = \(2, 3\), got \(3,\)"):
        ops.self_scores(a, g, torch.rand(5, 4), torch.ones(3))  # the reference does not broadcast either


def test_switches_apply_at_every_call_and_take_only_0_or_1(monkeypatch):
    monkeypatch.setenv("SOURCE_FAST_DISABLE_EXT", "1")
    assert _dispatch.select("covariance_accumulate_", CPU, torch.float32) == "torch"
    with pytest.raises(NotImplementedError, match="disabled by SOURCE_FAST_DISABLE_EXT=1"):
        _dispatch.select("covariance_accumulate_", CPU, torch.float32, "ext")
    monkeypatch.setenv("SOURCE_FAST_DISABLE_EXT", "0")
    assert _dispatch.select("covariance_accumulate_", CPU, torch.float32) == ("ext" if _ext.load_error is None else "torch")
    monkeypatch.setenv("SOURCE_FAST_DISABLE_TRITON", "true")
    with pytest.raises(ValueError, match="SOURCE_FAST_DISABLE_TRITON='true' is not valid: use 1"):
        _dispatch.select("pairwise_scores", torch.device("cuda", 0), torch.float32)


def test_tensors_without_data_and_a_late_interpreter_switch_are_refused(monkeypatch):
    """Meta tensors have no data for a kernel to read. TRITON_INTERPRET=1 set after the kernels were
    imported compiled does not make them interpreted: forcing them on CPU tensors says so."""
    meta = torch.device("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(NotImplementedError, match="device is meta, and Triton runs on CUDA"):
        _dispatch.select("self_scores", meta, torch.float32, "triton")
    with pytest.raises(NotImplementedError, match="extension was built without a meta kernel" if _ext.load_error is None
                       else "extension not loaded"):
        _dispatch.select("covariance_accumulate_", meta, torch.float32, "ext")
    monkeypatch.setattr(_triton, "_imported_interpreted", False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET is 1 now, but source_fast.kernels was imported "
                                                  "compiled, which Triton fixes at import"):
        _dispatch.select("self_scores", CPU, torch.float32, "triton")


def test_the_engine_never_hands_the_ops_tensors_that_require_grad(monkeypatch):
    """Else auto would send every call to the reference (slow on a GPU, and silently)."""
    from _helpers import ClassifyTask, classification_data, mlp, perturbed_states

    import source_fast as sf

    calls = []
    real = ops._needs_reference

    def spy(op, backend, **tensors):
        calls.append((op, real(op, backend, **tensors)))
        return calls[-1][1]

    monkeypatch.setattr(ops, "_needs_reference", spy)
    model = mlp(5, 6, 3, dtype=torch.float32)
    data = classification_data(12, 5, 3, seed=1, dtype=torch.float32)
    traj = sf.Trajectory.even(perturbed_states(model, 2, scale=0.1), [0.1] * 4, 1, data)
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    sf.score(model, ClassifyTask(), traj, factors, data, data)
    final = traj.final()  # one checkpoint: the fused self-influence op
    sf.self_score(model, ClassifyTask(), final, sf.fit_factors(model, ClassifyTask(), final), data, method="ekfac")
    assert {op for op, _ in calls} == {"covariance_accumulate_", "accumulate_lambda_", "pairwise_scores", "self_scores"}
    assert not [op for op, needed in calls if needed]
