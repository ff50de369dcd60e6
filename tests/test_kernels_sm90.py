"""Compile every Triton kernel ahead of time for sm_90 (H100/H200) without a GPU.

Catches what the CPU interpreter cannot: kernels that do not lower, register spills, and bf16 dots that
miss the Hopper warpgroup MMA (wgmma). Per kernel × config it records registers and spill bytes (from
`ptxas -v`, the ptxas Triton ships) into bench/results/sm90_compile.json.

Kernels decorated under TRITON_INTERPRET=1 (which conftest sets on CPU machines) are interpreter
objects that cannot be compiled (DESIGN V1), so the compile runs in a subprocess without that variable:
this file doubles as the script (`python tests/test_kernels_sm90.py OUT.json`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "bench" / "results" / "sm90_compile.json"

# Arguments that are 1 for contiguous inputs: the launch specializes them to constexpr 1, and so do we.
_UNIT_STRIDES = {"stride_ad", "stride_gd", "stride_mt", "stride_od", "stride_on", "stride_oq", "stride_sd",
                 "stride_ud"}
_FLOATS = {"alpha"}


def _specs():
    """(label, autotuned kernel, pointer dtypes, launch constexprs, expected wgmma) for each kernel variant.
    The expectation is the wgmma operand type the PTX must use ("bf16", "f16", "tf32": a plain "wgmma"
    substring would also accept a 16-bit kernel whose dots fell back to TF32 at half the rate), False for
    no wgmma at all (ieee fp32 dots run on FMA units), or None for unchecked.
    bf16 (the production dtype) compiles every autotune config; the other dtypes
    compile the first config only (fp16 lowers like bf16), which keeps this test near a minute on 2 cores."""
    from source_fast.kernels import lam, pairwise, self_influence

    specs = []
    for dt in ("bf16", "fp16", "fp32"):
        prec = "ieee" if dt == "fp32" else "tf32"
        mma16 = {"bf16": "bf16", "fp16": "f16", "fp32": False}[dt]  # 16-bit operands straight into wgmma
        tf32 = dt != "fp32" and "tf32"  # fp32 operands (squares, U) from 16-bit inputs: TF32 wgmma
        specs += [
            (f"lambda/{dt}", lam._lambda_kernel, {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "out_ptr": "fp32"},
             {"HAS_MASK": True, "ACCUMULATE": True, "UPCAST_DOT": False, "DOT_PRECISION": prec}, mma16),
            (f"self_scores/{dt}", self_influence._self_scores_kernel,
             {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "scale_ptr": "fp32", "out_ptr": "fp32"},
             {"HAS_MASK": True, "UPCAST_DOT": False, "DOT_PRECISION": prec}, mma16),
            (f"pairwise/{dt}", pairwise._pairwise_kernel,
             {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "u_ptr": "fp32", "out_ptr": "fp32"},
             {"HAS_MASK": True, "UPCAST_DOT": False, "DOT_PRECISION": prec}, None),
            # Long sequences (opt-in): one example's tile as a 2-D GEMM over tokens, 16-bit operands straight
            # into wgmma (the batched 3-D dots of the kernel above lower to mma.sync), fp32 FMA epilogue.
            (f"pairwise_gemm/{dt}", pairwise._pairwise_gemm_kernel,
             {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "u_ptr": "fp32", "out_ptr": "fp32"},
             {"HAS_MASK": True, "UPCAST_DOT": False, "DOT_PRECISION": prec}, mma16),
            # T = 1 (one token per example): fp32 operands, TF32 MMA for 16-bit inputs, FMA for ieee fp32.
            (f"pairwise_t1/{dt}", pairwise._pairwise_t1_kernel,
             {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "u_ptr": "fp32", "out_ptr": "fp32"},
             {"HAS_MASK": True, "DOT_PRECISION": prec}, tf32),
            (f"self_scores_t1/{dt}", self_influence._self_scores_t1_kernel,
             {"a_ptr": dt, "g_ptr": dt, "mask_ptr": "u8", "scale_ptr": "fp32", "out_ptr": "fp32"},
             {"HAS_MASK": True, "DOT_PRECISION": prec}, tf32),
        ]
    specs += [
        # T = 1: fp32 squares through TF32 MMA (16-bit inputs) or fp32 FMA (fp32 with "highest").
        ("lambda_t1/bf16", lam._lambda_t1_kernel,
         {"a_ptr": "bf16", "g_ptr": "bf16", "mask_ptr": "u8", "out_ptr": "fp32"},
         {"HAS_MASK": True, "ACCUMULATE": True, "DOT_PRECISION": "tf32"}, "tf32"),
        ("lambda_t1/fp32", lam._lambda_t1_kernel,
         {"a_ptr": "fp32", "g_ptr": "fp32", "mask_ptr": "u8", "out_ptr": "fp32"},
         {"HAS_MASK": True, "ACCUMULATE": True, "DOT_PRECISION": "ieee"}, False),
    ]
    return specs


def _ptxas_usage(ptxas: str, ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) as ptxas reports them for the kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        arch = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE).group(1)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                             check=True, capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return regs, spills


def _wgmma_types(ptx: str) -> list[str]:
    """Operand types of the warpgroup MMAs in the PTX, e.g. ["bf16"] for
    wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 (D type first, then A and B)."""
    pattern = r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.\w+\.(\w+)\."
    return sorted({m.group(1) for m in re.finditer(pattern, ptx)})


def compile_all(out_path: str) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    target = GPUTarget("cuda", 90, 32)
    ptxas = get_ptxas(90).path
    rows = []
    for label, tuned, ptr_types, launch_consts, expect_wgmma in _specs():
        fn = tuned.fn  # the JITFunction under the autotuner
        all_configs = label.endswith("/bf16")
        for cfg in tuned.configs if all_configs else tuned.configs[:1]:
            consts = {**launch_consts, **cfg.kwargs}
            signature, constexprs, attrs = {}, {}, {}
            for idx, name in enumerate(fn.arg_names):
                if name in consts:
                    signature[name], constexprs[name] = "constexpr", consts[name]
                elif name in _UNIT_STRIDES:
                    signature[name], constexprs[name] = "constexpr", 1
                elif name in ptr_types:
                    signature[name] = "*" + ptr_types[name]
                    attrs[(idx,)] = [["tt.divisibility", 16]]
                elif name in _FLOATS:
                    signature[name] = "fp32"
                else:  # sizes and strides: realistic LLM dims are multiples of 16
                    signature[name] = "i32"
                    attrs[(idx,)] = [["tt.divisibility", 16]]
            src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            kernel = triton.compile(src, target=target,
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx = kernel.asm["ptx"]
            regs, spills = _ptxas_usage(ptxas, ptx)
            rows.append({
                "kernel": label, "config": cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "n_regs": regs, "spill_bytes": spills, "shared_bytes": kernel.metadata.shared,
                "wgmma": "wgmma" in ptx, "wgmma_types": _wgmma_types(ptx), "mma_sync": "mma.sync" in ptx,
                "expect_wgmma": expect_wgmma,
            })
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps({"target": "sm_90", "triton": triton.__version__, "kernels": rows}, indent=1))


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton's NVIDIA backend is not importable ({exc})"
    path = get_ptxas(90).path
    if not path or not os.access(path, os.X_OK):
        return f"ptxas not found or not executable at {path!r}"
    return None


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    missing = _ptxas_missing()
    if missing:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, str(REPORT)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(REPORT.read_text())["kernels"]
    print(f"\nsm_90 compile report: {REPORT}")
    for r in rows:
        print(f"  {r['kernel']:28s} {r['config']!s:78s} warps={r['num_warps']} regs={r['n_regs']:3d} "
              f"spill={r['spill_bytes']:5d}B smem={r['shared_bytes']:6d}B wgmma={','.join(r['wgmma_types']) or '-'}")
    assert rows
    for r in rows:
        expect, where = r["expect_wgmma"], f"{r['kernel']} {r['config']}: wgmma operand types {r['wgmma_types']}"
        if expect is False:
            assert not r["wgmma"], where
        elif expect is not None:
            assert r["wgmma_types"] == [expect], f"{where}, expected [{expect!r}]"
    # The default (first) config of each kernel is the one the interpreter runs and the one most shapes
    # tune to on small problems: it must not spill.
    firsts = {}
    for r in rows:
        firsts.setdefault(r["kernel"], r)
    spilling = {k: r["spill_bytes"] for k, r in firsts.items() if r["spill_bytes"]}
    assert not spilling, f"first configs spill: {spilling}"
    # The long-sequence pairwise kernel exists for its speed on sm_90: none of its configs may spill.
    gemm = {f"{r['kernel']} {r['config']}": r["spill_bytes"] for r in rows if r["kernel"].startswith("pairwise_gemm/")}
    assert gemm and not any(gemm.values()), f"pairwise_gemm spills: {gemm}"


if __name__ == "__main__":
    compile_all(sys.argv[1])
