"""`source-fast fit` and `source-fast score`: jobs described by a small Python file.

The file defines `job()` returning a `Job`:

    import source_fast
    def job():
        model = ...                      # weights: any; checkpoints are loaded into it
        return source_fast.Job(model, MyTask(), trajectory, train_data, query_data, batch_size=16)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._dist import barrier, rank_and_world, sole_writer
from ._io import check_folder
from ._passes import model_device
from .factors import PASS_FILE, Factors, fit_factors
from .scoring import DEFAULT_QUERY_MEMORY_BUDGET
from .task import Task
from .trajectory import Trajectory


@dataclass
class Job:
    """What `source-fast fit` and `score` run: the model (checkpoints are loaded into it), the task, the
    trajectory, the training data scored (the very object its segments were given) and the queries,
    batched by collate_fn in batches of batch_size."""

    model: nn.Module
    task: Task
    trajectory: Trajectory
    train_data: Any
    query_data: Any
    collate_fn: Callable | None = None
    batch_size: int = 32


def load_job(path: str | os.PathLike) -> Job:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"source_fast_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent.resolve())
    sys.path.insert(0, folder)  # let the job import its neighbours, at its top level or inside job()
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "job", None)):
            raise ValueError(f"{path} defines no function job(): it must define job() returning a source_fast.Job")
        job = module.job()
    finally:
        sys.path.remove(folder)  # not pop(0): the job may have put its own entries first
    if not isinstance(job, Job):
        raise TypeError(f"{path}: job() must return a source_fast.Job, not {type(job).__name__}")
    return job


def fit(job_path, out, *, fisher="true", average_params=False, final=False, seed=0) -> Factors:
    """final: fit the one-checkpoint trajectory.final() (for method ekfac) instead of the whole one.
    Finished passes are kept in `<out>.partial/` until the factors are written, so a killed fit
    started again resumes after its last finished pass."""
    job = load_job(job_path)
    trajectory = job.trajectory.final() if final else job.trajectory
    out = Path(out).resolve()  # `--out .` has no name to extend
    partial = out.with_name(out.name + ".partial")
    check_folder(out, "--out")  # before the passes, not after
    check_folder(partial, "the resume folder")
    # fit_factors holds resume_dir's lock during the fit; held here too, it also covers saving the factors
    # and removing the passes, which a second `fit` started meanwhile would race (it would find every pass
    # done, and save and remove them under the first).
    with sole_writer(partial, "fit_factors", model_device(job.model)):
        factors = fit_factors(job.model, job.task, trajectory, fisher=fisher, average_params=average_params, seed=seed,
                              batch_size=job.batch_size, collate_fn=job.collate_fn, progress=True, resume_dir=partial)
        if rank_and_world()[0] == 0:
            factors.save(out)
            _remove_passes(partial)
        barrier()
    if rank_and_world()[0] == 0:
        print(f"factors of {len(factors.segments)} segment(s), {len(factors.layers)} layers, written to {out}")
    return factors


def _remove_passes(partial: Path) -> None:
    """The finished passes go before the fit.json that names their fit: a kill in between leaves a
    folder the next fit resumes (computing again what went), not passes no fit.json explains. Only
    what the fit wrote goes (a folder of that name may hold the user's files too: they stay, and so
    does the folder then)."""
    for path in partial.glob("seg*_*.safetensors"):
        if PASS_FILE.fullmatch(path.name):
            path.unlink()
    (partial / "fit.json").unlink(missing_ok=True)
    (partial / ".fit_factors.lock").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: the user's files
        partial.rmdir()


def score(job_path, factors_dir, out, *, method="source", damping=None, top_k=None, shard_size=4096,
          query_memory_budget=DEFAULT_QUERY_MEMORY_BUDGET, query_rank=None, final=False) -> Path:
    from .corpus import score_corpus

    job = load_job(job_path)
    factors = Factors.load(factors_dir) if factors_dir else None
    trajectory = job.trajectory.final() if final else job.trajectory
    result = score_corpus(job.model, job.task, trajectory, factors, job.train_data, job.query_data, out, method,
                          damping=damping, shard_size=shard_size, top_k=top_k, query_memory_budget=query_memory_budget,
                          query_rank=query_rank, batch_size=job.batch_size, collate_fn=job.collate_fn)
    if rank_and_world()[0] == 0:
        print(f"scores written to {result.resolve()}")
    return result
