"""source_fast against kronfluence 1.0.1 (the PyPI package as the reference), on CPU.

One kronfluence-style script body runs twice per workload: with kronfluence's `Analyzer` and
`prepare_model`, and with source_fast's shim. Both use the empirical Fisher (sampled labels would
differ between the libraries). Then:
  native source_fast EK-FAC scores = kronfluence's / N (damping 1e-8 and the heuristic), self too;
  factors read from kronfluence's files reproduce kronfluence's scores;
  kronfluence reads the factors the shim wrote and reproduces the shim's scores;
  the shim's outputs equal kronfluence's.
float64 runs (model and every kronfluence dtype float64) agree to relative 1e-6 of the largest
score; float32 runs with kronfluence's defaults to Pearson 0.9999.
"""

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import os
import warnings
from pathlib import Path

import kronfluence
import pytest
import torch
from _helpers import PooledClassifier, torchrun
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import source_fast as sf
from source_fast.interop import kronfluence as kf

RTOL64 = 1e-6
PEARSON32 = 0.9999
DAMPINGS = {"d1e-8": 1e-8, "heuristic": None}


@pytest.fixture(scope="module", autouse=True)
def _lean_runtime():
    """kronfluence calls gc.collect() dozens of times per analysis; freezing the objects alive now
    (torch, transformers) keeps each collection cheap. One intra-op thread: these models are tiny
    and the test machine's two cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


# ---- tasks: kronfluence Task subclasses, used unchanged by source_fast ------------------------


class ClassifyTask(Task):
    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")


class LanguageModelTask(Task):
    """Next-token loss summed over real tokens; right padding (labels -100) with causal attention,
    so padded positions get exactly zero output gradient, as kronfluence assumes."""

    def _logits_labels(self, batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()

    def compute_train_loss(self, batch, model, sample=False):
        logits, labels = self._logits_labels(batch, model)
        if sample:
            with torch.no_grad():
                drawn = torch.distributions.Categorical(logits=logits.detach()).sample()
            labels = torch.where(labels == -100, labels, drawn)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def compute_measurement(self, batch, model):
        logits, labels = self._logits_labels(batch, model)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def get_influence_tracked_modules(self):
        return [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


class Seq2SeqTask(Task):
    """T5: the encoder sees the source, the decoder the target, of other lengths, so each module takes its
    own mask (a dict, kronfluence's form); the cross-attention's keys and values are projections of the
    source. Right padding everywhere: padded positions get zero output gradient, as kronfluence assumes."""

    ENCODER = [f"encoder.block.0.layer.{m}" for m in ("0.SelfAttention.q", "0.SelfAttention.v", "1.DenseReluDense.wo")]
    DECODER = [f"decoder.block.0.layer.{m}" for m in ("0.SelfAttention.q", "1.EncDecAttention.q", "2.DenseReluDense.wi")]
    SOURCE_SIDE = ["decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"]

    def _loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"],
                       decoder_attention_mask=batch["decoder_attention_mask"]).logits.flatten(0, 1)
        labels = batch["labels"].flatten()
        if sample:
            with torch.no_grad():
                drawn = torch.distributions.Categorical(logits=logits.detach()).sample()
            labels = torch.where(labels == -100, labels, drawn)
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def compute_train_loss(self, batch, model, sample=False):
        return self._loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.ENCODER + self.SOURCE_SIDE + self.DECODER

    def get_attention_mask(self, batch):
        source = {name: batch["attention_mask"] for name in self.ENCODER + self.SOURCE_SIDE}
        return {**source, **{name: batch["decoder_attention_mask"] for name in self.DECODER}}


class PooledClassifyTask(Task):
    """A BERT classifier over dicts of input_ids, attention_mask and labels, with the padding mask."""

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if sample:
            with torch.no_grad():
                labels = torch.distributions.Categorical(logits=logits.detach()).sample()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


# ---- workloads -------------------------------------------------------------------------------


def _digits_mlp(dtype):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:96] / 16.0, dtype=dtype)
    y = torch.tensor(y[:96])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Linear(24, 10)).to(dtype)
    return model, ClassifyTask(), TensorDataset(x[:80], y[:80]), TensorDataset(x[80:], y[80:])


def _conv(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(56, 2, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (56,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.Tanh(),
        nn.Flatten(), nn.Linear(36, 3),
    ).to(dtype)
    return model, ClassifyTask(), TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator().manual_seed(2)
    n, t = 30, 10
    ids = torch.randint(0, 24, (n, t), generator=g)
    lengths = torch.randint(4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, -100)
    data = DictDataset(input_ids=ids, attention_mask=mask, labels=labels)
    train, queries = torch.utils.data.Subset(data, range(24)), torch.utils.data.Subset(data, range(24, n))
    return model, LanguageModelTask(), train, queries


def _t5(dtype):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=24, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(cfg).to(dtype)
    g = torch.Generator().manual_seed(3)
    n, s, t = 30, 9, 6

    def padded(length, lo):
        ids = torch.randint(1, 24, (n, length), generator=g)
        mask = (torch.arange(length)[None] < torch.randint(lo, length + 1, (n,), generator=g)[:, None]).long()
        return ids * mask, mask

    ids, mask = padded(s, 3)
    targets, target_mask = padded(t, 2)
    decoder_ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), targets[:, :-1]], 1)  # shifted right
    data = DictDataset(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                       decoder_attention_mask=target_mask, labels=torch.where(target_mask.bool(), targets, -100))
    train, queries = torch.utils.data.Subset(data, range(24)), torch.utils.data.Subset(data, range(24, n))
    return model, Seq2SeqTask(), train, queries


def _bert_left(dtype):
    """Left padding under a classifier that pools position 0, a pad for all but the longest sequences:
    the loss reads padded positions, so their output gradients are not zero there. kronfluence takes
    them (its masks drop padding from the activation covariance only), as the gradients do."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=24, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                     max_position_embeddings=16, pad_token_id=0, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).to(dtype)
    g = torch.Generator().manual_seed(4)
    n, t = 30, 8
    mask = (torch.arange(t)[None] < torch.randint(3, t + 1, (n,), generator=g)[:, None]).long().flip(1)
    data = DictDataset(input_ids=torch.randint(1, 24, (n, t), generator=g) * mask, attention_mask=mask,
                       labels=torch.randint(0, 3, (n,), generator=g))
    train, queries = torch.utils.data.Subset(data, range(24)), torch.utils.data.Subset(data, range(24, n))
    return model, PooledClassifyTask(), train, queries


WORKLOADS = {"digits_mlp": _digits_mlp, "conv": _conv, "llama": _llama, "t5": _t5, "bert_left": _bert_left}


# ---- the script body, run with kronfluence and with the shim ----------------------------------


def _script(lib, model, task, train, queries, output_dir, dtype):
    """A kronfluence-style analysis; `lib` is the kronfluence module or source_fast's shim."""
    model = lib.prepare_model(model, task)
    analyzer = lib.Analyzer("run", model, task, cpu=True, disable_tqdm=True, output_dir=output_dir,
                            log_level=logging.WARNING)
    f64 = dtype == torch.float64
    factor_args = FactorArguments(use_empirical_fisher=True, **(dict(
        activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype) if f64 else {}))
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=16, factor_args=factor_args)
    out = {}
    for key, damping in DAMPINGS.items():
        score_args = ScoreArguments(damping_factor=damping, **(dict(
            per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype,
            query_gradient_svd_dtype=dtype) if f64 else {}))
        analyzer.compute_pairwise_scores(f"pair_{key}", "ekfac", queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=16, score_args=score_args)
        analyzer.compute_self_scores(f"self_{key}", "ekfac", train, per_device_train_batch_size=16,
                                     score_args=score_args)
        out[f"pair_{key}"] = analyzer.load_pairwise_scores(f"pair_{key}")["all_modules"]
        out[f"self_{key}"] = analyzer.load_self_scores(f"self_{key}")["all_modules"]
    return out


