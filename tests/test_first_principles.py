"""Factors and every scoring option on masked token sequences and on a strided, dilated Conv2d, against
float64 quantities built from first principles: each layer's token rows and output gradients from our
own forward hooks (Conv2d through F.unfold), per-example gradients from torch.func, dense Kronecker
curvature, and one block matrix exponential per segment for SOURCE's e^{−M} and ∫₀¹e^{−sM}ds.
test_engine does the same for an MLP with one token per example; test_layers checks these layers'
scores through the library's own factors. Padding here holds garbage inputs but never reaches the
loss, so these tests check the input side of masking; test_layers' NaN test checks the other.

Tolerance 1e-10 of the largest entry: everything is float64, and only the order of sums, eigh and
matrix_exp differ (observed ≤ 2e-14)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from transformers.pytorch_utils import Conv1D  # GPT-2's layer: y = x W + b, W of shape (in, out)

import source_fast as sf

TOL = 1e-10


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 5)
        self.mid = Conv1D(4, 5)  # (out, in), as transformers orders them
        self.out = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False)
        self.c2 = nn.Conv2d(5, 3, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(3 * 2 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def token_loss(logits, y, mask):
    per = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return (per * mask).sum()


def image_loss(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


class RecordingTask(sf.Task):
    """Sums its loss over examples; keeps the labels it draws for the true Fisher, so the reference can
    use the same ones."""

    def __init__(self, loss):
        self.loss, self.drawn = loss, []

    def compute_train_loss(self, batch, model, sample=False):
        x, y, *mask = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits).sample()
            self.drawn.append(y)
        return self.loss(logits, y, *mask)

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch[2] if len(batch) == 3 else None


def token_data(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).double()
    x = torch.randn(n, t, 3, generator=g, dtype=torch.float64)
    x = torch.where(mask[..., None] > 0, x, 50 * torch.randn(x.shape, generator=g, dtype=torch.float64))  # padding is garbage
    return TensorDataset(x, torch.randint(0, 3, (n, t), generator=g), mask)


def image_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 7, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def tracked(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))]


def token_rows(model, state, data, loss=None):
    """{layer: (a (n, t, d_a) with a ones column for a bias, g (n, t, d_out) = ∂loss/∂output)}, masked
    tokens included; `loss` (the model's own by default) gives g."""
    model.load_state_dict(state)
    seen, hooks = {}, []
    for name, m in tracked(model):
        def hook(mod, inputs, out, name=name):
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                a = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride).mT
            else:
                a = x.reshape(len(x), -1, x.shape[-1])
            if mod.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], -1)
            out.retain_grad()
            seen[name] = (a.detach(), out)
        hooks.append(m.register_forward_hook(hook))
    RecordingTask(loss or LOSS[type(model)]).compute_train_loss(data.tensors, model).backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    rows = {}
    for name, m in tracked(model):
        a, out = seen[name]
        g = out.grad.flatten(2).mT if isinstance(m, nn.Conv2d) else out.grad.reshape(len(a), -1, out.shape[-1])
        rows[name] = (a, g)
    return rows


def example_grads(model, state, data, loss=None):
    """(n, P): each example's loss gradient (or `loss`'s), layer after layer, each (d_out, d_a) with the
    bias last."""
    loss = loss or LOSS[type(model)]
    params = {k: v.detach() for k, v in state.items()}
    g = vmap(grad(lambda p, *ex: loss(functional_call(model, p, (ex[0][None],)), *[e[None] for e in ex[1:]])),
             in_dims=(None,) + (0,) * len(data.tensors))(params, *data.tensors)
    blocks = []
    for name, m in tracked(model):
        w = g[f"{name}.weight"]
        w = w.mT if isinstance(m, Conv1D) else w.flatten(2)
        if m.bias is not None:
            w = torch.cat([w, g[f"{name}.bias"][..., None]], -1)
        blocks.append(w.flatten(1))
    return torch.cat(blocks, 1)


LOSS = {TokenNet: token_loss, ConvNet: image_loss}


