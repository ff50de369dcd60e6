"""The engine against explicit float64 constructions on tiny models (ALGORITHM.md §2-§5).

Everything runs in float64, so the only differences from the dense constructions are summation
order: tolerances are relative 1e-9 unless a test says otherwise.
"""

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import (
    ClassifyTask, RegressTask, classification_data, dense_curvature, mlp, per_example_grads, perturbed_states, torchrun,
)
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

import source_fast as sf
from source_fast import reference

LAYERS = ["0", "2"]
RTOL = 1e-9


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


def _grads(model, state, data, idx=None):
    x, y = data.tensors
    if idx is not None:
        x, y = x[idx], y[idx]
    g = per_example_grads(model, state, _ce, x, y, LAYERS)
    return torch.cat([g[n].flatten(1) for n in LAYERS], 1)  # (n, P) in row-major (d_out, d_a) blocks


def _block_diag_curvature(factors, ell, wd=0.0):
    """The dense EK-FAC curvature, plus weight decay wd·I (wd a number, or {layer: wd} per block)."""
    blocks = []
    for n in LAYERS:
        h = dense_curvature(factors.segments[ell][n])
        blocks.append(h + (wd[n] if isinstance(wd, dict) else wd) * torch.eye(h.shape[0], dtype=h.dtype))
    return torch.block_diag(*blocks)


def _damping(method, value):
    """The damping keyword for the one method here that takes it (the others refuse it)."""
    return {"damping": value} if method == "ekfac" else {}


def _close(actual, expected, rtol=RTOL):
    scale = expected.abs().max()
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max|Δ| = {err:.3g}, scale {scale:.3g}, rtol {rtol}"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = mlp(4, 5, 3)
    data = classification_data(60, 4, 3, seed=3)
    queries = classification_data(4, 4, 3, seed=4)
    ckpts = perturbed_states(model, 4, scale=0.2)
    return model, data, queries, ckpts


def test_factors_match_first_principles(setup):
    """A, S from explicit activations and output gradients, Λ from explicit per-example gradients."""
    model, data, _, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:3], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical", batch_size=7)
    x, y = data.tensors
    a_cov = {n: 0 for n in LAYERS}
    s_cov = {n: 0 for n in LAYERS}
    grads = []
    for st in ckpts[:3]:
        g = per_example_grads(model, st, _ce, x, y, LAYERS)
        grads.append(g)
        h = torch.tanh(x @ st["0.weight"].T + st["0.bias"])
        for name, inp in (("0", x), ("2", h)):
            a = torch.cat([inp, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            a_cov[name] += a.T @ a / len(x) / 3
            out_grad = g[name][:, :, -1]  # the bias column of G_n = g_n a_nᵀ is g_n
            s_cov[name] += out_grad.T @ out_grad / len(x) / 3
    for name in LAYERS:
        lf = factors.segments[0][name]
        _close(lf.a_cov, a_cov[name])
        _close(lf.s_cov, s_cov[name])
        qa = torch.linalg.eigh(a_cov[name]).eigenvectors
        qs = torch.linalg.eigh(s_cov[name]).eigenvectors
        lam = sum(((qs.T @ g[name] @ qa) ** 2).mean(0) for g in grads) / 3
        _close(lf.lam, lam)  # squares make Λ blind to eigenvector signs


def _dense_source(factors, traj, v, grads_by_ckpt, train_segments):
    """τ = Σ_ℓ (1/N_ℓ) mean_c ⟨u_ℓ, ∇L(θ_c)⟩ with u_ℓ = (I − e^{−c_ℓH_ℓ}) H_ℓ⁻¹ v_ℓ, v_{ℓ−1} = e^{−c_ℓH_ℓ} v_ℓ."""
    out = 0
    for ell in reversed(range(len(traj.segments))):
        seg = traj.segments[ell]
        wd = seg.weight_decay  # acting decay_scale times longer than the loss gradient (clipping)
        wd = {k: w * seg.decay_scale for k, w in wd.items()} if isinstance(wd, dict) else wd * seg.decay_scale
        h = _block_diag_curvature(factors, ell, wd)
        # Not solve(h, (I − e)v): h is singular where Λ is 0 (or ~1e-35), and solving there blows up
        # unless the bases happen to keep those directions apart.
        integral, e = _response(h, seg.horizon)
        u = (integral @ v.T).T
        if ell in train_segments:
            g = torch.stack(grads_by_ckpt[ell]).mean(0)
            out = out + u @ g.T / seg.num_examples
        v = (e @ v.T).T
    return out


@pytest.mark.parametrize("without_bases", [(0,), (1,), (0, 1)], ids=["first", "last", "both"])
def test_source_walks_through_segments_without_bases(setup, without_bases, tmp_path):
    """Segments whose factors have no bases (a diagonal curvature, as kronfluence's diagonal strategy
    is read) take part in SOURCE's walk: the dense formula with diag(vec Λ) for them. A save keeps
    them without bases, in format version 3 (version 2 when every module has bases)."""
    model, data, queries, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=3.0, weight_decay=1e-3),
                          sf.Segment(ckpts[2:], data, lr_sum=2.0)])
    fitted = sf.fit_factors(model, ClassifyTask(), traj, batch_size=16)
    segments = [{n: dataclasses.replace(lf, a_cov=None, s_cov=None, q_a=None, q_s=None) if ell in without_bases
                 else lf for n, lf in seg.items()} for ell, seg in enumerate(fitted.segments)]
    factors = dataclasses.replace(fitted, segments=segments)
    factors.save(tmp_path)
    assert json.loads((tmp_path / "factors.json").read_text())["format_version"] == 3
    factors = sf.Factors.load(tmp_path)
    assert all(lf.q_a is None for ell in without_bases for lf in factors.segments[ell].values())
    scores = sf.score(model, ClassifyTask(), traj, factors, data, queries, batch_size=13)
    v = _grads(model, ckpts[-1], queries)
    grads = {0: [_grads(model, s, data) for s in ckpts[:2]], 1: [_grads(model, s, data) for s in ckpts[2:]]}
    _close(scores, _dense_source(factors, traj, v, grads, {0, 1}))
    _close(sf.self_score(model, ClassifyTask(), traj, factors, data, batch_size=13),
           torch.diagonal(sf.score(model, ClassifyTask(), traj, factors, data, data, batch_size=13)))
    fitted.save(tmp_path / "kronecker")
    assert json.loads((tmp_path / "kronecker" / "factors.json").read_text())["format_version"] == 2


@pytest.mark.parametrize("momentum, wd, decay_scale", [(0.0, 1e-3, 1.0), (0.9, 1e-2, 3.0),
                                                       (0.5, {"0": 1e-3, "2": 5e-2}, 2.5)])
def test_source_matches_dense_matrix_functions(setup, momentum, wd, decay_scale):
    model, data, queries, ckpts = setup
    segs = [
        sf.Segment(ckpts[:2], data, lrs=[0.5] * 6, momentum=momentum, weight_decay=wd, decay_scale=decay_scale),
        sf.Segment(ckpts[2:], data, lr_sum=2.0, momentum=momentum, weight_decay=wd),
    ]
    # _dense_source reads seg.horizon: pin it to the rates summed and heavy-ball's c/(1 − β) by hand.
    assert [s.horizon for s in segs] == pytest.approx([3.0 / (1 - momentum), 2.0 / (1 - momentum)], rel=1e-15)
    traj = sf.Trajectory(segs)
    factors = sf.fit_factors(model, ClassifyTask(), traj, batch_size=16)
    scores = sf.score(model, ClassifyTask(), traj, factors, data, queries, batch_size=13)
    v = _grads(model, ckpts[-1], queries)
    grads = {0: [_grads(model, s, data) for s in ckpts[:2]], 1: [_grads(model, s, data) for s in ckpts[2:]]}
    expected = _dense_source(factors, traj, v, grads, {0, 1})
    _close(scores, expected)
    # The order of segments matters as the formula says: swapping them changes the answer, and
    # the engine follows the dense formula for the swapped trajectory too.
    swapped = sf.Trajectory([segs[1], segs[0]])
    f_sw = sf.Factors(factors.layers, factors.segments[::-1], factors.num_examples, [2, 2], "true", False)
    s_sw = sf.score(model, ClassifyTask(), swapped, f_sw, data, queries)
    v_sw = _grads(model, ckpts[1], queries)
    expected_sw = _dense_source(f_sw, swapped, v_sw, {0: grads[1], 1: grads[0]}, {0, 1})
    _close(s_sw, expected_sw)
    assert (s_sw - scores).abs().max() > 1e-3 * scores.abs().max()


def test_multistage_scores_only_the_stage_that_saw_the_data(setup):
    model, data, queries, ckpts = setup
    finetune = classification_data(30, 4, 3, seed=9)
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.5), sf.Segment(ckpts[2:], finetune, lr_sum=0.7)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    scores = sf.score(model, ClassifyTask(), traj, factors, data, queries)
    v = _grads(model, ckpts[-1], queries)
    grads = {0: [_grads(model, s, data) for s in ckpts[:2]]}
    _close(scores, _dense_source(factors, traj, v, grads, {0}))
    assert factors.num_examples == [60, 30]


def test_ekfac_matches_dense_inverse(setup):
    model, data, queries, ckpts = setup
    traj = sf.Trajectory([sf.Segment([ckpts[-1]], data, lr_sum=3.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    v = _grads(model, ckpts[-1], queries)
    g = _grads(model, ckpts[-1], data)
    h = _block_diag_curvature(factors, 0)
    heuristic = [0.1 * factors.segments[0][n].lam.mean() for n in LAYERS]
    sizes = [factors.segments[0][n].lam.numel() for n in LAYERS]
    for damping, diag in [
        (0.05, torch.full((h.shape[0],), 0.05, dtype=h.dtype)),
        ("implied", torch.full((h.shape[0],), 1 / 3.0, dtype=h.dtype)),
        ("heuristic", torch.cat([torch.full((s,), float(d), dtype=h.dtype) for s, d in zip(sizes, heuristic)])),
    ]:
        scores = sf.score(model, ClassifyTask(), traj, factors, data, queries, method="ekfac", damping=damping)
        expected = torch.linalg.solve(h + torch.diag(diag), v.T).T @ g.T / len(data)
        _close(scores, expected)


def test_implied_damping_is_one_over_the_horizon_with_momentum(setup):
    """damping="implied" is 1/c with c the segment's horizon, Σ η/(1 − β) for heavy-ball momentum, not the
    rates' sum Σ η: a one-checkpoint segment given its momentum (final() folds it into lr_sum), score and
    the fused self-influence alike. Dense: (H + I/c)⁻¹."""
    model, data, queries, ckpts = setup
    traj = sf.Trajectory([sf.Segment([ckpts[-1]], data, lr_sum=1.5, momentum=0.5)])  # c = 3
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    v, g = _grads(model, ckpts[-1], queries), _grads(model, ckpts[-1], data)
    h = _block_diag_curvature(factors, 0)
    inverse = torch.linalg.inv(h + torch.eye(h.shape[0], dtype=h.dtype) / 3.0)
    scores = sf.score(model, ClassifyTask(), traj, factors, data, queries, method="ekfac", damping="implied")
    _close(scores, v @ inverse @ g.T / len(data))
    _close(sf.self_score(model, ClassifyTask(), traj, factors, data, method="ekfac", damping="implied"),
           (g @ inverse * g).sum(1) / len(data))


def test_limits_of_the_horizon():
    """c → ∞: SOURCE → undamped influence function; c → 0: SOURCE → c × grad_dot.

    A one-output regression MLP: its Gauss-Newton matrix has no exact null direction (softmax
    cross-entropy has one, where the undamped influence function is undefined and SOURCE is not)."""
    model = mlp(4, 5, 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, 4, generator=g, dtype=torch.float64)
    data = TensorDataset(x, x.sum(1).sin())
    queries = TensorDataset(x[:3] + 0.1, x[:3].sum(1))
    task = RegressTask()
    for c, method in [(1e9, "ekfac"), (1e-9, "grad_dot")]:
        traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=c)])
        factors = sf.fit_factors(model, task, traj)
        src = sf.score(model, task, traj, factors, data, queries)
        ref = sf.score(model, task, traj, factors, data, queries, method=method, **_damping(method, 0.0))
        _close(src, ref if method == "ekfac" else c * ref, 1e-6)


