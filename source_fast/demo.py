"""The demo: how well do SOURCE, EK-FAC influence and the baselines predict real retraining?

MLPs are trained with SGD + momentum and a warm-up/cosine schedule in four scenarios, three on
scikit-learn's bundled digits and one on its bundled diabetes regression data:

  standard       trained to convergence on all ten classes
  non-converged  30% of the training labels randomized, a few epochs
  multi-stage    pretrained on classes 0-4, fine-tuned on 5-9; the pretraining data is attributed
                 (segments per stage, each carrying that stage's data) for test digits of the
                 fine-tuned task (5-9): which pretraining digits shaped the features it reuses
  regression     diabetes progression from 10 features, squared error, stopped early (at about its
                 best test error, far from the training optimum influence functions assume)

Each method scores every attributed training example against test queries; the linear datamodeling
score (LDS, source_fast.eval) compares those scores with the query losses of models retrained on
random halves of the data (several data orders each). Retraining keeps the original
initialisation and varies the data and its order. EK-FAC's damping is chosen on held-out queries,
never on the evaluated ones. Where exact unrolling is cheap (non-converged, regression), each
method is also compared with the mean of the exact unrolled scores of several other data orders
(what SOURCE estimates; one order alone is noisy). The outputs: a table (Markdown, JSON), a bar
chart, a grid of top proponents and opponents, the checkpoints and factors of each scenario, and
the retraining cache (a rerun with the same settings reuses it).

Run with `source-fast demo [--out DIR] [--quick]` or `python -m source_fast demo`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Subset, TensorDataset

from . import Factors, Segment, Task, Trajectory, fit_factors, score
from . import eval as ev
from ._dist import sole_writer
from ._io import SAFETENSORS_TEMP, atomic_path, own_temps, remove_stale_temps
from .tasks import ClassificationTask, RegressionTask
from .unroll import TrainingRecord


def _digits_split(n_train: int, n_test: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw digits (1797, 64) in [0, 1], labels, and the seeded train / test index split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y), perm[:n_train], perm[n_train : n_train + n_test]


def digits_data(n_train: int, n_test: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits (with the training split's statistics): (train, test) datasets."""
    x, y, tr, te = _digits_split(n_train, n_test, seed)
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1
    return TensorDataset((x[tr] - mean) / std, y[tr]), TensorDataset((x[te] - mean) / std, y[te])


def make_mlp(seed: int = 0, hidden: int = 64, d_in: int = 64, d_out: int = 10) -> nn.Module:
    """Two tanh hidden layers; the defaults fit digits (64 pixels, 10 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, d_out)
    )


def schedule(steps: int, peak: float, warmup: int) -> list[float]:
    """Linear warm-up, then cosine decay to 0: the real per-step rates SOURCE sums per segment."""
    return [
        peak * (k + 1) / warmup if k < warmup else peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup)))
        for k in range(steps)
    ]


# ---- scenarios -----------------------------------------------------------------------------------

ALL_CLASSES = tuple(range(10))


@dataclass(frozen=True)
class Stage:
    """A training stage: the digit classes it trains on, its epochs and its peak learning rate."""

    classes: tuple[int, ...]
    epochs: int
    lr: float = 0.05


@dataclass(frozen=True)
class Scenario:
    """One experiment. Stage 0's examples are the attributed data; later stages always train on
    all their data. Queries are test digits of `query_classes`: the first `n_query` are evaluated,
    the next `n_heldout` only choose the influence function's damping and TRAK's dimension and
    damping. `unroll_orders` > 0: exact
    unrolling of that many other data orders, averaged, as a reference every method is ranked
    against. `removal_k` > 0: subset removal of each query's `removal_k` top proponents."""

    name: str
    title: str
    stages: tuple[Stage, ...]
    label_noise: float = 0.0
    query_classes: tuple[int, ...] = ALL_CLASSES
    n_train: int = 1000
    n_test: int = 797
    n_query: int = 150
    n_heldout: int = 75
    hidden: int = 64
    batch_size: int = 64
    momentum: float = 0.9
    checkpoints: int = 6  # per stage, evenly spaced; the last is the stage's end
    unroll_orders: int = 0
    removal_k: int = 0

    classification = True  # class attributes, not fields: what kind of task the scenario is
    metric_name = "accuracy"
    # Subset removal measures the true-class margin: a sign change is a flipped prediction.
    removal_kind = "flip"

    @property
    def data(self) -> ScenarioData:
        return _scenario_data(self)

    @property
    def task(self) -> Task:
        return ClassificationTask()

    def make_model(self, seed: int = 0) -> nn.Module:
        """The initialisation drawn from `seed` (the attributed run's is seed 0)."""
        return make_mlp(seed, self.hidden)

    def test_metric(self, model: nn.Module) -> float:
        """Accuracy on every test digit of the query classes."""
        xt, yt = self.data.test.tensors
        with torch.no_grad():
            return float((model(xt).argmax(1) == yt).float().mean())

    def train(self, indices: list[int] | None, seed: int) -> nn.Module:
        """The retraining function for source_fast.eval: stage 0 on `indices` only, from an
        initialisation and a data order of their own for every (subset, seed), as the LDS protocol
        retrains (Park et al. 2023): a shared initialisation or order would make retrainings agree
        more than independent training runs do."""
        key = json.dumps([seed, None if indices is None else sorted(int(i) for i in indices)]).encode()
        run_seed = int(hashlib.sha256(key).hexdigest()[:8], 16)
        return run_training(self, indices, run_seed, init_seed=run_seed).model

    def measure(self, model: nn.Module) -> Tensor:
        """f for every query (evaluated, then held-out): its cross-entropy loss, (n_query + n_heldout,)."""
        x, y = self.data.queries.tensors
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y, reduction="none").double()

    def margins(self, count: int, model: nn.Module) -> Tensor:
        """The first `count` evaluated queries' margins: true-class logit − best other logit, (count,).
        Positive when the query is classified correctly; a sign change is a flipped prediction."""
        x, y = self.data.queries.tensors
        with torch.no_grad():
            logits = model(x[:count]).double()
        true = logits.gather(1, y[:count, None])[:, 0]
        return true - logits.scatter(1, y[:count, None], -math.inf).amax(1)

    def removal_measure(self, count: int, model: nn.Module) -> Tensor:
        """What subset removal measures for the first `count` evaluated queries (`removal_kind`)."""
        return self.margins(count, model)