def _agree(actual, expected, dtype, what):
    actual, expected = actual.double().flatten(), expected.double().flatten()
    if dtype == torch.float64:
        err = float((actual - expected).abs().max() / expected.abs().max())
        assert err <= RTOL64, f"{what}: relative error {err:.3g} > {RTOL64}"
    else:
        r = float(torch.corrcoef(torch.stack([actual, expected]))[0, 1])
        assert r >= PEARSON32, f"{what}: Pearson {r:.6f} < {PEARSON32}"


def _native(model, task, train, queries, factors):
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    out = {}
    for key, damping in DAMPINGS.items():
        d = "heuristic" if damping is None else damping
        out[f"pair_{key}"] = sf.score(model, task, traj, factors, train, queries, method="ekfac", damping=d,
                                      batch_size=16)
        out[f"self_{key}"] = sf.self_score(model, task, traj, factors, train, method="ekfac", damping=d, batch_size=16)
    return out


# bert_left in float64 only: with damping 1e-8 its float32 scores are rounding-bound in both libraries
# (kronfluence's float32 against its float64: Pearson 0.9995; the shim's: 0.9997).
@pytest.fixture(scope="module", params=[(w, p) for w in WORKLOADS for p in ("fp64", "fp32")
                                        if (w, p) != ("bert_left", "fp32")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def run(request, tmp_path_factory):
    workload, precision = request.param
    dtype = torch.float64 if precision == "fp64" else torch.float32
    model, task, train, queries = WORKLOADS[workload](dtype)
    root = tmp_path_factory.mktemp(f"{workload}_{precision}")
    kron = _script(kronfluence, copy.deepcopy(model), task, train, queries, str(root / "kron"), dtype)
    shim = _script(kf, copy.deepcopy(model), task, train, queries, str(root / "shim"), dtype)
    return dict(model=model, task=task, train=train, queries=queries, dtype=dtype, root=root, kron=kron, shim=shim)


def test_native_ekfac_is_kronfluence_over_n(run):
    model, task, train = run["model"], run["task"], run["train"]
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=16)
    native = _native(model, task, train, run["queries"], factors)
    for key, kron in run["kron"].items():
        _agree(native[key] * len(train), kron, run["dtype"], key)


def test_factors_read_from_kronfluence_reproduce_its_scores(run):
    model, task, train = run["model"], run["task"], run["train"]
    factors = kf.load_factors(run["root"] / "kron" / "run" / "factors_ekfac", model, task)
    assert factors.fisher == "empirical" and factors.num_examples == [len(train)]
    native = _native(model, task, train, run["queries"], factors)
    for key, kron in run["kron"].items():
        _agree(native[key] * len(train), kron, run["dtype"], key)


def test_shim_matches_kronfluence(run):
    for key, kron in run["kron"].items():
        assert run["shim"][key].shape == kron.shape
        _agree(run["shim"][key], kron, run["dtype"], key)


def test_kronfluence_reads_factors_the_shim_wrote(run):
    """kronfluence's own loaders and scoring on factors_ekfac written by source_fast."""
    model = kronfluence.prepare_model(copy.deepcopy(run["model"]), run["task"])
    analyzer = kronfluence.Analyzer("run", model, run["task"], cpu=True, disable_tqdm=True,
                                    output_dir=str(run["root"] / "shim"), log_level=logging.WARNING)
    assert analyzer.load_factor_args("ekfac").use_empirical_fisher
    f64 = run["dtype"] == torch.float64
    for key, damping in DAMPINGS.items():
        score_args = ScoreArguments(damping_factor=damping, **(dict(
            per_sample_gradient_dtype=torch.float64, precondition_dtype=torch.float64,
            score_dtype=torch.float64) if f64 else {}))
        analyzer.compute_pairwise_scores(f"kron_pair_{key}", "ekfac", run["queries"], run["train"],
                                         per_device_query_batch_size=4, per_device_train_batch_size=16,
                                         score_args=score_args)
        theirs = analyzer.load_pairwise_scores(f"kron_pair_{key}")["all_modules"]
        _agree(theirs, run["shim"][f"pair_{key}"], run["dtype"], key)


def test_factors_the_shim_wrote_count_what_kronfluence_counts(run):
    """Covariance sums and counts as kronfluence itself writes them: tokens (unmasked), not examples; the
    gradient covariance sums every token (bert_left's padding that the loss reads too)."""
    from safetensors.torch import load_file

    kron, shim = (run["root"] / lib / "run" / "factors_ekfac" for lib in ("kron", "shim"))
    for stem in ("num_activation_covariance_processed", "num_gradient_covariance_processed", "num_lambda_processed"):
        theirs, ours = load_file(str(kron / f"{stem}.safetensors")), load_file(str(shim / f"{stem}.safetensors"))
        assert theirs.keys() == ours.keys()
        for name in theirs:
            assert torch.equal(theirs[name], ours[name]), (stem, name, theirs[name], ours[name])
    for stem in ("activation_covariance", "gradient_covariance"):
        theirs, ours = (load_file(str(d / f"{stem}.safetensors")) for d in (kron, shim))
        for name in theirs:
            _agree(ours[name], theirs[name], run["dtype"], f"{stem} {name}")


# ---- formats and errors (float64 MLP, no kronfluence run needed beyond the fixture's) ----------


@pytest.fixture(scope="module")
def kron_dir(tmp_path_factory):
    model, task, train, queries = _digits_mlp(torch.float64)
    root = tmp_path_factory.mktemp("kron_dir")
    m = kronfluence.prepare_model(copy.deepcopy(model), task)
    analyzer = kronfluence.Analyzer("run", m, task, cpu=True, disable_tqdm=True, output_dir=str(root),
                                    log_level=logging.WARNING)
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=32)
    return model, task, root / "run" / "factors_ekfac"


