"""Fit and score throughput (tokens/s) on a GPT-2-small-config model (transformers, no weights
downloaded), WikiText-2-sized by default: 4,656 sequences of 512 tokens (random token ids; the
machines have no network, and throughput does not depend on the text).

    python bench/bench_gpt2.py --device cuda --dtype bfloat16 [--seqs 4656 --tokens 512 --queries 32]
    python bench/bench_gpt2.py --quick          # tiny config on the CPU (smoke test)

Tracks the transformer blocks' Conv1D layers (not lm_head); EK-FAC with one checkpoint (fit =
covariance pass + eigendecomposition + Λ pass), then `score` of every sequence against the queries.
Prints one JSON object per phase and appends them to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seqs", type=int, default=4656)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="2-layer, d=64 config, 64 × 32 tokens, 4 queries")
    p.add_argument("--out", default="bench/results/gpt2.jsonl")
    args = p.parse_args(argv)
    import transformers

    import source_fast as sf
    from source_fast.tasks import CausalLMTask

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.quick:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1024, n_positions=64, bos_token_id=0, eos_token_id=0)
        args.seqs, args.tokens, args.queries = 64, 32, 4
    else:
        cfg = transformers.GPT2Config()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
    tracked = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.seqs + args.queries, args.tokens), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(args.tokens, dtype=torch.long)} for i in range(len(ids))]
    train, queries = rows[: args.seqs], rows[args.seqs :]
    task = CausalLMTask(tracked=tracked)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    meta = {"bench": "gpt2", "device": str(device), "dtype": args.dtype, "seqs": args.seqs, "tokens": args.tokens,
            "queries": args.queries, "layers": len(tracked), "torch": torch.__version__, "source_fast": sf.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokens = args.seqs * args.tokens

    def record(phase, seconds, tokens_read):
        # Written phase by phase, so a run cut short by a time limit keeps what it measured.
        rec = {**meta, "phase": phase, "seconds": seconds, "tokens_per_s": tokens_read / seconds}
        if device.type == "cuda":
            rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    _sync(device)
    t0 = time.perf_counter()
    factors = sf.fit_factors(model, task, traj, batch_size=args.batch_size)
    _sync(device)
    record("fit (2 passes + eigh)", time.perf_counter() - t0, 2 * tokens)
    t1 = time.perf_counter()
    scores = sf.score(model, task, traj, factors, train, queries, method="ekfac", batch_size=args.batch_size,
                      query_memory_budget=64 << 30 if device.type == "cuda" else 1 << 30)
    _sync(device)
    record(f"score ({args.queries} queries, 1 pass)", time.perf_counter() - t1, tokens)
    if not torch.isfinite(scores).all():
        raise SystemExit("non-finite scores")

if __name__ == "__main__":
    main()
