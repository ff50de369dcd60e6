"""The kronfluence shim's behaviour beyond its numbers (tests/test_kronfluence.py checks those):
tracked modules, stored dtypes, the saved model, argument files, staged fits, score options,
score dtype, query batching, DataLoader arguments, file permissions and directory replacement.
Where kronfluence 1.0.1 does the same thing, it runs alongside; tiny float64 models on CPU.
"""

import copy
import dataclasses
import logging
import os
import stat
import warnings

import kronfluence
import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import load_file, save_file
from test_kronfluence import ClassifyTask as KronClassifyTask
from test_kronfluence import _lean_runtime  # noqa: F401 (the module's autouse fixture: cheap gc, one thread)
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import source_fast as sf
from source_fast import _io
from source_fast import scoring as sf_scoring
from source_fast.interop import kronfluence as kf

LIBS = {"kron": kronfluence, "shim": kf}
F64 = torch.float64
# kronfluence computes in float64 only when told so field by field.
FACTOR_ARGS = {"use_empirical_fisher": True, "activation_covariance_dtype": F64, "gradient_covariance_dtype": F64,
               "per_sample_gradient_dtype": F64, "lambda_dtype": F64}
SCORE_ARGS = {"per_sample_gradient_dtype": F64, "precondition_dtype": F64, "score_dtype": F64,
              "query_gradient_svd_dtype": F64}
RTOL64 = 1e-6


class ClassifyTask(KronClassifyTask):
    """test_kronfluence's task, with a measurement that is not the training loss (the loss of the next
    class), so self-measurement scores differ from self-influence."""

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), (y + 1) % 3, reduction="sum")


def _data(dtype=F64):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=g, dtype=dtype), torch.randint(0, 3, (30,), generator=g)
    return TensorDataset(x[:24], y[:24]), TensorDataset(x[24:], y[24:])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _analyzer(lib, model, task, root, **kwargs):
    prepared = lib.prepare_model(copy.deepcopy(model), task)
    return lib.Analyzer("run", prepared, task, cpu=True, disable_tqdm=True, output_dir=str(root),
                        log_level=logging.WARNING, **kwargs)


def _pairwise(analyzer, scores_name, factors_name, train, queries, **score_args):
    """kronfluence's compute_pairwise_scores returns nothing on a first run: read the file back."""
    analyzer.compute_pairwise_scores(scores_name, factors_name, queries, train, per_device_query_batch_size=4,
                                     per_device_train_batch_size=8,
                                     score_args=ScoreArguments(**{**SCORE_ARGS, **score_args}))
    return analyzer.load_pairwise_scores(scores_name)["all_modules"]


def _self(analyzer, scores_name, factors_name, train, **score_args):
    analyzer.compute_self_scores(scores_name, factors_name, train, per_device_train_batch_size=8,
                                 score_args=ScoreArguments(**{**SCORE_ARGS, **score_args}))
    return analyzer.load_self_scores(scores_name)["all_modules"]


def _close(actual, expected):
    assert actual.shape == expected.shape
    actual, expected = actual.double(), expected.double()
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err <= RTOL64, f"relative error {err:.3g}"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The float64 MLP's empirical-Fisher factors "f", fitted by kronfluence and by the shim."""
    model, task = _mlp(), ClassifyTask()
    train, queries = _data()
    roots, analyzers = {}, {}
    for name, lib in LIBS.items():
        roots[name] = tmp_path_factory.mktemp(name)
        analyzers[name] = _analyzer(lib, model, task, roots[name])
        analyzers[name].fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
    return {"model": model, "task": task, "train": train, "queries": queries, "roots": roots, "analyzers": analyzers}


# ---- 1. tracked modules ----------------------------------------------------------------------


class LinearWithChild(nn.Linear):
    """A Linear with a submodule: not a leaf, so kronfluence does not track it by default."""

    def __init__(self, d_in, d_out):
        super().__init__(d_in, d_out)
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(super().forward(x))


def test_default_tracked_modules_are_kronfluences(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 6), nn.Tanh(), LinearWithChild(5, 5), nn.Linear(5, 3)).double()
    task = ClassifyTask()
    train, queries = _data()
    assert kf.tracked_modules(model, task) == ["3"]
    scores, dirs = {}, {}
    for name, lib in LIBS.items():
        analyzer = _analyzer(lib, model, task, tmp_path / name)
        analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
        scores[name], dirs[name] = _pairwise(analyzer, "p", "f", train, queries), analyzer.factors_output_dir("f")
    for stem in ("activation_covariance", "lambda_matrix"):
        assert load_file(str(dirs["shim"] / f"{stem}.safetensors")).keys() == {"3"}
    _close(scores["shim"], scores["kron"])

    assert [s.name for s in kf.load_factors(dirs["kron"], model, task).layers] == ["3"]

    class NamedConv1D(ClassifyTask):
        def get_influence_tracked_modules(self):
            return ["0", "3"]

    with pytest.raises(ValueError, match="it is a transformers Conv1D, which kronfluence does not track"):
        kf.load_factors(dirs["kron"], model, NamedConv1D())


# ---- 2. stored dtypes ------------------------------------------------------------------------


