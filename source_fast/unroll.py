"""Exact unrolled differentiation: the ground truth SOURCE approximates.

Replays a recorded SGD run functionally with a weight (1 + ε_m) on every training example's loss
and differentiates the final measurement with respect to ε. Costs a full graph of the training
run per query, so it is for small models only.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils.data import DataLoader, default_collate

from ._warn import warn
from .task import Task


def _per_example_losses(model, task, params, batch) -> Tensor:
    """L(z_i, θ) for each example of the batch, as a vector (vmap over one-example batches)."""

    def one(example):
        single = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), example)
        return task.compute_train_loss(single, _Bound(model, params), False)

    return vmap(one, randomness="different")(batch)


class _Bound(nn.Module):
    """Calls `model` with the given parameter dict (so a Task can call model(x) unchanged)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        self._model = [model]  # a list keeps it out of this module's own children
        self._params = params

    def forward(self, *args, **kwargs):
        return functional_call(self._model[0], self._params, args, kwargs)


@contextlib.contextmanager
def _explained(where: str) -> Iterator[None]:
    """torch's errors here name its internals, not what to change in the model."""
    try:
        yield
    except RuntimeError as exc:
        raise RuntimeError(
            f"{where}: {exc}\nunroll maps the loss over examples with torch.func.vmap and differentiates the "
            "training run twice; a model with data-dependent control flow, or with attention kernels that have no "
            "double backward (Hugging Face's default 'sdpa'), cannot: build it with attn_implementation='eager'"
        ) from exc


@dataclass(frozen=True)
class TrainingRecord:
    """A recorded SGD run: the initial weights, each step's example indices and learning rate."""

    init_state: dict[str, Tensor]
    batches: Sequence[Sequence[int]]
    lrs: Sequence[float]
    momentum: float = 0.0
    weight_decay: float = 0.0


def _indexed(data: Any, collate_fn: Callable | None) -> tuple[Any, Callable]:
    """The examples to index and how to batch them: a DataLoader's dataset and its own collate_fn
    (unrolling picks each step's examples itself, so the loader's batching does not apply)."""
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    return data, collate_fn or default_collate


