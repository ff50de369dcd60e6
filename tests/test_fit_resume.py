"""A factor fit killed midway and started again with the same resume_dir skips its finished passes
and gives exactly the factors of an uninterrupted fit; a folder from another fit is refused."""

import pytest
import torch
from _helpers import ClassifyTask, CountingData, RegressTask, classification_data, mlp, perturbed_states

import source_fast as sf
from source_fast import factors as fm
from source_fast._passes import describe_task
from source_fast.tasks import CausalLMTask


class Killed(Exception):
    pass


def _setup():
    model = mlp(5, 6, 3)
    data = classification_data(40, 5, 3, seed=1)
    traj = sf.Trajectory.even(perturbed_states(model, 4, scale=0.1), [0.05] * 20, 2, data, momentum=0.5)
    return model, ClassifyTask(), traj


def _count_calls(monkeypatch, name, fail_on=None):
    calls = []
    real = getattr(fm, name)

    def spy(*args, **kwargs):
        calls.append(args[5 if name == "_covariances" else 7])  # `what`: "segment ℓ, checkpoint c"
        if fail_on is not None and len(calls) == fail_on:
            raise Killed(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(fm, name, spy)
    return calls


def test_a_killed_fit_resumes_after_its_last_finished_pass(tmp_path, monkeypatch, capsys):
    model, task, traj = _setup()
    # fisher="true" samples labels: equal results need the same samples on every pass, resumed or not.
    clean = sf.fit_factors(model, task, traj, fisher="true", batch_size=8)
    with monkeypatch.context() as mp:
        _count_calls(mp, "_lambdas", fail_on=2)  # killed in segment 0's second Λ pass
        with pytest.raises(Killed):
            sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["seg0_cov0.safetensors", "seg0_cov1.safetensors",
                                                                   "seg0_lam0.safetensors"]
    covs, lams = _count_calls(monkeypatch, "_covariances"), _count_calls(monkeypatch, "_lambdas")
    capsys.readouterr()
    resumed = sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path, progress=True)
    skipped = [line for line in capsys.readouterr().out.splitlines() if "already done" in line]
    assert skipped == [f"covariance pass of segment 0, checkpoint 0: already done in {tmp_path}",
                       f"covariance pass of segment 0, checkpoint 1: already done in {tmp_path}",
                       f"Λ pass of segment 0, checkpoint 0: already done in {tmp_path}"]
    assert covs == ["segment 1, checkpoint 0", "segment 1, checkpoint 1"]
    assert lams == ["segment 0, checkpoint 1", "segment 1, checkpoint 0", "segment 1, checkpoint 1"]
    for a, b in zip(resumed.segments, clean.segments):
        for name in a:
            for field in ("a_cov", "s_cov", "q_a", "q_s", "lam"):
                assert torch.equal(getattr(a[name], field), getattr(b[name], field)), (name, field)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_from_another_fit_is_refused(tmp_path):
    model, task, traj = _setup()
    sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    with pytest.raises(ValueError, match=r"passes of a different fit \(it differs in: fisher, seed\)"):
        sf.fit_factors(model, task, traj, fisher="true", batch_size=8, seed=3, resume_dir=tmp_path)
    other = sf.Trajectory.even(perturbed_states(model, 4, scale=0.2), [0.05] * 20, 2, traj.segments[0].data)
    with pytest.raises(ValueError, match=r"differs in: checkpoints"):
        sf.fit_factors(model, task, other, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    # Another loss is another fit: a task's class and plain settings, and the collate function, count.
    with pytest.raises(ValueError, match=r"differs in: task"):
        sf.fit_factors(model, RegressTask(), traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    with pytest.raises(ValueError, match=r"differs in: task"):
        sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path,
                       collate_fn=torch.utils.data.default_collate)
    assert describe_task(CausalLMTask(normalize="sum")) != describe_task(CausalLMTask(normalize="mean"))
    assert describe_task(CausalLMTask(tracked=["a"])) != describe_task(CausalLMTask(tracked=["b"]))


def _scaled(batch, scale=1.0):
    x, y = torch.utils.data.default_collate(batch)
    return x * scale, y


def test_a_segment_loaders_own_collate_function_is_part_of_the_fit(tmp_path):
    """The segments' data as DataLoaders batch with their own collate function (tokenisation often lives
    there): a resume whose loaders collate otherwise (another partial's arguments, torch's default, one
    segment of two) is another fit, refused; the same loaders resume it."""
    import functools

    model, task, traj = _setup()
    data = traj.segments[0].data

    def fit(*scales):
        loaders = [torch.utils.data.DataLoader(data, batch_size=8, collate_fn=None if scale is None else
                                               functools.partial(_scaled, scale=scale)) for scale in scales]
        again = sf.Trajectory.even(perturbed_states(model, 4, scale=0.1), [0.05] * 20, 2, loaders[0], momentum=0.5)
        for seg, loader in zip(again.segments, loaders):
            seg.data = loader
        return sf.fit_factors(model, task, again, fisher="empirical", resume_dir=tmp_path)

    first = fit(1.0, 1.0)
    again = fit(1.0, 1.0)
    assert torch.equal(first.segments[1]["0"].lam, again.segments[1]["0"].lam)
    for other in [(2.0, 2.0), (None, None), (1.0, 2.0)]:
        with pytest.raises(ValueError, match=r"differs in: task"):
            fit(*other)


def test_checkpoints_are_identified_by_content(tmp_path):
    """Every value counts (not just the first ones), and a file copied elsewhere is the same checkpoint."""
    from safetensors.torch import save_file

    state = {"w": torch.zeros(2000), "b": torch.ones(3)}
    other = {"w": torch.zeros(2000), "b": torch.ones(3)}
    other["w"][1500] = 1.0
    assert fm._checkpoint_digest(state, "c") != fm._checkpoint_digest(other, "c")
    save_file(state, str(tmp_path / "a.safetensors"))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())
    assert fm._checkpoint_digest(tmp_path / "a.safetensors", "c") == fm._checkpoint_digest(tmp_path / "copy" / "b.safetensors", "c")
    with pytest.raises(FileNotFoundError, match="segment 1, checkpoint 0: checkpoint file .* does not exist"):
        fm._checkpoint_digest(tmp_path / "missing.safetensors", "segment 1, checkpoint 0")
    # save_pretrained's folder is read for its weights file (tests/test_trainer.py reads real ones).
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    with pytest.raises(IsADirectoryError, match=r"segment 0, checkpoint 2: .*/saved' is a folder without model weights"):
        fm._checkpoint_digest(saved, "segment 0, checkpoint 2")
    save_file(state, str(saved / "model.safetensors"))
    assert fm._checkpoint_digest(saved, "c") == fm._checkpoint_digest(tmp_path / "a.safetensors", "c")


