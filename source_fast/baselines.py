"""Baseline attribution methods for comparisons: gradient cosine, TRAK, representation similarity
and exact unrolling. Each takes the model at one checkpoint (scoring averages TRAK over several),
except "unroll", which replays training."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import ops
from ._dist import all_reduce_int, all_reduce_sum_
from ._passes import length, make_loader, run_pass
from .capture import with_ones
from .factors import factor_dtype
from .unroll import TrainingRecord, unroll_scores


def _train_pass(model, task, specs, data, batch_size, collate_fn, what, consume, first):
    for start, n, rec in run_pass(model, task, specs, make_loader(data, batch_size, collate_fn), "train", what, None,
                                  first):
        consume(start, n, {s.name: (with_ones(rec[s.name].a, s), rec[s.name].g) for s in specs})


def grad_cos(model, task, specs, v, train_data, batch_size, collate_fn, first=0) -> Tensor:
    """cos(∇f(z_q), ∇L(z_m)) over the tracked parameters (unitless: no 1/N). first (here, in trak and
    in repsim): where `train_data`, a rank's share, begins in the whole, for errors that name examples."""
    norm_q = torch.sqrt(sum((x.flatten(1) ** 2).sum(1) for x in v.values()))
    # A zero gradient (a query the model fits exactly) has cosine 0 with everything, on both sides.
    u = {k: x / norm_q.clamp_min(1e-30)[:, None, None] for k, x in v.items()}
    out = torch.zeros(len(norm_q), length(train_data), dtype=norm_q.dtype, device=norm_q.device)

    def consume(start, n, layers):
        dots = sum(ops.pairwise_scores(a, g, u[k]) for k, (a, g) in layers.items())
        sq = sum(ops.self_scores(a, g, torch.ones(g.shape[-1], a.shape[-1], device=a.device)) for a, g in layers.values())
        out[:, start : start + n] = (dots / sq.clamp_min(1e-30).sqrt()[:, None]).T.to(out.dtype)

    _train_pass(model, task, specs, train_data, batch_size, collate_fn, "grad_cos", consume, first)
    return out


def trak(model, task, specs, v, train_data, batch_size, collate_fn, *, dim: int,
         damping: float | str | Sequence[float | str], seed: int, first=0) -> Tensor:
    """TRAK at the model's weights (one checkpoint): per-example gradients projected to `dim` by a seeded
    Gaussian map P, φ = P g (computed as ⟨G_n, P_r⟩ without forming G_n), then τ = φ_qᵀ (ΦᵀΦ + Nλ I)⁻¹ φ_m, the
    influence function of the projected empirical Fisher ΦᵀΦ/N, with its 1/N scale.
    damping λ: a number, or "heuristic" = 0.1 × mean eigenvalue of ΦᵀΦ/N (both checked by
    scoring.method_options before any pass); a list of them gives each one's scores, stacked first,
    from the one Φ. Under torch.distributed `train_data` is this rank's share: ΦᵀΦ and N are summed
    over the ranks, and the columns are the share's."""
    dtype = factor_dtype(model)
    device = next(iter(v.values())).device
    n = all_reduce_int(length(train_data), device)
    rank = min(n, sum(s.d_out * s.d_a for s in specs))
    dampings = list(damping) if isinstance(damping, (list, tuple)) else [damping]
    if 0 in dampings and dim > rank:  # solve() would return round-off as scores
        raise ValueError(f"trak_dim={dim} with damping 0: ΦᵀΦ has rank at most {rank} (min of the {n} training examples "
                         f"and the tracked parameters), so it cannot be inverted; give trak_dim <= {rank} or a damping > 0")
    g = torch.Generator(device="cpu").manual_seed(seed)
    proj = {
        s.name: (torch.randn(dim, s.d_out, s.d_a, generator=g, dtype=torch.float64) / dim**0.5).to(device=device, dtype=dtype)
        for s in specs
    }
    phi_q = sum(torch.einsum("qoi,koi->qk", v[k], p) for k, p in proj.items())
    phi = torch.zeros(length(train_data), dim, dtype=dtype, device=device)

    def consume(start, b, layers):
        phi[start : start + b] = sum(ops.pairwise_scores(a, gr, proj[k]) for k, (a, gr) in layers.items()).to(dtype)

    _train_pass(model, task, specs, train_data, batch_size, collate_fn, "trak", consume, first)
    gram = phi.T @ phi
    all_reduce_sum_([gram])
    eye = torch.eye(dim, dtype=dtype, device=device)
    scores = []
    for lam in dampings:
        lam = 0.1 * float(torch.trace(gram)) / (dim * n) if lam == "heuristic" else float(lam)
        scores.append(torch.linalg.solve(gram + n * lam * eye, phi_q.T).T @ phi.T)
    return torch.stack(scores) if isinstance(damping, (list, tuple)) else scores[0]


def _representations(model, task, specs, data, batch_size, collate_fn, what, first=0) -> Tensor:
    """The input of the last tracked layer (the penultimate representation), mean over unmasked tokens.
    Last in the model's module order, nearest the output for a feed-forward stack, whatever order the
    task lists its tracked modules in."""
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    last = max(specs, key=lambda s: order[s.module]).whole()  # a grouped convolution's whole input
    feats = []
    loader = make_loader(data, batch_size, collate_fn)
    for _, _, rec in run_pass(model, task, [last], loader, "train", what, None, first):
        r = rec[last.name]
        if r.mask is None:
            feats.append(r.a.mean(1).to(factor_dtype(model)))
            continue
        keep = (r.mask != 0).unsqueeze(-1)
        feats.append((torch.where(keep, r.a, 0).sum(1) / keep.sum(1).clamp_min(1)).to(factor_dtype(model)))
    return torch.cat(feats)


def repsim(model, task, specs, query_data, train_data, batch_size, collate_fn, first=0) -> Tensor:
    """Cosine similarity of penultimate representations (unitless)."""
    q = _representations(model, task, specs, query_data, batch_size, collate_fn, "repsim queries")
    t = _representations(model, task, specs, train_data, batch_size, collate_fn, "repsim training data", first)
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return q @ t.T


def unroll(model, task, record: TrainingRecord | None, train_data: Any, query_data: Any, collate_fn) -> Tensor:
    if not isinstance(record, TrainingRecord):
        raise TypeError("method 'unroll' needs record=TrainingRecord(init_state, batches, lrs, ...) of the training run")
    return unroll_scores(
        model, task, record.init_state, train_data, record.batches, record.lrs, query_data,
        momentum=record.momentum, weight_decay=record.weight_decay, collate_fn=collate_fn,
    ).to(factor_dtype(model))
