"""The bench scripts run end to end on CPU (Triton interpreted) and write what they promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_kernels_quick_writes_valid_jsonl(tmp_path, dtype):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import _harness
    finally:
        sys.path.remove(str(BENCH_DIR))
    out = tmp_path / "kernels.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_kernels.py"), "--quick", "--device", "cpu", "--dtype", dtype,
         "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for rec in records:
        _harness.validate_record(rec)
        assert rec["dtype"] == dtype and rec["device"] == "cpu"
    ops = {r["op"] for r in records}
    assert ops == {"accumulate_lambda_", "self_scores", "pairwise_scores"}
    assert {r["backend"] for r in records} == {"triton", "triton_gemm", "torch", "kronfluence"}
    assert {r["op"] for r in records if r["backend"] == "triton_gemm"} == {"pairwise_scores"}
    # Every backend was checked before it was timed: each matches the float64 reference. Λ's op is
    # checked on the rotated tokens it was given: fp32 accumulation, not the rotation's 16-bit rounding.
    assert all(r["sqnr_db"] > 40 for r in records), [(r["op"], r["backend"], r["sqnr_db"]) for r in records]
    assert all(r["sqnr_db"] > 100 for r in records if r["op"] == "accumulate_lambda_" and r["backend"] != "kronfluence")
    one_token = next(r for r in records if r["op"] == "accumulate_lambda_" and r["params"]["t"] == 1)
    n, d_a, d_out = (one_token["params"][k] for k in ("n", "d_a", "d_out"))  # one GEMM after the rotations
    assert one_token["flops"] == 2 * n * (d_a**2 + d_out**2) + 2 * n * d_out * d_a + n * (d_out + d_a)
    # A second run compared against the first finds every case (and no regression gate fires without a limit).
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_kernels.py"), "--quick", "--device", "cpu", "--dtype", dtype,
         "--backends", "torch", "--out", str(tmp_path / "again.jsonl"), "--compare", str(out)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("->") == sum(r["backend"] == "torch" for r in records)


def test_bench_covariance_quick_writes_valid_jsonl(tmp_path):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import _harness
    finally:
        sys.path.remove(str(BENCH_DIR))
    out = tmp_path / "cov.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_covariance.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for rec in records:
        _harness.validate_record(rec)
    assert {"torch", "addmm_loop"} <= {r["backend"] for r in records}
    assert all(r["sqnr_db"] > 100 for r in records)  # fp32 sums of exact 16-bit products


def test_a_wrong_kernel_is_reported_and_not_timed(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(BENCH_DIR))
    from source_fast import ops

    real = ops.self_scores
    monkeypatch.setattr(ops, "self_scores", lambda a, g, scale, mask=None, *, backend="auto": (
        real(a, g, scale, mask, backend=backend) * (0 if backend == "triton" else 1)))
    out = tmp_path / "k.jsonl"
    assert bench_kernels.main(["--quick", "--device", "cpu", "--backends", "triton,torch", "--out", str(out)]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["op"], r["backend"]) for r in records} == {(op, b) for op in ("accumulate_lambda_", "self_scores",
                                                         "pairwise_scores") for b in ("triton", "torch")} - {
        ("self_scores", "triton")}
    err = capsys.readouterr().err
    assert err.count("WRONG RESULT: self_scores") == 2 and "backend 'triton' is wrong (SQNR 0.0 dB" in err


def test_bench_gpt2_quick(tmp_path):
    out, prof = tmp_path / "gpt2.jsonl", tmp_path / "profile.txt"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_gpt2.py"), "--quick", "--device", "cpu", "--out", str(out),
                           "--profile", str(prof)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["phase"].split()[0] for r in records] == ["covariance", "eigen", "lambda", "score"]
    assert all(r["layers"] == 8 and r["seconds"] > 0 for r in records)  # 4 Conv1D per block × 2 blocks
    assert [r["tokens_per_s"] is None for r in records] == [False, True, False, False]
    tables = prof.read_text()
    assert tables.count("=====") == 4 and "aten::mm" in tables  # one table per phase, the GEMMs in it


def test_bench_vs_kronfluence_quick_digits(tmp_path):
    """Both libraries, every phase, scores checked equal before and after timing (the bench stops
    otherwise)."""
    out = tmp_path / "vs_kron.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_vs_kronfluence.py"), "--quick", "--workloads",
                           "digits_mlp", "--out", str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    phases = {"covariance", "eigen", "lambda", "score_32", "score_256"}
    for lib in ("kronfluence", "source_fast"):
        rows = [r for r in records if r["library"] == lib and r["phase"] != "setup"]
        assert {r["phase"] for r in rows} == phases and all(r["seconds"] > 0 for r in rows)
    assert all(r["check_pearson"] > 0.999 and r["timed_pearson"] > 0.999 for r in records)


def test_bench_vs_kronfluence_other_strategy(tmp_path):
    """--strategy diagonal: source_fast through its shim, scores checked equal before and after timing;
    the stages the strategy does not use (covariance, eigen) are still timed, as no-ops."""
    out = tmp_path / "vs_kron.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_vs_kronfluence.py"), "--quick", "--workloads",
                           "digits_mlp", "--strategy", "diagonal", "--queries", "32", "--check-train", "256", "--out",
                           str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["strategy"] for r in records} == {"diagonal"}
    for lib in ("kronfluence", "source_fast"):
        assert {r["phase"] for r in records if r["library"] == lib} == {"setup", "covariance", "eigen", "lambda",
                                                                        "score_32"}
    assert all(r["check_pearson"] > 0.999 and r["timed_pearson"] > 0.999 for r in records)


def test_bench_ranks_quick(tmp_path):
    """score and self_score on one process and on 2 gloo ranks: the ranks' result checked equal (the
    bench exits 1 otherwise) and both timed."""
    out = tmp_path / "ranks.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_ranks.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["op"] for r in records] == ["score", "self_score"]
    assert all(r["max_rel_error"] <= 1e-4 and r["one_process_s"] > 0 and r["ranks_s"] > 0 for r in records)


def test_bench_scaling_runs(tmp_path):
    """score_corpus at two sizes, each in its own process, with peak RSS."""
    out = tmp_path / "scaling.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_scaling.py"), "--sizes", "64", "128", "--out",
                           str(out), "--plot", ""], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["n"] for r in records] == [64, 128] and all(r["score_s"] > 0 and r["peak_rss_mb"] > 0 for r in records)


@pytest.mark.parametrize("mode", ["layer groups", "corpus", "joined"])
def test_bench_layer_groups_quick(mode):
    """The two ways' scores are compared inside (it exits non-zero when they differ); 6 queries of the quick
    GPT-2 (6 MiB prepared each) in a 13 MiB budget: 3 blocks; --joined: its 6 sequences in batches of 2."""
    extra = {"layer groups": [], "corpus": ["--corpus", "--shard-size", "3"],
             "joined": ["--joined", "--batch", "2"]}[mode]
    out = subprocess.run([sys.executable, str(BENCH_DIR / "bench_layer_groups.py"), "--quick", "--seqs", "6",
                          "--tokens", "16", "--queries", "6", "--budget-mb", "13", *extra],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "3 blocks of queries" in out.stderr and "median ratio" in out.stdout
    assert {"layer groups": "| repeat | layer groups s | blocks of queries s |",
            "corpus": "| repeat | shard by shard s | block by block s |",
            "joined": "| repeat | joined batches s | batch by batch s |"}[mode] in out.stdout
