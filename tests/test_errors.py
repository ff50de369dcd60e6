"""Bad input gets a clear error that names the problem, and nothing half-written is left behind."""

import copy
import dataclasses
import functools
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from _helpers import ClassifyTask, LeavesOutClass2, Stream, classification_data, mlp, perturbed_states
from torch import nn

import source_fast as sf


@pytest.fixture
def setup():
    model = mlp(4, 5, 3)
    data = classification_data(20, 4, 3)
    return model, data, perturbed_states(model, 2)


class MeanTask(ClassifyTask):
    """torch's default reduction: the batch's mean, on either side."""

    def __init__(self, train="mean", measurement="sum"):
        self.train, self.measurement = train, measurement

    def compute_train_loss(self, batch, model, sample=False):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction=self.train)

    def compute_measurement(self, batch, model):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction=self.measurement)


class TokenMeanTask(ClassifyTask):
    """HF's `.loss`: the mean over every token of the batch, so an example's weight depends on the others'
    lengths (here example i has i % 3 + 1 tokens: its row repeated)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        repeats = torch.arange(len(x)) % 3 + 1
        return nn.functional.cross_entropy(model(x.repeat_interleave(repeats, 0)), y.repeat_interleave(repeats))

    compute_measurement = compute_train_loss


class UnevenTokenMeanTask(ClassifyTask):
    """HF's `.loss` over examples of 2, 2, 20 and 20 tokens, the short ones badly predicted: the mean over
    the batch's tokens is nowhere near half the pairs' sum, but it lies between the pairs' losses."""

    def compute_train_loss(self, batch, model, sample=False):
        x, tokens = batch
        per_token = model(x).squeeze(1) ** 2
        return (per_token * tokens).sum() / tokens.sum()

    compute_measurement = compute_train_loss


def test_a_loss_not_summed_over_the_batch_is_refused(setup, tmp_path):
    """A mean loss scales each example's gradient by 1/batch size, silently: scores would change with
    batch_size and the short last batch's rows would weigh more. Refused before any pass, naming the
    function, with the numbers: over examples (half the pairs' sum) or over tokens (about half)."""
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[-1:], data, lr_sum=1.0)])
    mean = r"compute_train_loss is the mean over the batch, not its sum: on the first 4 examples it returns .* on " \
           r"their two halves; source_fast, like kronfluence, needs it summed"
    with pytest.raises(ValueError, match=mean):
        sf.fit_factors(model, MeanTask(), traj)
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.raises(ValueError, match=mean):
        sf.self_score(model, MeanTask(), traj, factors, data, method="ekfac")
    with pytest.raises(ValueError, match=r"compute_measurement is the mean over the batch"):
        sf.score(model, MeanTask("sum", "mean"), traj, factors, data, data, method="ekfac")
    with pytest.raises(ValueError, match=r"compute_measurement is the mean over the batch"):
        sf.self_score(model, MeanTask("sum", "mean"), traj, factors, data, method="ekfac", use_measurement=True)
    with pytest.raises(ValueError, match=mean):
        sf.score(model, TokenMeanTask(), traj, factors, data, data, method="grad_dot")
    linear = nn.Linear(1, 1, bias=False).double()
    nn.init.ones_(linear.weight)
    uneven = torch.utils.data.TensorDataset(torch.tensor([[3.0], [3.0], [0.5], [0.5]], dtype=torch.float64),
                                            torch.tensor([2.0, 2.0, 20.0, 20.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"is the mean over the batch, not its sum: on the first 4 examples it returns "
                                         r"1.04545, and 9 \+ 0.25 = 9.25"):
        sf.fit_factors(linear, UnevenTokenMeanTask(), sf.Trajectory([sf.Segment([linear.state_dict()], uneven,
                                                                                 lr_sum=1.0)]))
    # kronfluence's own scripts through the shim: refused before a factor file is written.
    from source_fast.interop import kronfluence as kf

    analyzer = kf.Analyzer("run", kf.prepare_model(copy.deepcopy(model), MeanTask()), MeanTask(), cpu=True,
                           disable_tqdm=True, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=mean):
        analyzer.fit_all_factors("f", data, per_device_batch_size=8)
    assert not list(tmp_path.rglob("*.safetensors"))
    # Batches of two or three: the first two examples against each alone (a collate_fn need not take
    # four); batches of one: a mean is the sum, nothing to check.
    with pytest.raises(ValueError, match=r"compute_train_loss is the mean over the batch, not its sum: on the first 2 "
                                         r"examples .* on their two examples alone"):
        sf.fit_factors(model, MeanTask(), traj, batch_size=3)
    sf.fit_factors(model, MeanTask(), traj, batch_size=1)
    # Three queries: checked on two; one query: a mean is the sum.
    with pytest.raises(ValueError, match=r"compute_measurement is the mean over the batch, not its sum: on the first 2"):
        sf.score(model, MeanTask("sum", "mean"), traj, factors, data, torch.utils.data.Subset(data, range(3)),
                 method="ekfac")
    assert sf.score(model, MeanTask("sum", "mean"), traj, factors, data, torch.utils.data.Subset(data, range(1)),
                    method="ekfac").shape == (1, len(data))


def test_the_summed_loss_check_leaves_alone_what_it_cannot_judge(setup):
    """No verdict, and nothing changed, where the check cannot tell: a loader whose collate_fn takes one
    example at a time, a dataset readable only in its loader's workers, a loss at rounding's scale; the
    caller's random state is kept whatever the dataset draws."""
    model, data, ckpts = setup
    one_at_a_time = torch.utils.data.DataLoader(data, batch_size=1, collate_fn=lambda b: tuple(t[None] for t in b[0]))
    sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[-1:], one_at_a_time, lr_sum=1.0)]))

    class OpenedInWorkers(torch.utils.data.Dataset):  # an h5py / LMDB handle opened by worker_init_fn
        rows = None

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return tuple(t[i] for t in self.rows)

    def opened(_):
        torch.utils.data.get_worker_info().dataset.rows = data.tensors

    loader = torch.utils.data.DataLoader(OpenedInWorkers(), batch_size=8, num_workers=1, worker_init_fn=opened)
    sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[-1:], loader, lr_sum=1.0)]))

    class Tiny(ClassifyTask):  # a model fitted to its data: losses where float32's rounding decides
        def compute_train_loss(self, batch, model, sample=False):
            return 1e-15 * super().compute_train_loss(batch, model, sample) / len(batch[0])  # even a mean

    torch.manual_seed(3)
    state = torch.get_rng_state()

    class Augmented(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i][0] + 0.01 * torch.randn(data[i][0].shape, dtype=data[i][0].dtype), data[i][1]

    from source_fast._passes import check_summed

    check_summed(model, Tiny(), data, None, 8, "train")
    check_summed(model, ClassifyTask(), Augmented(), None, 8, "train")
    assert torch.equal(torch.get_rng_state(), state)


def test_checkpoint_mismatch_names_the_checkpoint_and_keys(setup):
    model, data, ckpts = setup
    missing = {k: v for k, v in ckpts[1].items() if k != "2.bias"}
    extra = {**ckpts[1], "3.weight": torch.zeros(1)}
    shaped = {**ckpts[1], "0.weight": torch.zeros(5, 5, dtype=torch.float64)}
    for bad, pattern in [
        (missing, r"segment 0, checkpoint 1 does not match the model: missing keys \['2.bias'\]"),
        (extra, r"unexpected keys \['3.weight'\]"),
        (shaped, r"segment 0, checkpoint 1: '0.weight' has shape \(5, 5\) in the checkpoint but \(5, 4\)"),
    ]:
        traj = sf.Trajectory([sf.Segment([ckpts[0], bad], data, lr_sum=1.0)])
        with pytest.raises(ValueError, match=pattern):
            sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(["nope.pt"], data, lr_sum=1.0)]))


def test_every_checkpoint_is_checked_before_the_first_pass(setup, tmp_path, monkeypatch):
    """A checkpoint of the wrong model in the last segment is refused before any pass (it used to be
    found when its own pass came): in memory, torch.save and safetensors files alike."""
    from safetensors.torch import save_file

    from source_fast import factors as fm
    from source_fast import scoring as sm

    model, data, ckpts = setup
    shaped = {**ckpts[1], "0.weight": torch.zeros(5, 5, dtype=torch.float64)}
    torch.save(shaped, tmp_path / "bad.pt")
    save_file(shaped, str(tmp_path / "bad.safetensors"))
    monkeypatch.setattr(fm, "_covariances", lambda *a, **k: pytest.fail("a pass ran before the checkpoints were checked"))
    monkeypatch.setattr(sm, "_example_grads", lambda *a, **k: pytest.fail("a pass ran before the checkpoints were checked"))
    for bad in (shaped, tmp_path / "bad.pt", str(tmp_path / "bad.safetensors")):
        traj = sf.Trajectory([sf.Segment([ckpts[0]], data, lr_sum=1.0), sf.Segment([ckpts[0], bad], data, lr_sum=1.0)])
        pattern = r"segment 1, checkpoint 1: '0.weight' has shape \(5, 5\) in the checkpoint but \(5, 4\)"
        with pytest.raises(ValueError, match=pattern):
            sf.fit_factors(model, ClassifyTask(), traj)
        with pytest.raises(ValueError, match=pattern):
            sf.score(model, ClassifyTask(), traj, None, data, data, method="tracin")


def test_a_damaged_checkpoint_file_is_named(setup, tmp_path):
    """torch's and safetensors' own errors for a truncated file name neither the file nor the checkpoint."""
    from safetensors.torch import save_file

    model, data, ckpts = setup
    torch.save(ckpts[1], tmp_path / "cut.pt")
    save_file(ckpts[1], str(tmp_path / "cut.safetensors"))
    for name in ("cut.pt", "cut.safetensors"):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-30])
        traj = sf.Trajectory([sf.Segment([ckpts[0], path], data, lr_sum=1.0)])
        with pytest.raises(ValueError, match=rf"segment 0, checkpoint 1: cannot read checkpoint file '.*{name}' "
                                             r"\(damaged or incomplete\?\)"):
            sf.fit_factors(model, ClassifyTask(), traj)


def test_a_checkpoint_that_is_no_state_dict_says_where_the_weights_are(setup, tmp_path):
    """A training script's {"model": state_dict, "step": n} (in memory or saved) names the key the weights
    are under; a pickled nn.Module file says why it is not read, without the terminal's escape codes; a Git
    LFS pointer (a clone without LFS) and other bytes say what they are."""
    model, data, ckpts = setup
    wrapped = {"model": ckpts[1], "step": 10}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    torch.save(model, tmp_path / "module.pt")
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\nsize 1234\n")
    (tmp_path / "junk.pt").write_bytes(b"junk" + bytes(range(200)))
    for bad, pattern in [
        (wrapped, r"segment 0, checkpoint 1 is not a state_dict: \['model', 'step'\] hold dict, int, not tensors; "
                  r"the weights look to be under 'model': give checkpoint\['model'\]"),
        (tmp_path / "wrapped.pt", r"segment 0, checkpoint 1 \('.*wrapped.pt'\) is not a state_dict: .*under 'model'"),
        (tmp_path / "module.pt", r"segment 0, checkpoint 1: checkpoint file '.*module.pt' holds pickled objects \(a whole "
                                 r"nn.Module, an optimizer, numpy arrays\?\), which are not loaded because loading them "
                                 r"runs their code: save model.state_dict\(\) instead"),
        (tmp_path / "lfs.pt", r"checkpoint 1: checkpoint file '.*lfs.pt' is a Git LFS pointer, not the weights \(a clone "
                              r"made without Git LFS: run `git lfs pull` there\)"),
        (tmp_path / "junk.pt", r"checkpoint 1: checkpoint file '.*junk.pt' is neither a torch.save file nor safetensors "
                               r"\(it begins b'junk"),
    ]:
        with pytest.raises((ValueError, TypeError), match=pattern) as caught:
            sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment([ckpts[0], bad], data, lr_sum=1.0)]))
        assert "\x1b" not in str(caught.value)


