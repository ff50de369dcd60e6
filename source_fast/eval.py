"""Evaluating attributions against real retraining: the linear datamodeling score (LDS) and
subset removal.

    subsets = random_subsets(n_train, 50)                      # kept examples, α = 0.5 of the data
    measured = retrain(train_fn, measure_fn, subsets, seeds=[0, 1], cache_dir="runs", workers=2)
    result = lds(scores, subsets, measured)                    # mean Spearman, 95% bootstrap interval

`train_fn(indices, seed)` trains on the listed training examples and returns a model (or anything
`measure_fn` accepts, e.g. a state_dict); `measure_fn(model)` returns f for every query, a
(n_query,) tensor. torch's RNG is seeded anew for every (subset, seed) (`run_seed`), so a train_fn
drawing its initialisation and data order from it retrains independently each time. With workers > 1 both run in spawned processes, so they must be picklable:
module-level functions, `functools.partial` of them, or methods of picklable objects; and a
script that starts workers needs the `if __name__ == "__main__":` guard (spawn re-imports it).

Every finished retraining is cached on disk as its own small file (written atomically: temp file,
then rename), so an interrupted run resumes without redoing or losing one.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ._dist import sole_writer
from ._io import atomic_path, own_temps, remove_stale_temps
from ._warn import warn

CACHE_FORMAT = "source_fast.retrain"
CACHE_VERSION = 2  # 2: torch's RNG seeded per (subset, seed), run_seed

TrainFn = Callable[[list[int], int], Any]
MeasureFn = Callable[[Any], Tensor]


# ---- subsets and retraining --------------------------------------------------------------------


def random_subsets(n_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """`num_subsets` random subsets of range(n_train), each of round(alpha · n_train) examples
    (sorted indices of the KEPT examples), drawn from a generator seeded by `seed`."""
    if n_train < 2:
        raise ValueError(f"need at least 2 training examples, got {n_train}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha is the fraction of the data each subset keeps, in (0, 1); got {alpha}")
    if num_subsets < 2:
        raise ValueError(f"a rank correlation over subsets needs at least 2 of them, got {num_subsets}")
    size = min(n_train - 1, max(1, round(alpha * n_train)))
    g = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(n_train, generator=g)[:size].tolist()) for _ in range(num_subsets)]


def subsets_digest(subsets: Sequence[Sequence[int]]) -> str:
    """sha256 of the subsets (order and content): what a retraining cache is tied to."""
    h = hashlib.sha256()
    for s in subsets:
        h.update(json.dumps([int(i) for i in s]).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_seed(indices: Sequence[int], seed: int) -> int:
    """The seed of torch's RNG for the retraining of `indices` with `seed`: drawn from both, so a train_fn
    that initialises and orders its data from torch's generator gets its own draws for every (subset,
    seed), as independent training runs would. One draw per seed shared by all subsets makes the
    retrainings agree more than independent runs do (a review measured seed agreement 0.80 against
    0.45 on a wine MLP), which inflates the LDS's noise floor most."""
    key = json.dumps([int(seed), sorted(int(i) for i in indices)]).encode()
    return int(hashlib.sha256(key).hexdigest()[:15], 16)