@dataclass(frozen=True)
class RegressionScenario(Scenario):
    """Diabetes regression (scikit-learn's 442 patients, 10 standardised features, the standardised
    disease progression as target): `n_train` attributed examples, the rest are queries. The
    measurement is the query's ½ squared error; subset removal reports its change."""

    classification = False
    metric_name = "R²"
    removal_kind = "change"

    @property
    def data(self) -> ScenarioData:
        return _diabetes_data(self)

    @property
    def task(self) -> Task:
        return RegressionTask()

    def make_model(self, seed: int = 0) -> nn.Module:
        return make_mlp(seed, self.hidden, d_in=10, d_out=1)

    def measure(self, model: nn.Module) -> Tensor:
        """f for every query (evaluated, then held-out): ½ (prediction − target)², (n_query + n_heldout,)."""
        x, y = self.data.queries.tensors
        with torch.no_grad():
            return (0.5 * (model(x).squeeze(-1) - y) ** 2).double()

    def test_metric(self, model: nn.Module) -> float:
        """R² on every test patient (the queries and the rest of the test split)."""
        xt, yt = self.data.test.tensors
        with torch.no_grad():
            return float(1 - ((model(xt).squeeze(-1) - yt) ** 2).mean() / yt.var(unbiased=False))

    def removal_measure(self, count: int, model: nn.Module) -> Tensor:
        return self.measure(model)[:count]


@dataclass
class ScenarioData:
    stages: list[TensorDataset]  # the training data of each stage (labels as trained on)
    queries: TensorDataset  # n_query evaluated, then n_heldout held-out test examples
    test: TensorDataset  # every test example (of the query classes): the test metric
    images: Tensor | None = None  # (N_0, 8, 8) raw pixels of the attributed (stage 0) digits
    query_images: Tensor | None = None  # (n_query + n_heldout, 8, 8)


@functools.lru_cache(maxsize=8)
def _scenario_data(sc: Scenario) -> ScenarioData:
    raw, labels, tr, te = _digits_split(sc.n_train, sc.n_test, seed=0)
    mean, std = raw[tr].mean(0), raw[tr].std(0) + 0.1
    x, y = (raw[tr] - mean) / std, labels[tr].clone()
    if sc.label_noise:
        g = torch.Generator().manual_seed(1)
        noisy = torch.rand(len(y), generator=g) < sc.label_noise
        y[noisy] = torch.randint(10, (len(y),), generator=g)[noisy]
    stages, stage0 = [], None
    for s, stage in enumerate(sc.stages):
        keep = torch.isin(y, torch.tensor(stage.classes))
        stages.append(TensorDataset(x[keep], y[keep]))
        if s == 0:
            stage0 = keep
    in_query = torch.isin(labels[te], torch.tensor(sc.query_classes))
    te = te[in_query]
    n_q = sc.n_query + sc.n_heldout
    if len(te) < n_q:
        raise ValueError(f"scenario {sc.name!r} needs {n_q} test digits of classes {sc.query_classes}, has {len(te)}")
    xq, yq = (raw[te] - mean) / std, labels[te]
    return ScenarioData(
        stages, TensorDataset(xq[:n_q], yq[:n_q]), TensorDataset(xq, yq), raw[tr][stage0].reshape(-1, 8, 8),
        raw[te[:n_q]].reshape(-1, 8, 8),
    )


