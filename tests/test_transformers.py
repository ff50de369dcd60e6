"""Hugging Face GPT-2 (Conv1D) and Llama-style (nn.Linear) models built from configs, with padded
batches and a causal-LM loss, against explicit per-example gradients and the dense EK-FAC matrix."""

import pytest
import torch

import source_fast as sf
from _helpers import Stream, dense_curvature
from source_fast.tasks import CausalLMTask, mlp_modules

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=23, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=23, max_position_embeddings=16, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _opt():
    """OPT's decoder layers give fc1 and fc2 (examples × tokens, features): one example's rows after another's."""
    cfg = transformers.OPTConfig(vocab_size=23, hidden_size=8, ffn_dim=12, word_embed_proj_dim=8, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=0,
                                 eos_token_id=0)
    return transformers.OPTForCausalLM(cfg)


class TokenData(torch.utils.data.Dataset):
    """Right-padded (or left-padded) sequences of random tokens, lengths 3..t."""

    def __init__(self, n, t, seed, left=False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 23, (n, t), generator=g)
        lengths = torch.randint(3, t + 1, (n,), generator=g)
        self.mask = (torch.arange(t)[None] < lengths[:, None]).long()
        if left:
            self.mask = self.mask.flip(1)
        self.ids = self.ids * self.mask  # pad id 0

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def _explicit(model, task, data, names):
    """Per-example gradients by autograd, one example at a time, in the (d_out, d_a) layout."""
    modules = dict(model.named_modules())
    rows = []
    for i in range(len(data)):
        batch = {k: v[None] for k, v in data[i].items()}
        model.zero_grad()
        task.compute_train_loss(batch, model).backward()
        blocks = []
        for n in names:
            m = modules[n]
            w = m.weight.grad.T if type(m).__name__ == "Conv1D" else m.weight.grad
            if getattr(m, "bias", None) is not None:
                w = torch.cat([w, m.bias.grad[:, None]], 1)
            blocks.append(w.flatten())
        rows.append(torch.cat(blocks))
    return torch.stack(rows)


@pytest.mark.parametrize("build", [_gpt2, _llama, _opt])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_causal_lm_ekfac_matches_explicit_gradients(build, normalize):
    torch.manual_seed(0)
    model = build().double().eval()
    names = mlp_modules(model)
    task = CausalLMTask(tracked=names, normalize=normalize)
    data, queries = TokenData(12, 7, 0), TokenData(3, 7, 1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, batch_size=5)
    scores = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, batch_size=4)
    h = torch.block_diag(*(dense_curvature(factors.segments[0][n]) for n in names))
    v, g = _explicit(model, task, queries, names), _explicit(model, task, data, names)
    expected = torch.linalg.solve(h + 1e-3 * torch.eye(h.shape[0], dtype=h.dtype), v.T).T @ g.T / len(data)
    err = (scores - expected).abs().max() / expected.abs().max()
    assert err < 1e-8, err
    # Per-token scores split each training example's score over its tokens; padding gets nothing.
    per_token = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, per_token=True)
    assert per_token.shape == (3, 12, 7)
    assert torch.allclose(per_token.sum(-1), scores, rtol=1e-9, atol=1e-14)
    assert (per_token * (1 - data.mask)[None]).abs().max() == 0
    # Per module and per token: each module's tokens, summing to the per-token scores.
    parts = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, per_token=True,
                     per_module=True)
    assert list(parts) == names and all(p.shape == (3, 12, 7) for p in parts.values())
    assert torch.allclose(sum(parts.values()), per_token, rtol=1e-9, atol=1e-14)
    # Low-rank queries split per token too: at full rank, the exact split; at rank 1, its own scores'.
    full = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, per_token=True,
                    query_rank=64)
    assert torch.allclose(full, per_token, rtol=1e-9, atol=1e-14)
    rank1 = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, per_token=True,
                     query_rank=1)
    assert torch.allclose(rank1.sum(-1), sf.score(model, task, traj, factors, data, queries, method="ekfac",
                                                  damping=1e-3, query_rank=1), rtol=1e-9, atol=1e-14)
    assert not torch.allclose(rank1, per_token)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_left_padding_scores_are_the_explicit_gradients(normalize):
    """Left padding: the padding before a sequence's first token predicts nothing: gradient dot
    products equal explicit per-example autograd gradients of the task's own loss."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = CausalLMTask(tracked=names, normalize=normalize)
    data, queries = TokenData(9, 7, 0, left=True), TokenData(3, 7, 1, left=True)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    scores = sf.score(model, task, traj, None, data, queries, method="grad_dot", batch_size=4)
    expected = _explicit(model, task, queries, names) @ _explicit(model, task, data, names).T / len(data)
    err = (scores - expected).abs().max() / expected.abs().max()
    assert err < 1e-10, err


class PooledTask(sf.Task):
    """BERT's classifier, which pools the first position: with left padding, a pad for the shorter sequences."""

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