def test_arguments_of_the_wrong_kind_are_named(setup):
    """Mistakes that raised Python's own errors from deep inside (a bad-input review): the model's
    state_dict for the model, the Task class for an instance, a module among the checkpoints, one
    learning rate for the list, a float number of segments, a model on the meta device."""
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
    task = ClassifyTask()
    queries = classification_data(3, 4, 3, seed=5)
    fit = functools.partial(sf.fit_factors, fisher="empirical")
    with torch.device("meta"):
        meta = mlp(4, 5, 3)
    cases = [
        (lambda: fit(ckpts[0], task, traj), TypeError, r"model must be an nn.Module, got a dict \(a state_dict\? give "
                                                       r"the model, and its weights as the trajectory's checkpoints\)"),
        (lambda: sf.score(model, ClassifyTask, traj, None, data, queries, method="grad_dot"), TypeError,
         r"task is the class ClassificationTask: give an instance of it, ClassificationTask\(\)"),
        (lambda: fit(model, task, [ckpts]), TypeError, r"trajectory must be a source_fast.Trajectory, got a list"),
        (lambda: fit(meta, task, traj), ValueError, r"the model's parameters are on the meta device"),
        (lambda: fit(model, task, sf.Trajectory([sf.Segment([ckpts[0], model], data, lr_sum=1.0)])), TypeError,
         r"segment 0, checkpoint 1 is a Sequential module: give its weights"),
        (lambda: sf.Trajectory.even(ckpts, 0.1, 1, data), TypeError,
         r"Trajectory.even: learning rates must be one number per step \(a list\), got the single value 0.1"),
        (lambda: sf.Trajectory.even(ckpts, [0.1] * 4, 2.0, data), ValueError,
         r"num_segments must be an integer between 1 and the number of checkpoints \(2\), got 2.0"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


def test_errors_name_what_the_user_gave(setup, tmp_path):
    """Messages a review found naming the wrong thing: self-influence's measurement pass is over training
    examples (named by their place in the data), a query loader's drop_last is no training loss, a missing
    factor folder does not exist, transposed scores are said to be; and a Factors prints short."""
    from source_fast import eval as sfe

    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[-1:], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    x = data.tensors[0].clone()
    x[13, 0] = float("nan")
    bad = torch.utils.data.TensorDataset(x, data.tensors[1])
    with pytest.raises(FloatingPointError, match=r"training examples 8\+ \(self-influence's query side\), batch 1 "
                                                 r"\(examples from 12\): the measurement loss is nan"):
        sf.self_score(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[-1:], bad, lr_sum=1.0)]), factors, bad,
                      method="ekfac", use_measurement=True, chunk_size=8, batch_size=4)
    with pytest.raises(ValueError, match="drop_last=True, which would leave out the examples of a short last batch"):
        sf.score(model, ClassifyTask(), traj, factors, data,
                 torch.utils.data.DataLoader(data, batch_size=3, drop_last=True), method="ekfac")
    with pytest.raises(FileNotFoundError, match=r"factor directory '.*nothing' does not exist"):
        sf.Factors.load(tmp_path / "nothing")
    scores = torch.randn(4, 30)
    with pytest.raises(ValueError, match=r"for scores of shape \(30, 4\): the scores look transposed"):
        sfe.lds(scores.T, sfe.random_subsets(30, 5), torch.randn(5, 4))
    assert repr(factors) == "Factors(1 segment of [1] checkpoints, 2 layers ['0', '2'], true Fisher, num_examples=[20])"


def test_checkpoint_files_load(setup, tmp_path):
    from safetensors.torch import save_file

    model, data, ckpts = setup
    torch.save(ckpts[0], tmp_path / "a.pt")
    save_file(ckpts[1], str(tmp_path / "b.safetensors"))
    files = sf.Trajectory([sf.Segment([tmp_path / "a.pt", str(tmp_path / "b.safetensors")], data, lr_sum=1.0)])
    dicts = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
    f1 = sf.fit_factors(model, ClassifyTask(), files, fisher="empirical")
    f2 = sf.fit_factors(model, ClassifyTask(), dicts, fisher="empirical")
    assert torch.equal(f1.segments[0]["0"].lam, f2.segments[0]["0"].lam)


def test_checkpoints_of_a_wrapped_model_load_into_the_bare_one(setup, tmp_path):
    """Checkpoints saved from a DDP (`module.`) or torch.compile'd (`_orig_mod.`) model have prefixed names:
    read for the bare model (file or state_dict), and bare ones for a compiled model, with equal factors."""
    model, data, ckpts = setup

    def fit(m, checkpoints):
        factors = sf.fit_factors(m, ClassifyTask(), sf.Trajectory([sf.Segment(checkpoints, data, lr_sum=1.0)]),
                                 fisher="empirical")
        return [lf.lam for _, lf in sorted(factors.segments[0].items())]

    want = fit(model, ckpts)
    wrapped = [{f"module._orig_mod.{k}": v for k, v in c.items()} for c in ckpts]
    torch.save(wrapped[1], tmp_path / "wrapped.pt")
    compiled = torch.compile(model, backend="eager")
    for m, checkpoints in [(model, [wrapped[0], tmp_path / "wrapped.pt"]), (compiled, ckpts), (compiled, wrapped)]:
        for got, lam in zip(fit(m, checkpoints), want, strict=True):
            assert torch.equal(got, lam)
    # Averaged (Fast-SOURCE) over checkpoints saved one wrapped and one not; torch.compile(DDP(model))'s names.
    mixed = [wrapped[0], ckpts[1]]
    segments = [sf.Segment(c, data, lr_sum=1.0) for c in (mixed, ckpts)]
    means = [sf.fit_factors(model, ClassifyTask(), sf.Trajectory([seg]), fisher="empirical", average_params=True)
             for seg in segments]
    assert all(torch.equal(means[0].segments[0][k].lam, means[1].segments[0][k].lam) for k in ("0", "2"))
    assert sf.trajectory.unwrapped_name("_orig_mod.module._orig_mod.0.weight") == "0.weight"
    # A LightningModule's checkpoint: its weights under "state_dict", named through its attribute.
    lightning = {"state_dict": {f"net.{k}": v for k, v in ckpts[1].items()}, "epoch": 3}
    with pytest.raises(ValueError, match=r"the weights look to be under 'state_dict'"):
        fit(model, [ckpts[0], lightning])
    for got, lam in zip(fit(model, [ckpts[0], lightning["state_dict"]]), want, strict=True):
        assert torch.equal(got, lam)  # read through the one prefix all its names carry, as optimizer states are
    with pytest.raises(ValueError, match=r"checkpoint 0 does not match the model: missing keys \['net.0.bias', .*; the "
                                         r"model's names carry the prefix 'net.' the checkpoint's lack: give the module "
                                         r"inside the model, whose names lack it \(model.net\?\)"):
        fit(nn.ModuleDict({"net": model}), ckpts)
    del wrapped[1]["module._orig_mod.0.bias"]  # still named in the model's terms
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 1 does not match the model: missing keys \['0.bias'\], "
                                         r"unexpected keys \[\]"):
        fit(model, wrapped)


class SequenceFirst(nn.Module):
    """A layer fed (tokens, batch, features), the layout of XLNet and of torch's batch_first=False layers."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # x: (batch, tokens, 3)
        return self.head(torch.tanh(self.mix(x.transpose(0, 1))).mean(0))


class SequenceTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


class FlatSequenceFirst(SequenceFirst):
    """The same, flattened to (tokens × batch, features): rows that are a multiple of the examples."""

    def forward(self, x):
        t, n = x.shape[1], x.shape[0]
        return self.head(torch.tanh(self.mix(x.transpose(0, 1).reshape(t * n, 3))).reshape(t, n, 4).mean(0))


def test_layers_that_do_not_take_examples_first_are_refused():
    """A layer fed (tokens, batch, features) would take tokens for examples: refused against the batch's own
    count (for a stream, the fewest rows a tracked layer saw) where its rows are no multiple of it, by their
    order (the batch's examples reversed do not reverse its blocks of rows) where they are, and up front for
    torch's transformer layers with batch_first=False, whose tokens may be as many as the examples; one
    module fed (examples, ...) is not enough. Rows that are a multiple of the examples need a tensor in the
    batch with the examples first, to check their order by."""
    torch.manual_seed(0)
    for model in (SequenceFirst().double(), FlatSequenceFirst().double()):
        x, y = torch.randn(10, 5, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
        data = torch.utils.data.TensorDataset(x, y)
        rows = 20 if isinstance(model, FlatSequenceFirst) else 5
        for given, pattern in [(data, rf"module 'mix' saw {rows} rows \(its input's first dimension\), but the batch "
                                      r"holds 4 examples; a tracked layer's input must hold the examples first, or each "
                                      r"example's rows one after another .*XLNet's are$"),
                               (Stream(data), rf"module 'mix' saw {rows} rows .* but the batch holds 4 examples; .* "
                                              r"\(a DataLoader over a stream batches single examples")]:
            traj = sf.Trajectory([sf.Segment([model.state_dict()], given, lr_sum=1.0,
                                             num_examples=None if given is data else 10)])
            if rows == 20:  # 20 = 5 × 4 rows: read as 5 per example, in the wrong order
                pattern = (r"module 'mix' takes several rows per example for the batch's 4 examples \(its input's first "
                           r"dimension is a multiple of theirs\), but not one example's rows after another's")
            with pytest.raises(ValueError, match=r"segment 0, checkpoint 0, batch 0 \(examples from 0\): " + pattern):
                sf.fit_factors(model, SequenceTask(), traj, batch_size=4)
    # 8 tokens for 4 examples: (tokens, batch, features) has a multiple of the examples as rows, and is refused
    # by their order, as is its flattened form; a batch with nothing that holds the examples first cannot be checked.
    for model in (SequenceFirst().double(), FlatSequenceFirst().double()):
        data = torch.utils.data.TensorDataset(torch.randn(8, 8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
        traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
        with pytest.raises(ValueError, match=r"batch 0 \(examples from 0\): module 'mix' takes several rows per example "
                                             r"for the batch's 4 examples"):
            sf.fit_factors(model, SequenceTask(), traj, batch_size=4)

    class ColumnsTask(SequenceTask):  # a batch of columns: tokens first, the labels a list
        def compute_train_loss(self, batch, model, sample=False):
            return super().compute_train_loss((batch["x"].transpose(0, 1), torch.tensor(batch["y"])), model, sample)

    columns = lambda examples: {"x": torch.stack([e[0] for e in examples], 1), "y": [int(e[1]) for e in examples]}  # noqa: E731
    with pytest.raises(ValueError, match=r"batch 0 \(examples from 0\): module 'mix' takes several rows per example .* "
                                         r"with the examples reversed its rows stay as they were"):
        sf.fit_factors(model, ColumnsTask(), traj, batch_size=4, collate_fn=columns)
    # As many tokens as examples: the rows are as many as the examples, and in the wrong order.
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    model = SequenceFirst().double()
    with pytest.raises(ValueError, match=r"batch 0 \(examples from 0\): module 'mix' sees as many rows as the batch's 4 "
                                         r"examples, but with the examples reversed its rows are not reversed"):
        sf.fit_factors(model, SequenceTask(), sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)]),
                       batch_size=4)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0)
    for names in (None, ["linear1"]):
        with pytest.raises(ValueError, match=r"module 'linear1' is in a TransformerEncoderLayer built with "
                                             r"batch_first=False, which feeds it \(tokens, batch, features\)"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the default's word on the attention's out_proj
                sf.capture.tracked_layers(layer, names)
    assert [s.name for s in sf.capture.tracked_layers(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True),
                                                      ["linear1", "linear2"])] == ["linear1", "linear2"]
    peft = pytest.importorskip("peft")  # LoRA layers on linear1: inside the layer, one level further down
    adapted = peft.get_peft_model(nn.Sequential(nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0)),
                                  peft.LoraConfig(r=2, target_modules=["linear1"]))
    with pytest.raises(ValueError, match=r"module '.*linear1.lora_A.default' is in a TransformerEncoderLayer built "
                                         r"with batch_first=False"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sf.capture.tracked_layers(adapted, None)


class Experts(nn.Module):
    """A mixture of experts as transformers 5 builds one: the experts' weights a bare 3-D tensor."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.experts = nn.ParameterDict({"up": nn.Parameter(torch.randn(3, 4, 4) / 2)})
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        gates = torch.softmax(self.router(x), -1)
        return self.head(torch.einsum("ne,eio,ni->no", gates, self.experts["up"], x))


def test_default_tracking_names_what_it_leaves_out_and_an_empty_list_is_refused(setup):
    """Experts' bare weights are no layer to track: said when they are a tenth of the trainable parameters
    or more (embeddings and norms are left out by design); an empty list of modules says so."""
    with pytest.warns(UserWarning, match=r"62% of the parameters that train are outside the layers source_fast "
                                         r"tracks .* e.g. in \['experts'\] \(a mixture of experts' weights"):
        assert [s.name for s in sf.capture.tracked_layers(Experts(), None)] == ["router", "head"]
    with pytest.warns(UserWarning, match=r"62% of the parameters"):  # a model frozen whole: all of them count
        sf.capture.tracked_layers(Experts().requires_grad_(False), None)
    class SentenceEmbeddingModel(nn.Module):  # bare weights on the model itself, whose class says Embedding
        def __init__(self):
            super().__init__()
            self.enc, self.experts = nn.Linear(4, 4), nn.Parameter(torch.randn(3, 4, 4))

    with pytest.warns(UserWarning, match=r"71% of the parameters .* e.g. in \[\"the model's own\"\]"):
        sf.capture.tracked_layers(SentenceEmbeddingModel(), None)
    from torch.nn.utils.parametrizations import weight_norm

    embedded = nn.Sequential(nn.Embedding(1000, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    normed = nn.Sequential(weight_norm(nn.Linear(8, 16)), nn.ReLU(), weight_norm(nn.Linear(16, 3)))  # weights in children
    attention = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True), nn.Linear(8, 2))
    transformers = pytest.importorskip("transformers")  # a small ViT's bare position and class tokens: 27%
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=32, patch_size=4))
    for quiet in (embedded, normed, attention, vit):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            sf.capture.tracked_layers(quiet, None)
        assert [str(w.message)[:30] for w in said] == ([] if quiet is not attention else
                                                       ["nn.MultiheadAttention modules "])
    model, data, ckpts = setup

    class Nothing(ClassifyTask):
        def get_influence_tracked_modules(self):
            return []

    with pytest.raises(ValueError, match=r"get_influence_tracked_modules returned no modules: name the layers to track, "
                                         r"or return None"):
        sf.fit_factors(model, Nothing(), sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)]))

    class OneString(ClassifyTask):  # a str is a sequence: "02" would have tracked modules '0' and '2'
        def get_influence_tracked_modules(self):
            return "02"

    with pytest.raises(ValueError, match=r"get_influence_tracked_modules returned the string '02': return a list of "
                                         r"module names \(\['02'\] for that one module\)"):
        sf.fit_factors(model, OneString(), sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)]))