@functools.lru_cache(maxsize=4)
def _diabetes_data(sc: RegressionScenario) -> ScenarioData:
    """A seeded split of diabetes, features and target standardised with the training split's
    statistics; the first n_query + n_heldout test patients are the queries."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[: sc.n_train], perm[sc.n_train : sc.n_train + sc.n_test]
    n_q = sc.n_query + sc.n_heldout
    if len(te) < n_q:
        raise ValueError(f"scenario {sc.name!r} needs {n_q} test patients, has {len(te)}")
    x = (x - x[tr].mean(0)) / x[tr].std(0)
    y = (y - y[tr].mean()) / y[tr].std()
    queries = TensorDataset(x[te[:n_q]], y[te[:n_q]])
    return ScenarioData([TensorDataset(x[tr], y[tr])], queries, TensorDataset(x[te], y[te]))


@dataclass
class Run:
    model: nn.Module
    checkpoints: list[list[dict]]  # per stage
    lrs: list[list[float]]  # per stage, per step
    batches: list[list[int]]  # per step, indices into the stages' data concatenated
    init: dict
    test_metric: float  # the scenario's metric_name on its test split


def run_training(sc: Scenario, indices: list[int] | None = None, seed: int = 0, init_seed: int = 0) -> Run:
    """SGD with momentum through the stages, a warm-up/cosine schedule per stage, `sc.checkpoints`
    state_dicts saved evenly in each. Stage 0 uses only `indices` (None: all); the data order is drawn
    from `seed`, the initialisation from `init_seed`. One optimizer runs through every stage, so
    momentum carries across the boundary (as the exact unrolled reference replays it, and as
    _trajectory tells SOURCE with lrs_after)."""
    data = sc.data
    model = sc.make_model(init_seed)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=sc.stages[0].lr, momentum=sc.momentum)
    task = sc.task
    g = torch.Generator().manual_seed(seed)
    checkpoints, all_lrs, batches, offset = [], [], [], 0
    for s, (stage, ds) in enumerate(zip(sc.stages, data.stages)):
        x, y = ds.tensors
        pool = torch.as_tensor(indices, dtype=torch.long) if s == 0 and indices is not None else torch.arange(len(ds))
        n = len(pool)
        total = stage.epochs * math.ceil(n / sc.batch_size)
        lrs = schedule(total, stage.lr, max(1, total // 10))
        save_at = {round((c + 1) * total / sc.checkpoints) for c in range(sc.checkpoints)}
        saved, step = [], 0
        for _ in range(stage.epochs):
            order = pool[torch.randperm(n, generator=g)]
            for i in range(0, n, sc.batch_size):
                idx = order[i : i + sc.batch_size]
                for group in opt.param_groups:
                    group["lr"] = lrs[step]
                opt.zero_grad()
                (task.compute_train_loss((x[idx], y[idx]), model) / len(idx)).backward()
                opt.step()
                step += 1
                batches.append((idx + offset).tolist())
                if step in save_at:
                    saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        checkpoints.append(saved)
        all_lrs.append(lrs)
        offset += len(ds)
    return Run(model, checkpoints, all_lrs, batches, init, sc.test_metric(model))


def scenarios(quick: bool) -> list[Scenario]:
    """The four scenarios; `quick` shrinks them for a smoke test. Exact unrolling of several data
    orders is run where training is short (tens of steps), so it costs seconds."""
    out = [
        Scenario("standard", "standard (converged)", (Stage(ALL_CLASSES, epochs=15),), removal_k=40),
        Scenario("non_converged", "non-converged (30% noisy labels)", (Stage(ALL_CLASSES, epochs=3),), label_noise=0.3,
                 unroll_orders=4),
        Scenario(
            "multi_stage", "multi-stage (pretrain 0-4, fine-tune 5-9)",
            (Stage((0, 1, 2, 3, 4), epochs=10), Stage((5, 6, 7, 8, 9), epochs=3)), query_classes=(5, 6, 7, 8, 9),
        ),
        # 5 epochs is about where the test error bottoms out (R² 0.56; training error is still
        # falling and keeps doing so for tens of epochs while the test error rises): the early-
        # stopped model a practitioner keeps, and a run the influence function's optimum does not fit.
        RegressionScenario("regression", "regression (diabetes, early-stopped)", (Stage((), epochs=5),),  # no classes
                           n_train=300, n_test=142, n_query=100, n_heldout=42, hidden=32, batch_size=32,
                           unroll_orders=4, removal_k=15),
    ]
    if quick:
        out = [
            replace(sc, n_train=300, n_query=16, n_heldout=8, hidden=32, checkpoints=3,
                    unroll_orders=min(sc.unroll_orders, 3), removal_k=min(sc.removal_k, 10),
                    stages=tuple(replace(st, epochs=max(1, st.epochs // 3)) for st in sc.stages))
            for sc in out
        ]
    return out


# ---- attribution ---------------------------------------------------------------------------------


def _save_checkpoints(folder: Path, run: Run) -> list[list[Path]]:
    from safetensors.torch import save_file

    files = []
    for s, states in enumerate(run.checkpoints):
        files.append([])
        for c, state in enumerate(states):
            path = folder / f"stage{s}_checkpoint_{c}.safetensors"
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            files[-1].append(path)
    with atomic_path(folder / "lrs.json") as tmp:
        tmp.write_text(json.dumps(run.lrs))
    return files


def _trajectory(sc: Scenario, files: list[list[Path]], run: Run, per_stage: int) -> Trajectory:
    """`per_stage` segments in each stage, each carrying its stage's data and real learning rates; the
    one optimizer's momentum buffer carries a stage's last gradients into the next stage's steps."""
    segments = []
    for s, ds in enumerate(sc.data.stages):
        later = [lr for lrs in run.lrs[s + 1 :] for lr in lrs]
        segments += Trajectory.even(files[s], run.lrs[s], per_stage, ds, momentum=sc.momentum, lrs_after=later,
                                    continued=s > 0).segments
    return Trajectory(segments)


def same_class_scores(train_labels: Tensor, query_labels: Tensor) -> Tensor:
    """The sanity floor: +1/N when a training digit has the query's class (removing it should raise
    the query's loss), 0 otherwise; (n_query, N). Giving −1/N to the other classes would change
    nothing: every subset leaves out the same number of examples, so the prediction only shifts."""
    return (query_labels[:, None] == train_labels[None, :]).double() / len(train_labels)


