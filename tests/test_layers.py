"""Token sequences with padding masks, Conv2d and transformers' Conv1D against explicit per-example
gradients (torch.func) and the dense EK-FAC matrix: checks the token layout, unfold order and masks."""

import copy
import json

import pytest
import torch
from _helpers import ClassifyTask, dense_curvature
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import source_fast as sf


class TokenModel(nn.Module):
    """Per-token MLP over (batch, tokens, features), used as a stand-in for a sequence model."""

    def __init__(self, d=3, h=4, k=3):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, k, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class TokenTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y, mask = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits).sample()
        per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return (per_token * mask).sum()

    compute_measurement = lambda self, batch, model: self.compute_train_loss(batch, model)  # noqa: E731

    def get_attention_mask(self, batch):
        return batch[2]


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(1, 2), padding=1)
        self.head = nn.Linear(3 * 4 * 3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class ImageTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    compute_measurement = compute_train_loss


def _token_data(n, t_pad, seed, garbage):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (n,), generator=g)
    x = torch.randn(n, 5, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n, 5), generator=g)
    mask = (torch.arange(5)[None] < lengths[:, None]).double()
    pad = t_pad - 5
    gx = torch.Generator().manual_seed(garbage)
    x = torch.cat([x, torch.randn(n, pad, 3, generator=gx, dtype=torch.float64)], 1)
    x = torch.where(torch.cat([mask, torch.zeros(n, pad, dtype=torch.float64)], 1)[..., None] > 0, x, 100 * torch.randn(x.shape, generator=gx, dtype=torch.float64))
    y = torch.cat([y, torch.randint(0, 3, (n, pad), generator=gx)], 1)
    mask = torch.cat([mask, torch.zeros(n, pad, dtype=torch.float64)], 1)
    return TensorDataset(x, y, mask)


def _explicit_grads(model, loss_of_example, data, names, inputs=1):
    """Per-example gradients by vmap: the model takes an example's first `inputs` tensors, the loss its
    output and the rest."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, *ex):
        ex = [e[None] for e in ex]
        return loss_of_example(functional_call(model, p, tuple(ex[:inputs])), *ex[inputs:])

    g = vmap(grad(example_loss), in_dims=(None,) + (0,) * len(data.tensors))(params, *data.tensors)
    blocks = []
    for name, module in names:
        w = g[f"{name}.weight"]
        w = w.transpose(1, 2) if type(module).__name__ == "Conv1D" else w.flatten(2)
        if f"{name}.bias" in g:
            w = torch.cat([w, g[f"{name}.bias"][..., None]], 2)
        blocks.append(w.flatten(1))
    return torch.cat(blocks, 1)


def _check_ekfac_dense(model, task, loss_of_example, data, queries, damping=0.01, inputs=1):
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, batch_size=3)
    scores = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=damping, batch_size=4)
    names = [(s.name, dict(model.named_modules())[s.name]) for s in factors.layers]
    h = torch.block_diag(*(dense_curvature(factors.segments[0][n]) for n, _ in names))
    v = _explicit_grads(model, loss_of_example, queries, names, inputs)
    g = _explicit_grads(model, loss_of_example, data, names, inputs)
    expected = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), v.T).T @ g.T / len(data)
    err = (scores - expected).abs().max() / expected.abs().max()
    assert err < 1e-9, err
    return factors, scores


def _token_loss(logits, y, mask):
    return (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * mask.flatten()).sum()


def test_masked_tokens_match_explicit_gradients_and_ignore_padding():
    torch.manual_seed(0)
    model = TokenModel().double()
    data, queries = _token_data(24, 7, 0, garbage=1), _token_data(3, 7, 5, garbage=2)
    factors, scores = _check_ekfac_dense(model, TokenTask(), _token_loss, data, queries)
    # Same examples, more padding and other garbage under the mask: identical factors and scores.
    data2, queries2 = _token_data(24, 9, 0, garbage=7), _token_data(3, 9, 5, garbage=8)
    torch.manual_seed(0)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data2, lr_sum=1.0)])
    f2 = sf.fit_factors(model, TokenTask(), traj, fisher="empirical")
    f1 = sf.fit_factors(model, TokenTask(), sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)]), fisher="empirical")
    for name in ("inp", "out"):
        assert torch.allclose(f1.segments[0][name].a_cov, f2.segments[0][name].a_cov, rtol=1e-12, atol=0)
        assert torch.allclose(f1.segments[0][name].lam, f2.segments[0][name].lam, rtol=1e-10, atol=1e-15)
    s1 = sf.score(model, TokenTask(), traj, f2, data2, queries2, method="ekfac", damping=0.01)
    s2 = sf.score(model, TokenTask(), traj, f1, data, queries, method="ekfac", damping=0.01)
    assert torch.allclose(s1, s2, rtol=1e-9, atol=1e-14)


class NanSafeTokenTask(TokenTask):
    """The loss selects the real tokens (a product with the mask would be NaN · 0 = NaN)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y, mask = batch
        per_token = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        return torch.where(mask > 0, per_token, 0).sum()

    compute_measurement = compute_train_loss


def test_nan_under_the_mask_does_not_reach_factors_or_scores():
    """NaN inputs at padded positions (a fully masked attention row gives them) make NaN activations
    and, through tanh', NaN output gradients there: masked tokens must be dropped, not multiplied by 0."""
    torch.manual_seed(0)
    model, task = TokenModel().double(), NanSafeTokenTask()
    data, queries = _token_data(24, 7, 0, garbage=1), _token_data(3, 7, 5, garbage=2)
    x, y, mask = data.tensors
    poisoned = TensorDataset(torch.where(mask[..., None] > 0, x, float("nan")), y, mask)
    results = []
    for d in (data, poisoned):
        traj = sf.Trajectory([sf.Segment([model.state_dict()], d, lr_sum=1.0)])
        factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=5)
        results.append((factors, sf.score(model, task, traj, factors, d, queries, method="ekfac", damping=0.01),
                        sf.self_score(model, task, traj, factors, d, method="ekfac", damping=0.01)))
    (f1, s1, self1), (f2, s2, self2) = results
    for name in ("inp", "out"):
        for field in ("a_cov", "s_cov", "lam"):
            assert torch.equal(getattr(f1.segments[0][name], field), getattr(f2.segments[0][name], field)), (name, field)
    assert torch.equal(s1, s2) and torch.equal(self1, self2)


