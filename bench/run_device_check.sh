#!/usr/bin/env bash
# One script for a lent GPU (H200: torch 2.11, triton 3.6, Python 3.12 preinstalled; no network).
#   bench/run_device_check.sh OUTDIR
# Builds the extension for sm_90 only, prints the backend table, runs the `cuda` tests, then the kernel
# benches, each step under its own time limit (sum of limits 7 min; a normal run is well under). Every
# step logs into OUTDIR/device_check.log and the script carries on past a failed step, so one run
# reports everything; the exit code is non-zero if any step failed.
set -uo pipefail

OUT=${1:?usage: $0 OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/device_check.log"
cd "$(dirname "$0")/.."

export SOURCE_FAST_REQUIRE_EXT=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
unset TRITON_INTERPRET  # a leftover interpreter flag would silently run every kernel on the CPU
FAILED=()

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED+=("$name(rc=$rc)")
}

{ nvidia-smi; python -c 'import sys, torch, triton; print(sys.version, torch.__version__, torch.version.cuda, triton.__version__)'; } >>"$LOG" 2>&1

# --no-deps: the environment already has torch and friends, and the machine has no network.
step install 120 python -m pip install --no-build-isolation --no-deps -e .
step info 20 python -m source_fast.info
step pytest_cuda 80 python -m pytest -m cuda -q -rs --junitxml "$OUT/pytest_cuda.xml"
# Autotuning happens on the first call per shape; the bench writes each case as soon as it is measured.
step bench_kernels_bf16 100 python bench/bench_kernels.py --device cuda --dtype bfloat16 \
    --out "$OUT/bench_kernels_bf16.jsonl"
step bench_covariance_bf16 40 python bench/bench_covariance.py --device cuda --dtype bfloat16 \
    --out "$OUT/bench_covariance_bf16.jsonl"
# tokens/s at GPT-2 small: 1,024 sequences keep it inside the budget (throughput is per token).
step bench_gpt2_bf16 60 python bench/bench_gpt2.py --device cuda --dtype bfloat16 --seqs 1024 \
    --out "$OUT/bench_gpt2_bf16.jsonl"

if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "FAILED: ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi
echo "all steps passed" | tee -a "$LOG"