@dataclass
class Attribution:
    scores: dict[str, Tensor]  # method → (n_query, N_0) on the evaluated queries
    # method → {setting: scores of every query}: settings chosen on the held-out queries
    heldout: dict[str, dict[str, Tensor]]
    factors_source: Factors
    if_factors: Factors
    implied_damping: float  # 1/c of the whole run
    seconds: dict[str, float]
    # (n_query, N_0): the mean of the exact unrolled scores of `sc.unroll_orders` other data orders
    # (None where the scenario runs none)
    unroll_mean: Tensor | None = None


SOURCE_L3, IF_IMPLIED, IF_TUNED = "SOURCE (L=3)", "IF (damping 1/c)", "IF (held-out damping)"
TRAK_ALL = "TRAK, C checkpoints"
TUNED = {"IF": IF_TUNED, "TRAK": "TRAK (held-out dim, damping)",
         TRAK_ALL: "TRAK, C checkpoints (held-out dim, damping)"}
UNROLL_ORDERS = "unroll, other data orders"


def _bar(iterable=None, **kwargs):
    """The demo's own progress bars, on a terminal only: in a log, the library's bars drawn under them
    leave cursor-up codes, and every scenario prints its results anyway."""
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, disable=not sys.stderr.isatty(), **kwargs)


def attribute(sc: Scenario, run: Run, folder: Path, *, grid: list[float], trak_grid: list[tuple[int, float]]
              ) -> Attribution:
    """Every method's scores of the attributed (stage 0) data against all queries; the influence
    function at every damping of `grid` and TRAK at every (dimension, damping) of `trak_grid` too,
    for the held-out choice (TRAK's defaults are a row of their own). Exact unrolling is affordable
    at these sizes (it dominates this step: about 0.3 s per query for the standard run). With
    `sc.unroll_orders` = R > 0, training is rerun from the same initialisation with the data orders
    of seeds 1..R (the original run is seed 0) and each run is unrolled: their mean is the reference
    SOURCE estimates, and leaving the original order out of it lets the "unroll" row show how far
    one order's exact scores are from it."""
    data = sc.data
    task, model, train = sc.task, run.model, data.stages[0]
    files = _save_checkpoints(folder / "checkpoints", run)
    traj1, traj3 = _trajectory(sc, files, run, 1), _trajectory(sc, files, run, min(3, sc.checkpoints))
    # The influence function sees one checkpoint, θ_T, with the curvature of the attributed data and
    # the whole run's horizon (damping "implied" = 1/c).
    final = Trajectory([Segment([files[-1][-1]], train, lr_sum=sum(s.horizon for s in traj1.segments))])
    nq = sc.n_query
    queries = data.queries
    out: dict[str, Tensor] = {}
    heldout: dict[str, dict[str, Tensor]] = {"IF": {}, "TRAK": {}, TRAK_ALL: {}}
    seconds: dict[str, float] = {}
    steps = ["SOURCE (L=1)", SOURCE_L3, "Fast-SOURCE (L=3)", "TracIn", "IF", "grad-dot", "TRAK", "unroll"]
    if sc.unroll_orders:
        steps.append(UNROLL_ORDERS)
    factors_source = if_factors = unroll_mean = None
    bar = _bar(steps, desc=f"{sc.name}: scoring", unit="method")
    for step in bar:
        bar.set_postfix_str(step)
        t0 = time.perf_counter()
        if step == "SOURCE (L=1)":
            f1 = fit_factors(model, task, traj1)
            s = score(model, task, traj1, f1, train, queries, method="source")
        elif step == SOURCE_L3:
            factors_source = fit_factors(model, task, traj3)
            factors_source.save(folder / "factors_source")
            s = score(model, task, traj3, factors_source, train, queries, method="source")
        elif step == "Fast-SOURCE (L=3)":
            fast = fit_factors(model, task, traj3, average_params=True)
            s = score(model, task, traj3, fast, train, queries, method="fast_source")
        elif step == "TracIn":
            s = score(model, task, traj3, None, train, queries, method="tracin")
        elif step == "IF":
            if_factors = fit_factors(model, task, final)
            if_factors.save(folder / "factors_ekfac")
            out[IF_IMPLIED] = score(model, task, final, if_factors, train, queries, method="ekfac", damping="implied")[:nq]
            for lam in grid:
                heldout["IF"][f"λ={lam:g}"] = score(
                    model, task, final, if_factors, train, queries, method="ekfac", damping=lam
                )
            seconds[step] = time.perf_counter() - t0
            continue
        elif step == "grad-dot":
            s = score(model, task, final, None, train, queries, method="grad_dot")
        elif step == "TRAK":
            s = score(model, task, final, None, train, queries, method="trak")
            for dim in dict.fromkeys(d for d, _ in trak_grid):  # one pass per dimension, for all its dampings
                lams = [lam for d, lam in trak_grid if d == dim]
                # and TRAK's ensemble over the checkpoints SOURCE reads (every stage's), for a comparison on
                # equal inputs
                for key, trajectory, options in (("TRAK", final, {}), (TRAK_ALL, traj3, {"train_segments": "all"})):
                    scores = score(model, task, trajectory, None, train, queries, method="trak", trak_dim=dim,
                                   damping=lams, **options)
                    heldout[key].update({f"dim={dim}, λ={lam:g}": t for lam, t in zip(lams, scores)})
        elif step == "unroll":
            s = _unroll(sc, run, model, task)
        else:
            runs = (run_training(sc, None, seed) for seed in range(1, sc.unroll_orders + 1))
            unroll_mean = sum(_unroll(sc, other, other.model, task) for other in runs) / sc.unroll_orders
            seconds[step] = time.perf_counter() - t0
            continue
        out[step] = s[:nq]
        seconds[step] = time.perf_counter() - t0
    if sc.classification:
        same = same_class_scores(train.tensors[1], queries.tensors[1][:nq])
        if same.any():  # multi-stage: no pretraining digit shares a query's class, nothing to rank
            out["same class"] = same
    assert factors_source is not None and if_factors is not None
    return Attribution(out, heldout, factors_source, if_factors, 1.0 / final.segments[0].horizon, seconds, unroll_mean)