def test_low_precision_covariances_keep_float32_lambda(tmp_path):
    """kronfluence's smart_low_precision preset: bfloat16 covariances and eigenvectors, float32 Λ."""
    from kronfluence.utils.common.factor_arguments import smart_low_precision_factor_arguments

    model, task = _mlp().float(), ClassifyTask()
    train, _ = _data(torch.float32)
    analyzer = _analyzer(kronfluence, model, task, tmp_path)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=smart_low_precision_factor_arguments())
    src = analyzer.factors_output_dir("f")
    files = {stem: load_file(str(src / f"{stem}.safetensors"))
             for stem in ("activation_covariance", "num_activation_covariance_processed", "lambda_matrix",
                          "num_lambda_processed")}
    factors = kf.load_factors(src, model, task)
    for name, lf in factors.segments[0].items():
        assert files["activation_covariance"][name].dtype == torch.bfloat16
        assert files["lambda_matrix"][name].dtype == torch.float32
        assert {t.dtype for t in (lf.a_cov, lf.s_cov, lf.q_a, lf.q_s, lf.lam)} == {torch.float32}
        n = int(files["num_lambda_processed"][name])
        assert torch.equal(lf.lam, (files["lambda_matrix"][name].double() / n).float())
        rows = int(files["num_activation_covariance_processed"][name])
        assert torch.equal(lf.a_cov, (files["activation_covariance"][name].double() / rows).float())


# ---- 3. the saved model ----------------------------------------------------------------------


def test_saved_model_is_kronfluences(tmp_path):
    model, task = _mlp(), ClassifyTask()
    _analyzer(kf, model, task, tmp_path / "shim_first", disable_model_save=False)
    _analyzer(kronfluence, model, task, tmp_path / "shim_first", disable_model_save=False)  # accepts the shim's
    _analyzer(kronfluence, model, task, tmp_path / "kron_first", disable_model_save=False)
    _analyzer(kf, model, task, tmp_path / "kron_first", disable_model_save=False)  # accepts kronfluence's
    ours, theirs = (load_file(str(tmp_path / d / "run" / "model.safetensors")) for d in ("shim_first", "kron_first"))
    assert ours.keys() == theirs.keys() and "0.original_module.weight" in ours and "2._constant" in ours
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight += 1e-3
    for folder in ("shim_first", "kron_first"):
        for lib in LIBS.values():
            with pytest.raises(ValueError, match="Detected a difference between the current model"):
                _analyzer(lib, changed, task, tmp_path / folder, disable_model_save=False)


def test_state_is_kronfluences_in_one_process(tmp_path):
    """Scripts read `analyzer.state` (is_main_process, device, ...) as kronfluence's State has it."""
    model, task = _mlp(), ClassifyTask()
    states = [_analyzer(lib, model, task, tmp_path / name).state for name, lib in LIBS.items()]
    for key in ("process_index", "num_processes", "local_process_index", "device", "n_gpus", "cpu", "use_distributed",
                "is_main_process", "is_local_main_process", "is_last_process"):
        assert getattr(states[0], key) == getattr(states[1], key), key
    for state in states:
        state.wait_for_everyone()  # no process group: returns at once


def test_prepared_model_is_the_same_model_to_source_fast(tmp_path):
    """prepare_model's _constant (so that DistributedDataParallel takes the frozen model) is invisible
    to source_fast's own functions: checkpoints saved before it (a dict, a .safetensors file) load, the
    default tracked layers are all of them and naming one gives no frozen-layer warning, an unnamed
    Adam state covers the model, and the scores are the unprepared model's."""
    from safetensors.torch import save_file as save_tensors

    model, task = _mlp(), KronClassifyTask()
    train, queries = _data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_tensors(before, str(tmp_path / "ckpt.safetensors"))
    prepared = kf.prepare_model(copy.deepcopy(model), task)
    assert sum(1 for name, _ in prepared.named_parameters() if name.endswith("._constant")) == 2
    assert prepared.state_dict().keys() == before.keys()
    prepared.load_state_dict(before)  # strict: the placeholder keeps its zero
    expected = None
    for ckpt in (before, str(tmp_path / "ckpt.safetensors")):
        for m in (model, prepared):
            traj = sf.Trajectory([sf.Segment([ckpt], train, lr_sum=1.0)])
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "tracked modules ... are frozen" warning
                factors = sf.fit_factors(m, kf.kronfluence_task(m, task), traj, fisher="empirical")
                assert [spec.name for spec in sf.fit_factors(m, task, traj, fisher="empirical").layers] == ["0", "2"]
            got = sf.score(m, task, traj, factors, train, queries, method="ekfac", damping=1e-3)
            expected = got if expected is None else expected
            _close(got, expected)
    adam = torch.optim.Adam(model.parameters())  # built before prepare_model, without parameter names
    model(train.tensors[0]).sum().backward()
    adam.step()
    states = [adam.state_dict()]
    traj = sf.Trajectory([sf.Segment([before], train, lr_sum=0.1, optimizer="adam", optimizer_states=states)])
    sf.fit_factors(prepared, task, traj, fisher="empirical")


# ---- 4. argument and dataset files -----------------------------------------------------------