def test_source_factor_at_zero_curvature_is_exactly_c():
    sigma = torch.tensor([0.0, 1e-30, 1e-12, 1.0, 1e6], dtype=torch.float64)
    f = reference.source_factor(sigma, 2.5)
    assert f[0] == 2.5 and torch.isfinite(f).all()
    expected = torch.tensor([2.5, 2.5, 2.5 * (1 - 1.25e-12), -torch.expm1(torch.tensor(-2.5, dtype=torch.float64)).item(), 1e-6], dtype=torch.float64)
    torch.testing.assert_close(f, expected, rtol=1e-12, atol=0)  # each entry, the smallest (1e-6) too
    from source_fast.capture import LayerSpec
    from source_fast.factors import LayerFactors
    from source_fast.scoring import _segment_scales

    lam = torch.tensor([[0.0, -1e-9], [2.0, 3.0]], dtype=torch.float64)  # round-off negatives clamp to 0
    eye = torch.eye(2, dtype=torch.float64)
    seg = sf.Segment([{}], [0], lr_sum=4.0)
    u, shrink = _segment_scales(seg, LayerFactors(eye, eye, eye, eye, lam, None, 1), LayerSpec("layer", "linear", 2, 2, False),
                                need_shrink=True)
    assert u[0, 0] == 4.0 and u[0, 1] == 4.0 and shrink[0, 0] == 1.0 and shrink[0, 1] == 1.0


def test_ekfac_takes_round_off_negative_eigenvalues_as_zero():
    """Λ from float sums can dip below 0 (-1e-9 beside 1): 1/(Λ + δ) takes max(Λ, 0), or the direction would
    be scaled 1/(δ - 1e-9), and the heuristic's mean Λ counts it as 0."""
    from source_fast.capture import LayerSpec
    from source_fast.factors import LayerFactors
    from source_fast.scoring import _module_mean_lams, _one_checkpoint_scale

    lam = torch.tensor([[-1e-9, 1.0], [-0.5, 3.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    lf, spec = LayerFactors(eye, eye, eye, eye, lam, None, 1), LayerSpec("layer", "linear", 2, 2, False)
    seg = sf.Segment([{}], [0], lr_sum=4.0)
    clamped = lam.clamp_min(0)
    torch.testing.assert_close(_one_checkpoint_scale("ekfac", seg, lf, 1e-8, spec), 1 / (clamped + 1e-8),
                               rtol=1e-15, atol=0)
    assert _module_mean_lams([spec], {"layer": lf}) == {"layer": 1.0}  # (0 + 1 + 0 + 3) / 4
    torch.testing.assert_close(_one_checkpoint_scale("ekfac", seg, lf, "heuristic", spec, mean_lam=1.0),
                               1 / (clamped + 0.1), rtol=1e-15, atol=0)


def test_one_token_reference_forms_equal_the_explicit_tiles():
    """With one token per example, Λ and self-influence skip the per-example tiles; float64, masks."""
    g64 = torch.Generator().manual_seed(3)
    a, g = torch.randn(9, 1, 7, generator=g64, dtype=torch.float64), torch.randn(9, 1, 5, generator=g64, dtype=torch.float64)
    scale = torch.rand(5, 7, generator=g64, dtype=torch.float64)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1])[:, None]
    tiles = torch.einsum("no,ni->noi", g[:, 0], a[:, 0] * mask)
    _close(reference.self_scores(a, g, scale, mask), (tiles**2 * scale).sum((1, 2)), 1e-13)
    lam = torch.zeros(5, 7, dtype=torch.float64)
    reference.accumulate_lambda_(lam, a, g, mask)
    _close(lam, (tiles**2).sum(0), 1e-13)


def test_token_contractions_drop_masked_tokens_on_both_sides():
    """The reference's pairwise contraction (the public op's twin) against explicit per-token tiles
    g_t a_tᵀ, with NaN in a and g at dropped tokens: dropped on both sides, never multiplied by 0
    (NaN · 0 = NaN); the low-rank and per-token ones take every token (so does the engine, whose
    gradients count padding the loss reads)."""
    g64 = torch.Generator().manual_seed(4)
    a, g = torch.randn(6, 4, 7, generator=g64, dtype=torch.float64), torch.randn(6, 4, 5, generator=g64, dtype=torch.float64)
    left, right = torch.randn(3, 5, 2, generator=g64, dtype=torch.float64), torch.randn(3, 7, 2, generator=g64, dtype=torch.float64)
    u = left @ right.mT
    mask = (torch.arange(4)[None] < torch.tensor([4, 1, 2, 3, 4, 2])[:, None]).double()
    keep = mask[..., None] > 0
    per_token = torch.einsum("nto,qoi,nti->nqt", g * keep, u, a * keep)  # the clean tiles, dotted
    a, g = torch.where(keep, a, float("nan")), torch.where(keep, g, float("nan"))
    _close(reference.pairwise_scores(a, g, u, mask), per_token.sum(2), 1e-13)
    a, g = a.nan_to_num(0.0), g.nan_to_num(0.0)
    _close(reference.pairwise_scores_lowrank(a, g, left, right), per_token.sum(2), 1e-13)
    _close(reference.pairwise_token_scores(a, g, u), per_token, 1e-13)
    _close(reference.pairwise_token_scores_lowrank(a, g, left, right), per_token, 1e-13)


def test_tracin_and_grad_dot_match_explicit_gradients(setup):
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=0.8, momentum=0.5), sf.Segment(ckpts[2:], data, lr_sum=0.3)])
    scores = sf.score(model, task, traj, None, data, queries, method="tracin")
    expected = 0
    for seg, horizon in zip(traj.segments, [0.8 / (1 - 0.5), 0.3]):  # heavy-ball momentum β: c/(1 − β)
        for st in seg.checkpoints:
            expected = expected + horizon / (len(data) * 2) * _grads(model, st, queries) @ _grads(model, st, data).T
    _close(scores, expected)
    gd = sf.score(model, task, traj.final(), None, data, queries, method="grad_dot")
    _close(gd, _grads(model, ckpts[-1], queries) @ _grads(model, ckpts[-1], data).T / len(data))


def test_fast_source_is_source_at_the_mean_parameters(setup):
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.0), sf.Segment(ckpts[2:], data, lr_sum=2.0)])
    fast = sf.fit_factors(model, task, traj, average_params=True)
    mean = lambda sts: {k: (sts[0][k] + sts[1][k]) / 2 for k in sts[0]}  # noqa: E731
    avg = sf.Trajectory([sf.Segment([mean(ckpts[:2])], data, lr_sum=1.0), sf.Segment([mean(ckpts[2:])], data, lr_sum=2.0)])
    ref_factors = sf.fit_factors(model, task, avg)
    expected = sf.score(model, task, avg, ref_factors, data, queries)  # its query gradient is at the averaged θ
    got = sf.score(model, task, traj, fast, data, queries, method="fast_source")
    # The query gradient is taken at the real final weights, so compare the training side via a
    # trajectory whose last checkpoint is the true final one: same walk, same u, averaged training grads.
    v = _grads(model, ckpts[-1], queries)
    grads = {0: [_grads(model, mean(ckpts[:2]), data)], 1: [_grads(model, mean(ckpts[2:]), data)]}
    one_ckpt = sf.Trajectory([sf.Segment([mean(ckpts[:2])], data, lr_sum=1.0), sf.Segment([ckpts[-1]], data, lr_sum=2.0)])
    _close(got, _dense_source(fast, one_ckpt, v, grads, {0, 1}))
    assert not torch.allclose(got, expected)  # θ_T, not the average, is where the query is measured
    for a, b in zip(fast.segments, ref_factors.segments):
        for n in LAYERS:
            _close(a[n].lam, b[n].lam)


@pytest.mark.parametrize("method", ["source", "fast_source", "ekfac", "tracin", "grad_dot"])
@pytest.mark.parametrize("segments", [1, 2])
def test_self_score_is_the_diagonal_of_pairwise(setup, method, segments):
    """ClassifyTask's measurement is its training loss, so self-influence = diag(score(data, data))."""
    model, data, _, ckpts = setup
    task = ClassifyTask()
    small = Subset(data, range(23))
    ck = [ckpts[-1]] if method in ("ekfac", "grad_dot") else ckpts
    traj = sf.Trajectory.even(ck, [0.2] * 12, 1 if len(ck) == 1 else segments, small)
    factors = None if method in ("tracin", "grad_dot") else sf.fit_factors(model, task, traj, average_params=method == "fast_source")
    pair = sf.score(model, task, traj, factors, small, small, method=method, batch_size=5)
    self_ = sf.self_score(model, task, traj, factors, small, method=method, batch_size=4, chunk_size=10)
    _close(self_, torch.diagonal(pair))


class LogitTask(ClassifyTask):
    """The measurement is the true class's logit, not the training loss."""

    def compute_measurement(self, batch, model):
        x, y = batch
        return model(x).gather(1, y[:, None]).sum()


@pytest.mark.parametrize("method", ["source", "ekfac", "tracin", "grad_dot"])
def test_self_score_with_the_measurement_is_the_diagonal_of_pairwise(setup, method):
    """use_measurement pairs each example's measurement gradient (the query side of score) with its
    training gradient: diag(score(data, data)) for a measurement that is not the training loss."""
    model, data, _, ckpts = setup
    task = LogitTask()
    small = Subset(data, range(23))
    ck = [ckpts[-1]] if method in ("ekfac", "grad_dot") else ckpts
    traj = sf.Trajectory.even(ck, [0.2] * 12, 1 if len(ck) == 1 else 2, small)
    factors = None if method in ("tracin", "grad_dot") else sf.fit_factors(model, task, traj)
    pair = sf.score(model, task, traj, factors, small, small, method=method, batch_size=5)
    got = sf.self_score(model, task, traj, factors, small, method=method, batch_size=4, chunk_size=10,
                        use_measurement=True)
    _close(got, torch.diagonal(pair))
    plain = sf.self_score(model, task, traj, factors, small, method=method, batch_size=4)
    assert not torch.allclose(got, plain)  # the measurement is not the loss here


def _eigen_diagonal(factors, ell, p):
    """P (flat, diagonal in the parameter basis) in each layer's EK-FAC eigenbasis, its inverse taken by
    its diagonal there, as a dense block-diagonal matrix: K diag(Kᵀ diag(P⁻¹) K)⁻¹ Kᵀ, K = Q_S ⊗ Q_A."""
    blocks, start = [], 0
    for n in LAYERS:
        lf = factors.segments[ell][n]
        k = torch.eye(lf.lam.numel(), dtype=lf.lam.dtype) if lf.q_a is None else torch.kron(lf.q_s, lf.q_a)
        block = p[start : start + lf.lam.numel()]
        start += lf.lam.numel()
        blocks.append(k @ torch.diag(1 / ((k**2).T @ (1 / block))) @ k.T)
    return torch.block_diag(*blocks)


def _response(a, c):
    """∫₀ᶜ e^{−sA} ds = (I − e^{−cA})A⁻¹, from one matrix exponential of [[−A, I], [0, 0]]·c (A may be
    singular), and e^{−cA}."""
    n = a.shape[0]
    m = torch.zeros(2 * n, 2 * n, dtype=a.dtype)
    m[:n, :n], m[:n, n:] = -a, torch.eye(n, dtype=a.dtype)
    e = torch.linalg.matrix_exp(c * m)
    return e[:n, n:], e[:n, :n]


