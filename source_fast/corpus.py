"""Scoring corpora too large for memory: sharded, checksummed, resumable output, top-k, and
torch.distributed (each rank takes a contiguous run of shards).

Layout of `out_dir`:
  manifest.json                  what was asked (fingerprint of factors, checkpoints, model dtypes, data,
                                 queries, options)
  shards/q{b}_{start}-{end}.safetensors  scores of training rows [start, end) against query block b:
                                 key "scores" (n_query_block, rows), or with top_k the per-shard
                                 "top_values/top_indices/bottom_values/bottom_indices" (n_query_block, k)
  shards/q{b}_{start}-{end}.json  its checksum and a digest of its examples, written after it: a shard
                                 counts as done only when both exist and agree and its examples are the
                                 same, so a job killed at any point resumes after its last complete shard,
                                 recomputes a corrupted one (or one whose examples changed), and writes
                                 identical bytes.
  top_k.safetensors              (top_k mode) the merged k largest / smallest per query, by rank 0.
  rows.json                      the number of training rows scored, written last: the run is complete.

The training data may be a dataset, a DataLoader or a re-iterable stream of examples: shards are its
consecutive runs of `shard_size` examples, one buffered at a time. Queries that do not fit one block are
scored shard by shard on a CPU (the corpus read once), else block by block (read once per block).
Under torch.distributed a dataset's shards go to the ranks in contiguous runs; a stream is read by every
rank, each scoring every world-th shard.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._dist import all_reduce_int, barrier, rank_and_world, sole_writer
from ._io import SAFETENSORS_TEMP, atomic_path, check_folder, own_temps, remove_stale_temps, sha256_file
from ._passes import (
    chunks, describe_task, digest_examples, digest_tensors, length, model_device, own_collate, reuse_large_blocks,
    subset,
)
from ._replay import NoRoom
from ._warn import warn
from .factors import Factors, _checkpoint_digests, restored
from .scoring import (
    GRADIENT_METHODS,
    DEFAULT_QUERY_MEMORY_BUDGET,
    Damping,
    Method,
    _names_zero_measurements_once,
    _score_in_layer_groups,
    check_count,
    check_request,
    check_rows,
    expected_rows,
    oom_hint,
    prepare_queries,
    query_blocks,
    score_rows,
    used_segments,
)
from .task import Task
from .trajectory import Trajectory

MANIFEST_VERSION = 9  # 5: the query blocks are in the fingerprint; 6: the model's dtypes, Adam's p̃ from P⁻¹;
# 7: the segments' decay_scale (clipping does not shrink the decay); 8: gradients take padded tokens; 9: no
# query_memory_budget in the fingerprint (its query blocks are), a shard's top k ties to the lower row, and
# top_k.safetensors checksummed


def _fingerprint(model, task, trajectory, factors, method, options, train_data, query_data, collate_fn) -> dict:
    fac = None
    if isinstance(factors, Factors):  # everything scoring reads: bases, Λ, Adam's preconditioner
        fac = digest_tensors(t for seg in factors.segments for lf in seg.values()
                             for t in (lf.q_a, lf.q_s, lf.lam, lf.precond) if t is not None)
    fingerprint = {
        "method": method,
        "task": describe_task(task, own_collate(train_data, collate_fn)),
        # Gradients in bfloat16 are not float32's: a resume in another precision would mix the two.
        "model_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "options": options,
        "factors": fac,
        # Every score carries 1/N_ℓ and the gradients at these weights: a shard of other ones is not this run's.
        "trajectory": trajectory.settings(),
        "checkpoints": _checkpoint_digests(trajectory),
        "train_data": digest_examples(train_data),
        "query_data": digest_examples(query_data, limit=None),  # held in memory: every query, cheaply
    }
    if any(s.optimizer != "sgd" for s in trajectory.segments):
        # Shards of Adam segments written with another p̃ (before commit 891b8bb, P in the parameter basis;
        # before format 6, the diagonal of P rather than of P⁻¹) hold other scores: refused, not resumed.
        fingerprint["adam_preconditioner"] = "P⁻¹ by its diagonal in each segment's eigenbasis"
    # As the manifest will read it back (a tuple of train_segments becomes a list), or a resume would not match.
    return json.loads(json.dumps(fingerprint))


@_names_zero_measurements_once
def score_corpus(
    model: nn.Module,
    task: Task,
    trajectory: Trajectory,
    factors: Factors | None,
    train_data: Any,
    query_data: Any,
    out_dir: str | os.PathLike,
    method: Method = "source",
    *,
    damping: Damping | None = None,
    shard_size: int = 4096,
    top_k: int | None = None,
    query_memory_budget: int = DEFAULT_QUERY_MEMORY_BUDGET,
    query_rank: int | None = None,
    train_segments: list[int] | Literal["all"] | None = None,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    progress: bool = True,
) -> Path:
    """Scores `train_data` against `query_data` like `score`, streaming to sharded files in `out_dir`.

    The queries' preconditioned gradients are held `query_memory_budget` bytes at a time (`query_rank`
    shrinks them; unlike score()'s, the default budget is fixed, not taken from the free memory, because
    the shard files belong to query blocks cut by it and a resumed run must cut the same blocks). When
    they do not all fit, on a CPU in one process the training data is still read once: each shard is
    scored against every query a group of layers at a time, the shard's layer inputs and output
    gradients kept in a temporary folder (TMPDIR; about shard_size × one example's tokens × the tracked
    layers' widths) and the queries prepared again for each shard. Where that costs more than it saves
    (many queries against small shards), on a GPU, under torch.distributed or without the disk room, the
    queries go in blocks and the training data is read once per block. Each row is read once per
    checkpoint it is scored at and once more to fingerprint its shard (which a resumed run reads again
    to check a finished shard's examples are the same). Peak memory depends on the budget, `shard_size`
    and `batch_size`, never on the number of training examples. Scores are float32 (float64 for a
    float64 model).
    With `top_k`, only each query's k largest and k smallest scores and their row indices are kept.
    Under torch.distributed the shards are split across ranks: a dataset's as contiguous runs, a
    stream's every world-th shard (each rank reads the whole stream).
    Returns `out_dir`; read it with `load_scores` or `load_top_k`.
    """
    if method not in GRADIENT_METHODS:  # the factor- and gradient-based methods stream; baselines do not
        raise ValueError(f"score_corpus supports the methods {list(GRADIENT_METHODS)}, not {method!r}")
    check_count("shard_size", shard_size)
    check_count("top_k", top_k, none_ok=True)
    check_count("batch_size", batch_size)
    check_count("query_rank", query_rank, none_ok=True)
    # As Python ints (numpy's are not JSON): they go into the manifest a resumed run compares with.
    shard_size, top_k, query_rank = int(shard_size), top_k and int(top_k), query_rank and int(query_rank)
    if query_memory_budget is None:  # the blocks must be the same when resumed: no budget from the free memory
        raise ValueError("query_memory_budget must be a number of bytes for score_corpus (default "
                         f"{DEFAULT_QUERY_MEMORY_BUDGET})")
    check_folder(out_dir, "out_dir")
    specs, (damping, _, _, query_memory_budget), query_data, n_train, n_query = check_request(
        model, task, trajectory, factors, method, train_data, query_data, damping, query_rank, query_memory_budget,
        collate_fn, batch_size)
    # Before the manifest is written: a refused setting must not pin out_dir to it.
    segments = used_segments(trajectory, method, train_data, train_segments)
    blocks = query_blocks(model, specs, trajectory, method, segments, n_query, query_rank, query_memory_budget)
    out = Path(out_dir)
    rank, world = rank_and_world()
    # The query blocks are part of the run: a shard holds one block's queries, so a resume that cut the
    # queries otherwise (another budget rule) would take old shards for finished ones.
    # The budget itself is not: lowering it after running out of memory, as the hint says, cuts the same blocks
    # (or refuses only if it does not).
    options = {"damping": damping, "shard_size": shard_size, "top_k": top_k, "query_rank": query_rank,
               "train_segments": train_segments if train_segments is None or isinstance(train_segments, str)
               else [int(i) for i in train_segments],  # a numpy array or tensor, as json
               "query_blocks": [[b.start, b.stop] for b in blocks]}
    fingerprint = _fingerprint(model, task, trajectory, factors, method, options, train_data, query_data, collate_fn)
    with sole_writer(out, "score_corpus", model_device(model)):
        _check_or_write_manifest(out, fingerprint, rank, world, model_device(model))
        if rank == 0:  # the marks of a finished run go until this one finishes (a stream may have grown)
            (out / "rows.json").unlink(missing_ok=True)
            (out / "top_k.safetensors").unlink(missing_ok=True)
            # no rank writes until the barrier
            remove_stale_temps(out, own_temps(), f"shards/{own_temps()}", SAFETENSORS_TEMP,
                               f"shards/{SAFETENSORS_TEMP}")
        barrier()

        n_shards = None if n_train is None else -(-n_train // shard_size)
        # For progress only: a stream's length is its segment's num_examples, checked at the end.
        n_expected = expected_rows(trajectory, train_data)
        if n_shards is None:  # a stream: every rank reads it all and scores every world-th shard
            def mine(k):
                return k % world == rank
        else:  # a dataset: contiguous runs of shards
            def mine(k):
                return rank * n_shards // world <= k < (rank + 1) * n_shards // world
        (out / "shards").mkdir(parents=True, exist_ok=True)
        n_all = -(-n_expected // shard_size) if n_expected else None  # shards in all, for progress lines
        of = f"/{n_all}" if n_all else ""
        prefix = f"[rank {rank}] " if world > 1 else ""
        step = world if n_shards is None else 1  # a stream's shards of a rank: world apart
        mine_all = None if n_all is None else sum(map(mine, range(n_all)))
        rows_seen: set[int] = set()
        job = _Job(model=model, task=task, specs=specs, trajectory=trajectory, factors=factors, method=method,
                   segments=segments, train_data=train_data, query_data=query_data, out=out, blocks=blocks,
                   shard_size=shard_size, mine=mine, of=of, top_k=top_k, budget=query_memory_budget,
                   options=dict(damping=damping, train_segments=train_segments, query_rank=query_rank,
                                batch_size=batch_size, collate_fn=collate_fn, progress=progress))
        with restored(model), reuse_large_blocks(model_device(model)):
            if len(blocks) > 1 and model_device(model).type == "cpu" and world == 1 and _one_read_pays(
                    len(blocks), n_query, n_expected, shard_size):
                log = _ShardLog(progress, prefix, of, mine_all, "shards", step)
                try:
                    rows_seen.add(_score_shard_by_shard(job, log))
                except NoRoom as exc:
                    warn(f"score_corpus: the disk cannot keep a shard's passes over the data ({exc}; tempfile's "
                         f"directory, TMPDIR): the queries go in {len(blocks)} blocks instead, each re-reading "
                         "the training data")
            if not rows_seen:
                what = "shards" + (f" of {len(blocks)} query blocks" if len(blocks) > 1 else "") + (
                    " of this rank" if world > 1 else "")
                log = _ShardLog(progress, prefix, of, None if mine_all is None else len(blocks) * mine_all, what, step)
                rows_seen = _score_block_by_block(job, log)
        if len(rows_seen) != 1 or 0 in rows_seen:
            raise ValueError(
                f"the training data yielded {sorted(rows_seen)} examples on its passes (one per query block): a stream must "
                "yield the same non-empty sequence of examples on every pass"
            )
        n_rows = rows_seen.pop()
        check_rows(trajectory, train_data, n_rows)
        shards = [(s, min(n_rows, s + shard_size)) for s in range(0, n_rows, shard_size)]
        barrier()
        _check_same_examples(out, len(blocks), shards)  # on every rank, so all raise together
        if rank == 0:
            done = {"rows": n_rows}
            if top_k is not None:
                done["top_k_sha256"] = _merge_top_k(out, blocks, shards, top_k)
            with atomic_path(out / "rows.json") as tmp:
                tmp.write_text(json.dumps(done))
        barrier()
        return out


@dataclass
class _Job:
    """What score_corpus scores and where: the same for both orders of the work."""

    model: nn.Module
    task: Task
    specs: list
    trajectory: Trajectory
    factors: Factors | None
    method: str
    segments: list[int]  # the segments whose checkpoints score the training data
    train_data: Any
    query_data: Any
    out: Path
    blocks: list[range]
    shard_size: int
    mine: Callable[[int], bool]  # whether shard k is this rank's
    of: str  # "/n_shards" for progress lines, or ""
    top_k: int | None
    budget: int  # query_memory_budget
    options: dict  # damping, train_segments, query_rank, batch_size, collate_fn, progress


def _one_read_pays(n_blocks: int, n_query: int, n_train: int | None, shard_size: int) -> bool:
    """Whether reading each shard once and preparing every query for it (_score_shard_by_shard) costs less
    than reading the whole corpus once per query block (_score_block_by_block). A query's preparation,
    its forward and backward pass and its rotation into the eigenbases, counts as two training rows: shard
    by shard costs 2·n_query more per shard, block by block n_train more per extra block."""
    if n_train is None:  # a stream of unknown length: large, as streams are
        return True
    return 2 * n_query * -(-n_train // shard_size) < (n_blocks - 1) * n_train


def _score_shard_by_shard(job: _Job, log: _ShardLog) -> int:
    """The corpus read once (on a CPU, one process, when the queries do not fit in one block): each shard
    scored against every query layer group by layer group (scoring._score_in_layer_groups, the shard's
    passes kept on disk for the later groups), its rows written into each query block's shard file, so
    the folder is the one block by block writes and either resumes the other. Returns the number of
    training rows; raises NoRoom when the disk cannot keep a shard's passes (finished shards stay)."""
    rows_read: list[int] = []
    for k, start, end, piece, examples in _my_shards(job, rows_read):
        where = f"{log.prefix}shard {k + 1}{job.of}: rows {start}-{end}"
        todo = [b for b in range(len(job.blocks)) if not _shard_done(job.out, b, (start, end), examples, repair=lambda: log.say(
            f"{where}: a query block's shard was corrupted, incomplete or of other examples; scoring it again"))]
        if not todo:
            log.skipped("every query block", k, start, end)
            continue
        log.flush()  # before the bars of scoring
        t0 = time.perf_counter()
        with oom_hint(f"scoring rows {start}-{end}", job.train_data, job.options["batch_size"], job.budget):
            rows = _score_in_layer_groups(
                job.model, job.task, job.specs, job.trajectory, job.factors, job.method, job.segments, piece,
                job.query_data, job.blocks[-1].stop, job.budget, **{**job.options, "train_segments": job.segments},
                per_token=False, per_module=False, first=start)
        for b in todo:
            _write_shard(job.out, b, (start, end), rows[job.blocks[b].start : job.blocks[b].stop], job.top_k, examples)
        log.scored(where, end - start, time.perf_counter() - t0)
    log.flush()
    return rows_read[0]


def _my_shards(job: _Job, rows_read: list[int]) -> Iterator[tuple[int, int, int, Any, str]]:
    """This rank's shards, (k, first row, end row, examples, their digest), from one read of the training
    data; at its end the number of rows the read yielded goes into `rows_read`."""
    end = 0
    for k, (start, piece) in enumerate(chunks(job.train_data, job.shard_size)):
        end = start + length(piece)
        if job.mine(k):
            # A shard is done only for the same examples: a stream's later examples may have changed.
            yield k, start, end, piece, digest_examples(piece, limit=None)
    rows_read.append(end)


def _score_block_by_block(job: _Job, log: _ShardLog) -> set[int]:
    """Each query block's queries prepared once and every shard scored against them: the corpus read once
    per block. Returns the number of training rows each read yielded."""
    rows_read: list[int] = []
    for b, qrange in enumerate(job.blocks):
        plan = None  # prepared on the first shard that needs it: a finished block costs nothing
        for k, start, end, piece, examples in _my_shards(job, rows_read):
            block = f"query block {b + 1}/{len(job.blocks)}"
            where = f"{log.prefix}{block}, shard {k + 1}{job.of}: rows {start}-{end}"
            if _shard_done(job.out, b, (start, end), examples, repair=lambda: log.say(
                    f"{where}: its shard was corrupted, incomplete or of other examples; scoring it again")):
                log.skipped(block, k, start, end)
                continue
            log.flush()  # before the bars of preparing the queries or scoring
            if plan is None:
                t0 = time.perf_counter()
                with oom_hint(f"preparing query block {b}", job.train_data, job.options["batch_size"], job.budget):
                    plan = prepare_queries(
                        job.model, job.task, job.specs, job.trajectory, job.factors, job.method, job.train_data,
                        subset(job.query_data, qrange), **job.options, memory_budget=job.budget, first=qrange.start)
                log.prepared(time.perf_counter() - t0, later_blocks=len(job.blocks) - b - 1)
            t0 = time.perf_counter()
            with oom_hint(f"scoring rows {start}-{end} against query block {b}", job.train_data,
                          job.options["batch_size"], job.budget):
                rows = score_rows(job.model, job.task, job.specs, plan, piece, batch_size=job.options["batch_size"],
                                  collate_fn=job.options["collate_fn"], progress=job.options["progress"], first=start)
            _write_shard(job.out, b, (start, end), rows, job.top_k, examples)
            log.scored(where, end - start, time.perf_counter() - t0)
        log.flush()
    return set(rows_read)


class _ShardLog:
    """score_corpus's progress lines: each scored shard's time, with how many of the rank's shards are
    done and about how long the rest take (their scoring and the later query blocks' preparation); a
    run of finished shards that a resume skips (reading each to check its examples) as one line, not
    one line each."""

    def __init__(self, enabled: bool, prefix: str, of: str, total: int | None, what: str = "shards", step: int = 1):
        self.enabled, self.prefix, self.of, self.total, self.what, self.step = enabled, prefix, of, total, what, step
        self.done = self.scored_n = self.prepared_n = self.later_blocks = 0
        self.seconds = self.prepare_seconds = 0.0
        self.run: list | None = None  # [block, first shard, last shard, first row, last row] skipped in a row

    def prepared(self, seconds: float, later_blocks: int) -> None:
        """A query block was prepared in `seconds`; `later_blocks` blocks after it will be too (a resume
        may skip some: the estimate is an upper bound there)."""
        self.prepared_n += 1
        self.prepare_seconds += seconds
        self.later_blocks = later_blocks

    def skipped(self, block: str, k: int, start: int, end: int) -> None:
        self.done += 1
        if self.run is not None and self.run[0] == block and self.run[2] == k - self.step:
            self.run[2], self.run[4] = k, end
        else:
            self.flush()
            self.run = [block, k, k, start, end]

    def flush(self) -> None:
        if self.run is not None:
            block, k0, k1, r0, r1 = self.run
            self.run = None
            shards = f"shard {k0 + 1}{self.of}" if k0 == k1 else f"shards {k0 + 1}-{k1 + 1}{self.of}" + (
                f", 1 in {self.step}" if self.step > 1 else "")
            self.say(f"{self.prefix}{block}, {shards}: rows {r0}-{r1} already done")

    def say(self, line: str) -> None:
        """Prints `line` after the finished shards before it."""
        self.flush()
        if self.enabled:
            print(line, flush=True)

    def scored(self, where: str, n_rows: int, seconds: float) -> None:
        self.done += 1
        self.scored_n += 1
        self.seconds += seconds
        line = f"{where}: scored in {seconds:.1f} s ({n_rows / max(seconds, 1e-9):.0f} rows/s)"
        if self.total is not None:
            left = (self.seconds / self.scored_n * max(self.total - self.done, 0)
                    + self.prepare_seconds / max(self.prepared_n, 1) * self.later_blocks)
            line += (f"; {self.done}/{self.total} {self.what} done, "
                     f"about {_duration(left)} left")
        self.say(line)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _check_same_examples(out: Path, n_blocks: int, shards: list[tuple[int, int]]) -> None:
    """Every query block scored the same examples at each row: a stream that yields another order on
    another pass would give each block's scores columns of other examples, with nothing to show it."""
    if n_blocks == 1:
        return
    for rows in shards:
        seen = {json.loads(_shard_paths(out, b, rows)[1].read_text())["examples"] for b in range(n_blocks)}
        if len(seen) > 1:
            raise ValueError(
                f"the training data yielded other examples at rows {rows[0]}-{rows[1]} on different passes (one per "
                "query block): a stream must yield the same sequence of examples on every pass"
            )


def _check_or_write_manifest(out: Path, fingerprint: dict, rank: int, world: int, device: torch.device) -> None:
    """Rank 0 writes the manifest of a new run; then every rank compares its own inputs with it, and all
    raise together (none is left waiting at a barrier). Ranks given different inputs would otherwise
    each score their shards of a different run, into one matrix."""
    path = out / "manifest.json"
    orphans = wrote = 0
    if rank == 0:
        shards = len(list(out.glob("shards/*.safetensors")))
        if shards and not path.exists():
            # The manifest comes before any shard: shards without it are of a run nobody can name any more.
            orphans = shards
        elif not shards and (not path.exists() or _manifest_problem(out, fingerprint) is not None):
            # A manifest with no shard under it binds no run: one that stopped before its first shard (a damping
            # refused at the first pass, memory its hint says to lower) leaves the folder free for the next.
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps({"format": "source_fast.scores", "version": MANIFEST_VERSION,
                                           "fingerprint": fingerprint}, indent=1))
            wrote = 1
    if all_reduce_int(orphans, device):  # also the barrier after rank 0's write
        raise ValueError(f"{out} holds score shards but no manifest.json to say which run they belong to: delete the "
                         "folder, or give another out_dir")
    new_run = bool(all_reduce_int(wrote, device))
    problem = _manifest_problem(out, fingerprint, new_run)
    if all_reduce_int(problem is not None, device):  # every rank has read the manifest by now
        if wrote:  # written for a run that does not start: the folder stays free for the next
            path.unlink(missing_ok=True)
        if world == 1:
            raise ValueError(problem)
        # Only a manifest written for this run can differ between its ranks; an older one, from the run.
        between_ranks = "; under torch.distributed every rank must be given the same inputs" if new_run else ""
        raise ValueError(f"rank {rank}: {problem or 'another rank refused the run (its error says why)'}{between_ranks}")


def _manifest_problem(out: Path, fingerprint: dict, new_run: bool = False) -> str | None:
    """Why `out` cannot hold this run's output, or None when its manifest asked for the same run.
    new_run: rank 0 wrote the manifest for this run just now, so a difference is between the ranks."""
    path = out / "manifest.json"
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:  # rank 0 wrote it before the barrier: this rank sees another folder
        return f"{path} does not exist on this rank: out_dir must be a folder every rank sees (a shared file system)"
    except json.JSONDecodeError:
        return f"{path} is corrupted; delete {out} to start over"
    if old.get("version") != MANIFEST_VERSION:
        return (f"{out} was written by another version of score_corpus (format {old.get('version')}); "
                "delete it to score again")
    if old.get("fingerprint") != fingerprint:
        before = old.get("fingerprint", {})
        diff = [_difference(k, before.get(k), fingerprint[k]) for k in sorted(fingerprint)
                if before.get(k) != fingerprint[k]]
        if new_run:
            return f"the ranks were given different inputs: this rank's differ from rank 0's in: {', '.join(diff)}"
        return (f"{out} holds the output of a different run (it differs in: {', '.join(diff)}); "
                "use another output folder or delete this one")
    return None


def _difference(key: str, old: Any, new: Any) -> str:
    """A fingerprint entry that differs: settings (a dict) with their values, the model's dtypes too,
    digests by name only."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key} ({'; '.join(f'{k}: {old.get(k)!r} before, {new.get(k)!r} now' for k in changed)})"
    if key == "model_dtypes":
        return f"{key} ({old!r} before, {new!r} now)"
    return key


def _shard_paths(out: Path, block: int, rows: tuple[int, int]) -> tuple[Path, Path]:
    stem = out / "shards" / f"q{block}_{rows[0]}-{rows[1]}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _shard_done(out: Path, block: int, rows: tuple[int, int], examples: str | None = None, *,
                repair: Callable[[], None] | None = None) -> bool:
    """Whether the shard is complete and intact (and, given `examples`, scored those examples). With
    `repair` (scoring, not reading), one that is not is deleted for rescoring, and `repair` called."""
    data, meta = _shard_paths(out, block, rows)
    if not (data.exists() or meta.exists()):
        return False
    try:
        info = json.loads(meta.read_text())
        ok = info.get("sha256") == sha256_file(data) and examples in (None, info.get("examples"))
    except (json.JSONDecodeError, FileNotFoundError):
        ok = False
    if not ok and repair:  # corrupted, truncated, half there or of other examples: recompute it
        data.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
        repair()
    return ok


def _write_shard(out: Path, block: int, rows: tuple[int, int], scores: Tensor, top_k: int | None, examples: str) -> None:
    from safetensors.torch import save_file

    if top_k is None:
        tensors = {"scores": scores.contiguous().cpu()}
    else:
        scores = scores.cpu()
        rows_of = torch.arange(rows[0], rows[1]).expand(scores.shape)
        tensors = {}
        for side, largest in (("top", True), ("bottom", False)):
            values, indices = _k_best(scores, rows_of, top_k, largest)
            tensors[f"{side}_values"], tensors[f"{side}_indices"] = values.contiguous(), indices.contiguous()
    data, meta = _shard_paths(out, block, rows)
    with atomic_path(data) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps({"block": block, "rows": list(rows), "sha256": sha256_file(data), "examples": examples}))


def _read_shard(out: Path, block: int, rows: tuple[int, int]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not _shard_done(out, block, rows):
        raise ValueError(f"{out}: shard q{block} rows {rows[0]}-{rows[1]} is missing or corrupted; run score_corpus again to finish it")
    return load_file(str(_shard_paths(out, block, rows)[0]))


def _merge_top_k(out: Path, blocks: list[range], shards: list[tuple[int, int]], top_k: int) -> str:
    """Each query's k best of all shards, kept as a running k while the shards are read one at a time:
    memory is that of a few shards' candidates, not of every shard's (n_shards · k per query). Returns
    the file's checksum, for rows.json."""
    from safetensors.torch import save_file

    sides = (("top", True), ("bottom", False))
    merged = {f"{side}_{what}": [] for side, _ in sides for what in ("values", "indices")}
    for b in range(len(blocks)):
        kept = dict.fromkeys((side for side, _ in sides), None)
        for sh in shards:
            part = _read_shard(out, b, sh)
            for side, largest in sides:
                v, i = part[f"{side}_values"], part[f"{side}_indices"]
                if kept[side] is not None:
                    v, i = torch.cat([kept[side][0], v], 1), torch.cat([kept[side][1], i], 1)
                kept[side] = _k_best(v, i, top_k, largest)
        for side, _ in sides:
            merged[f"{side}_values"].append(kept[side][0])
            merged[f"{side}_indices"].append(kept[side][1])
    with atomic_path(out / "top_k.safetensors") as tmp:
        save_file({k: torch.cat(v).contiguous() for k, v in merged.items()}, str(tmp))
    return sha256_file(out / "top_k.safetensors")


def _k_best(values: Tensor, indices: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Each row's k largest (or smallest) values and their indices, ties to the lower index (sort by index,
    then a stable sort by value): a total order, so the k best of one shard's, or of the kept k and one
    more shard's, are the k best of them all, whatever the shards."""
    order = indices.argsort(dim=1, stable=True)
    values, indices = values.gather(1, order), indices.gather(1, order)
    order = values.argsort(dim=1, descending=largest, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def _finished(out: Path) -> tuple[dict, dict]:
    """A finished run's manifest and rows.json (raising, named, where the run is not one)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out} holds no readable score_corpus manifest ({exc})") from exc
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{out} was written by another version of score_corpus (format {manifest.get('version')}); score again")
    try:
        rows = json.loads((out / "rows.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{out}: the run has not finished (no readable rows.json); run score_corpus again to "
                         "finish it") from exc
    return manifest, rows


def _shards_of(out: Path) -> tuple[int, list[tuple[int, int]], int]:
    manifest, rows = _finished(out)
    opts = manifest["fingerprint"]["options"]
    if opts["top_k"] is not None:  # its shards hold only each query's extremes, not a "scores" matrix
        raise ValueError(f"{out} was scored with top_k={opts['top_k']}: it holds each query's {opts['top_k']} largest "
                         "and smallest scores, not the full matrix; read it with load_top_k")
    n_query = int(manifest["fingerprint"]["query_data"].split(":")[0])
    shards = [(s, min(rows["rows"], s + opts["shard_size"])) for s in range(0, rows["rows"], opts["shard_size"])]
    return len(opts["query_blocks"]), shards, n_query


def load_scores(out_dir: str | os.PathLike) -> Tensor:
    """The full (n_query, n_train) matrix from a finished `score_corpus` run (checksums verified)."""
    out = Path(out_dir)
    n_blocks, shards, n_query = _shards_of(out)
    rows = [torch.cat([_read_shard(out, b, sh)["scores"] for sh in shards], 1) for b in range(n_blocks)]
    result = torch.cat(rows)
    if result.shape[0] != n_query:
        raise ValueError(f"{out}: found scores for {result.shape[0]} of {n_query} queries; run score_corpus again")
    return result


def load_top_k(out_dir: str | os.PathLike) -> dict[str, Tensor]:
    """top_values/top_indices (k largest, descending; ties to the lower row) and bottom_values/bottom_indices
    (k smallest) from a finished `score_corpus` run with top_k (checksum verified)."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    manifest, rows = _finished(out)
    if manifest["fingerprint"]["options"]["top_k"] is None:
        raise ValueError(f"{out} was scored without top_k: read its full matrix with load_scores")
    path = out / "top_k.safetensors"
    if not path.exists() or sha256_file(path) != rows.get("top_k_sha256"):
        raise ValueError(f"{path} is missing or corrupted (its checksum differs from rows.json's): run score_corpus "
                         "again to merge the shards again")
    return load_file(str(path))