class Labelled(TokenData):
    def __init__(self, n, t, seed):
        super().__init__(n, t, seed, left=True)
        self.labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 100))

    def __getitem__(self, i):
        return {**super().__getitem__(i), "labels": self.labels[i]}


def test_a_loss_that_reads_padded_positions_gets_their_gradients():
    """Left-padded BERT pools position 0, a pad: the loss reads padded positions, whose output gradients
    are then not zero. The mask keeps padding out of the covariance factors only (as kronfluence), so
    scores, self-influence and per-token scores are those of the explicit autograd gradients under the
    dense EK-FAC; the pad's own share shows in the per-token scores."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=23, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    names = ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.output.dense", "bert.pooler.dense"]
    task = PooledTask()
    task.get_influence_tracked_modules = lambda: names
    data, queries = Labelled(12, 7, 0), Labelled(3, 7, 1)
    assert (data.mask[:, 0] == 0).sum() >= 6
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=5)
    h = torch.block_diag(*(dense_curvature(factors.segments[0][n]) for n in names))
    v, g = _explicit(model, task, queries, names), _explicit(model, task, data, names)
    precond = torch.linalg.solve(h + 1e-3 * torch.eye(h.shape[0], dtype=h.dtype), v.T).T
    scores = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, batch_size=4)
    torch.testing.assert_close(scores, precond @ g.T / len(data), rtol=1e-8, atol=0)
    own = torch.linalg.solve(h + 1e-3 * torch.eye(h.shape[0], dtype=h.dtype), g.T).T
    torch.testing.assert_close(sf.self_score(model, task, traj, factors, data, method="ekfac", damping=1e-3),
                               (own * g).sum(1) / len(data), rtol=1e-8, atol=0)
    parts = sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, per_token=True,
                     per_module=True)
    torch.testing.assert_close(sum(p.sum(-1) for p in parts.values()), scores, rtol=1e-9, atol=0)
    assert parts[names[1]][:, data.mask[:, 0] == 0, 0].abs().min() > 0


class Shifted(torch.utils.data.Dataset):
    """The same sequences left-padded, with the position_ids a generating model would give them."""

    def __init__(self, right: TokenData):
        t = right.ids.shape[1]
        shifts = t - right.mask.sum(1)
        self.ids = torch.stack([r.roll(int(k)) for r, k in zip(right.ids, shifts)])
        self.mask = torch.stack([r.roll(int(k)) for r, k in zip(right.mask, shifts)])
        self.positions = (self.mask.cumsum(1) - 1).clamp_min(0)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "position_ids": self.positions[i]}


@pytest.mark.parametrize("build", [_gpt2, _llama])
def test_position_ids_in_the_batch_reach_the_model(build):
    """GPT-2 numbers positions from the first column, padding included: a left-padded sequence is
    another input than the right-padded one unless the batch carries position_ids, which the task
    passes on; with them the scores are the right-padded ones."""
    torch.manual_seed(0)
    model = build().double().eval()
    task = CausalLMTask()
    data, queries = TokenData(9, 7, 0), TokenData(3, 7, 1)
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    right = sf.score(model, task, traj, None, data, queries, method="grad_dot", batch_size=4)
    left = sf.score(model, task, traj, None, Shifted(data), Shifted(queries), method="grad_dot", batch_size=4)
    torch.testing.assert_close(left, right, rtol=1e-10, atol=1e-12 * float(right.abs().max()))


def test_unpadded_batches_need_no_attention_mask():
    """Without an attention_mask every token is real: the same factors and scores as an all-ones mask."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    task = CausalLMTask(tracked=mlp_modules(model))
    ids = torch.randint(1, 23, (6, 5), generator=torch.Generator().manual_seed(0))
    with_mask = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids]
    without = [{"input_ids": i} for i in ids]
    results = []
    for data in (with_mask, without):
        traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
        factors = sf.fit_factors(model, task, traj, fisher="empirical")
        results.append(sf.score(model, task, traj, factors, data, data[:2], method="ekfac", damping=1e-3))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=0)


