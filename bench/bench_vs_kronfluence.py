"""source_fast against kronfluence 1.0.1 on the same EK-FAC workloads, phase by phase.

    python bench/bench_vs_kronfluence.py --quick --out vs_kron.jsonl
    python bench/bench_vs_kronfluence.py --strategy kfac --workloads digits_mlp wide_mlp --rows 2048
    python bench/bench_vs_kronfluence.py --workloads digits_mlp wide_mlp --out vs_kron.jsonl
    python bench/bench_vs_kronfluence.py --workloads wide_mlp --rows 4096 --out vs_kron.jsonl
    python bench/bench_vs_kronfluence.py --workloads gpt2 --seqs 16 --tokens 64 --queries 8 \
        --query-budget-mb 2600 --check-train 4 --out vs_kron.jsonl
    python bench/bench_vs_kronfluence.py --device cuda --workloads gpt2 --seqs 512 --tokens 512 \
        --queries 32 --batch 16 --query-batch 32 --query-budget-mb 16384 --check-train 32

Size overrides (full runs at the issue's sizes do not finish on a 2-core CPU in reasonable time):
  --rows N          wide_mlp training rows (default 20,000)
  --seqs N --tokens T   gpt2 training sequences and tokens per sequence (default 512 × 128)
  --queries Q ...   query counts to time (default per workload, see below)
  --query-budget-mb M   source_fast's score(query_memory_budget=M MiB) (default: the library's automatic budget);
                    e.g. kronfluence's query batch × one query's gradient bytes, so both libraries
                    hold the same number of queries per pass over the training data
  --check-train N   training examples in the pre-timing equality check (default 512); --check-queries
  --batch B --query-batch QB   training batch (both libraries) and kronfluence's query batch
  --device cuda     both libraries on the GPU (memory columns then show torch's allocator peak)
  --strategy S      kronfluence's FactorArguments.strategy: ekfac (default), kfac, diagonal or
                    identity. For all but ekfac source_fast runs through its kronfluence shim, the same
                    Analyzer calls as kronfluence's (files written included); phases a strategy does
                    not use take no time in either library.

Workloads (--quick sizes in brackets):
  digits_mlp  sklearn digits (1797 rows), MLP 64-256-10                           [same]
  wide_mlp    784-1024-1024-10 on 20,000 synthetic rows                 [128 rows, 8 and 32 queries]
  gpt2        GPT2LMHeadModel(GPT2Config()) (random weights, nothing downloaded), the 48 block
              linears tracked, 512 sequences × 128 tokens  [2 layers, width 256, vocabulary 8192, 32 × 32]
Both libraries: empirical Fisher, heuristic damping (kronfluence's damping_factor=None), training
batch 64 (8 for gpt2), the model's dtype (float32), everything else at each library's default;
kronfluence computes query gradients in batches of 32 (8 for gpt2) and re-reads the training set
once per query batch, source_fast reads it once for all queries (its design, kept here).

Phases and what each number covers:
  covariance  kronfluence: fit_covariance_matrices (one pass, writes its files)
              source_fast: factors._covariances (one pass, in memory)
  eigen       kronfluence: perform_eigendecomposition (reads covariances, writes eigenvectors)
              source_fast: factors._eigh of every A and S (float64, like kronfluence)
  lambda      kronfluence: fit_lambda_matrices (one pass, writes Λ)
              source_fast: factors._lambdas (one pass)
  score_Q     pairwise scores of Q queries (Q = 32 and 256; 8 and 32 for gpt2 and quick wide_mlp) against the whole
              training set, query gradients included: kronfluence compute_pairwise_scores (incl.
              loading its factor files), source_fast score(method="ekfac").
fit_factors() is exactly covariance + eigen + lambda plus bookkeeping, so those three add up to it.

Threads: each child uses --threads intra-op threads (default 1): on a shared machine, OpenMP
threads that spin-wait for a busy core inflate some phases by 10-100× at random.

Memory: every (library, workload) runs in its own fresh subprocess, so peak RSS is that process's
alone. Peak RSS is monotone within a process, so each phase reports the peak so far (after setup:
model and data); a phase's own footprint shows as the growth over the previous phase's value.

Before anything is timed, each workload's scores from both libraries (first --check-train (512)
training examples, 8 queries) must agree to Pearson ≥ 0.999; the bench stops otherwise. The timed
runs' own scores (every Q, whole training set) are compared again afterwards (timed_pearson in
the records). Runs alternate library order per repeat. JSON lines go to --out (each line also
carries the sizes and the 1-minute load average at the start and end of the child), Markdown
tables to stdout: per phase, and END-TO-END (the sum of the phases, every Q included).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from kronfluence.task import Task
from source_fast.tasks import ClassificationTask
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

LIBS = ["kronfluence", "source_fast"]
WORKLOADS = ["digits_mlp", "wide_mlp", "gpt2"]
CHECK_TRAIN, CHECK_QUERIES, MIN_PEARSON = 512, 8, 0.999
SIZES = {"rows": None, "seqs": None, "tokens": None, "queries": None, "query_budget_mb": None, "fit_rows": None,
         "batch": None, "query_batch": None}  # set by flags
STRATEGY = "ekfac"  # --strategy
# The fitting stages each strategy skips (both libraries save its arguments and return): no ratio.
SKIPPED = {"ekfac": (), "kfac": ("lambda",), "diagonal": ("covariance", "eigen"),
           "identity": ("covariance", "eigen", "lambda")}
DEVICE = torch.device("cpu")  # --device; data stays on the CPU and each library moves its batches


# ---- workloads -------------------------------------------------------------------------------


class ClassifyTask(ClassificationTask, Task):
    """source_fast's summed cross-entropy, also a kronfluence Task so both libraries run it."""