def test_a_collate_error_on_text_columns_says_what_trainer_drops(setup):
    """Trainer drops the columns its model's forward does not take before its collator sees them; a
    collator given here the examples with their text still in them fails: the note says why."""
    model, _, ckpts = setup
    rows = [{"x": [0.5] * 4, "y": i % 3, "text": f"example {i}"} for i in range(8)]

    def collate(batch):  # as Hugging Face's collators do: every column to a tensor
        return {k: torch.tensor([r[k] for r in batch]) for k in batch[0]}

    class DictTask(ClassifyTask):
        def compute_train_loss(self, batch, model, sample=False):
            return nn.functional.cross_entropy(model(batch["x"].double()), batch["y"], reduction="sum")

    with pytest.raises(ValueError) as caught:
        sf.fit_factors(model, DictTask(), sf.Trajectory([sf.Segment(ckpts, rows, lr_sum=1.0)]), collate_fn=collate)
    assert re.search(r"raised while reading segment 0, checkpoint 0, batch 0 .*the examples hold text columns \['text'\], "
                     r"which Hugging Face's Trainer drops before its collator \(remove_unused_columns\)",
                     " ".join(caught.value.__notes__))


def test_optimizer_states_keyed_by_names_and_shared_steps(setup, tmp_path):
    """FSDP's whole optimizer state is keyed by names, listed in its own order: read by name (through a
    wrapper's one prefix too), never by position; states kept in memory that share their step counters
    (FSDP's gather copies the moments, not the optimizer's live steps) are refused."""
    model, data, ckpts = setup
    model.load_state_dict(ckpts[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ClassifyTask().compute_train_loss(data.tensors, model).backward()
        opt.step()
    torch_state = copy.deepcopy(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]
    order = names[::-1]  # not the model's order

    def keyed(prefix):
        return {"state": {prefix + n: torch_state["state"][names.index(n)] for n in order},
                "param_groups": [{**torch_state["param_groups"][0], "params": [prefix + n for n in order]}]}

    def precond(states):
        traj = sf.Trajectory.even([ckpts[-1]] * len(states), [1e-2] * 2 * len(states), 1, data, optimizer="adamw",
                                  optimizer_states=states, weight_decay=0.01)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same checkpoint twice, said
            return sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical").segments[0]["0"].precond

    want = precond([torch_state])
    assert torch.equal(precond([keyed("")]), want) and torch.equal(precond([keyed("net.")]), want)
    with pytest.raises(ValueError, match=r"optimizer state 0 records parameter names the model does not have"):
        precond([{"state": keyed("")["state"], "param_groups": [
            {**torch_state["param_groups"][0], "params": [("a." if i % 2 else "b.") + n for i, n in enumerate(order)]}]}])
    shared = [keyed(""), keyed("")]  # fresh moments, one live step counter each parameter
    shared[1]["state"] = {k: {**v, "exp_avg_sq": v["exp_avg_sq"].clone()} for k, v in shared[1]["state"].items()}
    with pytest.raises(ValueError, match=r"segment 0, optimizer state 0 and segment 0, optimizer state 1 are the same "
                                         r"tensors in memory"):
        precond(shared)


def test_segment_arguments(setup):
    _, data, ckpts = setup
    with pytest.raises(ValueError, match="no checkpoints"):
        sf.Segment([], data, lr_sum=1.0)
    for lr in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be >= 0 and finite"):
            sf.Segment(ckpts, data, lr_sum=lr)
    with pytest.raises(ValueError, match="Segment lrs: learning rates must be >= 0 and finite, step 1 has -0.2"):
        sf.Segment(ckpts, data, lrs=[0.5, -0.2])  # a positive sum does not make a negative rate valid
    with pytest.raises(ValueError, match="Trajectory.even: learning rates must be >= 0 and finite, step 3 has -0.1"):
        sf.Trajectory.even(ckpts, [0.1] * 3 + [-0.1] + [0.1] * 4, 2, data)
    for odd in ("0.1", [0.1, 0.1], torch.tensor([0.1]), True):  # a rate read from text, a schedule's list per group
        with pytest.raises(TypeError, match=r"Trajectory.even: learning rates must be one number per step, step 2 has"):
            sf.Trajectory.even(ckpts, [0.1] * 2 + [odd] + [0.1] * 5, 2, data)
    sf.Trajectory.even(ckpts, [np.float32(0.1), torch.tensor(0.1)] + [0.1] * 6, 2, data)  # numbers of any kind
    with pytest.raises(ValueError, match="exactly one of lr_sum"):
        sf.Segment(ckpts, data, lr_sum=1.0, lrs=[1.0])
    with pytest.raises(ValueError, match="exactly one of lr_sum"):
        sf.Segment(ckpts, data)
    with pytest.raises(ValueError, match="data is empty"):
        sf.Segment(ckpts, [], lr_sum=1.0)
    with pytest.raises(ValueError, match="one optimizer state per checkpoint"):
        sf.Segment(ckpts, data, lr_sum=1.0, optimizer="adam")
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        sf.Segment(ckpts, data, lr_sum=1.0, optimizer="rmsprop")
    with pytest.raises(ValueError, match="num_segments must be an integer between 1 and"):
        sf.Trajectory.even(ckpts, [0.1] * 4, 3, data)
    with pytest.raises(ValueError, match=rf"Trajectory.even: 0 optimizer states for {len(ckpts)} checkpoints: give one per "
                                         r"checkpoint \(optimizer_states=\)"):  # the call's count, not a segment's
        sf.Trajectory.even(ckpts, [0.1] * 4, 2, data, optimizer="adamw")
    for options, message in [
        ({"momentum": 1.0}, r"Trajectory.even: momentum must be in \[0, 1\), got 1.0"),
        ({"momentum": 0.9, "dampening": 1.5}, r"dampening must be in \[0, 1\], got 1.5"),
        ({"nesterov": True}, "Nesterov momentum needs momentum > 0 and dampening 0"),
        ({"momentum": 0.9, "dampening": 0.1, "nesterov": True}, "Nesterov momentum needs momentum > 0 and dampening 0"),
        ({"grad_scales": [1.0] * 3}, "3 grad_scales for 4 learning rates: give one per step"),
        ({"grad_scales": [1.0, float("nan"), 1.0, 1.0]}, "grad_scales must be >= 0 and finite, step 1 has nan"),
    ]:
        with pytest.raises(ValueError, match=message):
            sf.Trajectory.even(ckpts, [0.1] * 4, 2, data, **options)
    with pytest.raises(ValueError, match="dampening, nesterov, lrs_after and continued apply to SGD's momentum"):
        sf.Trajectory.even(ckpts, [0.1] * 4, 2, data, optimizer="adam", optimizer_states=[{}] * len(ckpts), dampening=0.1)
    with pytest.raises(ValueError, match="no segments"):
        sf.Trajectory([])


def test_empty_queries_and_unknown_method(setup):
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    f = sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.raises(ValueError, match="empty data: 0 queries"):
        sf.score(model, ClassifyTask(), traj, f, data, torch.utils.data.Subset(data, []))
    with pytest.raises(ValueError, match="unknown method 'lissa'"):
        sf.score(model, ClassifyTask(), traj, f, data, data, method="lissa")
    with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
        sf.score(model, ClassifyTask(), traj, f, data, data, method="ekfac", damping="big")
    with pytest.raises(ValueError, match="pass trajectory.final"):
        two = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
        sf.score(model, ClassifyTask(), two, None, data, data, method="grad_dot")
    with pytest.raises(ValueError, match="train_data is not the data of any segment"):
        sf.score(model, ClassifyTask(), traj, f, classification_data(5, 4, 3), data)


def test_ekfac_without_damping_is_refused_where_the_curvature_has_zeros(setup):
    """An input feature that is always 0 (a corner pixel of scikit-learn's digits is) leaves exact zeros
    in the first layer's Λ, and 1/(Λ + 0) would make the scores inf and NaN: refused before the
    queries' pass."""
    model, _, ckpts = setup
    data = classification_data(20, 4, 3)
    data.tensors[0][:, 0] = 0
    traj = sf.Trajectory([sf.Segment(ckpts[-1:], data, lr_sum=1.0)])
    f = sf.fit_factors(model, ClassifyTask(), traj)
    assert (f.segments[0]["0"].lam == 0).any()
    for run in (lambda: sf.score(model, ClassifyTask(), traj, f, data, data, method="ekfac", damping=0),
                lambda: sf.self_score(model, ClassifyTask(), traj, f, data, method="ekfac", damping=0.0)):
        with pytest.raises(ValueError, match=r"module '0': method 'ekfac' with damping 0(\.0)? \(here 0\) divides by"):
            run()
    assert torch.isfinite(sf.score(model, ClassifyTask(), traj, f, data, data, method="ekfac", damping=1e-6)).all()


def test_states_saved_without_a_copy_are_refused(setup):
    """state_dict() returns references to the live tensors: "checkpoints" kept without a copy are all
    the final weights (and Adam states the final moments), which SOURCE would silently take for the
    run. Checkpoints that share only some tensors (frozen weights kept once) are fine."""
    model, data, _ = setup
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ckpts, states = [], []
    for _ in range(3):
        opt.zero_grad()
        ClassifyTask().compute_train_loss(data.tensors, model).backward()
        opt.step()
        ckpts.append(model.state_dict())
        states.append(opt.state_dict())
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 0 and segment 1, checkpoint 0 are the same tensors "
                                         r"in memory.*v.clone\(\)"):
        sf.Trajectory.even(ckpts, [1e-2] * 3, 3, data)
    copies = [{k: v.clone() for k, v in c.items()} for c in ckpts]
    with pytest.raises(ValueError, match=r"segment 0, optimizer state 0 and segment 0, optimizer state 1 are the same "
                                         r"tensors.*copy.deepcopy"):
        sf.Trajectory.even(copies, [1e-2] * 3, 1, data, optimizer="adam", optimizer_states=states)
    frozen = [{**c, "0.weight": ckpts[0]["0.weight"]} for c in copies]  # one tensor kept once: accepted
    sf.Trajectory.even(frozen, [1e-2] * 3, 3, data)
    history = {k: torch.stack([c[k] for c in copies]) for k in copies[0]}  # rows of one tensor per key: accepted
    sf.Trajectory.even([{k: v[i] for k, v in history.items()} for i in range(3)], [1e-2] * 3, 3, data)


def test_the_models_own_state_dict_as_one_of_several_checkpoints_is_refused(setup):
    """The final checkpoint given as model.state_dict() of the model being scored: loading the earlier
    checkpoints into the model overwrote it, so it was silently read as the one before (scores off by
    1-3 %). Alone (trajectory.final()) it is only loaded onto itself: fine."""
    model, data, ckpts = setup
    traj = sf.Trajectory.even([ckpts[0], model.state_dict()], [0.1] * 4, 2, data)
    with pytest.raises(ValueError, match=r"segment 1, checkpoint 0 is the model's own weights \(model.state_dict\(\) "
                                         r"holds references to them\).*v.clone\(\)"):
        sf.fit_factors(model, ClassifyTask(), traj)
    factors = sf.fit_factors(model, ClassifyTask(), traj.final())
    assert sf.score(model, ClassifyTask(), traj.final(), factors, data, data, method="ekfac").isfinite().all()


def test_likely_slips_are_warned(setup, tmp_path):
    """The final weights given twice (as the last saved checkpoint and as a file of their own) shift
    the steps the others are taken at; grad_scales above 1 are most likely the norms themselves."""
    model, data, ckpts = setup
    torch.save(ckpts[-1], tmp_path / "final.pt")
    traj = sf.Trajectory.even(ckpts + [tmp_path / "final.pt"], [0.1] * 8, 2, data)
    assert traj.layout() == [2, 1]
    with pytest.warns(UserWarning, match=r"segment 0, checkpoint 1 and segment 1, checkpoint 0 hold the same weights: "
                                         r"the same checkpoint given twice"):
        sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.warns(UserWarning, match=r"grad_scales go up to 4.2, .*given the norms clip_grad_norm_ returns"):
        sf.Trajectory.even(ckpts, [0.1] * 8, 2, data, grad_scales=[1.0] * 7 + [4.2])


class NaNTask(ClassifyTask):
    def __init__(self, where):
        self.where = where

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = model(x)
        if self.where == "loss" and x.shape[0] < 8:  # the last, short batch
            return out.sum() * float("nan")
        if self.where == "grad" and x.shape[0] < 8:
            return torch.sqrt(out - out.detach()).sum()  # value 0, gradient ∞
        return nn.functional.cross_entropy(out, y, reduction="sum")


@pytest.mark.parametrize("where, pattern", [
    ("loss", r"segment 0, checkpoint 0, batch 2 \(examples from 16\): the fisher loss is nan"),
    ("grad", r"segment 0, checkpoint 0, batch 2 \(examples from 16\): non-finite gradient at module '2'"),
])
def test_non_finite_loss_or_gradient_names_module_and_batch(setup, where, pattern):
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=pattern):
        sf.fit_factors(model, NaNTask(where), traj, batch_size=8)


