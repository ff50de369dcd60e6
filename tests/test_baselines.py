"""Baseline methods (grad_cos, trak, repsim, unroll) against explicit float64 constructions."""

import math

import numpy as np
import pytest
import torch
from _helpers import ClassifyTask, classification_data, mlp, per_example_grads
from torch.nn import functional as F
from torch.utils.data import DataLoader

import source_fast as sf
from source_fast.unroll import TrainingRecord, unroll_scores

LAYERS = ["0", "2"]


@pytest.fixture(scope="module")
def setup():
    model = mlp(4, 5, 3)
    data = classification_data(30, 4, 3, seed=1)
    queries = classification_data(3, 4, 3, seed=2)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    ce = lambda out, y: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    grads = lambda d: torch.cat([per_example_grads(model, model.state_dict(), ce, *d.tensors, LAYERS)[n].flatten(1) for n in LAYERS], 1)  # noqa: E731
    return model, data, queries, traj, grads(queries), grads(data)


def test_grad_cos(setup):
    model, data, queries, traj, v, g = setup
    got = sf.score(model, ClassifyTask(), traj, None, data, queries, method="grad_cos", batch_size=7)
    expected = (v / v.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_grad_cos_of_a_zero_gradient_is_zero(setup):
    from source_fast import baselines
    from source_fast.capture import tracked_layers

    model, data, _, _, _, g = setup
    specs = tracked_layers(model, None)
    zero = {s.name: torch.zeros(1, s.d_out, s.d_a, dtype=torch.float64) for s in specs}
    got = baselines.grad_cos(model, ClassifyTask(), specs, zero, data, 7, None)
    assert torch.equal(got, torch.zeros_like(got))


def test_trak_refuses_implied_damping(setup):
    model, data, queries, traj, _, _ = setup
    for bad in ("implied", math.inf):
        with pytest.raises(ValueError, match="trak's damping must be a finite number >= 0 or 'heuristic'"):
            sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=4, damping=bad)


def test_trak_refuses_an_undamped_projection_wider_than_its_rank(setup):
    """ΦᵀΦ has rank at most min(N, parameters): with more dimensions and no damping, solve() returned
    round-off as scores (a review measured 5.8 against 0.73 at the valid size, uncorrelated across
    dampings 0 and 1e-15)."""
    model, data, queries, traj, _, _ = setup
    n = len(data)
    with pytest.raises(ValueError, match=rf"trak_dim={n + 1} with damping 0: ΦᵀΦ has rank at most {n} .* give trak_dim <= {n}"):
        sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=n + 1, damping=0)
    scores = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=n + 1, damping=1e-3)
    assert torch.isfinite(scores).all()


def test_trak_refuses_a_projection_that_cannot_fit(setup):
    """The dense Gaussian map is trak_dim · Σ d_out·d_a numbers: refused before any pass when it
    exceeds the memory budget (a GPT-2-small map at trak_dim 256 would be 87 GB in float32)."""
    model, data, queries, traj, _, _ = setup
    with pytest.raises(ValueError, match=r"TRAK's projection with trak_dim=1000000000 takes \d+ bytes .* lower trak_dim"):
        sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=10**9, damping=0.01)


def test_trak_is_the_projected_influence_function(setup):
    model, data, queries, traj, v, g = setup
    dim = 12
    got = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=dim, damping=0.01, seed=3, batch_size=8)
    gen = torch.Generator().manual_seed(3)
    p = torch.cat([torch.randn(dim, o, i, generator=gen, dtype=torch.float64).flatten(1) for o, i in [(5, 5), (3, 6)]], 1) / dim**0.5
    phi, phi_q = g @ p.T, v @ p.T
    n = len(data)
    expected = phi_q @ torch.linalg.solve(phi.T @ phi / n + 0.01 * torch.eye(dim, dtype=torch.float64), phi.T) / n
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    # With a projection as wide as the gradient, TRAK is the influence function of the empirical Fisher.
    wide = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=400, damping=0.01)
    exact = v @ torch.linalg.solve(g.T @ g / n + 0.01 * torch.eye(g.shape[1], dtype=torch.float64), g.T) / n
    assert torch.corrcoef(torch.stack([wide.flatten(), exact.flatten()]))[0, 1] > 0.95


