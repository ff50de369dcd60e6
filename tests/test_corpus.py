"""Sharded, resumable corpus scoring: equal to in-memory scores, top-k, kill-and-resume with
identical bytes, checksums, foreign manifests, and torchrun with 2 gloo processes."""

import copy
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _corpus_job import SlowTask, in_memory, job

import source_fast as sf
import source_fast._replay as replay
import source_fast.corpus as corpus
from source_fast.corpus import load_scores, load_top_k, score_corpus
from source_fast.tasks import ClassificationTask
from _helpers import (
    ClassifyTask, CountingData, LeavesOutClass2, RegressTask, classification_data, mlp, torchrun,
)

HERE = Path(__file__).parent
JOB = [sys.executable, str(HERE / "_corpus_job.py")]


def _digest(out: Path) -> dict[str, str]:
    files = sorted((out / "shards").glob("*")) + [out / "manifest.json"] + sorted(out.glob("top_k.safetensors"))
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference():
    model, data, queries, traj = job()
    task = ClassifyTask()
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    return model, task, data, queries, traj, factors, sf.score(model, task, traj, factors, data, queries)


TWO_QUERIES = 2 * 4 * (7 * 7 + 4 * 8) * 2  # prepared bytes of two queries: 2 segments, float32, 81 parameters


def _block_by_block(monkeypatch):
    monkeypatch.setattr(corpus, "_one_read_pays", lambda *args: False)


@pytest.mark.parametrize("order", ["shard by shard", "block by block"])
def test_shards_and_query_blocks_equal_in_memory_scores(reference, tmp_path, capsys, monkeypatch, order):
    """Queries in 3 blocks (a budget of two queries), rows in 6 shards of at most 16: on a CPU each shard is
    read once and scored against every query; block by block (a GPU, ranks, small shards) reads the rows
    once per block. The files are the same either way (one per block and shard)."""
    model, task, data, queries, traj, factors, full = reference
    if order == "block by block":
        _block_by_block(monkeypatch)
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=16, query_memory_budget=TWO_QUERIES)
    assert len(list((tmp_path / "shards").glob("q2_*.safetensors"))) == 6
    # The progress counts shards, or (block, shard) pairs: 6 shards in each of 3 blocks.
    lines = [line for line in capsys.readouterr().out.splitlines() if "scored in" in line]
    if order == "shard by shard":
        assert lines[-1].startswith("shard 6/6: rows 80-90: scored in ")
        assert lines[-1].endswith("; 6/6 shards done, about 0 s left"), lines[-1]
    else:
        assert lines[-1].startswith("query block 3/3, shard 6/6: rows 80-90: scored in ")
        assert lines[-1].endswith("; 18/18 shards of 3 query blocks done, about 0 s left"), lines[-1]
    got = load_scores(tmp_path)
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-7), (got - full).abs().max()


def test_shard_by_shard_reads_the_corpus_as_often_as_one_block(reference, tmp_path):
    """Three query blocks cost no more reads of the training data than one: each row once per checkpoint
    (the later layer groups replay the shard's pass from disk) and once for its shard's fingerprint."""
    model, task, data, queries, traj, factors, full = reference
    once, counted = CountingData(data), CountingData(data)
    score_corpus(model, task, traj, factors, once, queries, tmp_path / "one", shard_size=16, train_segments="all",
                 progress=False)
    score_corpus(model, task, traj, factors, counted, queries, tmp_path / "three", shard_size=16,
                 train_segments="all", query_memory_budget=TWO_QUERIES, progress=False)
    assert len(list((tmp_path / "three" / "shards").glob("q2_*.safetensors"))) == 6
    assert counted.reads == once.reads
    got = load_scores(tmp_path / "three")
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-7), (got - full).abs().max()


def test_either_order_resumes_the_other(reference, tmp_path, monkeypatch):
    """A run block by block that stopped after some shards is finished shard by shard: the shards done in
    every block are skipped, those missing a block scored again; and the other way round."""
    model, task, data, queries, traj, factors, full = reference

    def run(counted=None):
        score_corpus(model, task, traj, factors, counted or data, queries, tmp_path, shard_size=16,
                     train_segments="all", query_memory_budget=TWO_QUERIES, progress=False)

    with pytest.MonkeyPatch.context() as mp:
        _block_by_block(mp)
        run()
    finished = _digest(tmp_path)
    done = CountingData(data)
    run(done)  # nothing left to score: the checks' and the shards' fingerprints' reads
    assert _digest(tmp_path) == finished
    for stem in ("q1_32-48", "q2_80-90"):  # shards 3 and 6 each lose one block's scores
        (tmp_path / "shards" / f"{stem}.safetensors").unlink()
    counted = CountingData(data)
    run(counted)
    # Shards 3 and 6 (26 rows) read again once per checkpoint (2 segments of 2), every block's scores at once.
    assert counted.reads == done.reads + 26 * 4
    got = load_scores(tmp_path)
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-7), (got - full).abs().max()
    untouched = {k: v for k, v in finished.items() if "_32-48" not in k and "_80-90" not in k}
    assert {k: v for k, v in _digest(tmp_path).items() if k in untouched} == untouched
    (tmp_path / "rows.json").unlink()
    (tmp_path / "shards" / "q0_0-16.safetensors").unlink()
    _block_by_block(monkeypatch)
    run()
    assert torch.allclose(load_scores(tmp_path), got, rtol=1e-5, atol=1e-7)