class SampledTask(ClassifyTask):
    """The README's task: labels drawn by torch.distributions, which refuses NaN logits with a dump of them."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            y = torch.distributions.Categorical(logits=logits.detach()).sample()
        return nn.functional.cross_entropy(logits, y, reduction="sum")


def test_nan_inputs_are_named_as_the_cause():
    """A NaN in the data: the error names the example holding it, whether the task raises on what the model
    made of it (the true Fisher's sampler: its own error, with a note) or returns a NaN loss (the
    empirical Fisher)."""
    model = mlp(4, 5, 3)
    data = classification_data(20, 4, 3)
    data.tensors[0][13, 2] = float("nan")
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises((ValueError, RuntimeError)) as caught:  # the task's own error (a RuntimeError if
        sf.fit_factors(model, SampledTask(), traj, batch_size=8)  # torch.distributions' check is off)
    assert caught.value.__notes__[-1] == ("source_fast: raised in the task's compute_train_loss (the model's forward) on "
                                          "segment 0, checkpoint 0, batch 1 (examples from 8); example 13 has NaN or "
                                          "infinite values")
    with pytest.raises(FloatingPointError, match=r"batch 1 \(examples from 8\): the train loss is nan \(example 13 has "
                                                 r"NaN or infinite values\)"):
        sf.fit_factors(model, SampledTask(), traj, batch_size=8, fisher="empirical")


def test_an_infinite_input_the_loss_hides_is_named():
    """An inf feature that tanh saturates: the loss stays finite, but the first layer's input is inf, so the
    example's gradient tile, and its scores, would be NaN with no error. Fitting and scoring name the module
    and the example; a masked token's inf is no one's input (test_transformers covers padding)."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = classification_data(20, 4, 3)
    clean = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), clean, batch_size=8)
    x, y = data.tensors
    x = x.clone()
    x[11, 1] = float("inf")
    bad = torch.utils.data.TensorDataset(x, y)
    assert torch.isfinite(nn.functional.cross_entropy(model(x[8:16]), y[8:16], reduction="sum"))
    message = (r"batch 1 \(examples from 8\): the input of module '0' holds NaN or infinite values for example 11, "
               r"though the {} loss is finite")
    with pytest.raises(FloatingPointError, match=message.format("fisher")):
        sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment([model.state_dict()], bad, lr_sum=1.0)]),
                       batch_size=8)
    with pytest.raises(FloatingPointError, match=message.format("train")):
        sf.score(model, ClassifyTask(), clean, factors, bad, data, batch_size=8, train_segments="all")
    with pytest.raises(FloatingPointError, match=message.format("measurement")):
        sf.score(model, ClassifyTask(), clean, factors, data, bad, batch_size=8)


def _sorting_collate(examples):
    """A collator that sorts its batch (here by label; NLP collators sort by length, to pad less)."""
    examples = sorted(examples, key=lambda ex: int(ex[1]))
    return torch.stack([x for x, _ in examples]), torch.stack([y for _, y in examples])


def _as_list(examples):
    """Keeps the order; a list of fields (as [BatchEncoding, labels]), which reversing a pair cannot tell from
    two examples."""
    x, y = torch.utils.data.default_collate(examples)
    return [x, y]


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    y: torch.Tensor


def _sorting_into_a_dataclass(examples):
    return _Batch(*_sorting_collate(examples))


def test_the_collate_order_check_sees_past_ties_and_alike_examples(setup):
    """Examples that collate alike (duplicates) and list batches are no sign of sorting; ties on the key
    among the first pairs are looked past (up to 8 examples); a sorted batch in a dataclass is seen."""
    from source_fast._passes import check_collate_order

    _, data, _ = setup
    x, y = data.tensors
    dup = torch.utils.data.TensorDataset(torch.cat([x[:1], x[:1], x[1:]]), torch.cat([y[:1], y[:1], y[1:]]))
    check_collate_order(dup, _as_list, 8)  # order kept: taken, duplicates and all
    ties = torch.utils.data.TensorDataset(x, torch.tensor([1, 1, 1, 1, 2, 0, 1, 0] + [0] * 12))
    with pytest.raises(ValueError, match=r"_sorting_collate reorders its batch"):
        check_collate_order(ties, _sorting_collate, 8)
    with pytest.raises(ValueError, match=r"_sorting_into_a_dataclass reorders its batch"):
        check_collate_order(ties, _sorting_into_a_dataclass, 8)
    check_collate_order(torch.utils.data.TensorDataset(x, torch.ones_like(y)), _sorting_collate, 8)  # all tie: unseen


def _noisy_collate(examples):
    """Keeps the order and draws random numbers (as a masked LM's collator masks tokens)."""
    x, y = torch.utils.data.default_collate(examples)
    return x + 1e-3 * torch.randn_like(x), y


def test_a_collate_fn_that_sorts_its_batch_is_refused(setup):
    """Sorted batches give every example's scores to another one of its batch, with no error of their own:
    refused wherever a collate_fn batches training data or queries; one that keeps the order while drawing
    random numbers is taken, and the caller's random state is left as it was."""
    model, data, ckpts = setup
    data.tensors[1][:4] = torch.tensor([2, 0, 1, 0])  # the first batch out of order by label
    traj = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
    message = r"collate_fn _sorting_collate reorders its batch: .* give the same batch"
    with pytest.raises(ValueError, match=message):
        sf.fit_factors(model, ClassifyTask(), traj, batch_size=8, collate_fn=_sorting_collate)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=_sorting_collate)
    with pytest.raises(ValueError, match=message):
        sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts, loader, lr_sum=1.0)]))
    factors = sf.fit_factors(model, ClassifyTask(), traj, batch_size=8)
    with pytest.raises(ValueError, match=message):
        sf.score(model, ClassifyTask(), traj, factors, data, data, batch_size=8, collate_fn=_sorting_collate)
    with pytest.raises(ValueError, match=message):
        sf.score(model, ClassifyTask(), traj.final(), None, data, data, method="repsim", batch_size=8,
                 collate_fn=_sorting_collate)
    with pytest.raises(ValueError, match=message):
        sf.self_score(model, ClassifyTask(), traj, factors, data, batch_size=8, collate_fn=_sorting_collate)
    scores = sf.score(model, ClassifyTask(), traj, factors, data, data, batch_size=8, collate_fn=_noisy_collate)
    assert scores.shape == (20, 20) and torch.isfinite(scores).all()
    from source_fast._passes import check_collate_order

    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    check_collate_order(data, _noisy_collate, 8)
    assert torch.equal(torch.rand(1), expected)


def test_the_ready_tasks_true_fisher_reports_nan_logits_as_a_nan_loss():
    """ClassificationTask and CausalLMTask draw the true Fisher's labels from the logits: a row with NaN or
    inf logits draws a label anyway (even odds, token 0), so the NaN loss is what is reported, with the batch
    and the example, not the sampler's error (torch.distributions' dump, or an index past the vocabulary)."""
    from source_fast.tasks import ClassificationTask, sample_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0], [float("inf"), 0.0, 0.0]])
    torch.manual_seed(0)
    drawn = sample_tokens(logits)
    assert drawn[1:].tolist() == [0, 0] and 0 <= int(drawn[0]) < 3
    torch.manual_seed(0)
    assert int(sample_tokens(logits[:1])[0]) == int(drawn[0])  # finite rows draw as they would alone
    model = mlp(4, 5, 3)
    data = classification_data(20, 4, 3)
    data.tensors[0][13, 2] = float("nan")
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=r"batch 1 \(examples from 8\): the fisher loss is nan \(example 13 "
                                                 r"has NaN or infinite values\)"):
        sf.fit_factors(model, ClassificationTask(), traj, batch_size=8)


def test_classes_masked_with_minus_inf_are_never_drawn():
    """-inf logits mask classes (an action mask): the true Fisher draws among the others, as
    torch.distributions does; only a row with NaN, +inf or no class left draws from even odds."""
    from source_fast.tasks import ClassificationTask

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).masked_fill(torch.tensor([False, True, False]), float("-inf"))

    torch.manual_seed(0)
    model = Masked().double()
    data = classification_data(20, 4, 3)
    data.tensors[1][:] = torch.where(data.tensors[1] == 1, 0, data.tensors[1])  # no example of the masked class
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassificationTask(), traj, batch_size=8)  # fisher="true", the default
    assert all(torch.isfinite(lf.lam).all() for lf in factors.segments[0].values())


def test_a_checkpoint_holding_nan_is_named(setup):
    """A diverged run's checkpoint: its non-finite weight is named, not a batch's NaN loss."""
    model, data, ckpts = setup
    bad = copy.deepcopy(ckpts)
    bad[1]["0.bias"][3] = float("nan")
    traj = sf.Trajectory.even(bad, [0.1] * 4, 2, data)
    with pytest.raises(FloatingPointError, match=r"segment 1, checkpoint 0: its weight '0.bias' holds NaN or infinite"):
        sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.raises(FloatingPointError, match=r"checkpoint 0: its weight '0.bias' holds NaN"):
        sf.score(model, ClassifyTask(), traj, None, data, data, method="tracin")
    model[0].bias.requires_grad_(False)  # a frozen parameter may hold -inf on purpose (a mask kept as one)
    bad[1]["0.bias"][3] = float("-inf")
    sf.trajectory.load_into(model, bad[1], "c")
    assert model[0].bias[3] == float("-inf")