@pytest.mark.parametrize("lib", LIBS)
def test_saved_arguments_and_datasets_are_compared(lib, tmp_path):
    """The same calls raise (or not) under kronfluence and the shim."""
    model, task = _mlp(), ClassifyTask()
    train, queries = _data()
    analyzer = _analyzer(LIBS[lib], model, task, tmp_path)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
    other = FactorArguments(**{**FACTOR_ARGS, "lambda_max_examples": 10})
    # Every stage's files exist, so every stage is skipped before its arguments are compared.
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=other)
    os.remove(analyzer.factors_output_dir("f") / "lambda_matrix.safetensors")
    with pytest.raises(ValueError, match="differ from saved arguments"):
        analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=other)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))

    _pairwise(analyzer, "s", "f", train, queries)
    os.remove(analyzer.scores_output_dir("s") / "pairwise_scores.safetensors")
    with pytest.raises(ValueError, match="differ from saved arguments"):
        _pairwise(analyzer, "s", "f", train, queries, damping_factor=None)
    with pytest.raises(ValueError, match="dataset that differs"):
        analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=8, train_indices=list(range(10)),
                                         score_args=ScoreArguments(**SCORE_ARGS))
    analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4,
                                     per_device_train_batch_size=8, train_indices=list(range(10)),
                                     score_args=ScoreArguments(**SCORE_ARGS), overwrite_output_dir=True)
    assert analyzer.load_pairwise_scores("s")["all_modules"].shape == (len(queries), 10)


def test_a_stopped_overwrite_leaves_no_old_files_to_be_taken_as_new(tmp_path, monkeypatch):
    """A stage or a score whose file exists is skipped (returned) unless overwrite_output_dir, as in
    kronfluence. A run with overwrite_output_dir=True stopped in the Λ stage used to leave the old Λ
    (from other data, in another eigenbasis) beside the new covariances, and a stopped scoring the old
    scores: the next run without overwrite took them as its own."""
    model, task = _mlp(), ClassifyTask()
    train, queries = _data()
    old = TensorDataset(*(t[:20] for t in train.tensors))
    analyzer = _analyzer(kf, model, task, tmp_path)
    args = FactorArguments(**FACTOR_ARGS)
    analyzer.fit_all_factors("f", old, per_device_batch_size=8, factor_args=args)
    _pairwise(analyzer, "s", "f", old, queries)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(kf, "_lambdas", stopped)
        with pytest.raises(KeyboardInterrupt):
            analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=args, overwrite_output_dir=True)
    folder = analyzer.factors_output_dir("f")
    killed = (folder / "activation_covariance.safetensors").read_bytes()[:30]  # what a killed write leaves
    (folder / ".tmpAb3dE9").write_bytes(killed)
    analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=args)
    assert not list(folder.glob(".tmp*"))
    counts = {stem: load_file(str(folder / f"{stem}.safetensors"))
              for stem in ("num_activation_covariance_processed", "num_lambda_processed")}
    assert {int(c.flatten()[0]) for t in counts.values() for c in t.values()} == {len(train)}
    with monkeypatch.context() as m:
        m.setattr(kf, "score", stopped)
        with pytest.raises(KeyboardInterrupt):
            analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4,
                                             score_args=ScoreArguments(**SCORE_ARGS), overwrite_output_dir=True)
    assert _pairwise(analyzer, "s", "f", train, queries).shape == (len(queries), len(train))
    # A stage refused by its checks (another dataset than the saved one) removes nothing.
    for path in folder.glob("*covariance*.safetensors"):
        path.unlink()
    kept = sorted(p.name for p in folder.glob("*.safetensors"))
    with pytest.raises(ValueError, match="dataset that differs"):
        analyzer.fit_covariance_matrices("f", old, per_device_batch_size=8, factor_args=args)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == kept and kept
    # Nor does an eigendecomposition refused for covariances that lack a module.
    analyzer.fit_covariance_matrices("bad", train, per_device_batch_size=8, factor_args=args)
    path = analyzer.factors_output_dir("bad") / "activation_covariance.safetensors"
    save_file(dict(list(load_file(str(path)).items())[1:]), str(path))
    with pytest.raises(ValueError, match="activation_covariance"):
        analyzer.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True,
                                            load_from_factors_name="bad")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == kept


# ---- 5. score options ------------------------------------------------------------------------


def test_self_measurement_scores_match_kronfluence(fitted, monkeypatch):
    train = fitted["train"]
    got = {name: _self(a, "self_measurement", "f", train, use_measurement_for_self_influence=True)
           for name, a in fitted["analyzers"].items()}
    _close(got["shim"], got["kron"])
    plain = _self(fitted["analyzers"]["shim"], "self_plain", "f", train)
    assert not torch.allclose(got["shim"], plain)  # the measurement is not the training loss
    # A batch at a time, as kronfluence, whatever the free memory (too little for one example's
    # automatic chunk here): not refused with advice a kronfluence script cannot follow.
    monkeypatch.setattr(sf_scoring, "automatic_query_budget", lambda device: 500)
    low = _self(fitted["analyzers"]["shim"], "self_measurement_low_memory", "f", train,
                use_measurement_for_self_influence=True)
    assert torch.equal(low, got["shim"])


def test_self_scores_ignore_what_kronfluence_ignores(fitted):
    train = fitted["train"]
    ignored = {"aggregate_query_gradients": True, "aggregate_train_gradients": True, "compute_per_token_scores": True,
               "query_gradient_low_rank": 2}
    args = ScoreArguments(**SCORE_ARGS, **ignored)
    before = args.to_dict()
    shim = fitted["analyzers"]["shim"]
    with pytest.warns(UserWarning, match="self-influence"):
        got = shim.compute_self_scores("self_ignored", "f", train, per_device_train_batch_size=8, score_args=args)
    assert args.to_dict() == before  # the caller's object is not changed
    torch.testing.assert_close(got["all_modules"], _self(shim, "self_default", "f", train))
    _close(got["all_modules"], _self(fitted["analyzers"]["kron"], "self_ignored", "f", train, **ignored))