def _copy_dir(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_factors_errors(kron_dir, tmp_path):
    model, task, src = kron_dir
    missing = _copy_dir(src, tmp_path / "missing")
    os.remove(missing / "lambda_matrix.safetensors")
    with pytest.raises(FileNotFoundError, match="lambda_matrix.safetensors"):
        kf.load_factors(missing, model, task)

    no_module = _copy_dir(src, tmp_path / "no_module")
    tensors = load_file(str(no_module / "gradient_eigenvectors.safetensors"))
    del tensors["2"]
    save_file(tensors, str(no_module / "gradient_eigenvectors.safetensors"))
    with pytest.raises(ValueError, match="gradient_eigenvectors.*module '2'"):
        kf.load_factors(no_module, model, task)

    wider = nn.Sequential(nn.Linear(64, 30), nn.Tanh(), nn.Linear(30, 10)).double()
    with pytest.raises(ValueError, match="module '0'.*shape"):
        kf.load_factors(src, wider, task)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        kf.load_factors(tmp_path / "nowhere", model, task)


def test_load_factors_true_fisher_normalizes(kron_dir):
    """kronfluence's defaults (true Fisher, float32 storage): means = sums / counts."""
    model, task, src = kron_dir
    factors = kf.load_factors(src, model, task)
    assert factors.fisher == "true" and factors.layout == [1]
    lam = load_file(str(src / "lambda_matrix.safetensors"))["0"]
    n = int(load_file(str(src / "num_lambda_processed.safetensors"))["0"])
    torch.testing.assert_close(factors.segments[0]["0"].lam, (lam.double() / n).to(lam.dtype))
    a_cov = factors.segments[0]["0"].a_cov
    assert a_cov.shape == (65, 65) and torch.allclose(a_cov[-1, -1], torch.tensor(1.0, dtype=a_cov.dtype))


def test_save_factors_replaces_atomically(kron_dir, tmp_path):
    model, task, src = kron_dir
    factors = kf.load_factors(src, model, task)
    out = tmp_path / "factors_x"
    kf.save_factors(factors, out)
    kf.save_factors(factors, out)  # over an existing directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factors_x"]
    args = json.loads((out / "factor_arguments.json").read_text())
    assert FactorArguments(**args).strategy == "ekfac" and args["use_empirical_fisher"] is False
    again = kf.load_factors(out, model, task)
    for name, lf in factors.segments[0].items():
        for field in ("a_cov", "s_cov", "q_a", "q_s", "lam"):
            torch.testing.assert_close(getattr(again.segments[0][name], field), getattr(lf, field))


def test_shim_rejects_what_it_cannot_reproduce(kron_dir, tmp_path):
    model, task, _ = kron_dir
    prepared = kf.prepare_model(copy.deepcopy(model), task)
    analyzer = kf.Analyzer("run", prepared, task, cpu=True, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown strategy 'kfca'"):
        analyzer.fit_all_factors("k", [], factor_args=FactorArguments(strategy="kfca"))
    wrapped = kronfluence.prepare_model(copy.deepcopy(model), task)
    with pytest.raises(ValueError, match="TrackedModule"):
        kf.Analyzer("run", wrapped, task, cpu=True, output_dir=str(tmp_path))


def test_shared_parameters_match_kronfluence_factors_and_self_scores(tmp_path):
    """A layer run at every step of a recurrence (kronfluence's has_shared_parameters=True): factors and
    self-influence equal kronfluence's, natively and through the shim. Pairwise scores are checked
    against explicit per-example gradients in test_layers instead: kronfluence 1.0.1's pairwise tracker
    assigns each call's score rather than adding it, so its scores count one call of the layer."""
    from test_layers import RecurrentNet

    torch.manual_seed(0)
    d = torch.float64
    model = RecurrentNet().to(d)
    g = torch.Generator().manual_seed(4)
    train = TensorDataset(torch.randn(24, 4, 3, generator=g, dtype=d), torch.randint(0, 3, (24,), generator=g))
    task = ClassifyTask()
    factor_args = FactorArguments(use_empirical_fisher=True, has_shared_parameters=True, activation_covariance_dtype=d,
                                  gradient_covariance_dtype=d, per_sample_gradient_dtype=d, lambda_dtype=d)
    score_args = ScoreArguments(damping_factor=1e-8, per_sample_gradient_dtype=d, precondition_dtype=d, score_dtype=d)
    self_scores = {}
    for name, lib in (("kron", kronfluence), ("shim", kf)):
        analyzer = lib.Analyzer("run", lib.prepare_model(copy.deepcopy(model), task), task, cpu=True, disable_tqdm=True,
                                output_dir=str(tmp_path / name), log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=16, factor_args=factor_args)
        analyzer.compute_self_scores("self", "ekfac", train, per_device_train_batch_size=16, score_args=score_args)
        self_scores[name] = analyzer.load_self_scores("self")["all_modules"]
    _agree(self_scores["shim"], self_scores["kron"], d, "shim self-influence")
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    ours = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=16)
    theirs = kf.load_factors(tmp_path / "kron" / "run" / "factors_ekfac", model, task)
    for layer in ("cell", "head"):
        for field in ("a_cov", "s_cov", "lam"):
            _agree(getattr(ours.segments[0][layer], field), getattr(theirs.segments[0][layer], field), d, f"{layer} {field}")
    native = sf.self_score(model, task, traj, ours, train, method="ekfac", damping=1e-8, batch_size=16) * len(train)
    _agree(native, self_scores["kron"], d, "native self-influence × N")


def test_per_token_scores_match_kronfluence(tmp_path):
    """compute_per_token_scores on the padded Llama workload in float64: every module's token scores
    and their sum equal kronfluence's, and padded tokens score exactly 0."""
    model, task, train, queries = _llama(torch.float64)
    f64 = dict(per_sample_gradient_dtype=torch.float64, precondition_dtype=torch.float64, score_dtype=torch.float64)
    got = {}
    for name, lib in (("kron", kronfluence), ("shim", kf)):
        analyzer = lib.Analyzer("run", lib.prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                disable_tqdm=True, output_dir=str(tmp_path / name), log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", train, per_device_batch_size=16, factor_args=FactorArguments(
            use_empirical_fisher=True, activation_covariance_dtype=torch.float64,
            gradient_covariance_dtype=torch.float64, per_sample_gradient_dtype=torch.float64,
            lambda_dtype=torch.float64))
        for per_module in (False, True):
            analyzer.compute_pairwise_scores(f"tokens_{per_module}", "ekfac", queries, train, per_device_query_batch_size=4,
                                             per_device_train_batch_size=16, score_args=ScoreArguments(
                                                 compute_per_token_scores=True, compute_per_module_scores=per_module,
                                                 **f64))
            got[name, per_module] = analyzer.load_pairwise_scores(f"tokens_{per_module}")
        analyzer.compute_pairwise_scores("tokens_rank2", "ekfac", queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=16, score_args=ScoreArguments(
                                             compute_per_token_scores=True, query_gradient_low_rank=2,
                                             use_full_svd=True, query_gradient_svd_dtype=torch.float64, **f64))
        got[name, "rank2"] = analyzer.load_pairwise_scores("tokens_rank2")
    assert list(got["shim", True]) == sorted(task.get_influence_tracked_modules()) == list(got["kron", True])
    pad = 1 - torch.stack([train[i]["attention_mask"] for i in range(len(train))])
    for per_module in (False, True, "rank2"):
        for module, theirs in got["kron", per_module].items():
            ours = got["shim", per_module][module]
            assert ours.shape == theirs.shape == (len(queries), len(train), 10)
            _agree(ours, theirs, torch.float64, f"{module} per token")
            assert (ours * pad).abs().max() == 0