def test_a_collator_that_differs_call_to_call_is_not_judged_a_mean(setup):
    """A collator drawing random numbers (a masked LM's masking) gives other losses at every call, so the
    summed-loss check, which compares the loss of four examples with its halves', cannot judge it: skipped,
    not refused by chance. (A stand-in: targets scaled by 10 on all but every third call, which made the
    halves' losses dwarf the four examples' and read as a mean.)"""

    class Squared(sf.Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, t = batch
            return ((model(x).sum(1) - t) ** 2).sum()

        compute_measurement = compute_train_loss

    model, data, ckpts = setup
    calls = []

    def scaled(examples):
        calls.append(1)
        x, y = torch.utils.data.default_collate(examples)
        return x, y.to(x.dtype) * (1.0 if len(calls) % 3 == 1 else 10.0)

    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    sf.fit_factors(model, Squared(), traj, batch_size=8, collate_fn=scaled, fisher="empirical")


def test_queries_whose_measurement_has_no_gradient_are_named():
    """A query whose every token is masked (here: its class left out of the measurement) scores 0 against
    everything: a warning names it instead of leaving rows of zeros unexplained."""
    model = mlp(4, 5, 3)
    data, queries = classification_data(20, 4, 3), classification_data(6, 4, 3, seed=1)
    queries.tensors[1][:] = torch.tensor([0, 2, 1, 0, 2, 1])
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    with pytest.warns(UserWarning, match=r"queries: 2 of 6 have a measurement with no gradient at the tracked layers "
                                         r"\(numbers \[1, 4\]\): their scores are 0"):
        scores = sf.score(model, LeavesOutClass2(), traj, factors, data, queries, method="ekfac")
    assert (scores[[1, 4]] == 0).all() and (scores[[0, 2, 3, 5]] != 0).any(1).all()


@pytest.mark.parametrize("method", ["tracin", "grad_dot", "ekfac"])
def test_self_influence_names_examples_without_a_measurement_gradient_once(method):
    """self_score(use_measurement=True) in chunks: one warning naming every such example, not one per
    chunk (and per checkpoint for TracIn)."""
    model = mlp(4, 5, 3)
    data = classification_data(20, 4, 3)
    traj = sf.Trajectory([sf.Segment(perturbed_states(model, 2), data, lr_sum=1.0)])
    traj = traj if method == "tracin" else traj.final()
    factors = sf.fit_factors(model, ClassifyTask(), traj) if method == "ekfac" else None
    left_out = (data.tensors[1] == 2).nonzero().flatten().tolist()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        scores = sf.self_score(model, LeavesOutClass2(), traj, factors, data, method=method, use_measurement=True,
                               chunk_size=6, **({"damping": 0.1} if method == "ekfac" else {}))
    named = [str(w.message) for w in said if "no gradient" in str(w.message)]
    shown = f"[{', '.join(map(str, left_out[:5]))}]" + (", ..." if len(left_out) > 5 else "")
    assert named == [f"training examples (self-influence's query side): {len(left_out)} of 20 have a measurement with "
                     f"no gradient at the tracked layers (numbers {shown}): their scores are 0 (every token masked, "
                     "labels all -100?)"]
    assert (scores[left_out] == 0).all()


def test_a_float16_overflow_is_named():
    """Logits past float16's largest value (65504) are inf, and the loss NaN: the error says so."""
    model = nn.Sequential(nn.Linear(4, 3)).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)  # inputs of 100 give logits of 1.2e5
    data = torch.utils.data.TensorDataset(torch.full((8, 4), 100.0, dtype=torch.float16), torch.zeros(8, dtype=torch.long))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=r"batch 0 \(examples from 0\): the train loss is nan \(float16 holds "
                                                 r"values up to 65504"):
        sf.fit_factors(model, ClassifyTask(), traj, fisher="empirical")


def test_a_float16_autocast_overflow_is_named():
    """A float32 model whose task runs under float16 autocast: the captures are float32 (the weights'
    dtype), but the layer computed in float16, whose logits overflow the same way: the error says so."""

    class AutocastTask(ClassifyTask):
        def compute_train_loss(self, batch, model, sample=False):
            with torch.autocast("cpu", dtype=torch.float16):
                return super().compute_train_loss(batch, model, sample)

    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(300.0)
    data = torch.utils.data.TensorDataset(torch.full((8, 4), 100.0), torch.zeros(8, dtype=torch.long))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=r"the train loss is (nan|inf) \(float16 holds values up to 65504"):
        sf.fit_factors(model, AutocastTask(), traj, fisher="empirical")


def test_errors_name_the_examples_of_a_shard(setup, tmp_path):
    """score_corpus reads a shard at a time: the batch number counts within it, so the error also
    says which examples (here 12 to 15, shard rows 8-16, batch 1 of 4 examples)."""
    from source_fast.corpus import score_corpus

    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    x, y = data.tensors
    broken = torch.utils.data.TensorDataset(x.clone(), y)
    broken.tensors[0][13] = float("nan")
    with pytest.raises(FloatingPointError, match=r"segment 0, checkpoint 0, batch 1 \(examples from 12\): the train loss"):
        score_corpus(model, ClassifyTask(), traj, factors, broken, data, tmp_path, method="ekfac", shard_size=8,
                     batch_size=4, train_segments=[0], progress=False)


def test_mask_of_the_wrong_shape_names_the_module():
    from test_layers import TokenModel, TokenTask, _token_data

    class BadMask(TokenTask):
        def get_attention_mask(self, batch):
            return batch[2][:, :-1]

    model = TokenModel().double()
    data = _token_data(6, 6, 0, garbage=1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(ValueError, match=r"attention mask has shape \(6, 5\) but module 'inp' sees 6 examples × 6 tokens"):
        sf.fit_factors(model, BadMask(), traj)


def test_a_mask_of_other_values_than_0_and_1_is_refused():
    """Labels (-100 at padding) or token ids given as the mask would keep every token, silently."""
    from test_layers import TokenModel, TokenTask, _token_data

    model = TokenModel().double()
    data = _token_data(6, 6, 0, garbage=1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    for wrong, whose in ((lambda m: torch.where(m > 0, 1, -100), ""), (lambda m: {"inp": m * 7}, " for module 'inp'")):
        class Labels(TokenTask):
            def get_attention_mask(self, batch, wrong=wrong):
                return wrong(batch[2])

        with pytest.raises(ValueError, match=rf"returned a mask{whose} holding values other than 0 and 1 \(such as "
                                             r"\[-?\d+"):
            sf.fit_factors(model, Labels(), traj)
    for fine in (lambda m: m.bool(), lambda m: m.float(), lambda m: m.long()):  # 0/1 in any dtype
        class Fine(TokenTask):
            def get_attention_mask(self, batch, fine=fine):
                return fine(batch[2])

        sf.fit_factors(model, Fine(), traj)


def test_per_module_masks_must_name_modules_and_fit_them():
    from test_layers import TokenModel, TokenTask, _token_data

    class Typo(TokenTask):
        def get_attention_mask(self, batch):
            return {"inp": batch[2], "outt": batch[2]}

    class Short(TokenTask):
        def get_attention_mask(self, batch):
            return {"out": batch[2][:, :-1]}

    model = TokenModel().double()
    data = _token_data(6, 6, 0, garbage=1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(ValueError, match=r"get_attention_mask returned masks for \['outt'\], which name no module"):
        sf.fit_factors(model, Typo(), traj)

    class Parent(TokenTask):
        def get_attention_mask(self, batch):
            return {"": batch[2]}  # the model itself, not its layers

    with pytest.warns(UserWarning, match=r"masks for \[''\], which contain tracked modules but are not tracked"):
        sf.fit_factors(model, Parent(), traj)
    with pytest.raises(ValueError, match=r"module 'out'\'s attention mask has shape \(6, 5\) but module 'out' sees 6 "
                                         r"examples × 6 tokens"):
        sf.fit_factors(model, Short(), traj)


def test_tracked_modules_must_exist_and_be_supported(setup):
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])

    class Named(ClassifyTask):
        def __init__(self, names):
            self.names = names

        def get_influence_tracked_modules(self):
            return self.names

    with pytest.raises(ValueError, match="tracked module 'fc9' does not exist"):
        sf.fit_factors(model, Named(["0", "fc9"]), traj)
    with pytest.raises(TypeError, match="module '1' is a Tanh; supported layers are"):
        sf.fit_factors(model, Named(["1"]), traj)
    f = sf.fit_factors(model, Named(["2"]), traj)
    assert [s.name for s in f.layers] == ["2"]
    with pytest.raises(ValueError, match="factors were not fitted for module '0'"):
        sf.score(model, Named(["0", "2"]), traj, f, data, data)
    both = sf.fit_factors(model, Named(["0", "2"]), traj)
    with pytest.raises(ValueError, match=r"factors track modules the task does not: \['0'\]"):
        sf.score(model, Named(["2"]), traj, both, data, data)
    # The same modules listed in another order are the same factors (read by name).
    torch.testing.assert_close(sf.score(model, Named(["2", "0"]), traj, both, data, data, method="ekfac"),
                               sf.score(model, Named(["0", "2"]), traj, both, data, data, method="ekfac"))


def test_factor_files_incomplete_corrupted_or_from_another_model(setup, tmp_path):
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)])
    f = sf.fit_factors(model, ClassifyTask(), traj)
    f.save(tmp_path / "ok")
    tensors = json.loads((tmp_path / "ok" / "factors.json").read_text())["tensors_file"]
    assert re.fullmatch(r"factors\.[0-9a-f]{16}\.safetensors", tensors)
    assert sorted(os.listdir(tmp_path / "ok")) == sorted([".factors.lock", "factors.json", tensors])  # no temp files

    f.save(tmp_path / "incomplete")
    os.remove(tmp_path / "incomplete" / "factors.json")
    with pytest.raises(FileNotFoundError, match="incomplete: factors.json is missing"):
        sf.Factors.load(tmp_path / "incomplete")
    f.save(tmp_path / "incomplete")
    os.remove(tmp_path / "incomplete" / tensors)
    with pytest.raises(FileNotFoundError, match=f"incomplete: {tensors} is missing"):
        sf.Factors.load(tmp_path / "incomplete")

    f.save(tmp_path / "corrupt")
    blob = bytearray((tmp_path / "corrupt" / tensors).read_bytes())
    blob[-3] ^= 0xFF
    (tmp_path / "corrupt" / tensors).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted or was replaced"):
        sf.Factors.load(tmp_path / "corrupt")

    other = mlp(4, 6, 3)
    other_traj = sf.Trajectory([sf.Segment([other.state_dict()], data, lr_sum=1.0)])
    loaded = sf.Factors.load(tmp_path / "ok")
    with pytest.raises(ValueError, match="module '0' is .*d_out=6.* in the model but .*d_out=5.* in the factors"):
        sf.score(other, ClassifyTask(), other_traj, loaded, data, data)
    with pytest.raises(ValueError, match=r"checkpoints per segment \[1\], this one has \[2\]"):
        sf.score(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)]), loaded, data, data)

    # A hand-edited or damaged factors.json (the tensors' checksum is in it, not of it).
    meta = json.loads((tmp_path / "ok" / "factors.json").read_text())
    for change, pattern in [
        ({"layout": [1, 1], "num_examples": [20, 20], "checkpoints": meta["checkpoints"] * 2},
         r"segment 1, module '0' lacks"),
        ({"checkpoints": [[1]]}, r"is damaged: checkpoints \[\[1\]\] for layout \[1\]"),
        ({"layout": [0]}, r"is damaged: fisher 'true', average_params False, layout \[0\], num_examples \[20\]"),
        ({"fisher": "bogus"}, r"is damaged: fisher 'bogus'"),
        ({"layers": [{"name": "0"}]}, r"is damaged \(TypeError: "),
        ({"num_examples": None}, r"is damaged \(TypeError: "),
    ]:
        (tmp_path / "ok" / "factors.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ValueError, match=pattern):
            sf.Factors.load(tmp_path / "ok")
    two = sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0),
                                                               sf.Segment(ckpts[1:], data, lr_sum=1.0)]))
    two.save(tmp_path / "two")
    meta = json.loads((tmp_path / "two" / "factors.json").read_text())
    (tmp_path / "two" / "factors.json").write_text(json.dumps({**meta, "layout": [2], "num_examples": [20],
                                                               "checkpoints": [sum(meta["checkpoints"], [])]}))
    with pytest.raises(ValueError, match=r"factors.json names 1 segment\(s\), factors\..*\.safetensors holds more"):
        sf.Factors.load(tmp_path / "two")
    (tmp_path / "ok" / "factors.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="factors.json is corrupted"):
        sf.Factors.load(tmp_path / "ok")


def test_factors_holding_nan_are_refused_at_load(setup, tmp_path):
    """Any factor tensor, not only Λ: a NaN in a basis saved with a valid checksum names segment, module and
    field; finite values whose float32 sum overflows load."""
    model, data, ckpts = setup
    factors = sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)]))
    for field in ("q_a", "lam"):
        lf = factors.segments[0]["2"]
        broken = getattr(lf, field).clone()
        broken[0, 0] = float("nan")
        layer = dataclasses.replace(lf, **{field: broken})
        bad = dataclasses.replace(factors, segments=[{**factors.segments[0], "2": layer}])
        bad.save(tmp_path / field)
        with pytest.raises(ValueError, match=rf"segment 0, module '2': {field} holds NaN or inf; refit the factors"):
            sf.Factors.load(tmp_path / field)
    lf = factors.segments[0]["0"]
    big = dataclasses.replace(lf, a_cov=lf.a_cov.float() * 0 + 3e38)  # finite; the float32 sum is inf
    dataclasses.replace(factors, segments=[{**factors.segments[0], "0": big}]).save(tmp_path / "big")
    assert torch.isinf(sf.Factors.load(tmp_path / "big").segments[0]["0"].a_cov.float().sum())


def test_a_failed_save_leaves_nothing_behind(setup, tmp_path, monkeypatch):
    import safetensors.torch

    model, data, ckpts = setup
    f = sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)]))

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        f.save(tmp_path / "f")
    assert os.listdir(tmp_path / "f") == [".factors.lock"]  # no factor file, whole or half