def test_conv2d_string_padding_matches_explicit_gradients():
    """padding="same" with an even kernel pads one more on the right/bottom, like torch's convolution."""
    torch.manual_seed(0)
    model = ConvNet().double()
    model.conv = nn.Conv2d(2, 3, kernel_size=(3, 2), padding="same", dilation=(1, 2)).double()
    model.head = nn.Linear(3 * 4 * 5, 4).double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 2, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (20,), generator=g))
    queries = TensorDataset(torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (2,), generator=g))
    _check_ekfac_dense(model, ImageTask(), lambda out, y: F.cross_entropy(out, y, reduction="sum"), data, queries)


class SignalNet(nn.Module):
    """nn.Conv1d layers (strided and dilated with padding, then "same"), as a 1-D signal model has."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=2, dilation=2)
        self.same = nn.Conv1d(3, 2, kernel_size=4, padding="same", bias=False)
        self.head = nn.Linear(2 * 5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.same(torch.tanh(self.conv(x)))).flatten(1))


def test_conv1d_matches_explicit_gradients(tmp_path):
    """nn.Conv1d is unfolded as an image of height 1: tracked by default, its EK-FAC scores equal the
    dense ones from explicit per-example gradients."""
    torch.manual_seed(0)
    model = SignalNet().double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 2, 9, generator=g, dtype=torch.float64), torch.randint(0, 4, (20,), generator=g))
    queries = TensorDataset(torch.randn(3, 2, 9, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g))
    factors, _ = _check_ekfac_dense(model, ImageTask(), lambda out, y: F.cross_entropy(out, y, reduction="sum"), data,
                                    queries)
    assert [(s.name, s.kind, s.d_in, s.d_out, s.has_bias) for s in factors.layers] == [
        ("conv", "nn_conv1d", 6, 3, True), ("same", "nn_conv1d", 12, 2, False), ("head", "linear", 10, 4, True)]
    # kronfluence tracks no Conv1d: its scores from exported files would leave the layers out, silently.
    from source_fast.interop import kronfluence as kf

    with pytest.raises(ValueError, match=r"modules \[\"'conv' \(torch nn.Conv1d\)\", \"'same' \(torch nn.Conv1d\)\"\] are "
                                         r"layers kronfluence does not track"):
        kf.save_factors(factors, tmp_path / "factors_conv1d")


class GroupedNet(nn.Module):
    """A grouped convolution (2 groups) and a depthwise one with two output channels per input channel
    (6 groups, no bias), as ResNeXt's and MobileNet's or ConvNeXt's blocks have."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(6, 12, 3, stride=2, groups=6, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.depthwise(torch.tanh(self.conv(x)))).mean((2, 3)))


class SplitGroups(nn.Module):
    """A grouped convolution written as one convolution per group on its input channels, with the same
    weights: plain layers, whose factors are checked against first principles elsewhere."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        groups, self.width = conv.groups, conv.in_channels // conv.groups
        rows = conv.out_channels // groups
        self.parts = nn.ModuleList()
        for g in range(groups):
            part = nn.Conv2d(self.width, rows, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)
            part.weight.data = conv.weight.data[g * rows : (g + 1) * rows].clone()
            if conv.bias is not None:
                part.bias.data = conv.bias.data[g * rows : (g + 1) * rows].clone()
            self.parts.append(part)

    def forward(self, x):
        return torch.cat([p(x[:, g * self.width : (g + 1) * self.width]) for g, p in enumerate(self.parts)], 1)


def _image_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _layer_grads(model, layers, data) -> list[torch.Tensor]:
    """Explicit per-example gradients (vmap) of each tracked layer, (n, d_out, d_a): a group's are its
    output channels' rows of its module's weight (and bias), which hold only its input channels."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None], reduction="sum")

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, *data.tensors)
    blocks = []
    for s in layers:
        rows = slice(s.group * s.d_out, (s.group + 1) * s.d_out)
        w = grads[f"{s.module}.weight"][:, rows].flatten(2)
        if s.has_bias:
            w = torch.cat([w, grads[f"{s.module}.bias"][:, rows, None]], 2)
        blocks.append(w)
    return blocks


def test_grouped_convolutions_match_explicit_gradients_per_group(tmp_path):
    """A grouped convolution's weights are one block per group, (C_out/G, C_in/G · k): each group is a
    layer with Kronecker factors of its own. EK-FAC scores equal the dense block-diagonal EK-FAC from
    explicit per-example gradients (float64, 1e-9: only round-off differs), Λ equals the mean squared
    gradient in each group's eigenbasis, the blocks are all of the parameters, and per-module scores and
    self-influence add each module's groups up."""
    torch.manual_seed(0)
    model, task = GroupedNet().double(), ImageTask()
    data, queries = _image_data(30, 1), _image_data(3, 2)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=7)
    assert [(s.name, s.d_in, s.d_out, s.has_bias) for s in factors.layers] == (
        [(f"conv[{g}]", 18, 3, True) for g in range(2)] + [(f"depthwise[{g}]", 9, 2, False) for g in range(6)]
        + [("head", 12, 3, True)])
    assert [s.name for s in sf.capture.tracked_layers(model, ["conv", "head"])] == ["conv[0]", "conv[1]", "head"]
    with pytest.raises(ValueError, match=r"tracked module 'conv\[1\]' does not exist in the model: a grouped "
                                         r"convolution's groups are tracked together, as its module 'conv'"):
        sf.capture.tracked_layers(model, ["conv[1]"])

    g_train, g_query = _layer_grads(model, factors.layers, data), _layer_grads(model, factors.layers, queries)
    assert sum(b[0].numel() for b in g_train) == sum(p.numel() for p in model.parameters())
    for s, gn in zip(factors.layers, g_train):
        lf = factors.segments[0][s.name]
        expected = (lf.q_s.T @ gn @ lf.q_a).square().mean(0)
        assert torch.allclose(lf.lam, expected, rtol=1e-9, atol=1e-14 * expected.max()), s.name

    damping = 0.01
    scores = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=damping, batch_size=4)
    h = torch.block_diag(*(dense_curvature(factors.segments[0][s.name]) for s in factors.layers))
    v, g = torch.cat([b.flatten(1) for b in g_query], 1), torch.cat([b.flatten(1) for b in g_train], 1)
    expected = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), v.T).T @ g.T / len(data)
    assert (scores - expected).abs().max() < 1e-9 * expected.abs().max()

    parts = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=damping, per_module=True)
    assert sorted(parts) == ["conv", "depthwise", "head"]
    assert torch.allclose(sum(parts.values()), scores, rtol=1e-10, atol=1e-14)
    own = sf.self_score(model, task, traj, factors, data, method="ekfac", damping=damping, per_module=True)
    assert sorted(own) == ["conv", "depthwise", "head"]
    solved = torch.linalg.solve(h + damping * torch.eye(h.shape[0], dtype=h.dtype), g.T).T
    assert torch.allclose(sum(own.values()), (solved * g).sum(1) / len(data), rtol=1e-9, atol=0)

    factors.save(tmp_path / "grouped")
    loaded = sf.Factors.load(tmp_path / "grouped")
    assert loaded.layers == factors.layers
    assert json.loads((tmp_path / "grouped" / "factors.json").read_text())["format_version"] == 4
    assert torch.allclose(sf.score(model, task, traj, loaded, data, queries, method="ekfac", damping=damping, batch_size=4),
                          scores, rtol=1e-12, atol=0)