def test_pairwise_scores_ignore_the_self_measurement_flag(fitted):
    shim, train, queries = fitted["analyzers"]["shim"], fitted["train"], fitted["queries"]
    flagged = _pairwise(shim, "pair_flagged", "f", train, queries, use_measurement_for_self_influence=True)
    torch.testing.assert_close(flagged, _pairwise(shim, "pair_plain", "f", train, queries))


def _all_scores(analyzer, kind, name, train, queries, **score_args):
    """Every tensor of a pairwise or self scores file (module names, or all_modules)."""
    args = ScoreArguments(**{**SCORE_ARGS, **score_args})
    if kind == "pairwise":
        analyzer.compute_pairwise_scores(name, "f", queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=8, score_args=args)
        return analyzer.load_pairwise_scores(name)
    analyzer.compute_self_scores(name, "f", train, per_device_train_batch_size=8, score_args=args)
    return analyzer.load_self_scores(name)


@pytest.mark.parametrize("kind, options", [
    ("pairwise", {"compute_per_module_scores": True}),
    ("pairwise", {"aggregate_query_gradients": True}),
    ("pairwise", {"aggregate_train_gradients": True}),
    ("pairwise", {"aggregate_query_gradients": True, "aggregate_train_gradients": True,
                  "compute_per_module_scores": True}),
    # kronfluence's default low rank is torch.svd_lowrank's randomized one; source_fast always takes the
    # exact truncated SVD, which is kronfluence's use_full_svd.
    ("pairwise", {"query_gradient_low_rank": 1, "use_full_svd": True}),
    ("pairwise", {"aggregate_query_gradients": True, "query_gradient_low_rank": 1, "use_full_svd": True}),
    ("self", {"compute_per_module_scores": True}),
    ("self", {"compute_per_module_scores": True, "use_measurement_for_self_influence": True}),
], ids=lambda v: v if isinstance(v, str) else "+".join(sorted(v)))
def test_module_and_aggregation_options_match_kronfluence(fitted, kind, options):
    train, queries = fitted["train"], fitted["queries"]
    name = f"{kind}_{'_'.join(sorted(options))}"
    got = {lib: _all_scores(a, kind, name, train, queries, **options) for lib, a in fitted["analyzers"].items()}
    assert list(got["shim"]) == list(got["kron"])
    assert list(got["shim"]) == (["0", "2"] if options.get("compute_per_module_scores") else ["all_modules"])
    for module in got["kron"]:
        _close(got["shim"][module], got["kron"][module])
    rows = 1 if options.get("aggregate_query_gradients") else len(queries)
    cols = 1 if options.get("aggregate_train_gradients") else len(train)
    assert next(iter(got["shim"].values())).shape == ((rows, cols) if kind == "pairwise" else (len(train),))


def test_per_token_scores_of_summed_training_gradients_are_dropped(fitted):
    shim, train, queries = fitted["analyzers"]["shim"], fitted["train"], fitted["queries"]
    with pytest.warns(UserWarning, match="compute_per_token_scores is ignored"):
        got = _all_scores(shim, "pairwise", "tok_agg", train, queries, compute_per_token_scores=True,
                          aggregate_train_gradients=True)
    plain = _all_scores(shim, "pairwise", "agg", train, queries, aggregate_train_gradients=True)
    torch.testing.assert_close(got["all_modules"], plain["all_modules"])


# ---- 6. partitions, loaders, staged fits -----------------------------------------------------


def test_partition_targets_are_refused(fitted):
    shim, train, queries = fitted["analyzers"]["shim"], fitted["train"], fitted["queries"]
    with pytest.raises(NotImplementedError, match="target_data_partitions"):
        shim.compute_pairwise_scores("x", "f", queries, train, per_device_query_batch_size=4,
                                     target_data_partitions=[0])
    with pytest.raises(NotImplementedError, match="target_module_partitions"):
        shim.compute_self_scores("x", "f", train, target_module_partitions=[0])


def test_an_attribute_that_is_no_argument_is_named_and_changes_nothing(fitted):
    """kronfluence's examples set score_args.query_gradient_rank (an older name): both libraries then
    score at full rank without a word. The shim names it, scores as without it, and reads its score
    arguments back (kronfluence's loader fails on the extra key its own to_dict wrote)."""
    shim, train, queries = fitted["analyzers"]["shim"], fitted["train"], fitted["queries"]
    plain = _pairwise(shim, "plain", "f", train, queries)
    args = ScoreArguments(**SCORE_ARGS)
    args.query_gradient_rank = 2
    with pytest.warns(UserWarning, match=r"ScoreArguments has 'query_gradient_rank', which is not one of kronfluence "
                                         r"1.0.1's fields: it changes nothing \(did you mean 'query_gradient_low_rank'"):
        shim.compute_pairwise_scores("renamed", "f", queries, train, per_device_query_batch_size=4,
                                     per_device_train_batch_size=8, score_args=args)
    assert torch.equal(shim.load_pairwise_scores("renamed")["all_modules"], plain)
    assert shim.load_score_args("renamed").to_dict() == ScoreArguments(**SCORE_ARGS).to_dict()


