"""score() with more queries than fit its memory budget, on the CPU: layer groups over kept passes
(what score() does) against blocks of queries (what it does without the disk space, on a GPU, and did
before), on the same inputs in one run, order alternating per repeat. With --corpus, score_corpus:
shard by shard (each shard read once, its layer groups over its kept passes) against block by block
(the corpus read once per query block). With --joined, score(): the passes' batches joined into blocks
of up to scoring.BLOCK_EXAMPLES examples (what it does on a CPU) against each batch alone.

    python bench/bench_layer_groups.py --quick
    python bench/bench_layer_groups.py --seqs 16 --tokens 128 --queries 64 --repeats 2
    python bench/bench_layer_groups.py --corpus --seqs 64 --shard-size 32 --queries 64
    python bench/bench_layer_groups.py --joined --seqs 128 --queries 64

GPT-2 (GPT2Config(): 12 layers, d 768, random weights; --quick: 2 layers, d 256), its 48 (8) block
linears tracked, EK-FAC factors fitted once (empirical Fisher), method "ekfac" with the heuristic
damping, one torch thread. The scores of the two ways are compared before the timings are reported.
Prints one Markdown row per repeat and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import source_fast as sf  # noqa: E402
import source_fast.corpus as corpus  # noqa: E402
import source_fast.scoring as scoring  # noqa: E402
from source_fast._replay import NoRoom  # noqa: E402


class LMTask(sf.Task):
    """Next-token loss summed over full-length sequences; the block linears tracked."""

    def __init__(self, n_layer: int):
        self.n_layer = n_layer

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch).logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(logits, batch[:, 1:].flatten(), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return [f"transformer.h.{i}.{m}" for i in range(self.n_layer)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def _blocks_of_queries(*args, **kwargs):
    raise NoRoom("benchmark: blocks of queries")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2-layer, width-256 GPT-2 (< 1 min)")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--budget-mb", type=int, help="query_memory_budget in MiB (default: score()'s automatic one)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--corpus", action="store_true", help="score_corpus: shard by shard against block by block")
    p.add_argument("--shard-size", type=int, default=4096, help="score_corpus's shard_size (with --corpus)")
    p.add_argument("--joined", action="store_true", help="score(): batches joined into blocks against each alone")
    args = p.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=8192) if args.quick else GPT2Config()
    model = GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.seqs + args.queries, args.tokens), generator=g)
    train, queries = ids[: args.seqs], ids[args.seqs :]
    task = LMTask(cfg.n_layer)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    t = time.perf_counter()
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=args.batch)
    print(f"factors: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    budget = None if args.budget_mb is None else args.budget_mb << 20
    specs = scoring.tracked_layers(model, task.get_influence_tracked_modules())
    per_query = sum(s.d_out * s.d_a for s in specs) * 4
    # score_corpus's budget is fixed (a resumed run must cut the same blocks): the automatic one, given.
    budget = budget or (scoring.automatic_query_budget(torch.device("cpu")) if args.corpus else None)
    shown = budget or scoring.automatic_query_budget(torch.device("cpu"))
    n_blocks = -(-args.queries * per_query // shown)
    print(f"{args.queries} queries × {per_query / 2**20:.0f} MiB prepared, budget {shown / 2**20:.0f} MiB: "
          f"{n_blocks} blocks of queries", file=sys.stderr)
    if args.corpus:
        picks = corpus._one_read_pays(n_blocks, args.queries, args.seqs, args.shard_size)
        print(f"score_corpus's rule picks {'shard by shard' if picks else 'block by block'} here", file=sys.stderr)
    ways = ("shard by shard", "block by block") if args.corpus else ("joined batches", "batch by batch") \
        if args.joined else ("layer groups", "blocks of queries")

    def run(way: str) -> tuple[float, torch.Tensor]:
        original = scoring._score_in_layer_groups, corpus._one_read_pays, scoring.BLOCK_EXAMPLES
        if way == "blocks" and args.joined:
            scoring.BLOCK_EXAMPLES = 1  # a block then holds one batch
        elif way == "blocks":
            scoring._score_in_layer_groups = _blocks_of_queries
        corpus._one_read_pays = lambda *_: way == "layer groups"  # each way timed, whichever the rule picks
        try:
            with tempfile.TemporaryDirectory() as out_dir:
                start = time.perf_counter()
                if args.corpus:
                    corpus.score_corpus(model, task, traj, factors, train, queries, out_dir, method="ekfac",
                                        damping="heuristic", batch_size=args.batch, query_memory_budget=budget,
                                        shard_size=args.shard_size, progress=False)
                    out = corpus.load_scores(out_dir)
                else:
                    out = sf.score(model, task, traj, factors, train, queries, method="ekfac", damping="heuristic",
                                   batch_size=args.batch, query_memory_budget=budget)
                return time.perf_counter() - start, out
        finally:
            scoring._score_in_layer_groups, corpus._one_read_pays, scoring.BLOCK_EXAMPLES = original

    times: dict[str, list[float]] = {"layer groups": [], "blocks": []}
    scores = {}
    for rep in range(args.repeats):
        for way in (["layer groups", "blocks"] if rep % 2 == 0 else ["blocks", "layer groups"]):
            seconds, scores[way] = run(way)
            times[way].append(seconds)
            print(f"repeat {rep} {ways[0] if way == 'layer groups' else ways[1]}: {seconds:.1f} s", file=sys.stderr)
    a, b = scores["layer groups"].double(), scores["blocks"].double()
    err = float((a - b).abs().max() / b.abs().max())
    print(f"scores: max |Δ| / max |score| = {err:.2g}")
    if err > 1e-3:
        raise SystemExit("the two ways disagree")
    print(f"| repeat | {ways[0]} s | {ways[1]} s | ratio |\n|---|---:|---:|---:|")
    for rep in range(args.repeats):
        lg, bl = times["layer groups"][rep], times["blocks"][rep]
        print(f"| {rep} | {lg:.1f} | {bl:.1f} | {bl / lg:.2f}× |")
    print(f"median ratio {statistics.median(b / a for a, b in zip(times['layer groups'], times['blocks'])):.2f}×; "
          f"temp dir {tempfile.gettempdir()}")


if __name__ == "__main__":
    main()