def test_heuristic_damping_is_per_module_so_a_silent_group_takes_its_modules():
    """kronfluence's heuristic damping, 0.1 × mean Λ, is per module: a grouped convolution's groups share
    their module's. A depthwise group whose input channel is always 0 has Λ = 0, where 0.1 × its own
    mean would be no damping at all (and refused). Scores equal the dense EK-FAC with each module's
    damping (float64, 1e-9)."""
    torch.manual_seed(0)
    model, task = GroupedNet().double(), ImageTask()
    with torch.no_grad():  # conv's group 0 outputs 0: depthwise groups 0-2 see nothing
        model.conv.weight[:3] = 0
        model.conv.bias[:3] = 0
    data, queries = _image_data(20, 1), _image_data(2, 2)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=6)
    lams = {s.name: factors.segments[0][s.name].lam for s in factors.layers}
    assert all(float(lams[f"depthwise[{g}]"].abs().max()) == 0 for g in range(3)) and float(lams["depthwise[3]"].max()) > 0
    scores = sf.score(model, task, traj, factors, data, queries, method="ekfac", batch_size=4)
    module_mean = {m: torch.cat([lams[s.name].flatten() for s in factors.layers if s.module == m]).mean()
                   for m in ("conv", "depthwise", "head")}
    h = torch.block_diag(*(dense_curvature(factors.segments[0][s.name]) for s in factors.layers))
    delta = torch.cat([torch.full((s.d_out * s.d_a,), 0.1 * float(module_mean[s.module]), dtype=h.dtype)
                       for s in factors.layers])

    def explicit(d):
        return torch.cat([b.flatten(1) for b in _layer_grads(model, factors.layers, d)], 1)

    expected = torch.linalg.solve(h + torch.diag(delta), explicit(queries).T).T @ explicit(data).T / len(data)
    assert (scores - expected).abs().max() < 1e-9 * expected.abs().max()
    own = sf.self_score(model, task, traj, factors, data, method="ekfac", batch_size=4)
    g = explicit(data)
    assert torch.allclose(own, (torch.linalg.solve(h + torch.diag(delta), g.T).T * g).sum(1) / len(data), rtol=1e-9, atol=0)


def test_eigendecompose_batches_small_matrices_with_the_same_results():
    """Small covariances of one size (a depthwise convolution's groups: thousands) are decomposed as one
    batch: the same numbers as one call per matrix (LAPACK runs per matrix either way), whatever each
    matrix's dtype and row count."""
    from source_fast.factors import _eigh, eigendecompose

    g = torch.Generator().manual_seed(0)
    covs = [(lambda x: (x.T @ x).to(dt))(torch.randn(50, d, generator=g, dtype=torch.float64))
            for d, dt in [(10, torch.float32), (10, torch.float64), (3, torch.float32), (10, torch.float32),
                          (70, torch.float32), (3, torch.float32)]]
    counts = [5, 7, 1, 2.5, 3, torch.tensor([4])]
    found = eigendecompose(covs, [c.dtype for c in covs], torch.device("cpu"), counts)
    for c, n, (values, vectors) in zip(covs, counts, found):
        one = _eigh(c, n)
        assert torch.equal(values, one[0].to(c.dtype)) and torch.equal(vectors, one[1].to(c.dtype))


def _split_state(state: dict, modules: tuple[str, ...], groups: dict[str, int]) -> dict:
    """GroupedNet's checkpoint (or a per-parameter tensor dict) as SplitGroups' names hold it."""
    out = {}
    for key, value in state.items():
        module, field = key.rsplit(".", 1)
        if module not in modules:
            out[key] = value
            continue
        rows = value.shape[0] // groups[module]
        for g in range(groups[module]):
            out[f"{module}.parts.{g}.{field}"] = value[g * rows : (g + 1) * rows].clone()
    return out


