"""Backend choice: auto never picks the interpreter, forced backends run or say why, switches work."""

import pytest
import torch

from source_fast import _dispatch, _ext, ops

CPU = torch.device("cpu")


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
