"""The `source-fast` command: fit and score a job file, resume, torchrun, info."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _helpers import torchrun

import source_fast as sf
from source_fast.corpus import load_scores, load_top_k
from source_fast.jobs import _remove_passes

JOB = textwrap.dedent('''
    import torch
    import source_fast as sf
    from source_fast.demo import digits_data, make_mlp
    from source_fast.tasks import ClassificationTask

    def job():
        torch.manual_seed(0)
        train, test = digits_data(120, 6)
        model = make_mlp(hidden=16)
        states = [model.state_dict()]
        for _ in range(2):
            states.append({k: v + 0.05 * torch.randn_like(v) for k, v in states[-1].items()})
        trajectory = sf.Trajectory.even(states, [0.05] * 30, 3, train, momentum=0.9)
        return sf.Job(make_mlp(hidden=16), ClassificationTask(), trajectory, train, test, batch_size=16)
''')


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "source_fast", *args], check=True, capture_output=True, text=True, **kw)


def test_fit_and_score_from_a_job_file(tmp_path):
    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    _run("fit", str(job_file), "--out", str(tmp_path / "factors"))
    assert not (tmp_path / "factors.partial").exists()  # finished passes are dropped once the factors exist
    (tmp_path / "here").mkdir()
    _run("fit", str(job_file), "--out", ".", cwd=tmp_path / "here")  # `.` has no name to add ".partial" to
    assert (tmp_path / "here" / "factors.json").exists() and not (tmp_path / "here.partial").exists()
    first = _run("score", str(job_file), "--factors", str(tmp_path / "factors"), "--out", str(tmp_path / "scores"), "--shard-size", "50")
    # Each shard it scores is reported with its rate, the shards done and the time left.
    assert "\nquery block 1/1, shard 3/3: rows 100-120: scored in " in first.stdout
    assert "rows/s); 2/3 shards done, about " in first.stdout
    assert "[rank" not in first.stdout  # one process: no rank to name
    _run("score", str(job_file), "--factors", str(tmp_path / "factors"), "--out", str(tmp_path / "top"), "--top-k", "4")
    spec = __import__("importlib.util").util.spec_from_file_location("job", job_file)
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    job = mod.job()
    factors = sf.Factors.load(tmp_path / "factors")
    expected = sf.score(job.model, job.task, job.trajectory, factors, job.train_data, job.query_data)
    got = load_scores(tmp_path / "scores")
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8)
    assert torch.equal(load_top_k(tmp_path / "top")["top_indices"], expected.topk(4, dim=1).indices)
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert manifest["fingerprint"]["method"] == "source"
    out = _run("score", str(job_file), "--factors", str(tmp_path / "factors"), "--out", str(tmp_path / "scores"), "--shard-size", "50")
    # A finished run is recognised: its shards are reported as already done, in one line, nothing recomputed.
    shard_lines = [line for line in out.stdout.splitlines() if "shard" in line]
    assert "scores written" in out.stdout
    assert shard_lines == ["query block 1/1, shards 1-3/3: rows 0-120 already done"], shard_lines


def test_torchrun_job(tmp_path):
    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    _run("fit", str(job_file), "--out", str(tmp_path / "factors"))
    run = torchrun("-m", "source_fast", "score", job_file, "--factors", tmp_path / "factors", "--out", tmp_path / "dist",
                   "--shard-size", "30")
    assert run.returncode == 0, run.stderr[-4000:]
    _run("score", str(job_file), "--factors", str(tmp_path / "factors"), "--out", str(tmp_path / "single"), "--shard-size", "30")
    # float32, and the ranks run with one thread each: equal to rounding (measured max |Δ| 6e-8 at scale 0.46).
    assert torch.allclose(load_scores(tmp_path / "dist"), load_scores(tmp_path / "single"), rtol=1e-5, atol=1e-7)
    # Fitting under torchrun: each rank its half, rank 0 keeps the finished passes and writes the factors.
    run = torchrun("-m", "source_fast", "fit", job_file, "--out", tmp_path / "dist_factors")
    assert run.returncode == 0, run.stderr[-4000:]
    assert not (tmp_path / "dist_factors.partial").exists()
    single, dist = sf.Factors.load(tmp_path / "factors"), sf.Factors.load(tmp_path / "dist_factors")
    for a, b in zip(single.segments, dist.segments):
        for name in a:  # A needs no labels (the sampled ones differ with the split): equal to float32 rounding
            assert torch.allclose(a[name].a_cov, b[name].a_cov, rtol=1e-5, atol=1e-7), name


def test_a_fit_killed_on_one_process_resumes_under_torchrun(tmp_path, monkeypatch):
    """A finished pass holds the sums over all ranks, so a fit may resume on another number of them
    (a preempted job restarted on the machines at hand)."""
    from source_fast import factors as fm
    from source_fast.cli import main

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    real = fm._lambdas

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after segment 0's covariance pass

    monkeypatch.setattr(fm, "_lambdas", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["fit", str(job_file), "--out", str(tmp_path / "resumed"), "--fisher", "empirical"])
    monkeypatch.setattr(fm, "_lambdas", real)
    partial = tmp_path / "resumed.partial"
    assert [p.name for p in partial.glob("*.safetensors")] == ["seg0_cov0.safetensors"]
    run = torchrun("-m", "source_fast", "fit", job_file, "--out", tmp_path / "resumed", "--fisher", "empirical")
    assert run.returncode == 0, run.stderr[-4000:]
    assert not partial.exists()
    main(["fit", str(job_file), "--out", str(tmp_path / "clean"), "--fisher", "empirical"])
    resumed, clean = sf.Factors.load(tmp_path / "resumed"), sf.Factors.load(tmp_path / "clean")
    for ell, (a, b) in enumerate(zip(resumed.segments, clean.segments)):
        for name in a:
            for field in ("a_cov", "s_cov", "lam"):
                x, y = getattr(a[name], field), getattr(b[name], field)
                if ell == 0 and field != "lam":  # the pass the single process finished, read back
                    assert torch.equal(x, y), (ell, name, field)
                else:  # float32 sums over two ranks' halves: equal to rounding
                    assert torch.allclose(x, y, rtol=1e-5, atol=1e-7 * y.abs().max()), (ell, name, field)


def test_info_reports_backends():
    out = _run("info").stdout
    assert "covariance_accumulate_" in out and "pairwise_scores" in out and "torch" in out


def test_a_job_imports_its_neighbours_inside_job(tmp_path):
    """job() runs with the job file's folder importable, as the file's top level does."""
    from source_fast.jobs import load_job

    (tmp_path / "neighbour_of_the_job.py").write_text(JOB)
    (tmp_path / "job.py").write_text("def job():\n    from neighbour_of_the_job import job as real\n    return real()\n")
    before = list(sys.path)
    assert len(load_job(tmp_path / "job.py").train_data) == 120
    assert sys.path == before


def test_a_mistyped_damping_is_a_usage_error(capsys):
    from source_fast.cli import main

    with pytest.raises(SystemExit):
        main(["score", "job.py", "--out", "scores", "--damping", "heurstic"])
    assert "argument --damping: 'heurstic' is not a number, heuristic or implied" in capsys.readouterr().err
    for gib in ("inf", "nan", "1e-12", "lots"):
        with pytest.raises(SystemExit):
            main(["score", "job.py", "--out", "scores", "--query-memory-gb", gib])
        assert "argument --query-memory-gb:" in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_fitting(tmp_path, capsys, monkeypatch):
    from source_fast import factors
    from source_fast.cli import main

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    (tmp_path / "taken").write_text("")
    monkeypatch.setattr(factors, "_covariances", lambda *a, **k: pytest.fail("a pass ran"))
    assert main(["fit", str(job_file), "--out", str(tmp_path / "taken")]) == 2
    assert "--out '" in capsys.readouterr().err and not (tmp_path / "taken.partial").exists()


def test_job_errors_say_the_command_line_fix(tmp_path, capsys):
    """A refused job is an error message with the flag that fixes it, exit status 2, no traceback."""
    from source_fast.cli import main

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    assert main(["score", str(job_file), "--out", str(tmp_path / "s"), "--method", "ekfac"]) == 2
    err = capsys.readouterr().err
    assert "source-fast score: error: method 'ekfac' uses one checkpoint" in err
    assert "on the command line: add --final" in err and "Traceback" not in err
    assert main(["score", str(job_file), "--out", str(tmp_path / "s")]) == 2
    assert "on the command line: give --factors FOLDER" in capsys.readouterr().err
    other = tmp_path / "other.py"  # train_data a copy of the segments' data: not the object they trained on
    other.write_text(JOB.replace("train, test, batch_size=16)", "torch.utils.data.TensorDataset(*train.tensors), test, "
                                                                "batch_size=16)"))
    assert main(["score", str(other), "--out", str(tmp_path / "t"), "--method", "tracin"]) == 2
    assert "on the command line: make the job's train_data the very object" in capsys.readouterr().err
    assert main(["fit", str(job_file), "--out", str(tmp_path / "f")]) == 0  # all checkpoints; scored with --final:
    assert main(["score", str(job_file), "--out", str(tmp_path / "u"), "--factors", str(tmp_path / "f"), "--final",
                 "--method", "ekfac"]) == 2
    assert "on the command line: give `source-fast fit` and `source-fast score` the same --final" in capsys.readouterr().err


def test_a_job_file_without_a_job_is_a_usage_error(tmp_path, capsys):
    from source_fast.cli import main

    empty, wrong = tmp_path / "empty.py", tmp_path / "wrong.py"
    empty.write_text("import torch\n")
    wrong.write_text("def job():\n    return 7\n")
    assert main(["fit", str(empty), "--out", str(tmp_path / "f")]) == 2
    assert f"error: {empty} defines no function job(): it must define job()" in capsys.readouterr().err
    assert main(["score", str(wrong), "--out", str(tmp_path / "s")]) == 2
    assert f"error: {wrong}: job() must return a source_fast.Job, not int" in capsys.readouterr().err


def test_a_bug_in_the_job_keeps_its_traceback(tmp_path):
    """The same exception types raised by the job's own code are its bugs: the user needs the traceback
    (the CLI's one-line messages are for source_fast's refusals of bad input)."""
    from source_fast.cli import main

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB + "\ndef job():  # a job with a bug\n    return len(7)\n")
    with pytest.raises(TypeError, match="has no len"):
        main(["fit", str(job_file), "--out", str(tmp_path / "f")])


def test_fit_seeds_the_label_sampling_as_the_api_does(tmp_path):
    from source_fast.cli import main
    from source_fast.jobs import load_job

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    assert main(["fit", str(job_file), "--out", str(tmp_path / "seed3"), "--seed", "3"]) == 0
    job = load_job(job_file)
    want = {seed: sf.fit_factors(job.model, job.task, job.trajectory, seed=seed, batch_size=job.batch_size)
            for seed in (0, 3)}
    got = sf.Factors.load(tmp_path / "seed3")
    for ell, segment in enumerate(got.segments):
        for name, layer in segment.items():
            assert torch.equal(layer.lam, want[3].segments[ell][name].lam), (ell, name)
    assert not torch.equal(got.segments[0]["0"].lam, want[0].segments[0]["0"].lam)  # the seed reached the draw


def test_fit_holds_the_resume_folder_until_the_factors_are_saved(tmp_path, monkeypatch):
    """A second `fit` started after the first's passes but before its save would find every pass done,
    save, and delete the folder under the first (which then crashed): the lock covers the save too."""
    import fcntl

    from source_fast import jobs

    job_file = tmp_path / "job.py"
    job_file.write_text(JOB)
    real_save, seen = sf.Factors.save, []

    def save(self, path):
        with open(tmp_path / "out.partial" / ".fit_factors.lock", "a") as other:  # what a second run would try
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("unlocked")
            except BlockingIOError:
                seen.append("locked")
        return real_save(self, path)

    monkeypatch.setattr(sf.Factors, "save", save)
    jobs.fit(job_file, tmp_path / "out", fisher="empirical")
    assert seen == ["locked"] and not (tmp_path / "out.partial").exists()
    assert (tmp_path / "out" / "factors.json").exists()


def test_the_passes_go_before_the_fit_json_that_names_them(tmp_path, monkeypatch):
    """`source-fast fit` removes `<out>.partial` once the factors are saved: killed at any point of
    that, what is left is either nothing or passes with their fit.json, which a rerun resumes (passes
    without it are refused, and the user was told to delete them)."""
    names = ["seg0_cov0.safetensors", "seg0_lam0.safetensors", "fit.json", "seg1_cov0.safetensors", ".fit_factors.lock"]
    unlink = os.unlink  # what Path.unlink and shutil.rmtree call
    for stop in range(len(names) + 1):
        partial = tmp_path / f"out{stop}.partial"
        partial.mkdir()
        for name in names:
            (partial / name).write_text(name)
        calls = []

        def killed(path, *args, **kwargs):
            if len(calls) == stop:
                raise KeyboardInterrupt
            calls.append(path)
            return unlink(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", killed)
        try:
            _remove_passes(partial)
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "unlink", unlink)
        left = {p.name for p in partial.iterdir()} if partial.exists() else set()
        assert "fit.json" in left or not any(n.startswith("seg") for n in left), (stop, left)


def test_removing_the_passes_keeps_the_users_files(tmp_path):
    """`<out>.partial` may be a folder of the user's that the fit adopted: only what the fit wrote goes."""
    partial = tmp_path / "out.partial"
    partial.mkdir()
    for name in ["seg0_cov0.safetensors", "seg12_lam3.safetensors", "fit.json", ".fit_factors.lock", "notes.txt",
                 "seg_plot.safetensors"]:
        (partial / name).write_text(name)
    _remove_passes(partial)
    assert sorted(p.name for p in partial.iterdir()) == ["notes.txt", "seg_plot.safetensors"]
    for name in ("notes.txt", "seg_plot.safetensors"):
        (partial / name).unlink()
    _remove_passes(partial)
    assert not partial.exists()