def test_every_training_example_and_task_value_is_part_of_the_fit(tmp_path):
    """A finished pass is reused only for the same data, all of it (example 1 of 40 is not among 16
    evenly spaced ones), and a task whose dict or tensor settings are the same by value."""
    model, task, traj = _setup()
    sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    data = classification_data(40, 5, 3, seed=1)
    data.tensors[0][1, 0] += 1.0
    other = sf.Trajectory.even(perturbed_states(model, 4, scale=0.1), [0.05] * 20, 2, data, momentum=0.5)
    with pytest.raises(ValueError, match=r"differs in: data\)"):
        sf.fit_factors(model, task, other, fisher="empirical", batch_size=8, resume_dir=tmp_path)

    class Smoothed(ClassifyTask):
        def __init__(self, options):
            self.options = options

    sf.fit_factors(model, Smoothed({"label_smoothing": torch.tensor(0.0)}), traj, fisher="empirical", batch_size=8,
                   resume_dir=tmp_path / "smoothed")
    with pytest.raises(ValueError, match=r"differs in: task\)"):
        sf.fit_factors(model, Smoothed({"label_smoothing": torch.tensor(0.3)}), traj, fisher="empirical", batch_size=8,
                       resume_dir=tmp_path / "smoothed")


def test_damaged_pass_files_are_computed_again_and_stale_files_go(tmp_path):
    """Each pass file carries the sha256 of its tensors: a flipped bit or a truncation is reported
    and that pass is computed again (the result is the clean fit's, exactly); what a killed write
    leaves behind is removed; a folder whose fit.json is damaged or gone is refused, not reused."""
    model, task, traj = _setup()
    clean = sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path)
    lam, cov = tmp_path / "seg0_lam1.safetensors", tmp_path / "seg1_cov0.safetensors"
    blob = bytearray(lam.read_bytes())
    blob[-3] ^= 0x10
    lam.write_bytes(bytes(blob))
    cov.write_bytes(cov.read_bytes()[:-20])
    (tmp_path / ".seg1_lam0.safetensors.sf-k1ll3d.tmp").write_bytes(b"half a pass")
    (tmp_path / ".tmpQ7rT2x").write_bytes(lam.read_bytes()[:50])  # safetensors' own temp inside save_file
    (tmp_path / ".someone_elses.tmp").mkdir()  # a folder of that name is not a temp file of ours: left alone
    (tmp_path / ".draft.tmp").write_text("a user's file: no temp of ours carries the .sf- mark")
    with pytest.warns(UserWarning) as caught:
        again = sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path)
    said = sorted(str(w.message) for w in caught)
    assert said == [f"{lam} is corrupted or incomplete: computing its pass (segment 0, checkpoint 1) again",
                    f"{cov} is corrupted or incomplete: computing its pass (segment 1, checkpoint 0) again"], said
    for a, b in zip(again.segments, clean.segments):
        for name in a:
            for field in ("a_cov", "s_cov", "q_a", "q_s", "lam"):
                assert torch.equal(getattr(a[name], field), getattr(b[name], field)), (name, field)
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [".draft.tmp", ".someone_elses.tmp"]
    assert not list(tmp_path.glob(".tmp*"))
    (tmp_path / "fit.json").write_text('{"format": "source_fast.fit_pro')
    with pytest.raises(ValueError, match=r"fit.json is corrupted: delete .* to start the fit over"):
        sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path)
    (tmp_path / "fit.json").unlink()
    with pytest.raises(ValueError, match="holds finished passes but no fit.json"):
        sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path)