def test_bf16_activations_track_fp32_scores():
    """bf16 model: activations and gradients in bf16, factors and accumulation in fp32."""
    torch.manual_seed(0)
    model = _gpt2().eval()
    task = CausalLMTask(tracked=mlp_modules(model))
    data, queries = TokenData(24, 8, 0), TokenData(4, 8, 1)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        traj = sf.Trajectory.even([m.state_dict()], [0.1] * 10, 1, data)
        factors = sf.fit_factors(m, task, traj, fisher="empirical")
        assert all(lf.lam.dtype == torch.float32 for lf in factors.segments[0].values())
        results[dtype] = sf.score(m, task, traj, factors, data, queries)
        assert results[dtype].dtype == torch.float32
    corr = torch.corrcoef(torch.stack([results[torch.float32].flatten(), results[torch.bfloat16].flatten()]))[0, 1]
    assert corr > 0.97, corr


def test_sampled_labels_do_not_depend_on_the_models_dtype():
    """The tasks draw in float64 for every dtype, so a float64 copy of a float32 model samples the same
    true-Fisher labels from the same seed (a check of a float32 fit in float64 compares like with like);
    before, the draws agreed on 1.4 % of tokens."""
    from source_fast.tasks import ClassificationTask, RegressionTask, sample_tokens

    logits = torch.randn(2000, 11, generator=torch.Generator().manual_seed(0)) * 2
    draws = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        torch.manual_seed(1)
        draws.append(sample_tokens(logits.to(dtype)))
    assert (draws[0] == draws[1]).float().mean() > 0.999 and (draws[0] == draws[2]).float().mean() > 0.97
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 4)
    x, y = torch.randn(64, 5), torch.randint(0, 4, (64,))
    for task in (ClassificationTask(), RegressionTask()):
        target = y if isinstance(task, ClassificationTask) else torch.randn(64, 4)
        losses = []
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(2)
            losses.append(float(task.compute_train_loss((x.to(dtype), target if target.dtype == torch.long
                                                         else target.to(dtype)), net.to(dtype), sample=True)))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), (type(task).__name__, losses)