def test_per_token_scores_of_modules_without_tokens_are_kronfluences(tmp_path):
    """kronfluence scores a module per token only where its input is (batch, tokens, features): the
    head's per-module scores are (n_query, n_train), a model of such modules only gives
    (n_query, n_train) summed, one of both kinds refuses the sum (kronfluence's RuntimeError), and
    has_shared_parameters=True turns per-token scores off with a warning."""
    d = torch.float64
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(30, 5, 4, generator=g, dtype=d), torch.randint(0, 3, (30,), generator=g))
    train, queries = torch.utils.data.Subset(data, range(24)), torch.utils.data.Subset(data, range(24, 30))
    torch.manual_seed(0)
    pooled, mlp = PooledClassifier().to(d), nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(d)
    flat = TensorDataset(data.tensors[0][:, 0], data.tensors[1])
    flat_train, flat_queries = torch.utils.data.Subset(flat, range(24)), torch.utils.data.Subset(flat, range(24, 30))
    f64 = dict(per_sample_gradient_dtype=d, precondition_dtype=d, score_dtype=d)
    cases = {  # name: model, train, queries, FactorArguments fields, ScoreArguments fields
        "pooled_per_module": (pooled, train, queries, {}, dict(compute_per_module_scores=True)),
        "mlp": (mlp, flat_train, flat_queries, {}, {}),
        "shared_flag": (pooled, train, queries, dict(has_shared_parameters=True), {}),
    }
    got = {}
    for lib_name, lib in (("kron", kronfluence), ("shim", kf)):
        for case, (model, tr, qs, fa, sa) in cases.items():
            analyzer = lib.Analyzer("run", lib.prepare_model(copy.deepcopy(model), ClassifyTask()), ClassifyTask(),
                                    cpu=True, disable_tqdm=True, output_dir=str(tmp_path / lib_name / case),
                                    log_level=logging.WARNING)
            analyzer.fit_all_factors("f", tr, per_device_batch_size=8, factor_args=FactorArguments(
                use_empirical_fisher=True, activation_covariance_dtype=d, gradient_covariance_dtype=d,
                per_sample_gradient_dtype=d, lambda_dtype=d, **fa))
            for per_token in (True, False):
                warned = lib is kf and case == "shared_flag" and per_token
                with pytest.warns(UserWarning, match="do not apply with has_shared_parameters=True") if warned else \
                        contextlib.nullcontext():
                    analyzer.compute_pairwise_scores(f"p{per_token}", "f", qs, tr, per_device_query_batch_size=4,
                                                     per_device_train_batch_size=8, score_args=ScoreArguments(
                                                         compute_per_token_scores=per_token, **sa, **f64))
                got[lib_name, case, per_token] = analyzer.load_pairwise_scores(f"p{per_token}")
            if case == "pooled_per_module":  # both kinds of module, summed: refused by both
                with pytest.raises(RuntimeError, match="does not support token-wise score computation"):
                    analyzer.compute_pairwise_scores("mixed", "f", qs, tr, per_device_query_batch_size=4,
                                                     per_device_train_batch_size=8, score_args=ScoreArguments(
                                                         compute_per_token_scores=True, **f64))
    for (lib_name, case, per_token), scores in got.items():
        if lib_name == "shim":
            assert scores.keys() == got["kron", case, per_token].keys()
            for module, theirs in got["kron", case, per_token].items():
                assert scores[module].shape == theirs.shape, (case, module)
                _agree(scores[module], theirs, d, f"{case} {module} per_token={per_token}")
    assert got["shim", "pooled_per_module", True]["tokens"].shape == (6, 24, 5)
    assert got["shim", "pooled_per_module", True]["head"].shape == (6, 24)
    assert got["shim", "mlp", True]["all_modules"].shape == got["shim", "shared_flag", True]["all_modules"].shape == (6, 24)