def test_adam_segments_match_the_dense_formula(setup):
    """θ −= ηP m̂ (+ decay) linearizes to A = P̃(H̄ + wd) (Adam: L2 in the gradient) or P̃H̄ + wd (AdamW:
    decoupled), with P̃ = P in H̄'s eigenbasis, its inverse taken by its diagonal there; the summed response of a segment
    is ∫₀ᶜ e^{−sA} ds P̃ ∇L. P from the optimizer states by hand, matrix exponentials dense; no damping."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    opt_states = []
    for st in ckpts[:2]:
        model.load_state_dict(st)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-6)
        for _ in range(3):
            opt.zero_grad()
            task.compute_train_loss(data.tensors, model).backward()
            opt.step()
        opt_states.append(opt.state_dict())
    for flavour, wd in [("adam", 1e-2), ("adamw", 1e-2), ("adam", 0.0)]:
        seg = sf.Segment(ckpts[:2], data, lr_sum=0.5, optimizer=flavour, weight_decay=wd,
                         optimizer_states=_as_trained_with(opt_states, wd, flavour == "adamw"))
        traj = sf.Trajectory([seg])
        factors = sf.fit_factors(model, task, traj)
        scores = sf.score(model, task, traj, factors, data, queries)
        p = 0
        for state in opt_states:
            params = dict(model.named_parameters())
            per = {}
            for i, name in enumerate(params):
                s = state["state"][i]
                per[name] = 1 / ((s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))).sqrt() + 1e-6)
            p = p + torch.cat([torch.cat([per[f"{n}.weight"], per[f"{n}.bias"][:, None]], 1).flatten() for n in LAYERS]) / 2
        h, pt = _block_diag_curvature(factors, 0), _eigen_diagonal(factors, 0, p)
        eye = torch.eye(h.shape[0], dtype=h.dtype)
        a = pt @ (h + wd * eye) if flavour == "adam" else pt @ h + wd * eye
        integral, _ = _response(a, 0.5)
        v = _grads(model, ckpts[1], queries)
        g = torch.stack([_grads(model, s, data) for s in ckpts[:2]]).mean(0)
        _close(scores, v @ (integral @ pt).T @ g.T / len(data), rtol=1e-8)
        _close(sf.self_score(model, task, traj, factors, data),
               torch.stack([_grads(model, ckpts[1], data)[m] @ integral @ pt @ g[m] for m in range(len(data))]) / len(data),
               rtol=1e-8)


def test_adam_with_a_uniform_preconditioner_is_sgd(setup):
    """With every second moment equal, P = p·I and Adam is SGD with learning rates p·η: Adam's L2
    decay is SGD's, AdamW's decoupled decay wd is SGD's wd/p (θ −= η(pH + wd)θ = ηp(H + wd/p)θ). The
    scores must agree, whatever the eigenbases."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    states = _adam_states(model, task, data, ckpts[:2])
    for st in states:
        for s in st["state"].values():
            s["exp_avg_sq"] = torch.full_like(s["exp_avg_sq"], 0.04)  # v̂ = 0.04 / (1 − 0.999³)
    p = 1 / ((0.04 / (1 - 0.999**3)) ** 0.5 + 1e-6)
    c, wd = 0.05, 0.5
    for flavour, sgd_wd in [("adam", wd), ("adamw", wd / p)]:
        adam = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=c, optimizer=flavour, weight_decay=wd,
                                         optimizer_states=_as_trained_with(states[:1], wd, flavour == "adamw")),
                              sf.Segment(ckpts[1:2], data, lr_sum=c, optimizer=flavour, weight_decay=wd,
                                         optimizer_states=_as_trained_with(states[1:], wd, flavour == "adamw"))])
        sgd = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=c * p, weight_decay=sgd_wd),
                             sf.Segment(ckpts[1:2], data, lr_sum=c * p, weight_decay=sgd_wd)])
        factors = sf.fit_factors(model, task, sgd)
        _close(sf.score(model, task, adam, sf.fit_factors(model, task, adam), data, queries),
               sf.score(model, task, sgd, factors, data, queries))


def _adam_states(model, task, data, ckpts, **kwargs):
    states = []
    for st in ckpts:
        model.load_state_dict(st)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-6, **kwargs)
        for _ in range(3):
            opt.zero_grad()
            task.compute_train_loss(data.tensors, model).backward()
            opt.step()
        states.append(opt.state_dict())
    return states


def _as_trained_with(states, weight_decay, decoupled):
    """The states of a run whose optimizer decayed by `weight_decay` (AdamW-style when `decoupled`), as
    torch saves them: the decay is a param-group entry, which the segment's weight_decay must match."""
    states = copy.deepcopy(states)
    for st in states:
        for group in st["param_groups"]:
            group.update(weight_decay=weight_decay, decoupled_weight_decay=decoupled)
    return states


@pytest.mark.parametrize("without_bases", [(), (1,), (0, 2)], ids=["bases", "adam-diagonal", "sgd-diagonal"])
def test_walk_across_sgd_and_adam_segments_matches_dense(setup, without_bases):
    """The queries stay in the segments' eigenbases and change basis between segments, Adam's as
    SGD's. SGD, Adam, SGD against the dense formula, with the prepared queries left in the eigenbases
    (many queries, few training rows) and not; also with some segments' factors stripped of their
    bases (a diagonal curvature: the parameter basis), the Adam one or the SGD ones."""
    from source_fast.capture import tracked_layers
    from source_fast.scoring import EigenQuery, prepare_queries

    model, data, queries, ckpts = setup
    task = ClassifyTask()
    segs = [sf.Segment(ckpts[:2], data, lr_sum=1.0, weight_decay=1e-3),
            sf.Segment(ckpts[2:3], data, lr_sum=0.3, optimizer="adam",
                       optimizer_states=_adam_states(model, task, data, ckpts[2:3])),
            sf.Segment(ckpts[3:], data, lr_sum=2.0, momentum=0.5)]
    traj = sf.Trajectory(segs)
    factors = sf.fit_factors(model, task, traj)
    factors = dataclasses.replace(factors, segments=[
        {n: dataclasses.replace(lf, a_cov=None, s_cov=None, q_a=None, q_s=None) if ell in without_bases else lf
         for n, lf in seg.items()} for ell, seg in enumerate(factors.segments)])
    grads = [torch.stack([_grads(model, st, data) for st in seg.checkpoints]).mean(0) for seg in segs]
    specs = tracked_layers(model, None)
    for q_data, eigen in [(data, True), (queries, False)]:
        plan = prepare_queries(model, task, specs, traj, factors, "source", data, q_data, damping="heuristic",
                               train_segments=None, query_rank=None, batch_size=16, collate_fn=None)
        for ell in (0, 2):  # without bases, the parameter basis: nothing to keep them in
            keep = eigen and ell not in without_bases
            assert all(isinstance(q, EigenQuery) == keep for q in plan.queries[ell][0].values())
        scores = sf.score(model, task, traj, factors, data, q_data)
        v, expected = _grads(model, ckpts[-1], q_data), 0
        for ell in reversed(range(len(segs))):
            seg = segs[ell]
            wd = seg.weight_decay  # acting decay_scale times longer than the loss gradient (clipping)
            wd = {k: w * seg.decay_scale for k, w in wd.items()} if isinstance(wd, dict) else wd * seg.decay_scale
            h = _block_diag_curvature(factors, ell, wd)
            if seg.optimizer == "sgd":
                integral, e = _response(h, seg.horizon)
                u, v = (integral @ v.T).T, (e @ v.T).T
            else:  # A = P̃H̄, P̃ = P by its diagonal in the eigenbasis
                pt = _eigen_diagonal(factors, ell, torch.cat([factors.segments[ell][n].precond.flatten() for n in LAYERS]))
                integral, e = _response(pt @ h, seg.lr_sum)
                u, v = (integral @ pt @ v.T).T, (e @ v.T).T
            expected = expected + u @ grads[ell].T / seg.num_examples
        _close(scores, expected)


def test_walk_does_only_the_work_its_segments_need(setup, monkeypatch):
    """The queries enter the last segment's eigenbasis from their tokens, so the walk changes basis
    once per segment boundary and never from a basis to itself, across Adam segments too; exact zeros
    in Λ need no damping (F(0) = c, c·p̃ for Adam)."""
    from torch.utils.data import TensorDataset

    from source_fast import scoring

    model, data, queries, ckpts = setup
    task = ClassifyTask()
    x, y = data.tensors
    x = x.clone()
    x[:, 3] = 0  # an input feature that is always 0: exact zeros in layer "0"'s Λ
    data = TensorDataset(x, y)
    sgd = sf.Trajectory([sf.Segment(ckpts[i : i + 2], data, lr_sum=1.0) for i in (0, 2)])
    changes, into_basis = [], scoring._into_basis
    monkeypatch.setattr(scoring, "_into_basis", lambda v, old, new: changes.append(old[0]) or into_basis(v, old, new))
    sf.score(model, task, sgd, sf.fit_factors(model, task, sgd), data, queries)
    assert changes == [1, 1]  # layers "0" and "2", from segment 1's basis into segment 0's
    monkeypatch.undo()
    segs = [sf.Segment(ckpts[:2], data, lr_sum=1.0),
            sf.Segment(ckpts[2:3], data, lr_sum=0.3, optimizer="adam",
                       optimizer_states=_adam_states(model, task, data, ckpts[2:3])),
            sf.Segment(ckpts[3:], data, lr_sum=1.0)]
    traj = sf.Trajectory(segs)
    factors = sf.fit_factors(model, task, traj)
    assert (factors.segments[1]["0"].lam <= 0).any()
    changes = []
    monkeypatch.setattr(scoring, "_into_basis", lambda v, old, new: changes.append(old[0]) or into_basis(v, old, new))
    assert torch.isfinite(sf.score(model, task, traj, factors, data, queries)).all()
    assert changes == [2, 2, 1, 1]


