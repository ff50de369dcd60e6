#!/usr/bin/env bash
# One script for a lent GPU (H200: torch 2.11, triton 3.6, Python 3.12 preinstalled; no network).
#   [ONLY="step names"] [GPT2_SEQS=N] bench/run_device_check.sh OUTDIR [BUDGET_SECONDS]
# Builds the extension for sm_90 only, prints the backend table, runs the `cuda` tests, then the
# benches (kernels with their roofline fractions, covariance, the GPU kronfluence comparison, a GPT-2
# profile, GPT-2 throughput). Every step runs under its own time limit, cut further so that the
# whole script ends within BUDGET_SECONDS (default 540); steps are ordered by what they tell us, and
# a step that no longer fits is skipped and reported. Everything logs into OUTDIR/device_check.log;
# the script carries on past a failed step and exits non-zero if any step failed or was skipped.
# kronfluence is not on the machine: put its wheels in .whl/ (see bench/RESULTS.md) and carry them.
set -uo pipefail

OUT=${1:?usage: $0 OUTDIR [BUDGET_SECONDS]}
BUDGET=${2:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/device_check.log"
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}  # the device image's python3 is the one that holds torch
# FORCE_CUDA: a CUDA_HOME without nvcc must fail the build here, not give a CPU-only _C whose CUDA tests
# then skip ("extension has no CUDA kernel") instead of failing.
export SOURCE_FAST_REQUIRE_EXT=1 SOURCE_FAST_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # a leftover interpreter flag would silently run every kernel on the CPU
FAILED=()

limit_for() {  # the step's own limit, cut to what is left of the budget (5 s kept for the summary)
    local left=$((BUDGET - SECONDS - 5))
    echo $(($1 < left ? $1 : left))
}

step() {
    local name=$1 limit
    limit=$(limit_for "$2")
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY wheels install_python " != *" $name "* ]]; then
        return  # ONLY="step names": a rerun of some steps (the install and the build always run)
    fi
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: SKIPPED, ${limit}s of the budget left" | tee -a "$LOG"
        FAILED+=("$name(skipped)")
        return
    fi
    echo "=== $name (limit ${limit}s, t=${SECONDS}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

{ nvidia-smi; "$PY" -c 'import sys, torch, triton; print(sys.version, torch.__version__, torch.version.cuda, triton.__version__)'; } >>"$LOG" 2>&1

if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi

# The Python package first (seconds), then the native build in the background while the Triton
# kernel tests compile their kernels on other cores (their cache serves the benches later).
# --no-deps: the environment already has torch and friends, and the machine has no network.
step install_python 90 env SOURCE_FAST_BUILD_EXT=0 "$PY" -m pip install --no-build-isolation --no-deps -e .
BUILD_LIMIT=$(limit_for 240)
echo "=== build_ext (background, limit ${BUILD_LIMIT}s, t=${SECONDS}s)" | tee -a "$LOG"
timeout "$BUILD_LIMIT" "$PY" setup.py build_ext --inplace >"$OUT/build_ext.log" 2>&1 &
BUILD_PID=$!
# Every device-parametrized kernel test, compiled for the GPU (odd shapes, strides, masks, dtypes).
step pytest_kernels_cuda 300 "$PY" -m pytest -m cuda -q -rs -n 8 tests/test_kernels.py
wait "$BUILD_PID"
BUILD_RC=$?
echo "=== build_ext: rc=$BUILD_RC at t=${SECONDS}s (log: build_ext.log)" | tee -a "$LOG"
[ "$BUILD_RC" -eq 0 ] || FAILED+=("build_ext(rc=$BUILD_RC)")
tail -n 30 "$OUT/build_ext.log" >>"$LOG"

step info 30 "$PY" -m source_fast.info
step pytest_ext_engine_cuda 200 "$PY" -m pytest -m cuda -q -rA -n 3 tests/test_ext_covariance.py \
    tests/test_engine_cuda.py
# Kernels against torch and kronfluence's Λ path, with the roofline measured in the same process.
step bench_kernels_bf16 150 env TRITON_PRINT_AUTOTUNING=1 "$PY" bench/bench_kernels.py --device cuda --dtype bfloat16 \
    --out "$OUT/bench_kernels_bf16.jsonl"
# The general and the cp.async-pipelined CUDA covariance kernels side by side (backends ext, ext_pipelined).
step bench_covariance_bf16 80 "$PY" bench/bench_covariance.py --device cuda --dtype bfloat16 \
    --out "$OUT/bench_covariance_bf16.jsonl"
# Same fp32 model, same inputs, both libraries on the GPU; each library in its own process. Each process
# pays CUDA's start and the float64 eigendecompositions (the first run's 100 s did not cover four of
# them), so the timed runs' scores are compared after timing (--check-train 0: two processes, not four),
# and each library's phases reach the log as soon as its process ends. No --log-dir: the machine returns
# at most 8 files from OUTDIR, and the 8 this script writes are the results.
step vs_kronfluence_gpt2 200 "$PY" bench/bench_vs_kronfluence.py --device cuda --workloads gpt2 \
    --seqs "${GPT2_SEQS:-128}" --tokens 512 --queries 32 --batch 16 --query-batch 32 --query-budget-mb 16384 \
    --check-train 0 --out "$OUT/vs_kronfluence_gpt2.jsonl"
# Where GPT-2's tokens/s go: torch.profiler tables per phase (ops by device and host time), 256 × 512.
step profile_gpt2_bf16 90 "$PY" bench/bench_gpt2.py --device cuda --dtype bfloat16 --seqs 256 \
    --profile "$OUT/gpt2_profile_bf16.txt" --out "$OUT/gpt2_profile_bf16.jsonl"
# tokens/s at GPT-2 small in bf16; the rest of the budget decides how far it gets (records per phase).
step bench_gpt2_bf16 240 "$PY" bench/bench_gpt2.py --device cuda --dtype bfloat16 --seqs 2048 \
    --out "$OUT/bench_gpt2_bf16.jsonl"

if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "FAILED: ${FAILED[*]} (t=${SECONDS}s)" | tee -a "$LOG"
    exit 1
fi
echo "all steps passed (t=${SECONDS}s)" | tee -a "$LOG"
