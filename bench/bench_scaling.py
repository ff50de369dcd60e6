"""Scaling of corpus scoring: wall time and peak RSS for growing N (time should grow linearly,
memory stay flat). Each N runs in its own process so its peak RSS is its own.

    python bench/bench_scaling.py [--sizes 1000 4000 16000] [--stream] [--out bench/results/scaling.jsonl] [--plot bench/scaling.png]

Workload: a small GPT-2-config model (d 64, 2 layers, 32-token sequences, MLP layers tracked),
SOURCE with one segment of two checkpoints, factors fitted on the first 1,000 sequences, 16
queries, scores streamed to shards of 1,024 rows (score_corpus), float32 on the CPU. --stream hands
the training corpus over as an IterableDataset (no len(), no indexing; score_corpus buffers one shard).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

WORKER = r"""
import json, resource, sys, time, torch, transformers
torch.set_num_threads(1)  # one core: the measurement should not depend on what else runs
import source_fast as sf
from source_fast.corpus import score_corpus
from source_fast.tasks import CausalLMTask, mlp_modules
n, out, stream = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "stream"
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=64, bos_token_id=0, eos_token_id=0)
model = transformers.GPT2LMHeadModel(cfg).eval()
class Seqs(torch.utils.data.Dataset):  # generated on the fly: the corpus is never held in memory
    def __init__(self, n, seed): self.n, self.seed = n, seed
    def __len__(self): return self.n
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 10_000_019 + i)
        return {"input_ids": torch.randint(1, 512, (32,), generator=g), "attention_mask": torch.ones(32, dtype=torch.long)}
class Stream(torch.utils.data.IterableDataset):
    def __init__(self, data): self.data = data
    def __iter__(self): return (self.data[i] for i in range(len(self.data)))
train, queries = (Stream(Seqs(n, 0)) if stream else Seqs(n, 0)), Seqs(16, 1)
ckpts = [{k: v.clone() for k, v in model.state_dict().items()}, {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}]
task = CausalLMTask(tracked=mlp_modules(model))
fit_traj = sf.Trajectory([sf.Segment(ckpts, Seqs(1000, 0), lr_sum=1.0)])
t0 = time.perf_counter()
factors = sf.fit_factors(model, task, fit_traj, batch_size=32)
t1 = time.perf_counter()
traj = sf.Trajectory([sf.Segment(ckpts, train, lr_sum=1.0, num_examples=n)])
score_corpus(model, task, traj, factors, train, queries, out, shard_size=1024, batch_size=32, progress=False)
t2 = time.perf_counter()
print(json.dumps({"n": n, "stream": stream, "fit_s": t1 - t0, "score_s": t2 - t1, "tokens": n * 32,
                  "score_tok_per_s": 2 * n * 32 / (t2 - t1),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    p.add_argument("--out", default="bench/results/scaling.jsonl")
    p.add_argument("--plot", default="bench/scaling.png")
    p.add_argument("--stream", action="store_true", help="the training corpus as an IterableDataset")
    args = p.parse_args(argv)
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as d:
            form = "stream" if args.stream else "dataset"
            res = subprocess.run([sys.executable, "-c", WORKER, str(n), d, form], check=True, capture_output=True, text=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rows.append(row)
        print(f"N={n:>6}: fit {row['fit_s']:.1f} s, score {row['score_s']:.1f} s "
              f"({row['score_tok_per_s']:.0f} tok/s over 2 checkpoints), peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    _harness.write_jsonl(Path(args.out), rows)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["score_s"] for r in rows], "o-")
        ax1.set(xlabel="training sequences N", ylabel="scoring wall time (s)", title="time: linear in N")
        ax2.plot(ns, [r["peak_rss_mb"] for r in rows], "o-")
        ax2.set(xlabel="training sequences N", ylabel="peak RSS (MB)", title="memory: flat in N", ylim=(0, None))
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