def test_ekfac_on_an_adam_checkpoint_is_the_influence_function(setup):
    """method="ekfac" ignores the optimizer: (H̄ + λ)⁻¹ at the checkpoint, in score and self_score alike."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw",
                                     optimizer_states=_as_trained_with(_adam_states(model, task, data, ckpts[:1]), 0.1, True),
                                     weight_decay=0.1)])
    factors = sf.fit_factors(model, task, traj)
    h = _block_diag_curvature(factors, 0) + 0.01 * torch.eye(_grads(model, ckpts[0], queries).shape[1], dtype=torch.float64)
    v, g = _grads(model, ckpts[0], queries), _grads(model, ckpts[0], data)
    _close(sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=0.01),
           torch.linalg.solve(h, v.T).T @ g.T / len(data))
    _close(sf.self_score(model, task, traj, factors, data, method="ekfac", damping=0.01),
           (g * torch.linalg.solve(h, g.T).T).sum(1) / len(data))


def test_adam_preconditioner_follows_amsgrad_and_refuses_the_other_decay(setup):
    model, data, _, ckpts = setup
    task = ClassifyTask()
    states = _adam_states(model, task, data, ckpts[:1], amsgrad=True, betas=(0.9, 0.5))
    factors = sf.fit_factors(model, task, sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adam",
                                                                      optimizer_states=states)]))
    s = states[0]["state"][0]  # layer "0".weight: AMSGrad divides by the running maximum
    expected = 1 / ((s["max_exp_avg_sq"] / (1 - 0.5**3)).sqrt() + 1e-6)
    assert not torch.allclose(s["max_exp_avg_sq"], s["exp_avg_sq"])
    torch.testing.assert_close(factors.segments[0]["0"].precond[:, :-1], expected, rtol=1e-12, atol=0)
    decayed = _adam_states(model, task, data, ckpts[:1], weight_decay=0.1)
    decayed[0]["param_groups"][0]["decoupled_weight_decay"] = True  # what torch.optim.AdamW saves
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adam", optimizer_states=decayed, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"optimizer state 0: parameter '0.weight' was trained with decoupled \(AdamW\)"):
        sf.fit_factors(model, task, sf.Trajectory([seg]))


def test_segment_weight_decay_must_be_the_optimizers(setup):
    """torch's AdamW decays by 0.01 by default: a segment that says 0 (or anything else) would silently
    model another run. A bias decayed differently from its weight (HF's no-decay groups) is a warning."""
    model, data, _, ckpts = setup
    task = ClassifyTask()
    model.load_state_dict(ckpts[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # weight_decay=0.01, its default
    task.compute_train_loss(data.tensors, model).backward()
    opt.step()
    state = opt.state_dict()
    for wd in (0.0, 0.1):
        seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=[state], weight_decay=wd)
        with pytest.raises(ValueError, match=r"optimizer state 0: parameter '0.weight' was trained with "
                                             r"weight_decay=0.01, but the segment says weight_decay=.*Segment\(weight_decay=0.01\)"):
            sf.fit_factors(model, task, sf.Trajectory([seg]))
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=[state], weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sf.fit_factors(model, task, sf.Trajectory([seg]))
    # Hugging Face's grouping: biases in a group of their own, not decayed.
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [(n, p) for n, p in named if n.endswith(".bias")], "weight_decay": 0.0},
                             {"params": [(n, p) for n, p in named if n.endswith(".weight")]}], lr=1e-2)
    task.compute_train_loss(data.tensors, model).backward()
    opt.step()
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=[opt.state_dict()],
                     weight_decay=0.01)
    with pytest.warns(UserWarning, match=r"the biases of \['0', '2'\] were trained with another weight decay"):
        sf.fit_factors(model, task, sf.Trajectory([seg]))
    # Checked before any pass, and said once however many segments and states repeat it.
    fm = __import__("source_fast.factors", fromlist=["_covariances"])
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][1]["weight_decay"] = 0.5
    same = opt.state_dict()  # one state object repeated (distinct state_dict() calls would be refused as aliases)
    segs = [sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=[st], weight_decay=0.01)
            for st in (same, same, bad)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fm, "_covariances", lambda *a, **k: pytest.fail("a pass ran before the states were checked"))
        with pytest.raises(ValueError, match=r"segment 2, optimizer state 0: parameter '0.weight' was trained with "
                                             r"weight_decay=0.5"):
            sf.fit_factors(model, task, sf.Trajectory(segs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sf.fit_factors(model, task, sf.Trajectory(segs[:2]))
    assert len([w for w in caught if "the biases of" in str(w.message)]) == 1


def test_final_keeps_an_sgd_runs_weight_decay(setup):
    """final()'s one segment spans the run: its decay is the horizon-weighted mean Σ c_ℓ wd_ℓ / Σ c_ℓ,
    so its exponent is the run's Σ c_ℓ (H + wd_ℓ) (per module when a segment gives a dict); an Adam
    run's final segment is Adam's, with its last state and decay; a run that switched optimizers keeps
    its last stage's horizon."""
    model, data, _, ckpts = setup
    segs = [sf.Segment(ckpts[:2], data, lr_sum=1.0, momentum=0.5, weight_decay=1e-3),  # c = 2
            sf.Segment(ckpts[2:], data, lr_sum=2.0, weight_decay={"0": 4e-3, "2": 1e-2})]
    final = sf.Trajectory(segs).final().segments[0]
    assert final.horizon == pytest.approx(4.0)
    assert final.weight_decay == pytest.approx({"0": (2 * 1e-3 + 2 * 4e-3) / 4, "2": (2 * 1e-3 + 2 * 1e-2) / 4})
    # A module only one segment names (say a frozen, untracked embedding) is left out, not an error.
    extra = [sf.Segment(ckpts[:2], data, lr_sum=1.0, weight_decay={"0": 1e-3, "2": 1e-3, "emb": 0.0}),
             sf.Segment(ckpts[2:], data, lr_sum=1.0, weight_decay={"0": 3e-3, "2": 1e-3})]
    assert sf.Trajectory(extra).final().segments[0].weight_decay == pytest.approx({"0": 2e-3, "2": 1e-3})
    frozen = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=0.0, weight_decay=1e-3)]).final().segments[0]
    assert frozen.weight_decay == pytest.approx(1e-3)
    task = ClassifyTask()
    states = _as_trained_with(_adam_states(model, task, data, ckpts[:1]), 0.1, True)
    adamw = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=states, weight_decay=0.1)
    adam = sf.Segment(ckpts[:1], data, lr_sum=0.25, optimizer="adam", optimizer_states=states)
    final = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.0), adam, adamw]).final().segments[0]
    # The SGD stage's horizon (steps of η) is not added to the Adam stage's (steps of η·P).
    assert (final.optimizer, final.weight_decay, final.horizon) == ("adamw", 0.1, 0.75)
    assert final.optimizer_states == [states[-1]]
    # Back to SGD after Adam: the last SGD stage alone, its own decays averaged.
    tail = [sf.Segment(ckpts[2:], data, lr_sum=1.0, weight_decay=1e-2), sf.Segment(ckpts[2:], data, lr_sum=3.0)]
    final = sf.Trajectory([segs[0], adamw, *tail]).final().segments[0]
    assert (final.optimizer, final.horizon, final.weight_decay) == ("sgd", 4.0, pytest.approx(1e-2 / 4))


def test_implied_damping_of_an_adam_run_is_one_over_c_p(setup):
    """EK-FAC with damping="implied" at an Adam run's final checkpoint: 1/(Λ + 1/(c·p̃)) per
    eigen-direction, the large-c form of one Adam segment's F = p̃(1 − e^{−cσ})/σ, as 1/(Λ + 1/c) is
    SGD's. Dense: K diag(1/(Λ + 1/(c p̃))) Kᵀ per layer, p̃ from the optimizer state by hand."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    states = _adam_states(model, task, data, ckpts[:2])
    run = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=0.2, optimizer="adam", optimizer_states=states[:1]),
                         sf.Segment(ckpts[1:2], data, lr_sum=0.3, optimizer="adam", optimizer_states=states[1:])])
    final = run.final()
    factors = sf.fit_factors(model, task, final)
    scores = sf.score(model, task, final, factors, data, queries, method="ekfac", damping="implied")
    params = dict(model.named_parameters())
    per = {}
    for i, name in enumerate(params):
        s = states[1]["state"][i]
        per[name] = 1 / ((s["exp_avg_sq"] / (1 - 0.999 ** float(s["step"]))).sqrt() + 1e-6)
    blocks = []
    for n in LAYERS:
        lf = factors.segments[0][n]
        p = torch.cat([per[f"{n}.weight"], per[f"{n}.bias"][:, None]], 1)
        pt = 1 / ((lf.q_s**2).T @ (1 / p) @ lf.q_a**2)
        k = torch.kron(lf.q_s, lf.q_a)
        blocks.append(k @ torch.diag((1 / (lf.lam.clamp_min(0) + 1 / (0.5 * pt))).reshape(-1)) @ k.T)
    v, g = _grads(model, ckpts[1], queries), _grads(model, ckpts[1], data)
    _close(scores, v @ torch.block_diag(*blocks) @ g.T / len(data))
    # The fused self-influence path takes the same per-direction damping.
    _close(sf.self_score(model, task, final, factors, data, method="ekfac", damping="implied"),
           (g @ torch.block_diag(*blocks) * g).sum(1) / len(data))


def test_a_segment_with_zero_learning_rate_is_frozen(setup):
    """c = 0: S̄ = I and r̄ = 0, the limit of a vanishing learning-rate sum; "implied" damping (1/c) says why it cannot."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    scores = []
    for lr in (0.0, 1e-300):
        traj = sf.Trajectory.even(ckpts, [0.1] * 5 + [lr] * 5, 2, data)
        factors = sf.fit_factors(model, task, traj, fisher="empirical")
        scores.append(sf.score(model, task, traj, factors, data, queries))
    assert torch.isfinite(scores[0]).all() and scores[0].abs().max() > 0
    _close(scores[0], scores[1], rtol=1e-12)
    final = sf.Trajectory([sf.Segment(ckpts[-1:], data, lr_sum=0.0)])
    with pytest.raises(ValueError, match="damping='implied' is 1/c"):
        sf.score(model, task, final, sf.fit_factors(model, task, final), data, queries, method="ekfac", damping="implied")
    # A run whose every rate is 0 (rates read from the wrong column) would score all zeros: refused.
    still = sf.Trajectory.even(ckpts, [0.0] * 10, 2, data)
    factors = sf.fit_factors(model, task, still, fisher="empirical")
    for method in ("source", "tracin"):
        with pytest.raises(ValueError, match=f"every segment's learning-rate sum is 0, so every {method} score would "
                                             "be 0"):
            sf.score(model, task, still, factors if method == "source" else None, data, queries, method=method)


def test_low_rank_queries(setup):
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)
    exact = sf.score(model, task, traj, factors, data, queries)
    full = sf.score(model, task, traj, factors, data, queries, query_rank=5)  # 5 = min(d_out, d_a) of the largest layer
    _close(full, exact)
    r1 = sf.score(model, task, traj, factors, data, queries, query_rank=1)
    assert not torch.allclose(r1, exact)
    corr = torch.corrcoef(torch.stack([r1.flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.5, corr


def test_batch_size_and_chunking_do_not_change_scores(setup, tmp_path):
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory.even(ckpts, [0.1] * 10, 2, data)
    f1 = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=1)
    f2 = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=60)
    s1 = sf.score(model, task, traj, f1, data, queries, batch_size=1)
    s2 = sf.score(model, task, traj, f2, data, queries, batch_size=17)
    _close(s1, s2)
    # A budget of one query's prepared gradients (2 segments × 43 parameters × 8 bytes): 4 blocks.
    _close(sf.score(model, task, traj, f1, data, queries, query_memory_budget=2 * 43 * 8), s1)
    d1 = sf.self_score(model, task, traj, f1, data, chunk_size=7, batch_size=3)
    d2 = sf.self_score(model, task, traj, f1, data, chunk_size=60, batch_size=60)
    _close(d1, d2)
    _close(sf.self_score(model, task, traj, f1, data), d1)  # chunks sized to the free memory
    # Each example holds 2 preconditioned copies (one per segment) and one gradient: 3 × 43 × 8 bytes.
    from source_fast.capture import tracked_layers
    from source_fast.scoring import self_chunk_size

    specs = tracked_layers(model, task.get_influence_tracked_modules())
    assert self_chunk_size(model, specs, traj, "source", [0, 1], 10_000) == 10_000 // (3 * 43 * 8)
    assert self_chunk_size(model, specs, traj, "source", [1], 10_000) == 10_000 // (2 * 43 * 8)  # one segment scored
    with pytest.raises(ValueError, match=r"one example's self-influence takes 1032 bytes .* give chunk_size=1"):
        self_chunk_size(model, specs, traj, "source", [0, 1], 1000)
    # A budget holding one query's copy for the one segment scored is enough for it.
    _close(sf.score(model, task, traj, f1, data, queries, train_segments=[1], query_memory_budget=43 * 8),
           sf.score(model, task, traj, f1, data, queries, train_segments=[1]))
    final = traj.final()
    for method in ("ekfac", "grad_cos", "trak", "repsim"):  # was ignored
        with pytest.raises(ValueError, match=r"train_segments \[1\] must name segments in 0..0"):
            sf.score(model, task, final, sf.fit_factors(model, task, final), data, queries, method=method,
                     train_segments=[1])
    with pytest.raises(ValueError, match="chunk_size must be a positive number of examples or None, got 0"):
        sf.self_score(model, task, traj, f1, data, chunk_size=0)
    f1.save(tmp_path / "f")
    loaded = sf.Factors.load(tmp_path / "f")
    assert loaded.layout == f1.layout and loaded.layers == f1.layers and loaded.num_examples == f1.num_examples
    rows = [lf.rows for seg in loaded.segments for lf in seg.values()]
    assert rows == [lf.rows for seg in f1.segments for lf in seg.values()] == [len(data)] * len(rows)  # one token each
    for a, b in zip(f1.segments, loaded.segments):
        for n in LAYERS:
            for field in ("a_cov", "s_cov", "q_a", "q_s", "lam"):
                assert torch.equal(getattr(a[n], field), getattr(b[n], field))
    # Bit-equal tensors, but eigh's eigenvectors are column-major and the loaded ones row-major, so
    # matmul may sum in another order: equal to rounding.
    _close(sf.score(model, task, traj, loaded, data, queries, batch_size=1), s1, 1e-13)


def test_model_weights_and_mode_are_restored(setup):
    model, data, queries, ckpts = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    f = sf.fit_factors(model, ClassifyTask(), traj)
    sf.score(model, ClassifyTask(), traj, f, data, queries)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["ekfac", "source"])