class MultipleChoice(nn.Module):
    """Scores each of an example's 4 choices, as Hugging Face's *ForMultipleChoice models do: the
    tracked layers see batch × 4 rows."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()

    def forward(self, x):
        return self.body(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], -1)


def test_multiple_choice_models_score_whole_examples_where_kronfluence_scores_choices(tmp_path):
    """What the README says differs: kronfluence takes each of the tracked layers' rows (a choice) as an
    example, the shim whole examples. With K-FAC (no Λ) a score is bilinear in the two gradients, and an
    example's gradient is its choices' sum: the shim's scores are kronfluence's summed over each pair
    of examples' 4 × 4 choices. The covariances are the same; Λ's count is examples, not choices."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, 6, generator=g, dtype=F64), torch.randint(0, 4, (20,), generator=g)
    train, queries = TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])
    model, task = MultipleChoice(), KronClassifyTask()
    scores, roots = {}, {}
    for name, lib in LIBS.items():
        roots[name] = tmp_path / name
        analyzer = _analyzer(lib, model, task, roots[name])
        for strategy in ("kfac", "ekfac"):
            analyzer.fit_all_factors(strategy, train, per_device_batch_size=8,
                                     factor_args=FactorArguments(**{**FACTOR_ARGS, "strategy": strategy}))
        scores[name] = _pairwise(analyzer, "pairwise", "kfac", train, queries, damping_factor=1e-3)
    assert scores["kron"].shape == (4 * 4, 4 * 16) and scores["shim"].shape == (4, 16)
    _close(scores["shim"], scores["kron"].reshape(4, 4, 16, 4).sum((1, 3)))
    factors = {name: root / "run" / "factors_ekfac" for name, root in roots.items()}
    for stem in ("activation_covariance", "gradient_covariance"):
        ours, theirs = (load_file(str(factors[name] / f"{stem}.safetensors")) for name in ("shim", "kron"))
        for module in theirs:
            _close(ours[module], theirs[module])
    counts = {name: load_file(str(factors[name] / "num_lambda_processed.safetensors")) for name in factors}
    assert {int(c) for c in counts["shim"].values()} == {16} and {int(c) for c in counts["kron"].values()} == {64}


def test_loaders_return_what_kronfluence_returns(fitted):
    """Both libraries read the shim's directory: the same objects, the same tensors."""
    model, task = fitted["model"], fitted["task"]
    shim = fitted["analyzers"]["shim"]
    kron = _analyzer(kronfluence, model, task, fitted["roots"]["shim"])
    _self(shim, "for_args", "f", fitted["train"])
    assert shim.load_factor_args("f").to_dict() == kron.load_factor_args("f").to_dict()
    assert shim.load_score_args("for_args").to_dict() == kron.load_score_args("for_args").to_dict()
    for loader in ("load_covariance_matrices", "load_eigendecomposition", "load_lambda_matrices", "load_all_factors"):
        ours, theirs = getattr(shim, loader)("f"), getattr(kron, loader)("f")
        assert list(ours) == list(theirs), loader
        for stem in ours:
            assert ours[stem].keys() == theirs[stem].keys()
            assert all(torch.equal(ours[stem][m], theirs[stem][m]) for m in ours[stem])
    for loader in ("load_factor_args", "load_covariance_matrices", "load_eigendecomposition", "load_lambda_matrices"):
        assert getattr(shim, loader)("missing") is None and getattr(kron, loader)("missing") is None
    assert shim.load_score_args("missing") is None
    for analyzer in (shim, kron):
        with pytest.raises(FileNotFoundError, match="missing"):
            analyzer.load_all_factors("missing")


def _fit_in_stages(analyzer, train):
    """Three directories: covariances, then eigenvectors and then Λ each from the previous one's."""
    args = FactorArguments(**FACTOR_ARGS)
    analyzer.fit_covariance_matrices("cov", train, per_device_batch_size=8, factor_args=args)
    analyzer.perform_eigendecomposition("eig", factor_args=args, load_from_factors_name="cov")
    analyzer.fit_lambda_matrices("lam", train, per_device_batch_size=8, factor_args=args, load_from_factors_name="eig")


def test_staged_fits_are_fit_all_factors(fitted):
    model, task, train, queries = fitted["model"], fitted["task"], fitted["train"], fitted["queries"]
    kron, shim = fitted["analyzers"]["kron"], fitted["analyzers"]["shim"]
    for analyzer in (kron, shim):
        _fit_in_stages(analyzer, train)
    for stage in ("cov", "eig", "lam"):
        assert sorted(os.listdir(shim.factors_output_dir(stage))) == sorted(os.listdir(kron.factors_output_dir(stage)))
    assert not (shim.factors_output_dir("lam") / "activation_covariance.safetensors").exists()

    staged = _pairwise(shim, "staged", "lam", train, queries)
    torch.testing.assert_close(staged, _pairwise(shim, "whole", "f", train, queries))
    kron_on_shim = _analyzer(kronfluence, model, task, fitted["roots"]["shim"])
    _close(_pairwise(kron_on_shim, "kron_staged", "lam", train, queries), staged)
    # kronfluence's own covariance-free directory, read by the shim (eigenvalues stand in for covariances)
    shim_on_kron = _analyzer(kf, model, task, fitted["roots"]["kron"])
    _close(_pairwise(shim_on_kron, "shim_staged", "lam", train, queries), _pairwise(kron, "staged", "lam", train, queries))