def test_trak_scores_a_list_of_dampings_from_one_pass(setup):
    """Held-out choice of TRAK's damping needs its scores at several: a list gives each one's, stacked
    first, equal to one call per damping, from one pass over the training data; over checkpoints too.
    A list is refused for the other methods, and an empty one."""
    from source_fast import baselines

    model, data, queries, traj, _, _ = setup
    task = ClassifyTask()
    dampings = [1e-3, "heuristic", 0.1]
    states = [{k: v + 0.2 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(2)]
    two = sf.Trajectory([sf.Segment(states, data, lr_sum=1.0)])
    for trajectory, options in ((traj, {}), (two, {"train_segments": "all"})):
        one = [sf.score(model, task, trajectory, None, data, queries, method="trak", trak_dim=6, damping=lam, **options)
               for lam in dampings]
        passes = []
        real = baselines._train_pass
        with pytest.MonkeyPatch.context() as m:
            m.setattr(baselines, "_train_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
            many = sf.score(model, task, trajectory, None, data, queries, method="trak", trak_dim=6, damping=dampings,
                            **options)
        assert many.shape == (3, len(queries), len(data)) and torch.equal(many, torch.stack(one))
        assert len(passes) == sum(len(s.checkpoints) for s in trajectory.segments)  # one per checkpoint
    with pytest.raises(ValueError, match=r"damping: a list of dampings is for trak .*, and not empty; got \[\]"):
        sf.score(model, task, traj, None, data, queries, method="trak", damping=[])
    factors = sf.fit_factors(model, task, traj)
    with pytest.raises(ValueError, match=r"a list of dampings is for trak .* for method 'ekfac'"):
        sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=[0.1, 1.0])
    with pytest.raises(ValueError, match=r"trak's damping must be a finite number >= 0 or 'heuristic' .*, or a list "
                                         r"of them; got 'implied'"):
        sf.score(model, task, traj, None, data, queries, method="trak", damping=[0.1, "implied"])
    with pytest.raises(ValueError, match=r"trak's damping must be .*, or a list of them; got None"):
        sf.score(model, task, traj, None, data, queries, method="trak", damping=[None, 0.1])


def test_trak_over_checkpoints_is_the_mean_of_each_checkpoints_trak(setup):
    """TRAK's ensemble: each checkpoint's scores from its own gradients, damping and map (seeded
    seed + k), averaged over the checkpoints of the segments that trained on the scored data (a
    second stage's checkpoints do not count for the first stage's examples)."""
    model, data, queries, _, _, _ = setup
    ce = lambda out, y: F.cross_entropy(out, y, reduction="sum")  # noqa: E731
    states = [{k: v + 0.2 * torch.randn_like(v) for k, v in model.state_dict().items()} for _ in range(3)]
    other = classification_data(20, 4, 3, seed=5)
    traj = sf.Trajectory([sf.Segment(states[:2], data, lr_sum=1.0), sf.Segment(states[2:], other, lr_sum=1.0)])
    dim, n = 12, len(data)
    expected = 0
    for k, state in enumerate(states[:2]):
        gen = torch.Generator().manual_seed(3 + k)
        p = torch.cat([torch.randn(dim, o, i, generator=gen, dtype=torch.float64).flatten(1) for o, i in [(5, 5), (3, 6)]], 1) / dim**0.5
        grads = [torch.cat([t.flatten(1) for t in per_example_grads(model, state, ce, *d.tensors, LAYERS).values()], 1)
                 for d in (queries, data)]
        phi_q, phi = grads[0] @ p.T, grads[1] @ p.T
        lam = 0.1 * float(torch.trace(phi.T @ phi)) / (dim * n)  # "heuristic", at each checkpoint
        expected = expected + phi_q @ torch.linalg.solve(phi.T @ phi / n + lam * torch.eye(dim, dtype=torch.float64), phi.T) / n / 2
    got = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=dim, seed=3)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    # The largest seed: the next checkpoint's map wraps around to seed 0 rather than fail after a pass.
    top = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=dim, seed=2**64 - 1)
    assert torch.isfinite(top).all()
    numpy_seed = sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=dim,
                          seed=np.int64(3))  # numpy integers are integers
    assert torch.equal(numpy_seed, got)


def test_repsim(setup):
    model, data, queries, traj, _, _ = setup
    got = sf.score(model, ClassifyTask(), traj, None, data, queries, method="repsim")
    rep = lambda x: torch.tanh(model[0](x)).detach()  # noqa: E731 - the input of the last layer
    q, t = rep(queries.tensors[0]), rep(data.tensors[0])
    expected = (q / q.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)

    class Reversed(ClassifyTask):  # the tracked modules listed output first
        def get_influence_tracked_modules(self):
            return list(reversed(LAYERS))

    assert torch.equal(sf.score(model, Reversed(), traj, None, data, queries, method="repsim"), got)