def _unroll(sc: Scenario, run: Run, model: nn.Module, task: Task, chunk: int = 25) -> Tensor:
    """Exact unrolled differentiation of the recorded run, for the evaluated queries, (n_query, N_0).
    Later stages' examples get their own ε too (the stages' data concatenated); only stage 0's
    columns are kept. Queries go in chunks for a progress bar (each chunk replays training)."""
    stages = sc.data.stages
    every = TensorDataset(*(torch.cat(t) for t in zip(*(ds.tensors for ds in stages))))
    final = Trajectory([Segment([run.checkpoints[-1][-1]], every, lr_sum=1.0)])
    record = TrainingRecord(run.init, run.batches, [lr for lrs in run.lrs for lr in lrs], momentum=sc.momentum)
    parts = []
    with _bar(total=sc.n_query, desc=f"{sc.name}: exact unrolling", unit="query", leave=False) as bar:
        for start in range(0, sc.n_query, chunk):
            q = Subset(sc.data.queries, range(start, min(sc.n_query, start + chunk)))
            parts.append(score(model, task, final, None, every, q, method="unroll", record=record)[:, : len(stages[0])])
            bar.update(len(q))
    return torch.cat(parts)


# ---- evaluation ------------------------------------------------------------------------------------


def _settings_key(sc: Scenario, extra: dict) -> tuple[dict, str]:
    """The settings a retraining cache is checked against, and the folder name they hash to. Everything
    the cache checks is in the name, so a rerun with other settings gets a folder of its own instead
    of a refusal; the code of this module and eval's is in it too, so an edit never reuses old runs."""
    settings = {"scenario": asdict(sc), "code": _code_digest(), **extra}
    return settings, hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


@functools.cache
def _code_digest() -> str:
    """This module, eval and the losses training optimises, and the libraries training runs on."""
    import sklearn

    from . import task as task_module
    from . import tasks

    h = hashlib.sha256()
    for module in (__file__, ev.__file__, tasks.__file__, task_module.__file__):
        h.update(Path(module).read_bytes())
    h.update(f"torch {torch.__version__} sklearn {sklearn.__version__}".encode())
    return h.hexdigest()[:16]


def evaluate(sc: Scenario, att: Attribution, folder: Path, *, subsets: int, seeds: int, pool) -> dict:
    """Retrains on random halves, then the LDS of every method (and the held-out damping choice);
    where the scenario unrolled other data orders, each method's rank agreement with their mean."""
    n0 = len(sc.data.stages[0])
    subs = ev.random_subsets(n0, subsets, alpha=0.5, seed=0)
    settings, key = _settings_key(sc, {"alpha": 0.5, "subsets": ev.subsets_digest(subs), "seeds": seeds})
    measured = ev.retrain(
        sc.train, sc.measure, subs, seeds=list(range(seeds)), cache_dir=folder / f"retraining-{key}",
        executor=pool, settings=settings, desc=f"{sc.name}: retraining",
    )
    nq = sc.n_query
    evaluated, held = measured[..., :nq], measured[..., nq:]
    heldout_lds = {m: {k: ev.lds(s[nq:], subs, held).mean for k, s in grid.items()} for m, grid in att.heldout.items()}
    chosen = {m: max(lds, key=lds.get) for m, lds in heldout_lds.items()}
    for m, setting in chosen.items():
        att.scores[TUNED[m]] = att.heldout[m][setting][:nq]
    results = {name: ev.lds(s, subs, evaluated) for name, s in att.scores.items()}
    paired = {
        f"{SOURCE_L3} − {IF_IMPLIED}": ev.paired_difference(results[SOURCE_L3], results[IF_IMPLIED]),
        f"{SOURCE_L3} − {IF_TUNED}": ev.paired_difference(results[SOURCE_L3], results[IF_TUNED]),
        f"{SOURCE_L3} − {TUNED[TRAK_ALL]}": ev.paired_difference(results[SOURCE_L3], results[TUNED[TRAK_ALL]]),
    }
    out = {
        "lds": results, "paired": paired, "heldout_lds": heldout_lds, "chosen": chosen,
        "seed_agreement": _seed_agreement(measured[..., :nq]),
        "implied_damping": att.implied_damping,
        "subsets": subsets, "seeds": seeds, "n_train": n0,
    }
    if att.unroll_mean is not None:
        out["unroll_orders"] = sc.unroll_orders
        out["rho_unroll"] = {name: ev.rank_agreement(s, att.unroll_mean) for name, s in att.scores.items()}
    return out


def _seed_agreement(measured: Tensor) -> float | None:
    """How alike two retrainings of the same subsets are: per query, the Spearman correlation over
    subsets between two seeds' measurements, averaged over queries and seed pairs (None with one
    seed). A reproducibility measure of one retraining, not a bound on LDS, which is scored
    against the mean of all seeds (less noisy than one)."""
    seeds = measured.shape[1]
    pairs = [(a, b) for a in range(seeds) for b in range(a + 1, seeds)]
    if not pairs:
        return None
    return float(sum(ev.spearman_rows(measured[:, a].T, measured[:, b].T).mean() for a, b in pairs) / len(pairs))


