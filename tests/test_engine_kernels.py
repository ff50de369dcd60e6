"""The engine driving the Triton kernels (under TRITON_INTERPRET on CPU) gives the torch engine's
answers: checks the shapes, strides, masks and dtypes the engine really hands the kernels.

Automatic dispatch never picks the interpreter, so the test points it at Triton for the three
kernel ops; nothing else changes."""

import copy

import pytest
import torch
from test_layers import GroupedNet, ImageTask, TokenModel, TokenTask, _image_data, _token_data

import source_fast as sf
from source_fast import _dispatch, _triton


@pytest.fixture
def triton_everywhere(monkeypatch):
    if _dispatch.unsupported_reasons("triton", "pairwise_scores", torch.device("cpu"), torch.float32):
        pytest.fail("the Triton interpreter must be available on CPU test machines (TRITON_INTERPRET=1, triton installed)")
    chosen = []

    def auto(op, device_type, device_index, dtype, flags):
        backend = "triton" if op in ("accumulate_lambda_", "self_scores", "pairwise_scores") else "torch"
        chosen.append((op, backend))
        return backend

    monkeypatch.setattr(_dispatch, "_auto", auto)
    return chosen


def _run(model, task, data, queries):
    states = [{k: v.clone() for k, v in model.state_dict().items()}, {k: v * 1.05 for k, v in model.state_dict().items()}]
    traj = sf.Trajectory.even(states, [0.1] * 8, 2, data, momentum=0.5)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=6)
    final = traj.final()
    f_final = sf.fit_factors(model, task, final, fisher="empirical", batch_size=6)
    # An Adam segment: its queries stay in the eigenbases too (Adam's preconditioner is taken by its diagonal
    # there), so the same kernel ops score it.
    trained = copy.deepcopy(model)
    trained.load_state_dict(states[1])
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    task.compute_train_loss(data.tensors, trained).backward()
    opt.step()
    adam = sf.Trajectory([sf.Segment([states[1]], data, lr_sum=0.3, optimizer="adam", optimizer_states=[opt.state_dict()])])
    f_adam = sf.fit_factors(model, task, adam, fisher="empirical", batch_size=6)
    return (
        factors,
        sf.score(model, task, traj, factors, data, queries, batch_size=5),
        sf.score(model, task, final, f_final, data, queries, method="ekfac", batch_size=5),
        sf.self_score(model, task, final, f_final, data, method="ekfac", batch_size=5),
        sf.score(model, task, adam, f_adam, data, queries, batch_size=5),
    )


def _float(data):
    return torch.utils.data.TensorDataset(*(t.float() if t.is_floating_point() else t for t in data.tensors))


@pytest.mark.parametrize("grouped", [False, True], ids=["tokens", "grouped_conv"])
def test_engine_with_triton_kernels_matches_torch_engine(triton_everywhere, grouped):
    """Masked token sequences; grouped convolutions, whose groups' inputs reach the kernels as column
    slices of the unfolded input (strided views, without a bias column to copy them)."""
    assert _triton.interpreting()
    torch.manual_seed(0)
    if grouped:
        model, task = GroupedNet().float(), ImageTask()
        data, queries = _float(_image_data(14, 0)), _float(_image_data(3, 2))
    else:
        model, task = TokenModel().float(), TokenTask()
        data, queries = _float(_token_data(14, 6, 0, garbage=1)), _float(_token_data(3, 6, 2, garbage=2))
    fast = _run(model, task, data, queries)
    assert {op for op, b in triton_everywhere if b == "triton"} == {"accumulate_lambda_", "self_scores", "pairwise_scores"}
    triton_everywhere.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOURCE_FAST_BACKEND", "torch")
        ref = _run(model, task, data, queries)
    assert not triton_everywhere  # the reference run never asked for a kernel
    for a, b in zip(fast[0].segments, ref[0].segments):
        for name in a:
            assert torch.allclose(a[name].lam, b[name].lam, rtol=1e-4, atol=1e-7)
    # fp32 throughout; the kernels and torch sum in different orders: agree to 1e-4 of the scale.
    for x, y in zip(fast[1:], ref[1:]):
        assert (x - y).abs().max() <= 1e-4 * y.abs().max(), (x - y).abs().max()