def test_a_factor_save_killed_midway_leaves_the_previous_factors(setup, tmp_path, monkeypatch):
    """factors.json is the one commit point: killed after the new tensors are written but before the
    json is, the folder still loads the previous factors; the next save removes the stray tensors.
    Folders of format 1 (a fixed tensor file name) still load and are replaced cleanly."""
    from source_fast import factors as fm

    model, data, ckpts = setup
    task = ClassifyTask()
    first = sf.fit_factors(model, task, sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=1.0)]))
    second = sf.fit_factors(model, task, sf.Trajectory([sf.Segment(ckpts[1:2], data, lr_sum=1.0)]))
    first.save(tmp_path)

    with monkeypatch.context() as mp:
        mp.setattr(fm, "atomic_path", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            second.save(tmp_path)
    assert len(list(tmp_path.glob("factors.*.safetensors"))) == 2  # the new tensors, not yet committed
    loaded = sf.Factors.load(tmp_path)
    assert torch.equal(loaded.segments[0]["0"].lam, first.segments[0]["0"].lam)
    second.save(tmp_path)
    assert len(list(tmp_path.glob("factors.*.safetensors"))) == 1
    assert torch.equal(sf.Factors.load(tmp_path).segments[0]["0"].lam, second.segments[0]["0"].lam)
    # Format 1: tensors in factors.safetensors, no tensors_file in the json.
    meta = json.loads((tmp_path / "factors.json").read_text())
    os.replace(tmp_path / meta.pop("tensors_file"), tmp_path / "factors.safetensors")
    (tmp_path / "factors.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert torch.equal(sf.Factors.load(tmp_path).segments[0]["0"].lam, second.segments[0]["0"].lam)
    first.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".factors.lock", "factors.json", json.loads(
        (tmp_path / "factors.json").read_text())["tensors_file"]])


def test_factors_that_cannot_fit_are_refused_before_any_pass(setup, monkeypatch):
    """Each segment keeps two covariances, two eigenbases and Λ per layer (2·(25 + 25) + 2·25 = 150
    and 2·(36 + 9) + 2·18 = 126 values here, float64) plus the largest float64 eigendecomposition's
    3·6² values: a fit needing more than is free says which layers take it, before reading data."""
    from source_fast import factors as fm

    model, data, ckpts = setup
    traj = sf.Trajectory.even(ckpts, [0.1] * 8, 2, data)
    need = 2 * (150 + 126) * 8 + 3 * 8 * 36
    monkeypatch.setattr(fm, "available_memory", lambda device: need - 1)
    monkeypatch.setattr(fm, "_covariances", lambda *a, **k: pytest.fail("a pass ran"))
    with pytest.raises(ValueError, match=r"the factors of these 2 tracked layers \(2 segment\(s\)\) take about .* GB, "
                                         r"more than .* free on cpu; the largest: '0' .*, '2' .*Track fewer modules"):
        sf.fit_factors(model, ClassifyTask(), traj)
    monkeypatch.undo()
    monkeypatch.setattr(fm, "available_memory", lambda device: need)  # exactly enough
    sf.fit_factors(model, ClassifyTask(), traj)


def test_concurrent_factor_saves_to_one_folder_take_turns(setup, tmp_path, monkeypatch):
    """Two saves overlapping in one folder (here: each pauses after writing its tensors) must leave
    one complete save, not a factors.json naming tensors the other save's cleanup deleted."""
    import threading
    import time

    from source_fast import factors as fm

    model, data, ckpts = setup
    task = ClassifyTask()
    saves = [sf.fit_factors(model, task, sf.Trajectory([sf.Segment([c], data, lr_sum=1.0)])) for c in ckpts[:2]]
    saves[0].save(tmp_path)
    real = fm.write_named_by_content

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(0.2)  # without the lock the other save writes its tensors and cleans up meanwhile
        return out

    monkeypatch.setattr(fm, "write_named_by_content", slow)
    threads = [threading.Thread(target=f.save, args=(tmp_path,)) for f in saves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loaded = sf.Factors.load(tmp_path)
    assert any(torch.equal(loaded.segments[0]["0"].lam, f.segments[0]["0"].lam) for f in saves)
    assert len(list(tmp_path.glob("factors.*.safetensors"))) == 1


def test_a_load_meeting_a_save_reads_the_new_factors(setup, tmp_path, monkeypatch):
    """A save into the folder between load's reading of factors.json and of the tensors it names (which the
    save deletes once its own json is in place): load reads the new factors instead of failing. A missing
    tensor file with factors.json unchanged is still an error, and tensors_file never leaves the folder."""
    from source_fast import factors as fm

    model, data, ckpts = setup
    task = ClassifyTask()
    first, second = (sf.fit_factors(model, task, sf.Trajectory([sf.Segment([c], data, lr_sum=1.0)])) for c in ckpts[:2])
    first.save(tmp_path)
    real, calls = fm.sha256_file, []

    def save_meanwhile(path):
        calls.append(path)
        if len(calls) == 1:
            second.save(tmp_path)  # replaces factors.json, then deletes the file `path` names
        return real(path)

    monkeypatch.setattr(fm, "sha256_file", save_meanwhile)
    loaded = sf.Factors.load(tmp_path)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert torch.equal(loaded.segments[0]["0"].lam, second.segments[0]["0"].lam)
    monkeypatch.undo()
    meta = json.loads((tmp_path / "factors.json").read_text())
    os.remove(tmp_path / meta["tensors_file"])
    with pytest.raises(FileNotFoundError, match=r"is incomplete: factors\.[0-9a-f]{16}\.safetensors is missing"):
        sf.Factors.load(tmp_path)
    (tmp_path / "factors.json").write_text(json.dumps({**meta, "tensors_file": "../elsewhere.safetensors"}))
    with pytest.raises(ValueError, match=r"is damaged: tensors_file '../elsewhere.safetensors' is no name"):
        sf.Factors.load(tmp_path)


def test_a_tracked_module_that_never_runs_is_named_with_the_fix():
    """nn.MultiheadAttention multiplies by its out_proj's weight without calling the module: the default
    tracking leaves it out with a warning; named, it is refused with the fix."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    torch.manual_seed(0)
    model = Encoder().double()
    data = torch.utils.data.TensorDataset(torch.randn(6, 4, 8, dtype=torch.float64), torch.randint(0, 3, (6,)))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.warns(UserWarning, match=r"nn.MultiheadAttention modules \['enc.self_attn'\] are not tracked"):
        factors = sf.fit_factors(model, ClassifyTask(), traj)
    assert sorted(factors.segments[0]) == ["enc.linear1", "enc.linear2", "head"]

    class Named(ClassifyTask):
        def get_influence_tracked_modules(self):
            return ["enc.self_attn.out_proj", "head"]

    with pytest.raises(ValueError, match=r"segment 0, checkpoint 0, batch 0 \(examples from 0\): tracked modules "
                                         r"\['enc.self_attn.out_proj'\] did not run .*get_influence_tracked_modules"):
        sf.fit_factors(model, Named(), traj)


def _adam_state(model, data):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ClassifyTask().compute_train_loss(data.tensors, model).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("spoil, pattern", [
    (lambda st: st["state"][0]["exp_avg_sq"].view(-1)[0].fill_(float("nan")),
     r"optimizer state 0: the exp_avg_sq of parameter '0.weight' holds NaN, infinite or negative values"),
    (lambda st: st["state"][2]["exp_avg_sq"].view(-1)[0].fill_(-1.0), r"parameter '2.weight' holds NaN, infinite or negative"),
    (lambda st: st["state"][0].update(step=torch.tensor(0.0)), r"parameter '0.weight' records step .*needs the number of steps"),
    (lambda st: st["param_groups"][0].pop("betas"), r"parameter group 0 is not Adam's or AdamW's \(it lacks \['betas'\]\)"),
    (lambda st: st["param_groups"][0].update(correct_bias=False), r"it skips Adam's bias correction"),
    (lambda st: st["param_groups"][0].update(maximize=True), r"it maximizes the objective \(maximize=True\)"),
])
def test_adam_states_that_cannot_be_a_run_are_named(setup, spoil, pattern):
    """A diverged run's NaN second moments, a step count of 0, a hand-built group: each would give NaN
    or zero scores, silently."""
    model, data, _ = setup
    state = _adam_state(model, data).state_dict()
    spoil(state)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=0.1, optimizer="adam", optimizer_states=[state])])
    with pytest.raises(ValueError, match=pattern):
        sf.fit_factors(model, ClassifyTask(), traj)


def test_states_of_other_optimizers_or_the_optimizer_itself_are_refused(setup):
    model, data, _ = setup
    for cls in (torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax):
        opt = cls(model.parameters(), lr=1e-2)
        ClassifyTask().compute_train_loss(data.tensors, model).backward()
        opt.step()
        traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=0.1, optimizer="adam",
                                         optimizer_states=[opt.state_dict()])])
        with pytest.raises(ValueError, match=r"parameter group 0 is not Adam's or AdamW's \(its steps are another Adam variant's: "
                                             r"NAdam's, RAdam's or Adamax's\)"):
            sf.fit_factors(model, ClassifyTask(), traj)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=0.1, optimizer="adam",
                                     optimizer_states=[_adam_state(model, data)])])
    with pytest.raises(TypeError, match=r"optimizer state 0 is the optimizer itself: pass its state_dict\(\)"):
        sf.fit_factors(model, ClassifyTask(), traj)
    # Other libraries' Adams (transformers', DeepSpeed's) save torch's per-parameter state but groups
    # without amsgrad: they are Adam's, and fit as torch's does.
    torch_state = _adam_state(model, data).state_dict()
    theirs = {"state": torch_state["state"], "param_groups": [
        {k: group[k] for k in ("params", "lr", "betas", "eps", "weight_decay")} | {"correct_bias": True}
        for group in torch_state["param_groups"]]}
    fits = [sf.fit_factors(model, ClassifyTask(), sf.Trajectory([sf.Segment(
        [model.state_dict()], data, lr_sum=0.1, optimizer="adam", optimizer_states=[st])])) for st in (torch_state, theirs)]
    assert torch.equal(fits[0].segments[0]["0"].precond, fits[1].segments[0]["0"].precond)


def test_factors_of_another_trajectory_are_refused(setup):
    """Same layout, another optimizer: the factors' Adam preconditioner would be silently dropped or
    missing. (Other data is fine: the curvature of a subset serves the whole set.)"""
    model, data, ckpts = setup
    state = _adam_state(model, data).state_dict()
    adam = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=0.1, optimizer="adam", optimizer_states=[state])])
    factors = sf.fit_factors(model, ClassifyTask(), adam)
    sgd = sf.Trajectory([sf.Segment(ckpts[:1], data, lr_sum=0.1)])
    with pytest.raises(ValueError, match=r"segment 0: the factors were fitted for an Adam segment, this one's optimizer is 'sgd'"):
        sf.score(model, ClassifyTask(), sgd, factors, data, data)
    with pytest.raises(ValueError, match=r"segment 0: the factors were fitted for an SGD segment, this one's optimizer is 'adam'"):
        sf.score(model, ClassifyTask(), adam, sf.fit_factors(model, ClassifyTask(), sgd), data, data)


def test_score_corpus_refuses_bad_sizes_and_a_file_before_writing(setup, tmp_path):
    model, data, ckpts = setup
    traj = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=0.1)])
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    from source_fast.corpus import score_corpus

    for option, pattern in (({"top_k": 2.5}, "top_k must be a positive integer or None, got 2.5"),
                            ({"shard_size": True}, "shard_size must be a positive integer, got True"),
                            ({"batch_size": "8"}, "batch_size must be a positive integer, got '8'"),
                            ({"query_memory_budget": None}, "query_memory_budget must be a number of bytes"),
                            ({"query_memory_budget": float("inf")}, "positive, finite number of bytes")):
        with pytest.raises(ValueError, match=re.escape(pattern)):
            score_corpus(model, ClassifyTask(), traj, factors, data, data, tmp_path / "out", progress=False, **option)
        assert not (tmp_path / "out").exists()  # nothing that would pin the folder to the refused settings
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"out_dir '.*file' is a file; give a folder"):
        score_corpus(model, ClassifyTask(), traj, factors, data, data, tmp_path / "file", progress=False)
    with pytest.raises(ValueError, match=r"the factors' folder '.*file' is a file"):
        factors.save(tmp_path / "file")
    with pytest.raises(ValueError, match=r"resume_dir '.*file' is a file; give a folder"):
        sf.fit_factors(model, ClassifyTask(), traj, resume_dir=tmp_path / "file")


def test_factors_refuse_checkpoints_of_another_run(setup, tmp_path):
    """Factors remember which checkpoints they were fitted on: another run's trajectory (same
    architecture) scored with them is refused, not scored with the wrong curvature. The same weights as
    a safetensors or torch file, and after the factors' save and load, are the same checkpoints."""
    from safetensors.torch import save_file

    model, data, ckpts = setup
    task = ClassifyTask()
    traj = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj)
    other = sf.Trajectory([sf.Segment([ckpts[0], {k: v + 1e-3 for k, v in ckpts[1].items()}], data, lr_sum=1.0)])
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 1 is not the checkpoint these factors were fitted on"):
        sf.score(model, task, other, factors, data, data)
    save_file(ckpts[0], str(tmp_path / "c0.safetensors"))
    torch.save(ckpts[1], tmp_path / "c1.pt")
    factors.save(tmp_path / "f")
    as_files = sf.Trajectory([sf.Segment([tmp_path / "c0.safetensors", tmp_path / "c1.pt"], data, lr_sum=1.0)])
    torch.testing.assert_close(sf.score(model, task, as_files, sf.Factors.load(tmp_path / "f"), data, data),
                               sf.score(model, task, traj, factors, data, data), rtol=1e-12, atol=1e-15)