def test_grouped_convolution_scores_as_its_groups_written_as_separate_layers():
    """SOURCE over an AdamW run (two segments, weight decay, Adam's per-parameter preconditioner): a model
    with grouped convolutions scores as the same model with each group written as a convolution of its
    own on its channels (the same weights and optimizer moments), layer for layer: factors, Adam's
    preconditioner, and scores (float64, 1e-10)."""
    torch.manual_seed(0)
    model, task = GroupedNet().double(), ImageTask()
    data, queries = _image_data(24, 1), _image_data(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    checkpoints, states = [], []
    for step in range(4):
        opt.zero_grad()
        task.compute_train_loss(data[step * 6 : (step + 1) * 6], model).backward()
        opt.step()
        checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
        states.append(copy.deepcopy(opt.state_dict()))

    groups = {"conv": 2, "depthwise": 6}
    split = copy.deepcopy(model)
    split.conv, split.depthwise = SplitGroups(model.conv), SplitGroups(model.depthwise)
    names_a = [n for n, _ in model.named_parameters()]
    names_b = [n for n, _ in split.named_parameters()]

    def split_optimizer_state(st):
        by_name = {name: st["state"][i] for i, name in enumerate(names_a)}
        moments = {f"{n}": {k: v for k, v in s.items() if k != "step"} for n, s in by_name.items()}
        step = next(iter(by_name.values()))["step"]
        per_field = {k: _split_state({n: m[k] for n, m in moments.items()}, tuple(groups), groups)
                     for k in ("exp_avg", "exp_avg_sq")}
        group = {**st["param_groups"][0], "params": list(range(len(names_b)))}
        return {"state": {i: {"step": step.clone(), "exp_avg": per_field["exp_avg"][n],
                              "exp_avg_sq": per_field["exp_avg_sq"][n]} for i, n in enumerate(names_b)},
                "param_groups": [group]}

    def trajectory(convert_ckpt, convert_state):
        return sf.Trajectory([
            sf.Segment([convert_ckpt(c) for c in checkpoints[i : i + 2]], data, lr_sum=0.1, optimizer="adamw",
                       weight_decay=0.1, optimizer_states=[convert_state(s) for s in states[i : i + 2]])
            for i in (0, 2)])

    same = lambda x: x  # noqa: E731
    traj_a = trajectory(same, same)
    traj_b = trajectory(lambda c: _split_state(c, tuple(groups), groups), split_optimizer_state)
    fa = sf.fit_factors(model, task, traj_a, fisher="empirical", batch_size=5)
    fb = sf.fit_factors(split, task, traj_b, fisher="empirical", batch_size=5)
    pairs = [(f"{m}[{g}]", f"{m}.parts.{g}") for m, n in groups.items() for g in range(n)] + [("head", "head")]
    assert [s.name for s in fa.layers] == [a for a, _ in pairs] and [s.name for s in fb.layers] == [b for _, b in pairs]
    for ell in range(2):
        for a, b in pairs:
            la, lb = fa.segments[ell][a], fb.segments[ell][b]
            for field in ("a_cov", "s_cov", "lam", "precond"):
                x, y = getattr(la, field), getattr(lb, field)
                assert torch.allclose(x, y, rtol=1e-10, atol=1e-13 * y.abs().max()), (ell, a, field)
    sa = sf.score(model, task, traj_a, fa, data, queries, method="source")
    sb = sf.score(split, task, traj_b, fb, data, queries, method="source")
    assert (sa - sb).abs().max() < 1e-10 * sb.abs().max()


def test_grouped_convolution_weight_decay_is_the_modules():
    """A weight_decay dict names modules: a grouped convolution's groups take their module's, and a
    missing entry is said by the module's name (a group's is no module to add). SOURCE over SGD with a
    decay per module scores as the model written with a convolution per group (float64, 1e-10)."""
    torch.manual_seed(0)
    model, task = GroupedNet().double(), ImageTask()
    data, queries = _image_data(16, 1), _image_data(2, 2)
    decay = {"conv": 0.3, "depthwise": 0.05, "head": 0.0}
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=2.0, weight_decay=decay)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=5)
    scores = sf.score(model, task, traj, factors, data, queries, method="source")
    groups = {"conv": 2, "depthwise": 6}
    split = copy.deepcopy(model)
    split.conv, split.depthwise = SplitGroups(model.conv), SplitGroups(model.depthwise)
    split_decay = {"head": 0.0, **{f"{m}.parts.{g}": decay[m] for m, n in groups.items() for g in range(n)}}
    split_traj = sf.Trajectory([sf.Segment([_split_state(model.state_dict(), tuple(groups), groups)], data, lr_sum=2.0,
                                           weight_decay=split_decay)])
    expected = sf.score(split, task, split_traj, sf.fit_factors(split, task, split_traj, fisher="empirical", batch_size=5),
                        data, queries, method="source")
    assert (scores - expected).abs().max() < 1e-10 * expected.abs().max()
    missing = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=2.0, weight_decay={"head": 0.0, "depthwise": 0.1})])
    with pytest.raises(ValueError, match=r"Segment weight_decay has no entry for tracked module 'conv' "):
        sf.score(model, task, missing, factors, data, queries, method="source")