def test_one_basis_queries_in_either_basis_match_dense(setup, method):
    """With one basis, scoring either rotates the queries back or the training tokens forward,
    whichever costs less; many queries against few training rows picks the eigenbasis."""
    from source_fast.capture import tracked_layers
    from source_fast.scoring import EigenQuery, prepare_queries

    model, data, _, ckpts = setup
    task = ClassifyTask()
    ck = ckpts[-1:] if method == "ekfac" else ckpts[:2]
    traj = sf.Trajectory([sf.Segment(ck, data, lr_sum=2.0, weight_decay=1e-3)])
    factors = sf.fit_factors(model, task, traj)
    specs = tracked_layers(model, None)
    for queries, eigen in [(data, True), (Subset(data, range(2)), False)]:
        plan = prepare_queries(model, task, specs, traj, factors, method, data, queries, damping=0.01,
                               train_segments=None, query_rank=None, batch_size=16, collate_fn=None)
        assert all(isinstance(q, EigenQuery) == eigen for q in plan.queries[0][0].values())
        scores = sf.score(model, task, traj, factors, data, queries, method=method, **_damping(method, 0.01))
        h = _block_diag_curvature(factors, 0)
        v = _grads(model, ck[-1], queries.dataset if isinstance(queries, Subset) else queries,
                   None if not isinstance(queries, Subset) else list(queries.indices))
        g = torch.stack([_grads(model, st, data) for st in ck]).mean(0)
        if method == "ekfac":
            expected = torch.linalg.solve(h + 0.01 * torch.eye(h.shape[0], dtype=h.dtype), v.T).T @ g.T / len(data)
        else:
            integral, _ = _response(h + 1e-3 * torch.eye(h.shape[0], dtype=h.dtype), 2.0)
            expected = v @ integral.T @ g.T / len(data)
        _close(scores, expected)


def test_automatic_query_budget_follows_the_available_memory():
    """score()'s default budget: a quarter of the RAM Linux says is available (CPU), at least 1 GiB."""
    from source_fast.scoring import DEFAULT_QUERY_MEMORY_BUDGET, automatic_query_budget

    budget = automatic_query_budget(torch.device("cpu"))
    meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    expected = max(DEFAULT_QUERY_MEMORY_BUDGET, available // 4)
    assert abs(budget - expected) <= 0.05 * expected  # other processes move MemAvailable between the reads
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        expected = max(DEFAULT_QUERY_MEMORY_BUDGET, free // 2)
        assert abs(automatic_query_budget(torch.device("cuda")) - expected) <= 0.05 * expected


def test_per_layer_weight_decay_is_read_per_layer(setup):
    """A dict gives each tracked module its own decay: a module it leaves out is an error naming it,
    and Adam states whose groups decay the layers differently must be matched layer by layer."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, weight_decay={"0": 0.1})
    factors = sf.fit_factors(model, task, sf.Trajectory([seg]))
    with pytest.raises(ValueError, match=r"Segment weight_decay has no entry for tracked module '2' \(it has \['0'\]\)"):
        sf.score(model, task, sf.Trajectory([seg]), factors, data, queries)
    model.load_state_dict(ckpts[0])
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [(n, p) for n, p in named if n.startswith(layer)], "weight_decay": wd}
                             for layer, wd in (("2.", 0.3), ("0.", 0.1))], lr=1e-2)
    task.compute_train_loss(data.tensors, model).backward()
    opt.step()
    states = [opt.state_dict()]
    per_layer = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=states,
                           weight_decay={"0": 0.1, "2": 0.3})
    sf.fit_factors(model, task, sf.Trajectory([per_layer]))
    one = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adamw", optimizer_states=states, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"parameter '2.weight' was trained with weight_decay=0.3, but the segment "
                                         r"says weight_decay=0.1 for it; pass .*a dict per tracked module"):
        sf.fit_factors(model, task, sf.Trajectory([one]))
    with pytest.raises(ValueError, match="Segment weight_decay must be >= 0 and finite"):
        sf.Segment(ckpts[:1], data, lr_sum=0.5, weight_decay={"0": -1.0, "2": 0.0})


@pytest.mark.parametrize("method", ["source", "ekfac", "tracin", "grad_dot"])
def test_per_module_scores_are_each_layers_dense_block(setup, method):
    """EK-FAC and SOURCE are block-diagonal over layers, so a module's part of a score is the dense
    formula with the query's other blocks zeroed; the parts sum to the scores, for self-influence too."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    one = method in ("ekfac", "grad_dot")
    traj = sf.Trajectory([sf.Segment([ckpts[-1]], data, lr_sum=3.0)]) if one else sf.Trajectory(
        [sf.Segment(ckpts[:2], data, lr_sum=1.5, weight_decay=1e-3), sf.Segment(ckpts[2:], data, lr_sum=2.0)])
    factors = sf.fit_factors(model, task, traj) if method in ("source", "ekfac") else None
    parts = sf.score(model, task, traj, factors, data, queries, method=method, **_damping(method, 0.05), batch_size=13,
                     per_module=True)
    assert list(parts) == LAYERS
    modules = dict(model.named_modules())
    sizes = [modules[n].out_features * (modules[n].in_features + 1) for n in LAYERS]  # (d_out, d_in + bias)
    grads = {ell: [_grads(model, s, data) for s in seg.checkpoints] for ell, seg in enumerate(traj.segments)}
    for b, name in enumerate(LAYERS):
        keep = torch.zeros(sum(sizes), dtype=torch.float64)
        keep[sum(sizes[:b]) : sum(sizes[: b + 1])] = 1
        v = _grads(model, ckpts[-1], queries) * keep
        if method == "source":
            expected = _dense_source(factors, traj, v, grads, {0, 1})
        elif method == "ekfac":
            h = _block_diag_curvature(factors, 0) + 0.05 * torch.eye(len(keep), dtype=torch.float64)
            expected = torch.linalg.solve(h, v.T).T @ grads[0][0].T / len(data)
        elif method == "tracin":  # Σ_ℓ c_ℓ/N mean_c ⟨∇f(θ_c), ∇L(θ_c)⟩, both at every checkpoint
            expected = sum(seg.horizon / (len(data) * len(seg.checkpoints)) * (_grads(model, s, queries) * keep)
                           @ g.T for ell, seg in enumerate(traj.segments) for s, g in zip(seg.checkpoints, grads[ell]))
        else:
            expected = v @ grads[0][0].T / len(data)
        _close(parts[name], expected)
    _close(sum(parts.values()), sf.score(model, task, traj, factors, data, queries, method=method, **_damping(method, 0.05)))
    # Self-influence, fused (one checkpoint) and chunked (SOURCE, TracIn): the diagonals of the parts.
    small = Subset(data, range(23))
    if not one:
        traj = sf.Trajectory([sf.Segment(s.checkpoints, small, lr_sum=s.lr_sum) for s in traj.segments])
        factors = factors and sf.fit_factors(model, task, traj)
    train = data if one else small
    self_parts = sf.self_score(model, task, traj, factors, train, method=method, **_damping(method, 0.05), chunk_size=10,
                               per_module=True)
    pair_parts = sf.score(model, task, traj, factors, train, train, method=method, **_damping(method, 0.05), per_module=True)
    assert list(self_parts) == LAYERS
    for name in LAYERS:
        _close(self_parts[name], torch.diagonal(pair_parts[name]))


@pytest.mark.parametrize("method", ["source", "fast_source", "ekfac", "tracin", "grad_dot"])
def test_summed_queries_read_the_training_data_once(setup, method):
    """A budget that holds one query still reads the training set once per checkpoint: on a CPU the
    layers go a group at a time, the passes kept on disk (one block of queries per pass would read it
    once per query); and sum_queries scores the queries' summed measurement, the rows' sum, from one
    prepared query."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    one = method in ("ekfac", "grad_dot")
    traj = sf.Trajectory.even(ckpts[-1:] if one else ckpts, [0.2] * 12, 1 if one else 2, data)
    factors = sf.fit_factors(model, task, traj, average_params=method == "fast_source") if method not in (
        "tracin", "grad_dot") else None

    class Counted(torch.utils.data.Dataset):
        reads = 0

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            Counted.reads += 1
            return data[i]

    counted = Counted()
    copies = 1 if one else 2 if method != "tracin" else 4  # prepared copies of one query
    budget = copies * 43 * 8
    rows = sf.score(model, task, traj, factors, counted, queries, method=method, batch_size=16,
                    train_segments="all", query_memory_budget=budget)
    per_pass = len(data)
    passes = sum(1 if method == "fast_source" else len(s.checkpoints) for s in traj.segments)
    # Once per checkpoint, plus the first four examples read to check that the loss sums over the batch.
    assert Counted.reads == passes * per_pass + 4
    Counted.reads = 0
    summed = sf.score(model, task, traj, factors, counted, queries, method=method, batch_size=16,
                      train_segments="all", query_memory_budget=budget, sum_queries=True)
    assert Counted.reads == passes * per_pass + 4
    assert summed.shape == (1, len(data))
    _close(summed, rows.sum(0, keepdim=True))
    # query_rank approximates the one summed query: full rank is exact, rank 1 is not.
    _close(sf.score(model, task, traj, factors, data, queries, method=method, sum_queries=True, query_rank=5,
                    train_segments="all"), summed)


def test_adam_states_are_matched_to_parameters_by_name(setup):
    """torch numbers optimizer states group after group: with groups listed out of module order the
    i-th state is not the i-th parameter's, so states are read by the names torch records. Groups that
    record no names are refused; a tied weight's state serves each of its names; parameters outside
    the tracked layers need no state (an unused head never gets one)."""
    model, data, _, ckpts = setup
    task = ClassifyTask()
    model.load_state_dict(ckpts[0])

    def trained(groups):
        opt = torch.optim.Adam(groups, lr=1e-2, eps=1e-6)
        for _ in range(2):
            opt.zero_grad()
            task.compute_train_loss(data.tensors, model).backward()
            opt.step()
        own = {f"{m}.weight": opt.state[dict(model.named_parameters())[f"{m}.weight"]]["exp_avg_sq"] for m in LAYERS}
        return opt.state_dict(), own

    named = list(model.named_parameters())
    state, own = trained([{"params": [(n, p) for n, p in named if n.startswith(layer)]} for layer in ("2.", "0.")])
    assert state["param_groups"][0]["params"] == [0, 1]  # layer 2's states come first
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adam", optimizer_states=[state])
    factors = sf.fit_factors(model, task, sf.Trajectory([seg]))
    for m in LAYERS:
        expected = 1 / ((own[f"{m}.weight"].double() / (1 - 0.999**2)).sqrt() + 1e-6)
        _close(factors.segments[0][m].precond[:, :-1], expected)  # the last column is the bias
    state["param_groups"][0]["lr"] = 1e-3  # a layer trained at another rate than the segment says
    with pytest.warns(UserWarning, match=r"different learning rates \[0.001, 0.01\]; a segment's lr_sum applies"):
        sf.fit_factors(model, task, sf.Trajectory([seg]))
    unnamed, _ = trained([{"params": [p for n, p in named if n.startswith(layer)]} for layer in ("2.", "0.")])
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adam", optimizer_states=[unnamed])
    with pytest.raises(ValueError, match=r"optimizer state 0 has 2 parameter groups that do not record their "
                                         r"parameters' names.*model.named_parameters\(\)"):
        sf.fit_factors(model, task, sf.Trajectory([seg]))

    # Names recorded through a wrapper (torch.compile's _orig_mod., DDP's module.) are the same parameters.
    compiled = torch.compile(model)  # compiles nothing until called; only its parameter names matter here
    state, own = trained([{"params": [(n, p) for n, p in compiled.named_parameters()
                                      if n.startswith(f"_orig_mod.{layer}")]} for layer in ("2.", "0.")])
    assert state["param_groups"][0]["param_names"][0] == "_orig_mod.2.weight"
    seg = sf.Segment(ckpts[:1], data, lr_sum=0.5, optimizer="adam", optimizer_states=[state])
    wrapped = sf.fit_factors(model, task, sf.Trajectory([seg]))
    for m in LAYERS:
        expected = 1 / ((own[f"{m}.weight"].double() / (1 - 0.999**2)).sqrt() + 1e-6)
        _close(wrapped.segments[0][m].precond[:, :-1], expected)

    class Tied(torch.nn.Module):  # a language-model-style head sharing the embedding's weight
        def __init__(self):
            super().__init__()
            self.emb, self.head, self.unused = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=False), torch.nn.Linear(4, 2)
            self.head.weight = self.emb.weight
            self.emb.double(), self.unused.double()

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    tied = Tied()
    tokens = torch.utils.data.TensorDataset(torch.randint(0, 7, (20,)), torch.randint(0, 7, (20,)))
    opt = torch.optim.Adam(tied.parameters(), lr=1e-2)  # one group, unnamed: read in model.parameters() order
    F.cross_entropy(tied(tokens.tensors[0]), tokens.tensors[1], reduction="sum").backward()
    opt.step()
    assert len(opt.state) == 1  # the unused head got no state
    seg = sf.Segment([tied.state_dict()], tokens, lr_sum=0.5, optimizer="adam", optimizer_states=[opt.state_dict()])
    class HeadOnly(ClassifyTask):
        def get_influence_tracked_modules(self):
            return ["head"]

    tied_factors = sf.fit_factors(tied, HeadOnly(), sf.Trajectory([seg]))
    expected = 1 / ((opt.state[tied.emb.weight]["exp_avg_sq"].double() / (1 - 0.999)).sqrt() + 1e-8)
    _close(tied_factors.segments[0]["head"].precond, expected)


def test_regression_task_reads_targets_in_the_outputs_shape():
    """(n,) and (n, 1) targets are the same targets: subtracting (n,) outputs from (n, 1) targets
    would broadcast to every pair, a loss that grows with the batch size."""
    torch.manual_seed(0)
    model = mlp(3, 4, 1)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = 0.5 * ((model(x)[:, 0] - y) ** 2).sum()
    task = RegressTask()
    for targets in (y, y[:, None]):
        torch.testing.assert_close(task.compute_train_loss((x, targets), model), expected, rtol=1e-15, atol=0)
        torch.testing.assert_close(task.compute_measurement((x, targets), model), expected, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"targets of shape \(6, 2\) do not match the model's outputs \(6, 1\)"):
        task.compute_train_loss((x, torch.randn(6, 2, dtype=torch.float64)), model)


@pytest.mark.parametrize("d_out, d_a", [(3, 7), (7, 3)])
def test_per_token_reference_is_explicit_in_blocks(d_out, d_a, monkeypatch):
    """out[n, q, t] = g_tᵀ U_q a_t, whichever side U contracts with first and however many examples a
    block holds (a block of one forced here)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, d_a, generator=g, dtype=torch.float64)
    grads = torch.randn(5, 4, d_out, generator=g, dtype=torch.float64)
    u = torch.randn(2, d_out, d_a, generator=g, dtype=torch.float64)
    expected = torch.stack([torch.stack([torch.stack([grads[n, t] @ u[q] @ a[n, t] for t in range(4)])
                                         for q in range(2)]) for n in range(5)])
    _close(reference.pairwise_token_scores(a, grads, u), expected, 1e-14)
    monkeypatch.setattr(reference, "TOKEN_BLOCK_BYTES", 1)
    _close(reference.pairwise_token_scores(a, grads, u), expected, 1e-14)


def test_a_real_fsdp_runs_whole_optimizer_state_is_read(tmp_path):
    """FSDP gives the whole optimizer state keyed by parameter names (get_optimizer_state_dict with
    full_state_dict; FSDP.optim_state_dict alike): a real FSDP2 run on 2 gloo ranks, two parameter
    groups, gives the Adam preconditioner of the same training in one process, whose torch optimizer
    state records the names (named parameters); the ranks' pieces, as accelerate saves them with
    SHARDED_STATE_DICT (torch.distributed.checkpoint folders), give the whole state's weights and
    preconditioner exactly, as one folder of torch's recipe holding both gives the one process's."""
    import _fsdp_job

    run = torchrun(Path(__file__).parent / "_fsdp_job.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    model, data = _fsdp_job.build(), TensorDataset(*_fsdp_job.data())
    fitted = []
    pieces = ("sharded", "sharded/optimizer_0")  # as accelerate saves SHARDED_STATE_DICT, read whole
    for weights, state in (("fsdp_model.pt", "fsdp_optimizer.bin"), ("model.pt", "optimizer.pt"), pieces):
        traj = sf.Trajectory.even([tmp_path / weights], [1e-2] * 5, 1, data, optimizer="adamw",
                                  optimizer_states=[tmp_path / state], weight_decay=0.01)
        fitted.append(sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical"))
    for name in ("0", "2"):
        torch.testing.assert_close(fitted[0].segments[0][name].precond, fitted[1].segments[0][name].precond,
                                   rtol=1e-5, atol=0)  # the ranks' gradient average rounds otherwise
        assert torch.equal(fitted[2].segments[0][name].precond, fitted[0].segments[0][name].precond)  # the same state
    for rank in (0, 1):  # fitting on the FSDP model itself is refused: its layers are split over the ranks
        assert (tmp_path / f"refused{rank}.txt").read_text().startswith(
            "the model's parameters are split over the ranks ('0.weight' is a DTensor): source_fast reads whole")
    whole = torch.load(tmp_path / "fsdp_model.pt", weights_only=True)
    pieces = sf.trajectory.load_state_dict(tmp_path / "sharded", "c")
    assert pieces.keys() == whole.keys() and all(torch.equal(pieces[k], whole[k]) for k in whole)
    # torch's own recipe saves the model and the optimizer in one folder, {"app": {"model", "optim"}}:
    # the same folder is the checkpoint and the optimizer state, each read for its part.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    plain = _fsdp_job.build()
    weights, state = get_state_dict(plain, _fsdp_job.train(plain, names=False))
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"app": {"model": weights, "optim": state}}, checkpoint_id=tmp_path / "recipe", no_dist=True)
    traj = sf.Trajectory.even([tmp_path / "recipe"], [1e-2] * 5, 1, data, optimizer="adamw",
                              optimizer_states=[tmp_path / "recipe"], weight_decay=0.01)
    recipe = sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical")
    for name in ("0", "2"):
        assert torch.equal(recipe.segments[0][name].precond, fitted[1].segments[0][name].precond)
        assert torch.equal(recipe.segments[0][name].lam, fitted[1].segments[0][name].lam)
    # torch's own state_dict saved as it is: its states numbered (strings in the folder, as torch's again),
    # and an optimizer that keeps no state (SGD without momentum) saves its param_groups alone.
    plain = _fsdp_job.build()
    state = _fsdp_job.train(plain, names=False).state_dict()
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="torch.distributed is disabled"):
        dcp.save({"optimizer": state}, checkpoint_id=tmp_path / "numbered", no_dist=True)
        dcp.save({"optimizer": sgd.state_dict()}, checkpoint_id=tmp_path / "stateless", no_dist=True)
    read = sf.trajectory.load_dict(tmp_path / "numbered", "c", "optimizer")
    assert read["param_groups"] == state["param_groups"] and read["state"].keys() == state["state"].keys()
    assert all(torch.equal(read["state"][i]["exp_avg_sq"], s["exp_avg_sq"]) for i, s in state["state"].items())
    assert sf.trajectory.load_dict(tmp_path / "stateless", "c", "optimizer") == {**sgd.state_dict(), "state": {}}