def test_without_disk_room_the_queries_go_in_blocks(reference, tmp_path, monkeypatch):
    model, task, data, queries, traj, factors, full = reference
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(replay, "DISK_MARGIN", 1 << 62)
    with pytest.warns(UserWarning, match=r"score_corpus: the disk cannot keep a shard's passes over the data \(.*\): "
                                         r"the queries go in 3 blocks instead, each re-reading the training data"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path / "out", shard_size=16,
                     query_memory_budget=TWO_QUERIES, progress=False)
    got = load_scores(tmp_path / "out")
    assert torch.allclose(got, full, rtol=1e-5, atol=1e-7), (got - full).abs().max()
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("order", ["shard by shard", "block by block"])
def test_queries_without_gradient_are_named_once(tmp_path, monkeypatch, order):
    """Queries 1 and 4 have no measurement gradient: one warning for the run, numbered among all queries,
    however many blocks, shards and layer groups prepared them."""
    model = mlp(4, 5, 3, dtype=torch.float32)
    data, queries = classification_data(40, 4, 3, dtype=torch.float32), classification_data(6, 4, 3, seed=1,
                                                                                            dtype=torch.float32)
    queries.tensors[1][:] = torch.tensor([0, 2, 1, 0, 2, 1])
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassificationTask(), traj)
    if order == "block by block":
        _block_by_block(monkeypatch)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        score_corpus(model, LeavesOutClass2(), traj, factors, data, queries, tmp_path, "ekfac", shard_size=8,
                     query_memory_budget=2 * 43 * 4, progress=False)
    assert len(list((tmp_path / "shards").glob("q2_*.safetensors"))) == 5
    named = [str(w.message) for w in said if "no gradient" in str(w.message)]
    assert len(named) == 1 and "queries: 2 of 6 have" in named[0] and "(numbers [1, 4])" in named[0], named