class FramesNet(nn.Module):
    """A grouped convolution fed each example's frames, (examples × frames, C, H, W), as a video model's
    per-frame stem is; `frame_major` stacks them frames first instead, so rows are not one example's
    after another's."""

    def __init__(self, frame_major=False):
        super().__init__()
        self.frame_major = frame_major
        self.conv = nn.Conv2d(4, 4, 3, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (n, frames, 4, H, W)
        n, f = x.shape[:2]
        frames = (x.transpose(0, 1) if self.frame_major else x).reshape(n * f, *x.shape[2:])
        out = torch.tanh(self.conv(frames)).mean((2, 3)).reshape(f, n, 4).mean(0) if self.frame_major else (
            torch.tanh(self.conv(frames)).mean((2, 3)).reshape(n, f, 4).mean(1))
        return self.head(out)


def test_grouped_convolution_fed_frames_is_checked_once_as_a_module(recwarn):
    """The order check (which example each row belongs to) runs once per module, on the whole input: a
    group whose input channels are always 0 has rows alike for every example and would say nothing by
    itself (a warning said so), while its module's other channels show the order. Frames stacked
    frames first are refused by the same check."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 4, 5, 5, generator=g, dtype=torch.float64)
    x[:, :, :2] = 0  # group 0's input channels
    data = TensorDataset(x, torch.randint(0, 3, (12,), generator=g))
    model, task = FramesNet().double(), ImageTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=4)
    assert not [w for w in recwarn if "could not be checked" in str(w.message)]
    damping = 1e10  # the scores are then the gradients' dot products / (damping · N): the captured rows' check
    scores = sf.score(model, task, traj, factors, data, data, method="ekfac", damping=damping, batch_size=4)
    g_train = torch.cat([b.flatten(1) for b in _layer_grads(model, factors.layers, data)], 1)
    expected = g_train @ g_train.T / (damping * len(data))
    assert (scores - expected).abs().max() < 1e-6 * expected.abs().max()
    with pytest.raises(ValueError, match=r"module 'conv' takes several rows per example .* but not one example's rows "
                                         r"after another's"):
        sf.fit_factors(FramesNet(frame_major=True).double(), task, traj, fisher="empirical", batch_size=4)


def test_a_grouped_convolutions_non_finite_gradient_is_named():
    """Finiteness is checked once per module (a grouped convolution's groups are views of one gradient):
    a NaN reaching a group's output gradient, with the loss finite, is caught and named by its group,
    not carried into the factors."""

    class NanBackward(torch.autograd.Function):  # the identity, whose backward puts NaN in channel 5
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            grad[:, 5] = float("nan")
            return grad

    class NanNet(GroupedNet):
        def forward(self, x):
            return self.head(torch.tanh(NanBackward.apply(self.depthwise(torch.tanh(self.conv(x))))).mean((2, 3)))

    torch.manual_seed(0)
    model, task = NanNet().double(), ImageTask()
    data = _image_data(8, 1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=r"batch 0 .*non-finite gradient at module 'depthwise\[2\]'"):
        sf.fit_factors(model, task, traj, fisher="empirical", batch_size=4)


def test_grouped_convolutions_are_refused_by_the_kronfluence_interop(tmp_path):
    """kronfluence keeps one pair of factors per grouped convolution, from its inputs averaged over the
    groups: neither library reads the other's factors for such a module, and saying so beats files
    that convert silently wrong."""
    from source_fast.interop import kronfluence as kf

    model = GroupedNet().double()
    factors = sf.fit_factors(model, ImageTask(), sf.Trajectory([sf.Segment([model.state_dict()], _image_data(8, 1),
                                                                              lr_sum=1.0)]), fisher="empirical")
    refused = r"modules \[\"'conv' \(groups=2\)\", \"'depthwise' \(groups=6\)\"\] are grouped convolutions"
    with pytest.raises(ValueError, match=refused):
        kf.save_factors(factors, tmp_path / "factors_grouped")
    with pytest.raises(ValueError, match=refused):
        kf.prepare_model(model, ImageTask())
    head_only = kf.prepare_model(GroupedNet().double(), type("HeadTask", (ImageTask,), {
        "get_influence_tracked_modules": lambda self: ["head"]})())
    assert head_only is not None


class EncoderDecoder(nn.Module):
    """A toy encoder-decoder: `enc` sees the source's s tokens, `dec` the target's t tokens (each with the
    masked mean of the encoded source), so the two layers need masks of different lengths."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 4)
        self.dec = nn.Linear(3 + 4, 3)

    def forward(self, src, src_mask, tgt):
        h = torch.where(src_mask[..., None] > 0, torch.tanh(self.enc(src)), 0).sum(1) / src_mask.sum(1, keepdim=True)
        return self.dec(torch.cat([tgt, h[:, None].expand(-1, tgt.shape[1], -1)], -1))


def _seq2seq_loss(logits, y, tgt_mask):
    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return torch.where(tgt_mask.flatten() > 0, per_token, 0).sum()


class Seq2SeqTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        return _seq2seq_loss(model(*batch[:3]), *batch[3:])

    compute_measurement = compute_train_loss

    def get_attention_mask(self, batch):
        return {"enc": batch[1], "dec": batch[4]}  # per module: the source's and the target's


def _seq2seq_data(n, seed, garbage):
    """Sources of 2-6 real tokens in 7, targets of 1-4 in 5; garbage (large, seeded apart) under the masks."""
    g, gx = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(garbage)

    def padded(length, lo, hi):
        x = torch.randn(n, length, 3, generator=g, dtype=torch.float64)
        mask = (torch.arange(length)[None] < torch.randint(lo, hi + 1, (n,), generator=g)[:, None]).double()
        return torch.where(mask[..., None] > 0, x, 100 * torch.randn(x.shape, generator=gx, dtype=torch.float64)), mask

    (src, src_mask), (tgt, tgt_mask) = padded(7, 2, 6), padded(5, 1, 4)
    return TensorDataset(src, src_mask, tgt, torch.randint(0, 3, (n, 5), generator=g), tgt_mask)


def test_per_module_masks_match_explicit_gradients_and_ignore_padding():
    """A dict of masks (kronfluence's form for encoder-decoders): each layer drops its own padded tokens.
    Scores equal the dense EK-FAC built from explicit per-example gradients, and other garbage under the
    masks changes neither factors nor scores."""
    torch.manual_seed(0)
    model = EncoderDecoder().double()
    data, queries = _seq2seq_data(20, 0, garbage=1), _seq2seq_data(3, 5, garbage=2)
    factors, scores = _check_ekfac_dense(model, Seq2SeqTask(), _seq2seq_loss, data, queries, inputs=3)
    other = _seq2seq_data(20, 0, garbage=9)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], other, lr_sum=1.0)])
    refit = sf.fit_factors(model, Seq2SeqTask(), traj, batch_size=3)
    for name in ("enc", "dec"):
        assert torch.allclose(refit.segments[0][name].a_cov, factors.segments[0][name].a_cov, rtol=1e-12, atol=0)
        assert torch.allclose(refit.segments[0][name].lam, factors.segments[0][name].lam, rtol=1e-10, atol=1e-15)
    again = sf.score(model, Seq2SeqTask(), traj, refit, other, queries, method="ekfac", damping=0.01, batch_size=4)
    assert torch.allclose(again, scores, rtol=1e-9, atol=1e-14)


class RecurrentNet(nn.Module):
    """One `cell` Linear run at every step (shared weights), then a head: h_t = tanh(cell([x_t, h_{t-1}]))."""

    def __init__(self, d=3, h=4, k=3):
        super().__init__()
        self.cell = nn.Linear(d + h, h)
        self.head = nn.Linear(h, k)

    def forward(self, x, cell_outputs=None):
        h = x.new_zeros(x.shape[0], self.cell.out_features)
        for t in range(x.shape[1]):
            z = self.cell(torch.cat([x[:, t], h], 1))
            if cell_outputs is not None:
                cell_outputs.append(z)
            h = torch.tanh(z)
        return self.head(h)


def _recurrent_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _sum_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def test_a_shared_layer_sums_over_its_calls():
    """A layer run at every step of a recurrence: its factors average over every call's input and output
    gradient, and its per-example gradient sums over the calls. Factors against explicit per-call inputs
    and autograd's output gradients; scores against the dense EK-FAC of explicit per-example gradients."""
    torch.manual_seed(0)
    model = RecurrentNet().double()
    data, queries = _recurrent_data(16, 0), _recurrent_data(3, 1)
    _check_ekfac_dense(model, ClassifyTask(), _sum_ce, data, queries)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical", batch_size=5)
    x, y = data.tensors
    outputs = []
    _sum_ce(model(x, outputs), y).backward(inputs=outputs)  # every call's output gradient, summed loss
    h = [torch.zeros(len(x), 4, dtype=torch.float64)] + [torch.tanh(z.detach()) for z in outputs[:-1]]
    inputs = torch.cat([torch.cat([x[:, t], h[t], torch.ones(len(x), 1, dtype=torch.float64)], 1) for t in range(4)])
    grads = torch.cat([z.grad for z in outputs])
    rows = len(inputs)  # 16 examples × 4 calls
    cell = factors.segments[0]["cell"]
    assert torch.allclose(cell.a_cov, inputs.T @ inputs / rows, rtol=1e-12, atol=1e-14)
    assert torch.allclose(cell.s_cov, grads.T @ grads / rows, rtol=1e-10, atol=1e-14)
    # Λ: each example's gradient, summed over the calls (vmap through the loop), in the eigenbases, squared.
    per_example = _explicit_grads(model, _sum_ce, data, [("cell", model.cell)]).view(16, 4, 8)
    lam = ((cell.q_s.T @ per_example @ cell.q_a) ** 2).mean(0)
    assert torch.allclose(cell.lam, lam, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="per_token: module 'cell' runs 4 times per forward pass"):
        sf.score(model, ClassifyTask(), traj, factors, data, queries, method="ekfac", per_token=True)