def test_a_tied_weight_signs_a_file_and_its_state_dict_alike(tmp_path):
    """save_pretrained stores a tied weight once; the model's state_dict has it under both names."""
    transformers = pytest.importorskip("transformers")
    from source_fast.factors import checkpoint_signature

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=400, n_positions=8, n_embd=16, n_layer=1,
                                                                n_head=2))  # 6,400 embedding values
    model.save_pretrained(tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state
    assert checkpoint_signature(tmp_path / "model.safetensors", "file") == checkpoint_signature(state, "dict")
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] += 1e-3
    assert checkpoint_signature(tmp_path / "model.safetensors", "file") != checkpoint_signature(state, "dict")
    # A run that trained only the last rows (new tokens' embeddings) is another checkpoint too.
    rows = {k: v.clone() for k, v in model.state_dict().items()}
    rows["transformer.wte.weight"][-1] += 1e-3
    assert checkpoint_signature(rows, "dict") != checkpoint_signature(tmp_path / "model.safetensors", "file")


def test_factors_of_files_with_scalars_and_another_checkpoint_count(tmp_path):
    """BatchNorm's num_batches_tracked is a 0-d tensor: a safetensors checkpoint holding one is signed
    like its state_dict. With average_params (Fast-SOURCE) the layout says one checkpoint per segment
    whatever their number: a segment with another number of checkpoints is refused too."""
    from safetensors.torch import save_file

    from source_fast.factors import checkpoint_signature

    torch.manual_seed(0)
    norm = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    assert state["1.num_batches_tracked"].dim() == 0
    save_file(state, str(tmp_path / "bn.safetensors"))
    assert checkpoint_signature(tmp_path / "bn.safetensors", "file") == checkpoint_signature(state, "dict")
    model, data = mlp(4, 5, 3), classification_data(20, 4, 3)
    ckpts = perturbed_states(model, 3)
    traj = sf.Trajectory([sf.Segment(ckpts[:2], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, ClassifyTask(), traj, average_params=True)
    more = sf.Trajectory([sf.Segment(ckpts, data, lr_sum=1.0)])
    with pytest.raises(ValueError, match=r"segment 0 has 3 checkpoints, these factors were fitted on 2"):
        sf.score(model, ClassifyTask(), more, factors, data, data, method="fast_source")


def test_columns_given_as_a_tuple_are_named_as_the_cause(setup):
    """(X, y) is a sequence of two examples: stacking them fails with default_collate's size error,
    which is not about padding here."""
    model, data, ckpts = setup
    traj = sf.Trajectory.even(ckpts, [0.1] * 4, 1, data)
    factors = sf.fit_factors(model, ClassifyTask(), traj)
    x, y = data.tensors
    with pytest.raises(RuntimeError, match=r"queries, batch 0 .*\nthe data is a tuple of 2 tensors of 5 rows each, read as 2 "
                                           r"examples .*TensorDataset\(X, y\)"):
        sf.score(model, ClassifyTask(), traj, factors, data, (x[:5], y[:5]))


def test_a_collate_fn_error_says_which_pass_and_batch(setup):
    """An error raised by the user's collate_fn (a dataset column it cannot batch, say) keeps its own type
    and words, with a note naming where source_fast was reading."""
    model, data, ckpts = setup

    def collate(batch):
        raise ValueError("Unable to create tensor: features (`text`) have excessive nesting")

    traj = sf.Trajectory.even(ckpts, [0.1] * 4, 1, data)
    with pytest.raises(ValueError, match="Unable to create tensor") as info:
        sf.fit_factors(model, ClassifyTask(), traj, collate_fn=collate)
    assert info.value.__notes__ == ["source_fast: raised while reading segment 0, checkpoint 0, batch 0 (examples from 0) "
                                    "(the data and its collate_fn)"]



def test_an_exception_that_takes_no_note_goes_on_unchanged(setup):
    """add_note fails on an exception whose __notes__ is not a list: the collate_fn's own exception
    still comes through, without the note."""
    model, data, ckpts = setup

    def collate(batch):
        exc = ValueError("the collate_fn's own words")
        exc.__notes__ = ("a tuple, which add_note cannot append to",)
        raise exc

    with pytest.raises(ValueError, match="the collate_fn's own words") as info:
        sf.fit_factors(model, ClassifyTask(), sf.Trajectory.even(ckpts, [0.1] * 4, 1, data), collate_fn=collate)
    assert info.value.__notes__ == ("a tuple, which add_note cannot append to",)


def test_a_weight_decay_dict_must_name_the_models_modules(setup):
    """A typo in a {module name: decay} dict was an entry for no module, silently."""
    model, data, ckpts = setup
    traj = sf.Trajectory.even(ckpts, [0.1] * 4, 1, data, weight_decay={"0": 0.01, "2": 0.01, "3": 0.3})
    with pytest.raises(ValueError, match=r"segment 0: weight_decay names modules the model does not have: \['3'\]"):
        sf.fit_factors(model, ClassifyTask(), traj)


def test_an_error_in_the_tasks_code_says_which_pass_and_batch(setup):
    """The task's (or the model's) own exception, unchanged, with a note naming the pass and batch."""
    model, data, ckpts = setup

    class Broken(ClassifyTask):
        def compute_measurement(self, batch, model):
            raise KeyError("input_ids")

    traj = sf.Trajectory.even(ckpts, [0.1] * 4, 1, data)
    with pytest.raises(KeyError, match="input_ids") as info:
        sf.score(model, Broken(), traj, None, data, data, method="tracin", batch_size=8)
    assert info.value.__notes__ == ["source_fast: raised in the task's compute_measurement (the model's forward) on "
                                    "queries at segment 0, checkpoint 0, batch 0 (examples from 0)"]


def test_an_error_after_a_progress_line_still_names_the_examples():
    """run_pass's progress update must not rebind `first` (the examples' position, read by errors)."""
    from _helpers import ClassifyTask, classification_data, mlp

    model = mlp(4, 5, 3)
    x, y = classification_data(8, 4, 3).tensors
    x = x.clone()
    x[6, 0] = float("nan")  # in the second batch
    traj = sf.Trajectory([sf.Segment([model.state_dict()], torch.utils.data.TensorDataset(x, y), lr_sum=1.0)])
    with pytest.raises(FloatingPointError, match=r"batch 1 \(examples from 4\): the train loss is nan"):
        sf.fit_factors(model, ClassifyTask(), traj, batch_size=4, fisher="empirical", progress=True)


def test_a_list_of_masks_outside_the_dict_is_refused():
    """Masks per call belong to one shared layer, in the dict; a bare list masked every layer with its first."""
    from test_layers import TokenModel, TokenTask, _token_data

    class Bare(TokenTask):
        def get_attention_mask(self, batch):
            return [batch[2], torch.zeros_like(batch[2])]

    model = TokenModel().double()
    traj = sf.Trajectory([sf.Segment([model.state_dict()], _token_data(6, 6, 0, garbage=1), lr_sum=1.0)])
    with pytest.raises(TypeError, match="get_attention_mask returned a list"):
        sf.fit_factors(model, Bare(), traj)


@pytest.mark.parametrize("call, flag", [("score", "per_token"), ("score", "sum_queries"),
                                        ("self_score", "per_module"), ("self_score", "use_measurement")])
def test_yes_no_options_take_only_booleans(setup, call, flag):
    """A string such as "no" is true to Python: refused, not taken as yes."""
    model, data, states = setup
    traj = sf.Trajectory([sf.Segment([states[-1]], data, lr_sum=1.0)])
    args = (data, data) if call == "score" else (data,)
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        getattr(sf, call)(model, ClassifyTask(), traj, None, *args, method="grad_dot", **{flag: "no"})
    getattr(sf, call)(model, ClassifyTask(), traj, None, *args, method="grad_dot", **{flag: np.bool_(False)})


class FlatExamplesFirst(SequenceFirst):
    """`mix` fed (examples × tokens, features), one example's rows after another's, as OPT's fc1 is fed."""

    def forward(self, x):
        n, t = x.shape[:2]
        return self.head(torch.tanh(self.mix(x.reshape(n * t, 3))).reshape(n, t, 4).mean(1))


def test_rows_no_batch_could_check_are_named():
    """Rows read as examples × tokens are checked on a batch of distinct examples; where every batch's
    examples are alike, the reversal shows nothing, and the pass says which layers went unchecked. The
    scores are those of the same layer fed (examples, tokens, features) either way, and from a stream
    whose only tracked layer takes several rows per example (a stream's batches are counted as read)."""
    torch.manual_seed(0)
    flat, plain = FlatExamplesFirst().double(), SequenceFirst().double()  # plain: the same weights, fed (n, t, 3)
    plain.load_state_dict(flat.state_dict())
    plain.forward = lambda x: plain.head(torch.tanh(plain.mix(x)).mean(1))
    x, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    for alike in (False, True):
        data = torch.utils.data.TensorDataset(x[:1].expand(6, 5, 3) if alike else x, y[:1].expand(6) if alike else y)
        scores = []
        for model in (flat, plain):
            traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scores.append(sf.score(model, SequenceTask(), traj, None, data, data, method="grad_dot", batch_size=4))
            said = [str(w.message) for w in caught if "could not be checked" in str(w.message)]
            assert [m.split(":")[0] for m in said] == ([] if not alike or model is plain else
                                                       ["queries", "segment 0, checkpoint 0"])
            assert all(m.split(": ", 1)[1] == "modules ['mix'] take several rows per example, or rows picked by index, "
                       "and on 2 of 2 batches their examples' rows were alike, so which example each row belongs to "
                       "could not be checked there" for m in said)
        assert torch.allclose(scores[0], scores[1], rtol=1e-12, atol=0)

    class MixOnly(SequenceTask):
        def get_influence_tracked_modules(self):
            return ["mix"]

    data = torch.utils.data.TensorDataset(x, y)
    scores = [sf.score(model, MixOnly(), sf.Trajectory([sf.Segment([model.state_dict()], Stream(data), lr_sum=1.0,
                                                                     num_examples=6)]), None, Stream(data), data,
                       method="grad_dot", batch_size=4) for model in (flat, plain)]
    assert scores[0].shape == (6, 6) and torch.allclose(scores[0], scores[1], rtol=1e-12, atol=0)


class Routed(nn.Module):
    """`expert` takes the tokens whose first feature is positive, picked by index, as a mixture of experts'
    expert does: a data-dependent share of the examples' rows."""

    def __init__(self):
        super().__init__()
        self.embed, self.expert, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.embed(x).reshape(-1, 3)
        picked = (x.reshape(-1, 3)[:, 0] > 0).nonzero().squeeze(1)
        out = h.index_add(0, picked, torch.tanh(self.expert(h[picked])))
        return self.head(out.reshape(x.shape).mean(1))


def test_rows_picked_by_index_are_checked_on_every_batch():
    """An expert's rows are the examples' only where each example sends it as many tokens as the others:
    checked on every batch, as many rows as examples or a multiple, and refused where they are not."""
    torch.manual_seed(0)
    model = Routed().double()

    def routed(counts):  # examples of 4 tokens, the first `count` of them sent to the expert
        x = torch.randn(len(counts), 4, 3, dtype=torch.float64).abs()
        for i, count in enumerate(counts):
            x[i, count:, 0] *= -1
        data = torch.utils.data.TensorDataset(x, torch.randint(0, 2, (len(counts),)))
        return sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])

    sf.fit_factors(model, SequenceTask(), routed([2, 2, 1, 1]), batch_size=2)  # every batch's rows are the examples'

    class ExpertOnly(SequenceTask):  # the expert the first tracked layer: autograd keeps no index op before it
        def get_influence_tracked_modules(self):
            return ["expert"]

    with pytest.raises(ValueError, match=r"batch 1 \(examples from 2\): module 'expert' takes several rows per example"):
        sf.fit_factors(model, ExpertOnly(), routed([2, 2, 1, 3]), batch_size=2)
    for counts, pattern in (([2, 2, 0, 2], r"module 'expert' sees rows picked by index .* as many as the batch's 2 "
                                           r"examples, and with the examples reversed they stay as they were"),
                            ([2, 2, 1, 3], r"module 'expert' takes several rows per example for the batch's 2 examples "
                                           r".* but not one example's rows after another's")):
        with pytest.raises(ValueError, match=r"segment 0, checkpoint 0, batch 1 \(examples from 2\): " + pattern):
            sf.fit_factors(model, SequenceTask(), routed(counts), batch_size=2)