def test_top_k_matches_the_full_matrix(reference, tmp_path):
    model, task, data, queries, traj, factors, full = reference
    one_query = 2 * 4 * (7 * 7 + 4 * 8)  # prepared bytes of one query: 2 segments, float32, 81 parameters
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=16, top_k=5, query_memory_budget=one_query,
                 progress=False)
    assert len(list((tmp_path / "shards").glob("q4_*.safetensors"))) == 6  # 5 blocks of one query
    with pytest.raises(ValueError, match=r"take 648 bytes \(2 copies of 2 layers\), more than query_memory_budget=600: .* "
                                         r"\(query_rank=2 fits\)"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path / "x", top_k=5, query_memory_budget=600)
    with pytest.raises(ValueError, match=r"scored with top_k=5: .* read it with load_top_k"):
        load_scores(tmp_path)
    top = load_top_k(tmp_path)
    for side, largest in (("top", True), ("bottom", False)):
        want = full.topk(5, dim=1, largest=largest)
        assert torch.allclose(top[f"{side}_values"], want.values, rtol=1e-5, atol=1e-7)
        assert torch.allclose(full.gather(1, top[f"{side}_indices"]), want.values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shard_size", [16, 4096])
def test_top_k_ties_go_to_the_lower_row_whatever_the_shards(shard_size, tmp_path):
    """A query without a measurement gradient scores 0 against every row: its k largest and smallest are
    rows 0..k-1 (ties to the lower row, in each shard as in the merge), not whichever the shards' topk
    picked. The checksummed file is verified on reading: a flipped byte is an error, not other scores."""
    model = mlp(4, 5, 3, dtype=torch.float32)
    data, queries = classification_data(40, 4, 3, dtype=torch.float32), classification_data(3, 4, 3, seed=1,
                                                                                            dtype=torch.float32)
    queries.tensors[1][:] = torch.tensor([0, 2, 1])
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.warns(UserWarning, match="no gradient"):
        score_corpus(model, LeavesOutClass2(), traj, None, data, queries, tmp_path, "grad_dot", shard_size=shard_size,
                     top_k=3, progress=False)
    top = load_top_k(tmp_path)
    assert (top["top_values"][1] == 0).all() and (top["bottom_values"][1] == 0).all()
    assert top["top_indices"][1].tolist() == top["bottom_indices"][1].tolist() == [0, 1, 2]
    path = tmp_path / "top_k.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="top_k.safetensors is missing or corrupted .* run score_corpus again"):
        load_top_k(tmp_path)
    score_corpus(model, LeavesOutClass2(), traj, None, data, queries, tmp_path, "grad_dot", shard_size=shard_size,
                 top_k=3, progress=False)
    assert torch.equal(load_top_k(tmp_path)["top_indices"], top["top_indices"])
    score_corpus(model, LeavesOutClass2(), traj, None, data, queries, tmp_path / "full", "grad_dot", progress=False)
    with pytest.raises(ValueError, match="scored without top_k: read its full matrix with load_scores"):
        load_top_k(tmp_path / "full")


def test_a_run_stopped_before_its_first_shard_binds_nobody(reference, tmp_path, monkeypatch):
    """A damping refused at the first pass, or running out of memory (whose hint says to lower the budget),
    stops a run after its manifest but before any shard: the corrected rerun is accepted. Once shards exist,
    another budget that cuts the same query blocks resumes them; one that cuts others is refused."""
    model, task, data, queries, traj, factors, full = reference
    final = traj.final()
    fitted = sf.fit_factors(model, task, final, fisher="empirical", batch_size=8)
    with pytest.raises(ValueError, match="damping"):
        score_corpus(model, task, final, fitted, data, queries, tmp_path / "d", "ekfac", damping=-1.0, progress=False)
    score_corpus(model, task, final, fitted, data, queries, tmp_path / "d", "ekfac", damping=0.1, progress=False)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(corpus, "_score_in_layer_groups", oom)
        with pytest.raises(torch.OutOfMemoryError, match="lower batch_size .* or query_memory_budget"):
            score_corpus(model, task, traj, factors, data, queries, tmp_path / "m", shard_size=32,
                         query_memory_budget=TWO_QUERIES, progress=False)
    score_corpus(model, task, traj, factors, data, queries, tmp_path / "m", shard_size=32,
                 query_memory_budget=TWO_QUERIES // 2, progress=False)
    before = _digest(tmp_path / "m")
    first = sorted((tmp_path / "m" / "shards").glob("q0_*.safetensors"))[0]
    first.unlink()
    score_corpus(model, task, traj, factors, data, queries, tmp_path / "m", shard_size=32,
                 query_memory_budget=TWO_QUERIES // 2 + 1, progress=False)  # the same blocks of one query
    assert _digest(tmp_path / "m") == before
    with pytest.raises(ValueError, match="differs in: options \\(query_blocks"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path / "m", shard_size=32,
                     query_memory_budget=TWO_QUERIES, progress=False)
    torch.testing.assert_close(load_scores(tmp_path / "m"), full, rtol=1e-5, atol=1e-7)


def _scaled(batch, scale=1.0):
    x, y = torch.utils.data.default_collate(batch)
    return x * scale, y


def test_a_loaders_collate_function_is_part_of_the_run(reference, tmp_path):
    """Tokenisation and max_length often live in the collate function: a resume given another one (the
    loader's own, another partial's arguments, a lambda whose code differs) is another run, refused; the
    same one resumes."""
    import functools

    model, task, data, queries, traj, factors, _ = reference

    def run(fn, out=tmp_path):
        loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=fn)
        score_corpus(model, task, traj, factors, loader, queries, out, train_segments="all", shard_size=32,
                     progress=False)

    run(functools.partial(_scaled, scale=1.0))
    before = _digest(tmp_path)
    run(functools.partial(_scaled, scale=1.0))
    assert _digest(tmp_path) == before
    for other in (functools.partial(_scaled, scale=2.0), None, lambda b: _scaled(b, 1.0)):
        with pytest.raises(ValueError, match=r"differs in: task\)"):
            run(other)
    run(lambda b: _scaled(b, 1.0), tmp_path / "lambdas")
    run(lambda b: _scaled(b, 1.0), tmp_path / "lambdas")  # another lambda of the same code: the same run
    with pytest.raises(ValueError, match=r"differs in: task\)"):
        run(lambda b: _scaled(b, 2.0), tmp_path / "lambdas")


def test_a_resumed_streams_finished_shards_of_a_rank_are_one_line(capsys):
    """A stream under 2 ranks: rank 0 has shards 0, 2, 4, ...; a resume's finished ones are one line."""
    from source_fast.corpus import _ShardLog

    log = _ShardLog(True, "[rank 0] ", "/10", 5, step=2)
    for k in range(0, 10, 2):
        log.skipped("query block 1/1", k, 100 * k, 100 * (k + 1))
    log.flush()
    assert capsys.readouterr().out.splitlines() == [
        "[rank 0] query block 1/1, shards 1-9/10, 1 in 2: rows 0-900 already done"]


def test_the_time_left_counts_the_later_query_blocks_preparation(capsys):
    """2 query blocks × 4 shards: after block 1's queries took 10 s and its first shard 1 s, 7 shards
    and one more preparation are left: 7 × 1 + 10 = 17 s."""
    from source_fast.corpus import _ShardLog

    log = _ShardLog(True, "", "/4", 8, "shards of 2 query blocks")
    log.prepared(10.0, later_blocks=1)
    log.scored("query block 1/2, shard 1/4: rows 0-16", 16, 1.0)
    assert capsys.readouterr().out.strip().endswith("; 1/8 shards of 2 query blocks done, about 17 s left")


def test_numpy_integers_as_options_resume_as_python_ones(reference, tmp_path):
    """Options given as numpy integers (an index or a config read with numpy) go into the manifest and
    fit.json as numbers: accepted, and a resume with Python ints is the same run."""
    model, task, data, queries, traj, factors, _ = reference
    kw = dict(shard_size=np.int64(32), top_k=np.int64(3), query_rank=np.int64(2), progress=False)
    score_corpus(model, task, traj, factors, data, queries, tmp_path / "scores", **kw)
    before = _digest(tmp_path / "scores")
    score_corpus(model, task, traj, factors, data, queries, tmp_path / "scores", **{k: int(v) if k != "progress" else v
                                                                                     for k, v in kw.items()})
    assert _digest(tmp_path / "scores") == before
    fitted = sf.fit_factors(model, task, traj, fisher="empirical", seed=np.int64(1), batch_size=np.int64(8),
                            resume_dir=tmp_path / "fit")
    again = sf.fit_factors(model, task, traj, fisher="empirical", seed=1, batch_size=8, resume_dir=tmp_path / "fit")
    assert torch.equal(fitted.segments[0]["0"].lam, again.segments[0]["0"].lam)
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        sf.fit_factors(model, task, traj, seed=1.5)


def test_foreign_manifest_is_refused_and_corrupted_shards_are_recomputed(reference, tmp_path, capsys):
    model, task, data, queries, traj, factors, full = reference
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    before = _digest(tmp_path)
    with pytest.raises(ValueError, match=r"output of a different run \(it differs in: options \(top_k: "
                                         r"None before, 5 now\)\)"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, top_k=5, progress=False)
    other = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, seed=1)
    other = sf.Factors(other.layers, [{k: type(v)(v.a_cov, v.s_cov, v.q_a, v.q_s, v.lam * 2) for k, v in seg.items()} for seg in other.segments], other.num_examples, other.layout, other.fisher, other.average_params)
    with pytest.raises(ValueError, match="differs in: factors"):
        score_corpus(model, task, traj, other, data, queries, tmp_path, shard_size=32, progress=False)
    with pytest.raises(ValueError, match=r"differs in: task\)"):  # another loss (or measurement)
        score_corpus(model, RegressTask(), traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    with pytest.raises(ValueError, match=r"differs in: model_dtypes \(\['torch.float32'\] before, "
                                         r"\['torch.float64'\] now\)\)"):  # another precision's gradients
        score_corpus(copy.deepcopy(model).double(), task, traj, factors, data, queries, tmp_path, shard_size=32,
                     progress=False)
    # The same options cutting the queries into other blocks (a changed budget rule): the old shards hold
    # another block's queries, so they are not this run's.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpus, "query_blocks", lambda *a, **k: [range(0, 2), range(2, len(queries))])
        with pytest.raises(ValueError, match=r"differs in: options \(query_blocks: \[\[0, \d+\]\] before"):
            score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    shard = sorted((tmp_path / "shards").glob("*.safetensors"))[1]
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0x55
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="missing or corrupted"):
        load_scores(tmp_path)
    # What a job killed while writing leaves: temp files that never got their names. A rerun removes them.
    (tmp_path / "shards" / f".{shard.name}.sf-x1y2.tmp").write_bytes(blob[:100])
    (tmp_path / ".rows.json.sf-x1y2.tmp").write_text("{")
    (tmp_path / "shards" / ".tmpAb3dE9").write_bytes(blob[:100])  # safetensors' own, inside save_file
    assert shard.read_bytes() == bytes(blob)  # reading reports the shard, it leaves it for the rerun
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("query block")]
    timed = r"query block 1/1, shard 2/3: rows 32-64: scored in \d+\.\d s \(\d+ rows/s\); 2/3 shards done, about \d+ s left"
    assert len(lines) == 4 and re.fullmatch(timed, lines[2]), lines  # the time taken varies with the machine
    assert lines[:2] + lines[3:] == [
        "query block 1/1, shard 1/3: rows 0-32 already done",
        "query block 1/1, shard 2/3: rows 32-64: its shard was corrupted, incomplete or of other examples; scoring it again",
        "query block 1/1, shard 3/3: rows 64-90 already done"], lines
    assert _digest(tmp_path) == before
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".tmp*"))
    (tmp_path / "manifest.json").unlink()  # its shards can no longer say which run they are from
    with pytest.raises(ValueError, match="holds score shards but no manifest.json"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)