def test_a_mask_is_not_said_to_miss_a_layer_without_tokens(tmp_path):
    """A pooled classifier's head sees (batch, features): kronfluence leaves it unmasked without a word,
    and so does the shim (a warning there would ask for a mask that has nothing to mask)."""
    d = torch.float64
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 5, 4, generator=g, dtype=d)
    data = TensorDataset(x, torch.randint(0, 3, (12,), generator=g), torch.ones(12, 5))

    class Masked(ClassifyTask):
        def compute_train_loss(self, batch, model, sample=False):
            return super().compute_train_loss(batch[:2], model, sample)

        def compute_measurement(self, batch, model):
            return super().compute_measurement(batch[:2], model)

        def get_attention_mask(self, batch):
            return batch[2]

    torch.manual_seed(0)
    analyzer = kf.Analyzer("run", kf.prepare_model(PooledClassifier().to(d), Masked()), Masked(), cpu=True,
                           disable_tqdm=True, output_dir=str(tmp_path), log_level=logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        analyzer.fit_all_factors("f", data, per_device_batch_size=4,
                                 factor_args=FactorArguments(use_empirical_fisher=True))


class EncoderMaskTask(Seq2SeqTask):
    """kronfluence's own encoder-decoder example form: one mask, the encoder's. kronfluence masks a
    module only where the mask has one entry per row of its input, so the decoder's modules (6 tokens
    against the source's 9) go unmasked."""

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def test_a_mask_that_does_not_fit_leaves_modules_unmasked_as_kronfluence_does(tmp_path):
    """The shim (and kronfluence_task natively) apply kronfluence's rule, with a warning naming the
    modules left unmasked; source_fast's own rule refuses the same mask, naming the module."""
    model, _, train, queries = _t5(torch.float64)
    task = EncoderMaskTask()
    f64 = torch.float64
    with pytest.warns(UserWarning, match=r"does not fit the inputs of modules \['decoder.block.0.layer.0.SelfAttention.q', "
                      r"'decoder.block.0.layer.1.EncDecAttention.q', 'decoder.block.0.layer.2.DenseReluDense.wi'\]"):
        shim = _script(kf, copy.deepcopy(model), task, train, queries, str(tmp_path / "shim"), f64)
    kron = _script(kronfluence, copy.deepcopy(model), task, train, queries, str(tmp_path / "kron"), f64)
    for key in kron:
        _agree(shim[key], kron[key], f64, key)
    factors = kf.load_factors(tmp_path / "kron" / "run" / "factors_ekfac", model, task)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    with pytest.warns(UserWarning, match="left unmasked, as kronfluence leaves them"):
        native = sf.score(model, kf.kronfluence_task(model, task), traj, factors, train, queries, method="ekfac",
                          damping=1e-8, batch_size=16)
    _agree(native * len(train), kron["pair_d1e-8"], f64, "native scores with kronfluence_task, × N")
    with pytest.raises(ValueError, match=r"attention mask has shape \(6, 9\) but module "
                       r"'decoder.block.0.layer.0.SelfAttention.q' sees 6 examples × 6 tokens"):
        sf.score(model, task, traj, factors, train, queries, method="ekfac", damping=1e-8, batch_size=16)


# ---- kronfluence's other strategies: identity, diagonal, kfac ---------------------------------


def f64_arguments(dtype):
    factor = dict(activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
                  lambda_dtype=dtype)
    score = dict(per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype,
                 query_gradient_svd_dtype=dtype)
    return (factor, score) if dtype == torch.float64 else ({}, {})


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module", params=[("digits_mlp", torch.float32), ("llama", torch.float64)],
                ids=["digits_mlp-fp32", "llama-fp64"])
