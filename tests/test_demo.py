"""The README's main command, end to end: `python -m source_fast demo --quick --out DIR`."""

import json
import subprocess
import sys

import pytest

SCENARIOS = ["standard", "non_converged", "multi_stage", "regression"]
METHODS = [
    "SOURCE (L=1)", "SOURCE (L=3)", "Fast-SOURCE (L=3)", "TracIn", "IF (damping 1/c)", "IF (held-out damping)",
    "grad-dot", "TRAK", "TRAK (held-out dim, damping)", "TRAK, C checkpoints (held-out dim, damping)", "unroll",
    "same class",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "source_fast", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\x1b[A" not in proc.stderr  # into a log: no cursor-up codes of bars drawn under one another
    return out, proc.stdout


def test_demo_writes_a_well_formed_report(demo):
    out, stdout = demo
    assert str(out.resolve()) in stdout  # says where the outputs went
    report = json.loads((out / "lds.json").read_text())
    assert list(report["scenarios"]) == SCENARIOS
    for name in SCENARIOS:
        sc = report["scenarios"][name]
        # Multi-stage queries are fine-tune classes: no pretraining digit shares their class; the
        # regression has no classes at all.
        expected = [m for m in METHODS if not (name in ("multi_stage", "regression") and m == "same class")]
        assert sorted(sc["lds"]) == sorted(expected)
        # Exact unrolling of other data orders, where training is short enough (3 orders in --quick).
        rho = sc.get("rho_unroll", {})
        if name in ("non_converged", "regression"):
            assert sc["unroll_orders"] == 3 and sorted(rho) == sorted(expected)
        else:
            assert not rho and "unroll_orders" not in sc
        for m, iv in [*sc["lds"].items(), *rho.items()]:
            assert -1 <= iv["low"] <= iv["mean"] <= iv["high"] <= 1, (name, m, iv)
            assert len(iv["per_query"]) == sc["n_query"]
        for diff in sc["paired"].values():
            assert diff["low"] <= diff["mean"] <= diff["high"]
        # IF's damping and TRAK's dimension and damping are chosen on held-out queries, from their grids.
        assert set(sc["chosen"]) == {"IF", "TRAK", "TRAK, C checkpoints"}
        assert all(sc["chosen"][m] in sc["heldout_lds"][m] for m in sc["chosen"])
        assert sc["seed_agreement"] is None  # --quick retrains with one seed
    assert report["scenarios"]["regression"]["test_metric_name"] == "R²"
    # Subset removal: prediction flips of digits, the change of the squared error for regression.
    assert set(report["removal"]) == {"standard", "regression"}
    for name, rem in report["removal"].items():
        assert set(rem["methods"]) == {"SOURCE (L=3)", "IF (damping 1/c)", "random"}
        for r in rem["methods"].values():
            assert len(r["removed"]) == rem["queries"] and all(len(s) == rem["k"] for s in r["removed"])
            if name == "regression" or not any(r["correct"]):
                assert r["flip_rate"] is None
            else:
                assert 0 <= r["flip_rate"] <= 1
    table = (out / "lds.md").read_text()
    assert table.startswith("**A --quick run: a smoke test.**") and "--quick: a smoke test" in stdout
    assert "\n| SOURCE (L=3) | " in table and "Paired differences" in table
    assert "Subset removal (standard" in table and "Subset removal (regression" in table
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert header.count("ρ vs unroll (mean of 3 orders)") == 2 and header.count(" | ") == 6  # 4 LDS + 2 ρ columns
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["queries"]) == 4 and len(summary["pearson_source_vs_ekfac"]) == 4


def test_demo_writes_images_checkpoints_and_factors(demo):
    out, _ = demo
    for png in ("lds.png", "proponents.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    for name in SCENARIOS:
        assert list((out / name / "checkpoints").glob("*.safetensors"))
        for factors in ("factors_source", "factors_ekfac"):
            assert (out / name / factors / "factors.json").exists()
        (cache,) = (out / name).glob("retraining-*")
        assert (cache / "manifest.json").exists() and len(list((cache / "runs").glob("*.pt"))) == 12


def test_killing_the_demo_during_retraining_loses_nothing(tmp_path):
    """SIGKILL in the middle of retraining, run again: finished retrainings are kept (not redone)
    and the final numbers equal an uninterrupted run's."""
    import signal
    import time

    args = ["--quick", "--scenario", "regression", "--subsets", "30", "--seeds", "2", "--workers", "1"]
    run = lambda out: [sys.executable, "-m", "source_fast", "demo", "--out", str(out), *args]  # noqa: E731
    subprocess.run(run(tmp_path / "clean"), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(run(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    runs = lambda: list(killed.glob("regression/retraining-*/runs/*.pt"))  # noqa: E731
    while time.time() < deadline and len(runs()) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in runs()}
    assert 5 <= len(finished) < 60, "the demo must be killed during retraining"
    # While one demo writes into the folder, another is refused before it touches anything.
    from source_fast._dist import sole_writer

    with sole_writer(killed, "demo", None):
        busy = subprocess.run(run(killed), capture_output=True, text=True, timeout=300)
    assert busy.returncode != 0 and f"{killed} is being written by another demo run" in busy.stderr, busy.stderr[-2000:]
    # What a demo killed while saving leaves (temp files, safetensors' own, a Factors.save's) goes on the rerun.
    stale = [killed / ".lds.json.sf-a1b2c3.tmp", killed / "regression" / "checkpoints" / ".tmpAb3dE9",
             killed / "regression" / "factors_ekfac" / ".factors.sf-x1y2z3.tmp"]
    stale[0].write_text("{")
    stale[1].write_bytes(bytes(16))  # safetensors sizes its temp file before writing it
    stale[2].write_bytes(bytes(16))
    subprocess.run(run(killed), check=True, capture_output=True, timeout=600)
    assert not any(p.exists() for p in stale)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # kept, not redone
    assert len(runs()) == 60
    clean, again = (json.loads((d / "lds.json").read_text()) for d in (tmp_path / "clean", killed))
    timing = ("seconds", "score_seconds")
    strip = lambda sc: {k: v for k, v in sc.items() if k not in timing}  # noqa: E731
    assert strip(again["scenarios"]["regression"]) == strip(clean["scenarios"]["regression"])
    assert again["removal"] == clean["removal"]
    # Other settings in the same folder get their own retraining cache, not a refusal.
    more = [a if a != "30" else "32" for a in args]
    subprocess.run([sys.executable, "-m", "source_fast", "demo", "--out", str(killed), *more], check=True,
                   capture_output=True, timeout=600)
    assert len(list(killed.glob("regression/retraining-*"))) == 2


def test_a_demo_into_a_users_folder_removes_only_its_own_temp_files(tmp_path):
    """--out . : the folder's other subfolders hold other programs' temp files, possibly being written."""
    from source_fast.demo import _remove_stale_temps

    own = [tmp_path / ".lds.json.sf-a1b2c3.tmp", tmp_path / "regression" / "checkpoints" / ".tmpAb3dE9"]
    foreign = [tmp_path / "scores" / ".manifest.json.zz9.tmp", tmp_path / ".notes.txt.abc.tmp"]
    for p in own + foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes(16))
    _remove_stale_temps(tmp_path)
    assert not any(p.exists() for p in own) and all(p.exists() for p in foreign)
