"""Pairwise scores and self-influence for every method (formulas: README, Methods).

Sign and scale, for every method: score(q, m) estimates f(z_q, θ_T without z_m) − f(z_q, θ_T),
positive when removing z_m would increase the measurement, and carries the 1/N factor, so it is in
the measurement's own units.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import baselines, ops, reference
from ._dist import all_reduce_int, all_reduce_sum_, differing_on_ranks, fail_together, gather_shares, min_on_ranks, rank_and_world
from ._passes import (
    advance, available_memory, check_collate_order, check_count, check_model_and_task, check_summed, chunks,
    describe_model, describe_task, digest_examples, is_stream, length, make_loader, materialize, model_device,
    rank_share, reuse_large_blocks, run_pass, share_start, subset,
)
from ._replay import NoRoom, PassCache, pass_of
from ._warn import warn
from .capture import Captured, LayerSpec, rotate, tracked_layers, with_ones
from .factors import (
    Factors, LayerFactors, _checkpoint_digests, _progress, checkpoint_signature, factor_dtype, factors_signature,
    restored, segment_checkpoints, warn_batchnorm,
)
from .task import Task
from .trajectory import Checkpoint, Segment, Trajectory, load_into
from .unroll import TrainingRecord

Method = Literal["source", "fast_source", "ekfac", "tracin", "grad_dot", "grad_cos", "trak", "repsim", "unroll"]
_FINAL_ONLY = ("ekfac", "grad_dot", "grad_cos", "repsim")
# Methods that score from per-example gradients in one pass over the data (self_score and
# score_corpus take these); the rest are baselines that score whole examples at once.
GRADIENT_METHODS = ("source", "fast_source", "ekfac", "tracin", "grad_dot")
_BASELINES = tuple(m for m in get_args(Method) if m not in GRADIENT_METHODS)
Damping = float | Literal["heuristic", "implied"]

Grads = dict[str, Tensor]  # module name → (n, d_out, d_a)

# Bytes of prepared queries score_corpus() holds by default, and the least score() takes: each block
# of that many is one pass over the training data.
DEFAULT_QUERY_MEMORY_BUDGET = 1 << 30


def automatic_query_budget(device: torch.device) -> int:
    """score()'s default budget: half the free memory of a CUDA device (the passes need the rest), a
    quarter of the available RAM on CPU, and never less than DEFAULT_QUERY_MEMORY_BUDGET. A fixed
    1 GiB holds three GPT-2-small queries, so 32 queries would read the corpus 11 times on a GPU
    with 140 GB free."""
    share = available_memory(device) // (2 if device.type == "cuda" else 4)
    return max(share, DEFAULT_QUERY_MEMORY_BUDGET)


@dataclass
class _Plan:
    """What a method needs: for each used segment, the checkpoints to take training gradients at,
    the weight of each, and the preconditioned queries to dot them with (one per checkpoint)."""

    segments: list[int]
    checkpoints: dict[int, list[Checkpoint]]
    weights: dict[int, float]
    queries: dict[int, list[Any]]  # Grads, or per-layer (left, right) factors when lowrank
    lowrank: bool = False


def _check_method(method: str) -> None:
    if method not in get_args(Method):
        raise ValueError(f"unknown method {method!r}; valid: {sorted(get_args(Method))}")


def _segments_for(trajectory: Trajectory, train_data: Any, train_segments) -> list[int]:
    """Which segments trained on train_data: a stage's examples get nothing from the other stages."""
    n_seg = len(trajectory.segments)
    if isinstance(train_segments, str) and train_segments == "all":  # (an array == "all" is elementwise)
        return list(range(n_seg))
    if train_segments is None:
        found = [i for i, s in enumerate(trajectory.segments) if s.data is train_data]
        if not found:
            raise ValueError(
                "train_data is not the data of any segment; pass train_segments=[...] (indices of the segments "
                "whose data contains these examples) or train_segments='all'"
            )
        return found
    if isinstance(train_segments, str) or not isinstance(train_segments, Iterable) or not all(
            _is_index(i) for i in train_segments):
        raise ValueError(f"train_segments must be None, 'all' or a list of segment indices, got {train_segments!r}")
    idx = sorted(set(operator.index(i) for i in train_segments))
    if not idx or idx[0] < 0 or idx[-1] >= n_seg:
        raise ValueError(f"train_segments {list(train_segments)} must name segments in 0..{n_seg - 1}")
    return idx


def used_segments(trajectory: Trajectory, method: str, train_data: Any, train_segments) -> list[int]:
    """The segments whose checkpoints score train_data: _segments_for's; the one-checkpoint methods' one
    segment scores any data, but a train_segments naming another is refused there too, not ignored."""
    if (method in _FINAL_ONLY or method == "trak" and sum(trajectory.layout()) == 1) and train_segments is None:
        return [0]
    return _segments_for(trajectory, train_data, train_segments)


def _is_index(value: Any) -> bool:
    """An integer, or anything that is one (numpy and 0-d torch integers), but not a bool or a float."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def _example_grads(model, task, specs, data, objective, what, batch_size, collate_fn, bases=None,
                   summed=False, progress=False, first: int | None = 0, passes: PassCache | None = None,
                   examples: str | None = None) -> tuple[Grads, float]:
    """Per-example layer gradients (n, d_out, d_a) of the measurement or training loss, and the mean
    number of tokens per example: used only for queries (few) and self-influence chunks (bounded),
    never for the training corpus. summed: their sum over the examples instead, (1, d_out, d_a).

    examples: what the no-gradient warning calls the examples (default `what`, which may also name a
    checkpoint: TracIn's passes over its checkpoints share one warning, a query named only if it has no
    gradient at any of them).

    bases: {name: LayerFactors} to return Q_Sᵀ G_n Q_A instead, computed from the rotated token
    matrices Σ_t (Q_Sᵀ g_t)(Q_Aᵀ a_t)ᵀ when that is cheaper — t·(d_out² + d_a²) per example against
    d_out·d_a·(d_out + d_a) for rotating G_n itself (by far, for few tokens); a sum is rotated once."""
    dtype = factor_dtype(model)
    device = next(model.parameters()).device
    # Written in place, not concatenated: the queries can be most of a job's memory. On a CPU laid out
    # (n, d_a, d_out)-major, as scoring reads them (_tiles_major_on_cpu), and formed so: re-laying the
    # queries out afterwards was a transposing copy of them all (~1 GB/s).
    n_rows = length(data)
    major = device.type == "cpu" and not summed
    out = {s.name: torch.zeros(1, s.d_out, s.d_a, device=device, dtype=dtype) if summed else
           torch.empty(n_rows, s.d_a, s.d_out, device=device, dtype=dtype).transpose(1, 2) if major else
           torch.empty(n_rows, s.d_out, s.d_a, device=device, dtype=dtype) for s in specs}
    tokens = 0
    bar = _progress(progress, n_rows, f"gradients of {what}")
    for start, n, rec in pass_of(passes)(model, task, specs, make_loader(data, batch_size, collate_fn), objective,
                                         what, bar, first):
        for s in specs:
            r = rec[s.name]
            a, g = with_ones(r.a, s).to(dtype), r.g.to(dtype)
            if summed:
                out[s.name][0] += torch.einsum("nto,nti->oi", g, a)
                continue
            lf = None if bases is None else bases[s.name]
            if lf is not None and lf.q_a is None:  # identity bases: the parameter basis
                lf = None
            if lf is not None and a.shape[1] * (s.d_a**2 + s.d_out**2) < s.d_out * s.d_a * (s.d_out + s.d_a):
                a, g, lf = a @ lf.q_a, g @ lf.q_s, None
            tile = torch.bmm(a.transpose(1, 2), g).transpose(1, 2) if major else torch.einsum("nto,nti->noi", g, a)
            out[s.name][start : start + n] = tile if lf is None else lf.q_s.T @ tile @ lf.q_a
        lead = rec[specs[0].name]
        tokens += lead.a.shape[0] * lead.a.shape[1] if lead.mask is None else int((lead.mask != 0).sum())
    if bar is not None:
        bar.close()
    if summed and bases is not None:
        for s in specs:
            if bases[s.name] is not None and bases[s.name].q_a is not None:
                out[s.name][0] = bases[s.name].q_s.T @ out[s.name][0] @ bases[s.name].q_a
    if objective == "measurement" and not summed and n_rows:
        # any() reads each gradient once; abs().amax() wrote a copy of them all (the queries' bulk) first.
        zero = ~torch.stack([g.any((1, 2)) for g in out.values()]).any(0).cpu()
        flags, examples = _zero_flags.get(), examples or what
        if flags is None or first is None:
            _warn_zero_measurements(zero, examples, first)
        else:  # some of the layers, queries or checkpoints: the call warns once, at its end
            flags.setdefault(examples, _ZeroFlags()).add(zero, first)
    return out, tokens / max(n_rows, 1)


class _ZeroFlags:
    """Per query number, whether every pass that prepared it (layer groups, blocks and pieces of queries,
    TRAK's and TracIn's checkpoints) found no gradient: AND-ed, so a query with a gradient anywhere is not
    named."""

    def __init__(self) -> None:
        self.zero = torch.zeros(0, dtype=torch.bool)
        self.seen = torch.zeros(0, dtype=torch.bool)

    def add(self, zero: Tensor, first: int) -> None:
        end = first + len(zero)
        if len(self.zero) < end:
            grow = end - len(self.zero)
            self.zero = torch.cat([self.zero, torch.ones(grow, dtype=torch.bool)])
            self.seen = torch.cat([self.seen, torch.zeros(grow, dtype=torch.bool)])
        self.zero[first:end] &= zero
        self.seen[first:end] = True


_zero_flags: contextvars.ContextVar[dict[str, _ZeroFlags] | None] = contextvars.ContextVar("zero_flags", default=None)


def _names_zero_measurements_once(fn: Callable) -> Callable:
    """fn, warning once at its end about the queries whose measurement had no gradient (not per layer
    group, block or piece of queries, each of which sees only some); inside another such call, that
    call warns."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _zero_flags.get() is not None:
            return fn(*args, **kwargs)
        flags: dict[str, _ZeroFlags] = {}
        token = _zero_flags.set(flags)
        try:
            out = fn(*args, **kwargs)
        finally:
            _zero_flags.reset(token)
        for what, f in flags.items():
            _warn_zero_measurements(f.zero & f.seen, what, 0, int(f.seen.sum()))
        return out
    return wrapper