def ekfac(model, states, cov_data, lam_data):
    """Per layer: A and S, the means of a aᵀ and g gᵀ over unmasked token rows averaged over the
    checkpoints; their eigenbases; Λ, the mean squared per-example gradient in that basis averaged
    over the checkpoints; and the dense curvature K diag(Λ) Kᵀ with K = Q_S ⊗ Q_A."""
    out = {}
    rows = [token_rows(model, st, d) for st, d in zip(states, cov_data)]
    grads = [example_grads(model, st, d) for st, d in zip(states, lam_data)]
    start = 0
    for name, _ in tracked(model):
        a_cov = s_cov = 0
        for r, d in zip(rows, cov_data):
            a, g = r[name]
            keep = d.tensors[2].flatten() > 0 if len(d.tensors) == 3 else slice(None)
            a, g = a.flatten(0, 1)[keep], g.flatten(0, 1)[keep]
            a_cov = a_cov + a.T @ a / len(a) / len(states)
            s_cov = s_cov + g.T @ g / len(g) / len(states)
        q_a, q_s = torch.linalg.eigh(a_cov).eigenvectors, torch.linalg.eigh(s_cov).eigenvectors
        size = len(q_s) * len(q_a)
        lam = sum(((q_s.T @ g[:, start:start + size].view(-1, len(q_s), len(q_a)) @ q_a) ** 2).mean(0)
                  for g in grads) / len(grads)
        k = torch.kron(q_s, q_a)
        out[name] = {"A": a_cov, "S": s_cov, "H": k @ torch.diag(lam.flatten()) @ k.T, "shape": (len(q_s), len(q_a))}
        start += size
    return out


def library_curvature(lf):
    k = torch.kron(lf.q_s, lf.q_a)
    return k @ torch.diag(lf.lam.flatten()) @ k.T


def close(actual, expected, what):
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err <= TOL, f"{what}: {err:.2e}"


def make(kind):
    torch.manual_seed(0)
    if kind == "tokens":
        return TokenNet().double(), token_data(18, 5, 3), token_data(3, 5, 7)
    return ConvNet().double(), image_data(14, 4), image_data(3, 8)


def perturbed(model, count, scale):
    g = torch.Generator().manual_seed(1)
    return [{k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in model.state_dict().items()}
            for _ in range(count)]


@pytest.mark.parametrize("average_params", [False, True])
@pytest.mark.parametrize("fisher", ["empirical", "true"])
@pytest.mark.parametrize("kind", ["tokens", "conv"])
def test_factors_match_first_principles(kind, fisher, average_params):
    """A and S exactly; the curvature as a dense matrix (invariant to the eigenvectors' signs and order)."""
    model, data, _ = make(kind)
    ckpts = perturbed(model, 3, 0.2)
    task = RecordingTask(LOSS[type(model)])
    factors = sf.fit_factors(model, task, sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)]), fisher=fisher,
                             average_params=average_params, batch_size=len(data))  # one batch: one draw per pass
    states = [{k: sum(c[k] for c in ckpts) / 3 for k in ckpts[0]}] if average_params else ckpts
    if fisher == "true":  # the covariance passes drew first, then the Λ passes, one checkpoint after another
        with_labels = [TensorDataset(data.tensors[0], y, *data.tensors[2:]) for y in task.drawn]
        assert len(with_labels) == 2 * len(states)
        cov_data, lam_data = with_labels[:len(states)], with_labels[len(states):]
    else:
        cov_data = lam_data = [data] * len(states)
    mine = ekfac(model, states, cov_data, lam_data)
    for name, _ in tracked(model):
        lf = factors.segments[0][name]
        close(lf.a_cov, mine[name]["A"], f"{name} A")
        close(lf.s_cov, mine[name]["S"], f"{name} S")
        close(library_curvature(lf), mine[name]["H"], f"{name} curvature")


def every_token_loss(logits, y, mask):
    """A loss that reads the padded tokens too (the mask is for the activations only)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")


def test_the_gradient_covariance_keeps_every_token_the_loss_reads():
    """The mask drops padding from A only: S sums every token's output gradient (zero at padding unless
    the loss reads it, as here), over the unmasked tokens' count, as kronfluence does."""
    model, data, _ = make("tokens")
    state = perturbed(model, 1, 0.2)[0]
    factors = sf.fit_factors(model, RecordingTask(every_token_loss), sf.Trajectory([sf.Segment([state], data,
                             lr_sum=1.0)]), fisher="empirical", batch_size=len(data))
    keep = data.tensors[2].flatten() > 0
    for name, (a, g) in token_rows(model, state, data, every_token_loss).items():
        a, g = a.flatten(0, 1), g.flatten(0, 1)
        assert g[~keep].abs().amax() > 0.1 * g[keep].abs().amax()  # the padded tokens' gradients count
        close(factors.segments[0][name].a_cov, a[keep].T @ a[keep] / int(keep.sum()), f"{name} A")
        close(factors.segments[0][name].s_cov, g.T @ g / int(keep.sum()), f"{name} S")