def strategy_runs(request, tmp_path_factory):
    """Each strategy's script through kronfluence and the shim: {strategy: {lib: {key: scores}}}."""
    workload, dtype = request.param
    model, task, train, queries = WORKLOADS[workload](dtype)
    root = tmp_path_factory.mktemp(f"strategies_{workload}")
    factor_kw, score_kw = f64_arguments(dtype)
    out = {}
    for strategy in ("identity", "diagonal", "kfac"):
        for name, lib in (("kron", kronfluence), ("shim", kf)):
            analyzer = lib.Analyzer("run", lib.prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                    disable_tqdm=True, output_dir=str(root / name), log_level=logging.WARNING)
            analyzer.fit_all_factors(strategy, train, per_device_batch_size=16, factor_args=FactorArguments(
                strategy=strategy, use_empirical_fisher=True, **factor_kw))
            got = out.setdefault(strategy, {}).setdefault(name, {})
            for key, damping in DAMPINGS.items():
                score_args = ScoreArguments(damping_factor=damping, **score_kw)
                # Names of their own: both libraries return a name's existing scores without computing.
                analyzer.compute_pairwise_scores(f"{strategy}_pair_{key}", strategy, queries, train,
                                                 per_device_query_batch_size=4, per_device_train_batch_size=16,
                                                 score_args=score_args)
                analyzer.compute_self_scores(f"{strategy}_self_{key}", strategy, train, per_device_train_batch_size=16,
                                             score_args=score_args)
                got[f"pair_{key}"] = analyzer.load_pairwise_scores(f"{strategy}_pair_{key}")["all_modules"]
                got[f"self_{key}"] = analyzer.load_self_scores(f"{strategy}_self_{key}")["all_modules"]
            analyzer.compute_pairwise_scores(f"{strategy}_rank1", strategy, queries, train, per_device_query_batch_size=4,
                                             per_device_train_batch_size=16, score_args=ScoreArguments(
                                                 query_gradient_low_rank=1, use_full_svd=True, **score_kw))
            got["rank1"] = analyzer.load_pairwise_scores(f"{strategy}_rank1")["all_modules"]
    return dict(model=model, task=task, train=train, queries=queries, dtype=dtype, root=root, scores=out)


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac"])
def test_strategy_matches_kronfluence(strategy_runs, strategy):
    """The shim's scores (pairwise and self, damping 1e-8 and the heuristic, rank-1 queries) equal
    kronfluence's for each strategy, and each stage writes the files kronfluence's writes (a stage the
    strategy does not use is skipped, its arguments saved)."""
    run = strategy_runs
    got = run["scores"][strategy]
    for key, theirs in got["kron"].items():
        assert got["shim"][key].shape == theirs.shape
        _agree(got["shim"][key], theirs, run["dtype"], f"{strategy} {key}")
    kron, shim = (run["root"] / lib / "run" / f"factors_{strategy}" for lib in ("kron", "shim"))
    assert _files(shim) == _files(kron)
    assert json.loads((shim / "factor_arguments.json").read_text())["strategy"] == strategy


