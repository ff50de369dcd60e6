"""Covariance accumulation for many layers at once: torch.ops.source_fast.covariance_accumulate_ (one
call, "ext") against the per-layer torch loop (source_fast.reference, "torch") and a per-layer
addmm loop ("addmm_loop": ones column concatenated, masked rows gathered, one GEMM into cov; on
CUDA fp16/bf16 it uses tensor cores with fp32 output through mm's out_dtype). "ext_pipelined" is the
extension with SOURCE_FAST_COV_PIPELINE=1: on CUDA, fp16/bf16 layers go to the cp.async kernel that
is opt-in until these timings decide between the two (elsewhere it is the same kernel as "ext").

    python bench/bench_covariance.py --device cpu --dtype float32 --out cov.jsonl
    python bench/bench_covariance.py --device cuda --dtype bfloat16 --out cov.jsonl
    python bench/bench_covariance.py --quick --device cpu

TFLOP/s count SYRK work, rows_kept·D·(D+1) per layer (the symmetric half of X̂ᵀX̂ plus its
diagonal), whatever a backend actually computes. Every backend is checked against float64 first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

BENCH = "covariance"
BACKENDS = ["ext", "ext_pipelined", "torch", "addmm_loop"]

# (label, layer widths d, rows, fraction of rows masked out). GPT-2 small's 48 linear layers see
# inputs of width 768 (c_attn, attn c_proj, c_fc: 36 layers) or 3072 (mlp c_proj: 12), all with a
# bias, hence the ones column. Rows are tokens: 8×512 on a GPU, one 512-token sequence on CPU.
GPT2_WIDTHS = [768] * 36 + [3072] * 12
GPU_CASES = [
    ("gpt2_small", GPT2_WIDTHS, 8 * 512, 0.0),
    ("gpt2_small_padded", GPT2_WIDTHS, 8 * 512, 0.15),
    ("llama_proj", [4096] * 4, 8 * 512, 0.0),
]
CPU_CASES = [
    ("gpt2_small", GPT2_WIDTHS, 512, 0.0),
    ("gpt2_small_padded", GPT2_WIDTHS, 512, 0.15),
    ("many_small", [64] * 96, 256, 0.0),
]
QUICK_CASES = [("quick", [17, 33, 64, 5, 40, 64], 40, 0.2)]


def _inputs(widths, rows, masked, dtype, device):
    xs = [torch.randn(rows, d, device=device).to(dtype) for d in widths]
    masks = [(torch.rand(rows, device=device) >= masked) if masked else None for _ in widths]
    return xs, masks, [True] * len(widths)


def _addmm_loop(covs, xs, masks, ones):
    for cov, x, mask, one in zip(covs, xs, masks, ones):
        if one:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        if mask is not None:
            x = x[mask]
        if x.dtype == torch.float32:
            cov.addmm_(x.T, x)
        elif x.is_cuda and _has_mm_out_dtype("CUDA"):  # tensor cores with fp32 output: the fair GPU baseline
            cov.add_(torch.mm(x.T, x, out_dtype=torch.float32))
        else:  # no mm(out_dtype=...) kernel here (CPU, older torch): fp32 GEMM on upcast inputs
            xf = x.float()
            cov.addmm_(xf.T, xf)


def _has_mm_out_dtype(key: str) -> bool:
    op = getattr(torch.ops.aten.mm, "dtype", None)
    return op is not None and op.has_kernel_for_dispatch_key(key)


def covariance_case(widths, rows, masked, dtype, device):
    from source_fast import ops

    xs, masks, ones = _inputs(widths, rows, masked, dtype, device)
    kept = [rows if m is None else int(m.sum()) for m in masks]
    dims = [d + 1 for d in widths]
    es = torch.empty((), dtype=dtype).element_size()
    case = _harness.Case(
        "covariance_accumulate_",
        {"layers": len(widths), "rows": rows, "d_sum": sum(widths), "d_max": max(widths),
         "masked_pct": round(100 * masked)},
        dtype,
        bytes_moved=sum(rows * d * es + 2 * dim * dim * 4 for d, dim in zip(widths, dims))
        + sum(0 if m is None else m.numel() for m in masks),
        flops=sum(k * dim * (dim + 1) for k, dim in zip(kept, dims)),
    )

    def run(backend):
        covs = [torch.zeros(dim, dim, device=device) for dim in dims]

        def fn():
            for c in covs:
                c.zero_()
            if backend == "addmm_loop":
                _addmm_loop(covs, xs, masks, ones)
            else:  # the binding reads the variable at every call
                os.environ["SOURCE_FAST_COV_PIPELINE"] = "1" if backend == "ext_pipelined" else "0"
                ops.covariance_accumulate_(covs, xs, masks, ones, backend="ext")
            return tuple(covs)

        return fn

    def ref64():
        out = []
        for x, mask, dim in zip(xs, masks, dims):
            xd = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
            if mask is not None:
                xd = xd[mask]
            out.append(xd.T @ xd)
        return tuple(out)

    return case, run, ref64


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _harness.add_common_args(parser, BACKENDS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    wanted = [b for b in BACKENDS if b in set(args.backends.split(","))]
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; valid: {BACKENDS}")
    from source_fast import _dispatch

    reasons = _dispatch.unsupported_reasons("ext", "covariance_accumulate_", device, dtype)
    for backend in ("ext", "ext_pipelined"):
        if backend in wanted and reasons:
            print(f"skipping backend {backend}: {'; '.join(reasons)}")
            wanted.remove(backend)
    torch.manual_seed(0)
    cases = QUICK_CASES if args.quick else (GPU_CASES if device.type == "cuda" else CPU_CASES)

    meta = _harness.env_metadata(device, _harness.measure_ceilings(device, dtype))
    out = Path(args.out) if args.out else _harness.default_out(BENCH)
    records, wrong = [], []
    for _label, widths, rows, masked in cases:
        case, run, ref64 = covariance_case(widths, rows, masked, dtype, device)
        expected = ref64()
        case_records = {}
        for backend in wanted:
            fn = run(backend)
            try:
                err, sqnr = _harness.checked_error(case, backend, fn(), expected)
            except _harness.WrongResult as exc:
                wrong.append(str(exc))
                continue
            ms = _harness.time_ms(fn, device, quick=args.quick)
            case_records[backend] = _harness.make_record(BENCH, case, backend, device, ms, err, sqnr, meta)
        for backend, rec in case_records.items():
            if "torch" in case_records:
                rec["speedup_vs_torch"] = case_records["torch"]["ms_p50"] / rec["ms_p50"]
            if "addmm_loop" in case_records:
                rec["speedup_vs_addmm_loop"] = case_records["addmm_loop"]["ms_p50"] / rec["ms_p50"]
            records.append(rec)
        # Written case by case, so a run cut short by a time limit keeps what it measured.
        _harness.write_jsonl(out, list(case_records.values()))
        del expected
        if device.type == "cuda":
            torch.cuda.empty_cache()

    return _harness.finish(records, out, args, wrong)


if __name__ == "__main__":
    sys.exit(main())