def test_true_fisher_fit_is_fit_factors_seeded_by_the_caller(tmp_path):
    """The shim samples labels as fit_factors(seed=s) does for one checkpoint, s the seed the caller
    gave torch.manual_seed (kronfluence's sampling follows it too): another seed, another sample."""
    model, task = _mlp(), ClassifyTask()
    train, _ = _data()
    trajectory = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    fitted = {}
    for seed in (5, 6):
        torch.manual_seed(seed)
        shim = _analyzer(kf, model, task, tmp_path / str(seed))
        shim.fit_all_factors("f", train, per_device_batch_size=8)
        fitted[seed] = got = kf.load_factors(shim.factors_output_dir("f"), model, task)
        want = sf.fit_factors(model, kf.kronfluence_task(model, task), trajectory, fisher="true", batch_size=8, seed=seed)
        assert got.fisher == "true"
        for name, lf in want.segments[0].items():
            for field in ("a_cov", "s_cov", "q_a", "q_s", "lam"):
                torch.testing.assert_close(getattr(got.segments[0][name], field), getattr(lf, field))
    assert not torch.equal(fitted[5].segments[0]["2"].s_cov, fitted[6].segments[0]["2"].s_cov)


def test_compiled_models_precision_knobs_and_kronfluence_helpers(tmp_path):
    """kronfluence's examples compile the model after prepare_model: the shim analyses the module
    torch.compile wraps, under kronfluence's names. Precision knobs it does not use are said to be
    unused. get_module_summary and the aggregate_* calls exist (nothing is partitioned here, so the
    latter have nothing to do, as kronfluence's have not for unpartitioned results); profile warns."""
    model, task = _mlp(), ClassifyTask()
    train, queries = _data()
    plain = _analyzer(kf, model, task, tmp_path / "plain")
    plain.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
    compiled = kf.Analyzer("run", torch.compile(kf.prepare_model(copy.deepcopy(model), task)), task, cpu=True,
                           disable_tqdm=True, output_dir=str(tmp_path / "compiled"))
    compiled.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
    assert sorted(load_file(str(compiled.factors_output_dir("f") / "lambda_matrix.safetensors"))) == ["0", "2"]
    torch.testing.assert_close(_pairwise(compiled, "s", "f", train, queries), _pairwise(plain, "s", "f", train, queries))
    for lib in LIBS.values():
        assert lib.Analyzer.get_module_summary(model) == kronfluence.Analyzer.get_module_summary(model)
    plain.aggregate_covariance_matrices("f"), plain.aggregate_lambda_matrices("f")
    plain.aggregate_pairwise_scores("s")
    with pytest.raises(ValueError, match="Arguments for scores with name `none` was not found"):
        plain.aggregate_self_scores("none")
    bf16 = {**FACTOR_ARGS, "lambda_dtype": torch.bfloat16}
    with pytest.warns(UserWarning, match=r"lambda_dtype=torch.bfloat16: not used by source_fast, which computes these "
                                         r"in torch.float64 for this model") as caught:
        plain.fit_all_factors("g", train, per_device_batch_size=8, factor_args=FactorArguments(**bf16))
    assert caught[0].filename == __file__  # the user's line, not the shim's, however deep the check
    with pytest.warns(UserWarning, match="profile=True: source_fast's Analyzer has no profiler"):
        _analyzer(kf, model, task, tmp_path / "profiled", profile=True)


def test_amp_autocasts_the_forward_passes_as_kronfluence_does(tmp_path):
    """kronfluence's low-precision argument presets autocast to bfloat16, for float32 and bfloat16
    models alike: the shim runs the task under the same autocast, so its scores are kronfluence's to
    bfloat16 rounding and closer to them than the shim's without autocast."""
    task = ClassifyTask()
    amp = {"use_empirical_fisher": True, "amp_dtype": torch.bfloat16}
    with warnings.catch_warnings(record=True) as caught:  # autocast to float32 is nothing: not run (torch warns)
        warnings.simplefilter("always")
        _analyzer(kf, _mlp().float(), task, tmp_path / "f32").fit_all_factors(
            "f", _data(torch.float32)[0], per_device_batch_size=8,
            factor_args=FactorArguments(use_empirical_fisher=True, amp_dtype=torch.float32))
    assert not [w for w in caught if "autocast" in str(w.message)], [str(w.message) for w in caught]
    for dtype in (torch.float32, torch.bfloat16):
        model = _mlp().to(dtype)
        train, queries = _data(dtype)
        scores = {}
        for name, lib, args in (("kron", kronfluence, amp), ("shim", kf, amp),
                                ("shim without autocast", kf, {"use_empirical_fisher": True})):
            analyzer = _analyzer(lib, model, task, tmp_path / f"{dtype}_{name}")
            analyzer.fit_all_factors("f", train, per_device_batch_size=8, factor_args=FactorArguments(**args))
            analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4,
                                             score_args=ScoreArguments(amp_dtype=args.get("amp_dtype")))
            scores[name] = analyzer.load_pairwise_scores("s")["all_modules"].double().flatten()
        kron = scores["kron"]
        err = {k: float((v - kron).norm() / kron.norm()) for k, v in scores.items() if k != "kron"}
        assert float(torch.corrcoef(torch.stack([scores["shim"], kron]))[0, 1]) > 0.999, (dtype, err)
        # A float32 model's layers see bfloat16 under autocast; taken in float32, as kronfluence takes
        # them, the scores agree to 0.007 (in bfloat16: 0.044). A bfloat16 model's stay bfloat16 here.
        bound = {torch.float32: 0.02, torch.bfloat16: 0.05}[dtype]
        assert err["shim"] < bound and err["shim"] < err["shim without autocast"] / 3, (dtype, err)