def test_conv2d_unfold_layout_matches_weight_view():
    torch.manual_seed(0)
    model = ConvNet().double()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(20, 2, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (20,), generator=g))
    queries = TensorDataset(torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (2,), generator=g))
    factors, _ = _check_ekfac_dense(model, ImageTask(), lambda out, y: F.cross_entropy(out, y, reduction="sum"), data, queries)
    assert [s.d_a for s in factors.layers] == [2 * 3 * 2 + 1, 36 + 1]


def test_transformers_conv1d_layout():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Conv1D(4, 3)  # nf=4 outputs, nx=3 inputs
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.c(x)))

    torch.manual_seed(0)
    model = Net().double()
    data, queries = _token_data(16, 6, 0, garbage=1), _token_data(2, 6, 3, garbage=2)
    factors, _ = _check_ekfac_dense(model, TokenTask(), _token_loss, data, queries)
    assert factors.layers[0].kind == "conv1d" and (factors.layers[0].d_in, factors.layers[0].d_out) == (3, 4)


def test_an_in_place_op_after_the_first_tracked_layer():
    """The first tracked layer's output starts the autograd graph during a pass; ReLU(inplace=True)
    right after it must neither fail nor change the gradients (against explicit ones)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3), nn.ReLU(inplace=True),
                          nn.Linear(3, 3)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    _check_ekfac_dense(model, sf.tasks.ClassificationTask(), lambda out, y: F.cross_entropy(out, y, reduction="sum"),
                       TensorDataset(x[:24], y[:24]), TensorDataset(x[24:], y[24:]))


class DictTokenTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        per_token = F.cross_entropy(model(batch["x"]).flatten(0, 1), batch["y"].flatten(), reduction="none")
        return torch.where(batch["mask"].flatten() != 0, per_token, 0).sum()

    compute_measurement = compute_train_loss

    def get_attention_mask(self, batch):
        return batch["mask"]


def _padded_to(length):
    """Collate variable-length examples, padded to `length` tokens (None: the batch's longest)."""
    def collate(examples):
        t = length or max(len(e["y"]) for e in examples)
        x = torch.full((len(examples), t, 3), 7.0, dtype=torch.float64)  # garbage under the mask
        y, mask = torch.zeros(len(examples), t, dtype=torch.long), torch.zeros(len(examples), t, dtype=torch.long)
        for i, e in enumerate(examples):
            x[i, : len(e["y"])], y[i, : len(e["y"])], mask[i, : len(e["y"])] = e["x"], e["y"], 1
        return {"x": x, "y": y, "mask": mask}
    return collate


def test_per_token_scores_with_batches_padded_to_their_own_length():
    """A collate that pads each batch to its longest example gives batches of different token counts
    (the longest last, a batch of one-token examples in the middle): per-token scores are laid out on
    the longest, equal to padding every batch to it, and sum to the scores."""
    torch.manual_seed(0)
    model = TokenModel().double()
    g = torch.Generator().manual_seed(3)
    lengths = [3, 2, 3, 1, 1, 1, 5, 4, 2]
    train = [{"x": torch.randn(t, 3, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (t,), generator=g)}
             for t in lengths]
    queries = train[:2]
    task = DictTokenTask()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, collate_fn=_padded_to(None))
    kw = dict(method="ekfac", damping=0.01, batch_size=3)
    dynamic = sf.score(model, task, traj, factors, train, queries, collate_fn=_padded_to(None), per_token=True, **kw)
    fixed = sf.score(model, task, traj, factors, train, queries, collate_fn=_padded_to(5), per_token=True, **kw)
    assert dynamic.shape == fixed.shape == (2, 9, 5)
    assert torch.allclose(dynamic, fixed, rtol=1e-12, atol=1e-15)
    whole = sf.score(model, task, traj, factors, train, queries, collate_fn=_padded_to(None), **kw)
    assert torch.allclose(dynamic.sum(-1), whole, rtol=1e-12, atol=1e-15)
    for i, t in enumerate(lengths):
        assert (dynamic[:, i, t:] == 0).all()


def test_float16_tokens_are_rotated_in_float32():
    """A rotated entry can be as long as the whole input vector: 16 inputs of ±2e4 (each well inside
    float16's 65504) rotate to about 8e4 along the top eigenvector. Rotated in float16, Λ was inf and
    EK-FAC scores NaN; rotated in float32 they match a float64 copy to float16's rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # keeps the first layer's outputs O(1)
    sign = torch.randint(0, 2, (40, 16)) * 2 - 1
    x = 2e4 * sign * (1 + 0.1 * torch.rand(40, 16))
    y = torch.randint(0, 3, (40,))
    task = sf.tasks.ClassificationTask()
    scores = {}
    for dtype in (torch.float16, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        data = TensorDataset(x.to(dtype), y)
        traj = sf.Trajectory([sf.Segment([m.state_dict()], data, lr_sum=1.0)])
        factors = sf.fit_factors(m, task, traj, fisher="empirical", batch_size=8)
        assert all(torch.isfinite(lf.lam).all() for lf in factors.segments[0].values())
        scores[dtype] = sf.score(m, task, traj, factors, data, TensorDataset(x[:4].to(dtype), y[:4]),
                                 method="ekfac", damping=1e-3, batch_size=8)
    err = (scores[torch.float16].double() - scores[torch.float64]).abs().max() / scores[torch.float64].abs().max()
    assert err < 2e-2, err


def test_sixteen_bit_losses_are_taken_in_float32():
    """ClassificationTask on a confident bfloat16 prediction: p − onehot rounds to noise in 16 bits (per
    query Pearson 0.37 against float64 in a review); the loss is taken in float32, and its gradient
    matches the float64 one to bfloat16's rounding of the logits."""
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    with torch.no_grad():
        net.weight.mul_(8)
    x = torch.randn(32, 6)
    y = net(x).argmax(1)  # confident and right: losses ~1e-4
    grads = {}
    for dtype in (torch.bfloat16, torch.float64):
        m = copy.deepcopy(net).to(dtype)
        loss = sf.tasks.ClassificationTask().compute_train_loss((x.to(dtype), y), m)
        assert loss.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float64)
        grads[dtype] = torch.autograd.grad(loss, m.weight)[0].double()
    err = (grads[torch.bfloat16] - grads[torch.float64]).abs().max() / grads[torch.float64].abs().max()
    assert err < 5e-2, err