def _run_one(train_fn: TrainFn, measure_fn: MeasureFn, indices: list[int], seed: int) -> Tensor:
    """One retraining and its measurements, (n_query,) float64 on the CPU. torch's RNG is seeded with
    run_seed(indices, seed) and restored afterwards, so inline and worker runs draw the same numbers."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(run_seed(indices, seed))
        out = measure_fn(train_fn(list(indices), seed))
    out = torch.as_tensor(out).detach().to("cpu", torch.float64)
    if out.dim() != 1:
        raise ValueError(f"measure_fn must return a (n_query,) tensor, got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():  # a diverged retraining would otherwise take a rank silently
        bad = torch.nonzero(~torch.isfinite(out)).flatten().tolist()
        raise FloatingPointError(f"retraining with seed {seed} on {len(indices)} examples measured non-finite "
                                 f"values for queries {bad[:8]}")
    return out


def _init_worker(threads: int, parent: int) -> None:
    # Several workers on a few cores: one BLAS thread each avoids oversubscription.
    torch.set_num_threads(threads)

    def exit_with_parent() -> None:
        # A killed parent leaves its workers running the queue's retrainings for nobody: go with it.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="source_fast: exit with the parent", daemon=True).start()


class _Cache:
    """One file per finished (subset, seed) under `root/runs`, plus `root/manifest.json` holding
    the settings the runs belong to; a cache made with other settings is refused. Made under
    retrain's lock of `root`: the temp files of a killed run's writes are removed."""

    def __init__(self, root: str | os.PathLike, manifest: dict):
        self.root = Path(root)
        remove_stale_temps(self.root, own_temps(), f"runs/{own_temps()}")
        path = self.root / "manifest.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"retraining cache manifest {path} is corrupted ({exc}); delete {self.root}") from None
            if old != manifest:
                diff = [k for k in sorted(set(old) | set(manifest)) if old.get(k) != manifest.get(k)]
                detail = "; ".join(
                    f"{k}: cache has {_short(old.get(k))}, this run has {_short(manifest.get(k))}" for k in diff
                )
                raise ValueError(
                    f"the retraining cache in {self.root} was made with different subsets or settings ({detail}). "
                    f"Use another cache_dir, or delete {self.root} to start over."
                )
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(manifest, indent=1))

    def path(self, i: int, seed: int) -> Path:
        return self.root / "runs" / f"subset{i:05d}_seed{seed}.pt"

    def load(self, i: int, seed: int) -> Tensor | None:
        """The cached measurement, or None: not retrained yet, or its file damaged since (files appear
        only by rename, complete, so that is a disk's or someone's doing): it is retrained, with a warning."""
        p = self.path(i, seed)
        if not p.exists():
            return None
        try:
            value = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 (a truncated zip, a bad pickle: whatever the reader says)
            value, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            why = "" if isinstance(value, Tensor) else f"it holds a {type(value).__name__}"
        if why:
            warn(f"{p} is damaged ({why}): retraining subset {i} with seed {seed} again")
            return None
        return value

    def save(self, i: int, seed: int, value: Tensor) -> None:
        with atomic_path(self.path(i, seed)) as tmp:
            torch.save(value, tmp)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def retrain(
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    subsets: Sequence[Sequence[int]],
    *,
    seeds: Sequence[int] = (0,),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    threads_per_worker: int = 1,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    desc: str = "retraining",
    executor: cf.Executor | None = None,
) -> Tensor:
    """Trains on every subset with every seed and measures the queries: a (M, R, n_query) float64
    tensor, measured[i, r] = measure_fn(train_fn(subsets[i], seeds[r])).

    cache_dir: every finished retraining is saved there as its own file, and a rerun loads those
        instead of retraining (resume after an interruption). The cache is tied to the subsets,
        the seeds and `settings` (JSON-serialisable: describe the training setup, e.g. epochs and
        learning rate, since functions cannot be compared); a mismatch raises ValueError, and
        so does a second retrain into a cache_dir while one is still running there. Under
        torch.distributed, call it on one rank: it is not split across ranks, and a retrain on
        every rank into one cache_dir is refused on all but one of them.
    workers: processes (spawned, each with `threads_per_worker` torch threads); 1 runs inline.
    executor: run on these workers instead (e.g. one `worker_pool` shared by several calls).
    If a retraining raises, the runs still in flight are finished and cached, then the error is
    re-raised.
    """
    subsets = [[int(i) for i in s] for s in subsets]
    seeds = [int(s) for s in seeds]
    if not subsets or not seeds:
        raise ValueError(f"nothing to retrain: {len(subsets)} subsets, {len(seeds)} seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"workers and threads_per_worker must be >= 1, got {workers}, {threads_per_worker}")
    # A second run into the same cache would redo every retraining this one has not saved yet, in parallel.
    one_writer = sole_writer(Path(cache_dir), "retrain", None) if cache_dir is not None else contextlib.nullcontext()
    with one_writer:
        cache = None
        if cache_dir is not None:
            manifest = {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "num_subsets": len(subsets),
                "subsets_sha256": subsets_digest(subsets),
                "seeds": seeds,
                "settings": json.loads(json.dumps(dict(settings or {}))),
            }
            cache = _Cache(cache_dir, manifest)
        results: dict[tuple[int, int], Tensor] = {}
        jobs = []
        for i in range(len(subsets)):
            for r, seed in enumerate(seeds):
                found = cache.load(i, seed) if cache is not None else None
                if found is None:
                    jobs.append((i, r))
                else:
                    results[(i, r)] = found
        bar = None
        if progress:
            from tqdm.auto import tqdm

            terminal = sys.stderr.isatty()  # into a log: a line every 30 s, not ten a second
            bar = tqdm(total=len(subsets) * len(seeds), initial=len(results), desc=desc, unit="run", dynamic_ncols=True,
                       mininterval=0.1 if terminal else 30.0)

        def finish(i: int, r: int, value: Tensor) -> None:
            if cache is not None:
                cache.save(i, seeds[r], value)
            results[(i, r)] = value
            if bar is not None:
                bar.update(1)

        try:
            if executor is not None:
                _run_jobs(executor, train_fn, measure_fn, subsets, seeds, jobs, finish)
            elif workers == 1 or len(jobs) <= 1:
                for i, r in jobs:
                    finish(i, r, _run_one(train_fn, measure_fn, subsets[i], seeds[r]))
            else:
                with worker_pool(workers, threads_per_worker) as pool:
                    try:
                        _run_jobs(pool, train_fn, measure_fn, subsets, seeds, jobs, finish)
                    except KeyboardInterrupt:  # its own pool, which Ctrl-C may have broken: do not wait on it
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
        finally:
            if bar is not None:
                bar.close()
        sizes = {v.shape[0] for v in results.values()}
        if len(sizes) != 1:
            raise ValueError(f"measure_fn returned different numbers of queries across runs: {sorted(sizes)}")
        return torch.stack([torch.stack([results[(i, r)] for r in range(len(seeds))]) for i in range(len(subsets))])


def worker_pool(workers: int, threads_per_worker: int = 1) -> cf.ProcessPoolExecutor:
    """Spawned worker processes with `threads_per_worker` torch threads each; pass it to `retrain`
    (executor=) to reuse the same workers across calls (starting a process costs a torch import)."""
    if workers < 1 or threads_per_worker < 1:
        raise ValueError(f"workers and threads_per_worker must be >= 1, got {workers}, {threads_per_worker}")
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and CUDA state
    # The parent's pid from here, not from the worker's getppid(): the parent may die while it starts.
    pool = cf.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads_per_worker, os.getpid())
    )
    # Processes start on demand: one no-op each starts them all now, so their imports overlap with
    # whatever the caller does before the first retraining.
    for _ in range(workers):
        pool.submit(os.getpid)
    return pool


def _run_jobs(pool: cf.Executor, train_fn, measure_fn, subsets, seeds, jobs, finish) -> None:
    futures = {pool.submit(_run_one, train_fn, measure_fn, subsets[i], seeds[r]): (i, r) for i, r in jobs}
    recorded = set()

    def keep_finished() -> None:
        for fut, (i, r) in futures.items():
            if fut.done() and fut not in recorded and not fut.cancelled() and fut.exception() is None:
                finish(i, r, fut.result())

    try:
        for fut in cf.as_completed(futures):
            finish(*futures[fut], fut.result())  # re-raises a worker's exception here
            recorded.add(fut)
    except KeyboardInterrupt:
        # Ctrl-C reaches the workers too (one process group), and a pool broken that way may never
        # settle a running future (CPython's manager thread fails on cancelled ones): keep what has
        # finished, start nothing new, and go without waiting.
        for fut in futures:
            fut.cancel()
        keep_finished()
        raise
    except BaseException:  # a failed run: start nothing new, keep what finishes
        for fut in futures:
            fut.cancel()
        cf.wait(futures)
        keep_finished()
        raise


# ---- statistics ---------------------------------------------------------------------------------


def _ranks(x: Tensor) -> Tensor:
    """Ranks along the last dim (0-based), ties given their average rank, as Spearman needs."""
    order = x.argsort(dim=-1)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    out = torch.empty_like(ranks)
    for row in range(x.shape[0]):
        _, inverse, counts = torch.unique(x[row], return_inverse=True, return_counts=True)
        sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks[row])
        out[row] = (sums / counts)[inverse]
    return out


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of a[i] with b[i] for each row: (n, k), (n, k) → (n,). A row with no
    spread in either input has no ranking to compare and gets 0."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denom = ra.norm(dim=-1) * rb.norm(dim=-1)
    return torch.where(denom > 0, (ra * rb).sum(-1) / denom.clamp_min(1e-300), torch.zeros_like(denom))


@dataclass(frozen=True)
class Interval:
    """A mean over queries with its bootstrap interval; `per_query` are the values averaged."""

    mean: float
    low: float
    high: float
    per_query: Tensor

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "per_query": self.per_query.tolist()}


def bootstrap_interval(values: Tensor, *, bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of `values` (n,) with a percentile bootstrap interval: resample the n values with
    replacement `bootstrap` times (generator seeded by `seed`), take the middle `confidence` of the
    resampled means."""
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        raise ValueError("no values to bootstrap")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap < 1:
        raise ValueError(f"bootstrap is the number of resamples, at least 1; got {bootstrap}")
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(n, (bootstrap, n), generator=g)].mean(1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return Interval(float(values.mean()), low, high, values)


def _check_finite(values: Tensor, what: str) -> None:
    """values: (n_query, ...). A NaN or inf would take a rank (or a top-k place) silently."""
    bad = ~torch.isfinite(values).flatten(1).all(1)
    if bad.any():
        raise ValueError(f"{what} non-finite values for queries {torch.nonzero(bad).flatten().tolist()[:8]}")


def predicted_effects(scores: Tensor, subsets: Sequence[Sequence[int]]) -> Tensor:
    """The additive prediction of each subset's measurement, (n_query, n_train) → (n_query, M):
    f(θ_S) ≈ f(θ_T) + Σ_{m ∉ S} τ(q, m), without the constant f(θ_T). τ is the change in f when
    an example is removed, so the examples that count are the ones left OUT of S."""
    n_train = scores.shape[1]
    left_out = torch.ones(len(subsets), n_train, dtype=torch.float64)
    for i, s in enumerate(subsets):
        idx = torch.as_tensor(list(s), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n_train):
            raise ValueError(f"subset {i} has indices outside 0..{n_train - 1} (scores have {n_train} training columns)")
        left_out[i, idx] = 0.0
    effects = scores.double().cpu() @ left_out.T
    # Equal sums of the same scores come out of the GEMM in different groupings, a few ulps apart:
    # rounded to 1e-12 of each query's largest, exact ties (count-like scores) rank as ties.
    scale = effects.abs().amax(-1, keepdim=True).clamp_min(1e-300)
    return torch.round(effects / scale * 1e12) * (scale / 1e12)


def lds(
    scores: Tensor,
    subsets: Sequence[Sequence[int]],
    measured: Tensor,
    *,
    bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Linear datamodeling score: per query, the Spearman correlation over the M subsets between
    the measured f (mean over seeds) and the predicted group effect Σ_{m ∉ S} τ(q, m); the mean
    over queries with a bootstrap interval over queries.

    scores: (n_query, n_train) removal effects (any positive scale: ranks ignore it)
    subsets: M lists of KEPT training indices, as given to `retrain`
    measured: (M, n_query), or (M, R, n_query) from `retrain` (averaged over the R seeds)
    """
    if len(subsets) < 2:  # one subset has no ranking: its correlation would read 0
        raise ValueError(f"a rank correlation over subsets needs at least 2 of them, got {len(subsets)}")
    measured = torch.as_tensor(measured, dtype=torch.float64).cpu()
    if measured.dim() == 3:
        measured = measured.mean(1)
    if scores.dim() != 2 or measured.dim() != 2:
        raise ValueError(
            f"scores must be (n_query, n_train) and measured (M, n_query); got {tuple(scores.shape)}, {tuple(measured.shape)}"
        )
    if measured.shape != (len(subsets), scores.shape[0]):
        swapped = measured.shape == (len(subsets), scores.shape[1])  # scores given (n_train, n_query)
        raise ValueError(
            f"measured has shape {tuple(measured.shape)}, expected (M={len(subsets)} subsets, {scores.shape[0]} "
            "queries) for scores of shape " + str(tuple(scores.shape))
            + (": the scores look transposed; give them (n_query, n_train)" if swapped else "")
        )
    _check_finite(scores, "scores have")
    _check_finite(measured.T, "measured has")
    per_query = spearman_rows(predicted_effects(scores, subsets), measured.T)
    return bootstrap_interval(per_query, bootstrap=bootstrap, confidence=confidence, seed=seed)


def rank_agreement(
    scores: Tensor, reference: Tensor, *, bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """How well scores rank the training examples as a reference attribution does (e.g. exact
    unrolling): per query, the Spearman correlation over training examples of scores[q] with
    reference[q]; the mean over queries with a bootstrap interval over queries.
    scores, reference: (n_query, n_train); scale and units do not matter (ranks)."""
    if scores.dim() != 2 or scores.shape != reference.shape:
        raise ValueError(
            f"scores and reference must both be (n_query, n_train); got {tuple(scores.shape)}, {tuple(reference.shape)}"
        )
    _check_finite(scores, "scores have")
    _check_finite(reference, "reference has")
    per_query = spearman_rows(scores.cpu(), reference.cpu())
    return bootstrap_interval(per_query, bootstrap=bootstrap, confidence=confidence, seed=seed)


def paired_difference(
    a: Interval | Tensor, b: Interval | Tensor, *, bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Method A − method B on the same queries: the mean per-query difference with a bootstrap
    interval that resamples the same queries for both (so shared query difficulty cancels)."""
    pa = a.per_query if isinstance(a, Interval) else torch.as_tensor(a, dtype=torch.float64)
    pb = b.per_query if isinstance(b, Interval) else torch.as_tensor(b, dtype=torch.float64)
    if pa.shape != pb.shape:
        raise ValueError(f"paired difference needs the same queries for both: {tuple(pa.shape)} vs {tuple(pb.shape)}")
    return bootstrap_interval(pa - pb, bootstrap=bootstrap, confidence=confidence, seed=seed)


# ---- subset removal -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """Subset removal for one method (or the random baseline), per query q:
    change[q] = f(q) after retraining without the removed examples − f(q) with all data (means
    over seeds); with kind="flip" (f a margin), correct[q] whether q is classified right with all
    data (f > 0) and flipped[q] whether it is then wrong after the removal (f ≤ 0). A wrong
    prediction turned right is the removal failing, not a flip."""

    change: Interval
    flipped: Tensor | None
    correct: Tensor | None
    removed: list[list[int]]

    @property
    def flip_rate(self) -> float | None:
        """The fraction of the queries classified right with all data that the removal makes wrong."""
        if self.flipped is None or self.correct is None or not bool(self.correct.any()):
            return None
        return float(self.flipped[self.correct].double().mean())

    def to_dict(self) -> dict:
        listed = {k: None if v is None else v.tolist() for k, v in (("flipped", self.flipped), ("correct", self.correct))}
        return {"change": self.change.to_dict(), "flip_rate": self.flip_rate, **listed, "removed": self.removed}


def subset_removal(
    scores: Mapping[str, Tensor] | Tensor,
    train_fn: TrainFn,
    measure_fn: MeasureFn,
    k: int,
    *,
    kind: Literal["flip", "change"] = "change",
    seeds: Sequence[int] = (0,),
    random_seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    settings: Mapping[str, Any] | None = None,
    progress: bool = True,
    bootstrap: int = 2000,
    executor: cf.Executor | None = None,
) -> dict[str, Removal]:
    """For every query, retrain without its k top proponents (its k highest scores: the examples
    whose removal most increases the scores' measurement, e.g. the loss) under each method, and
    without k random examples (a baseline drawn per query from a generator seeded by `random_seed`),
    each with every seed.

    scores: {method: (n_query, n_train)} (or one tensor, named "scores"), all on the same queries.
    measure_fn(model) gives f for every query (it need not be what the scores measure); query q's
    entry is read from the runs removing its own examples. kind="flip": f is a margin (positive: the
    query is classified as its label), and a query flips when its seed-averaged margin goes from
    positive with all data to ≤ 0 without the examples (the flip rate counts the queries right at first);
    the scores must then measure something that rises as the margin falls (the loss, or −margin):
    scores of the margin itself would remove the examples whose removal raises it, and nothing
    flips. kind="change": only the change in f.
    Returns {method: Removal, ..., "random": Removal}; one full-data run per seed is the reference.
    Runs go through `retrain` (so caching, resume and workers behave the same).
    """
    if isinstance(scores, Tensor):
        scores = {"scores": scores}
    if "random" in scores:
        raise ValueError("'random' names the baseline; rename that method")
    if kind not in ("flip", "change"):
        raise ValueError(f"kind must be 'flip' or 'change', got {kind!r}")
    shapes = {tuple(s.shape) for s in scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"every method must score the same queries and training examples, got shapes {sorted(shapes)}")
    n_query, n_train = next(iter(shapes))
    for name, s in scores.items():
        _check_finite(s, f"scores {name!r} have")
    if not 1 <= k < n_train:
        raise ValueError(f"k must be between 1 and n_train - 1 = {n_train - 1}, got {k}")
    removed: dict[str, list[list[int]]] = {
        name: [sorted(s[q].topk(k).indices.tolist()) for q in range(n_query)] for name, s in scores.items()
    }
    g = torch.Generator().manual_seed(random_seed)
    removed["random"] = [sorted(torch.randperm(n_train, generator=g)[:k].tolist()) for _ in range(n_query)]
    everything = list(range(n_train))
    subsets = [everything]
    for sets in removed.values():
        for drop in sets:
            gone = set(drop)
            subsets.append([i for i in everything if i not in gone])
    measured = retrain(
        train_fn, measure_fn, subsets, seeds=seeds, cache_dir=cache_dir, workers=workers,
        settings={"subset_removal_k": k, **dict(settings or {})}, progress=progress, desc=f"removal retraining (k={k})",
        executor=executor,
    ).mean(1)  # (1 + methods·n_query, n_query)
    if measured.shape[1] != n_query:
        raise ValueError(f"measure_fn returned {measured.shape[1]} values, the scores have {n_query} queries")
    base = measured[0]
    out = {}
    q = torch.arange(n_query)
    for j, (name, sets) in enumerate(removed.items()):
        after = measured[1 + j * n_query : 1 + (j + 1) * n_query][q, q]
        correct = base > 0 if kind == "flip" else None
        flipped = correct & (after <= 0) if correct is not None else None
        out[name] = Removal(bootstrap_interval(after - base, bootstrap=bootstrap), flipped, correct, sets)
    return out