def test_a_killed_save_leaves_no_temp_files_after_the_next(tmp_path):
    model, task, traj = _setup()
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".factors.sf-0123abcd.tmp").write_bytes(b"a killed save's tensors")
    (tmp_path / ".factors.json.sf-k1ll3d.tmp").write_text("{")
    (tmp_path / ".tmpZ9y8X7").write_bytes(bytes(64))  # safetensors' own temp, sized but not yet written
    (tmp_path / ".tmpfiles1").write_text("a user's file, with a name like safetensors' temps")
    factors.save(tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and [p.name for p in tmp_path.glob(".tmp*")] == [".tmpfiles1"]
    assert torch.equal(sf.Factors.load(tmp_path).segments[1]["0"].lam, factors.segments[1]["0"].lam)


def test_the_fingerprint_reads_shared_data_once(tmp_path):
    """Segments of one stage share their data: the resume fingerprint hashes it once, not per segment
    (on top of the passes: 2 segments × 2 checkpoints × covariance and Λ; and the first four examples,
    read to check that the loss sums over the batch)."""
    model, task, _ = _setup()
    data = CountingData(classification_data(40, 5, 3, seed=1))
    traj = sf.Trajectory.even(perturbed_states(model, 4, scale=0.1), [0.05] * 20, 2, data, momentum=0.5)
    sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    assert data.reads == 8 * 40 + 40 + 4


def test_any_task_setting_can_be_fingerprinted_and_values_count(tmp_path):
    """Settings of every kind (text arrays, object arrays, meta and sparse tensors) leave the fit
    running, and values, not only types, tell runs apart (enums, dataclasses, numpy scalars)."""
    import dataclasses
    import enum

    import numpy as np

    class Mode(enum.Enum):
        SUM = 1
        MEAN = 2

    @dataclasses.dataclass
    class Options:
        smoothing: float

    class Configured(ClassifyTask):
        def __init__(self, **settings):
            self.__dict__.update(settings)

    model, _, traj = _setup()
    odd = dict(names=np.array(["cat", "dog", "eel"]), handles=np.array([object()], dtype=object),
               shape_only=torch.zeros(3, device="meta"), sparse=torch.eye(3).to_sparse())
    sf.fit_factors(model, Configured(**odd), traj, fisher="empirical", batch_size=8, resume_dir=tmp_path / "odd")
    for name, (one, other) in {"enum": (Mode.SUM, Mode.MEAN), "dataclass": (Options(0.0), Options(0.1)),
                               "numpy scalar": (np.float32(1.0), np.float32(2.0))}.items():
        sf.fit_factors(model, Configured(setting=one), traj, fisher="empirical", batch_size=8, resume_dir=tmp_path / name)
        with pytest.raises(ValueError, match=r"differs in: task\)"):
            sf.fit_factors(model, Configured(setting=other), traj, fisher="empirical", batch_size=8,
                           resume_dir=tmp_path / name)


def test_a_second_live_fit_into_the_folder_is_refused(tmp_path):
    """A second fit into a resume_dir that a first still writes (started twice by mistake, or a killed
    torchrun's workers, which run in sessions of their own) would delete the first's temp files as
    stale: refused while another holds the folder's lock (here this process, through its own open
    file), with nothing written; accepted once the lock is released."""
    import fcntl

    model, task, traj = _setup()
    with open(tmp_path / ".fit_factors.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="is being written by another fit_factors run"):
            sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".fit_factors.lock"]
    sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8, resume_dir=tmp_path)
    assert (tmp_path / "fit.json").exists() and len(list(tmp_path.glob("seg*.safetensors"))) == 8


def test_a_file_system_without_locks_fits_and_saves_unlocked(tmp_path, monkeypatch):
    """flock fails with ENOSYS where the file system does not lock (Lustre without -o flock): the fit
    into resume_dir warns and runs unlocked, and saving the factors (their own lock) works too."""
    import errno
    import fcntl

    model, task, traj = _setup()

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=8)
    factors.save(tmp_path / "factors")  # locked: the save's own files only
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="the file system does not lock files"):
        refit = sf.fit_factors(model, task, traj, fisher="true", batch_size=8, resume_dir=tmp_path / "passes")
    # Unlocked, a save cannot know whether another is writing: it deletes nothing (an earlier save's
    # tensors stay), and says so.
    (tmp_path / "factors" / ".factors.sf-x.tmp").write_text("")  # as a live save's temp file
    with pytest.warns(UserWarning, match="does not lock files: earlier saves' files are left in place"):
        refit.save(tmp_path / "factors")
    assert len(list((tmp_path / "factors").glob("factors.*.safetensors"))) == 2
    assert (tmp_path / "factors" / ".factors.sf-x.tmp").exists()
    loaded = sf.Factors.load(tmp_path / "factors")
    assert torch.equal(loaded.segments[0]["0"].lam, refit.segments[0]["0"].lam)