def _checked_steps(batches, lrs, momentum: float, weight_decay: float, n_train: int
                   ) -> tuple[list[list[int]], list[float]]:
    """The record's steps as lists of example indices and learning rates, refused where they could not
    have been a torch.optim.SGD run over these examples (a bad index would otherwise surface as an
    IndexError naming neither the step nor the record, or wrap around silently when negative)."""
    if len(batches) != len(lrs):
        raise ValueError(f"{len(batches)} batches but {len(lrs)} learning rates: give one rate per step")
    if len(batches) == 0:  # ε would not reach f at all: autograd's error would not say why
        raise ValueError("the training record has no training steps (batches is empty)")
    if not 0 <= momentum < 1:
        raise ValueError(f"the training record's momentum must be in [0, 1), got {momentum}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"the training record's weight_decay must be finite and >= 0, got {weight_decay}")
    steps, rates = [], []
    for k, (idx, lr) in enumerate(zip(batches, lrs)):
        try:
            idx = [operator.index(i) for i in idx]
        except TypeError:
            raise ValueError(f"training record step {k}: example indices must be integers, got {idx!r}") from None
        if not idx:
            raise ValueError(f"training record step {k}: the batch is empty")
        outside = [i for i in idx if not 0 <= i < n_train]
        if outside:
            raise ValueError(f"training record step {k}: example indices {outside[:8]} are outside the training "
                             f"data's 0..{n_train - 1}")
        if not (math.isfinite(float(lr)) and float(lr) >= 0):
            raise ValueError(f"training record step {k}: the learning rate must be finite and >= 0, got {lr}")
        steps.append(idx)
        rates.append(float(lr))
    return steps, rates


def _check_replayable(model: nn.Module, init_state: dict[str, Tensor]) -> None:
    """init_state holds every parameter at the model's shapes; a warning where the replay may not compute
    what training did: BatchNorm in train mode normalises by each batch's statistics, the replay by the
    running ones (it runs the model as it is, in eval mode under score(); Dropout is off there too)."""
    own = dict(model.named_parameters())
    known = model.state_dict()
    missing = [k for k in own if k not in init_state]
    unexpected = [k for k in init_state if k not in known]
    if missing or unexpected:
        raise ValueError(f"the training record's init_state does not match the model: missing parameters "
                         f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    for k, p in own.items():
        if tuple(init_state[k].shape) != tuple(p.shape):
            raise ValueError(f"the training record's init_state: {k!r} has shape {tuple(init_state[k].shape)} but "
                             f"{tuple(p.shape)} in the model")
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:  # right only if training kept BatchNorm frozen (eval mode), which cannot be seen from here
        warn(f"unroll replays the model's BatchNorm modules ({norms[:4]}) with their running statistics, "
             "frozen: the scores are exact only if training ran them frozen too (in train mode they "
             "normalise by each batch and update the running statistics, which the replay does not)")


def unroll_scores(
    model: nn.Module,
    task: Task,
    init_state: dict[str, Tensor],
    train_data: Any,
    batches: Sequence[Sequence[int]],
    lrs: Sequence[float],
    query_data: Any,
    *,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    collate_fn: Callable | None = None,
) -> Tensor:
    """Exact removal-effect scores (n_query, n_train) of a recorded SGD run.

    batches[k]: the training-example indices of step k; lrs[k]: its learning rate. Each step is
    θ ← θ − η_k (b with b ← β b + ∇[(1/B) Σ_i (1 + ε_i) L(z_i, θ)] + wd θ), the torch.optim.SGD update.
    Returns −∂f(z_q, θ_T)/∂ε_m: the first-order change of f when z_m is removed (ε_m = −1), with the
    project's sign convention (positive: removing z_m increases f). Scale: no 1/N (it is exact).
    train_data, query_data: datasets (len() and indexing), or DataLoaders over them, whose own
    collate_fn then makes the batches; collate_fn: that of the datasets (default: default_collate).
    """
    train_data, collate = _indexed(train_data, collate_fn)
    query_data, query_collate = _indexed(query_data, collate_fn)
    n_train = len(train_data)
    batches, lrs = _checked_steps(batches, lrs, momentum, weight_decay, n_train)
    _check_replayable(model, init_state)
    names = [n for n, p in model.named_parameters()]
    buffers = {k: v for k, v in model.named_buffers()}
    dtype = next(model.parameters()).dtype
    eps = torch.zeros(n_train, dtype=dtype, requires_grad=True)
    params = {k: init_state[k].detach().clone().requires_grad_(True) for k in names}
    velocity = {k: torch.zeros_like(v) for k, v in params.items()}
    for k, (idx, lr) in enumerate(zip(batches, lrs)):
        batch = collate([train_data[i] for i in idx])
        with _explained(f"unrolling step {k}"):
            losses = _per_example_losses(model, task, {**params, **buffers}, batch)
            objective = ((1 + eps[idx]) * losses).mean()
            grads = torch.autograd.grad(objective, list(params.values()), create_graph=True)
        for (name, p), g in zip(list(params.items()), grads):
            if weight_decay:
                g = g + weight_decay * p
            velocity[name] = momentum * velocity[name] + g if (momentum and k > 0) else g
            params[name] = p - lr * velocity[name]
    queries = query_collate([query_data[i] for i in range(len(query_data))])
    out = []
    for q in range(len(query_data)):
        single = torch.utils._pytree.tree_map(lambda t: t[q : q + 1], queries)
        with _explained(f"differentiating query {q} through the run"):
            f = task.compute_measurement(single, _Bound(model, {**params, **buffers}))
            (d_eps,) = torch.autograd.grad(f, eps, retain_graph=q + 1 < len(query_data))
        out.append(-d_eps.detach())
    return torch.stack(out)
