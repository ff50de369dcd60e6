"""A scoring job run in subprocesses by the corpus tests (kill-and-resume, torchrun with gloo).

usage: python _corpus_job.py OUT_DIR [--top-k K] [--slow SECONDS] [--factors-out DIR] [--stream] [--skew]
                            [--presharded even|uneven] [--skew-fit checkpoints|dtype] [--in-memory]
Under torchrun it initialises the gloo process group and every rank takes part. --stream hands the
training examples over as an IterableDataset (no len(), no indexing) for fitting and scoring; --skew
gives rank 1 other queries than rank 0 (a job whose ranks disagree); --presharded gives each rank only
its own part of the training data (DDP's habit, wrong here: the library splits the data itself);
--in-memory runs score and self_score instead of score_corpus; --fault makes that fail on one rank.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import ClassifyTask, Stream, classification_data, mlp, perturbed_states  # noqa: E402

import source_fast as sf  # noqa: E402
from source_fast.corpus import score_corpus  # noqa: E402


class SlowTask(ClassifyTask):
    """ClassifyTask on a slow machine: the delay is the machine's, not a setting of the task (a task's
    settings are part of a run's fingerprint, so the resumed run, not slowed, must match)."""

    delay = 0.0

    def compute_train_loss(self, batch, model, sample=False):
        time.sleep(self.delay)
        return super().compute_train_loss(batch, model, sample)

    measured = 0  # examples measured, in all (a class attribute: no setting of the task)

    def compute_measurement(self, batch, model):
        out = super().compute_measurement(batch, model)  # not counted: a check's pass that stops inside the model
        SlowTask.measured += len(batch[1])
        return out


def job(stream=False, part=None, uneven=False, checkpoint_seed=1, dtype=torch.float32):
    """part (rank, world): only that rank's examples, as DDP's DistributedSampler hands them out;
    uneven: rank 1 without its last 5."""
    model = mlp(6, 7, 4, dtype=dtype)
    data = classification_data(90, 6, 4, seed=1, dtype=torch.float32)
    queries = classification_data(5, 6, 4, seed=2, dtype=torch.float32)
    if part is not None:
        data = torch.utils.data.Subset(data, range(part[0], 90 - 5 * (uneven and part[0] == 1), part[1]))
    if stream:
        data = Stream(data)
    traj = sf.Trajectory.even(perturbed_states(model, 4, scale=0.1, seed=checkpoint_seed), [0.05] * 40, 2, data, momentum=0.9,
                              num_examples=len(data) if part is not None else 90)
    return model, data, queries, traj