def test_out_of_memory_suggests_the_fix(reference, tmp_path, monkeypatch):
    import source_fast.scoring as scoring

    model, task, data, queries, traj, factors, _ = reference

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(corpus, "_score_in_layer_groups", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"scoring rows 0-32: lower batch_size \(32\) or query_memory_budget"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path / "by_shard", shard_size=32,
                     query_memory_budget=TWO_QUERIES, progress=False)
    monkeypatch.setattr(corpus, "score_rows", oom)
    with pytest.raises(torch.OutOfMemoryError, match="rows 0-32 against query block 0: lower batch_size"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    monkeypatch.setattr(corpus, "prepare_queries", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"preparing query block 0: lower batch_size \(32\)"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    monkeypatch.setattr(scoring, "score_rows", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"scoring query block 0 \(5 queries\): .* or set query_rank"):
        sf.score(model, task, traj, factors, data, queries)


def test_killed_job_resumes_with_identical_bytes(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(JOB + [str(clean), "--top-k", "3"], check=True, timeout=300)
    proc = subprocess.Popen(JOB + [str(killed), "--top-k", "3", "--slow", "0.02"])
    deadline = time.time() + 240
    while time.time() < deadline and len(list((killed / "shards").glob("*.json"))) < 4:
        time.sleep(0.05)
    done_before = {p.name: p.stat().st_mtime_ns for p in (killed / "shards").glob("*.json")}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= len(done_before) < 18, "the job must be killed midway"
    assert not (killed / "top_k.safetensors").exists()
    subprocess.run(JOB + [str(killed), "--top-k", "3"], check=True, timeout=300)
    for name, mtime in done_before.items():  # finished shards were not redone
        assert (killed / "shards" / name).stat().st_mtime_ns == mtime
    assert _digest(killed) == _digest(clean)
    assert not list(killed.rglob("*.tmp"))


@pytest.mark.parametrize("stream", [False, True], ids=["dataset", "stream"])
def test_torchrun_two_gloo_processes_equal_one(reference, tmp_path, stream):
    """A dataset: each rank fits on and scores contiguous slices. A stream: every rank reads it all and
    keeps every other example (fitting) or shard (scoring)."""
    model, task, data, queries, traj, factors, full = reference
    job = [HERE / "_corpus_job.py", tmp_path / "scores", "--factors-out", tmp_path / "factors"]
    run = torchrun(*job, *(["--stream"] if stream else []))
    assert run.returncode == 0, run.stderr[-4000:]
    dist_factors = sf.Factors.load(tmp_path / "factors")
    for a, b in zip(dist_factors.segments, factors.segments):
        for name in a:
            assert torch.allclose(a[name].a_cov, b[name].a_cov, rtol=1e-5, atol=1e-7)
            assert torch.allclose(a[name].lam, b[name].lam, rtol=1e-4, atol=1e-8)
    got = load_scores(tmp_path / "scores")
    assert torch.allclose(got, full, rtol=1e-4, atol=1e-6), (got - full).abs().max()
    if not stream:  # the same folder asked for another run: refused as that, not as ranks that disagree
        run = torchrun(*job[:2], "--top-k", "3")
        assert run.returncode != 0 and "differs in: options (top_k: None before, 3 now)" in run.stderr, run.stderr[-3000:]
        assert "every rank must be given the same inputs" not in run.stderr


def test_torchrun_ranks_split_the_eigendecompositions(tmp_path):
    """The factors' eigendecompositions are shared out, not repeated on every rank: 2 segments × 2
    layers × 2 covariances = 8 in all, each run once, on one rank, the ranks' loads balanced by d³
    (the factors equal one process's: test_torchrun_two_gloo_processes_equal_one)."""
    run = torchrun(HERE / "_corpus_job.py", tmp_path, "--fit-only", "--count-eigh")
    assert run.returncode == 0, run.stderr[-4000:]
    counts = {int(r): int(n) for r, n in re.findall(r"rank (\d): (\d+) eigendecompositions", run.stdout)}
    assert counts == {0: 4, 1: 4}, run.stdout


@pytest.mark.parametrize("stream", [False, True], ids=["dataset", "stream"])
def test_torchrun_score_and_self_score_split_the_rows_and_equal_one_process(reference, tmp_path, stream):
    """score and self_score under torchrun: each rank scores its share of the training rows (a
    dataset's contiguous half, a stream's every other example) and every rank returns all of them, in
    order: what one process computes, for SOURCE's scores in one and in three query blocks, per
    module, self-influence chunked, with the measurement and fused, and (datasets) the baselines TRAK
    over two checkpoints, gradient cosine and representation similarity. (The factors are fitted on
    two ranks: float32 sums in another order, hence the tolerance of the corpus test above.)"""
    model, task, data, queries, traj, factors, _ = reference
    run = torchrun(HERE / "_corpus_job.py", tmp_path, "--in-memory", *(["--stream"] if stream else []))
    assert run.returncode == 0, run.stderr[-4000:]
    if stream:  # the same examples and checkpoints, as a stream
        _, data, _, traj = job(stream=True)
    expected = in_memory(model, task, traj, factors, data, queries)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, want in expected.items():
        for r, got in enumerate(ranks):
            pairs = [(got[name], want)] if not isinstance(want, dict) else [(got[name][k], want[k]) for k in want]
            for a, b in pairs:
                assert a.shape == b.shape, (name, r)
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, r, (a - b).abs().max())
        if not isinstance(want, dict):
            assert torch.equal(ranks[0][name], ranks[1][name]), name
    # The ranks prepared their shares of the 5 queries, 2 and 3, not all 5 each.
    SlowTask.measured = 0
    sf.score(model, SlowTask(), traj, factors, data, queries, batch_size=8)
    assert [int((tmp_path / f"measured{r}").read_text()) for r in (0, 1)] == [SlowTask.measured - 3, SlowTask.measured - 2]


@pytest.mark.parametrize("flag, differ", [(["--skew"], "queries"),
                                          (["--presharded", "even"], "training data (length and sampled examples)")],
                         ids=["queries", "presharded"])
def test_torchrun_score_refuses_ranks_given_different_inputs(tmp_path, flag, differ):
    """Each rank's columns go into one matrix: ranks given other queries, or each its own part of the
    training data, are refused on every rank, naming what differs."""
    run = torchrun(HERE / "_corpus_job.py", tmp_path, "--in-memory", *flag)
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the ranks were given different inputs to score: they differ in {differ}" in run.stderr, \
            run.stderr[-3000:]
    assert not list(tmp_path.glob("rank*.pt"))


@pytest.mark.parametrize("fault", ["nan", "fit-nan", "corpus-nan", "budget"])
def test_torchrun_failing_on_one_rank_ends_the_job_with_the_reason(tmp_path, fault):
    """A NaN example in rank 1's share fails there only, when scoring, fitting or scoring a corpus:
    that rank ends at once with the reason and torchrun stops the other, which does not wait for it.
    A budget given to rank 0 alone (rank 1's automatic) would cut other query blocks: refused on both
    ranks, not a hang (and a numpy query_rank compares)."""
    run = torchrun(HERE / "_corpus_job.py", tmp_path, "--fault", fault)
    assert run.returncode != 0
    if fault != "budget":
        nan = r"FloatingPointError: rank 1: .*\(examples from (77|80)\): the train loss is nan"
        assert re.search(nan, run.stderr), run.stderr[-3000:]
    else:
        for rank in (0, 1):
            assert (f"rank {rank}: the ranks were given different inputs to score: they differ in method and options"
                    in run.stderr), run.stderr[-3000:]


def test_torchrun_ranks_given_different_inputs_are_refused(tmp_path):
    """Every rank checks its own inputs against the manifest rank 0 wrote, so a job whose ranks build
    different data stops (all ranks together) instead of scoring a matrix of two runs' shards."""
    run = torchrun(HERE / "_corpus_job.py", tmp_path / "scores", "--skew")
    assert run.returncode != 0
    assert "rank 1: the ranks were given different inputs: this rank's differ from rank 0's in: query_data" in \
        run.stderr, run.stderr[-3000:]  # not "delete the folder": it was new
    assert "rank 0: another rank refused the run" in run.stderr  # not left waiting at a barrier
    assert not list((tmp_path / "scores").glob("shards/*.json"))
    assert not (tmp_path / "scores" / "manifest.json").exists()  # the run never started: the folder is free


@pytest.mark.parametrize("skew, differ", [("checkpoints", "checkpoints (contents)"),
                                         ("dtype", "model (parameter and buffer names, shapes, dtypes)")])
def test_torchrun_ranks_fitting_other_weights_are_refused(tmp_path, skew, differ):
    """A stale copy of a checkpoint on one node, or a model loaded in another dtype there: the
    all-reduced sums would mix two fits, saved as one. Every rank refuses, naming what differs."""
    run = torchrun(HERE / "_corpus_job.py", tmp_path / "scores", "--skew-fit", skew, "--fit-only", "--factors-out",
                   tmp_path / "factors")
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the ranks were given different inputs to fit_factors: they differ in {differ}" in \
            run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "factors").exists()


def test_torchrun_ranks_that_see_different_resume_folders_are_refused(tmp_path):
    """resume_dir on each node's own disk: rank 0 finds the passes a single-process fit left there,
    rank 1 finds none, so their all-reduces would pair other passes' sums (wrong factors, saved as
    right): both ranks refuse at the first pass. And a process launched by torchrun without a process
    group would do the whole job beside the others: refused."""
    job = [str(HERE / "_corpus_job.py"), str(tmp_path / "scores"), "--resume-per-rank", str(tmp_path / "local"),
           "--fit-only"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *job], check=True, timeout=300, env=env)  # fills local/rank0
    run = torchrun(*job)
    assert run.returncode != 0
    assert "the ranks disagree on whether resume_dir" in run.stderr, run.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 \(torchrun\) but no torch.distributed process group"):
            sf._dist.rank_and_world()


def test_torchrun_ranks_given_their_own_part_of_the_data_are_told(tmp_path):
    """Handed a pre-sharded part each, the ranks would fit part of the data, silently. Parts of other
    sizes are refused by the fit; equal parts are warned about (data augmented at random per rank
    differs the same way), and score_corpus then refuses them (its manifest hashes the data)."""
    for parts in ("uneven", "even"):
        run = torchrun(HERE / "_corpus_job.py", tmp_path / parts, "--presharded", parts)
        assert run.returncode != 0
        if parts == "uneven":
            for rank in (0, 1):
                assert f"rank {rank}: the ranks were given different inputs to fit_factors" in run.stderr, run.stderr[-3000:]
        else:
            assert "the ranks' data differ at sampled examples" in run.stderr, run.stderr[-3000:]
            assert "differ from rank 0's in: train_data" in run.stderr, run.stderr[-3000:]


MERGE = """
import resource, sys
from pathlib import Path
import torch
from source_fast.corpus import _merge_top_k, _write_shard
out, n_query, k, shards = Path(sys.argv[1]), 100, 20, [(s, s + 40) for s in range(0, 40 * 1000, 40)]
g = torch.Generator().manual_seed(0)
for rows in shards:
    _write_shard(out, 0, rows, torch.randn(n_query, 40, generator=g), k, "")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_merge_top_k(out, [range(n_query)], shards, k)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_top_k_merge_memory_does_not_grow_with_the_shards(tmp_path):
    """1,000 shards of 100 queries' top and bottom 20: the merge keeps a running k per query (about
    0.1 MB), not every shard's candidates at once (about 50 MB read, and as much again sorting them)."""
    run = subprocess.run([sys.executable, "-c", MERGE, str(tmp_path)], check=True, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    grown_mb = int(run.stdout.split()[-1])
    assert grown_mb < 20, f"the merge grew the peak RSS by {grown_mb} MB"


def test_a_refused_method_leaves_the_output_folder_unwritten(reference, tmp_path):
    """ekfac on a trajectory of several checkpoints is refused before the manifest is written, so the
    folder still takes the corrected run."""
    model, task, data, queries, traj, factors, _ = reference
    with pytest.raises(ValueError, match=r"method 'ekfac' uses one checkpoint; pass trajectory.final\(\)"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path / "s", method="ekfac", progress=False)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    final = traj.final()
    f_final = sf.fit_factors(model, task, final, fisher="empirical", batch_size=8)
    score_corpus(model, task, final, f_final, data, queries, tmp_path / "s", method="ekfac", progress=False)
    assert load_scores(tmp_path / "s").shape == (len(queries), len(data))


class WeightedTask(ClassifyTask):
    """Class weights in the loss: a tensor setting, which a resumed run must match by value."""

    def __init__(self, weight):
        self.weight = weight

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y, weight=self.weight, reduction="sum")

    compute_measurement = compute_train_loss