@pytest.mark.parametrize("strategy", ["diagonal", "kfac"])
def test_strategy_factors_read_both_ways(strategy_runs, strategy, tmp_path):
    """Factors read from kronfluence's diagonal / kfac directory score natively as kronfluence does
    (method "ekfac": every strategy is 1/(Λ + damping) in a basis), through score, self_score and
    score_corpus, and split per module and per token, summed over queries; kronfluence reads the shim's."""
    from source_fast.corpus import load_scores, score_corpus

    run = strategy_runs
    model, task, train, queries, dtype = run["model"], run["task"], run["train"], run["queries"], run["dtype"]
    theirs = run["scores"][strategy]["kron"]
    factors = kf.load_factors(run["root"] / "kron" / "run" / f"factors_{strategy}", model, task)
    tracked = kf.kronfluence_task(model, task)
    native = _native(model, tracked, train, queries, factors)
    for key in native:
        _agree(native[key] * len(train), theirs[key], dtype, f"native {strategy} {key}")
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    score_corpus(model, tracked, traj, factors, train, queries, tmp_path, method="ekfac", damping="heuristic",
                    batch_size=16, shard_size=10, progress=False)
    _agree(load_scores(tmp_path), native["pair_heuristic"], dtype, "score_corpus")
    options = dict(method="ekfac", damping="heuristic", batch_size=16)
    per_module = sf.score(model, tracked, traj, factors, train, queries, per_module=True, **options)
    _agree(sum(per_module.values()), native["pair_heuristic"], dtype, "per module")
    summed = sf.score(model, tracked, traj, factors, train, queries, sum_queries=True, **options)
    _agree(summed[0], native["pair_heuristic"].sum(0), dtype, "summed queries")
    if isinstance(train[0], dict):  # sequences
        tokens = sf.score(model, tracked, traj, factors, train, queries, per_token=True, **options)
        _agree(tokens.sum(-1), native["pair_heuristic"], dtype, "per token")
    _, score_kw = f64_arguments(dtype)
    analyzer = kronfluence.Analyzer("run", kronfluence.prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                    disable_tqdm=True, output_dir=str(run["root"] / "shim"), log_level=logging.WARNING)
    analyzer.compute_pairwise_scores(f"kron_reads_{strategy}", strategy, queries, train, per_device_query_batch_size=4,
                                     per_device_train_batch_size=16, score_args=ScoreArguments(damping_factor=1e-8,
                                                                                               **score_kw))
    _agree(analyzer.load_pairwise_scores(f"kron_reads_{strategy}")["all_modules"], run["scores"][strategy]["shim"]["pair_d1e-8"],
           dtype, f"kronfluence on the shim's {strategy} factors")


def test_identity_is_grad_dot_and_has_no_factors(strategy_runs):
    run = strategy_runs
    model, task, train, queries = run["model"], run["task"], run["train"], run["queries"]
    folder = run["root"] / "kron" / "run" / "factors_identity"
    with pytest.raises(ValueError, match="strategy 'identity'.*method='grad_dot'"):
        kf.load_factors(folder, model, task)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], train, lr_sum=1.0)])
    native = sf.score(model, kf.kronfluence_task(model, task), traj, None, train, queries, method="grad_dot",
                      batch_size=16)
    _agree(native * len(train), run["scores"]["identity"]["kron"]["pair_d1e-8"], run["dtype"], "grad_dot × N")


def test_diagonal_factors_from_first_principles(strategy_runs, tmp_path):
    """The diagonal strategy's Λ is the mean squared per-example gradient in the parameter basis:
    checked against explicit per-example gradients (autograd on each example's loss alone, weight
    and bias as kronfluence lays them out, bias last). Then save_factors writes the diagonal strategy
    (lambda files only) and load_factors reads it back unchanged; a native save / load keeps the
    bases and covariances absent (identity bases)."""
    run = strategy_runs
    model, task, train = run["model"], run["task"], run["train"]
    factors = kf.load_factors(run["root"] / "shim" / "run" / "factors_diagonal", model, task)
    modules = dict(model.named_modules())
    layers = {name: [modules[name].weight] + ([modules[name].bias] if modules[name].bias is not None else [])
              for name in factors.segments[0]}
    squares = {name: 0.0 for name in layers}
    for example in torch.utils.data.DataLoader(train, batch_size=1):
        grads = iter(torch.autograd.grad(task.compute_train_loss(example, model), sum(layers.values(), [])))
        for name, params in layers.items():
            g = torch.cat([next(grads)] + [next(grads)[:, None] for _ in params[1:]], 1)
            squares[name] = squares[name] + g.double() ** 2
    for name, lf in factors.segments[0].items():
        assert lf.a_cov is None and lf.s_cov is None and lf.q_a is None and lf.q_s is None
        _agree(lf.lam, squares[name] / len(train), run["dtype"], f"diagonal Λ of {name}")
    kf.save_factors(factors, tmp_path / "factors_diag")
    assert json.loads((tmp_path / "factors_diag" / "factor_arguments.json").read_text())["strategy"] == "diagonal"
    assert "lambda_matrix.safetensors" in _files(tmp_path / "factors_diag")
    assert "activation_covariance.safetensors" not in _files(tmp_path / "factors_diag")
    again = kf.load_factors(tmp_path / "factors_diag", model, task)
    factors.save(tmp_path / "native")
    native = sf.Factors.load(tmp_path / "native")
    for name, lf in factors.segments[0].items():
        for other in (again, native):
            torch.testing.assert_close(other.segments[0][name].lam, lf.lam)
            assert other.segments[0][name].a_cov is None and other.segments[0][name].q_s is None
    # One module with Kronecker factors among diagonal ones is no strategy kronfluence stores; natively,
    # a module with some of the four Kronecker tensors and not the others is a damaged file.
    name, lf = next(iter(factors.segments[0].items()))
    eye_a, eye_s = (torch.eye(d, dtype=lf.lam.dtype) for d in (lf.lam.shape[1], lf.lam.shape[0]))
    kron = dataclasses.replace(lf, a_cov=eye_a, s_cov=eye_s, q_a=eye_a, q_s=eye_s)
    mixed = dataclasses.replace(factors, segments=[{**factors.segments[0], name: kron}])
    with pytest.raises(ValueError, match=f"module {name!r} has Kronecker factors"):
        kf.save_factors(mixed, tmp_path / "factors_mixed")
    half = dataclasses.replace(lf, s_cov=eye_s)
    dataclasses.replace(factors, segments=[{**factors.segments[0], name: half}]).save(tmp_path / "half")
    with pytest.raises(ValueError, match=f"module {name!r} lacks \\['a_cov', 'q_a', 'q_s'\\]"):
        sf.Factors.load(tmp_path / "half")