def test_real_deepspeed_zero_runs_are_read(tmp_path):
    """DeepSpeed ZeRO saves each rank's partition of flat parameter groups (stages 1 and 2: slices of the
    flattened group; stage 3: every parameter split, here in sub-groups smaller than a group, and the
    weights too): real runs of each stage on 2 gloo ranks, two parameter groups, put back together give
    exactly the weights and second moments DeepSpeed itself gathers (safe_get_full_*, in the runs; stage
    1 in bfloat16 too, whose model runs its bfloat16 weights), and the weights and Adam preconditioner
    of the same training in one process (torch's model.pt and optimizer.pt), to the float32 rounding of
    the ranks' averaged gradient. A missing or damaged rank's file is named."""
    import shutil

    import _deepspeed_job
    from source_fast._deepspeed import _stage3_places, zero_optimizer_state

    run = torchrun(Path(__file__).parent / "_deepspeed_job.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    model, data = _deepspeed_job.build(), TensorDataset(*_deepspeed_job.data())

    def fit(weights, state):
        traj = sf.Trajectory.even([weights], [1e-2] * _deepspeed_job.STEPS, 1, data, optimizer="adamw",
                                  optimizer_states=[state], weight_decay=0.01)
        return sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical")

    with pytest.warns(UserWarning, match="the biases of"):
        want = fit(tmp_path / "model.pt", tmp_path / "optimizer.pt")
    assert (tmp_path / "refused.txt").read_text().startswith(  # the ZeRO-3 model itself is refused
        "the model's parameters are split over the ranks (DeepSpeed ZeRO-3: '0.weight' is a partition)")
    for folder in ("stage1", "stage2", "stage3", "stage1_bf16", "stage3_sgd"):
        gathered = torch.load(tmp_path / folder / "full.pt", weights_only=True)
        moments = zero_optimizer_state(tmp_path / folder, "c")
        weights = sf.trajectory.load_state_dict(tmp_path / folder, "c")
        for name, moment in gathered["exp_avg_sq"].items():
            assert torch.equal(moments["state"][name]["exp_avg_sq"], moment), (folder, name)
        for name, value in gathered["weights"].items():
            assert torch.equal(weights[name], value.to(weights[name].dtype)), (folder, name)
        assert {t.dtype for t in weights.values()} == {torch.bfloat16 if "bf16" in folder else torch.float32}
        names = [n for g in moments["param_groups"] for n in g["params"]]
        assert sorted(names) == sorted(gathered["weights"]) and len(names) == len(set(names))
        if folder == "stage3_sgd":  # SGD without momentum keeps no state
            assert moments["state"] == {name: {} for name in names}
    with pytest.raises(ValueError, match=r"c: DeepSpeed's stage-3 partitions hold 10 values per rank, but the "
                                         r"parameters the checkpoint lists take 2"):
        _stage3_places([10], {"w": (4,)}, 2, "c")  # another model's shapes
    with pytest.raises(ValueError, match=r"stage2_elastic/global_step5 was saved with zero_optimization.elastic_checkpoint"
                                         r", which keeps the optimizer's state without its settings"):
        zero_optimizer_state(tmp_path / "stage2_elastic", "c")
    plain = torch.load(tmp_path / "model.pt", weights_only=True)
    for stage in (1, 2, 3):
        folder = tmp_path / f"stage{stage}"  # the folder engine.save_checkpoint wrote into
        weights = sf.trajectory.load_state_dict(folder, "c")
        assert weights.keys() == plain.keys()
        for key, value in plain.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=0, msg=lambda m: f"stage {stage}, {key}: {m}")
        with pytest.warns(UserWarning, match="the biases of"):
            got = fit(folder, folder)
        for name in ("0", "2"):
            torch.testing.assert_close(got.segments[0][name].precond, want.segments[0][name].precond, rtol=1e-5,
                                       atol=0, msg=lambda m: f"stage {stage}, layer {name}: {m}")
    pieces = tmp_path / "stage2" / "global_step5"
    (pieces / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"global_step5 holds the optimizer partitions of ranks \[0\], but they "
                                         r"record \[2, 2\] ranks: some are missing"):
        fit(tmp_path / "model.pt", pieces)
    shutil.copy(pieces / "zero_pp_rank_0_mp_rank_00_optim_states.pt", pieces / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(pieces / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(2000)
    with pytest.raises(ValueError, match=r"segment 0, optimizer state 0: cannot read DeepSpeed's file '.*zero_pp_rank_1_"
                                         r"mp_rank_00_optim_states.pt' \(damaged or incomplete\?\)"):
        fit(tmp_path / "model.pt", pieces)


def test_adam_segments_stay_exact_in_float32_at_small_horizons(setup):
    """1 − e^{−cσ} by expm1: a float32 model's Adam SOURCE scores follow the float64 model's at the
    tiny cσ of late low-rate segments (computed as 1 − exp, they lost all digits by c = 1e-8)."""
    model64, data64, queries64, ckpts = setup
    task = ClassifyTask()
    states64 = _adam_states(model64, task, data64, ckpts[:1])
    as32 = lambda d: {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in d.items()}  # noqa: E731
    states32 = copy.deepcopy(states64)
    for st in states32:
        st["state"] = {k: as32(v) for k, v in st["state"].items()}
    model32 = copy.deepcopy(model64).float()
    data32 = TensorDataset(data64.tensors[0].float(), data64.tensors[1])
    queries32 = TensorDataset(queries64.tensors[0].float(), queries64.tensors[1])
    for c in (1e-4, 1e-8):
        scores = []
        for model, data, queries, ck, states in ((model64, data64, queries64, ckpts[0], states64),
                                                 (model32, data32, queries32, as32(ckpts[0]), states32)):
            traj = sf.Trajectory([sf.Segment([ck], data, lr_sum=c, optimizer="adam", optimizer_states=states)])
            factors = sf.fit_factors(model, task, traj, fisher="empirical")
            scores.append(sf.score(model, task, traj, factors, data, queries).double())
        _close(scores[1], scores[0], 1e-4)  # float32 rounding of the gradients and factors


def test_adam_segment_needs_no_damping_at_zero_curvature(setup):
    """An input feature that is always 0 leaves exact zeros in Λ; there an Adam segment's factor is its
    limit c·p̃ (what the steps moved the weights by), never inf or NaN."""
    from source_fast.scoring import _segment_scales

    model, data, queries, ckpts = setup
    task = ClassifyTask()
    x = data.tensors[0].clone()
    x[:, 0] = 0
    flat = TensorDataset(x, data.tensors[1])
    states = _adam_states(model, task, flat, ckpts[:1])
    seg = sf.Segment(ckpts[:1], flat, lr_sum=0.5, optimizer="adam", optimizer_states=states)
    traj = sf.Trajectory([seg])
    factors = sf.fit_factors(model, task, traj, fisher="empirical")
    lf = factors.segments[0]["0"]
    assert (lf.lam == 0).any()
    u, _ = _segment_scales(seg, lf, factors.layers[0])
    p = 1 / ((lf.q_s**2).T @ (1 / lf.precond) @ lf.q_a**2)
    assert torch.equal(u[lf.lam == 0], 0.5 * p[lf.lam == 0])
    assert torch.isfinite(sf.score(model, task, traj, factors, flat, queries)).all()


def test_scoring_options_are_checked(setup):
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory.even(ckpts, [0.1] * 8, 2, data)
    factors = sf.fit_factors(model, task, traj)
    for bad in (1, "last", [0.5], [True]):
        with pytest.raises(ValueError, match=r"train_segments must be None, 'all' or a list of segment indices"):
            sf.score(model, task, traj, factors, data, queries, train_segments=bad)
    _close(sf.score(model, task, traj, factors, data, queries, train_segments=torch.tensor([0, 1])),
           sf.score(model, task, traj, factors, data, queries, train_segments=[0, 1]))
    _close(sf.score(model, task, traj, factors, data, queries, train_segments=np.array([0, 1])),
           sf.score(model, task, traj, factors, data, queries, train_segments=[0, 1]))
    # A budget as a float (2**30 * 0.5 is a natural way to write one) is whole bytes, several blocks here.
    _close(sf.score(model, task, traj, factors, data, queries, query_memory_budget=1500.0),
           sf.score(model, task, traj, factors, data, queries))
    for bad in (2.5, True, 0):
        with pytest.raises(ValueError, match=r"query_rank must be a positive integer or None, got"):
            sf.score(model, task, traj, factors, data, queries, query_rank=bad)
    final = traj.final()
    f_final = sf.fit_factors(model, task, final)
    for bad in (math.inf, math.nan, -1.0, "heurstic", torch.tensor(0.1)):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0, 'heuristic' or 'implied'; got"):
            sf.score(model, task, final, f_final, data, queries, method="ekfac", damping=bad)
    _close(sf.score(model, task, final, f_final, data, queries, method="ekfac", damping=np.float32(0.5)),
           sf.score(model, task, final, f_final, data, queries, method="ekfac", damping=0.5))
    # One-checkpoint methods on a trajectory of several: refused by self_score as by score.
    for method in ("ekfac", "grad_dot"):
        with pytest.raises(ValueError, match=rf"method '{method}' uses one checkpoint; pass trajectory.final\(\)"):
            sf.self_score(model, task, traj, factors, data, method=method)
    # Options a method does not read are refused, not dropped; sizes that cannot be are refused by every path.
    from source_fast.unroll import TrainingRecord

    record = TrainingRecord(model.state_dict(), [[0, 1]], [0.1])
    for method, trajectory, option, match in [
        ("source", traj, {"damping": 0.1}, "damping is not used by method 'source', only by ekfac and trak: SOURCE needs"),
        ("tracin", traj, {"damping": 1e9}, "damping is not used by method 'tracin'"),
        ("grad_dot", final, {"trak_dim": -1}, "trak_dim is not used by method 'grad_dot', only by trak"),
        ("ekfac", final, {"seed": 3}, "seed is not used by method 'ekfac', only by trak"),
        ("grad_cos", final, {"record": record}, "record is not used by method 'grad_cos', only by unroll"),
        ("trak", final, {"query_memory_budget": -1}, "query_memory_budget must be a positive, finite number of bytes or None"),
        ("trak", final, {"seed": 1.5}, r"seed must be an integer in torch.manual_seed's range \[-2\*\*63, 2\*\*64\), got 1.5"),
        ("trak", final, {"seed": 2**64}, r"seed must be an integer in .*, got 18446744073709551616"),
    ]:
        with pytest.raises(ValueError, match=match):
            sf.score(model, task, trajectory, factors if trajectory is traj else f_final, data, queries, method=method,
                     **option)
    with pytest.raises(ValueError, match="damping is not used by method 'source'"):
        sf.self_score(model, task, traj, factors, data, damping=0.1)
    for method, trajectory in (("ekfac", final), ("source", traj)):  # fused and chunked paths alike
        with pytest.raises(ValueError, match="chunk_size must be a positive number of examples or None, got 0"):
            sf.self_score(model, task, trajectory, f_final if method == "ekfac" else factors, data, method=method,
                          chunk_size=0)


def test_low_rank_queries_are_prepared_within_the_budget(setup, monkeypatch):
    """With query_rank, queries are preconditioned at full rank before their SVD: a budget that holds
    the factors of all 4 queries (one block) and beside them the full rank of only 2 prepares them 2
    at a time, with the same scores; each segment's query is factorised once, not once per checkpoint."""
    from source_fast import scoring

    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory.even(ckpts, [0.1] * 8, 2, data)  # two segments of two checkpoints
    factors = sf.fit_factors(model, task, traj)
    expected = sf.score(model, task, traj, factors, data, queries, query_rank=2)
    alive, calls = [], []
    real_plan, real_lowrank = scoring._plan, scoring._lowrank

    def plan(*args, **kwargs):
        alive.append(len(args[6]))  # the queries prepared at full rank at once
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(scoring, "_plan", plan)
    monkeypatch.setattr(scoring, "_lowrank", lambda q, r: calls.append(1) or real_lowrank(q, r))
    one_full = 2 * 43 * 8  # two segments' copies of one query, float64: 688 bytes
    low_rank_all = 2 * 2 * (5 + 5 + 3 + 6) * 8 * len(queries)  # rank-2 factors of all 4 queries: 2432 bytes
    got = sf.score(model, task, traj, factors, data, queries, query_rank=2,
                   query_memory_budget=low_rank_all + 2 * one_full + one_full // 2)
    assert alive == [2, 2] and len(calls) == 2 * len(alive)
    _close(got, expected)


def test_unfused_self_influence_dots_in_each_querys_basis(setup, monkeypatch):
    """Self-influence's chunks are queries and training examples at once: a query left in the
    eigenbasis is dotted with the chunk's gradients taken in that basis, one in the parameter basis with
    parameter-basis gradients. Here the two layers take one each; the scores stay the pairwise diagonal."""
    from source_fast import scoring

    model, data, _, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])  # one basis, four checkpoints: unfused
    factors = sf.fit_factors(model, task, traj)
    seen, example_grads = [], scoring._example_grads
    def spy(*args, bases=None, **kwargs):
        if "query side" not in args[5]:  # the chunk as training examples, not as queries
            seen.append({k: type(b).__name__ for k, b in bases.items()})
        return example_grads(*args, bases=bases, **kwargs)
    monkeypatch.setattr(scoring, "_example_grads", spy)
    got = sf.self_score(model, task, traj, factors, data, chunk_size=60)
    monkeypatch.undo()
    # 240 rows of 5×5 gradients cost less to rotate than 60 queries; of 3×6 ones, more.
    assert seen == [{"0": "EigenQuery", "2": "NoneType"}] * len(ckpts)
    _close(got, torch.diagonal(sf.score(model, task, traj, factors, data, data)))


def test_progress_covers_query_preparation_and_chunked_self_influence(setup, capfd):
    """Query gradients and the SOURCE walk (tens of seconds for wide layers, before any shard) and the
    chunked self-influence passes show progress too, not only the passes over the training data."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory.even(ckpts, [0.1] * 8, 2, data)
    factors = sf.fit_factors(model, task, traj)
    capfd.readouterr()
    sf.score(model, task, traj, factors, data, queries, progress=True)
    err = capfd.readouterr().err
    assert "gradients of queries" in err and "preconditioning queries" in err and "scoring (segment 1" in err
    sf.self_score(model, task, traj, factors, data, chunk_size=30, progress=True)
    err = capfd.readouterr().err
    assert "gradients of training examples 30+, segment 1, checkpoint 0" in err
    # The final checkpoint's gradients are the query side's: no pass of their own.
    assert "gradients of training examples 30+ (self-influence's query side)" in err
    assert "segment 1, checkpoint 1" not in err


def test_progress_bars_suit_logs_and_ranks(monkeypatch):
    """Into a log file a bar redraws every 30 s (10 times a second filled logs at 1 KB/s per rank);
    under torchrun only rank 0 draws one, labelled."""
    from source_fast import factors as fm

    bar = fm._progress(True, 10, "covariances")
    assert bar.mininterval == 30.0 and bar.desc == "covariances"  # pytest's stderr is not a terminal
    assert bar.leave  # a pass shorter than 30 s still logs where it ended, not only its 0 %
    bar.close()
    monkeypatch.setattr(fm, "rank_and_world", lambda: (1, 2))
    assert fm._progress(True, 10, "covariances") is None
    monkeypatch.setattr(fm, "rank_and_world", lambda: (0, 2))
    bar = fm._progress(True, 10, "covariances")
    assert bar.desc == "covariances [rank 0 of 2]"
    bar.close()


def test_adam_states_steps_must_fit_the_learning_rates(setup):
    """A real AdamW run of 12 steps with 4 checkpoints: its states record steps 3, 6, 9, 12. One rate per
    checkpoint (4 rates) would make every c 3 times too small: refused, naming both states, across the
    segments too; 24 rates (one per half step) are a warning; the 12 real ones fit without a word."""
    model, data, _, _ = setup
    task = ClassifyTask()
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ckpts, states = [], []
    for step in range(12):
        opt.zero_grad()
        task.compute_train_loss(data[step * 5 : step * 5 + 5], model).backward()
        opt.step()
        if step % 3 == 2:
            ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
            states.append(copy.deepcopy(opt.state_dict()))

    def fit(rates, segments=2):
        traj = sf.Trajectory.even(ckpts, [1e-2] * rates, segments, data, optimizer="adamw", optimizer_states=states,
                                  weight_decay=0.01)
        return sf.fit_factors(model, task, traj, fisher="empirical", batch_size=30)

    with pytest.raises(ValueError, match=r"segment 0, optimizer state 1 records step 6 and segment 0, optimizer state 0 "
                                         r"step 3: 3 optimizer steps between their checkpoints, where the learning "
                                         r"rates have 1 \(checkpoints after rates 1 and 2\); give lrs one rate per "
                                         r"optimizer step"):
        fit(4)
    with pytest.raises(ValueError, match=r"segment 1, optimizer state 0 records step 6 and segment 0, optimizer state 0 "
                                         r"step 3: 3 optimizer steps"):
        fit(4, segments=4)  # one checkpoint per segment: the states are compared across the segments
    with pytest.warns(UserWarning, match=r"where the learning rates have 6 .*: rates per micro-batch, not per "
                                         r"optimizer step\?"):
        fit(24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(12)


def test_even_splits_adam_states_with_their_checkpoints(setup):
    """Trajectory.even for an Adam run: each segment gets its checkpoints' optimizer states, so it
    fits what hand-built segments fit."""
    model, data, queries, ckpts = setup
    task = ClassifyTask()
    states = _adam_states(model, task, data, ckpts)
    lrs = [0.01] * 8
    traj = sf.Trajectory.even(ckpts, lrs, 2, data, optimizer="adam", optimizer_states=states)
    by_hand = sf.Trajectory([sf.Segment(ckpts[:2], data, lrs=lrs[:4], optimizer="adam", optimizer_states=states[:2]),
                             sf.Segment(ckpts[2:], data, lrs=lrs[4:], optimizer="adam", optimizer_states=states[2:])])
    f, g = sf.fit_factors(model, task, traj, fisher="empirical"), sf.fit_factors(model, task, by_hand, fisher="empirical")
    for a, b in zip(f.segments, g.segments):
        for name in LAYERS:
            assert torch.equal(a[name].precond, b[name].precond) and torch.equal(a[name].lam, b[name].lam)
    with pytest.raises(ValueError, match="3 optimizer states for 4 checkpoints: give one per checkpoint"):
        sf.Trajectory.even(ckpts, lrs, 2, data, optimizer="adam", optimizer_states=states[:3])
    # States recording their steps out of order (reversed with their checkpoints, say) are refused.
    ordered = copy.deepcopy(states[:2])
    ordered[1]["state"][0]["step"] = ordered[1]["state"][0]["step"] + 5  # saved 5 steps after the first
    backwards = sf.Trajectory([sf.Segment(ckpts[:2][::-1], data, lrs=lrs[:4], optimizer="adam",
                                          optimizer_states=ordered[::-1])])
    with pytest.warns(UserWarning, match=r"segment 0, optimizer state 1 records step 3, but optimizer state 0 before "
                                         r"it records step 8: give the states, like the checkpoints, in training order"):
        sf.fit_factors(model, task, backwards)  # a warning: a restarted optimizer does this too


def test_large_blocks_are_reused_during_a_call_and_returned_after():
    """glibc serves (and returns) every block over its mmap threshold with its own mapping, whose
    pages fault in anew each time; inside reuse_large_blocks a 64 MB block comes from the heap and
    stays there for the next one. Read from glibc's own accounting (mallinfo2: mapped blocks), which
    transparent huge pages do not change, unlike page-fault counts."""
    import ctypes

    from source_fast import _passes

    libc = _passes._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # other C libraries: a no-op (CI runs glibc >= 2.33)
        with _passes.reuse_large_blocks(torch.device("cpu")):
            return

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2

    def mapped_while_alive() -> int:
        before = libc.mallinfo2().hblkhd
        block = torch.empty(16 << 20)  # 64 MB
        during = libc.mallinfo2().hblkhd
        del block
        return during - before

    assert mapped_while_alive() >= 64 << 20  # its own mapping
    with _passes.reuse_large_blocks(torch.device("cpu")):
        assert mapped_while_alive() == 0  # from the heap, reused
    assert mapped_while_alive() >= 64 << 20  # restored


def test_ekfac_without_damping_refuses_curvature_whose_inverse_overflows():
    """δ = 0 is refused where Λ is exactly 0; a float32 Λ of 1e-39 (> 0) makes 1/Λ overflow to inf just the
    same, and the self-influence kernel then turns inf · 0 into NaN: refused too. 1e-30 is fine."""
    from source_fast import scoring
    from source_fast.capture import LayerSpec
    from source_fast.factors import LayerFactors

    class Seg:
        optimizer, horizon, decay_scale = "sgd", 1.0, 1.0

    fc = LayerSpec("fc", "linear", 2, 1, False)
    for tiny, ok in [(1e-30, True), (1e-39, False)]:
        lf = LayerFactors(torch.eye(2), torch.eye(1), torch.eye(2), torch.eye(1), torch.tensor([[1.0, tiny]]))
        if ok:
            assert torch.isfinite(scoring._one_checkpoint_scale("ekfac", Seg(), lf, 0.0, fc)).all()
        else:
            with pytest.raises(ValueError, match="too small in some directions"):
                scoring._one_checkpoint_scale("ekfac", Seg(), lf, 0.0, fc)


def test_joined_batches_pad_each_layers_tokens_and_masks(monkeypatch):
    """scoring._in_blocks: consecutive batches of 2, 1 and 2 examples (3, 5 and 4 tokens) become one block
    whose tokens and masks are each batch's, padded with zeros (False) to 5 tokens; a batch without a mask
    counts as all kept. A gap in the rows, the examples' limit, the padded block's bytes or its padding
    starts a new block."""
    from source_fast import scoring
    from source_fast.capture import Captured

    monkeypatch.setattr(scoring, "BLOCK_PADDING", 2.0)  # 25 tokens padded for 19

    g0 = torch.Generator().manual_seed(0)

    def batch(n, t, masked):
        a, g = torch.randn(n, t, 3, generator=g0), torch.randn(n, t, 2, generator=g0)
        return Captured(a=a, g=g, mask=torch.rand(n, t, generator=g0) > 0.5 if masked else None, calls=1 + (t == 4))

    batches = [(0, 2, {"l": batch(2, 3, True)}), (2, 1, {"l": batch(1, 5, False)}), (3, 2, {"l": batch(2, 4, True)})]
    [(start, n, rec)] = list(scoring._in_blocks(batches))
    r = rec["l"]
    assert (start, n, r.a.shape, r.g.shape, r.mask.shape, r.calls) == (0, 5, (5, 5, 3), (5, 5, 2), (5, 5), 2)
    row = 0
    for _, k, part in batches:
        p, t = part["l"], part["l"].a.shape[1]
        assert torch.equal(r.a[row : row + k, :t], p.a) and torch.equal(r.g[row : row + k, :t], p.g)
        assert r.a[row : row + k, t:].abs().sum() == 0 and r.g[row : row + k, t:].abs().sum() == 0
        expected = torch.ones(k, t, dtype=torch.bool) if p.mask is None else p.mask
        assert torch.equal(r.mask[row : row + k, :t], expected) and not r.mask[row : row + k, t:].any()
        row += k
    gap = [batches[0], (5, 1, batches[1][2])]
    assert [(s, k) for s, k, _ in scoring._in_blocks(gap)] == [(0, 2), (5, 1)]
    # Batches off the CPU (a GPU's; meta tensors here) go as they are, after the block before them.
    off = (5, 1, {"l": Captured(a=torch.empty(1, 2, 3, device="meta"), g=torch.empty(1, 2, 2, device="meta"),
                                mask=None, calls=1)})
    out = list(scoring._in_blocks(batches + [off]))
    assert [(s, k) for s, k, _ in out] == [(0, 5), (5, 1)] and out[1][2] is off[2]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "BLOCK_EXAMPLES", 3)
        assert [(s, k) for s, k, _ in scoring._in_blocks(batches)] == [(0, 3), (3, 2)]
    # 20 bytes a token (3 + 2 float32). All 5 examples padded are 25 tokens, 19 their own (unpadded, 380 bytes
    # would fit); the first two batches 15 tokens, 11 their own; the last two 15, 13 their own.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "BLOCK_BYTES", 25 * 20 - 1)
        assert [(s, k) for s, k, _ in scoring._in_blocks(batches)] == [(0, 3), (3, 2)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scoring, "BLOCK_PADDING", 15 / 11 - 1e-9)
        assert [(s, k) for s, k, _ in scoring._in_blocks(batches)] == [(0, 2), (2, 3)]


def test_a_joined_block_is_held_once(monkeypatch):
    """A block's batches are let go once joined, and score_rows lets a block go before the next is joined:
    a CPU pass holds one block of tokens (up to BLOCK_BYTES), not a block beside its parts and the one
    before it. Weak references to the tensors tell; the scores are the batch-by-batch ones."""
    import weakref

    from source_fast import scoring
    from source_fast.capture import Captured

    refs = []

    def batch(start, n, t):
        a = torch.randn(n, t, 3)
        refs.append(weakref.ref(a))
        return start, n, {"l": Captured(a=a, g=torch.randn(n, t, 2), mask=None, calls=1)}

    monkeypatch.setattr(scoring, "BLOCK_EXAMPLES", 4)
    blocks = scoring._in_blocks(batch(s, 2, 3) for s in range(0, 12, 2))  # blocks of 2 batches
    for i, (start, n, rec) in enumerate(blocks):
        assert (start, n) == (4 * i, 4)
        assert all(r() is None for r in refs[: 2 * i + 2]), "the joined batches are still held"
        del rec

    model, data = mlp(4, 5, 3), classification_data(23, 4, 3)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    expected = sf.score(model, ClassifyTask(), traj, None, data, Subset(data, range(3)), method="grad_dot",
                        batch_size=2)
    joined, made = [], []
    join = scoring._joined_batches

    def watched(held):
        assert all(r() is None for r in made), "the block before is still held"
        block = join(held)
        made.append(weakref.ref(block[2]["0"].a))
        joined.append(block[:2])
        return block

    monkeypatch.setattr(scoring, "_joined_batches", watched)
    scores = sf.score(model, ClassifyTask(), traj, None, data, Subset(data, range(3)), method="grad_dot", batch_size=2)
    assert joined == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 3)]
    _close(scores, expected)


@pytest.mark.parametrize("data_form", ["dataset", "stream"])
def test_tracin_through_joined_blocks_is_explicit_gradients(data_form, monkeypatch):
    """TracIn's checkpoints, each a pass, and a stream's buffered pieces go through joined blocks (of 4
    examples here, batches of 2) as one batch does: c/N × the mean over the checkpoints of the explicit
    per-example gradients' dot products, float64."""
    from _helpers import Stream

    from source_fast import scoring

    monkeypatch.setattr(scoring, "BLOCK_EXAMPLES", 4)
    monkeypatch.setattr(scoring, "STREAM_CHUNK", 9)  # pieces of 9: blocks of 4, 4 and 1
    model, data = mlp(4, 5, 3), classification_data(23, 4, 3)
    queries = Subset(classification_data(7, 4, 3, seed=1), range(3))
    states = perturbed_states(model, 3, scale=0.2)
    train = data if data_form == "dataset" else Stream(data)
    traj = sf.Trajectory([sf.Segment(states, train, lr_sum=0.7, num_examples=23)])
    joined = []
    join = scoring._joined_batches
    monkeypatch.setattr(scoring, "_joined_batches",
                        lambda held: (joined.append(sum(n for _, n, _ in held)), join(held))[1])
    scores = sf.score(model, ClassifyTask(), traj, None, train, queries, method="tracin", batch_size=2)
    q = classification_data(7, 4, 3, seed=1)
    expected = sum(_grads(model, st, q, range(3)) @ _grads(model, st, data).T for st in states) / 3 * 0.7 / 23
    _close(scores, expected)
    # Every checkpoint's pass over the data; a stream's, piece by piece (9, 9, 5 examples), each over them all.
    assert joined == ([4, 4, 4, 4, 4, 3] * 3 if data_form == "dataset" else [4, 4, 1] * 6 + [4, 1] * 3)


def test_the_scoring_bar_counts_the_examples_scored(monkeypatch):
    """Joined, the pass runs up to a block ahead of the scoring: the bar moves as each block is scored, so
    it reads what is done (a real tqdm's count, read as each block's scoring begins), with tokens/s."""
    import io

    from tqdm import tqdm

    from source_fast import scoring

    monkeypatch.setattr(scoring, "BLOCK_EXAMPLES", 4)
    bars = []

    def scoring_bar(enabled, total, desc, unit="ex"):
        if not (enabled and desc.startswith("scoring")):
            return None
        bars.append(tqdm(total=total, desc=desc, file=io.StringIO()))
        return bars[-1]

    seen = []
    score_block = scoring._score_block
    monkeypatch.setattr(scoring, "_progress", scoring_bar)
    monkeypatch.setattr(scoring, "_score_block", lambda specs, rec, *a, **k: (
        seen.append((bars[-1].n, rec[specs[0].name].a.shape[0])), score_block(specs, rec, *a, **k))[1])
    model, data = mlp(4, 5, 3), classification_data(23, 4, 3)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    sf.score(model, ClassifyTask(), traj, None, data, Subset(data, range(3)), method="grad_dot", batch_size=2,
             progress=True)
    assert seen == [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4), (20, 3)]
    assert len(bars) == 1 and bars[0].n == 23 and "tok/s" in bars[0].postfix