def test_repsim_pools_the_unmasked_tokens_only():
    """A token model's representation is the mean of its last layer's inputs over the unmasked tokens:
    the padding (garbage, 50 times the scale) is left out."""
    from test_first_principles import LOSS, RecordingTask, TokenNet, token_data

    torch.manual_seed(0)
    model = TokenNet().double()
    data, queries = token_data(9, 5, 3), token_data(4, 5, 7)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    got = sf.score(model, RecordingTask(LOSS[TokenNet]), traj, None, data, queries, method="repsim")

    def rep(d):
        x, _, mask = d.tensors
        inputs = torch.tanh(model.mid(torch.tanh(model.inp(x)))).detach()  # the last layer's ("out")
        pooled = (inputs * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return pooled / pooled.norm(dim=1, keepdim=True)

    torch.testing.assert_close(got, rep(queries) @ rep(data).T, rtol=1e-10, atol=1e-12)


def test_unroll_method_replays_the_record(setup):
    model, data, queries, traj, _, _ = setup
    init = {k: v + 0.1 for k, v in model.state_dict().items()}
    record = TrainingRecord(init, [[0, 1, 2], [3, 4, 5], [1, 6, 7]], [0.1, 0.2, 0.1], momentum=0.5, weight_decay=0.01)
    got = sf.score(model, ClassifyTask(), traj, None, data, queries, method="unroll", record=record)
    expected = unroll_scores(model, ClassifyTask(), init, data, record.batches, record.lrs, queries, momentum=0.5, weight_decay=0.01)
    assert torch.equal(got, expected)
    assert (got[:, 8:] == 0).all() and (got[:, :8] != 0).any()  # examples never seen have no effect
    with pytest.raises(TypeError, match="needs record=TrainingRecord"):
        sf.score(model, ClassifyTask(), traj, None, data, queries, method="unroll")
    with pytest.raises(ValueError, match="self_score supports the methods"):
        sf.self_score(model, ClassifyTask(), traj, None, data, method="trak")


@pytest.mark.parametrize("method", ["grad_cos", "trak", "repsim", "unroll"])
def test_baselines_refuse_the_scoring_options(setup, method):
    """They score whole examples exactly: these options would otherwise be dropped without a word."""
    model, data, queries, traj, _, _ = setup
    record = TrainingRecord(model.state_dict(), [[0, 1]], [0.1])
    for option in ({"per_token": True}, {"query_rank": 2}, {"per_module": True}, {"sum_queries": True}):
        with pytest.raises(ValueError, match=f"{next(iter(option))} is not available for method '{method}'"):
            sf.score(model, ClassifyTask(), traj, None, data, queries, method=method, **option,
                     **{"trak": {"trak_dim": 4}, "unroll": {"record": record}}.get(method, {}))


def test_trak_dim_must_be_a_positive_integer(setup, monkeypatch):
    model, data, queries, traj, _, _ = setup
    from source_fast import scoring

    def no_pass(*args, **kwargs):
        raise AssertionError("a pass ran before the options were checked")

    monkeypatch.setattr(scoring, "_example_grads", no_pass)
    for dim in (0, -3, 2.5, "4"):  # a string must not reach the memory estimate (str * int repeats it)
        with pytest.raises(ValueError, match=f"trak_dim must be a positive integer or None, got {dim!r}"):
            sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=dim)
    with pytest.raises(ValueError, match="trak's damping must be a finite number >= 0 or 'heuristic'"):
        sf.score(model, ClassifyTask(), traj, None, data, queries, method="trak", trak_dim=4, damping="implied")


@pytest.mark.parametrize("method", ["grad_cos", "trak", "repsim", "unroll"])
def test_baselines_read_dataloaders_and_collate_fn_like_datasets(setup, method):
    """score() takes DataLoaders (their own batches and collate_fn) and collate_fn for every method."""
    model, data, queries, traj, _, _ = setup
    record = TrainingRecord({k: v + 0.1 for k, v in model.state_dict().items()}, [[0, 1, 2], [3, 4, 5]], [0.1, 0.2])
    kwargs = {"method": method, **{"trak": {"trak_dim": 6}, "unroll": {"record": record}}.get(method, {})}
    expected = sf.score(model, ClassifyTask(), traj, None, data, queries, **kwargs)
    loaders = DataLoader(data, batch_size=7), DataLoader(queries, batch_size=2)
    torch.testing.assert_close(sf.score(model, ClassifyTask(), traj, None, *loaders, **kwargs), expected, rtol=1e-12, atol=0)
    # Examples as dicts, which default_collate would keep as a dict: only the collate_fn makes (x, y) batches.
    as_dicts = lambda d: [{"x": x, "y": y} for x, y in zip(*d.tensors)]  # noqa: E731
    to_tuple = lambda ex: (torch.stack([e["x"] for e in ex]), torch.stack([e["y"] for e in ex]))  # noqa: E731
    got = sf.score(model, ClassifyTask(), traj, None, as_dicts(data), as_dicts(queries), collate_fn=to_tuple, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