class LMTask(ClassifyTask):
    """Next-token loss summed over full-length sequences (no padding); block linears tracked."""

    def __init__(self, n_layer: int):
        self.n_layer = n_layer

    def _loss(self, batch, model, sample):
        logits = model(input_ids=batch).logits[:, :-1].flatten(0, 1)
        labels = batch[:, 1:].flatten()
        if sample:
            with torch.no_grad():
                labels = torch.distributions.Categorical(logits=logits).sample()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_train_loss(self, batch, model, sample=False):
        return self._loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model, False)

    def get_influence_tracked_modules(self):
        return [f"transformer.h.{i}.{m}" for i in range(self.n_layer)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _conv1d_to_linear(model: nn.Module) -> None:
    """GPT-2's transformers Conv1D (y = x W + b, W: d_in × d_out) as nn.Linear, which kronfluence tracks."""
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "Conv1D":
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out)
            linear.weight.data.copy_(module.weight.data.T)
            linear.bias.data.copy_(module.bias.data)
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], linear)


def build(workload: str, quick: bool):
    """(model, task, train, all queries, query counts, train batch, query batch); deterministic."""
    model, task, train, queries, counts, batch, qbatch = _build(workload, quick)
    return model, task, train, queries, counts, SIZES["batch"] or batch, SIZES["query_batch"] or qbatch


def _build(workload: str, quick: bool):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if workload == "digits_mlp":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        return (model, ClassifyTask(), TensorDataset(x, y), TensorDataset(x[:256] + 0.05, y[:256]),
                SIZES["queries"] or [32, 256], 64, 32)
    if workload == "wide_mlp":
        n = SIZES["rows"] or (128 if quick else 20_000)
        x = torch.randn(n + 256, 784, generator=g)
        y = torch.randint(0, 10, (n + 256,), generator=g)
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        counts = SIZES["queries"] or ([8, 32] if quick else [32, 256])
        return model, ClassifyTask(), TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:]), counts, 64, 32
    if workload == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=8192) if quick else GPT2Config()
        n, t = (32, 32) if quick else (512, 128)
        n, t = SIZES["seqs"] or n, SIZES["tokens"] or t
        model = GPT2LMHeadModel(cfg)
        model.config.use_cache = False
        _conv1d_to_linear(model)
        nq = max(SIZES["queries"] or [32])
        ids = torch.randint(0, cfg.vocab_size, (n + nq, t), generator=g)
        return model, LMTask(cfg.n_layer), ids[:n], ids[n:], SIZES["queries"] or [8, 32], 8, 8
    raise ValueError(f"unknown workload {workload!r}")