def _warn_zero_measurements(zero: Tensor, what: str, first: int | None, n_rows: int | None = None) -> None:
    """Examples whose measurement has no gradient at any tracked layer (`zero`, a flag each; `n_rows` of
    them looked at, all by default) score 0 against everything: say so (a query with every token masked,
    its labels all -100, is one), rather than leave rows of zeros."""
    n_rows = len(zero) if n_rows is None else n_rows
    zero = zero.nonzero().flatten()
    if len(zero):
        label = "numbers" if first is not None else "this rank's numbers"  # a stream's share: its own count
        numbers = (zero[:5] + (first or 0)).tolist()
        more = ", ..." if len(zero) > 5 else ""
        warn(f"{what}: {len(zero)} of {n_rows} have a measurement with no gradient at the "
             f"tracked layers ({label} {numbers}{more}): their scores are 0 (every token masked, labels all -100?)")


@dataclass(frozen=True)
class EigenQuery:
    """A preconditioned query kept in its layer's eigenbasis: scoring rotates the training tokens
    (a Q_A, g Q_S) instead of rotating the queries back, when that costs less."""

    r: Tensor  # (q, d_out, d_a) in the eigenbasis
    q_a: Tensor
    q_s: Tensor


def _one_basis_queries(scaled: Grads, lfs: dict[str, LayerFactors], train_rows: float, n_queries: int | None = None
                       ) -> dict[str, Tensor | EigenQuery]:
    """Per layer, the cheaper of rotating the queries back once (q·d_out·d_a·(d_out + d_a)) or
    rotating every training token of every pass into the eigenbasis (rows·(d_out² + d_a²)); q is
    `n_queries` where given (a rank's share of them: every rank then chooses as the whole would).
    Consumes `scaled` layer by layer and rotates in place, so the queries exist once, not twice."""
    out: dict[str, Tensor | EigenQuery] = {}
    for name in list(scaled):
        r, lf = scaled.pop(name), lfs[name]
        d_out, d_a = r.shape[1:]
        q = r.shape[0] if n_queries is None else n_queries
        if lf.q_a is None:  # identity bases: already in the parameter basis
            out[name] = r
            continue
        if train_rows * (d_out**2 + d_a**2) < q * d_out * d_a * (d_out + d_a):
            out[name] = EigenQuery(r, lf.q_a, lf.q_s)
            continue
        step = max(1, _ROTATE_BYTES // (d_out * d_a * r.element_size()))  # bounds the temporaries
        for i in range(0, r.shape[0], step):
            r[i : i + step] = lf.q_s @ r[i : i + step] @ lf.q_a.T
        out[name] = r
    return out


_ROTATE_BYTES = 64 << 20


def _damping_value(damping: Damping, horizon: float, name: str, mean_lam: float | None = None) -> float:
    """The number `damping` stands for at one layer; `mean_lam`: its module's mean Λ (_module_mean_lams),
    which the heuristic needs."""
    if damping == "heuristic":  # kronfluence's damping_factor=None: 0.1 × the module's mean eigenvalue
        assert mean_lam is not None, f"the heuristic damping of module {name!r} needs its module's mean Λ"
        return 0.1 * mean_lam
    if damping == "implied":  # SOURCE with one segment acts like damping 1/c
        if horizon <= 0:
            raise ValueError(f"damping='implied' is 1/c, and the segment's learning-rate sum c is {horizon} "
                             f"(module {name!r}): give a number instead")
        return 1.0 / horizon
    return float(damping)  # a finite number >= 0: method_options checked it


def _invertible(delta: float, lam: Tensor, damping: Damping, name: str, what: str) -> float:
    """δ for a preconditioner 1/(Λ + δ), refused when 0 where Λ has exact zeros (an input feature that
    is always 0 leaves some): the scores would be inf and NaN."""
    if delta == 0 and bool((lam <= 0).any()):
        raise ValueError(f"module {name!r}: {what} with damping {damping!r} (here 0) divides by the curvature, "
                         "which is 0 in some directions here: give a damping > 0 as a number")
    # A Λ > 0 too small for its dtype (float32 subnormals below ~3e-39) overflows 1/(Λ + δ) to inf all the same.
    if bool(torch.isinf((lam.clamp_min(0) + delta).reciprocal()).any()):
        raise ValueError(f"module {name!r}: {what} with damping {damping!r} (here {delta:g}) divides by the curvature, "
                         f"which is too small in some directions for 1/(Λ + damping) to fit in {lam.dtype}: "
                         "give a larger damping")
    return delta


def _ekfac_damping(damping: Damping, lf: LayerFactors, horizon: float, name: str, mean_lam: float | None) -> float:
    return _invertible(_damping_value(damping, horizon, name, mean_lam), lf.lam, damping, name, "method 'ekfac'")


def _module_mean_lams(specs: list[LayerSpec], lfs: dict[str, LayerFactors]) -> dict[str, float]:
    """Each layer's module's mean Λ (negatives from round-off as 0), for the heuristic damping, which is
    per module as kronfluence's: a grouped convolution's groups share their module's (a group whose
    channel never activates has Λ = 0, and 0.1 × its own mean would be no damping)."""
    sums: dict[str, list[float]] = {}
    for s in specs:
        lam = lfs[s.name].lam.clamp_min(0)
        total = sums.setdefault(s.module, [0.0, 0])
        total[0] += float(lam.sum())
        total[1] += lam.numel()
    return {s.name: sums[s.module][0] / sums[s.module][1] for s in specs}


def _one_checkpoint_scale(method: str, seg: Segment, lf: LayerFactors, damping: Damping, spec: LayerSpec,
                          mean_lam: float | None = None) -> Tensor:
    """The preconditioner's diagonal in the eigenbasis of a one-segment method: EK-FAC's 1/(Λ + λ), or
    the segment's SOURCE factor."""
    if method != "ekfac":
        return _segment_scales(seg, lf, spec)[0]
    lam = lf.lam.clamp_min(0)  # round-off negatives
    if damping == "implied" and seg.optimizer != "sgd":
        # One Adam segment's F = p̃(1 − e^{−cσ})/σ (σ = p̃Λ) acts like 1/(Λ + 1/(c·p̃)): a damping per
        # eigen-direction, the counterpart of SGD's 1/c (an Adam step is c·P, not c).
        _damping_value(damping, seg.horizon, spec.name)  # refuses c = 0
        return 1.0 / (lam + 1.0 / (seg.horizon * _eigen_precond(lf, spec.name)))
    return 1.0 / (lam + _ekfac_damping(damping, lf, seg.horizon, spec.name, mean_lam))


def _source_walk(v: Grads, basis: dict[str, tuple[int, LayerFactors]], trajectory: Trajectory, factors: Factors,
                 used: list[int], train_rows: dict[int, float], progress: bool = False, n_queries: int | None = None,
                 own_term: dict[str, Tensor] | None = None) -> dict[int, dict[str, Tensor | EigenQuery]]:
    """The query side of SOURCE: u_ℓ = F_ℓ v, then v ← S̄_ℓ v, for ℓ = L … min(used); returns u_ℓ for
    the used segments. v arrives, per layer, in the eigenbasis of basis = (segment, its factors), and is
    consumed (its layers are popped), so each v is freed as soon as its successor exists.

    Every segment's F and S̄ are diagonal in its own eigenbasis (_segment_scales), so v stays in
    eigenbases and moves from segment ℓ+1's to ℓ's by R_S = Q'_Sᵀ Q_S, R_A = Q'_Aᵀ Q_A: two GEMMs per
    segment where rotating in, back for u and back for S̄v took six. u_ℓ goes back to the parameter
    basis only where that is cheaper than rotating the training tokens (_one_basis_queries).
    own_term, when given (v the gradients of training examples at the final checkpoint, the last used
    segment the last one), receives each example's ⟨u_L, v⟩ per layer: self-influence's term at that
    checkpoint, whose training gradients are v itself."""
    us: dict[int, dict[str, Tensor | EigenQuery]] = {ell: {} for ell in used}
    specs = {s.name: s for s in factors.layers}
    last = min(used)
    bar = _progress(progress, (len(trajectory.segments) - last) * len(v), "preconditioning queries", unit="layer")
    for ell in reversed(range(last, len(trajectory.segments))):
        seg = trajectory.segments[ell]
        scaled, lfs = {}, {}
        for name in list(v):
            vq, old = v.pop(name), basis.pop(name)
            here = old[0] == ell  # v came in this segment's basis, its factors already moved
            lf = old[1] if here else factors.segments[ell][name].to(vq.device, vq.dtype)
            r = vq if here else _into_basis(vq, old, lf)
            del vq
            u_scale, shrink = _segment_scales(seg, lf, specs[name], need_u=ell in us, need_shrink=ell > last)
            if u_scale is not None:
                scaled[name], lfs[name] = r * _laid_out_as(u_scale, r), lf
                if own_term is not None and ell == len(trajectory.segments) - 1:
                    own_term[name] = torch.einsum("nij,nij->n", scaled[name], r)
            if shrink is not None:
                v[name], basis[name] = r.mul_(_laid_out_as(shrink, r)), (ell, lf)
            if bar is not None:
                bar.update()
        if scaled:
            us[ell].update(_one_basis_queries(scaled, lfs, train_rows[ell], n_queries))
    if bar is not None:
        bar.close()
    return us


def _eigen_precond(lf: LayerFactors, name: str) -> Tensor:
    """Adam's P in the layer's eigenbasis, (d_out, d_a): p̃ = 1/((Q_S∘Q_S)ᵀ P⁻¹ (Q_A∘Q_A)), Adam's
    denominator √v̂ + ε = P⁻¹ taken by its diagonal there. This is the Rayleigh quotient of PH̄ at
    each eigenvector in the metric P⁻¹ (that of P^½H̄P^½, which shares PH̄'s eigenvalues), and it
    weighs coordinates by how much Adam divides their gradient. The diagonal of P itself, an
    arithmetic mean, lets coordinates whose gradient is always zero (v̂ = 0, so P = 1/ε: GPT-2's key
    bias, which the softmax ignores) leak 1/ε into every direction that touches them: against the
    derivative through AdamW on a one-layer GPT-2 it overstated scores 5.7–9.6-fold (Pearson 0.72–0.73
    over four seeds), this form 1.2–1.5-fold (0.84–0.91; tests/test_ground_truth.py). The rate σ = p̃Λ
    is the variational one and stiff directions (F → 1/Λ) are exact; in flat ones the response is cP,
    whose diagonal is the arithmetic mean, so there p̃ understates it by the harmonic/arithmetic ratio
    of P along the direction (about 0.9 in dense checks). With uniform P both are P."""
    if lf.precond is None:
        raise ValueError(f"factors for module {name!r} have no Adam preconditioner; fit them with this trajectory")
    if lf.q_a is None:  # identity bases
        return lf.precond
    return 1.0 / ((lf.q_s**2).T @ lf.precond.reciprocal() @ lf.q_a**2)


def _into_basis(v: Tensor, old: tuple[int, LayerFactors], new: LayerFactors) -> Tensor:
    """v given in the eigenbasis of old = (segment, factors), expressed in `new`'s (factors without
    bases: the parameter basis)."""
    before, after = old[1], new
    if before.q_a is None:
        return v if after.q_a is None else after.q_s.T @ v @ after.q_a
    if after.q_a is None:
        return before.q_s @ v @ before.q_a.T
    return (before.q_s.T @ after.q_s).T @ v @ (before.q_a.T @ after.q_a)


def _segment_scales(seg: Segment, lf: LayerFactors, spec: LayerSpec, need_u: bool = True, need_shrink: bool = False
                    ) -> tuple[Tensor | None, Tensor | None]:
    """One SOURCE segment in its eigenbasis: u = F ⊙ v and S̄v = e^{−cσ} ⊙ v, as
    (F, e^{−cσ}), each only when needed (else None).

    SGD: σ = Λ + wd, F = (1 − e^{−cσ})/σ with c the horizon. Adam/AdamW: θ −= ηP m̂ linearizes to
    A = PH̄ (+ decay), whose summed response is (I − e^{−cA}) A⁻¹P g with c = Σ η. P, diagonal in the
    parameter basis, is taken by its diagonal in H̄'s eigenbasis, p̃ = 1/((Q_S∘Q_S)ᵀ P⁻¹ (Q_A∘Q_A)) (see
    _eigen_precond), as EK-FAC
    takes H̄ by Λ: then A commutes with H̄, σ = p̃(Λ + wd) (Adam: L2 decay is in the gradient) or
    p̃Λ + wd (AdamW: decoupled), and F = p̃ (1 − e^{−cσ})/σ: no damping (F → c p̃ where σ → 0), and with a
    uniform P exactly SGD with horizon c·p. (The earlier σ = p ⊙ diag(H̄) in the parameter basis
    beside the full inverse H̄⁻¹ is not: it amplifies flat directions across steep coordinates by
    diag(H̄)/λ_min, and tracked unrolled Adam worse than EK-FAC influence.)"""
    lam = lf.lam.clamp_min(0)
    wd = seg.decay(spec.module) * seg.decay_scale  # a grouped convolution's groups: their module's
    if seg.optimizer == "sgd":
        p, sigma = None, lam + wd
    else:
        p = _eigen_precond(lf, spec.name)
        sigma = p * (lam + wd) if seg.optimizer == "adam" else p * lam + wd
    shrink = torch.exp(-seg.horizon * sigma) if need_shrink else None
    if not need_u:
        return None, shrink
    u = reference.source_factor(sigma, seg.horizon)
    return (u if p is None else u.mul_(p)), shrink


def _plan(model, task, specs, trajectory, factors, method, query_data, objective, damping, train_segs, bs, collate,
          n_train: float, summed: bool = False, progress: bool = False, what: str = "queries", first: int | None = 0,
          whole: int | None = None, own_term: dict[str, Tensor] | None = None, passes: PassCache | None = None,
          named: str | None = None):
    """The plan for `query_data`; `what` and `first` name them in errors (self_score's chunks are training
    examples, from `first`), `named` (default `what`) in the no-gradient warning, which self_score gives
    once for all its chunks. whole: the number of queries of all ranks when `query_data` is this rank's
    share of them; every rank then makes the choices the whole would (every rank must call). own_term:
    see _source_walk; filled only by SOURCE's walk across segments. passes: the cache the queries' passes
    go through (score()'s layer groups)."""
    def tokens_of_all(tokens: float) -> float:  # the mean tokens per query, of every rank's queries
        if whole is None:
            return tokens
        return all_reduce_int(round(tokens * length(query_data)), model_device(model)) / whole

    n_queries = None if whole is None else 1 if summed else whole
    named = named or what
    final = trajectory.final_checkpoint
    if method == "tracin":
        plan = _Plan(train_segs, {}, {}, {})
        for ell in train_segs:
            seg = trajectory.segments[ell]
            plan.checkpoints[ell] = list(seg.checkpoints)
            plan.weights[ell] = seg.horizon / (seg.num_examples * len(seg.checkpoints))
            plan.queries[ell] = []
            for c, ckpt in enumerate(seg.checkpoints):
                load_into(model, ckpt, f"segment {ell}, checkpoint {c}")
                plan.queries[ell].append(_example_grads(model, task, specs, query_data, objective,
                                                        f"{what} at segment {ell}, checkpoint {c}", bs, collate,
                                                        summed=summed, progress=progress, first=first,
                                                        passes=passes, examples=named)[0])
        return plan
    load_into(model, final, "final checkpoint")
    if method == "grad_dot":
        v, _ = _example_grads(model, task, specs, query_data, objective, what, bs, collate, summed=summed,
                              progress=progress, first=first, passes=passes, examples=named)
        return _Plan([0], {0: [final]}, {0: 1.0 / trajectory.segments[0].num_examples}, {0: [v]})
    ckpts = {ell: segment_checkpoints(trajectory.segments[ell], method == "fast_source", f"segment {ell}") for ell in train_segs}
    plan = _Plan(train_segs, ckpts, {ell: 1.0 / (trajectory.segments[ell].num_examples * len(ckpts[ell])) for ell in train_segs}, {})
    if len(trajectory.segments) == 1:
        # One basis (EK-FAC, or SOURCE with one segment): the queries never leave the eigenbasis —
        # rotated in from their tokens, scaled, and rotated back only if cheaper.
        seg = trajectory.segments[0]
        device, dtype = next(model.parameters()).device, factor_dtype(model)
        lfs = {s.name: factors.segments[0][s.name].to(device, dtype) for s in specs}
        # Before the queries' pass: a refused damping costs nothing.
        means = _module_mean_lams(specs, lfs) if damping == "heuristic" else {}
        scale = {s.name: _one_checkpoint_scale(method, seg, lfs[s.name], damping, s, means.get(s.name)) for s in specs}
        rot, tokens = _example_grads(model, task, specs, query_data, objective, what, bs, collate, bases=lfs,
                                     summed=summed, progress=progress, first=first, passes=passes, examples=named)
        for n, r in rot.items():  # in place: the queries are most of the memory a job uses
            r.mul_(_laid_out_as(scale[n].to(dtype), r))
        queries = _one_basis_queries(rot, lfs, n_train * tokens_of_all(tokens) * len(plan.checkpoints[0]), n_queries)
        plan.queries[0] = [queries] * len(plan.checkpoints[0])
        return plan
    # SOURCE across segments: the walk goes from segment to segment in their eigenbases (_source_walk),
    # starting in the last one's (the queries' tokens rotated in, where that is cheaper).
    device, dtype = next(model.parameters()).device, factor_dtype(model)
    bases = {s.name: factors.segments[-1][s.name].to(device, dtype) for s in specs}
    v, tokens = _example_grads(model, task, specs, query_data, objective, what, bs, collate, bases=bases,
                               summed=summed, progress=progress, first=first, passes=passes, examples=named)
    basis = {s.name: (len(trajectory.segments) - 1, bases[s.name]) for s in specs}
    tokens = tokens_of_all(tokens)
    rows = {ell: n_train * tokens * len(ckpts[ell]) for ell in train_segs}
    us = _source_walk(v, basis, trajectory, factors, train_segs, rows, progress, n_queries, own_term)  # consumes v
    for ell in train_segs:
        plan.queries[ell] = [us[ell]] * len(ckpts[ell])
    return plan


def _validate(model, task, trajectory, factors, method):
    """What can be refused before anything is computed or written (score_corpus writes a manifest next)."""
    check_model_and_task(model, task, trajectory)
    _check_method(method)
    if method in _FINAL_ONLY and sum(trajectory.layout()) != 1:
        raise ValueError(
            f"method {method!r} uses one checkpoint; pass trajectory.final() (this trajectory has "
            f"{trajectory.layout()} checkpoints per segment)"
        )
    if method in ("source", "fast_source", "tracin") and all(seg.horizon == 0 for seg in trajectory.segments):
        raise ValueError(f"every segment's learning-rate sum is 0, so every {method} score would be 0 (learning rates "
                         "read from another column of the log?)")
    specs = tracked_layers(model, task.get_influence_tracked_modules())
    if method != "unroll":  # the others read the trajectory's checkpoints
        trajectory.check_checkpoints(model)
    if method not in ("source", "fast_source", "ekfac", "unroll"):  # no fit_factors said it (unroll says its own)
        warn_batchnorm(model)
    if method in ("source", "fast_source", "ekfac"):
        if not isinstance(factors, Factors):
            raise TypeError(f"method {method!r} needs Factors from fit_factors(), got {type(factors).__name__}")
        factors.check_model(specs)
        factors.check_trajectory(trajectory, average_params=method == "fast_source")
    return specs


@_names_zero_measurements_once
def score(
    model: nn.Module,
    task: Task,
    trajectory: Trajectory,
    factors: Factors | None,
    train_data: Any,
    query_data: Any,
    method: Method = "source",
    *,
    damping: Damping | list[float | str] | None = None,
    batch_size: int = 32,
    query_rank: int | None = None,
    train_segments: list[int] | Literal["all"] | None = None,
    collate_fn: Callable | None = None,
    progress: bool = False,
    trak_dim: int | None = None,
    seed: int | None = None,
    record: TrainingRecord | None = None,
    per_token: bool = False,
    per_module: bool = False,
    sum_queries: bool = False,
    query_memory_budget: int | None = None,
) -> Tensor | dict[str, Tensor]:
    """Scores every (query, training example) pair: a (n_query, n_train) tensor.

    score[q, m] estimates f(z_q, θ_T without z_m) − f(z_q, θ_T) (positive: removing z_m increases f;
    with f a loss, z_m helped the query) and includes the 1/N factor.

    method:
      "source"      SOURCE with the factors from fit_factors(trajectory)
      "fast_source" SOURCE at the mean parameters of each segment; factors from
                    fit_factors(trajectory, average_params=True)
      "ekfac"       influence function (H + λI)⁻¹ at a one-checkpoint trajectory (trajectory.final()),
                    λ = `damping`: a number, "heuristic" (0.1 × mean Λ, per module) or "implied" (1/c,
                    with c the segment's horizon; what SOURCE implies for SGD)
      "tracin"      Σ_ℓ (c_ℓ/((1 − β_ℓ)N_ℓ)) mean over the checkpoints of ⟨∇f(z_q, θ_c), ∇L(z_m, θ_c)⟩
      "grad_dot"    ⟨∇f(z_q, θ_T), ∇L(z_m, θ_T)⟩ / N at a one-checkpoint trajectory
    Baselines for comparisons (factors unused; a one-checkpoint trajectory, except for trak):
      "grad_cos"    cosine of the two gradients (unitless)
      "trak"        TRAK with the training loss as the model output function: gradients projected
                    to `trak_dim` dims by a Gaussian map seeded by `seed`, τ = φ_qᵀ (ΦᵀΦ + Nλ)⁻¹ φ_m
                    (λ = `damping`; "heuristic": 0.1 × mean eigenvalue of ΦᵀΦ/N), Φ the training
                    loss's gradients (the paper's margin kernel weighs examples by 1/(1 − p)² against
                    this one: see the README); averaged over the checkpoints of the segments
                    that trained on the data (TRAK's ensemble; the k-th checkpoint's map is seeded by
                    `seed` + k), or at a one-checkpoint trajectory. `damping` may be a list: the scores
                    of each, stacked first (len(damping), n_query, n_train), from one pass (Φ does not
                    depend on it), as choosing it on held-out queries needs
      "repsim"      cosine similarity of the last tracked layer's inputs (unitless)
      "unroll"      exact unrolled differentiation of the recorded run `record` (small models only;
                    in f's units, no 1/N: it is the first-order leave-one-out change itself)
    damping, trak_dim, seed, record: only for the methods that read them (damping: "ekfac" and "trak",
        default "heuristic"; trak_dim (default 256) and seed (default 0): "trak"; record: "unroll");
        given to another method they are refused, not dropped. SOURCE needs no damping: F(0) = c.
    query_memory_budget: bytes for prepared queries. None: automatic_query_budget(the model's device),
        half the free GPU memory or a quarter of the available RAM, at least 1 GiB. When all the queries
        do not fit it, on a CPU the layers go a group at a time (_score_in_layer_groups), the passes over
        the data kept on disk under TMPDIR, so the training data is still read once per checkpoint; on
        a GPU, under torch.distributed, or without the disk space, the queries go in blocks, each block
        re-reading the training data once per checkpoint (kronfluence re-reads it for every query batch).
    query_rank: approximate each preconditioned query layer by its top singular vectors (cheaper
        scoring of huge corpora; None = exact).
    train_segments: which segments trained on `train_data` (None: those whose `data` is it; "all":
        every segment).
    per_token: return (n_query, n_train, tokens), each training example's score split over its
        tokens (all tracked layers must see the same token count; a padded token's share is zero unless
        the loss reads it, and columns past a batch's longest sequence are 0).
    per_module: return {tracked module name: its scores}, which sum to the scores (EK-FAC and
        SOURCE are block-diagonal over layers, so each module's part is its own attribution).
    sum_queries: score the sum of the queries' measurements, (1, n_train): the same as summing the
        rows, but with one prepared query, so the training data is read once however many queries.
    Training gradients come from one pass over `train_data` per checkpoint, for all queries. Under
    torch.distributed each rank scores its share of the training data (a dataset's contiguous slice, a
    stream's every world-th example) against every query, and every rank returns the whole matrix;
    each prepares its share of the queries (all of them with fewer queries than ranks) and they
    exchange them; the ranks' inputs are compared first (refused where they differ). TRAK sums ΦᵀΦ over the ranks;
    unroll replays the whole run on every rank.
    train_data: a dataset, a re-iterable stream of examples (read in pieces of `STREAM_CHUNK`
        examples, each piece scored at every checkpoint) or a DataLoader that reads in order (its own
        batch size and collate_fn then apply); query_data likewise (a stream's queries are held in memory).
    """
    device = model_device(model)
    splits = method != "unroll"  # under torch.distributed; unroll replays the whole run on every rank
    with fail_together(device) if splits else contextlib.nullcontext():  # a refusal on one rank is every rank's
        specs, (damping, trak_dim, seed, query_memory_budget), query_data, n_train, n_query = check_request(
            model, task, trajectory, factors, method, train_data, query_data, damping, query_rank, query_memory_budget,
            collate_fn, batch_size, trak_dim, seed, record)
        per_token, per_module, sum_queries = (_yes_no(flag, value) for flag, value in (
            ("per_token", per_token), ("per_module", per_module), ("sum_queries", sum_queries)))
        if method == "unroll" and train_segments is not None:
            raise ValueError("train_segments is not for method 'unroll': its record says which examples each step "
                             "trained on")
        segments = used_segments(trajectory, method, train_data, train_segments) if method != "unroll" else [0]
        if method in _BASELINES:
            if n_train is None:
                raise TypeError(f"method {method!r} needs a dataset with len() and indexing, not a stream")
            for option, value in (("per_token", per_token), ("query_rank", query_rank), ("per_module", per_module),
                                  ("sum_queries", sum_queries)):
                if value:  # these baselines score whole examples exactly; dropping the option would be silent
                    raise ValueError(f"{option} is not available for method {method!r}; it applies to "
                                     f"{', '.join(GRADIENT_METHODS)}")
            if method == "trak":  # TRAK builds a dense Gaussian map per layer, dim · d_out · d_a (in float64 first)
                need = int(trak_dim) * sum(s.d_out * s.d_a for s in specs) * (8 + factor_dtype(model).itemsize)
                budget = automatic_query_budget(device)
                if need > budget:
                    raise ValueError(f"TRAK's projection with trak_dim={trak_dim} takes {need} bytes for these "
                                     f"{len(specs)} layers, more than the {budget} available: lower trak_dim or track "
                                     "fewer layers")
    if method in _BASELINES:
        if splits:
            _check_same_on_ranks("score", model, task, trajectory, factors, method, train_data, query_data, collate_fn,
                                 {"damping": damping, "trak_dim": trak_dim, "seed": seed, "train_segments": segments})
        share, first = (rank_share(train_data), share_start(train_data)) if splits else (train_data, 0)
        with restored(model), reuse_large_blocks(device):
            out = _baseline(model, task, specs, trajectory, segments, method, share, first, query_data, damping,
                            batch_size, collate_fn, trak_dim, seed, record)
        return gather_shares(out, out.dim() - 1, strided=False) if splits else out  # a dataset's shares: contiguous
    # The ranks must cut the same query blocks: the least free memory decides. Every rank takes part (a
    # budget given counts as no limit here; the ranks' budgets are compared next).
    automatic = min_on_ranks(automatic_query_budget(device) if query_memory_budget is None else _NO_LIMIT, device)
    query_memory_budget = automatic if query_memory_budget is None else query_memory_budget
    _check_same_on_ranks("score", model, task, trajectory, factors, method, train_data, query_data, collate_fn, {
        "damping": damping, "query_rank": query_rank, "query_memory_budget": query_memory_budget,
        "train_segments": segments, "per_token": per_token, "per_module": per_module, "sum_queries": sum_queries})
    n_rows = 1 if sum_queries else n_query
    blocks = query_blocks(model, specs, trajectory, method, segments, n_rows, query_rank, query_memory_budget)
    options = dict(damping=damping, train_segments=train_segments, query_rank=query_rank, batch_size=batch_size,
                   collate_fn=collate_fn, progress=progress, per_token=per_token, per_module=per_module)
    if len(blocks) > 1 and device.type == "cpu" and rank_and_world()[1] == 1:
        try:
            return _score_in_layer_groups(model, task, specs, trajectory, factors, method, segments, train_data,
                                          query_data, n_rows, query_memory_budget, **options)
        except NoRoom as exc:
            warn(f"score: the disk cannot keep the passes over the data ({exc}; tempfile's directory, TMPDIR): "
                 f"the queries go in {len(blocks)} blocks instead, each re-reading the training data")
    parts = []
    strided = share_start(train_data) is None  # a stream's share under torch.distributed: every world-th example
    with restored(model), reuse_large_blocks(device):
        for b, block in enumerate(blocks):  # more than one block re-reads the training data once per block
            queries = query_data if len(blocks) == 1 else subset(query_data, block)
            plan = None  # the previous block's queries go before this block's are made
            # A failure in this rank's share (a bad example) ends this rank; the launcher (torchrun) stops the
            # others and reports it: waiting for them to finish their shares first would take as long again.
            with oom_hint(f"scoring query block {b} ({len(block)} queries)", train_data, batch_size, query_memory_budget):
                plan = prepare_queries(
                    model, task, specs, trajectory, factors, method, train_data, queries, damping=damping,
                    train_segments=train_segments, query_rank=query_rank, batch_size=batch_size, collate_fn=collate_fn,
                    sum_queries=sum_queries, memory_budget=query_memory_budget, progress=progress, shared=True,
                    first=block.start,
                )
                mine = _score_share(model, task, specs, plan, train_data, len(block) if not sum_queries else 1,
                                    batch_size=batch_size, collate_fn=collate_fn, progress=progress,
                                    per_token=per_token, per_module=per_module)
            parts.append(_each(mine, lambda t: gather_shares(t, 1, strided)))  # every rank's columns, in order
            _check_columns(trajectory, train_data, parts[-1])
    return _cat(parts, 0)


def _check_columns(trajectory: Trajectory, train_data: Any, scores: Tensor | dict[str, Tensor]) -> None:
    columns = (next(iter(scores.values())) if isinstance(scores, dict) else scores).shape[1]
    if columns == 0:
        raise ValueError("empty data: the training stream yielded no examples")
    check_rows(trajectory, train_data, columns)


def _score_in_layer_groups(model, task, specs, trajectory, factors, method, segments, train_data, query_data,
                           n_rows: int, budget: int, *, damping, train_segments, query_rank, batch_size, collate_fn,
                           progress, per_token, per_module, first: int | None = None) -> Tensor | dict[str, Tensor]:
    """score() on a CPU when the prepared queries do not fit `budget` at once: the layers a group at a time
    (layer_groups), every query in each, the scores summed over the groups (every method here is
    block-diagonal over layers). The passes over the training data and the queries run once, their
    layers' tokens kept on disk for the later groups (PassCache): blocks of queries re-run the model
    over the training data once per block, form each training example's gradient tiles once per block,
    and choose each layer's basis for a block's queries (rotating the training tokens into the
    eigenbasis pays for many queries at once). One process only: under torch.distributed each rank
    reads its share of the data, and the ranks' blocks stay in step. Raises NoRoom, having written
    nothing the caller sees, when the disk cannot hold the passes.

    first: train_data is a piece of the training data that begins at row `first` (score_corpus's shard;
    train_segments then names the segments), scored whole; None: this rank's share of it."""
    # With query_rank a group's queries are prepared at full rank, all of them at once (every group cuts the
    # queries' passes alike: they are replayed), and factorised one by one: full rank and low rank together.
    full, low = (_query_bytes(model, trajectory, method, segments, r) for r in (None, query_rank))
    turns = layer_groups(specs, n_rows, (lambda s: full(s) + low(s)) if query_rank else full, budget)
    total: Tensor | dict[str, Tensor] | None = None
    device = model_device(model)
    examples = expected_rows(trajectory, train_data)
    # Every layer's tokens are checked at each recorded batch (the first is a query's): a group's own check
    # would find layers that per_token cannot add up only after the groups before it had scored everything.
    check = (lambda records: check_token_scores(specs, records, per_module)) if per_token else None
    with restored(model), reuse_large_blocks(device), PassCache(specs, check=check) as passes:
        for k, (rows, group) in enumerate(turns):
            passes.round(rows, later={s.name for _, g in turns[k + 1 :] for s in g})
            queries = query_data if len(rows) == n_rows else subset(query_data, rows)
            where = f"scoring layer group {k} of {len(turns)} ({len(group)} layers, {len(rows)} queries)"
            with oom_hint(where, train_data, batch_size, budget):
                plan = prepare_queries(
                    model, task, group, trajectory, factors, method, train_data, queries, damping=damping,
                    train_segments=train_segments, query_rank=query_rank, batch_size=batch_size,
                    collate_fn=collate_fn, sum_queries=False, progress=progress, passes=passes, first=rows.start)
                if k == 0:  # the round that runs the training passes, one per checkpoint
                    passes.expect_training(None if examples is None else examples * sum(
                        len(plan.checkpoints[ell]) for ell in plan.segments))
                options = dict(batch_size=batch_size, collate_fn=collate_fn, progress=progress, per_token=per_token,
                               per_module=per_module, passes=passes)
                part = _score_share(model, task, group, plan, train_data, len(rows), **options) if first is None \
                    else score_rows(model, task, group, plan, train_data, first=first, **options)
            del plan
            _check_columns(trajectory, train_data, part)
            total = _add_rows(total, part, rows, n_rows)
    assert total is not None
    if isinstance(total, dict):  # in the tracked modules' order, as one block gives them
        total = {name: total[name] for name in dict.fromkeys(s.module for s in specs)}
    return total


def _add_rows(total: Tensor | dict[str, Tensor] | None, part: Tensor | dict[str, Tensor], rows: range, n_rows: int
              ) -> Tensor | dict[str, Tensor]:
    """total[rows] += part: a layer group's scores of queries `rows` (per module: {module: scores})."""
    if isinstance(part, dict):
        out = {} if total is None else dict(total)
        for name, t in part.items():
            out[name] = _add_rows(out.get(name), t, rows, n_rows)
        return out
    if total is None:
        total = part.new_zeros((n_rows,) + part.shape[1:])
    total[rows.start : rows.stop] += part
    return total


def check_request(model, task, trajectory, factors, method, train_data, query_data, damping, query_rank,
                  query_memory_budget, collate_fn, batch_size, trak_dim=None, seed=None, record=None):
    """The checks score and score_corpus make before any pass. Returns the tracked layers, the
    resolved (damping, trak_dim, seed, query_memory_budget), the queries held in memory and both sizes."""
    specs = _validate(model, task, trajectory, factors, method)
    options = (*method_options(method, damping, trak_dim, seed, record), check_query_budget(query_memory_budget))
    check_count("query_rank", query_rank, none_ok=True)
    query_data = materialize(query_data)
    n_train, n_query = length(train_data), length(query_data)
    if n_query == 0 or n_train == 0:
        raise ValueError(f"empty data: {n_query} queries, {n_train} training examples")
    if method != "repsim":  # every other method differentiates both
        check_summed(model, task, train_data, collate_fn, batch_size, "train")
        check_summed(model, task, query_data, collate_fn, batch_size, "measurement")
    check_collate_order(train_data, collate_fn, batch_size)
    check_collate_order(query_data, collate_fn, batch_size)
    return specs, options, query_data, n_train, n_query


def method_options(method: str, damping: Damping | None, trak_dim: int | None = None, seed: int | None = None,
                   record: TrainingRecord | None = None) -> tuple[Damping, int, int]:
    """Options only some methods read, refused for the others (dropped, they would change nothing,
    silently), and their defaults: damping "heuristic", trak_dim 256, seed 0."""
    users = {"damping": ("ekfac", "trak"), "trak_dim": ("trak",), "seed": ("trak",), "record": ("unroll",)}
    for option, value in (("damping", damping), ("trak_dim", trak_dim), ("seed", seed), ("record", record)):
        if value is not None and method not in users[option]:
            why = (": SOURCE needs no damping (its factor at zero curvature is the horizon c)"
                   if option == "damping" and method in ("source", "fast_source") else "")
            raise ValueError(f"{option} is not used by method {method!r}, only by {' and '.join(users[option])}{why}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not -(2**63) <= seed < 2**64):
        raise ValueError(f"seed must be an integer in torch.manual_seed's range [-2**63, 2**64), got {seed!r}")
    # Checked here, before any pass: TRAK reads the training data only after the queries' gradients.
    check_count("trak_dim", trak_dim, none_ok=True)
    if isinstance(damping, (list, tuple)) and (method != "trak" or not damping):
        raise ValueError(f"damping: a list of dampings is for trak (whose features do not depend on it), and not "
                         f"empty; got {damping!r} for method {method!r}")
    listed = method == "trak" and isinstance(damping, (list, tuple))
    # numpy's numbers as Python's: every check below and the JSON of score_corpus's manifest take them.
    damping = [_plain_number(v) for v in damping] if listed else _plain_number(damping)
    if method == "ekfac" and damping not in (None, "heuristic", "implied") and not (
            isinstance(damping, float) and 0 <= damping < math.inf):
        raise ValueError(f"damping must be a finite number >= 0, 'heuristic' or 'implied'; got {damping!r}")
    for value in (damping if listed else [damping]):
        if method == "trak" and (value is not None or listed) and value != "heuristic" and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf):
            raise ValueError(f"trak's damping must be a finite number >= 0 or 'heuristic' (it has no learning-rate "
                             f"horizon for 'implied'), or a list of them; got {value!r}")
    return (("heuristic" if damping is None else damping), (256 if trak_dim is None else trak_dim),
            (0 if seed is None else int(seed)))


def _plain_number(value: Any) -> Any:
    """A real number (numpy's too) as a Python float; anything else as it is."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) else value


def check_query_budget(budget: Any) -> int | None:
    """The budget as whole bytes (2**30 * 0.5 is a fine way to say it), or None."""
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)
                               or not 1 <= budget < math.inf):
        raise ValueError(f"query_memory_budget must be a positive, finite number of bytes or None, got {budget!r}")
    return None if budget is None else int(budget)


def _yes_no(flag: str, value: Any) -> bool:
    """A yes/no option as a bool: True, False or numpy's; not "no", which is true to Python."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{flag} must be True or False, got {value!r}")
    return bool(value)


def expected_rows(trajectory: Trajectory, train_data: Any) -> int | None:
    """The examples `train_data` holds: its length, or a stream's declared by its segment's num_examples
    (None for a stream that is no segment's data)."""
    n = length(train_data)
    if n is None:
        n = next((seg.num_examples for seg in trajectory.segments if seg.data is train_data), None)
    return n


def check_rows(trajectory: Trajectory, train_data: Any, rows: int) -> None:
    """A stream's segments declare num_examples (N in the 1/N); the examples read must match it."""
    for ell, seg in enumerate(trajectory.segments):
        if seg.data is train_data and seg.num_examples != rows:
            raise ValueError(f"the training data yielded {rows} examples but segment {ell} has num_examples={seg.num_examples}")


@contextlib.contextmanager
def oom_hint(where: str, train_data: Any, batch_size: int, query_memory_budget: int) -> Iterator[None]:
    """Running out of memory, re-raised with the options that fix it (a DataLoader's own batch size)."""
    if isinstance(train_data, DataLoader):
        batch_size = train_data.batch_size
    try:
        yield
    except torch.OutOfMemoryError as exc:
        raise torch.OutOfMemoryError(
            f"out of memory {where}: lower batch_size ({batch_size}) or query_memory_budget "
            f"({query_memory_budget} bytes), or set query_rank"
        ) from exc


_NO_LIMIT = 2**52  # a query budget that limits nothing (and is exact in the float64 of min_on_ranks)
STREAM_CHUNK = 4096  # examples of a stream buffered at a time by `score`: bounds its memory


def _score_share(model, task, specs, plan, train_data, n_query: int, **kwargs) -> Tensor | dict[str, Tensor]:
    """score_rows over this rank's share of `train_data` (all of it in one process; a stream in
    buffered pieces, one read of it). Under torch.distributed a rank's examples of a stream are not a
    run of them (first None), and a stream may leave a rank none: (n_query, 0) scores then."""
    share, first = rank_share(train_data), share_start(train_data)
    if not is_stream(share):
        return score_rows(model, task, specs, plan, share, first=first, **kwargs)
    parts = [score_rows(model, task, specs, plan, piece, first=None if first is None else start, **kwargs)
             for start, piece in _stream_pieces(share, kwargs.get("passes"))]
    if parts:
        return _cat(parts, 1)
    empty = torch.zeros((n_query, 0) + ((0,) if kwargs.get("per_token") else ()), dtype=factor_dtype(model),
                        device=model_device(model))
    return {s.module: empty for s in specs} if kwargs.get("per_module") else empty


def _stream_pieces(stream: Any, passes: PassCache | None) -> Iterator[tuple[int, Any]]:
    """chunks() of a stream; where its passes are kept, read once: later layer groups replay them, so
    their pieces are placeholders of the same sizes (an expensive stream, tokenised or fetched, is not
    read again)."""
    if passes is None:
        yield from chunks(stream, STREAM_CHUNK)
        return
    if passes.stream_pieces is not None:
        start = 0
        for n in passes.stream_pieces:
            yield start, [None] * n  # never read: the cache replays the recorded pass
            start += n
        return
    sizes = []
    for start, piece in chunks(stream, STREAM_CHUNK):
        sizes.append(length(piece))
        yield start, piece
    passes.stream_pieces = sizes


def _each(scores: Tensor | dict[str, Tensor], fn: Callable[[Tensor], Tensor]) -> Tensor | dict[str, Tensor]:
    """fn of the scores, or of each module's for per-module scores."""
    return {name: fn(t) for name, t in scores.items()} if isinstance(scores, dict) else fn(scores)


def _check_same_on_ranks(what, model, task, trajectory, factors, method, train_data, query_data, collate_fn,
                         options: dict) -> None:
    """Under torch.distributed each rank scores its share of the training data against every query,
    and the shares are put together: ranks given other queries, factors, checkpoints or training data
    (a pre-sharded part each, DDP's habit) would fill one matrix with several runs' columns. Refused
    on every rank together, naming what differs (every rank must reach this call: what can fail on one
    rank before it runs under fail_together). Cheap: checkpoints and factors by sampled values,
    the training data by its length and sampled examples, the queries (few) each."""
    rank, world = rank_and_world()
    if world == 1:
        return
    with fail_together(model_device(model)):  # reading checkpoints or examples can fail on one rank
        inputs = {
            "method and options": [method, options],
            "task": describe_task(task, collate_fn),
            "model (parameter and buffer names, shapes, dtypes)": describe_model(model),
            "trajectory (checkpoints per segment, learning rates, data sizes)": trajectory.settings(),
            "checkpoints (sampled values)": _checkpoint_digests(trajectory, checkpoint_signature),
            "factors (sampled values)": factors_signature(factors),
            "training data (length and sampled examples)": digest_examples(train_data),
            "queries": None if query_data is None else digest_examples(query_data, limit=None),
        }
    differ = differing_on_ranks(inputs, model_device(model))
    if differ:
        raise ValueError(f"rank {rank}: the ranks were given different inputs to {what}: they differ in "
                         f"{'; '.join(differ)}. Under torch.distributed give every rank the same inputs and the "
                         "whole training data: each scores its own share of it")
    n = length(train_data)  # the same on every rank by now
    if n is not None and n < world:
        raise ValueError(f"{n} training examples for {world} ranks: run on fewer ranks")


def _cat(parts: list[Tensor] | list[dict[str, Tensor]], dim: int) -> Tensor | dict[str, Tensor]:
    """torch.cat of score pieces, module by module for per-module scores; per-token pieces are
    padded to the most tokens any piece has."""
    if isinstance(parts[0], dict):
        return {name: _cat([p[name] for p in parts], dim) for name in parts[0]}
    return torch.cat(_same_tokens(*parts) if parts[0].dim() == 3 else parts, dim)


def _same_tokens(*scores: Tensor) -> tuple[Tensor, ...]:
    """Per-token scores zero-padded on their last (token) axis to the longest; those already that
    long are returned as they are (score_rows calls this on its whole accumulator every batch)."""
    t = max(x.shape[-1] for x in scores)
    return tuple(x if x.shape[-1] == t else torch.nn.functional.pad(x, (0, t - x.shape[-1])) for x in scores)


def _query_bytes(model, trajectory, method, segments, query_rank) -> Callable[[LayerSpec], int]:
    """The bytes one prepared query takes at a layer: d_out·d_a (or r·(d_out + d_a) with query_rank r)
    for each distinct preconditioned copy (one per scored segment for SOURCE, one per checkpoint of those
    for TracIn)."""
    per_copy = _prepared_copies(trajectory, method, segments) * factor_dtype(model).itemsize
    return lambda s: per_copy * (s.d_out * s.d_a if not query_rank else query_rank * (s.d_out + s.d_a))


def query_blocks(model, specs, trajectory, method, segments, n_query, query_rank, budget: int) -> list[range]:
    """Query index blocks whose prepared gradients fit `budget` bytes (_query_bytes at every layer)."""
    copies = _prepared_copies(trajectory, method, segments)
    itemsize = factor_dtype(model).itemsize
    per_query = sum(map(_query_bytes(model, trajectory, method, segments, query_rank), specs))
    if per_query > budget:  # even one query would break the promise: say what fits instead
        per_rank = copies * itemsize * sum(s.d_out + s.d_a for s in specs)
        fits = f"query_rank={budget // per_rank}" if budget >= per_rank else "no query_rank either"
        raise ValueError(
            f"one query's prepared gradients take {per_query} bytes ({copies} cop{'y' if copies == 1 else 'ies'} of "
            f"{len(specs)} layers), more than query_memory_budget={budget}: raise the budget, or approximate the "
            f"queries with a lower rank ({fits} fits)"
        )
    per_block = budget // per_query
    return [range(s, min(n_query, s + per_block)) for s in range(0, n_query, per_block)]


def layer_groups(specs: list[LayerSpec], n_query: int, bytes_of: Callable[[LayerSpec], int], budget: int
                 ) -> list[tuple[range, list[LayerSpec]]]:
    """score()'s turns when the queries do not fit `budget` at once (_score_in_layer_groups): modules
    packed in groups whose prepared queries, all of them, fit it; a module whose queries alone do not
    fit, in blocks of them. A module's layers (a grouped convolution's groups) stay together: the
    heuristic damping is their mean Λ, and per-module scores their sum."""
    modules: dict[str, list[LayerSpec]] = {}
    for s in specs:
        modules.setdefault(s.module, []).append(s)
    everyone = range(n_query)
    turns: list[tuple[range, list[LayerSpec]]] = []
    group: list[LayerSpec] = []
    used = 0
    for layers in modules.values():
        need = n_query * sum(map(bytes_of, layers))
        if need > budget:  # one query of every layer fits (query_blocks), so one of a module does
            step = max(1, budget // sum(map(bytes_of, layers)))
            turns += [(range(q, min(n_query, q + step)), layers) for q in range(0, n_query, step)]
            continue
        if group and used + need > budget:
            turns.append((everyone, group))
            group, used = [], 0
        group, used = group + layers, used + need
    if group:
        turns.append((everyone, group))
    return turns


def _prepared_copies(trajectory: Trajectory, method: str, segments: list[int]) -> int:
    """How many preconditioned copies of a query a plan holds: one per scored segment for SOURCE, one
    per checkpoint of those for TracIn, one for the one-checkpoint methods."""
    if method in _FINAL_ONLY:
        return 1
    if method == "tracin":
        return sum(len(trajectory.segments[ell].checkpoints) for ell in segments)
    return len(segments)


def self_chunk_size(model, specs, trajectory, method, segments, budget: int) -> int:
    """Examples per chunk of self_score's unfused path: each example holds its preconditioned copies
    and its gradient at the checkpoint being read, d_out·d_a per layer each (340 MB per copy for
    GPT-2 small in fp32, so a fixed chunk of 256 needed 174 GB)."""
    per_example = (_prepared_copies(trajectory, method, segments) + 1) * factor_dtype(model).itemsize * sum(
        s.d_out * s.d_a for s in specs)
    if per_example > budget:
        raise ValueError(f"one example's self-influence takes {per_example} bytes of gradients, more than the "
                         f"{budget} bytes available: give chunk_size=1 to run it anyway, or track fewer layers")
    return budget // per_example


@_names_zero_measurements_once
def prepare_queries(
    model, task, specs, trajectory, factors, method, train_data, query_data, *, damping, train_segments, query_rank,
    batch_size, collate_fn, sum_queries=False, memory_budget: int | None = None, progress=False, shared=False,
    passes: PassCache | None = None, first: int = 0,
) -> _Plan:
    """The query side, once: preconditioned query gradients for every checkpoint that will score
    the training data (low-rank factors when `query_rank` is set; one summed query with sum_queries).

    shared, under torch.distributed (every rank must call): each rank prepares its share of the
    queries and the ranks exchange them (the sum of the shares' with sum_queries: preconditioning is
    linear), instead of every rank preparing them all.

    memory_budget, with query_rank: each query is preconditioned at full rank before its SVD, so the
    queries are prepared in pieces whose full-rank copies fit in what the block's low-rank factors
    leave of it (at least one query), each piece factorised before the next.

    first: the number of query_data's first query among all the queries (a block's), for warnings that
    name queries."""
    train_segs = used_segments(trajectory, method, train_data, train_segments)
    if query_rank and memory_budget is not None and not sum_queries:
        n = length(query_data)
        per_copy = _prepared_copies(trajectory, method, train_segs) * factor_dtype(model).itemsize
        full = per_copy * sum(s.d_out * s.d_a for s in specs)
        low_rank = n * per_copy * sum(query_rank * (s.d_out + s.d_a) for s in specs)
        step = max(1, (memory_budget - low_rank) // full)
        if step < n:
            return _prepared_in_pieces(
                n, step, lambda piece, start: prepare_queries(
                    model, task, specs, trajectory, factors, method, train_data, piece, damping=damping,
                    train_segments=train_segments, query_rank=query_rank, batch_size=batch_size,
                    collate_fn=collate_fn, progress=progress, shared=shared, passes=passes, first=first + start),
                query_data)
    n_train = length(train_data)
    if n_train is None:  # a stream: its segments' N (only steers which basis scoring works in)
        n_train = sum(trajectory.segments[ell].num_examples for ell in train_segs)
    rank, world = rank_and_world()
    n_train /= world  # the rows this rank scores, under torch.distributed
    if query_rank:  # factorised in the eigenbasis, the queries' factors rotate back for little (_lowrank)
        n_train = 0
    whole = length(query_data) if shared and world > 1 else None  # queries are held in memory (check_request)
    if whole is not None and whole < world:
        whole = None  # a rank would have none: each prepares them all
    mine = query_data if whole is None else subset(query_data, range(rank * whole // world, (rank + 1) * whole // world))
    plan = _plan(
        model, task, specs, trajectory, factors, method, mine, "measurement", damping, train_segs,
        batch_size, collate_fn, n_train, summed=sum_queries, progress=progress, first=first + (
            0 if whole is None else rank * whole // world), whole=whole, passes=passes,
    )
    if whole is not None and sum_queries:
        _each_query(plan, _summed_over_ranks)
    if query_rank:  # SOURCE shares one u_ℓ across a segment's checkpoints: _each_query factorises each once
        _each_query(plan, lambda q: _lowrank(q, query_rank), whole_layers=True)
    if whole is not None and not sum_queries:
        _each_query(plan, lambda t: gather_shares(t, 0, strided=False))
    plan.lowrank = bool(query_rank)
    if not query_rank and model_device(model).type == "cpu":
        _tiles_major_on_cpu(plan)
    return plan


def _summed_over_ranks(t: Tensor) -> Tensor:
    all_reduce_sum_([t])
    return t


def _each_query(plan: _Plan, fn: Callable, whole_layers: bool = False) -> None:
    """plan.queries with fn applied once to each distinct prepared query (a segment's checkpoints share
    one dict), in the same order on every rank: to each tensor (an EigenQuery's r, low-rank factors),
    or with whole_layers to each {layer: query} dict."""
    def each(q: Any) -> Any:
        if isinstance(q, EigenQuery):
            return EigenQuery(fn(q.r), q.q_a, q.q_s)
        return tuple(fn(f) for f in q) if isinstance(q, tuple) else fn(q)

    done: dict[int, Any] = {}
    for qs in plan.queries.values():
        for layers in qs:
            if id(layers) not in done:
                done[id(layers)] = fn(layers) if whole_layers else {k: each(q) for k, q in layers.items()}
    plan.queries = {ell: [done[id(layers)] for layers in qs] for ell, qs in plan.queries.items()}


def _prepared_in_pieces(n: int, step: int, prepare: Callable[[Any, int], _Plan], query_data: Any) -> _Plan:
    """One low-rank plan for n queries from plans of `step` queries each, written into factors
    allocated once (a concatenation at the end would hold every factor twice)."""
    out: _Plan | None = None
    for start in range(0, n, step):
        piece = prepare(subset(query_data, range(start, min(n, start + step))), start)
        pieces = piece.queries
        if out is None:
            merged: dict[int, dict[str, tuple[Tensor, ...]]] = {}
            for qs in pieces.values():  # a segment's checkpoints may share one dict
                for q in qs:
                    if id(q) not in merged:
                        merged[id(q)] = {k: tuple(f.new_empty((n,) + f.shape[1:]) for f in lr) for k, lr in q.items()}
            out = replace(piece, queries={ell: [merged[id(q)] for q in qs] for ell, qs in pieces.items()})
        for ell, qs in pieces.items():
            for c, q in enumerate(qs):
                for k, factors in q.items():
                    for target, f in zip(out.queries[ell][c][k], factors):
                        target[start : start + f.shape[0]] = f
    assert out is not None
    return out


def _tiles_major_on_cpu(plan: _Plan) -> None:
    """Re-lays each prepared query (q, d_out, d_a) out (q, d_a, d_out)-major, the same tensor: the CPU
    contraction then forms the training tiles in the orientation MKL's batched GEMM is fastest at
    (reference.pairwise_scores reads the strides; ~20 % less time per pass at GPT-2 shapes) and dots
    them with the queries without a copy per batch. Layer by layer, so only one layer is doubled. Queries
    _example_grads formed on this CPU are in that layout already (no copy); gathered shares are not."""
    done: set[int] = set()
    for qs in plan.queries.values():
        for layers in qs:  # checkpoints of a segment share one dict
            if id(layers) in done:
                continue
            done.add(id(layers))
            for name, q in layers.items():
                if isinstance(q, EigenQuery):
                    layers[name] = EigenQuery(_transposed_layout(q.r), q.q_a, q.q_s)
                else:
                    layers[name] = _transposed_layout(q)


def _transposed_layout(u: Tensor) -> Tensor:
    return u.transpose(1, 2).contiguous().transpose(1, 2)


def _laid_out_as(scale: Tensor, queries: Tensor) -> Tensor:
    """A layer's (d_out, d_a) scale in the memory order of its (n, d_out, d_a) queries: multiplying
    (d_a, d_out)-major queries by a row-major scale ran 9× slower (strided reads of the scale)."""
    return scale.T.contiguous().T if queries.dim() == 3 and queries.transpose(1, 2).is_contiguous() else scale


def score_rows(model, task, specs, plan: _Plan, data, *, batch_size, collate_fn, progress=False, per_token=False,
               per_module=False, first=0, passes: PassCache | None = None) -> Tensor | dict[str, Tensor]:
    """(n_query, len(data)) scores of map-style `data` (training examples) against prepared queries:
    one pass over `data` per checkpoint, all queries at once. per_token: (n_query, len(data), tokens).
    per_module: {tracked module: its part of those scores}. first: where `data` begins in the
    training data (a shard, a stream's piece), for errors that name examples. passes: the cache the
    passes go through (score()'s layer groups)."""
    loader = make_loader(data, batch_size, collate_fn)
    n_rows = length(data)
    scores: dict[str, Tensor] = {}
    for ell in plan.segments:
        for c, ckpt in enumerate(plan.checkpoints[ell]):
            what = f"segment {ell}, checkpoint {c}"
            load_into(model, ckpt, what)
            bar = _progress(progress, n_rows, f"scoring ({what})")
            # Low-rank queries read no tiles, so joining would only grow their (examples, tokens, q, r) terms.
            joined = not (per_token or plan.lowrank)
            # Joined, the pass runs up to a block ahead of the scoring: the bar follows the scoring.
            batches = pass_of(passes)(model, task, specs, loader, "train", what, None if joined else bar, first)
            tokens = 0
            for start, n, rec in (_in_blocks(batches) if joined else batches):
                parts = _score_block(specs, rec, plan.queries[ell][c], plan.lowrank, per_token, per_module)
                for key, block in parts.items():
                    block = block.transpose(0, 1)
                    if key not in scores:
                        scores[key] = block.new_zeros((block.shape[0], n_rows) + block.shape[2:])
                    if per_token:  # batches padded each to its own longest example differ in tokens
                        scores[key], block = _same_tokens(scores[key], block)
                    scores[key][:, start : start + n] += plan.weights[ell] * block
                if joined and bar is not None:
                    tokens = advance(bar, rec[specs[0].name], n, tokens)
                del rec, parts  # else this block stays alive while the next one is joined
            if bar is not None:
                bar.close()
    assert scores
    return scores if per_module else scores[_ALL]


_ALL = ""  # _score_block's key for the sum over modules (no module has the empty name)

# score_rows scores a CPU pass's batches joined into blocks of up to BLOCK_EXAMPLES examples whose tokens,
# padded to the block's longest, take up to BLOCK_BYTES: every block reads every query's whole tile, so the
# loader's batches (8 GPT-2 sequences) left the tiles' GEMM waiting on memory at a third of the core's flops
# (reference.pairwise_scores). Padding is tile work for nothing: a batch joins only while the block's padded
# tokens stay within BLOCK_PADDING times its batches' own.
BLOCK_EXAMPLES = 48
BLOCK_BYTES = 512 << 20
BLOCK_PADDING = 1.25


def _in_blocks(batches: Iterable[tuple[int, int, dict[str, Captured]]]
               ) -> Iterator[tuple[int, int, dict[str, Captured]]]:
    """A pass's consecutive CPU batches joined into blocks (BLOCK_EXAMPLES, BLOCK_BYTES, BLOCK_PADDING),
    each layer's tokens padded to the block's longest with zeros (a zero output gradient adds nothing to a
    tile, so the scores are the batches' own: not their per-token scores, which keep the batches). The
    batches are let go once joined: a block is held once, not beside its parts."""
    held: list[tuple[int, int, dict[str, Captured]]] = []
    examples = own = 0
    longest: dict[str, int] = {}
    for start, n, rec in batches:
        gpu = any(r.a.device.type != "cpu" for r in rec.values())  # GPU batches go as they are
        joins = False
        if not gpu:
            tokens = {name: r.a.shape[1] for name, r in rec.items()}
            nbytes = sum(r.a.nbytes + r.g.nbytes for r in rec.values())
            if held:
                padded = (examples + n) * sum(max(longest[name], t) * _token_bytes(rec[name])
                                              for name, t in tokens.items())
                joins = (start == held[-1][0] + held[-1][1] and examples + n <= BLOCK_EXAMPLES
                         and padded <= BLOCK_BYTES and padded <= BLOCK_PADDING * (own + nbytes))
        if held and not joins:
            block, held = _joined_batches(held), []
            yield block
            del block
        if gpu:
            yield start, n, rec
            continue
        if not held:
            examples, own, longest = 0, 0, {}
        held.append((start, n, rec))
        del rec  # held alone keeps the batch
        examples, own = examples + n, own + nbytes
        longest = {name: max(longest.get(name, 0), t) for name, t in tokens.items()}
    if held:
        block, held = _joined_batches(held), []
        yield block


def _token_bytes(r: Captured) -> int:
    """Bytes of one token of a layer's captured inputs and output gradients."""
    return r.a.shape[2:].numel() * r.a.element_size() + r.g.shape[2:].numel() * r.g.element_size()


def _joined_batches(held: list[tuple[int, int, dict[str, Captured]]]) -> tuple[int, int, dict[str, Captured]]:
    if len(held) == 1:
        return held[0]
    joined = {}
    for name, first in held[0][2].items():
        parts = [rec[name] for _, _, rec in held]
        t = max(r.a.shape[1] for r in parts)
        masks = [r.mask for r in parts if r.mask is not None]
        mask = None if not masks else _padded_cat(
            [masks[0].new_ones(r.a.shape[:2]) if r.mask is None else r.mask for r in parts], t)
        joined[name] = replace(first, a=_padded_cat([r.a for r in parts], t), g=_padded_cat([r.g for r in parts], t),
                               mask=mask, half=any(r.half for r in parts), calls=max(r.calls for r in parts),
                               regrouped=any(r.regrouped for r in parts), selected=any(r.selected for r in parts))
    return held[0][0], sum(n for _, n, _ in held), joined


def _padded_cat(xs: list[Tensor], t: int) -> Tensor:
    """(examples, tokens, ...) tensors one after another, each padded with zeros (False) to t tokens, copied
    once into the block (no padded copy of each first)."""
    out = xs[0].new_zeros((sum(x.shape[0] for x in xs), t) + xs[0].shape[2:])
    row = 0
    for x in xs:
        out[row : row + x.shape[0], : x.shape[1]] = x
        row += x.shape[0]
    return out


def _baseline(model, task, specs, trajectory, segments, method, train_data, first, query_data, damping, batch_size,
              collate_fn, trak_dim, seed, record) -> Tensor:
    """A baseline's scores of `train_data` (this rank's share under torch.distributed, from `first` of the
    whole; unroll: all of it) against every query."""
    if method == "unroll":
        return baselines.unroll(model, task, record, train_data, query_data, collate_fn)
    if method == "trak":
        # TRAK's ensemble: the mean of the checkpoints' scores, each from its own map (seeds seed, seed + 1, ...,
        # as TRAK seeds each model's projection apart), so that projection noise averages out too.
        checkpoints = [(ell, c, ckpt) for ell in segments
                       for c, ckpt in enumerate(trajectory.segments[ell].checkpoints)]
        total = None
        for k, (ell, c, checkpoint) in enumerate(checkpoints):
            load_into(model, checkpoint, f"segment {ell}, checkpoint {c}")
            v, _ = _example_grads(model, task, specs, query_data, "measurement", "queries", batch_size, collate_fn)
            tau = baselines.trak(model, task, specs, v, train_data, batch_size, collate_fn, dim=trak_dim,
                                 damping=damping, seed=(seed + k) % 2**64 if seed >= 0 else seed + k,  # in range
                                 first=first)
            total = tau if total is None else total.add_(tau)
        return total / len(checkpoints)
    load_into(model, trajectory.final_checkpoint, "final checkpoint")
    if method == "repsim":
        return baselines.repsim(model, task, specs, query_data, train_data, batch_size, collate_fn, first)
    v, _ = _example_grads(model, task, specs, query_data, "measurement", "queries", batch_size, collate_fn)
    return baselines.grad_cos(model, task, specs, v, train_data, batch_size, collate_fn, first)


def _score_block(specs: list[LayerSpec], rec, queries, lowrank: bool, per_token: bool = False,
                 per_module: bool = False) -> dict[str, Tensor]:
    """One batch's (n, q[, t]) scores: {module: its part} with per_module, else {_ALL: their sum}."""
    if per_token:
        check_token_scores(specs, rec, per_module)
    parts: dict[str, Tensor] = {}
    for s in specs:
        r = rec[s.name]
        a, g, q = with_ones(r.a, s), r.g, queries[s.name]
        if isinstance(q, EigenQuery):
            a, g, q = rotate(a, q.q_a), rotate(g, q.q_s), q.r
        if per_token and lowrank:
            part = reference.pairwise_token_scores_lowrank(a, g, *q)
        elif per_token:
            part = reference.pairwise_token_scores(a, g, q)
        elif lowrank:
            left, right = q
            part = reference.pairwise_scores_lowrank(a, g, left, right)
        else:
            part = ops.pairwise_scores(a, g, q)
        if per_module:  # a grouped convolution's groups add up to their module's part
            parts[s.module] = part if s.module not in parts else parts[s.module] + part
        elif _ALL not in parts:
            parts[_ALL] = part
        else:
            parts[_ALL] = parts[_ALL] + part
    return parts


def check_token_scores(specs: list[LayerSpec], records: dict[str, Captured], per_module: bool) -> None:
    """Refuses per-token scores a batch's tokens cannot give: a shared module's, and, summed over the
    modules, tokens that are not the same positions in every module."""
    first: tuple[str, int] | None = None
    for s in specs:
        r = records[s.name]
        if r.calls > 1:
            raise ValueError(f"per_token: module {s.name!r} runs {r.calls} times per forward pass, so its tokens are "
                             "not the example's (kronfluence refuses per-token scores with shared parameters too)")
        if per_module:
            continue
        if r.regrouped:
            raise ValueError(f"per_token: module {s.name!r} takes several rows of tokens per example (Swin's windows, a "
                             "video's frames), so its tokens are in their order, not the positions of the other "
                             "modules' tokens (per_module=True keeps each module's tokens apart, in its own order)")
        tokens = r.a.shape[1]
        if first is None:
            first = (s.name, tokens)
        elif tokens != first[1]:
            plural = "" if tokens == 1 else "s"
            raise ValueError(f"per_token: module {s.name!r} sees {tokens} token{plural} per example, module "
                             f"{first[0]!r} {first[1]}, so their tokens cannot be added up (per_module=True keeps each "
                             "module's tokens apart)")


def _lowrank(queries: Grads, rank: int) -> dict[str, tuple[Tensor, Tensor]]:
    """U_q ≈ Σ_r s_r p_r q_rᵀ from the SVD; returns (left (q, d_out, r) = p·s, right (q, d_a, r)).
    A query in an eigenbasis, U = Q_S R Q_Aᵀ, has R's singular values and vectors rotated by Q_S, Q_A:
    R's SVD and the rotation of its r kept vectors replace rotating all of U back."""
    out = {}
    for name, u in queries.items():
        p, s, vh = torch.linalg.svd(u.r if isinstance(u, EigenQuery) else u, full_matrices=False)
        r = min(rank, s.shape[-1])
        left, right = p[..., :r] * s[:, None, :r], vh[:, :r, :].transpose(1, 2)
        out[name] = (u.q_s @ left, u.q_a @ right) if isinstance(u, EigenQuery) else (left, right)
    return out


@_names_zero_measurements_once
def self_score(
    model: nn.Module,
    task: Task,
    trajectory: Trajectory,
    factors: Factors | None,
    train_data: Any,
    method: Method = "source",
    *,
    damping: Damping | None = None,
    batch_size: int = 32,
    chunk_size: int | None = None,
    train_segments: list[int] | Literal["all"] | None = None,
    collate_fn: Callable | None = None,
    progress: bool = False,
    per_module: bool = False,
    use_measurement: bool = False,
) -> Tensor | dict[str, Tensor]:
    """Self-influence score(m, m) of every training example, with its training loss as the
    measurement: a (n_train,) tensor, same methods, sign and scale as `score` (per_module: as there,
    {tracked module name: its part}). use_measurement: pair each example's measurement gradient
    ∇f(z_m) (the task's measurement, as for queries) with its training gradient ∇L(z_m) instead.

    One-checkpoint methods (ekfac, grad_dot, and source/fast_source with one segment of one
    checkpoint, SGD or Adam) take the fused eigenbasis path Σ_ij s_ij (Q_Sᵀ G_n Q_A)_ij² with no per-example
    gradient in memory; otherwise (and with use_measurement) examples go in chunks of `chunk_size`,
    each with its own walk (None: as many as fit automatic_query_budget, half the free GPU memory or a
    quarter of the RAM). Under torch.distributed each rank scores its share of the examples and every
    rank returns all of them.
    """
    device = model_device(model)
    with fail_together(device):  # under torch.distributed a refusal on one rank is every rank's
        specs = _validate(model, task, trajectory, factors, method)
        if method not in GRADIENT_METHODS:
            raise ValueError(f"self_score supports the methods {list(GRADIENT_METHODS)}, not {method!r}")
        damping = method_options(method, damping)[0]
        check_count("chunk_size", chunk_size, none_ok=True, unit="number of examples")
        per_module, use_measurement = _yes_no("per_module", per_module), _yes_no("use_measurement", use_measurement)
        if length(train_data) == 0:
            raise ValueError("empty data: no training examples")
        check_summed(model, task, train_data, collate_fn, batch_size, "train")
        check_collate_order(train_data, collate_fn, batch_size)
        if use_measurement:
            check_summed(model, task, train_data, collate_fn, batch_size, "measurement")
        train_segs = used_segments(trajectory, method, train_data, train_segments)
    _check_same_on_ranks("self_score", model, task, trajectory, factors, method, train_data, None, collate_fn, {
        "damping": damping, "train_segments": train_segs, "per_module": per_module, "use_measurement": use_measurement})
    # One segment of one checkpoint: query and training gradients are taken at the same weights,
    # so the score is a per-example quadratic form in the eigenbasis.
    fused = not use_measurement and (method in _FINAL_ONLY or (
        method in ("source", "fast_source") and trajectory.layout() == [1]))
    share, first = rank_share(train_data), share_start(train_data)
    with restored(model), reuse_large_blocks(device):  # a failure in this rank's share ends it, as in score
        if fused:
            per_layer = _self_fused(model, task, specs, trajectory, factors, method, share, first, damping, batch_size,
                                    collate_fn, progress)
        else:
            per_layer = _self_chunked(model, task, specs, trajectory, factors, method, share, first, damping,
                                      train_segs, batch_size, chunk_size, collate_fn, progress, use_measurement)
        per_layer = {k: gather_shares(v, 0, strided=first is None) for k, v in per_layer.items()}
    n_rows = len(next(iter(per_layer.values())))
    if n_rows == 0:
        raise ValueError("empty data: the training stream yielded no examples")
    check_rows(trajectory, train_data, n_rows)
    if not per_module:
        return sum(per_layer.values())
    per_module_scores: dict[str, Tensor] = {}
    for s in specs:  # a grouped convolution's groups add up to their module's part
        part = per_layer[s.name]
        per_module_scores[s.module] = part if s.module not in per_module_scores else per_module_scores[s.module] + part
    return per_module_scores


def _self_chunked(model, task, specs, trajectory, factors, method, data, first, damping, train_segs, batch_size,
                  chunk_size, collate_fn, progress, use_measurement) -> dict[str, Tensor]:
    """Self-influence of `data` (a rank's share, beginning at `first` of the whole; None: a stream's
    every world-th example) in chunks, each chunk's examples both the queries and the training side."""
    if chunk_size is None:
        chunk_size = self_chunk_size(model, specs, trajectory, method, train_segs,
                                     automatic_query_budget(model_device(model)))
    out = []
    for start, chunk in chunks(data, chunk_size):
        # Errors name the chunk's examples by their place in the whole data (a stream's share: in this rank's).
        at = None if first is None else first + start
        examples = f"training examples {at}+" if at is not None else f"this rank's training examples {start}+"
        # A query left in its segment's eigenbasis (EigenQuery) is dotted with the examples' gradients
        # taken in that basis.
        # SOURCE's query side takes the examples' training gradients at the final checkpoint, the last
        # segment's last: their term there comes with the walk instead of another pass over the chunk.
        last = len(trajectory.segments) - 1
        own: dict[str, Tensor] | None = {} if (method == "source" and not use_measurement and last > 0
                                                and last in train_segs) else None
        plan = _plan(
            model, task, specs, trajectory, factors, method, chunk, "measurement" if use_measurement else "train",
            damping, train_segs, batch_size, collate_fn, length(chunk), progress=progress,
            what=f"{examples} (self-influence's query side)", first=at, own_term=own,
            named="training examples (self-influence's query side)",
        )
        total: dict[str, Tensor] = {k: t * plan.weights[last] for k, t in (own or {}).items()}
        for ell in plan.segments:
            for c, ckpt in enumerate(plan.checkpoints[ell]):
                if own and ell == last and c == len(plan.checkpoints[ell]) - 1:
                    continue  # the final checkpoint: in `total` already
                what = f"segment {ell}, checkpoint {c}"
                load_into(model, ckpt, what)
                queries = plan.queries[ell][c]
                bases = {k: q if isinstance(q, EigenQuery) else None for k, q in queries.items()}
                g, _ = _example_grads(model, task, specs, chunk, "train", f"{examples}, {what}", batch_size,
                                      collate_fn, bases=bases, progress=progress, first=at)
                for k in list(g):  # each gradient freed once used
                    q = queries[k].r if isinstance(queries[k], EigenQuery) else queries[k]
                    part = (q * g.pop(k)).sum((1, 2)) * plan.weights[ell]
                    total[k] = part if k not in total else total[k] + part
        out.append(total)
    if not out:  # a stream with fewer examples than ranks, or none (said by the caller, on every rank)
        return {s.name: torch.zeros(0, dtype=factor_dtype(model), device=model_device(model)) for s in specs}
    return {k: torch.cat([o[k] for o in out]) for k in out[0]}


def _self_fused(model, task, specs, trajectory, factors, method, data, first, damping, batch_size, collate_fn,
                progress) -> dict[str, Tensor]:
    """Self-influence of `data` (a rank's share, as in _self_chunked) at one checkpoint, fused."""
    seg = trajectory.segments[0]
    ckpt = segment_checkpoints(seg, method == "fast_source", "segment 0")[0]
    load_into(model, ckpt, "segment 0, checkpoint 0")
    dtype = factor_dtype(model)
    device = next(model.parameters()).device
    scales, bases = {}, {}
    if method == "grad_dot":
        for s in specs:
            scales[s.name], bases[s.name] = torch.ones(s.d_out, s.d_a, device=device, dtype=dtype), None
    else:
        bases = {s.name: factors.segments[0][s.name].to(device, dtype) for s in specs}
        means = _module_mean_lams(specs, bases) if damping == "heuristic" else {}
        scales = {s.name: _one_checkpoint_scale(method, seg, bases[s.name], damping, s, means.get(s.name))
                  for s in specs}
    out: dict[str, list[Tensor]] = {s.name: [] for s in specs}  # (n,) pieces: a stream's length shows at its end
    bar = _progress(progress, length(data), "self-influence")
    loader = make_loader(data, batch_size, collate_fn)
    for _, n, rec in run_pass(model, task, specs, loader, "train", "self-influence", bar, first):
        for s in specs:
            r = rec[s.name]
            a = with_ones(r.a, s)
            g = r.g
            lf = bases[s.name]
            if lf is not None and lf.q_a is not None:
                a, g = rotate(a, lf.q_a), rotate(g, lf.q_s)
            out[s.name].append(ops.self_scores(a, g, scales[s.name]).to(dtype))
    if bar is not None:
        bar.close()
    return {name: torch.cat(pieces) / seg.num_examples if pieces else torch.zeros(0, dtype=dtype, device=device)
            for name, pieces in out.items()}