def test_sampled_tokens_follow_the_softmax():
    """CausalLMTask's true-Fisher labels: frequencies over 200k draws per row match softmax(logits)
    within 5 binomial standard deviations, and a token of zero probability is never drawn."""
    from source_fast.tasks import sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(3, 11) * 2
    logits[:, 4] = -float("inf")  # probability exactly 0
    draws = sample_tokens(logits.expand(200_000, 3, 11))
    assert draws.shape == (200_000, 3) and draws.dtype == torch.int64
    p = torch.softmax(logits, -1)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=11) for r in range(3)]).double() / 200_000
    sd = (p * (1 - p) / 200_000).sqrt().double()
    assert ((freq - p).abs() <= 5 * sd + 1e-12).all(), (freq - p).abs().max()
    assert (draws != 4).all()
    # A uniform that rounds to 1 (a float64 draw just below 1 is 1.0 in float32: once in 2^25) takes the
    # last token of positive mass, not a last token of zero mass (whose loss would be inf).
    logits[:, -1] = -float("inf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
        assert (sample_tokens(logits) == 9).all()


def test_examples_of_different_lengths_need_a_collate_fn():
    """default_collate's own error ("stack expects each tensor to be equal size") says what to do."""
    model = _gpt2().eval()
    data = [{"input_ids": torch.randint(1, 23, (k,))} for k in (4, 6, 5)]
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    with pytest.raises(RuntimeError, match=r"segment 0, checkpoint 0, batch 0 \(examples from 0\): stack expects each "
                                           r"tensor to be equal size.*\nexamples of different lengths need a collate_fn"):
        sf.fit_factors(model, CausalLMTask(tracked=mlp_modules(model)), traj, batch_size=2)


def test_mean_normalization_fits_the_mean_objectives_curvature():
    """With T predicted tokens per example the mean objective is the sum's / T, and so is its
    curvature: the true Fisher fitted with normalize="mean" is the sum's / T (the same label draws),
    not / T² (a per-example mean's own Fisher), and SOURCE with the raw learning rates gives "sum"'s
    scores with the rates / T, in the mean's units (/ T). The empirical Fisher cannot be put at that
    scale and is refused."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    names = mlp_modules(model)
    data, queries = TokenData(10, 7, 0), TokenData(3, 7, 1)
    for d in (data, queries):
        d.mask = torch.ones_like(d.mask)  # every sequence full: T = 6 predicted tokens each
        d.ids = d.ids.clamp_min(1)
    t = 6
    state = model.state_dict()
    fits, scores = {}, {}
    for normalize, lr_sum in (("sum", 2.0 / t), ("mean", 2.0)):
        task = CausalLMTask(tracked=names, normalize=normalize)
        traj = sf.Trajectory([sf.Segment([state], data, lr_sum=lr_sum)])
        fits[normalize] = sf.fit_factors(model, task, traj, batch_size=4, seed=3)
        scores[normalize] = sf.score(model, task, traj, fits[normalize], data, queries, batch_size=4)
    for name in names:
        mean, total = fits["mean"].segments[0][name], fits["sum"].segments[0][name]
        torch.testing.assert_close(mean.s_cov, total.s_cov / t, rtol=1e-10, atol=0)
        torch.testing.assert_close(mean.lam, total.lam / t, rtol=1e-8, atol=1e-30)
    torch.testing.assert_close(scores["mean"], scores["sum"] / t, rtol=1e-8, atol=0)
    task = CausalLMTask(tracked=names, normalize="mean")
    with pytest.raises(ValueError, match="normalize='mean'\\) with fisher='empirical'.* use fisher='true'"):
        sf.fit_factors(model, task, sf.Trajectory([sf.Segment([state], data, lr_sum=2.0)]), fisher="empirical")


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_causal_lm_loss_is_hugging_faces(normalize):
    """CausalLMTask's loss against the model's own: HF shifts `labels` itself and ignores -100, and
    averages over the kept targets of what it is given, so one example at a time it is the "mean"
    loss, and the kept-target count times it the "sum" loss. Padded batches sum the examples.
    HF casts float64 logits down to float32 for its loss (the task keeps float64): rtol 1e-6."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()  # built from a config, it is in training mode: dropout
    data = TokenData(5, 9, seed=3)
    task = CausalLMTask(normalize=normalize)
    expected = 0.0
    for i in range(len(data)):
        ids, mask = data[i]["input_ids"][None], data[i]["attention_mask"][None]
        hf = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        kept = int(mask[0, 1:].sum())
        expected = expected + (hf.double() if normalize == "mean" else hf.double() * kept)
    batch = {"input_ids": data.ids, "attention_mask": data.mask}
    torch.testing.assert_close(task.compute_measurement(batch, model), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(task.compute_train_loss(batch, model), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_labels_select_the_predicted_tokens_as_hugging_face_does(normalize):
    """Fine-tuning on completions: `labels` -100 on each prompt (its first 3 tokens). The loss is
    Hugging Face's with those labels, and the true Fisher samples only the predicted positions."""
    torch.manual_seed(0)
    model = _gpt2().double().eval()
    data = TokenData(5, 9, seed=3)
    labels = data.ids.masked_fill(data.mask == 0, -100)
    labels[:, :3] = -100
    labels[0, 5] = 7  # a target other than the next input token
    task = CausalLMTask(normalize=normalize)
    expected = 0.0
    for i in range(len(data)):
        hf = model(input_ids=data.ids[i][None], attention_mask=data.mask[i][None], labels=labels[i][None]).loss
        kept = int((labels[i, 1:] != -100).sum())
        expected = expected + (hf.double() if normalize == "mean" else hf.double() * kept)
    batch = {"input_ids": data.ids, "attention_mask": data.mask, "labels": labels}
    torch.testing.assert_close(task.compute_measurement(batch, model), expected, rtol=1e-6, atol=0)
    # Sampled labels: the gradient of a prompt position's logits is zero (nothing is predicted there).
    logits = []
    model.lm_head.register_forward_hook(lambda m, i, out: logits.append(out) or out.retain_grad())
    task.compute_train_loss(batch, model, sample=True).backward()
    grad = logits[0].grad
    predicting = (labels[:, 1:] != -100)
    assert (grad[:, :-1][~predicting] == 0).all() and (grad[:, :-1][predicting].abs().sum(-1) > 0).all()
    with pytest.raises(ValueError, match="labels of shape"):
        task.compute_train_loss({**batch, "labels": labels[:, 1:]}, model)


def test_save_pretrained_checkpoints_with_tied_weights(tmp_path):
    """save_pretrained leaves out GPT-2's lm_head.weight (tied to the token embedding): such a file is
    the same checkpoint as the full state_dict, whose scores it must give exactly."""
    torch.manual_seed(0)
    model = _gpt2().double()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied: one tensor
    model.save_pretrained(tmp_path, safe_serialization=True)
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    task = CausalLMTask(tracked=mlp_modules(model))
    data, queries = TokenData(6, 5, 0), TokenData(2, 5, 1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    scores = []
    for ckpt in (expected, tmp_path / "model.safetensors"):
        traj = sf.Trajectory([sf.Segment([ckpt], data, lr_sum=1.0)])
        factors = sf.fit_factors(model, task, traj, fisher="empirical", batch_size=3)
        scores.append(sf.score(model, task, traj, factors, data, queries, method="ekfac", damping=1e-3, batch_size=3))
    assert torch.equal(scores[0], scores[1])
    # Fast-SOURCE averages a segment mixing both kinds (the file lacks lm_head.weight, the dict has it).
    mixed = sf.Trajectory([sf.Segment([tmp_path / "model.safetensors", expected], data, lr_sum=1.0)])
    fast = sf.fit_factors(model, task, mixed, fisher="empirical", batch_size=3, average_params=True)
    one = sf.Trajectory([sf.Segment([expected], data, lr_sum=1.0)])
    torch.testing.assert_close(sf.score(model, task, mixed, fast, data, queries, method="fast_source", batch_size=3),
                               sf.score(model, task, one, sf.fit_factors(model, task, one, fisher="empirical", batch_size=3),
                                        data, queries, batch_size=3), rtol=1e-10, atol=0)
    broken = _gpt2().double()  # untied: lm_head is a weight of its own, which the file does not have
    broken.lm_head.weight = torch.nn.Parameter(broken.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match=r"missing keys \['lm_head.weight'\]"):
        sf.trajectory.load_into(broken, tmp_path / "model.safetensors", "segment 0, checkpoint 0")


def test_batches_move_to_the_model_device_in_their_own_type():
    """transformers' collators return BatchEncoding, a UserDict (not a dict): its tensors must move to
    the model's device like a dict's, and the task still gets a BatchEncoding (the meta device stands
    in for a GPU here)."""
    from collections import OrderedDict

    from source_fast._passes import to_device

    ids = torch.ones(2, 3, dtype=torch.long)
    for batch in (transformers.BatchEncoding({"input_ids": ids, "attention_mask": ids}),
                  OrderedDict(input_ids=ids), {"input_ids": ids}, [{"input_ids": ids}]):
        moved = to_device(batch, torch.device("meta"))
        assert type(moved) is type(batch)
        inner = moved[0] if isinstance(moved, list) else moved
        assert all(v.device.type == "meta" for v in inner.values())
        original = batch[0] if isinstance(batch, list) else batch
        assert all(v.device.type == "cpu" for v in original.values())  # the caller's batch is left alone
    assert to_device(transformers.BatchEncoding({"input_ids": ids}), torch.device("meta")).input_ids.is_meta


def test_unroll_says_how_to_build_an_attention_model_it_can_differentiate():
    """Exact unrolling (the ground truth) differentiates the per-example losses twice under vmap:
    Hugging Face's default SDPA attention cannot, eager attention can; the error says which."""
    from source_fast.unroll import TrainingRecord

    for attn, with_mask in (("sdpa", True), ("sdpa", False), ("eager", True)):
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=8, intermediate_size=12, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=23, max_position_embeddings=16,
                                       attn_implementation=attn)
        model = transformers.LlamaForCausalLM(cfg).double().eval()
        data = [{"input_ids": torch.randint(1, 23, (5,))} for _ in range(4)]
        if with_mask:
            for d in data:
                d["attention_mask"] = torch.tensor([1, 1, 1, 1, 0])
        record = TrainingRecord({k: v.clone() for k, v in model.state_dict().items()}, [[0, 1], [2, 3]], [0.1, 0.1])
        traj = sf.Trajectory.even([model.state_dict()], [0.1, 0.1], 1, data)
        if attn == "eager":
            scores = sf.score(model, CausalLMTask(), traj, None, data, data[:1], method="unroll", record=record)
            assert torch.isfinite(scores).all()
            continue
        with pytest.raises(RuntimeError, match="(?s)(unrolling step 0|differentiating query 0 through the run): "
                                               ".*attn_implementation='eager'"):
            sf.score(model, CausalLMTask(), traj, None, data, data[:1], method="unroll", record=record)


def test_layers_fed_examples_times_tokens_are_read_per_example():
    """OPT's fc1 and fc2 take (examples × tokens, features) and Swin's attention (examples × windows,
    window tokens, features): each example's rows one after another, read as that example's tokens.
    Every layer of both models against explicit gradients (float64, rounding only: 1e-10), and OPT's
    fc1 covariance against its inputs' masked covariance, as a layer fed (examples, tokens, features) is
    masked. A stream finds the examples as the fewest rows a tracked layer saw."""
    torch.manual_seed(0)
    model = _opt().double().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    task = CausalLMTask(tracked=names)
    data, queries = TokenData(9, 7, 0), TokenData(3, 7, 1)
    expected = _explicit(model, task, queries, names) @ _explicit(model, task, data, names).T / len(data)
    for given in (data, Stream(data)):
        traj = sf.Trajectory([sf.Segment([model.state_dict()], given, lr_sum=1.0, num_examples=len(data))])
        scores = sf.score(model, task, traj, None, given, queries, method="grad_dot", batch_size=4)
        assert (scores - expected).abs().max() / expected.abs().max() < 1e-10
    fc1 = model.get_submodule("model.decoder.layers.0.fc1")
    rows = []
    handle = fc1.register_forward_hook(lambda m, i, o: rows.append(i[0].detach()))
    model(input_ids=data.ids, attention_mask=data.mask)
    handle.remove()
    a = torch.cat([rows[0], torch.ones(len(rows[0]), 1, dtype=torch.float64)], 1)[data.mask.flatten() > 0]
    factors = sf.fit_factors(model, task, sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)]),
                             batch_size=4)
    assert torch.allclose(factors.segments[0]["model.decoder.layers.0.fc1"].a_cov, a.T @ a / len(a), rtol=1e-10, atol=0)

    cfg = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=1, embed_dim=4, depths=[2], num_heads=[1],
                                  window_size=2, num_labels=3)
    swin = transformers.SwinForImageClassification(cfg).double().eval()
    images = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (7,))

    class SwinTask(sf.Task):
        def compute_train_loss(self, batch, model, sample=False):
            return torch.nn.functional.cross_entropy(model(pixel_values=batch[0]).logits, batch[1], reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):
            return layers

    layers = [n for n, m in swin.named_modules() if isinstance(m, torch.nn.Linear)]
    grads = []
    for i in range(7):
        swin.zero_grad()
        SwinTask().compute_train_loss((images[i : i + 1], labels[i : i + 1]), swin).backward()
        modules = dict(swin.named_modules())
        grads.append(torch.cat([torch.cat([modules[n].weight.grad, modules[n].bias.grad[:, None]], 1).flatten()
                                for n in layers]))
    grads = torch.stack(grads)
    swin_data = torch.utils.data.TensorDataset(images, labels)
    traj = sf.Trajectory([sf.Segment([swin.state_dict()], swin_data, lr_sum=1.0)])
    scores = sf.score(swin, SwinTask(), traj, None, swin_data, swin_data, method="grad_dot", batch_size=3)
    expected = grads @ grads.T / 7
    assert (scores - expected).abs().max() / expected.abs().max() < 1e-10
    # Window attention's tokens are windows one after another: per-token scores only per module.
    with pytest.raises(ValueError, match=r"per_token: module 'swin.encoder.layers.0.blocks.0.attention.q_proj' takes "
                                         r"several rows of tokens per example \(Swin's windows"):
        sf.score(swin, SwinTask(), traj, None, swin_data, swin_data, method="grad_dot", per_token=True)
    parts = sf.score(swin, SwinTask(), traj, None, swin_data, swin_data, method="grad_dot", per_token=True,
                     per_module=True)
    assert torch.allclose(sum(p.sum(-1) for p in parts.values()), scores, rtol=1e-9, atol=1e-14)