def test_a_resumed_run_must_match_every_query_the_task_values_and_all_factors(reference, tmp_path):
    """What a restart compares is the whole run: every query (not a sample of them: query 1 of 40 is
    not among 16 evenly spaced ones), a task's tensor settings by value, and all the factors scoring
    reads (bases and Adam's preconditioner too, not only Λ)."""
    model, _, data, _, traj, factors, _ = reference
    queries = classification_data(40, 6, 4, seed=3, dtype=torch.float32)
    task = WeightedTask(torch.ones(4))
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=32, progress=False)
    changed = classification_data(40, 6, 4, seed=3, dtype=torch.float32)
    changed.tensors[1][1] = (changed.tensors[1][1] + 1) % 4
    with pytest.raises(ValueError, match=r"differs in: query_data\)"):
        score_corpus(model, task, traj, factors, data, changed, tmp_path, shard_size=32, progress=False)
    with pytest.raises(ValueError, match=r"differs in: task\)"):
        score_corpus(model, WeightedTask(torch.tensor([1.0, 2.0, 1.0, 1.0])), traj, factors, data, queries, tmp_path,
                     shard_size=32, progress=False)
    rotated = sf.Factors(factors.layers, [{k: type(v)(v.a_cov, v.s_cov, v.q_a.flip(1), v.q_s, v.lam) for k, v in seg.items()}
                                          for seg in factors.segments], factors.num_examples, factors.layout,
                         factors.fisher, factors.average_params)
    with pytest.raises(ValueError, match=r"differs in: factors\)"):
        score_corpus(model, task, traj, rotated, data, queries, tmp_path, shard_size=32, progress=False)