# ---- one library, one workload ----------------------------------------------------------------


def _peaks() -> dict:
    """Peak RSS so far (Linux reports KiB) and, on a GPU, the peak of torch's allocator so far."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if DEVICE.type == "cuda":
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated(DEVICE) / 2**20
    return peaks


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Phases:
    def __init__(self):
        self.rows = [{"phase": "setup", "seconds": 0.0, **_peaks()}]

    def time(self, phase, fn):
        gc.collect()
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        self.rows.append({"phase": phase, "seconds": time.perf_counter() - t, **_peaks()})
        # Said as it ends: a child killed by a time limit still shows the phases it finished.
        print(f"{phase}: {self.rows[-1]['seconds']:.2f} s, peak RSS {self.rows[-1]['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
        return out


def run_kronfluence(model, task, train, queries, counts, batch, qbatch, out_dir, phases: Phases | None):
    """Returns {Q: scores (Q, N)} in kronfluence's scale."""
    import kronfluence

    return _run_analyzer(kronfluence, model, task, train, queries, counts, batch, qbatch, out_dir, phases)


def _run_analyzer(lib, model, task, train, queries, counts, batch, qbatch, out_dir, phases: Phases | None):
    """kronfluence's staged analysis with `lib`'s prepare_model and Analyzer (kronfluence, or
    source_fast's shim)."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = lib.prepare_model(model, task)
    # A folder per library: both skip a stage (and return scores) whose files exist.
    an = lib.Analyzer("bench", model, task, cpu=DEVICE.type == "cpu", disable_tqdm=True,
                      output_dir=os.path.join(out_dir, lib.__name__), log_level=logging.WARNING)
    fa = FactorArguments(use_empirical_fisher=True, strategy=STRATEGY)
    sa = ScoreArguments(damping_factor=None)
    run = phases.time if phases else (lambda _, fn: fn())
    fit = _fit_data(train)
    run("covariance", lambda: an.fit_covariance_matrices("f", fit, per_device_batch_size=batch, factor_args=fa))
    run("eigen", lambda: an.perform_eigendecomposition("f", factor_args=fa))
    run("lambda", lambda: an.fit_lambda_matrices("f", fit, per_device_batch_size=batch, factor_args=fa))
    out = {}
    for q in counts:
        qs = Subset(queries, range(q))
        run(f"score_{q}", lambda: an.compute_pairwise_scores(
            f"s{q}", "f", qs, train, per_device_query_batch_size=qbatch, per_device_train_batch_size=batch,
            score_args=sa))
        out[q] = an.load_pairwise_scores(f"s{q}")["all_modules"]
    return out


def run_source_fast(model, task, train, queries, counts, batch, qbatch, out_dir, phases: Phases | None):
    """Returns {Q: scores (Q, N)} × N (kronfluence's scale), phases through factors' internals; for a
    strategy other than EK-FAC, the shim's Analyzer."""
    if STRATEGY != "ekfac":
        from source_fast.interop import kronfluence as shim

        model.to(DEVICE)
        return _run_analyzer(shim, model, task, train, queries, counts, batch, qbatch, out_dir, phases)
    import _harness
    import source_fast as sf

    run = phases.time if phases else (lambda _, fn: fn())
    model.to(DEVICE)
    factors = _harness.fit_in_phases(model, task, _fit_data(train), batch, "empirical", run)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    out = {}
    for q in counts:
        qs = Subset(queries, range(q))
        budget = {} if SIZES["query_budget_mb"] is None else {"query_memory_budget": SIZES["query_budget_mb"] << 20}
        out[q] = run(f"score_{q}", lambda: sf.score(model, task, traj, factors, train, qs, method="ekfac",
                                                     damping="heuristic", batch_size=batch, **budget)) * len(train)
    return out


RUNNERS = {"kronfluence": run_kronfluence, "source_fast": run_source_fast}


def _fit_data(train):
    """The training data the factors are fitted on: all of it, or its first --fit-rows examples."""
    k = SIZES["fit_rows"]
    if k is None:
        return train
    return train[:k] if isinstance(train, torch.Tensor) else Subset(train, range(min(k, len(train))))


def child_time(lib: str, workload: str, quick: bool, scores_path: str) -> list[dict]:
    load0 = os.getloadavg()[0]
    model, task, train, queries, counts, batch, qbatch = build(workload, quick)
    phases = Phases()
    with tempfile.TemporaryDirectory() as tmp:
        scores = RUNNERS[lib](model, task, train, queries, counts, batch, qbatch, tmp, phases)
    torch.save({q: s.detach().cpu() for q, s in scores.items()}, scores_path)
    sizes = {"n_train": len(train), "queries": counts, "train_batch": batch, "query_batch": qbatch,
             "tokens": int(train.shape[1]) if isinstance(train, torch.Tensor) else 1,
             "fit_rows": SIZES["fit_rows"], "load_start": load0, "load_end": os.getloadavg()[0]}
    return [{**r, **sizes} for r in phases.rows]


def child_check(workload: str, quick: bool) -> dict:
    """Both libraries on the first CHECK_TRAIN examples and CHECK_QUERIES queries: Pearson of the scores."""
    import copy

    model, task, train, queries, _, batch, qbatch = build(workload, quick)
    train = Subset(train, range(min(CHECK_TRAIN, len(train)))) if not isinstance(train, torch.Tensor) else \
        train[:CHECK_TRAIN]
    with tempfile.TemporaryDirectory() as tmp:
        scores = {lib: RUNNERS[lib](copy.deepcopy(model), task, train, queries, [CHECK_QUERIES], batch, qbatch, tmp,
                                    None)[CHECK_QUERIES] for lib in LIBS}
    a, b = (scores[lib].double().cpu().flatten() for lib in LIBS)  # kronfluence loads its scores on the CPU
    return {"pearson": float(torch.corrcoef(torch.stack([a, b]))[0, 1]),
            "max_rel_err": float((a - b).abs().max() / b.abs().max())}


# ---- driver ----------------------------------------------------------------------------------


def _child(args: list[str], log_dir: Path | None = None) -> object:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if log_dir is not None:  # keep each child's output
        stem = "_".join(a for a in args if not a.startswith("-") and "/" not in a)[:80]
        (log_dir / f"{stem}.{time.strftime('%H%M%S')}.log").write_text(
            f"$ {' '.join(args)}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pearson(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]), float((a - b).abs().max() / b.abs().max())


def _mem(records: list[dict]) -> tuple[str, str]:
    """The memory column: the GPU allocator's peak when the run was on a GPU, else peak RSS."""
    return ("peak_gpu_mb", "peak GPU MB") if "peak_gpu_mb" in records[0] else ("peak_rss_mb", "peak RSS MB")


def _table(records: list[dict]) -> str:
    key_mb, label = _mem(records)
    best: dict[tuple, dict] = {}
    for r in records:  # fastest repeat per (workload, phase, library)
        key = (r["workload"], r["phase"], r["library"])
        if key not in best or r["seconds"] < best[key]["seconds"]:
            best[key] = r
    lines = [f"| workload | phase | kronfluence s | source_fast s | speed-up | kronfluence {label} | "
             f"source_fast {label} |", "|---|---|---:|---:|---:|---:|---:|"]
    for (workload, phase, lib), r in best.items():
        if lib != "kronfluence":
            continue
        o = best[(workload, phase, "source_fast")]
        skipped = phase in SKIPPED[r.get("strategy", "ekfac")]
        ratio = f"{r['seconds'] / o['seconds']:.1f}×" if o["seconds"] > 0 and not skipped else "—"
        lines.append(f"| {workload} | {phase} | {r['seconds']:.2f} | {o['seconds']:.2f} | {ratio} | "
                     f"{r[key_mb]:.0f} | {o[key_mb]:.0f} |")
    return "\n".join(lines)


def _end_to_end(records: list[dict]) -> str:
    """Per workload: the sum of every phase (covariance + eigen + lambda + every score_Q) of each repeat,
    fastest repeat per library; peak memory is the child's overall peak."""
    key_mb, label = _mem(records)
    totals: dict[tuple, dict] = {}
    for r in records:
        t = totals.setdefault((r["workload"], r["library"], r["repeat"]),
                              {"seconds": 0.0, "peak": 0.0, "phases": [], "r": r})
        t["seconds"] += r["seconds"]
        t["peak"] = max(t["peak"], r[key_mb])
        t["phases"].append(r["phase"])
    best: dict[tuple, dict] = {}
    for (workload, lib, _), t in totals.items():
        if (workload, lib) not in best or t["seconds"] < best[(workload, lib)]["seconds"]:
            best[(workload, lib)] = t
    lines = [f"| workload | sizes | phases summed | kronfluence s | source_fast s | speed-up | kronfluence {label} | "
             f"source_fast {label} | load (1-min avg) kron / sf |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for workload in dict.fromkeys(w for w, _ in best):
        k, o = best.get((workload, "kronfluence")), best.get((workload, "source_fast"))
        if k is None or o is None:
            continue
        r = k["r"]
        sizes = f"N={r.get('n_train')}×{r.get('tokens')} tok, Q={r.get('queries')}"
        loads = " / ".join(f"{t['r'].get('load_start', float('nan')):.1f}→{t['r'].get('load_end', float('nan')):.1f}"
                           for t in (k, o))
        lines.append(f"| {workload} | {sizes} | {' + '.join(k['phases'])} | {k['seconds']:.1f} | {o['seconds']:.1f} | "
                     f"{k['seconds'] / o['seconds']:.1f}× | {k['peak']:.0f} | {o['peak']:.0f} | {loads} |")
    return "\n".join(lines)


def main() -> None:
    global CHECK_TRAIN, CHECK_QUERIES, DEVICE, STRATEGY
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (< 3 min on 2 CPU cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where both libraries compute (kronfluence: Analyzer(cpu=False) puts the model on the GPU)")
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    p.add_argument("--strategy", default="ekfac", choices=["ekfac", "kfac", "diagonal", "identity"],
                   help="kronfluence's FactorArguments.strategy (not ekfac: source_fast runs through its shim)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per library; order alternates")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per child process")
    p.add_argument("--out", type=Path, help="JSON lines output")
    p.add_argument("--rows", type=int, help="wide_mlp training rows (default 20000; 128 with --quick)")
    p.add_argument("--seqs", type=int, help="gpt2 training sequences (default 512; 32 with --quick)")
    p.add_argument("--tokens", type=int, help="gpt2 tokens per sequence (default 128; 32 with --quick)")
    p.add_argument("--queries", type=int, nargs="+", help="query counts to time (default per workload)")
    p.add_argument("--query-budget-mb", type=int, help="source_fast score(query_memory_budget=) in MiB")
    p.add_argument("--fit-rows", type=int, help="fit both libraries' factors on the first N training examples only "
                   "(scoring still reads them all, and its cost does not depend on the factors' values): times "
                   "scoring at a size whose fitting was measured already")
    p.add_argument("--batch", type=int, help="training batch of both libraries (default 64; 8 for gpt2)")
    p.add_argument("--query-batch", type=int, help="kronfluence's query batch (default 32; 8 for gpt2)")
    p.add_argument("--check-train", type=int, default=CHECK_TRAIN,
                   help="training examples in the pre-timing check; 0 skips it (the timed runs are still compared)")
    p.add_argument("--check-queries", type=int, default=CHECK_QUERIES)
    p.add_argument("--log-dir", type=Path, help="keep every child's stdout/stderr here")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    CHECK_TRAIN, CHECK_QUERIES = args.check_train, args.check_queries
    DEVICE, STRATEGY = torch.device(args.device), args.strategy
    if STRATEGY != "ekfac" and args.query_budget_mb is not None:
        p.error("--query-budget-mb applies to --strategy ekfac: through the shim source_fast holds the larger of "
                "kronfluence's query batch and 1 GiB of queries, as a shim user's script does")
    SIZES.update(rows=args.rows, seqs=args.seqs, tokens=args.tokens, queries=args.queries,
                 query_budget_mb=args.query_budget_mb, batch=args.batch, query_batch=args.query_batch,
                 fit_rows=args.fit_rows)
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's torch.cuda.amp.GradScaler
    if args.child:
        torch.set_num_threads(args.threads)
        mode, *rest = args.child
        result = child_check(rest[0], args.quick) if mode == "check" else \
            child_time(rest[0], rest[1], args.quick, rest[2])
        print(json.dumps(result))
        return
    import kronfluence

    import source_fast

    flags = ["--device", args.device, "--threads", str(args.threads), "--check-train", str(args.check_train),
             "--check-queries", str(args.check_queries), "--strategy", args.strategy] + (["--quick"] if args.quick else [])
    for opt in ("rows", "seqs", "tokens", "query_budget_mb", "fit_rows", "batch", "query_batch"):
        if getattr(args, opt) is not None:
            flags += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    if args.queries:
        flags += ["--queries", *map(str, args.queries)]
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    scores_dir = Path(tempfile.mkdtemp(prefix="vs_kron_scores_"))
    meta = {"bench": "vs_kronfluence", "quick": args.quick, "torch": torch.__version__,
            "kronfluence": kronfluence.__version__, "source_fast": source_fast.__version__,
            "threads": args.threads, "device": args.device, "strategy": args.strategy,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "utc": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    records = []
    for workload in args.workloads:
        if args.check_train > 0:
            check = _child(["check", workload] + flags, args.log_dir)
            print(f"{workload}: scores agree, Pearson {check['pearson']:.6f} (max rel err {check['max_rel_err']:.2g})",
                  file=sys.stderr)
            if check["pearson"] < MIN_PEARSON:
                raise SystemExit(f"{workload}: Pearson {check['pearson']:.6f} < {MIN_PEARSON}; not timing")
        else:
            check = {"pearson": None}
            print(f"{workload}: pre-timing check skipped (--check-train 0); the timed runs are compared", file=sys.stderr)
        for rep in range(args.repeats):
            rows, scores = {}, {}
            for lib in LIBS if rep % 2 == 0 else LIBS[::-1]:
                path = scores_dir / f"{workload}_{lib}_{rep}.pt"
                rows[lib] = _child(["time", lib, workload, str(path)] + flags, args.log_dir)
                scores[lib] = torch.load(path)
                # Said at once: a run cut short by a time limit (the GPU script's) keeps one library's phases.
                print(f"{workload} repeat {rep} {lib}: " + ", ".join(f"{r['phase']} {r['seconds']:.2f} s" for r in rows[lib]),
                      file=sys.stderr)
            timed = {q: _pearson(scores["kronfluence"][q], scores["source_fast"][q]) for q in scores["kronfluence"]}
            worst = min(v[0] for v in timed.values())
            print(f"{workload} repeat {rep}: timed runs' scores agree, Pearson " +
                  ", ".join(f"Q={q}: {v[0]:.6f} (max rel err {v[1]:.2g})" for q, v in timed.items()), file=sys.stderr)
            new = [{**meta, "workload": workload, "library": lib, "repeat": rep, "check_pearson": check["pearson"],
                    "check_train": args.check_train, "timed_pearson": worst, "query_budget_mb": args.query_budget_mb,
                    "fit_rows": args.fit_rows,
                    **row} for lib in LIBS for row in rows[lib]]
            records += new
            if args.out:  # written repeat by repeat, so a run cut short by a time limit keeps what it measured
                with open(args.out, "a") as f:
                    for r in new:
                        f.write(json.dumps(r) + "\n")
            if worst < MIN_PEARSON:
                print(f"WARNING {workload}: timed runs' scores Pearson {worst:.6f} < {MIN_PEARSON}", file=sys.stderr)
    timed_rows = [r for r in records if r["phase"] != "setup"]
    print(_table(timed_rows))
    print()
    print(_end_to_end(timed_rows))


if __name__ == "__main__":
    main()