class TinyLoss(ClassifyTask):
    """A loss whose output gradients (1e-8) are below float16's smallest number (6e-8)."""

    def compute_train_loss(self, batch, model, sample=False):
        return 1e-8 * super().compute_train_loss(batch, model, sample)


def test_float16_autocast_scales_the_loss_as_kronfluence_does(tmp_path, monkeypatch):
    """Under float16 autocast small output gradients underflow to 0; kronfluence's GradScaler scales the
    loss by amp_scale for the backward pass when fitting (on CUDA: without it, it turns itself off). The
    shim does the same: scaled, a float32 model's covariances under float16 autocast are its float32 ones to
    float16 rounding, where unscaled they are lost; on the CPU it does not scale, and its scores are
    kronfluence's there."""
    from source_fast._passes import LOSS_SCALE

    model = _mlp().float()
    train, queries = _data(torch.float32)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    fit = {name: sf.fit_factors(model, task, traj, fisher="empirical").segments[0] for name, task in (
        ("float32", TinyLoss()), ("scaled", kf._Autocast(TinyLoss(), "cpu", torch.float16, 2.0**16)),
        ("unscaled", kf._Autocast(TinyLoss(), "cpu", torch.float16)))}
    for layer in fit["float32"]:
        want = fit["float32"][layer].s_cov
        error = {k: float((fit[k][layer].s_cov - want).norm() / want.norm()) for k in ("scaled", "unscaled")}
        assert error["scaled"] < 1e-2 and error["unscaled"] > 0.5, (layer, error)
    # The shim scales where kronfluence does: fitting under float16 autocast on CUDA, by amp_scale; not
    # when scoring (kronfluence 1.0.1's saved amp_dtype never turns its scaler on), nor a float16 model.
    analyzer = _analyzer(kf, model, ClassifyTask(), tmp_path / "which")
    f16, bf16 = FactorArguments(amp_dtype=torch.float16), FactorArguments(amp_dtype=torch.bfloat16)
    assert getattr(analyzer._task_for(f16, kf.FACTOR_DEFAULTS, 1024.0), LOSS_SCALE) == 1.0  # the CPU
    monkeypatch.setattr(kf, "model_device", lambda m: torch.device("cuda"))
    assert getattr(analyzer._task_for(f16, kf.FACTOR_DEFAULTS, 1024.0), LOSS_SCALE) == 1024.0
    assert getattr(analyzer._task_for(bf16, kf.FACTOR_DEFAULTS, 1024.0), LOSS_SCALE) == 1.0
    assert getattr(analyzer._task_for(ScoreArguments(amp_dtype=torch.float16), kf.SCORE_DEFAULTS), LOSS_SCALE) == 1.0
    half = _analyzer(kf, _mlp().half(), ClassifyTask(), tmp_path / "half")
    assert getattr(half._task_for(f16, kf.FACTOR_DEFAULTS, 1024.0), LOSS_SCALE) == 1.0
    monkeypatch.undo()
    scores = {}
    for name, lib in (("kron", kronfluence), ("shim", kf)):
        analyzer = _analyzer(lib, model, ClassifyTask(), tmp_path / name)
        analyzer.fit_all_factors("f", train, per_device_batch_size=8,
                                 factor_args=FactorArguments(use_empirical_fisher=True, amp_dtype=torch.float16))
        analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=4,
                                         score_args=ScoreArguments(amp_dtype=torch.float16))
        scores[name] = analyzer.load_pairwise_scores("s")["all_modules"].double().flatten()
    assert float(torch.corrcoef(torch.stack([scores["shim"], scores["kron"]]))[0, 1]) > 0.999


def test_scoring_needs_the_eigendecomposition_and_lambda_as_kronfluence_says(tmp_path):
    """A folder with covariances only: kronfluence's FactorsNotFoundError from both (a ValueError), so
    a script's `except FactorsNotFoundError` catches the shim's too."""
    model, task = _mlp(), ClassifyTask()
    train, queries = _data()
    for name, lib in LIBS.items():
        analyzer = _analyzer(lib, model, task, tmp_path / name)
        analyzer.fit_covariance_matrices("cov", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))
        with pytest.raises(kronfluence.utils.exceptions.FactorsNotFoundError,
                           match="Strategy `ekfac` requires Eigendecomposition results. However"):
            analyzer.compute_pairwise_scores("s", "cov", queries, train, per_device_query_batch_size=4)


# ---- 7. factor directories -------------------------------------------------------------------


def test_load_factors_needs_factor_arguments(fitted, tmp_path):
    src = fitted["analyzers"]["kron"].factors_output_dir("f")
    copied = tmp_path / "no_args"
    copied.mkdir()
    for p in src.iterdir():
        if p.name != "factor_arguments.json":
            (copied / p.name).write_bytes(p.read_bytes())
    with pytest.raises(FileNotFoundError, match="factor_arguments.json"):
        kf.load_factors(copied, fitted["model"], fitted["task"])


# ---- 8, 9. query batching, score dtype ---------------------------------------------------------