FISHER_DRAWS = """
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from _corpus_job import job
from _helpers import RegressTask
import source_fast as sf

class Recorded(RegressTask):
    def compute_train_loss(self, batch, model, sample=False):
        if sample:  # the draw the task makes for its true-Fisher targets
            draws.append(torch.randn(4))
        return super().compute_train_loss(batch, model, sample)

torch.distributed.init_process_group("gloo")
draws = []
model, data, _, traj = job()
x, y = data.tensors
regress = torch.utils.data.TensorDataset(x, torch.nn.functional.one_hot(y, 4).float())
traj = sf.Trajectory([sf.Segment(s.checkpoints, regress, lr_sum=s.lr_sum) for s in traj.segments])
sf.fit_factors(model, Recorded(), traj, fisher="true", batch_size=8)
torch.save(torch.stack(draws), os.path.join(sys.argv[1], f"rank{torch.distributed.get_rank()}.pt"))
torch.distributed.destroy_process_group()
"""


def test_torchrun_ranks_draw_independent_true_fisher_labels(tmp_path):
    """Each rank samples the labels of its own examples: with one seed for all, rank 1's draws were
    rank 0's, draw for draw (their examples' sampled noise perfectly correlated)."""
    script = tmp_path / "draws.py"
    script.write_text(FISHER_DRAWS)
    run = torchrun(script, tmp_path, HERE)
    assert run.returncode == 0, run.stderr[-4000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0.shape == rank1.shape and not torch.equal(rank0, rank1)


def test_train_segments_as_an_array(reference, tmp_path):
    import numpy as np

    model, task, data, queries, traj, factors, full = reference
    score_corpus(model, task, traj, factors, data, queries, tmp_path, train_segments=np.array([0, 1]), progress=False)
    assert torch.allclose(load_scores(tmp_path), full, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_is_its_weights_whatever_its_form(tmp_path):
    """Ranks and resumed runs compare checkpoints by their weights: a state_dict in another key order,
    a safetensors file and a torch.save file of the same weights are one checkpoint; other weights or
    another dtype are not."""
    from safetensors.torch import save_file

    from source_fast.factors import _checkpoint_digest

    state = {k: v.contiguous() for k, v in job()[0].state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    forms = [state, dict(reversed(list(state.items()))), tmp_path / "w.safetensors", str(tmp_path / "w.pt")]
    assert len({_checkpoint_digest(c, "checkpoint") for c in forms}) == 1
    other = {k: v + (k == "2.bias") * 1e-6 for k, v in state.items()}
    halved = {k: v.half() for k, v in state.items()}
    assert len({_checkpoint_digest(c, "checkpoint") for c in (state, other, halved)}) == 3


def test_adam_shards_from_before_the_eigenbasis_preconditioner_are_not_resumed(tmp_path):
    """Adam segments' scores changed with commit 891b8bb: a folder whose manifest predates it (no
    adam_preconditioner entry) is refused; SGD folders' scores did not change and still resume."""
    import json

    from _helpers import mlp

    model = mlp(6, 7, 4, dtype=torch.float32)
    data = classification_data(40, 6, 4, seed=1, dtype=torch.float32)
    queries = classification_data(3, 6, 4, seed=2, dtype=torch.float32)
    task = ClassifyTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    task.compute_train_loss(data.tensors, model).backward()
    opt.step()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=0.1, optimizer="adam",
                                     optimizer_states=[opt.state_dict()])])
    factors = sf.fit_factors(model, task, traj, fisher="empirical")
    score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=16, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["fingerprint"]["adam_preconditioner"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"holds the output of a different run \(it differs in: adam_preconditioner\)"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=16, progress=False)