def phi_and_exp(m):
    """∫₀¹ e^{−sM} ds and e^{−M} from one matrix exponential of [[−M, I], [0, 0]] (M may be singular)."""
    n = len(m)
    big = torch.zeros(2 * n, 2 * n, dtype=m.dtype)
    big[:n, :n], big[:n, n:] = -m, torch.eye(n, dtype=m.dtype)
    e = torch.linalg.matrix_exp(big)
    return e[:n, n:], e[:n, :n]


def torch_sgd_moved(lrs, momentum, dampening):
    """How far torch's SGD moved the weights along each step's gradient by the end of the run (unit
    gradients, one coordinate per step): SOURCE's per-step rate, simulated rather than from a formula."""
    theta = torch.zeros(len(lrs), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=lrs[0], momentum=momentum, dampening=dampening)
    for k, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        theta.grad = torch.eye(len(lrs), dtype=torch.float64)[k]
        opt.step()
    return (-theta.detach()).tolist()


@pytest.fixture(scope="module", params=["tokens", "conv"])
def run(request):
    """Three segments of two checkpoints (SGD with momentum, dampening, clipping and per-layer weight
    decay) and the dense reference's per-segment preconditioned queries u_ℓ for the queries and for the
    training examples themselves (self-influence)."""
    model, data, queries = make(request.param)
    names = [n for n, _ in tracked(model)]
    ckpts = perturbed(model, 6, 0.3)
    lrs = [0.05 * min((k + 1) / 6, (30 - k) / 24) for k in range(30)]
    g = torch.Generator().manual_seed(11)
    clip = [1.0 if k % 4 == 0 else 0.3 + 0.7 * float(torch.rand(1, generator=g)) for k in range(30)]
    wd = {n: 0.01 * (i + 1) for i, n in enumerate(names)}
    traj = sf.Trajectory.even(ckpts, lrs, 3, data, momentum=0.9, dampening=0.1, weight_decay=wd, grad_scales=clip)
    task = RecordingTask(LOSS[type(model)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=7)

    moved = torch_sgd_moved(lrs, 0.9, 0.1)
    c_grad = [sum(moved[k] * clip[k] for k in range(a, a + 10)) for a in (0, 10, 20)]
    c_decay = [sum(moved[k] for k in range(a, a + 10)) for a in (0, 10, 20)]  # clipping leaves the decay whole
    pairs = [ckpts[0:2], ckpts[2:4], ckpts[4:6]]
    curv = [ekfac(model, p, [data] * 2, [data] * 2) for p in pairs]
    train_grads = [sum(example_grads(model, st, data) for st in p) / 2 for p in pairs]

    def walk(v):
        """u_ℓ = c_ℓ ∫₀¹e^{−sM_ℓ}ds v_ℓ, v_ℓ₋₁ = e^{−M_ℓ} v_ℓ, M_ℓ = c_ℓ H_ℓ + c_ℓ·decay_scale·wd, last segment first."""
        us = [None] * 3
        for ell in reversed(range(3)):
            h = torch.block_diag(*(curv[ell][n]["H"] for n in names))
            d = torch.cat([torch.full((len(curv[ell][n]["H"]),), wd[n], dtype=torch.float64) for n in names])
            integral, decay = phi_and_exp(c_grad[ell] * h + c_decay[ell] * torch.diag(d))
            us[ell] = c_grad[ell] * v @ integral.T
            v = v @ decay.T
        return us

    sizes = [len(curv[0][n]["H"]) for n in names]
    return dict(model=model, task=task, traj=traj, factors=factors, data=data, queries=queries, names=names, walk=walk,
                final=ckpts[-1],
                sizes=sizes, shapes=[curv[0][n]["shape"] for n in names], train_grads=train_grads, pairs=pairs,
                us=walk(example_grads(model, ckpts[-1], queries)), us_self=walk(example_grads(model, ckpts[-1], data)),
                n=len(data))


def test_source_with_momentum_clipping_and_decay(run):
    r = run
    expected = sum(u @ g.T for u, g in zip(r["us"], r["train_grads"])) / r["n"]
    close(sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], batch_size=5), expected,
          "SOURCE")
    close(sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], sum_queries=True),
          expected.sum(0, keepdim=True), "summed queries")
    per_module = sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], per_module=True)
    start = 0
    for name, size in zip(r["names"], r["sizes"]):
        part = sum(u[:, start:start + size] @ g[:, start:start + size].T for u, g in zip(r["us"], r["train_grads"]))
        close(per_module[name], part / r["n"], f"per_module {name}")
        start += size