def _pad_to_longest(examples):
    """A collate that pads each batch to its own longest sequence (right padding, pad id 0)."""
    t = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), t, dtype=torch.long)
    mask = torch.zeros(len(examples), t, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e["input_ids"])], mask[i, : len(e["input_ids"])] = e["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("limit", ["defaults", "5 examples", "bytes of 2 batches", "padding"])
def test_batches_joined_into_blocks_keep_their_scores(limit, monkeypatch):
    """On a CPU, scoring joins a pass's batches into blocks (scoring.BLOCK_EXAMPLES, BLOCK_BYTES, BLOCK_PADDING;
    each block reads every query's tile once), padding each layer's tokens to the block's longest batch. Batches
    of 3 padded each to their own longest (4 batches, 3 lengths) give the explicit per-example gradients'
    scores, float64 to 1e-10, however the blocks fall: all 10 examples in one, or cut by examples, by padded
    bytes or by padding. Low-rank queries (query_rank 8 of 8: exact) read no tiles and keep the batches."""
    from source_fast import scoring

    torch.manual_seed(0)
    model = _gpt2().double().eval()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    task = CausalLMTask(tracked=names)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(1, 23, (int(k),), generator=g)} for k in (3, 7, 4, 5, 5, 5, 2, 6, 3, 7)]
    queries = [{"input_ids": torch.randint(1, 23, (k,), generator=g)} for k in (4, 6)]
    traj = sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)])
    factors = sf.fit_factors(model, task, traj, batch_size=4, collate_fn=_pad_to_longest)
    if limit == "5 examples":
        monkeypatch.setattr(scoring, "BLOCK_EXAMPLES", 5)
    if limit == "bytes of 2 batches":  # the first two batches padded, float64: 6 × 7 tokens of every layer's a, g
        per_token = 8 * sum(sum(dict(model.named_modules())[n].weight.shape) for n in names)
        monkeypatch.setattr(scoring, "BLOCK_BYTES", 6 * 7 * per_token)
    if limit == "padding":  # 3 × 7 and 3 × 5 tokens padded are 42 for 36, 7/6 > 1.1; 3 × 5 and 3 × 6 are 36 for 33
        monkeypatch.setattr(scoring, "BLOCK_PADDING", 1.1)
    score_block = scoring._score_block
    scores, blocks = {}, {}
    for m, options in {"grad_dot": {}, "ekfac": {"damping": 1e-3},
                       "ekfac low-rank": {"damping": 1e-3, "query_rank": 8}}.items():
        seen = blocks[m] = []
        monkeypatch.setattr(scoring, "_score_block", lambda specs, rec, *a, seen=seen, **k: (
            seen.append(tuple(rec[specs[0].name].a.shape[:2])), score_block(specs, rec, *a, **k))[1])
        scores[m] = sf.score(model, task, traj, None if m == "grad_dot" else factors, data, queries,
                             method=m.split()[0], batch_size=3, collate_fn=_pad_to_longest, **options)
    v = torch.stack([_explicit(model, task, [{"input_ids": q["input_ids"], "attention_mask": torch.ones_like(
        q["input_ids"])}], names)[0] for q in queries])
    x = torch.stack([_explicit(model, task, [{"input_ids": e["input_ids"], "attention_mask": torch.ones_like(
        e["input_ids"])}], names)[0] for e in data])
    h = torch.block_diag(*(dense_curvature(factors.segments[0][n]) for n in names))
    expected = {"grad_dot": v @ x.T / len(data),
                "ekfac": torch.linalg.solve(h + 1e-3 * torch.eye(h.shape[0], dtype=h.dtype), v.T).T @ x.T / len(data)}
    for m, s in scores.items():
        want = expected[m.split()[0]]
        err = (s - want).abs().max() / want.abs().max()
        assert err < 1e-10, (m, err)
    # Each scoring's blocks of training examples (the queries' gradients come in a pass of their own):
    # (examples, tokens). The batches: 3 examples of 7, 5 and 6 tokens, then 1 of 7.
    assert blocks["grad_dot"] == blocks["ekfac"] == {
        "defaults": [(10, 7)], "5 examples": [(3, 7), (3, 5), (4, 7)], "bytes of 2 batches": [(6, 7), (4, 7)],
        "padding": [(3, 7), (6, 6), (1, 7)]}[limit]
    assert blocks["ekfac low-rank"] == [(3, 7), (3, 5), (3, 6), (1, 7)]