def removal(sc: Scenario, att: Attribution, folder: Path, *, count: int, seeds: int, pool) -> dict:
    """Subset removal on the first `count` evaluated queries: retrain without each query's
    `sc.removal_k` top proponents under SOURCE and the influence function, or as many random
    examples; the change in what `sc.removal_measure` measures (digits: the true-class margin, with
    the flip rate of the predictions; regression: the query's ½ squared error)."""
    chosen = {m: att.scores[m][:count] for m in (SOURCE_L3, IF_IMPLIED)}
    # The removed sets come from the scores: a change in scoring must not meet old retrainings.
    scores = hashlib.sha256(b"".join(s.double().cpu().numpy().tobytes() for s in chosen.values())).hexdigest()[:16]
    settings, key = _settings_key(sc, {"count": count, "scores": scores, "seeds": seeds})
    out = ev.subset_removal(
        chosen, sc.train, functools.partial(sc.removal_measure, count), sc.removal_k, kind=sc.removal_kind,
        seeds=list(range(seeds)), cache_dir=folder / f"removal-{key}", executor=pool, settings=settings,
    )
    return {"scenario": sc.title, "kind": sc.removal_kind, "k": sc.removal_k, "queries": count, "seeds": seeds,
            "methods": out}


# ---- reports -------------------------------------------------------------------------------------