def logit_product(logits, y, *mask):
    """A measurement that is not the loss (nor a multiple of it): Σ logit₀·logit₁ over unmasked tokens."""
    product = logits[..., 0] * logits[..., 1]
    return (product * mask[0] if mask else product).sum()


class LogitProductTask(RecordingTask):
    def compute_measurement(self, batch, model):
        return logit_product(model(batch[0]), *batch[1:])


def test_queries_are_the_measurements_gradients(run):
    """The queries' side walks ∇f (the measurement) back through the segments, the training side keeps ∇L."""
    r = run
    us = r["walk"](example_grads(r["model"], r["final"], r["queries"], logit_product))
    expected = sum(u @ g.T for u, g in zip(us, r["train_grads"])) / r["n"]
    task = LogitProductTask(LOSS[type(r["model"])])
    close(sf.score(r["model"], task, r["traj"], r["factors"], r["data"], r["queries"], batch_size=5), expected,
          "SOURCE with a measurement")


def truncated(u, shapes, rank):
    """Each layer's block of each query, (d_out, d_a), replaced by its best rank-r approximation (SVD)."""
    out, start = [], 0
    for d_out, d_a in shapes:
        block = u[:, start:start + d_out * d_a].view(-1, d_out, d_a)
        left, s, right = torch.linalg.svd(block, full_matrices=False)
        out.append(((left[..., :rank] * s[:, None, :rank]) @ right[:, :rank]).flatten(1))
        start += d_out * d_a
    return torch.cat(out, 1)


@pytest.mark.parametrize("rank", [1, 2])
def test_low_rank_queries_are_each_segments_truncated_svd(run, rank):
    r = run
    us = [truncated(u, r["shapes"], rank) for u in r["us"]]
    expected = sum(u @ g.T for u, g in zip(us, r["train_grads"])) / r["n"]
    close(sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], query_rank=rank), expected,
          f"query_rank={rank}")
    # Summed queries are one query: its own truncation, not the sum of the truncations.
    summed = sum(truncated(u.sum(0, keepdim=True), r["shapes"], rank) @ g.T for u, g in zip(r["us"], r["train_grads"]))
    close(sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], query_rank=rank,
                   sum_queries=True), summed / r["n"], f"sum_queries with query_rank={rank}")


def test_self_influence(run):
    r = run
    expected = sum((u * g).sum(1) for u, g in zip(r["us_self"], r["train_grads"])) / r["n"]
    close(sf.self_score(r["model"], r["task"], r["traj"], r["factors"], r["data"], chunk_size=5, batch_size=4),
          expected, "self-influence")


@pytest.mark.parametrize("run", ["tokens"], indirect=True)
def test_per_token_scores_are_each_unmasked_tokens_tile(run):
    """score[q, n, t] = ⟨u_q, g_t a_tᵀ⟩ over the segments' checkpoints, zero at padding."""
    r = run
    mask = r["data"].tensors[2]
    expected = 0
    for u, pair in zip(r["us"], r["pairs"]):
        for state in pair:
            rows = token_rows(r["model"], state, r["data"])
            tiles = torch.cat([torch.einsum("nto,nti->ntoi", g, a * mask[..., None]).flatten(2)
                               for a, g in (rows[n] for n in r["names"])], 2)
            expected = expected + torch.einsum("qp,ntp->qnt", u, tiles) / (2 * r["n"])
    got = sf.score(r["model"], r["task"], r["traj"], r["factors"], r["data"], r["queries"], per_token=True, batch_size=4)
    close(got, expected, "per_token")
    assert (got[:, mask == 0] == 0).all()