class DictTask(sf.Task):
    """Batches {"x", "y"}; takes "y" out of its batch (as tasks that pop HF's labels do), runs the model
    once under no_grad first (a teacher's pass, no part of the loss), and samples labels with numpy."""

    def compute_train_loss(self, batch, model, sample=False):
        y = batch.pop("y")
        with torch.no_grad():
            model(batch["x"])
        logits = model(batch["x"])
        if sample:
            p = torch.softmax(logits.detach(), -1).numpy()
            y = torch.tensor([np.random.choice(len(row), p=row / row.sum()) for row in p])
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_the_order_check_leaves_the_pass_as_it_was():
    """The check of which example each row belongs to sees the batch as the data gave it (the task took
    "y" out of its own), leaves calls under no_grad out as the capture does, keeps numpy's random state
    (sampled labels are those of a model fed examples first), and takes a DataLoader subclass over a
    stream for what it is not: refused, as its own iteration would be lost."""
    torch.manual_seed(0)
    flat, plain = FlatExamplesFirst().double(), SequenceFirst().double()
    plain.load_state_dict(flat.state_dict())
    plain.forward = lambda x: plain.head(torch.tanh(plain.mix(x)).mean(1))
    examples = [{"x": torch.randn(5, 3, dtype=torch.float64), "y": torch.tensor(i % 2)} for i in range(6)]
    lams = []
    for model in (flat, plain):
        np.random.seed(0)
        traj = sf.Trajectory([sf.Segment([model.state_dict()], examples, lr_sum=1.0)])
        lams.append(sf.fit_factors(model, DictTask(), traj, batch_size=4).segments[0]["mix"].lam)
    assert torch.allclose(lams[0], lams[1], rtol=1e-10, atol=0)

    class Loader(torch.utils.data.DataLoader):
        pass

    stream = Loader(Stream(torch.utils.data.TensorDataset(torch.randn(6, 5, 3), torch.zeros(6, dtype=torch.long))),
                    batch_size=2)
    with pytest.raises(ValueError, match=r"the data is a Loader \(a DataLoader subclass\) over a stream, whose own way "
                                         r"of iterating would be lost"):
        sf.fit_factors(flat.float(), SequenceTask(), sf.Trajectory([sf.Segment([flat.state_dict()], stream, lr_sum=1.0,
                                                                               num_examples=6)]))


class Twice(nn.Module):
    """`mix` runs on two sequences, each flattened to (examples × tokens, features), padded with inf (a
    fully masked attention row's NaN or inf, which the loss never reads); `pool` on (examples × 2, features),
    rows that are no tokens."""

    def __init__(self):
        super().__init__()
        self.mix, self.pool, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.fill = float("inf")  # 0 for autograd's explicit gradients, which 0 · inf would make NaN

    def forward(self, x1, m1, x2, m2):
        n, t = x1.shape[:2]
        parts = []
        for x, m in ((x1, m1), (x2, m2)):
            h = torch.tanh(self.mix(x.masked_fill(m[..., None] == 0, self.fill).reshape(n * t, 3)))
            h = torch.where(m.reshape(-1, 1) > 0, h, 0).reshape(n, t, 4)
            parts.append(h.sum(1))
        pooled = self.pool(torch.stack(parts, 1).reshape(n * 2, 4)).reshape(n, 2, 4).sum(1)
        return self.head(pooled)


class TwiceTask(sf.Task):
    def compute_train_loss(self, batch, model, sample=False):
        return nn.functional.cross_entropy(model(*batch[:4]), batch[4], reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        # pool's rows are no tokens: a mask of other rows than the examples (a multiple-choice model's) leaves it be
        return {"mix": [batch[1], batch[3]], "pool": batch[1].repeat(2, 1)}


def test_a_layer_run_twice_on_examples_times_tokens_takes_a_mask_per_call():
    """Each call's rows are read per example before the calls join (call after call), so each call's own
    mask masks its own tokens: the input covariance is that of the unmasked rows of both calls, and inf at
    padded rows counts as 0; `pool`'s rows, two per example, are no tokens, and a mask of other rows leaves
    them unmasked, while one per example of other tokens (a Siamese pair's mask joined) is refused.
    Per-example gradients are the explicit ones (float64: 1e-10)."""
    torch.manual_seed(0)
    model = Twice().double()
    n, t = 6, 5
    x1, x2 = torch.randn(n, t, 3, dtype=torch.float64), torch.randn(n, t, 3, dtype=torch.float64)
    m1 = (torch.arange(t)[None] < torch.randint(1, t + 1, (n,))[:, None]).long()
    m2 = (torch.arange(t)[None] < torch.randint(1, t + 1, (n,))[:, None]).long()
    data = torch.utils.data.TensorDataset(x1, m1, x2, m2, torch.randint(0, 2, (n,)))
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, TwiceTask(), traj, batch_size=4, fisher="empirical")
    rows = torch.cat([x1[m1 > 0], x2[m2 > 0]])
    a = torch.cat([rows, torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    assert torch.allclose(factors.segments[0]["mix"].a_cov, a.T @ a / len(a), rtol=1e-10, atol=0)
    grads, model.fill = [], 0.0
    for i in range(n):
        model.zero_grad()
        TwiceTask().compute_train_loss([v[i : i + 1] for v in data.tensors], model).backward()
        grads.append(torch.cat([torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).flatten() for m in model.children()]))
    grads, model.fill = torch.stack(grads), float("inf")
    scores = sf.score(model, TwiceTask(), traj, None, data, data, method="grad_dot", batch_size=4)
    assert (scores - grads @ grads.T / n).abs().max() / (grads @ grads.T / n).abs().max() < 1e-10

    class JoinedMask(TwiceTask):
        def get_attention_mask(self, batch):
            return {"mix": torch.cat([batch[1], batch[3]], 1)}

    with pytest.raises(ValueError, match=r"module 'mix''s attention mask has shape \(4, 10\) but module 'mix' sees 4 "
                                         r"examples × 5 tokens \(a module that runs more than once takes a mask per call"
                       ) as caught:
        sf.fit_factors(model, JoinedMask(), traj, batch_size=4)
    assert caught.value.__notes__ == ["source_fast: on segment 0, checkpoint 0, batch 0 (examples from 0)"]


class NoisyTask(SequenceTask):
    """Noise added to the inputs in the loss, as a diffusion model's loss adds it."""

    def compute_train_loss(self, batch, model, sample=False):
        return super().compute_train_loss((batch[0] + 0.1 * torch.randn_like(batch[0]), batch[1]), model, sample)


def test_a_loss_that_draws_random_numbers_is_checked_for_them():
    """Reversed examples' rows cannot match under fresh noise: a second forward pass of the batch as it
    was shows the randomness, and layers fed the examples first are taken as they are; a layer whose
    rows would need the check is refused, saying why."""
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 5, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    plain, flat = SequenceFirst().double(), FlatExamplesFirst().double()
    plain.forward = lambda x: plain.head(torch.tanh(plain.mix(x)).mean(1))
    traj = lambda m: sf.Trajectory([sf.Segment([m.state_dict()], data, lr_sum=1.0)])  # noqa: E731
    sf.fit_factors(plain, NoisyTask(), traj(plain), batch_size=4)
    with pytest.raises(ValueError, match=r"batch 0 \(examples from 0\): module 'mix' takes several rows per example "
                                         r"for the batch's 4 examples, .* the task or the model draws random numbers"):
        sf.fit_factors(flat, NoisyTask(), traj(flat), batch_size=4)


class Positions(nn.Module):
    """Takes the sequence's positions as a 1-D tensor (T,), added to every example; `pick` reads each
    example's last token, picked by index (a classifier pooling the last token)."""

    def __init__(self):
        super().__init__()
        self.pos, self.mix, self.pick, self.head = nn.Embedding(8, 3), nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, positions):
        h = torch.tanh(self.mix(x + self.pos(positions)[None]))
        return self.head(torch.tanh(self.pick(h[torch.arange(len(h)), -1])))


def test_the_order_check_takes_legitimate_batches_and_losses():
    """What the check must not refuse: a 1-D tensor of a sequence's positions as long as the batch has
    examples (flipped at first look, left at the second), a batch that is a list of examples (reversed as
    a whole, not each example's own values), noise in the loss for rows picked by index (one per example)
    and for layers fed as many tokens as examples. Scores are the explicit per-example gradients'
    (float64: 1e-10). Noise from a seed fixed for every batch cannot be told from rows out of order,
    where a check is due: refused, saying so (here, as many tokens as examples, and rows picked by index)."""
    torch.manual_seed(0)
    model = Positions().double()
    x, y = torch.randn(8, 4, 3, dtype=torch.float64), torch.randint(0, 2, (8,))  # 4 tokens, batches of 4

    class PositionsTask(sf.Task):
        seed = None  # noise in the loss: None, or drawn from a generator seeded the same for every batch

        def compute_train_loss(self, batch, model, sample=False):
            if isinstance(batch, list) and isinstance(batch[0], dict):  # collate_fn=list: the examples as they are
                batch = [torch.stack([e["x"] for e in batch]), torch.stack([e["y"] for e in batch])]
            inputs = batch[0]
            if self.seed is not None:
                gen = torch.Generator().manual_seed(self.seed) if self.seed >= 0 else None
                inputs = inputs + torch.randn(inputs.shape, generator=gen, dtype=inputs.dtype)
            return nn.functional.cross_entropy(model(inputs, torch.arange(4)), batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

    names = ["mix", "pick", "head"]
    grads = []
    for i in range(8):
        model.zero_grad()
        PositionsTask().compute_train_loss([x[i : i + 1], y[i : i + 1]], model).backward()
        grads.append(torch.cat([torch.cat([model.get_submodule(n).weight.grad, model.get_submodule(n).bias.grad[:, None]],
                                          1).flatten() for n in names]))
    expected = torch.stack(grads) @ torch.stack(grads).T / 8
    data = torch.utils.data.TensorDataset(x, y)
    as_list = [{"x": x[i], "y": y[i]} for i in range(8)]
    for given, collate in ((data, None), (as_list, list)):
        traj = sf.Trajectory([sf.Segment([model.state_dict()], given, lr_sum=1.0)])
        scores = sf.score(model, PositionsTask(), traj, None, given, given, method="grad_dot", batch_size=4,
                          collate_fn=collate)
        assert (scores - expected).abs().max() / expected.abs().max() < 1e-10
    noisy, traj = PositionsTask(), sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    noisy.seed = -1  # torch's global generator: another draw each pass
    sf.fit_factors(model, noisy, traj, batch_size=4)
    noisy.seed = 0
    with pytest.raises(ValueError, match=r"module '(pick|mix)' sees as many rows as the batch's 4 examples, but with the "
                                         r"examples reversed .* or the task's forward pass depends on the examples' order "
                                         r"\(noise from a fixed seed"):
        sf.fit_factors(model, noisy, traj, batch_size=4)


def test_a_write_the_disk_refuses_names_the_file(setup, tmp_path):
    """A full disk or a quota raises the writer's own words (safetensors': "I/O error: File too large"),
    which name no file: the file is said beside them, and nothing is left. RLIMIT_FSIZE makes the limit
    (Python ignores SIGXFSZ, so the write raises EFBIG)."""
    import resource

    model, data, ckpts = setup
    factors = sf.fit_factors(mlp(4, 40, 3), ClassifyTask(), sf.Trajectory([sf.Segment(
        perturbed_states(mlp(4, 40, 3), 1), data, lr_sum=1.0)]), fisher="empirical")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))
    try:
        with pytest.raises(Exception) as caught:
            factors.save(tmp_path / "factors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert "File too large" in str(caught.value)
    assert any(n.startswith(f"source_fast: while writing {tmp_path / 'factors'}") for n in caught.value.__notes__)
    assert [p.name for p in (tmp_path / "factors").iterdir()] == [".factors.lock"]  # writers' lock, kept by design
