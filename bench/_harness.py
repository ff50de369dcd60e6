"""Timing, checking and JSONL output shared by the bench scripts (schema: DESIGN §3.6).

Each bench script declares Cases and, per backend, a function to time; this module checks every
backend against the float64 reference before timing it (a wrong kernel is never timed), times it,
and writes one JSON object per line.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMA = 1
REQUIRED_FIELDS = {
    "schema": int, "bench": str, "op": str, "backend": str, "device": str, "device_name": str, "dtype": str,
    "params": dict, "ms_p20": float, "ms_p50": float, "ms_p80": float, "gbps": float, "tflops": float,
    "flops": int, "bytes": int, "max_abs_err": float, "sqnr_db": float, "source_fast": str, "torch": str,
    "utc": str,
}  # plus speedup_vs_torch and roofline_frac (float or None), git_sha, triton (str or None), ext and ceilings (dict or None)


@dataclass(frozen=True)
class Case:
    op: str
    params: dict[str, int]  # e.g. {"n": 8, "t": 512, "d_a": 768, "d_out": 3072}
    dtype: torch.dtype
    bytes_moved: int  # the bytes the algorithm must read and write at least (for GB/s)
    flops: int  # the FLOPs the algorithm needs (for TFLOP/s), not what a backend happens to spend


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False) -> tuple[float, float, float]:
    """(p20, p50, p80) in ms. do_bench needs a GPU driver (DESIGN V4), so CPU uses torch.utils.benchmark."""
    if device.type == "cuda":
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=10 if quick else 25,
                                                rep=20 if quick else 100)
        return float(p20), float(p50), float(p80)
    from torch.utils import benchmark

    fn()  # warm-up (compiles/interprets once outside the measurement)
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.05 if quick else 1.0)
    times = torch.tensor(m.times, dtype=torch.float64) * 1e3
    q = torch.quantile(times, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict | None:
    """The roofline's two ceilings measured here and now (GPU only): the matrix rate of a large
    square product in `dtype` and device-to-device copy bandwidth (bytes read + written)."""
    if device.type != "cuda":
        return None
    import triton.testing

    def matmul_ms(n: int) -> float:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)

    def copy_ms(nbytes: int) -> float:
        src = torch.empty(nbytes, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        return triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)

    n, nbytes = 8192, 2**30  # 1 GiB copies: far larger than the L2
    ms_mm, ms_copy = matmul_ms(n), copy_ms(nbytes)
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n**3 / (ms_mm * 1e-3) / 1e12, "copy_gbps": 2 * nbytes / (ms_copy * 1e-3) / 1e9,
            "matmul_dtype": str(dtype).removeprefix("torch.")}


def roofline_fraction(flops: int, bytes_moved: int, ms: float, ceilings: dict | None) -> float | None:
    """Achieved FLOP/s over the attainable min(matrix rate, intensity × bandwidth) for this case."""
    if ceilings is None:
        return None
    attainable = min(ceilings["matmul_tflops"] * 1e12, flops / bytes_moved * ceilings["copy_gbps"] * 1e9)
    return flops / (ms * 1e-3) / attainable


def error_stats(actual, ref64) -> tuple[float, float]:
    """(max |actual − ref|, SQNR in dB) over one tensor or a tuple of tensors."""
    pairs = list(zip(actual, ref64)) if isinstance(actual, (tuple, list)) else [(actual, ref64)]
    err, noise, signal = 0.0, 0.0, 0.0
    for x, r in pairs:
        d = x.double() - r.double().to(x.device)
        err = max(err, d.abs().max().item() if d.numel() else 0.0)
        noise += d.pow(2).sum().item()
        signal += r.double().pow(2).sum().item()
    sqnr = math.inf if noise == 0.0 else 10 * math.log10(max(signal, 1e-300) / noise)
    return err, sqnr


# The least SQNR a backend must reach against float64 before it is timed. Correct backends measured
# here: 51-149 dB (bf16 inputs, TF32 dots on the GPU included); a wrong kernel (zeros, a transposed tile,
# one block of examples missing) lands near 0-20 dB. 40 dB is an error of 1 % of the signal's RMS.
MIN_SQNR_DB = 40.0


class WrongResult(Exception):
    """A backend's result failed the check against float64: it is not timed (the bench goes on to the
    next backend and exits 1 at the end)."""


def checked_error(case: Case, backend: str, actual, ref64) -> tuple[float, float]:
    """error_stats, or WrongResult (with the case, the backend and the error) when below MIN_SQNR_DB."""
    err, sqnr = error_stats(actual, ref64)
    if not sqnr >= MIN_SQNR_DB:  # NaN fails too
        raise WrongResult(f"{case.op} {case.params} {str(case.dtype).removeprefix('torch.')}: backend {backend!r} is "
                          f"wrong (SQNR {sqnr:.1f} dB against float64, max |error| {err:.3g}; at least "
                          f"{MIN_SQNR_DB:g} dB needed): not timed")
    return err, sqnr


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def env_metadata(device: torch.device, ceilings: dict | None = None) -> dict:
    import source_fast
    from source_fast import _ext, _triton

    triton_version = None
    if _triton.import_error() is None:
        import triton

        triton_version = triton.__version__
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "source_fast": source_fast.__version__, "git_sha": _git_sha(), "torch": str(torch.__version__),
        "triton": triton_version, "ext": _ext.build_info(), "ceilings": ceilings,
    }


def make_record(bench: str, case: Case, backend: str, device: torch.device, ms: tuple[float, float, float],
                err: float, sqnr: float, meta: dict) -> dict:
    p20, p50, p80 = ms
    return {
        "schema": SCHEMA, "bench": bench, "op": case.op, "backend": backend, "device": device.type,
        "device_name": meta["device_name"], "dtype": str(case.dtype).removeprefix("torch."), "params": case.params,
        "ms_p20": p20, "ms_p50": p50, "ms_p80": p80,
        "gbps": case.bytes_moved / (p50 * 1e-3) / 1e9, "tflops": case.flops / (p50 * 1e-3) / 1e12,
        "flops": case.flops, "bytes": case.bytes_moved,
        "speedup_vs_torch": None, "max_abs_err": err, "sqnr_db": sqnr,
        "roofline_frac": roofline_fraction(case.flops, case.bytes_moved, p50, meta.get("ceilings")),
        "ceilings": meta.get("ceilings"),
        "source_fast": meta["source_fast"], "git_sha": meta["git_sha"], "torch": meta["torch"],
        "triton": meta["triton"], "ext": meta["ext"],
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def validate_record(rec: dict) -> None:
    """Raises ValueError when a record does not follow the schema (used by the smoke test)."""
    for key, typ in REQUIRED_FIELDS.items():
        if key not in rec:
            raise ValueError(f"record lacks {key!r}: {rec}")
        ok = isinstance(rec[key], (int, float)) if typ is float else isinstance(rec[key], typ)
        if not ok:
            raise ValueError(f"record field {key!r} should be {typ.__name__}, got {rec[key]!r}")
    if rec["schema"] != SCHEMA:
        raise ValueError(f"schema {rec['schema']} != {SCHEMA}")
    if not rec["ms_p20"] <= rec["ms_p50"] <= rec["ms_p80"]:
        raise ValueError(f"quantiles out of order: {rec}")
    if rec["speedup_vs_torch"] is not None and not isinstance(rec["speedup_vs_torch"], (int, float)):
        raise ValueError(f"speedup_vs_torch should be a number or null: {rec}")


def add_common_args(parser: argparse.ArgumentParser, backends: list[str]) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny shapes, CPU-safe (runs under TRITON_INTERPRET=1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backends", default=",".join(backends), help=f"comma-separated subset of {backends}")
    parser.add_argument("--out", default=None,
                        help="JSONL file to append to (default bench/results/<bench>-<utc>.jsonl)")
    parser.add_argument("--compare", default=None, help="a previous JSONL run to compare ms_p50 against")
    parser.add_argument("--fail-on-regression", type=float, default=None, metavar="PCT",
                        help="exit 1 when a matched case is more than PCT percent slower than --compare")


def default_out(bench: str) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(__file__).resolve().parent / "results" / f"{bench}-{stamp}.jsonl"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for rec in records:
            f.write(json.dumps(rec, allow_nan=True) + "\n")


def _key(rec: dict) -> tuple:
    params = json.dumps(rec["params"], sort_keys=True)
    return (rec["bench"], rec["op"], rec["backend"], rec["device"], rec["dtype"], params)


def compare(records: list[dict], base_path: str, fail_pct: float | None) -> bool:
    """Prints p50 changes against a previous run; False when a case regressed by more than fail_pct."""
    base = {}
    for line in Path(base_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            base[_key(rec)] = rec
    ok = True
    for rec in records:
        old = base.get(_key(rec))
        if old is None:
            continue
        change = 100.0 * (rec["ms_p50"] / old["ms_p50"] - 1.0)
        flag = ""
        if fail_pct is not None and change > fail_pct:
            ok, flag = False, "  REGRESSION"
        print(f"{rec['op']:22s} {rec['backend']:12s} {json.dumps(rec['params'])}: "
              f"{old['ms_p50']:.3f} -> {rec['ms_p50']:.3f} ms ({change:+.1f}%){flag}")
    return ok


def finish(records: list[dict], out: Path, args: argparse.Namespace, wrong: list[str]) -> int:
    """The end of every bench script: the table, where the records went, the backends refused as wrong
    and the --compare verdict (exit code 1 for either)."""
    print_table(records)
    print(f"wrote {len(records)} records to {out}")
    for line in wrong:
        print(f"WRONG RESULT: {line}", file=sys.stderr)
    if args.compare and not compare(records, args.compare, args.fail_on_regression):
        return 1
    return 1 if wrong else 0


def print_table(records: list[dict]) -> None:
    print(f"{'op':22s} {'backend':12s} {'dtype':9s} {'params':52s} {'p50 ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} "
          f"{'vs torch':>8s} {'roofline':>8s} {'max|err|':>9s} {'sqnr':>6s}")
    for r in records:
        speed = "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.2f}x"
        roof = "" if r.get("roofline_frac") is None else f"{100 * r['roofline_frac']:.0f}%"
        print(f"{r['op']:22s} {r['backend']:12s} {r['dtype']:9s} {json.dumps(r['params']):52s} {r['ms_p50']:9.3f} "
              f"{r['tflops']:8.2f} {r['gbps']:8.1f} {speed:>8s} {roof:>8s} {r['max_abs_err']:9.2e} {r['sqnr_db']:6.1f}")


def fit_in_phases(model, task, data, batch_size: int, fisher: str, time_phase: Callable[[str, Callable], object]):
    """fit_factors for one checkpoint (the model's current weights) as its three phases, each run
    through time_phase(name, fn): "covariance" (one pass), "eigen" (the float64 eigendecompositions),
    "lambda" (one pass). fit_factors() is exactly these plus bookkeeping; returns the Factors."""
    from source_fast import factors as fm
    from source_fast._passes import make_loader
    from source_fast.capture import tracked_layers

    specs = tracked_layers(model, task.get_influence_tracked_modules())
    loader = make_loader(data, batch_size, None)
    objective = "fisher" if fisher == "true" else "train"
    with fm.restored(model):
        a_cov, s_cov, rows = time_phase("covariance", lambda: fm._covariances(
            model, task, specs, loader, objective, "bench", False))
        q_a, q_s = time_phase("eigen", lambda: (
            {s.name: fm._eigh(a_cov[s.name]).eigenvectors.to(a_cov[s.name].dtype) for s in specs},
            {s.name: fm._eigh(s_cov[s.name]).eigenvectors.to(s_cov[s.name].dtype) for s in specs}))
        lam = time_phase("lambda", lambda: fm._lambdas(model, task, specs, loader, objective, q_a, q_s, "bench", False))
    layers = {s.name: fm.LayerFactors(a_cov[s.name], s_cov[s.name], q_a[s.name], q_s[s.name], lam[s.name],
                                      rows=int(rows[s.name])) for s in specs}
    return fm.Factors(specs, [layers], [len(data)], [1], fisher, False)