def _fmt(iv: ev.Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{iv.mean:{sign}.3f} [{iv.low:{sign}.3f}, {iv.high:{sign}.3f}]"


def lds_markdown(report: dict) -> str:
    """The LDS table (methods × scenarios, with a column of rank agreement with exact unrolling
    after the LDS of scenarios that have one), the paired differences, the settings and the subset
    removals, as Markdown."""
    names = list(report["scenarios"])
    scs = [report["scenarios"][n] for n in names]
    heads = [r["title"] for r in scs]
    methods = list(dict.fromkeys(m for r in scs for m in r["lds"]))
    # (header, {method: Interval}) per column: each scenario's LDS, then its ρ vs unroll if any
    columns = []
    for r in scs:
        columns.append((r["title"], r["lds"]))
        if "rho_unroll" in r:
            columns.append((f"{r['title']}: ρ vs unroll (mean of {r['unroll_orders']} orders)", r["rho_unroll"]))
    quick = ["**A --quick run: a smoke test.** Its models, retrainings and query counts are too small for its numbers",
             "to rank the methods; the full run's are in the README.", ""] if report.get("quick") else []
    lines = [
        *quick,
        "## Linear datamodeling score (LDS)",
        "",
        "Spearman correlation between predicted and retrained query losses (digits: cross-entropy;",
        "regression: ½ squared error) over random halves of the attributed data, each retrained from its",
        "own random initialisation and data order (seed-averaged); mean over the evaluated",
        "queries with a 95% bootstrap interval over queries. \"ρ vs unroll\" columns: per query, the",
        "Spearman correlation over training examples between the method's scores and the mean of the",
        "exact unrolled scores of R other data orders (each rerun from the same initialisation); same mean",
        "and interval.",
        "",
        "| method | " + " | ".join(h for h, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for m in methods:
        cells = [_fmt(col[m]) if m in col else "—" for _, col in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    paired = list(dict.fromkeys(p for r in scs for p in r["paired"]))
    lines += [
        "", "Paired differences (same queries resampled for both methods):", "",
        "| difference | " + " | ".join(heads) + " |", "|---|" + "---|" * len(names),
    ]
    for p in paired:
        lines.append(f"| {p} | " + " | ".join(_fmt(r["paired"][p], True) for r in scs) + " |")
    lines += ["", "| setting | " + " | ".join(heads) + " |", "|---|" + "---|" * len(names)]
    rows = [
        ("attributed training examples", lambda r: str(r["n_train"])),
        ("subsets × seeds retrained", lambda r: f"{r['subsets']} × {r['seeds']}"),
        ("evaluated / held-out queries", lambda r: f"{r['n_query']} / {r['n_heldout']}"),
        ("test metric (digits: of the query classes)", lambda r: f"{r['test_metric_name']} {r['test_metric']:.3f}"),
        ("IF damping 1/c (implied)", lambda r: f"{r['implied_damping']:.3g}"),
        ("IF damping chosen on held-out queries", lambda r: r["chosen"]["IF"].removeprefix("λ=")),
        ("TRAK dimension, damping chosen on held-out queries", lambda r: r["chosen"]["TRAK"]),
        ("the same for TRAK over the C checkpoints", lambda r: r["chosen"][TRAK_ALL]),
        ("retraining seed agreement (Spearman of two seeds' losses)",
         lambda r: "—" if r["seed_agreement"] is None else f"{r['seed_agreement']:.3f}"),
        ("data orders unrolled for ρ vs unroll", lambda r: str(r.get("unroll_orders", "—"))),
    ]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in scs) + " |")
    lines += [
        "",
        "L = segments per training stage. \"same class\" scores +1/N for training digits of the query's",
        "(trained-on) class: a sanity floor (— where no attributed digit shares a query's class). unroll =",
        "exact unrolled differentiation of the recorded run (one data order; its ρ vs unroll compares it with",
        "the other orders' mean, so it shows how noisy one order is). IF = EK-FAC influence at θ_T.",
    ]
    for rem in report.get("removal", {}).values():
        flip = rem["kind"] == "flip"
        lines += [
            "",
            f"## Subset removal ({rem['scenario']}): retrain without each query's top {rem['k']} proponents",
            "",
            f"{rem['queries']} evaluated queries, {rem['seeds']} seed(s) each"
            + ("; a flip = a query classified right with all the data is wrong after the removal (rate over "
               "the queries right at first)." if flip else
               "; proponents are predicted to raise the query's error when removed."),
            "",
            "| removed | flip rate | change in true-class margin |" if flip else
            "| removed | change in ½ squared error |",
            "|---|---|---|" if flip else "|---|---|",
        ]
        for m, r in rem["methods"].items():
            label = m if m != "random" else f"{rem['k']} random examples"
            flips = (" — |" if r.flip_rate is None else f" {r.flip_rate:.2f} |") if flip else ""
            lines.append(f"| {label} |{flips} {_fmt(r.change, True)} |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, (ev.Interval, ev.Removal)):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _color(method: str) -> str:
    return "tab:blue" if "SOURCE" in method else "tab:orange" if method.startswith("IF") else "tab:gray"


def plot_lds(report: dict, path: Path) -> None:
    """One panel per scenario: each method's LDS with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    methods = list(dict.fromkeys(m for n in names for m in report["scenarios"][n]["lds"]))
    size = (4.2 * len(names), 0.38 * len(methods) + 1.6)
    fig, axes = plt.subplots(1, len(names), figsize=size, sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        res = report["scenarios"][n]["lds"]
        ys = [i for i, m in enumerate(methods) if m in res]
        iv = [res[methods[i]] for i in ys]
        ax.barh(ys, [v.mean for v in iv], color=[_color(methods[i]) for i in ys],
                xerr=[[v.mean - v.low for v in iv], [v.high - v.mean for v in iv]], capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(report["scenarios"][n]["title"], fontsize=10)
        ax.set_xlabel("LDS (Spearman)")
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_proponents(images: Tensor, labels: Tensor, query_images: Tensor, query_labels: Tensor,
                    scores: dict[str, Tensor], queries: list[int], top: int, path: Path) -> None:
    """Per query and method a row: the query digit, its `top` proponents (highest scores: removing
    them raises its loss most) and its `top` opponents (lowest scores). images: (N, 8, 8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(q, m) for q in queries for m in scores]
    cols = 2 + 2 * top
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.05 * cols, 1.25 * len(rows)), squeeze=False)
    for r, (q, m) in enumerate(rows):
        s = scores[m][q]
        cells = [("query", query_images[q], f"query: a {int(query_labels[q])}\n{m}")] + [("gap", None, "")]
        cells += [("pro", images[i], f"+ a {int(labels[i])}\n{float(s[i]):.1e}") for i in s.topk(top).indices.tolist()]
        cells += [("con", images[i], f"− a {int(labels[i])}\n{float(s[i]):.1e}") for i in (-s).topk(top).indices.tolist()]
        for c, (kind, img, title) in enumerate(cells):
            ax = axes[r][c]
            ax.axis("off")
            if img is None:
                continue
            ax.imshow(img, cmap="gray_r" if kind != "con" else "Reds", vmin=0, vmax=1)
            ax.set_title(title, fontsize=6.5)
    fig.suptitle("top proponents (+, gray) and opponents (−, red) of query digits", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _distinct_classes(labels: Tensor, count: int) -> list[int]:
    """The first query of each class, up to `count` of them: a varied set of digits to show."""
    firsts: dict[int, int] = {}
    for q, y in enumerate(labels.tolist()):
        firsts.setdefault(y, q)
    return sorted(firsts.values())[:count]


def _print_proponents(att: Attribution, train: TensorDataset, queries: TensorDataset, count: int, top: int) -> list[dict]:
    """The original demo's listing: each query's top proponents and opponents under SOURCE and IF."""
    labels = train.tensors[1]
    entries = []
    for q in range(count):
        qlabel = int(queries.tensors[1][q])
        entry = {"query": q, "label": qlabel}
        print(f"\nquery {q} (a {qlabel}): training digits whose removal would most raise (+) or lower (−) its loss")
        for method in (SOURCE_L3, IF_IMPLIED):
            s = att.scores[method]
            pro, con = s[q].topk(top).indices.tolist(), (-s[q]).topk(top).indices.tolist()
            fmt = lambda idx: ", ".join(f"#{i} (a {int(labels[i])}, {float(s[q, i]):+.2e})" for i in idx)  # noqa: E731
            print(f"  {method:>16} proponents: {fmt(pro)}")
            print(f"  {method:>16} opponents:  {fmt(con)}")
            entry[method] = {"proponents": pro, "opponents": con}
        entries.append(entry)
    return entries


# ---- main ------------------------------------------------------------------------------------------


def main(
    out: str | Path = "source_fast_demo",
    quick: bool = False,
    *,
    workers: int = 2,
    subsets: int | None = None,
    seeds: int | None = None,
    only: list[str] | None = None,
    queries: int = 4,
    top: int = 3,
) -> dict:
    """Runs the scenarios (all, or those named in `only`), writes the report into `out` and returns it.

    subsets / seeds: retrainings per scenario (default 100 × 3; --quick 12 × 1).
    workers: retraining processes.
    """
    out = Path(out)
    t0 = time.perf_counter()
    n_subsets = subsets or (12 if quick else 100)
    n_seeds = seeds or (1 if quick else 3)
    grid = [1e-3, 1e-2, 1e-1] if quick else [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    trak_grid = [(dim, lam) for dim in ((256, 1024) if quick else (256, 1024, 4096))
                 for lam in ((1e-3, 1e-2) if quick else (1e-4, 1e-3, 1e-2, 1e-1))]
    chosen = [sc for sc in scenarios(quick) if only is None or sc.name in only]
    if not chosen:
        raise ValueError(f"no scenario named {only}; valid: {[sc.name for sc in scenarios(quick)]}")
    with sole_writer(out, "demo", None):  # two demos into one folder would race for every file in it
        _remove_stale_temps(out)
        return _run(out, chosen, quick, grid, trak_grid, n_subsets, n_seeds, workers, queries, top, t0)


def _remove_stale_temps(out: Path) -> None:
    """What a killed demo leaves: the temp files of its atomic writes (safetensors' own among them
    beside the checkpoints). A killed Factors.save's temps are its next save's to remove."""
    # Only the demo's own files: --out may be a folder of the user's (".") whose other subfolders hold
    # other programs' temp files, live ones among them.
    report = [own_temps(name) for name in ("lds.md", "lds.json", "lds.png", "summary.json", "proponents.png")]
    folders = [sc.name for sc in scenarios(quick=False)]  # --quick shrinks the scenarios, not their names
    remove_stale_temps(out, *report, *(f"{name}/{pattern}" for name in folders for pattern in (
        own_temps(), f"checkpoints/{own_temps()}", f"checkpoints/{SAFETENSORS_TEMP}")))


def _run(out, chosen, quick, grid, trak_grid, n_subsets, n_seeds, workers, queries, top, t0) -> dict:
    # These models are tiny: one thread per process beats threads contending for shared cores, and
    # the retraining workers run in parallel anyway.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report: dict = {"scenarios": {}, "quick": quick}
    summary: dict = {}
    pool = ev.worker_pool(workers) if workers > 1 else None  # started now: workers import while we train
    try:
        for sc in chosen:
            folder = out / sc.name
            stages = [f"{len(ds)} examples × {st.epochs} epochs" for st, ds in zip(sc.stages, sc.data.stages)]
            print(f"\n=== {sc.title}: {sc.hidden}-unit MLP, SGD + momentum {sc.momentum}, warm-up + cosine, "
                  f"stages {stages}")
            ts = time.perf_counter()
            run = run_training(sc)
            print(f"  test {sc.metric_name} {run.test_metric:.3f}; checkpoints in {folder / 'checkpoints'}")
            att = attribute(sc, run, folder, grid=grid, trak_grid=trak_grid)
            result = evaluate(sc, att, folder, subsets=n_subsets, seeds=n_seeds, pool=pool)
            result.update(title=sc.title, test_metric=run.test_metric, test_metric_name=sc.metric_name,
                          n_query=sc.n_query, n_heldout=sc.n_heldout, score_seconds=att.seconds)
            rho = result.get("rho_unroll", {})
            for m, iv in result["lds"].items():
                print(f"  LDS {m:<22} {_fmt(iv)}" + (f"   ρ vs unroll {_fmt(rho[m])}" if m in rho else ""))
            if sc.name == "standard":
                data = sc.data
                summary = {"test_accuracy": run.test_metric,
                           "queries": _print_proponents(att, data.stages[0], data.queries, min(queries, sc.n_query), top)}
                rank = [torch.corrcoef(torch.stack([att.scores[SOURCE_L3][q], att.scores[IF_IMPLIED][q]]))[0, 1].item()
                        for q in range(min(queries, sc.n_query))]
                summary["pearson_source_vs_ekfac"] = rank
                print(f"\nPearson correlation of SOURCE and EK-FAC scores per query: {', '.join(f'{r:.2f}' for r in rank)}")
                plot_proponents(data.images, data.stages[0].tensors[1], data.query_images, data.queries.tensors[1],
                                {"SOURCE": att.scores[SOURCE_L3], "IF": att.scores[IF_IMPLIED]},
                                _distinct_classes(data.queries.tensors[1][: sc.n_query], 3), 5, out / "proponents.png")
            if sc.removal_k:
                report.setdefault("removal", {})[sc.name] = removal(
                    sc, att, folder, count=min(sc.n_query, 8 if quick else 40), seeds=min(n_seeds, 2), pool=pool
                )
            result["seconds"] = time.perf_counter() - ts
            report["scenarios"][sc.name] = result
            print(f"  {sc.name} done in {result['seconds']:.0f} s")
        report["seconds"] = time.perf_counter() - t0
        table = lds_markdown(report)
        with atomic_path(out / "lds.md") as tmp:
            tmp.write_text(table)
        with atomic_path(out / "lds.json") as tmp:
            tmp.write_text(json.dumps(_jsonable(report), indent=1))
        plot_lds(report, out / "lds.png")
        summary["seconds"] = report["seconds"]
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)
    print("\n" + table)
    smoke = " (--quick: a smoke test, too small to rank the methods)" if quick else ""
    print(f"done in {report['seconds']:.0f} s{smoke}; outputs in {out.resolve()}:")
    for name in ("lds.md", "lds.json", "lds.png", "proponents.png", "summary.json"):
        if (out / name).exists():
            print(f"  {out.resolve() / name}")
    print(f"  {out.resolve()}/<scenario>/: checkpoints, factors, retraining caches")
    return report