# ---- torch.distributed: kronfluence's multi-process scripts through the shim ------------------


def ddp_workload():
    """The float64 digits MLP with 79 training examples (shares of 40 and 39 on two ranks)."""
    model, task, train, queries = _digits_mlp(torch.float64)
    return model, task, torch.utils.data.Subset(train, range(79)), queries


@pytest.mark.parametrize("mode, strategies", [("ddp", ["ekfac", "diagonal"]), ("plain", ["kfac"])],
                         ids=["ddp", "plain"])
def test_torchrun_matches_one_kronfluence_process(tmp_path, mode, strategies):
    """tests/_kronfluence_ddp.py, a kronfluence multi-process script with the shim's import, on two
    gloo ranks (ddp: the model in DistributedDataParallel; plain: the Analyzer starts the process
    group): every rank returns, and rank 0 writes, what one kronfluence process computes (pairwise per
    module, and self-influence with the training loss and with the measurement: float64, relative
    1e-6); the factor files count what kronfluence's
    count; model.safetensors has kronfluence's keys."""
    run = torchrun(Path(__file__).parent / "_kronfluence_ddp.py", tmp_path / "shim", mode, *strategies, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in (0, 1):
        assert torch.load(tmp_path / "shim" / f"state_rank{rank}.pt") == {
            "process_index": rank, "num_processes": 2, "local_process_index": rank, "device": torch.device("cpu"),
            "use_distributed": True, "is_main_process": rank == 0, "is_local_main_process": rank == 0,
            "is_last_process": rank == 1}
    model, task, train, queries = ddp_workload()
    analyzer = kronfluence.Analyzer("run", kronfluence.prepare_model(copy.deepcopy(model), task), task, cpu=True,
                                    disable_tqdm=True, output_dir=str(tmp_path / "kron"), log_level=logging.WARNING,
                                    disable_model_save=False)
    factor_kw, score_kw = f64_arguments(torch.float64)
    for strategy in strategies:
        analyzer.fit_all_factors(strategy, train, per_device_batch_size=16, factor_args=FactorArguments(
            strategy=strategy, use_empirical_fisher=True, **factor_kw))
        score_args = ScoreArguments(damping_factor=1e-8, compute_per_module_scores=True, **score_kw)
        analyzer.compute_pairwise_scores("pair", strategy, queries, train, per_device_query_batch_size=4,
                                         per_device_train_batch_size=16, score_args=score_args,
                                         overwrite_output_dir=True)
        analyzer.compute_self_scores("self", strategy, train, per_device_train_batch_size=16, score_args=score_args,
                                     overwrite_output_dir=True)
        measured = ScoreArguments(damping_factor=1e-8, use_measurement_for_self_influence=True, **score_kw)
        analyzer.compute_self_scores("measured", strategy, train, per_device_train_batch_size=16, score_args=measured,
                                     overwrite_output_dir=True)
        theirs = {"pair": analyzer.load_pairwise_scores("pair"), "self": analyzer.load_self_scores("self"),
                  "measured": analyzer.load_self_scores("measured")}
        written = {kind: load_file(str(tmp_path / "shim" / "run" / f"scores_{strategy}_{kind}" /
                                       f"{'pairwise' if kind == 'pair' else 'self'}_scores.safetensors"))
                   for kind in theirs}
        for rank in (0, 1):
            returned = torch.load(tmp_path / "shim" / f"returned_{strategy}_rank{rank}.pt")
            for kind, modules in theirs.items():
                assert sorted(returned[kind]) == sorted(modules) == sorted(written[kind])
                for name, expected in modules.items():
                    assert returned[kind][name].shape == expected.shape == ((len(queries), 79) if kind == "pair"
                                                                            else (79,))
                    _agree(returned[kind][name], expected, torch.float64, f"{strategy} {kind} {name} rank {rank}")
                    assert torch.equal(returned[kind][name], written[kind][name])
        kron, shim = (tmp_path / lib / "run" / f"factors_{strategy}" for lib in ("kron", "shim"))
        assert _files(shim) == _files(kron)
        for stem in ("num_lambda_processed", "num_activation_covariance_processed"):
            if (kron / f"{stem}.safetensors").exists():
                counts = [load_file(str(folder / f"{stem}.safetensors")) for folder in (kron, shim)]
                assert counts[0].keys() == counts[1].keys()
                assert all(torch.equal(counts[0][k], counts[1][k]) for k in counts[0]), (stem, counts)
    saved = [load_file(str(tmp_path / lib / "run" / "model.safetensors")) for lib in ("kron", "shim")]
    assert saved[0].keys() == saved[1].keys()


def test_torchrun_ranks_given_other_queries_are_refused(tmp_path):
    """Every rank scores every query: a rank given other queries would put zeros and another run's
    scores into the gathered matrix; it is refused on every rank, and no scores are written."""
    run = torchrun(Path(__file__).parent / "_kronfluence_ddp.py", tmp_path / "shim", "skew", "ekfac", timeout=180)
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: the ranks were given different inputs to score: they differ in queries" in run.stderr, \
            run.stderr[-3000:]
    assert not list((tmp_path / "shim").rglob("pairwise_scores.safetensors"))
