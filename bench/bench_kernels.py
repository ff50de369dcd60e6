"""Micro-benchmarks of the Triton kernels against the best torch composition (source_fast.reference)
and, for Λ, kronfluence's default path (fp32 per-example gradients materialized, rotated, squared).

    python bench/bench_kernels.py --device cuda --dtype bfloat16 --out results.jsonl
    python bench/bench_kernels.py --quick --device cpu          # tiny shapes, Triton interpreted

Every backend is checked against the float64 reference on the case before it is timed; one below
_harness.MIN_SQNR_DB is reported and not timed, and the script exits 1.

Pairwise scores of several queries over tokens time both token kernels: "triton" is the token-tile kernel
(run with SOURCE_FAST_PAIRWISE_GEMM=0) and "triton_gemm" the per-example wgmma tile kernel, called directly
whatever its shape rule says. It is opt-in (SOURCE_FAST_PAIRWISE_GEMM=1) until these timings decide.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

BENCH = "kernels"
BACKENDS = ["triton", "triton_gemm", "torch", "kronfluence"]

# (label, n, t, d_a, d_out): GPT-2 small MLP (768 <-> 3072, T = 512), a Llama-7B projection (4096², T = 512)
# and an MLP with one token per example. n = 32 is the engine's default batch: these are per-batch costs.
GPU_SHAPES = [
    ("gpt2_c_fc", 32, 512, 768, 3072),
    ("gpt2_c_proj", 32, 512, 3072, 768),
    ("llama_4096", 32, 512, 4096, 4096),
    ("mlp_t1", 1024, 1, 1024, 1024),
]
# Short batches, for pairwise scores only: the token-tile kernel pads examples to its example block, which
# the first H200 run (n = 4, 0.66× torch) showed; these are also the first run's shapes for both token kernels.
GPU_SHORT_BATCH = [("gpt2_c_fc_short", 8, 512, 768, 3072), ("llama_4096_short", 4, 512, 4096, 4096)]
QUICK_SHAPES = [("quick", 3, 5, 24, 17), ("quick_t1", 6, 1, 16, 20)]
GPU_QUERIES, QUICK_QUERIES = 16, 3


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _eigvecs(d: int, device, dtype) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, device=device, dtype=torch.float32))[0].to(dtype)


def lambda_case(n, t, d_a, d_out, dtype, device):
    """Λ from raw (a, g): rotate (as the engine does), form tiles, square, sum: the whole cost kronfluence's
    path pays too. The check is of each path's own arithmetic: the op against float64 on the rotated
    tokens it was given (the rotation's rounding to 16 bits is the same for every backend and would
    hide an op's error below it), kronfluence's path against float64 from the raw tokens."""
    from source_fast import ops, reference
    from source_fast.capture import rotate

    a = torch.randn(n, t, d_a, device=device, dtype=dtype)
    g = torch.randn(n, t, d_out, device=device, dtype=dtype)
    q_a, q_s = _eigvecs(d_a, device, dtype), _eigvecs(d_out, device, dtype)
    es = _size(dtype)
    rotations = 2 * n * t * (d_a * d_a + d_out * d_out)
    case = _harness.Case(
        "accumulate_lambda_", {"n": n, "t": t, "d_a": d_a, "d_out": d_out}, dtype,
        bytes_moved=n * t * (d_a + d_out) * es + (d_a * d_a + d_out * d_out) * es + 2 * d_out * d_a * 4,
        # One token: Λ = (g̃∘g̃)ᵀ(ã∘ã), one GEMM after the squares; else the tiles, their squares and sums.
        flops=rotations + (2 * n * d_out * d_a + n * (d_out + d_a) if t == 1
                           else 2 * n * t * d_out * d_a + 2 * n * d_out * d_a),
    )

    def accumulate(backend, a_rot, g_rot):
        lam = torch.zeros(d_out, d_a, device=device)
        ops.accumulate_lambda_(lam, a_rot, g_rot, backend=backend)
        return lam

    def kronfluence():
        # kronfluence's default: per-example gradients in fp32, rotated, squared, summed.
        grads = torch.einsum("nto,nti->noi", g.float(), a.float())
        rot = q_s.float().T @ grads @ q_a.float()
        return rot.square_().sum(0)

    def run(backend: str):
        if backend == "kronfluence":
            def from_raw():
                lam = torch.zeros(d_out, d_a, device=device, dtype=torch.float64)
                reference.accumulate_lambda_(lam, a.double() @ q_a.double(), g.double() @ q_s.double())
                return kronfluence(), lam

            return kronfluence, from_raw

        def on_its_inputs():
            a_rot, g_rot = rotate(a, q_a), rotate(g, q_s)
            lam = torch.zeros(d_out, d_a, device=device, dtype=torch.float64)
            reference.accumulate_lambda_(lam, a_rot.double(), g_rot.double())
            return accumulate(backend, a_rot, g_rot), lam

        return lambda: accumulate(backend, rotate(a, q_a), rotate(g, q_s)), on_its_inputs

    return case, run, ["triton", "torch", "kronfluence"]


def self_scores_case(n, t, d_a, d_out, dtype, device):
    from source_fast import ops, reference

    a = torch.randn(n, t, d_a, device=device, dtype=dtype)
    g = torch.randn(n, t, d_out, device=device, dtype=dtype)
    scale = torch.rand(d_out, d_a, device=device)
    if t == 1:
        # Rank-one G̃_n: Σ_j ã_j² ((g̃∘g̃) @ scale)_j, one GEMM plus the squares and the row-dot epilogue.
        flops = 2 * n * d_out * d_a + n * (d_out + d_a) + 2 * n * d_a
    else:
        # Per-example tiles over tokens, then scale ⊙ tile² summed.
        flops = 2 * n * t * d_out * d_a + 3 * n * d_out * d_a
    case = _harness.Case(
        "self_scores", {"n": n, "t": t, "d_a": d_a, "d_out": d_out}, dtype,
        bytes_moved=n * t * (d_a + d_out) * _size(dtype) + d_out * d_a * 4 + n * 4,
        flops=flops,
    )

    def run(backend):
        fn = lambda: ops.self_scores(a, g, scale, backend=backend)  # noqa: E731
        return fn, lambda: (fn(), reference.self_scores(a.double(), g.double(), scale.double()))

    return case, run, ["triton", "torch"]


def pairwise_case(n, t, d_a, d_out, dtype, device, q):
    from source_fast import ops, reference

    a = torch.randn(n, t, d_a, device=device, dtype=dtype)
    g = torch.randn(n, t, d_out, device=device, dtype=dtype)
    u = torch.randn(q, d_out, d_a, device=device)
    case = _harness.Case(
        "pairwise_scores", {"n": n, "t": t, "d_a": d_a, "d_out": d_out, "q": q}, dtype,
        bytes_moved=n * t * (d_a + d_out) * _size(dtype) + q * d_out * d_a * 4 + n * q * 4,
        # The cheaper contraction (reference docstring); t == 1 gives the T = 1 kernel's 2·n·q·d_out·d_a.
        flops=2 * d_out * d_a * n * min(t + q, t * q),
    )

    def run(backend):
        if backend == "triton_gemm":
            from source_fast import _triton
            from source_fast.kernels import pairwise

            def fn():
                with _triton.on_device(device):  # the launcher past its rule; the inputs need no checks here
                    return pairwise._pairwise_scores_gemm(a, g, u, None)
        else:
            def fn():
                os.environ["SOURCE_FAST_PAIRWISE_GEMM"] = "0"  # the launcher reads it at every call
                return ops.pairwise_scores(a, g, u, backend=backend)

        return fn, lambda: (fn(), reference.pairwise_scores(a.double(), g.double(), u.double()))

    # Several queries over tokens: both token kernels (one token or one query take the one-token kernel).
    backends = ["triton", "triton_gemm", "torch"] if t > 1 and q > 1 else ["triton", "torch"]
    return case, run, backends


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(parser, BACKENDS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        # Triton runs on CPU only interpreted; this must be set before source_fast.kernels is imported (V1).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype)
    wanted = set(args.backends.split(","))
    unknown = wanted - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; valid: {BACKENDS}")
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES
    nq = QUICK_QUERIES if args.quick else GPU_QUERIES

    builders = []
    for _label, n, t, d_a, d_out in shapes:
        builders += [
            lambda n=n, t=t, d_a=d_a, d_out=d_out: lambda_case(n, t, d_a, d_out, dtype, device),
            lambda n=n, t=t, d_a=d_a, d_out=d_out: self_scores_case(n, t, d_a, d_out, dtype, device),
            lambda n=n, t=t, d_a=d_a, d_out=d_out: pairwise_case(n, t, d_a, d_out, dtype, device, nq),
        ]
        if t > 1:  # one query ("why did the model say this?") takes the token-row path
            builders.append(lambda n=n, t=t, d_a=d_a, d_out=d_out: pairwise_case(n, t, d_a, d_out, dtype, device, 1))
    for _label, n, t, d_a, d_out in ([] if args.quick else GPU_SHORT_BATCH):
        builders.append(lambda n=n, t=t, d_a=d_a, d_out=d_out: pairwise_case(n, t, d_a, d_out, dtype, device, nq))

    meta = _harness.env_metadata(device, _harness.measure_ceilings(device, dtype))
    out = Path(args.out) if args.out else _harness.default_out(BENCH)
    records, wrong = [], []
    for build in builders:
        case, run, backends = build()
        case_records = {}
        for backend in backends:
            if backend not in wanted:
                continue
            fn, check = run(backend)
            try:
                err, sqnr = _harness.checked_error(case, backend, *check())
            except _harness.WrongResult as exc:
                wrong.append(str(exc))
                continue
            ms = _harness.time_ms(fn, device, quick=args.quick)
            case_records[backend] = _harness.make_record(BENCH, case, backend, device, ms, err, sqnr, meta)
        base = case_records.get("torch")
        for rec in case_records.values():
            if base is not None:
                rec["speedup_vs_torch"] = base["ms_p50"] / rec["ms_p50"]
        # Written case by case, so a run cut short by a time limit keeps what it measured.
        _harness.write_jsonl(out, list(case_records.values()))
        records += case_records.values()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return _harness.finish(records, out, args, wrong)


if __name__ == "__main__":
    sys.exit(main())
