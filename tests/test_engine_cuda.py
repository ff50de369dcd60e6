"""The whole engine on a GPU, as users run it: automatic dispatch (Triton kernels, the CUDA
covariance extension), a GPT-2 built from a config with padded batches, two SOURCE segments with
momentum plus EK-FAC at the final checkpoint, against the float64 torch engine on the CPU."""

import copy

import pytest
import torch

import source_fast as sf
from source_fast import _dispatch
from source_fast.tasks import CausalLMTask

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Every op with a Triton kernel: automatic dispatch must pick it on CUDA.
KERNEL_OPS = ("accumulate_lambda_", "self_scores", "pairwise_scores")


def _data(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 2, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 211, (n, t), generator=g) * mask
    return [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(n)]


def _run(model, data, queries):
    task = CausalLMTask(tracked=[n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    base = {k: v.clone() for k, v in model.state_dict().items()}  # checkpoint 0 is no live weights
    states = [base, {k: v * 1.02 if v.is_floating_point() else v for k, v in base.items()}]
    traj = sf.Trajectory.even(states, [0.05] * 6, 2, data, momentum=0.9)
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=7)
    final = traj.final()
    f_final = sf.fit_factors(model, task, final, fisher="empirical", batch_size=7)
    return {
        "source": sf.score(model, task, traj, factors, data, queries, batch_size=6),
        "ekfac": sf.score(model, task, final, f_final, data, queries, method="ekfac", batch_size=6),
        "self_source": sf.self_score(model, task, traj, factors, data, batch_size=6),  # per-chunk walk
        "self_ekfac": sf.self_score(model, task, final, f_final, data, method="ekfac", batch_size=6),  # fused kernel
    }


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=211, n_positions=40,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def chosen(monkeypatch):
    picks = []
    auto = _dispatch._auto

    def recording(op, device_type, device_index, dtype, flags):
        backend = auto(op, device_type, device_index, dtype, flags)
        picks.append((op, device_type, backend))
        return backend

    monkeypatch.setattr(_dispatch, "_auto", recording)
    return picks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda_matches_float64_cpu_engine(dtype, chosen, monkeypatch):
    data, queries = _data(37, 33, 0), _data(5, 33, 1)
    cpu = _gpt2().double()
    gpu = copy.deepcopy(cpu).to("cuda", dtype)
    fast = _run(gpu, data, queries)
    used = {(op, backend) for op, dev, backend in chosen if dev == "cuda"}
    assert used >= {(op, "triton") for op in KERNEL_OPS} | {("covariance_accumulate_", "ext")}, used
    if dtype == torch.float32:
        # fp32 (no TF32: torch's default "highest" matmul precision) against float64: the scores of
        # a 2-layer model carry ~1e-6 relative rounding; 1e-3 of the largest score leaves room for
        # the exp(-cΛ) walk and the float64 eigendecomposition of fp32-accumulated factors.
        ref = _run(cpu.to(torch.float64), data, queries)
        for key in ref:
            err = ((fast[key].double().cpu() - ref[key]).abs().max() / ref[key].abs().max()).item()
            print(f"{key}: max error / max |score| = {err:.2e}")
            assert err < 1e-3, (key, err)
    else:
        # bf16 activations change the gradients themselves (8 mantissa bits), so the like-for-like
        # check is the same bf16 model through the torch reference ops on the GPU: only the kernels'
        # summation order and fp32 accumulation differ.
        monkeypatch.setenv("SOURCE_FAST_BACKEND", "torch")
        ref = _run(gpu, data, queries)
        for key in ref:
            x, y = fast[key].double().flatten(), ref[key].double().flatten()
            err = ((x - y).abs().max() / y.abs().max()).item()
            corr = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
            print(f"{key}: max error / max |score| = {err:.2e}, Pearson {corr:.6f}")
            assert corr > 0.999 and err < 5e-2, (key, err, corr)


def test_kronfluence_shim_scales_float16_autocast_losses_on_cuda(tmp_path):
    """kronfluence's amp_dtype=float16 on CUDA: the shim scales the loss by amp_scale for the backward
    pass, as kronfluence's GradScaler does, so output gradients of 1e-8 (below float16's smallest
    number) survive: the covariances equal the float32 fit's to float16 rounding."""
    from types import SimpleNamespace

    from source_fast.interop import kronfluence as kf

    class TinyLoss(sf.Task):
        def compute_train_loss(self, batch, model, sample=False):
            return 1e-8 * torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).cuda()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    covs = {}
    for name, amp in (("float32", None), ("float16", torch.float16)):
        analyzer = kf.Analyzer("run", kf.prepare_model(copy.deepcopy(model), TinyLoss()), TinyLoss(),
                               disable_tqdm=True, output_dir=str(tmp_path / name))
        analyzer.fit_all_factors("f", data, per_device_batch_size=8,
                                 factor_args=SimpleNamespace(use_empirical_fisher=True, amp_dtype=amp))
        covs[name] = analyzer.load_covariance_matrices("f")["gradient_covariance"]
    for layer, want in covs["float32"].items():
        error = float((covs["float16"][layer] - want).norm() / want.norm())
        assert error < 1e-2, (layer, error)


def test_grouped_convolutions_on_cuda_match_float64_cpu_engine(chosen):
    """A grouped and a depthwise convolution on CUDA, as users run them: each group's input reaches the
    covariance extension and the Triton kernels as a strided column view, thousands of groups make one
    extension call long; fp32 against the float64 CPU engine (the tolerance of the GPT-2 test above)."""
    from test_layers import GroupedNet, ImageTask, _image_data

    def run(model, data, queries):
        task = ImageTask()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        states = [base, {k: v * 1.02 for k, v in base.items()}]
        traj = sf.Trajectory.even(states, [0.05] * 6, 2, data, momentum=0.9)
        factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=7)
        final = traj.final()
        f_final = sf.fit_factors(model, task, final, fisher="empirical", batch_size=7)
        return {"source": sf.score(model, task, traj, factors, data, queries, batch_size=6),
                "ekfac": sf.score(model, task, final, f_final, data, queries, method="ekfac", batch_size=6),
                "self_ekfac": sf.self_score(model, task, final, f_final, data, method="ekfac", batch_size=6)}

    def as_float(d):
        return torch.utils.data.TensorDataset(*(t.float() if t.is_floating_point() else t for t in d.tensors))

    torch.manual_seed(0)
    cpu = GroupedNet().double()
    data, queries = _image_data(30, 1), _image_data(4, 2)
    fast = run(copy.deepcopy(cpu).to("cuda", torch.float32), as_float(data), as_float(queries))
    used = {(op, backend) for op, dev, backend in chosen if dev == "cuda"}
    assert used >= {(op, "triton") for op in KERNEL_OPS} | {("covariance_accumulate_", "ext")}, used
    ref = run(cpu, data, queries)
    for key in ref:
        err = ((fast[key].double().cpu() - ref[key]).abs().max() / ref[key].abs().max()).item()
        print(f"{key}: max error / max |score| = {err:.2e}")
        assert err < 1e-3, (key, err)