def test_a_second_live_run_into_the_folder_is_refused(tmp_path):
    """A rerun started while the first still writes (e.g. a killed torchrun's workers, which run in
    sessions of their own) would race it for shards and delete its temp files: refused while the
    first holds the folder, accepted once it is gone."""
    out = tmp_path / "scores"
    first = subprocess.Popen(JOB + [str(out), "--slow", "0.05"])
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "shards").glob("*.json")):
        time.sleep(0.05)
    second = subprocess.run(JOB + [str(out)], check=False, capture_output=True, text=True, timeout=300)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert second.returncode != 0 and "is being written by another score_corpus run" in second.stderr, second.stderr[-2000:]
    subprocess.run(JOB + [str(out)], check=True, timeout=300)  # the lock went with the process
    assert (out / "rows.json").exists()


def test_a_file_system_without_locks_scores_unlocked(reference, tmp_path, monkeypatch):
    """flock fails with ENOSYS where the file system does not lock (Lustre without -o flock): the run
    goes on, unlocked, and says so."""
    import errno
    import fcntl

    model, task, data, queries, traj, factors, full = reference

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="the file system does not lock files"):
        score_corpus(model, task, traj, factors, data, queries, tmp_path, shard_size=16, progress=False)
    assert torch.allclose(load_scores(tmp_path), full, rtol=1e-5, atol=1e-7)