def test_frozen_layers_are_not_tracked_by_default():
    """A layer that did not train carries no training-data effect: with others training, the default
    leaves it out and naming it warns; a model frozen whole (after training) tracks every layer."""
    from source_fast.capture import tracked_layers

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    assert [s.name for s in tracked_layers(model, None)] == ["2"]
    with pytest.warns(UserWarning, match=r"tracked modules \['0'\] are frozen \(requires_grad=False\) while others train"):
        tracked_layers(model, ["0", "2"])
    model.requires_grad_(False)
    assert [s.name for s in tracked_layers(model, None)] == ["0", "2"]


def test_unsupported_conv2d_says_how_to_track_the_other_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                          nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"module '1': Conv2d padding_mode='reflect' is not supported; to attribute "
                                         r"through the other layers, name them in the task's get_influence_tracked_modules"):
        sf.capture.tracked_layers(model, None)
    assert [s.name for s in sf.capture.tracked_layers(model, ["0", "3"])] == ["0", "3"]


def test_batchnorm_models_are_told_they_run_in_eval_mode():
    """Training normalised each batch by its own statistics; fitting and scoring run the model as it is
    evaluated (running statistics), as kronfluence does: said once per call site, with BatchNorm's own
    parameters left out of the tracked layers."""
    from _helpers import classification_data

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    data = classification_data(24, 4, 3)
    traj = sf.Trajectory([sf.Segment([{k: v.clone() for k, v in model.state_dict().items()}], data, lr_sum=0.1)])
    with pytest.warns(UserWarning, match=r"BatchNorm modules \(\['1'\]\) run in eval mode here, with their running "
                                         r"statistics .*BatchNorm's own weight and bias are not tracked"):
        factors = sf.fit_factors(model, ClassifyTask(), traj)
    assert list(factors.segments[0]) == ["0", "3"]
    with pytest.warns(UserWarning, match=r"BatchNorm modules \(\['1'\]\) run in eval mode here"):  # no factors here
        sf.score(model, ClassifyTask(), traj, None, data, data, method="grad_dot")
    model[1].track_running_stats, model[1].running_mean, model[1].running_var = False, None, None
    with pytest.warns(UserWarning, match=r"BatchNorm modules \(\['1'\]\) keep no running statistics, so even in eval "
                                         r"mode they normalise each batch by its own"):
        sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment([{k: v.clone() for k, v in model.state_dict().items()}],
                                                                          data, lr_sum=0.1)]))


class EightBitLinear(nn.Linear):
    """An 8-bit layer as bitsandbytes (int8) or transformers' FP8Linear (float8) make them: an
    nn.Linear whose weight is stored in 8 bits and dequantized in forward."""

    def __init__(self, lin, dtype):
        super().__init__(lin.in_features, lin.out_features)
        self.scale = float(lin.weight.abs().max()) / 127
        weight = lin.weight.detach() / self.scale
        self.weight = nn.Parameter((torch.round(weight) if dtype == torch.int8 else weight).to(dtype), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_a_layer_with_8_bit_weights_is_captured_in_its_inputs_dtype(dtype):
    """Inputs and output gradients are taken in a layer's weight dtype (autocast), but an 8-bit
    weight is no dtype to compute in: they stay as they come (before, they were rounded to 8 bits)."""
    from source_fast.capture import Capturer, tracked_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2] = EightBitLinear(model[2], dtype)  # not .double(), which would widen a float8 weight
    model.requires_grad_(False)  # loaded for inference: every layer counts
    capturer = Capturer(model, tracked_layers(model, None))
    x = torch.randn(6, 4, dtype=torch.float64)
    with capturer.capture(None, len(x)) as records:
        model(x).sum().backward()
    assert records["2"].a.dtype == records["2"].g.dtype == torch.float64
    assert torch.equal(records["2"].a[:, 0], torch.tanh(model[0](x)))


class Tied(nn.Module):
    """A shared Linear on 3-D input (its output a reshaped view of the 2-D matmul result), each call
    followed by an activation, in place or not."""

    def __init__(self, inplace):
        super().__init__()
        self.lin, self.head, self.act = nn.Linear(4, 4), nn.Linear(4, 3), nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.head(self.act(self.lin(self.act(self.lin(x)))).sum(1))