def in_memory(model, task, traj, factors, data, queries):
    """score and self_score as the torchrun test compares them with one process: SOURCE's scores (in
    three query blocks per module, summed, low-rank), its self-influence (chunked), with the measurement,
    and fused; TracIn and EK-FAC; the baselines TRAK, gradient cosine and representation similarity."""
    budget = 2 * 4 * (7 * 7 + 4 * 8) * 2  # two queries' prepared gradients
    out = {
        "score": sf.score(model, task, traj, factors, data, queries, batch_size=8),
        "per_module": sf.score(model, task, traj, factors, data, queries, batch_size=8, per_module=True,
                               query_memory_budget=budget),
        "self": sf.self_score(model, task, traj, factors, data, batch_size=8, chunk_size=16),
        "measured": sf.self_score(model, task, traj, factors, data, batch_size=8, use_measurement=True,
                                  per_module=True),
        "fused": sf.self_score(model, task, traj.final(), None, data, "grad_dot", batch_size=8),
        # The ranks prepare shares of the queries (2 and 3) and exchange them: summed, low-rank, one basis.
        "summed": sf.score(model, task, traj, factors, data, queries, batch_size=8, sum_queries=True),
        "low_rank": sf.score(model, task, traj, factors, data, queries, batch_size=8, query_rank=2),
        # ... prepared in pieces of 2, 2 and 1 queries at full rank (the budget's), each shared but the last.
        "low_rank_pieces": sf.score(model, task, traj, factors, data, queries, batch_size=8, query_rank=2,
                                    query_memory_budget=5 * 2 * 2 * (14 + 12) * 4 + 2 * 2 * 4 * (7 * 7 + 4 * 8)),
        "tracin": sf.score(model, task, traj, None, data, queries, "tracin", batch_size=8),
        "ekfac": sf.score(model, task, traj.final(), sf.fit_factors(model, task, traj.final(), fisher="empirical",
                                                                    batch_size=8),
                          data, queries, "ekfac", batch_size=8),
    }
    if hasattr(data, "__len__"):  # the baselines take datasets, not streams; they split too (TRAK sums ΦᵀΦ)
        out["trak"] = sf.score(model, task, sf.Trajectory([traj.segments[1]]), None, data, queries, "trak",
                               trak_dim=16, batch_size=8, damping=[0.01, "heuristic"])  # one score per damping
        out["grad_cos"] = sf.score(model, task, traj.final(), None, data, queries, "grad_cos", batch_size=8)
        out["repsim"] = sf.score(model, task, traj.final(), None, data, queries, "repsim", batch_size=8)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--factors-out", default=None)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--skew", action="store_true")
    p.add_argument("--presharded", choices=["even", "uneven"], default=None)
    p.add_argument("--skew-fit", choices=["checkpoints", "dtype"], default=None,
                   help="rank 1 fits with other checkpoints (a stale copy) or a float64 model")
    p.add_argument("--resume-per-rank", default=None, help="fit with resume_dir <this>/rank<RANK> (a node-local disk)")
    p.add_argument("--fit-only", action="store_true")
    p.add_argument("--count-eigh", action="store_true", help="print how many eigendecompositions this rank ran")
    p.add_argument("--in-memory", action="store_true",
                   help="instead of score_corpus, save in_memory(...) to OUT_DIR/rank<RANK>.pt")
    p.add_argument("--fault", choices=["nan", "budget", "fit-nan", "corpus-nan"], default=None,
                   help="score instead of score_corpus: with example 80 (rank 1's) NaN, or rank 0 alone given a "
                        "query_memory_budget (both with a numpy query_rank); fit-nan: example 80 NaN from the start; "
                        "corpus-nan: example 80 NaN after fitting, for score_corpus")
    args = p.parse_args()
    if "RANK" in os.environ:
        torch.distributed.init_process_group("gloo")
    part = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if args.presharded else None
    skewed = args.skew_fit if int(os.environ.get("RANK", "0")) == 1 else None
    model, data, queries, traj = job(args.stream, part, args.presharded == "uneven",
                                     checkpoint_seed=2 if skewed == "checkpoints" else 1,
                                     dtype=torch.float64 if skewed == "dtype" else torch.float32)
    if args.skew and int(os.environ.get("RANK", "0")) == 1:
        queries = classification_data(5, 6, 4, seed=3, dtype=torch.float32)
    SlowTask.delay = args.slow
    task = SlowTask()
    if args.count_eigh:  # the real one, counted
        eigh, calls = sf.factors._eigh, []
        sf.factors._eigh = lambda *args: calls.append(args[0].shape) or eigh(*args)
    if args.fault == "fit-nan":
        data.tensors[0][80] = float("nan")
    resume = None if args.resume_per_rank is None else os.path.join(args.resume_per_rank, f"rank{os.environ.get('RANK', '0')}")
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=resume)
    if args.factors_out and int(os.environ.get("RANK", "0")) == 0:
        factors.save(args.factors_out)
    if args.count_eigh:
        # A batch of small matrices (one eigh call) counts each of them.
        print(f"rank {os.environ.get('RANK', '0')}: {sum(s[0] if len(s) == 3 else 1 for s in calls)} eigendecompositions", flush=True)
    if args.fit_only:
        if "RANK" in os.environ:  # without it gloo's threads may abort the process at exit
            torch.distributed.destroy_process_group()
        return
    if args.fault in ("nan", "corpus-nan"):
        data.tensors[0][80] = float("nan")
    if args.fault in ("nan", "budget"):
        budget = 10**6 if args.fault == "budget" and os.environ["RANK"] == "0" else None
        sf.score(model, task, traj, factors, data, queries, batch_size=8, query_rank=np.int64(2),
                 query_memory_budget=budget)
        return
    if args.in_memory:
        os.makedirs(args.out, exist_ok=True)
        torch.save(in_memory(model, task, traj, factors, data, queries),
                   os.path.join(args.out, f"rank{os.environ.get('RANK', '0')}.pt"))
        SlowTask.measured = 0
        sf.score(model, task, traj, factors, data, queries, batch_size=8)
        with open(os.path.join(args.out, f"measured{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(str(SlowTask.measured))
        torch.distributed.destroy_process_group()
        return
    score_corpus(model, task, traj, factors, data, queries, args.out, shard_size=16, top_k=args.top_k,
                 batch_size=8, query_memory_budget=2 * 4 * (7 * 7 + 4 * 8) * 2, progress=False)
    if "RANK" in os.environ:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
