"""Small models, tasks and first-principles float64 constructions shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import source_fast  # noqa: F401
from source_fast.tasks import ClassificationTask, RegressionTask


# The package's ready tasks, under the names the tests use.
ClassifyTask, RegressTask = ClassificationTask, RegressionTask


class CountingData(torch.utils.data.Dataset):
    """A dataset that counts the examples read from it (`reads`)."""

    def __init__(self, data):
        self.data, self.reads = data, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.reads += 1
        return self.data[i]


class LeavesOutClass2(ClassificationTask):
    """A measurement that leaves class 2 out: a query of that class has no gradient."""

    def compute_measurement(self, batch, model):
        x, y = batch
        keep = y != 2
        return nn.functional.cross_entropy(model(x)[keep], y[keep], reduction="sum")


def mlp(d_in: int, hidden: int, d_out: int, *, bias: bool = True, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, d_out, bias=bias)).to(dtype)


def classification_data(n: int, d: int, k: int, *, seed: int = 0, dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(d, k, generator=g, dtype=dtype)
    y = (x @ w + 0.5 * torch.randn(n, k, generator=g, dtype=dtype)).argmax(1)
    return TensorDataset(x, y)


class Stream(torch.utils.data.IterableDataset):
    """A dataset's examples as a stream: iterable from the start on every pass, nothing else."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


class PooledClassifier(nn.Module):
    """A token layer, mean pooling, then a head on (batch, features): BERT's classifier in miniature;
    `tokens` sees each example's tokens, `head` one row per example."""

    def __init__(self):
        super().__init__()
        self.tokens, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x)).mean(1))


def perturbed_states(model: nn.Module, count: int, scale: float = 0.05, seed: int = 1) -> list[dict]:
    """`count` checkpoints near the model's weights (a stand-in trajectory for algebra tests)."""
    g = torch.Generator().manual_seed(seed)
    base = model.state_dict()
    return [{k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in base.items()} for _ in range(count)]


def per_example_grads(model: nn.Module, state: dict, loss_fn, x, y, layer_names) -> dict[str, torch.Tensor]:
    """Explicit per-example parameter gradients (torch.func), as (n, d_out, d_in [+1 bias]) per layer."""
    params = {k: v.detach() for k, v in state.items()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    out = {}
    for name in layer_names:
        w = grads[f"{name}.weight"]
        b = grads.get(f"{name}.bias")
        out[name] = w if b is None else torch.cat([w, b[..., None]], dim=-1)
    return out


def dense_curvature(lf) -> torch.Tensor:
    """The P×P EK-FAC matrix Q diag(vec Λ) Qᵀ of one layer (row-major vec of the (d_out, d_a) gradient);
    diag(vec Λ) for factors without bases (a diagonal curvature)."""
    diagonal = torch.diag(lf.lam.double().clamp_min(0).reshape(-1))
    if lf.q_a is None:
        return diagonal
    k = torch.kron(lf.q_s.double(), lf.q_a.double())
    return k @ diagonal @ k.T


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx @ ry) / (rx.norm() * ry.norm()))


def torchrun(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS`: two processes (gloo in the scripts), a free
    port, one thread each, the output captured as text; the caller checks the return code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