def test_an_in_place_activation_after_a_layer_keeps_its_gradient():
    """ReLU(inplace=True) on a Linear's 3-D output (a view) makes autograd drop a hook on the view; the
    gradient is taken from its base: scores equal those of the same model out of place, which equal
    explicit per-example gradients."""
    torch.manual_seed(0)
    plain = Tied(inplace=False).double()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    queries = TensorDataset(torch.randn(3, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    f0, s0 = _check_ekfac_dense(plain, ClassifyTask(), _sum_ce, data, queries)
    model = Tied(inplace=True).double()
    model.load_state_dict(plain.state_dict())
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj, batch_size=3)
    for name in ("lin", "head"):
        assert torch.allclose(factors.segments[0][name].s_cov, f0.segments[0][name].s_cov, rtol=1e-12, atol=0)
    scores = sf.score(model, ClassifyTask(), traj, factors, data, queries, method="ekfac", damping=0.01, batch_size=4)
    assert torch.allclose(scores, s0, rtol=1e-12, atol=0)


def test_an_output_view_modified_in_place_is_refused_not_taken_as_zero():
    """A layer whose output is a view that is no reshape of its base (here a transposed one): an in-place
    op on it drops the gradient hook, and that call's gradient is lost. Taking it as zero (a call that
    did not reach the loss) would give wrong scores: refused."""

    class TimeMajor(nn.Linear):  # computes on (t, n, d), returns (n, t, d): a transposed view
        def forward(self, x):
            return super().forward(x.transpose(0, 1)).transpose(0, 1)

    torch.manual_seed(0)
    model = Tied(inplace=True).double()
    model.lin = TimeMajor(4, 4).double()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(6, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(ValueError, match="module 'lin': its output was modified in place"):
        sf.fit_factors(model, ClassifyTask(), traj, batch_size=3, fisher="empirical")


class SiameseNet(nn.Module):
    """One encoder Linear applied to two padded inputs (masked-mean pooled), then a head on both."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(3, 4), nn.Linear(8, 2)

    def _pool(self, x, m):
        return (torch.tanh(self.enc(x)) * m[..., None]).sum(1) / m.sum(1, keepdim=True)

    def forward(self, x1, m1, x2, m2):
        return self.head(torch.cat([self._pool(x1, m1), self._pool(x2, m2)], 1))


class SiameseTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        return _sum_ce(model(*batch[:4]), batch[4])

    compute_measurement = compute_train_loss

    def get_attention_mask(self, batch):
        return {"enc": [batch[1], batch[3]]}  # one mask per call of the shared encoder


def _siamese_data(n, seed, t2=6):
    g = torch.Generator().manual_seed(seed)

    def side(t):
        m = (torch.arange(t)[None] < torch.randint(1, t + 1, (n,), generator=g)[:, None]).double()
        x = torch.randn(n, t, 3, generator=g, dtype=torch.float64)
        return torch.where(m[..., None] > 0, x, 100 * torch.randn(x.shape, generator=g, dtype=torch.float64)), m

    (x1, m1), (x2, m2) = side(6), side(t2)
    return TensorDataset(x1, m1, x2, m2, torch.randint(0, 2, (n,), generator=g))


def test_a_shared_layer_takes_one_mask_per_call():
    """A Siamese encoder's two sides are padded apart: a list of masks in the dict masks each call with
    its own (scores equal explicit per-example gradients); one mask for calls of another length is
    refused naming the call."""
    torch.manual_seed(0)
    model = SiameseNet().double()
    _check_ekfac_dense(model, SiameseTask(), _sum_ce, _siamese_data(16, 0), _siamese_data(3, 1), inputs=4)

    class OneMask(SiameseTask):
        def get_attention_mask(self, batch):
            return {"enc": batch[1]}

    data = _siamese_data(6, 0, t2=8)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    sf.fit_factors(model, SiameseTask(), traj, batch_size=3)  # sides of 6 and 8 tokens, each with its own mask
    with pytest.raises(ValueError, match=r"module 'enc''s attention mask for its call 2 has shape \(3, 6\) but "
                                         r"module 'enc' sees 3 examples × 8 tokens"):
        sf.fit_factors(model, OneMask(), traj, batch_size=3)


def test_layer_outputs_that_autograd_frees_are_not_kept_through_backward():
    """A Linear feeding only a residual add: autograd saves nothing of its output, so the output is freed
    after the forward pass. capture() must not keep it (for its in-place check) through backward, where
    it would cost as much memory again as the output gradients being captured."""
    import weakref

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.pre(x)  # the first tracked layer, whose output capture() replaces
            return self.head((h + self.lin(h)).sum(1))

    alive = []

    class Watched(ClassifyTask):
        def compute_train_loss(self, batch, model, sample=False):
            loss = super().compute_train_loss(batch, model, sample)
            loss.register_hook(lambda g: alive.append(watched() is not None))  # the start of backward
            return loss

    model = Res().double()
    model.lin.register_forward_hook(lambda m, i, out: watched.__setattr__("ref", weakref.ref(out)))

    def watched():
        return watched.ref()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    sf.fit_factors(model, Watched(), traj, batch_size=4, fisher="empirical")
    assert alive and not any(alive), alive


def test_a_shared_layers_call_under_no_grad_is_left_out():
    """A stop-gradient branch that runs the shared layer under torch.no_grad(): that call takes no part in
    the gradient, so it is left out of the factors too (A is the other call's inputs alone), and the
    scores equal explicit per-example gradients."""

    class NoGradCall(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head = nn.Linear(3, 4), nn.Linear(8, 3)

        def forward(self, x):
            with torch.no_grad():
                target = self.enc(2 * x)
            return self.head(torch.cat([self.enc(x), target], 1))

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
    queries = TensorDataset(torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    factors, _ = _check_ekfac_dense(NoGradCall().double(), ClassifyTask(), _sum_ce, data, queries)
    inputs = torch.cat([data.tensors[0], torch.ones(12, 1, dtype=torch.float64)], 1)
    assert torch.allclose(factors.segments[0]["enc"].a_cov, inputs.T @ inputs / 12, rtol=1e-12, atol=1e-15)


def test_activation_checkpointing_recompute_is_not_a_second_call():
    """torch.utils.checkpoint(use_reentrant=False) re-runs the forward in backward: the hooks fire again,
    but that is no second call (no zero-gradient copy of the tokens, no refused per-call masks or
    per-token scores); reentrant checkpointing's forward under no_grad is refused, saying why."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(SiameseNet):
        reentrant = False

        def _pool(self, x, m):  # the first tracked layer inside the checkpoint
            return checkpoint(super()._pool, x, m, use_reentrant=self.reentrant)

    torch.manual_seed(0)
    data, queries = _siamese_data(16, 0), _siamese_data(3, 1)
    plain = SiameseNet().double()
    f0, s0 = _check_ekfac_dense(plain, SiameseTask(), _sum_ce, data, queries, inputs=4)  # vmap cannot checkpoint
    model = Ckpt().double()
    model.load_state_dict(plain.state_dict())
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, SiameseTask(), traj, batch_size=3)
    scores = sf.score(model, SiameseTask(), traj, factors, data, queries, method="ekfac", damping=0.01, batch_size=4)
    assert torch.allclose(scores, s0, rtol=1e-12, atol=0)
    for name in ("enc", "head"):
        assert factors.segments[0][name].rows == f0.segments[0][name].rows
        assert torch.allclose(factors.segments[0][name].s_cov, f0.segments[0][name].s_cov, rtol=1e-12, atol=0)
    model.reentrant = True
    with pytest.raises(ValueError, match="use_reentrant=False"):
        sf.fit_factors(model, SiameseTask(), traj, batch_size=3)


def test_a_layer_whose_custom_function_returns_a_reshaped_view_is_captured():
    """A tracked Linear computed by a custom autograd.Function (a fused or quantized kernel) that returns
    a reshape of a tensor of its own: that view's base is outside the graph, so the hook stays on the
    output; its gradients equal those of the plain Linear."""
    from source_fast.capture import Capturer, tracked_layers

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):
            ctx.save_for_backward(x, w)
            return torch.addmm(b, x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            g2 = g.reshape(-1, g.shape[-1])
            return (g2 @ w).view(x.shape), g2.t() @ x.reshape(-1, x.shape[-1]), g2.sum(0)

    class FusedLinear(nn.Linear):
        def forward(self, x):
            return Fused.apply(x, self.weight, self.bias)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fused = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), FusedLinear(5, 3)).double()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    got = []
    for model in (plain, fused):
        capturer = Capturer(model, tracked_layers(model, None))
        with capturer.capture(None, len(x)) as records:
            loss = model(x).pow(2).sum()
            capturer.forward_done()
            loss.backward()
        got.append({name: (r.a, r.g) for name, r in records.items()})
    for name in ("0", "2"):
        assert torch.equal(got[0][name][0], got[1][name][0]) and torch.allclose(got[0][name][1], got[1][name][1], rtol=1e-13, atol=0)