def test_queries_per_pass_follow_per_device_query_batch_size(fitted, monkeypatch):
    """A pass holds at least per_device_query_batch_size queries (kronfluence's query batch: a model
    whose query exceeds source_fast's default budget still runs) and at least the default budget's."""
    from source_fast import scoring

    blocks, query_blocks = [], scoring.query_blocks
    monkeypatch.setattr(scoring, "query_blocks", lambda *a, **k: blocks.append(query_blocks(*a, **k)) or blocks[-1])
    _pairwise(fitted["analyzers"]["shim"], "blocks", "f", fitted["train"], fitted["queries"])
    assert blocks == [[range(6)]]  # the tiny model's 6 queries fit the default budget: one pass
    monkeypatch.setattr(kf, "DEFAULT_QUERY_MEMORY_BUDGET", 1)
    _pairwise(fitted["analyzers"]["shim"], "blocks_small", "f", fitted["train"], fitted["queries"])
    assert blocks[1] == [range(4), range(4, 6)]  # per_device_query_batch_size=4


def test_scores_are_in_score_dtype(fitted):
    """Default ScoreArguments on a float64 model: kronfluence writes float32 scores."""
    train, queries = fitted["train"], fitted["queries"]
    for analyzer in fitted["analyzers"].values():
        analyzer.compute_pairwise_scores("default_dtype", "f", queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=8)
        analyzer.compute_self_scores("default_dtype_self", "f", train, per_device_train_batch_size=8)
        assert analyzer.load_pairwise_scores("default_dtype")["all_modules"].dtype == torch.float32
        assert analyzer.load_self_scores("default_dtype_self")["all_modules"].dtype == torch.float32


# ---- 10, 11. files and directories -----------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_permissions(umask, fitted, tmp_path):
    factors = kf.load_factors(fitted["analyzers"]["shim"].factors_output_dir("f"), fitted["model"], fitted["task"])
    old = os.umask(umask)
    try:
        assert _io._umask() == umask
        kf.save_factors(factors, tmp_path / "factors_x")
        with _io.atomic_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
    assert mode(tmp_path / "factors_x") == 0o777 & ~umask
    assert {mode(p) for p in (tmp_path / "factors_x").iterdir()} == {0o666 & ~umask}
    assert mode(tmp_path / "file.txt") == 0o666 & ~umask


def test_save_factors_replaces_only_factor_directories(fitted, tmp_path):
    factors = kf.load_factors(fitted["analyzers"]["kron"].factors_output_dir("f"), fitted["model"], fitted["task"])
    analysis = tmp_path / "run"
    (analysis / "scores_x").mkdir(parents=True)
    (analysis / "scores_x" / "pairwise_scores.safetensors").write_bytes(b"kept")
    with pytest.raises(FileExistsError, match="scores_x"):
        kf.save_factors(factors, analysis)
    assert (analysis / "scores_x" / "pairwise_scores.safetensors").read_bytes() == b"kept"

    # kronfluence's own factor directory (with its JSON files) is replaced whole.
    target = analysis / "factors_f"
    target.mkdir()
    for p in fitted["analyzers"]["kron"].factors_output_dir("f").iterdir():
        (target / p.name).write_bytes(p.read_bytes())
    kf.save_factors(factors, target)
    assert not (target / "covariance_dataset_metadata.json").exists()
    assert sorted(os.listdir(analysis)) == ["factors_f", "scores_x"]

    with pytest.raises(ValueError, match="average_params"):
        kf.save_factors(dataclasses.replace(factors, average_params=True), tmp_path / "fast_source")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_atomic_dir_replaces_a_folder(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    target = tmp_path / "folder"
    target.mkdir()
    (target / "old").write_text("old")
    with _io.atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["folder"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / folder.name).write_text("")
    assert _io._exchange(a, b)  # Linux with glibc >= 2.28 on a local file system, as the test machines are
    assert os.listdir(a) == ["b"] and os.listdir(b) == ["a"]


# ---- 12. DataLoader arguments, checkpoint --------------------------------------------------------


def test_dataloader_kwargs_reach_the_dataloader(fitted, tmp_path):
    model, task, train, queries = fitted["model"], fitted["task"], fitted["train"], fitted["queries"]
    started = tmp_path / "workers"
    started.mkdir()

    def note_worker(worker_id):
        (started / f"{os.getpid()}_{worker_id}").touch()

    shim = _analyzer(kf, model, task, fitted["roots"]["shim"])
    shim.set_dataloader_kwargs(DataLoaderKwargs(num_workers=1, worker_init_fn=note_worker))
    got = _pairwise(shim, "workers", "f", train, queries)
    assert any(started.iterdir())
    torch.testing.assert_close(got, _pairwise(fitted["analyzers"]["shim"], "no_workers", "f", train, queries))


def test_a_sorting_collate_fn_is_refused(fitted, tmp_path):
    """DataLoaderKwargs' collate_fn that sorts its batch would give every example's scores to another of its
    batch (kronfluence 1.0.1 does so silently): the shim refuses it before fitting."""

    def by_label(examples):
        examples = sorted(examples, key=lambda ex: int(ex[1]))
        return torch.stack([x for x, _ in examples]), torch.stack([y for _, y in examples])

    model, task, train = fitted["model"], fitted["task"], fitted["train"]
    assert len({int(y) for _, y in list(train)[:4]}) > 1  # the first examples' labels differ somewhere
    shim = _analyzer(kf, model, task, tmp_path)
    shim.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=by_label))
    with pytest.raises(ValueError, match=r"collate_fn .*by_label reorders its batch"):
        shim.fit_all_factors("sorted", train, per_device_batch_size=8, factor_args=FactorArguments(**FACTOR_ARGS))


def test_checkpoint_is_the_models_weights(fitted):
    shim = fitted["analyzers"]["shim"]
    state = shim.model.state_dict()
    assert all(t.data_ptr() == state[k].data_ptr() for k, t in shim._checkpoint().items())
