"""Fit and score throughput (tokens/s) on a GPT-2-small-config model (transformers, no weights
downloaded), WikiText-2-sized by default: 4,656 sequences of 512 tokens (random token ids; the
machines have no network, and throughput does not depend on the text).

    python bench/bench_gpt2.py --device cuda --dtype bfloat16 [--seqs 4656 --tokens 512 --queries 32]
    python bench/bench_gpt2.py --quick          # tiny config on the CPU (smoke test)

Tracks the transformer blocks' Conv1D layers (not lm_head); EK-FAC with one checkpoint, timed phase
by phase: the covariance pass, the float64 eigendecompositions, the Λ pass (together exactly
fit_factors), then `score` of every sequence against the queries. Prints one JSON object per phase
and appends them to --out.

    python bench/bench_gpt2.py --device cuda --dtype bfloat16 --seqs 256 --profile prof.txt

--profile runs everything under torch.profiler and writes, per phase, the ops that took the most
device time and the most host time (where the tokens/s go).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402


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
    p.add_argument("--profile", type=Path, help="write torch.profiler tables per phase to this file")
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
        rec = {**meta, "phase": phase, "seconds": seconds, "tokens_per_s": tokens_read / seconds if tokens_read else None}
        if device.type == "cuda":
            rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(json.dumps(rec), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    tables = []

    def timed(phase, fn, tokens_read):
        profiler = _profiler(device) if args.profile else contextlib.nullcontext()
        _sync(device)
        t0 = time.perf_counter()
        with profiler as prof:
            out = fn()
            _sync(device)
        record(phase, time.perf_counter() - t0, tokens_read)
        if args.profile:
            tables.append(_profile_tables(phase, prof, device))
            args.profile.write_text("\n".join(tables))
        return out

    per_phase_tokens = {"covariance": tokens, "eigen": 0, "lambda": tokens}
    factors = _harness.fit_in_phases(model, task, train, args.batch_size, "true",
                                     lambda phase, fn: timed(phase, fn, per_phase_tokens[phase]))
    scores = timed(f"score ({args.queries} queries, 1 pass)", lambda: sf.score(
        model, task, traj, factors, train, queries, method="ekfac", batch_size=args.batch_size), tokens)
    if not torch.isfinite(scores).all():
        raise SystemExit("non-finite scores")


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _profile_tables(phase, prof, device) -> str:
    """The ops with the most device time and with the most host time, for one phase."""
    averages = prof.key_averages()
    parts = [f"===== {phase}"]
    if device.type == "cuda":
        parts += ["-- by device time", averages.table(sort_by="self_device_time_total", row_limit=25)]
    parts += ["-- by host time", averages.table(sort_by="self_cpu_time_total", row_limit=25)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
