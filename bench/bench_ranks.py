"""`score` and `self_score` on one process against the same calls under torchrun, each rank one thread:
wall time of the call (median of the repeats, one process and R ranks alternating) and the ratio,
after checking that the ranks' result equals the one process's.

    python bench/bench_ranks.py [--ranks 2] [--train 4000] [--queries 16] [--repeats 3] [--quick]
                                [--fit-gpt2 SEQS] [--out bench/results/ranks.jsonl]

Workload: a GPT-2-config model (d 64, 2 layers, vocabulary 512, 32-token sequences generated from
their index), MLP layers tracked, SOURCE with one segment of two checkpoints, factors fitted once on
the first 1,000 sequences and loaded by every run. Under R ranks each scores its share of the
training sequences against every query (each rank prepares its share of the queries, and the ranks
exchange them), and every rank gets the whole matrix. --fit-gpt2 adds fit_factors on GPT-2 small, whose eigendecompositions the
ranks share (checked by each layer's Σ Λ, the same in any eigenbasis). A machine with fewer cores
than R measures contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

WORKER = r"""
import json, os, sys, time, torch, transformers
torch.set_num_threads(1)
import source_fast as sf
from source_fast.tasks import CausalLMTask, mlp_modules
folder, n_train, n_query, op = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
ranked = "RANK" in os.environ
if ranked:
    torch.distributed.init_process_group("gloo")
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(cfg).eval()
class Seqs(torch.utils.data.Dataset):
    def __init__(self, n, seed): self.n, self.seed = n, seed
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 10_000_019 + i)
        return {"input_ids": torch.randint(1, 512, (32,), generator=g), "attention_mask": torch.ones(32, dtype=torch.long)}
ckpts = [{k: v.clone() for k, v in model.state_dict().items()}, {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}]
task = CausalLMTask(tracked=mlp_modules(model))
if op == "fit":
    factors = sf.fit_factors(model, task, sf.Trajectory([sf.Segment(ckpts, Seqs(1000, 0), lr_sum=1.0)]), batch_size=32)
    factors.save(os.path.join(folder, "factors"))
    sys.exit(0)
if op == "fit_gpt2":  # GPT-2 small's 48 block linears, whose 3072² eigendecompositions the ranks share
    big = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    tracked = [n for n, m in big.named_modules() if type(m).__name__ == "Conv1D"]
    seqs = [{"input_ids": torch.randint(1, 50257, (64,), generator=torch.Generator().manual_seed(i)),
             "attention_mask": torch.ones(64, dtype=torch.long)} for i in range(n_train)]
    state = {k: v.clone() for k, v in big.state_dict().items()}
    t0 = time.perf_counter()
    fitted = sf.fit_factors(big, CausalLMTask(tracked=tracked), sf.Trajectory([sf.Segment([state], seqs, lr_sum=1.0)]),
                            fisher="empirical", batch_size=8)
    seconds = time.perf_counter() - t0
    if not ranked or torch.distributed.get_rank() == 0:  # Σ Λ per layer: the same in any eigenbasis
        torch.save(torch.stack([fitted.segments[0][n].lam.double().sum() for n in tracked]),
                   os.path.join(folder, f"{op}_{'ranks' if ranked else 'one'}.pt"))
        print(json.dumps({"seconds": seconds}))
    if ranked:
        torch.distributed.destroy_process_group()
    sys.exit(0)
factors = sf.Factors.load(os.path.join(folder, "factors"))
train = Seqs(n_train, 0)
traj = sf.Trajectory([sf.Segment(ckpts, train, lr_sum=1.0)])
t0 = time.perf_counter()
if op == "score":
    out = sf.score(model, task, traj, factors, train, Seqs(n_query, 1), batch_size=32)
else:
    out = sf.self_score(model, task, traj, factors, train, batch_size=32)
seconds = time.perf_counter() - t0
if not ranked or torch.distributed.get_rank() == 0:
    torch.save(out, os.path.join(folder, f"{op}_{'ranks' if ranked else 'one'}.pt"))
    print(json.dumps({"seconds": seconds}))
if ranked:
    torch.distributed.destroy_process_group()
"""


def _run(cmd: list[str]) -> float | None:
    """The call's seconds, as rank 0 (or the one process) printed them."""
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{res.stderr[-3000:]}")
    lines = res.stdout.strip().splitlines()
    return json.loads(lines[-1])["seconds"] if lines else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--train", type=int, default=4000, help="training sequences scored")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="400 sequences, 4 queries, one repeat (a smoke test)")
    p.add_argument("--fit-gpt2", type=int, default=0, metavar="SEQS",
                   help="also time fit_factors on GPT-2 small (GPT2Config(), the 48 block linears) with SEQS "
                        "sequences of 64 tokens, empirical Fisher: minutes on a CPU, mostly eigendecompositions")
    p.add_argument("--out", default="bench/results/ranks.jsonl")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.queries, args.repeats = 400, 4, 1
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "worker.py"  # torchrun runs a file, not -c
        script.write_text(WORKER)
        launch = {"one": [sys.executable, str(script)],
                  "ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(args.ranks), str(script)]}
        _run(launch["one"] + [folder, str(args.train), str(args.queries), "fit"])
        for op in ("score", "self_score") + (("fit_gpt2",) if args.fit_gpt2 else ()):
            n_train, n_query = (args.fit_gpt2, 0) if op == "fit_gpt2" else (args.train, args.queries)
            times: dict[str, list[float]] = {"one": [], "ranks": []}
            for _ in range(args.repeats):  # alternating: a machine that slows down slows both
                for kind, cmd in launch.items():
                    times[kind].append(_run(cmd + [folder, str(n_train), str(n_query), op]))
            a, b = (torch.load(Path(folder) / f"{op}_{k}.pt") for k in ("one", "ranks"))
            error = float((a - b).abs().max() / a.abs().max()) if a.shape == b.shape else math.inf
            if error > 1e-4:
                print(f"{op}: the ranks' result differs from one process's (shape {tuple(b.shape)} against "
                      f"{tuple(a.shape)}, max relative error {error:.2e}): not timed", file=sys.stderr)
                return 1
            one_s, ranks_s = statistics.median(times["one"]), statistics.median(times["ranks"])
            row = {"op": op, "train": n_train, "queries": n_query if op == "score" else None,
                   "ranks": args.ranks, "one_process_s": one_s, "ranks_s": ranks_s, "speedup": one_s / ranks_s,
                   "max_rel_error": error, "repeats": args.repeats, "cpus": os.cpu_count(),
                   "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            rows.append(row)
            print(f"{op}: one process {one_s:.2f} s, {args.ranks} ranks {ranks_s:.2f} s, {one_s / ranks_s:.2f}x "
                  f"(max relative difference {error:.1e})", flush=True)
    _harness.write_jsonl(Path(args.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
