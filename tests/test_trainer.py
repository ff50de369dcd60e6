"""Trajectory.from_trainer against a real transformers.Trainer run (a small GPT-2, AdamW, warm-up and
linear decay, checkpoints at uneven steps; gradient clipping off except in its own test). The ground
truth comes from the run itself: the rates from the scheduler rebuilt and stepped, Adam's second
moments from the live optimizer, looked up by parameter object (not by the order the saved state
numbers them in)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers import Stream

transformers = pytest.importorskip("transformers")

import source_fast as sf
from source_fast.tasks import CausalLMTask

STEPS, SAVE, WARMUP, LR, DECAY = 25, 10, 5, 1e-2, 0.01


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, t, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, t), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


def _train(out, **options):
    model, data = _model(), Tokens(48, 12, 40, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=8, learning_rate=LR,
        warmup_steps=WARMUP, weight_decay=DECAY, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        log_level="error", **{"logging_steps": 1, "max_grad_norm": 0.0, **options})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return out, model, data, trainer.optimizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("trainer"))


def _applied(rates, beta, dampening=0.0, nesterov=False):
    """The rates as SOURCE counts them with momentum β: (1 − β) times how far torch's SGD moved the weights
    along step k's gradient by the end of training, written out term by term: the buffer takes the first
    gradient whole and later ones times 1 − dampening, and carries them on at the later steps' rates."""
    if not beta:
        return list(rates)
    carried = [sum(r * beta ** (i - k) for i, r in enumerate(rates) if i >= k) for k in range(len(rates))]
    if nesterov:
        return [(1 - beta) * (rates[k] + beta * carried[k]) for k in range(len(rates))]
    return [(1 - beta) * (1 if k == 0 else 1 - dampening) * carried[k] for k in range(len(rates))]


def _rates(steps=STEPS, total=STEPS):
    """The rate of each of `steps` steps of the run's schedule over `total` steps (past its end: the rate it
    would have next)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    schedule = transformers.get_linear_schedule_with_warmup(opt, WARMUP, total)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return rates


def test_a_trainer_run_is_read_with_its_steps_rates_and_optimizer(run):
    out, model, data, optimizer = run
    traj = sf.Trajectory.from_trainer(out, model, data, num_segments=3)
    rates = _rates()
    # Checkpoints after steps 10, 20 and 25 (the run's end): each segment's rates are its own steps'.
    assert [seg.lr_sum for seg in traj.segments] == pytest.approx([sum(rates[:10]), sum(rates[10:20]),
                                                                    sum(rates[20:])], rel=1e-12)
    assert [str(seg.checkpoints[0]) for seg in traj.segments] == [
        str(out / f"checkpoint-{n}") for n in (10, 20, 25)]
    assert {(seg.optimizer, seg.weight_decay) for seg in traj.segments} == {("adamw", DECAY)}
    # The saved states' two unnamed groups (decayed weights, then biases and norms) are named right:
    # the preconditioner fitted from the last checkpoint's state is the live optimizer's, by object.
    task = CausalLMTask(normalize="mean")
    with pytest.warns(UserWarning, match=r"the biases of .* \(as Hugging Face's Trainer does\)"):
        factors = sf.fit_factors(model, task, traj, batch_size=16)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj", "lm_head"):
        module = model.get_submodule(name)
        group = optimizer.param_groups[0]

        def p_of(param):
            s = optimizer.state[param]
            v_hat = s["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(s["step"]))
            return 1 / (v_hat.sqrt() + group["eps"])

        if name == "lm_head":  # tied to the embedding: one state, no bias
            want = p_of(module.weight)
        else:  # transformers' Conv1D stores (d_in, d_out)
            want = torch.cat([p_of(module.weight).T, p_of(module.bias)[:, None]], 1)
        got = factors.segments[-1][name].precond
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    scores = sf.score(model, task, traj, factors, data, torch.utils.data.Subset(data, range(3)))
    assert scores.shape == (3, len(data)) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("options, momentum", [("momentum=0.9,dampening=0.25", {"beta": 0.9, "dampening": 0.25}),
                                               ("momentum=0.9,nesterov=true", {"beta": 0.9, "nesterov": True}),
                                               ("dampening=0.5", {"beta": 0.0})])  # no buffer, no dampening
def test_an_sgd_run_keeps_its_momentum_dampening_and_decay(tmp_path, options, momentum):
    out, model, data, opt = _train(tmp_path, optim="sgd", optim_args=options)
    assert opt.param_groups[0]["nesterov"] == ("nesterov" in momentum)
    traj = sf.Trajectory.from_trainer(out, model, data, num_segments=2)
    rates = _applied(_rates(), **momentum)
    # Checkpoints 10, 20, 25 in two segments: [10, 20], [25].
    assert [seg.lr_sum for seg in traj.segments] == pytest.approx([sum(rates[:20]), sum(rates[20:])])
    assert {(seg.optimizer, seg.momentum, seg.weight_decay, seg.optimizer_states) for seg in traj.segments} == {
        ("sgd", momentum["beta"], DECAY, None)}
    assert [len(seg.checkpoints) for seg in traj.segments] == [2, 1]


def test_other_optimizers_are_refused(tmp_path):
    out, model, data, _ = _train(tmp_path, optim="adagrad")
    with pytest.raises(ValueError, match=r"checkpoint-25/optimizer.pt: the optimizer is neither SGD's nor Adam's; "
                                         r".*optim='sgd', 'adamw_torch'"):
        sf.Trajectory.from_trainer(out, model, data, 3)


def test_uneven_steps_in_trajectory_even():
    ckpts = [{"w": torch.zeros(1)} for _ in range(2)]
    rates = [float(k) for k in range(1, 151)]
    traj = sf.Trajectory.even(ckpts, rates, 2, list(range(4)), steps=[120, 150])
    assert [s.lr_sum for s in traj.segments] == [sum(rates[:120]), sum(rates[120:])]
    for steps, match in (([120], "2 integers"), ([150, 120], "must increase"), ([0, 150], "must increase"),
                         ([100, 140], "after step 140, but lrs has 150"), ([100.0, 150], "2 integers")):
        with pytest.raises(ValueError, match=match):
            sf.Trajectory.even(ckpts, rates, 2, list(range(4)), steps=steps)


def _edit(run_dir, what, edit):
    """Rewrites `what` (a JSON file) in every checkpoint, as one run would have written it."""
    for folder in sorted(run_dir.glob("checkpoint-*")):
        path = folder / what
        path.write_text(json.dumps(edit(json.loads(path.read_text()), int(folder.name.split("-")[1]))))


def test_what_a_trainer_folder_lacks_is_named(run, tmp_path):
    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    original = {f.name: (f / "trainer_state.json").read_text() for f in copy.glob("checkpoint-*")}
    # Logged every fifth step only (logging_steps=5): the rates are not all there.
    _edit(copy, "trainer_state.json",
          lambda st, n: {**st, "log_history": [h for h in st["log_history"] if h.get("step", 0) % 5 == 0]})
    with pytest.raises(ValueError, match=r"the learning rate of 5 of the 25 steps .*logging_steps=1.* pass lrs="):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    assert sf.Trajectory.from_trainer(copy, model, data, 3, lrs=_rates()).segments[0].lr_sum == pytest.approx(
        sum(_rates()[:10]))
    with pytest.raises(ValueError, match=r"lrs= gives 0.075 for step 11, but checkpoint-10's optimizer state holds "
                                         r"0.0075 .*as the run applied it"):
        sf.Trajectory.from_trainer(copy, model, data, 3, lrs=[10 * r for r in _rates()])  # checked too
    for name, text in original.items():
        (copy / name / "trainer_state.json").write_text(text)
    # Each rate logged as the next step's, as transformers before 4.51 did: its version says so; without
    # the version, the states say so.
    _edit(copy, "config.json", lambda cfg, n: {**cfg, "transformers_version": "4.48.1"})
    with pytest.raises(ValueError, match=r"transformers 4.48.1 logged each step's next learning rate"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    _edit(copy, "config.json", lambda cfg, n: {k: v for k, v in cfg.items() if k != "transformers_version"})
    _edit(copy, "trainer_state.json", lambda st, n: {**st, "log_history": [
        {**h, "learning_rate": _rates(STEPS + 1)[h["step"]]} if "learning_rate" in h else h
        for h in st["log_history"]]})
    with pytest.raises(ValueError, match=r"the log gives 0.007 for step 11, but checkpoint-10's optimizer state holds"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    for n in (10, 20):  # save_total_limit=1: only the final state, whose rate is the log's last
        shutil.rmtree(copy / f"checkpoint-{n}")
    with pytest.raises(ValueError, match=r"which step each logged learning rate belongs to is not known"):
        sf.Trajectory.from_trainer(copy, model, data, 1)
    (copy / "checkpoint-25" / "trainer_state.json").write_text(original["checkpoint-25"])
    assert sf.Trajectory.from_trainer(copy, model, data, 1).segments[0].lr_sum == pytest.approx(sum(_rates()))


def test_checkpoints_of_another_run_or_damaged_ones_are_refused(run, tmp_path):
    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    # A second run into the same output_dir left checkpoint-10 of the first (another log).
    state = json.loads((copy / "checkpoint-10" / "trainer_state.json").read_text())
    state["log_history"][0]["loss"] += 0.5
    (copy / "checkpoint-10" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"checkpoint-10 is not from the same run as checkpoint-25 .* move them out"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    shutil.copytree(out / "checkpoint-20", copy / "checkpoint-15")
    with pytest.raises(ValueError, match=r"checkpoint-15/trainer_state.json records global_step 20, not 15"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    shutil.rmtree(copy / "checkpoint-15")
    cut_short = (out / "checkpoint-10" / "trainer_state.json").read_text()[:180]
    (copy / "checkpoint-10" / "trainer_state.json").write_text(cut_short)
    with pytest.raises(ValueError, match=r"checkpoint-10/trainer_state.json is damaged \(Unterminated .*\): an "
                                         r"incomplete checkpoint\? Move that folder out of"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    shutil.copy(out / "checkpoint-10" / "trainer_state.json", copy / "checkpoint-10")
    frozen = _model()
    frozen.transformer.wpe.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"hold \[\d+, \d+\] parameters, but Trainer's split .* gives"):
        sf.Trajectory.from_trainer(copy, frozen, data, 3)
    blob = (copy / "checkpoint-20" / "optimizer.pt").read_bytes()
    (copy / "checkpoint-20" / "optimizer.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"checkpoint-20/optimizer.pt cannot be read as an optimizer state_dict"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    (copy / "checkpoint-20" / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-20/optimizer.pt is missing \(an incomplete checkpoint"):
        sf.Trajectory.from_trainer(copy, model, data, 3)
    with pytest.raises(ValueError, match="has no checkpoint-N folders"):
        sf.Trajectory.from_trainer(tmp_path, model, data, 3)


def _as_bin_shards(folder):
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        renamed[shard] = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(folder / shard), folder / renamed[shard])
        (folder / shard).unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors.index.json").unlink()


def test_fsdps_full_optimizer_state_is_read(run, tmp_path):
    """With fsdp_state_dict_type FULL_STATE_DICT accelerate saves FSDP's whole optimizer state as
    optimizer.bin, keyed by parameter names (tests/test_engine.py reads a real FSDP run's): the same
    preconditioner as torch's optimizer.pt."""
    from source_fast.interop.trainer import _optimizer_state

    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for folder in copy.glob("checkpoint-*"):
        state = _optimizer_state(folder, model)  # torch's, its groups named by Trainer's rule
        names = {i: n for g in state["param_groups"] for i, n in zip(g["params"], g["param_names"])}
        torch.save({"state": {names[i]: s for i, s in state["state"].items()},
                    "param_groups": [{**{k: v for k, v in g.items() if k != "param_names"}, "params": g["param_names"]}
                                     for g in state["param_groups"]]}, folder / "optimizer.bin")
        (folder / "optimizer.pt").unlink()
    task = CausalLMTask(normalize="mean")
    with pytest.warns(UserWarning, match="the biases of"):
        want, got = (sf.fit_factors(model, task, sf.Trajectory.from_trainer(d, model, data, 1), batch_size=16)
                     for d in (out, copy))
    for name, lf in want.segments[0].items():
        assert torch.equal(lf.precond, got.segments[0][name].precond), name


def test_fsdps_sharded_checkpoints_are_read(run, tmp_path):
    """With fsdp_state_dict_type SHARDED_STATE_DICT (accelerate's default) a checkpoint holds the weights
    in pytorch_model_fsdp_0/ and the optimizer's state, keyed by names, in optimizer_0/: folders of
    torch.distributed.checkpoint (tests/test_engine.py reads a real FSDP run's), and no config.json.
    Written here by torch.distributed.checkpoint from the run's own states, they give the same
    trajectory, factors and scores; the first moments are not read."""
    import torch.distributed.checkpoint as dcp
    from source_fast.interop.trainer import _optimizer_state

    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    written = {}
    for folder in copy.glob("checkpoint-*"):
        state = _optimizer_state(folder, model)
        names = {i: n for g in state["param_groups"] for i, n in zip(g["params"], g["param_names"])}
        by_name = {"state": {names[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**{k: v for k, v in g.items() if k != "param_names"}, "params": g["param_names"]}
                                    for g in state["param_groups"]]}
        written[folder.name] = by_name
        weights = transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()  # tied lm_head too, as FSDP's
        with pytest.warns(UserWarning, match="torch.distributed is disabled"):
            dcp.save({"model": weights}, checkpoint_id=folder / "pytorch_model_fsdp_0", no_dist=True)
            dcp.save({"optimizer": by_name}, checkpoint_id=folder / "optimizer_0", no_dist=True)
        for name in ("model.safetensors", "optimizer.pt", "config.json", "generation_config.json"):
            (folder / name).unlink()
    task = CausalLMTask(normalize="mean")
    whole, pieces = (sf.Trajectory.from_trainer(d, model, data, num_segments=2) for d in (out, copy))
    assert [s.lr_sum for s in whole.segments] == [s.lr_sum for s in pieces.segments]
    with pytest.warns(UserWarning, match="the biases of"):
        want, got = (sf.fit_factors(model, task, t, batch_size=16) for t in (whole, pieces))
    for seg_want, seg_got in zip(want.segments, got.segments):
        for name, lf in seg_want.items():
            assert torch.equal(lf.lam, seg_got[name].lam) and torch.equal(lf.precond, seg_got[name].precond), name
    queries = torch.utils.data.Subset(data, range(3))
    assert torch.equal(sf.score(model, task, whole, want, data, queries), sf.score(model, task, pieces, got, data, queries))
    read = sf.trajectory.load_dict(copy / "checkpoint-20" / "optimizer_0", "o")
    assert {k for s in read["state"].values() for k in s} == {"step", "exp_avg_sq"}
    assert read["param_groups"] == written["checkpoint-20"]["param_groups"]  # hyperparameters and names
    piece = next((copy / "checkpoint-20" / "pytorch_model_fsdp_0").glob("*.distcp"))
    piece.write_bytes(piece.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 1: cannot read checkpoint file '.*checkpoint-20/"
                                         r"pytorch_model_fsdp_0' \(damaged or incomplete\?\)"):
        sf.fit_factors(model, task, pieces)


def test_deepspeed_zero3_runs_are_read(tmp_path):
    """Trainer with DeepSpeed (real runs: ZeRO stage 3 on 2 gloo ranks) saves each rank's partition of
    the weights and of Adam's state in checkpoint-N/global_stepN/, and by default no weights file: put
    back together, the last checkpoint's weights and second moments are the ones DeepSpeed itself
    gathers (safe_get_full_fp32_param, safe_get_full_optimizer_state, in the run), and the run reads
    as a trajectory with the schedule's rates, AdamW and its decay, whose factors fit. A LoRA run's
    partitions lack the frozen base (named when read as weights); its adapters, saved whole, are read."""
    import _trainer_deepspeed_job as job
    from _helpers import torchrun
    from source_fast._deepspeed import zero_optimizer_state

    run = torchrun(Path(__file__).parent / "_trainer_deepspeed_job.py", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rates = _rates(job.STEPS + 1, total=job.STEPS)
    lora, data = job.lora_model(), Tokens(48, 12, 40, seed=1)
    traj = sf.Trajectory.from_trainer(tmp_path / "lora", lora, data, num_segments=2, lrs=rates[: job.STEPS])
    gathered = torch.load(tmp_path / "lora" / "deepspeed_full.pt", weights_only=True)
    last = tmp_path / "lora" / f"checkpoint-{job.STEPS}"
    moments = zero_optimizer_state(last, "c")["state"]
    for name, value in gathered["weights"].items():
        assert torch.equal(traj.segments[-1].checkpoints[-1][name], value), name
        assert torch.equal(moments[name]["exp_avg_sq"], gathered["exp_avg_sq"][name]), name
    assert sf.fit_factors(lora, CausalLMTask(normalize="mean"), traj, batch_size=16).layers
    with pytest.raises(ValueError, match=r"DeepSpeed saved .*global_step6 without its frozen parameters "
                                         r"\(exclude_frozen_parameters, as Trainer saves a PEFT model\)"):
        sf.trajectory.load_state_dict(last, "c")
    tmp_path = tmp_path / "full"
    gathered = torch.load(tmp_path / "deepspeed_full.pt", weights_only=True)
    last = tmp_path / f"checkpoint-{job.STEPS}"
    assert not any(last.glob("*.safetensors"))
    state = zero_optimizer_state(last, "c")["state"]
    weights = sf.trajectory.load_state_dict(last, "c")
    assert state.keys() == gathered["exp_avg_sq"].keys() == gathered["weights"].keys()
    assert weights.keys() == gathered["weights"].keys() | {"lm_head.weight"}  # tied to the embedding
    for name, moment in gathered["exp_avg_sq"].items():
        assert torch.equal(state[name]["exp_avg_sq"], moment), name
        assert torch.equal(weights[name], gathered["weights"][name]), name
    model = _model()
    # DeepSpeed steps the scheduler before Trainer reads the rate it logs: each step's next rate.
    history = json.loads((tmp_path / f"checkpoint-{job.STEPS}" / "trainer_state.json").read_text())["log_history"]
    assert [h["learning_rate"] for h in history if "learning_rate" in h] == pytest.approx(rates[1:], rel=1e-12)
    with pytest.raises(ValueError, match=r"the run trained with DeepSpeed, whose engine steps the learning-rate "
                                         r"scheduler before Trainer reads the rate it logs, .*: pass lrs="):
        sf.Trajectory.from_trainer(tmp_path, model, data, num_segments=2)
    traj = sf.Trajectory.from_trainer(tmp_path, model, data, num_segments=2, lrs=rates[: job.STEPS])
    assert [seg.lr_sum for seg in traj.segments] == pytest.approx([sum(rates[:3]), sum(rates[3:])], rel=1e-12)
    assert {(seg.optimizer, seg.weight_decay) for seg in traj.segments} == {("adamw", DECAY)}
    factors = sf.fit_factors(model, CausalLMTask(normalize="mean"), traj, batch_size=16)
    assert all(lf.precond is not None and bool(torch.isfinite(lf.precond).all())
               for seg in factors.segments for lf in seg.values())


def test_checkpoints_saved_in_shards_are_read(run, tmp_path):
    """A model over save_pretrained's max_shard_size (5 GB by default) is saved in shards with an index:
    read whole, in either format, from the run's folders, a folder or the index file; a missing shard, one
    of another save and a damaged index are named."""
    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for folder, safe in zip(sorted(copy.glob("checkpoint-*")), (True, False, True)):
        saved = transformers.GPT2LMHeadModel.from_pretrained(folder)
        (folder / "model.safetensors").unlink()
        saved.save_pretrained(folder, max_shard_size="20KB")
        if not safe:  # torch.save shards, as transformers before 5 wrote with safe_serialization=False
            _as_bin_shards(folder)
        assert len(list(folder.glob("model-*" if safe else "pytorch_model-*"))) > 3
    task = CausalLMTask(normalize="mean")
    whole, shards = (sf.Trajectory.from_trainer(d, model, data, num_segments=1) for d in (out, copy))
    with pytest.warns(UserWarning, match="the biases of"):
        want, got = (sf.fit_factors(model, task, t, batch_size=16) for t in (whole, shards))
    for name, lf in want.segments[0].items():
        assert torch.equal(lf.lam, got.segments[0][name].lam) and torch.equal(lf.precond, got.segments[0][name].precond)
    queries = torch.utils.data.Subset(data, range(3))
    assert torch.equal(sf.score(model, task, whole, want, data, queries), sf.score(model, task, shards, got, data, queries))
    folder = copy / "checkpoint-20"
    index = folder / "pytorch_model.bin.index.json"
    state = sf.trajectory.load_state_dict(index, "c")
    assert state.keys() == sf.trajectory.load_state_dict(folder, "c").keys() and "lm_head.weight" not in state
    for key, value in transformers.GPT2LMHeadModel.from_pretrained(out / "checkpoint-20").state_dict().items():
        assert key == "lm_head.weight" or torch.equal(state[key], value), key
    shard = json.loads(index.read_text())["weight_map"]["transformer.h.1.mlp.c_fc.weight"]
    (folder / shard).rename(folder / "moved")
    with pytest.raises(FileNotFoundError, match=rf"segment 0, checkpoint 1: shard '.*{shard}', listed in .*index.json'"
                                                r", does not exist"):
        sf.fit_factors(model, task, shards)
    other = next(n for n in json.loads(index.read_text())["weight_map"].values() if n != shard)
    shutil.copy(folder / other, folder / shard)  # another shard's tensors under this shard's name
    with pytest.raises(ValueError, match=rf"segment 0, checkpoint 1: shard '.*{shard}' does not hold the tensors .* "
                                         r"lists for it \(\['transformer.*differ\): a shard of another save\?"):
        sf.fit_factors(model, task, shards)
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"segment 0, checkpoint 1: cannot read the shard index '.*index.json': KeyError"):
        sf.fit_factors(model, task, shards)
    for name in folder.iterdir():
        if "pytorch_model" in name.name or name.name == "moved":
            name.unlink()
    with pytest.raises(ValueError, match=r"checkpoint-20 has none of model.safetensors, .* or adapter_model.safetensors"):
        sf.Trajectory.from_trainer(copy, model, data, num_segments=1)
    with pytest.raises(IsADirectoryError, match=r"c: '.*checkpoint-20' is a folder without model weights \(looked for "
                                                r"model.safetensors, .*\): pass the weights file"):
        sf.trajectory.load_state_dict(folder, "c")
    # FSDP's pieces that are not read (a save cut short, a file per rank), and a DeepSpeed run's, say what to do.
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint-20 has none of .*: its FSDP state folder pytorch_model_fsdp_0 "
                                         r"has no .metadata, .* \(an interrupted save\?\)"):
        sf.Trajectory.from_trainer(copy, model, data, num_segments=1)
    shutil.rmtree(folder / "pytorch_model_fsdp_0")
    (folder / "pytorch_model_fsdp_0_rank0.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint-20 has none of .*: it holds FSDP's state in a file per rank "
                                         r"\(LOCAL_STATE_DICT, or accelerate's use_dcp=False\), which is not read"):
        sf.Trajectory.from_trainer(copy, model, data, num_segments=1)
    (folder / "pytorch_model_fsdp_0_rank0.bin").unlink()
    (folder / "global_step20").mkdir()
    (folder / "zero_to_fp32.py").write_text("")
    with pytest.raises(IsADirectoryError, match=r"it holds a DeepSpeed checkpoint without ZeRO's partitions \(global_stepN/"
                                                r"zero_pp_rank_\*_optim_states.pt, .*\): one of ZeRO stage 0"):
        sf.trajectory.load_state_dict(folder, "c")
    whole = {k: v for k, v in state.items() if k != "lm_head.weight"}  # accelerate's whole FSDP state_dict file
    torch.save(whole, folder / "pytorch_model_fsdp.bin")
    assert sf.trajectory.load_state_dict(folder, "c").keys() == whole.keys()
    (folder / "optimizer.pt").unlink()  # ZeRO keeps the optimizer's state in global_step20/, and says so
    with pytest.raises(ValueError, match=r"optimizer.pt is missing \(it holds a DeepSpeed checkpoint without ZeRO's partitions "):
        sf.Trajectory.from_trainer(copy, model, data, num_segments=1)


def test_label_smoothing_and_the_trainers_own_loader_are_named(run, tmp_path):
    """A run trained with label smoothing says its objective is not a plain cross-entropy's; the Trainer's
    own training DataLoader (random batches) is refused for what it does, not for its batch_sampler."""
    out, model, data, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    args = torch.load(copy / "checkpoint-25" / "training_args.bin", weights_only=False)
    args.label_smoothing_factor = 0.1
    torch.save(args, copy / "checkpoint-25" / "training_args.bin")
    with pytest.warns(UserWarning, match=r"trained with label_smoothing_factor=0.1, a loss that mixes each target with "
                                         r"the uniform distribution: the task's loss should too"):
        traj = sf.Trajectory.from_trainer(copy, model, data, num_segments=1)
    loader = transformers.Trainer(model=model, args=args, train_dataset=data).get_train_dataloader()
    with pytest.raises(ValueError, match=r"the DataLoader's batch_sampler draws from a \w*RandomSampler, which shuffles "
                                         r"or samples; .*collate_fn=trainer.data_collator"):
        sf.score(model, CausalLMTask(normalize="mean"), traj.final(), None, loader, data, method="grad_dot")


def test_a_lora_run_is_read_through_its_peft_model(tmp_path):
    """A LoRA run (peft) saves only its adapters, under keys without the adapter's name. The PEFT model
    as trained completes each checkpoint with its frozen base; its LoRA layers, the ones that train, are
    what is tracked; Adam's state is matched to them (checked against the live optimizer by object)."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                             fan_in_fan_out=True)
    model = peft.get_peft_model(_model(), config)
    data = Tokens(48, 12, 40, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=8, learning_rate=LR,
        warmup_steps=WARMUP, weight_decay=DECAY, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, log_level="error", max_grad_norm=0.0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert not (tmp_path / "checkpoint-10" / "model.safetensors").exists()
    traj = sf.Trajectory.from_trainer(tmp_path, model, data, num_segments=3)
    assert [seg.lr_sum for seg in traj.segments] == pytest.approx([sum(_rates()[:10]), sum(_rates()[10:20]),
                                                                    sum(_rates()[20:])], rel=1e-12)
    live = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    last, first = traj.segments[-1].checkpoints[-1], traj.segments[0].checkpoints[0]
    for name, value in live.items():  # the final checkpoint is the trained adapter; the first is not
        assert torch.equal(last[name], value) and not torch.equal(first[name], value)
    task = CausalLMTask(normalize="mean")
    factors = sf.fit_factors(model, task, traj, batch_size=16)
    assert factors.layers and all(spec.name.split(".")[-2] in ("lora_A", "lora_B") for spec in factors.layers)
    name = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.default"
    weight = model.get_submodule(name).weight
    state, group = trainer.optimizer.state[weight], trainer.optimizer.param_groups[0]
    v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
    torch.testing.assert_close(factors.segments[-1][name].precond.double(), 1 / (v_hat.sqrt() + group["eps"]),
                               rtol=1e-6, atol=0)
    scores = sf.score(model, task, traj, factors, data, torch.utils.data.Subset(data, range(3)))
    assert scores.shape == (3, len(data)) and bool(torch.isfinite(scores).all())
    # Loaded for inference (nothing trains), the base layers would read as trained: refused.
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"LoRA adapters .* no parameter that trains: .*is_trainable=True"):
        sf.fit_factors(model, task, sf.Trajectory([sf.Segment([model.state_dict()], data, lr_sum=1.0)]))
    with pytest.raises(ValueError, match=r"the model has no parameter that trains: .*is_trainable=True"):
        sf.Trajectory.from_trainer(tmp_path, model, data, 2)


def test_named_and_extra_adapters_and_modules_to_save_are_read(tmp_path):
    """PEFT saves an adapter named other than "default" in checkpoint-N/<name>/, each adapter's keys
    without its name, and modules_to_save without their wrapper: every trainable tensor of the final
    checkpoint is the trained one, of the first another. DoRA is refused."""
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    model = peft.get_peft_model(_model(), peft.LoraConfig(modules_to_save=["ln_f"], **lora), adapter_name="mine")
    model.add_adapter("spare", peft.LoraConfig(**lora))  # present, not trained
    data = Tokens(24, 12, 40, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, save_steps=3, per_device_train_batch_size=8, learning_rate=LR,
        logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, log_level="error",
        max_grad_norm=0.0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    traj = sf.Trajectory.from_trainer(tmp_path, model, data, num_segments=2)
    last, first = traj.segments[-1].checkpoints[-1], traj.segments[0].checkpoints[0]
    live = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert any(".modules_to_save.mine." in n for n in live) and not any(".spare." in n for n in live)
    for name, value in live.items():
        assert torch.equal(last[name], value) and not torch.equal(first[name], value), name
    dora = peft.get_peft_model(_model(), peft.LoraConfig(use_dora=True, **lora))
    with pytest.raises(ValueError, match="DoRA adapters are not supported"):
        sf.Trajectory.from_trainer(tmp_path, dora, data, 2)


def test_clipped_steps_count_at_the_rate_their_gradients_moved(tmp_path):
    """Trainer clips each step's gradient to max_grad_norm (read from training_args.bin; the log's
    grad_norm is the norm before). A clipped gradient moves the weights as a smaller rate would: each
    step's rate is scaled by the clipping the optimizer saw (measured here from the gradients' norm
    just before each optimizer step)."""
    after = []

    class Measure(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            after.append(float(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()))

    model, data = _model(), Tokens(48, 12, 40, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, save_steps=SAVE, per_device_train_batch_size=8, learning_rate=LR,
        warmup_steps=WARMUP, max_grad_norm=0.3, logging_steps=1, report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, log_level="error")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[Measure()])
    trainer.train()
    before = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    scale = [a / b for a, b in zip(after, before)]
    assert len(scale) == STEPS and min(scale) < 0.5  # most steps were clipped
    rates = [r * c for r, c in zip(_rates(), scale)]
    traj = sf.Trajectory.from_trainer(tmp_path, model, data, num_segments=3)
    assert [seg.lr_sum for seg in traj.segments] == pytest.approx([sum(rates[:10]), sum(rates[10:20]),
                                                                    sum(rates[20:])], rel=1e-5)


def test_training_args_are_read_without_running_their_pickle(tmp_path):
    """training_args.bin is a pickle: read for max_grad_norm only, with every class it names replaced
    by an inert record. A crafted file cannot run code (os.system here), inflate memory through the
    memo, or smuggle a bool or a non-finite number in as the clipping threshold."""
    import struct
    import zipfile

    from source_fast.interop.trainer import _training_args

    marker = tmp_path / "ran"
    payloads = {
        "code": b"\x80\x02cos\nsystem\n(X" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode()
                + b"tR.",
        "memo": b"\x80\x02Nr" + struct.pack("<I", 1 << 28) + b".",
    }
    arguments = b"\x80\x02ctransformers\nTrainingArguments\n)\x81}X\r\x00\x00\x00max_grad_norm%bsb."
    payloads["bool"] = arguments % b"\x88"  # True
    payloads["inf"] = arguments % (b"G" + struct.pack(">d", float("inf")))
    for name, payload in [*payloads.items(), ("float", arguments % (b"G" + struct.pack(">d", 0.3)))]:
        with zipfile.ZipFile(tmp_path / f"{name}.bin", "w") as z:
            z.writestr("training_args/data.pkl", payload)
        assert _training_args(tmp_path / f"{name}.bin").get("max_grad_norm") == (0.3 if name == "float" else None), name
    assert not marker.exists()


def test_another_stages_data_or_model_is_named(run, tmp_path):
    """The run's log says how many steps an epoch took: data no process count or accumulation can
    explain is another run's (a second stage's, say). A model of another architecture is named by its
    weights, before the optimizer's groups (which are named through the model) could say it less clearly."""
    out, model, data, _ = run
    with pytest.raises(ValueError, match=r"an epoch of this run took 6 batches of 8 examples on each process \(6 "
                                         r"optimizer steps at gradient accumulation 1\), which 30 examples cannot give: "
                                         r"pass the data this run trained on"):
        sf.Trajectory.from_trainer(out, model, torch.utils.data.Subset(data, range(30)), 3)
    doubled = torch.utils.data.ConcatDataset([data, data])  # two processes of 8: as many steps per epoch
    assert len(sf.Trajectory.from_trainer(out, model, doubled, 3).segments) == 3
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=3,
                                                                 n_head=2))
    with pytest.raises(ValueError, match=r"checkpoint-25.*transformer.h.2"):
        sf.Trajectory.from_trainer(out, other, data, 3)


def test_sgd_states_that_maximize_or_change_momentum_are_named(tmp_path):
    out, model, data, _ = _train(tmp_path, optim="sgd", optim_args="momentum=0.9")

    def edit(fn, names):
        for name in names:
            path = out / name / "optimizer.pt"
            state = torch.load(path, weights_only=False)
            fn(state["param_groups"])
            torch.save(state, path)

    edit(lambda groups: [g.update(momentum=0.5) for g in groups], ["checkpoint-10"])
    with pytest.warns(UserWarning, match=r"the SGD momentum changed during the run \(0.5, 0.9, 0.9 at the checkpoints\)"
                                         r": SOURCE takes one β for the run, their mean 0.766667"):
        traj = sf.Trajectory.from_trainer(out, model, data, 3)
    assert traj.segments[0].momentum == pytest.approx(2.3 / 3)
    edit(lambda groups: [g.update(maximize=True) for g in groups], ["checkpoint-25"])
    with pytest.raises(ValueError, match=r"checkpoint-25/optimizer.pt: the SGD optimizer maximizes its objective"):
        sf.Trajectory.from_trainer(out, model, data, 3)


def test_data_size_checks_use_the_runs_accumulation_and_skip_streams(tmp_path):
    """With gradient accumulation 2 (read from training_args.bin) an epoch of 48 examples in batches of
    8 is 3 steps: half the data, which accumulation 1 would explain, is refused. A stream has no epochs
    (the Trainer counts max_steps as one): not checked."""
    out, model, data, _ = _train(tmp_path / "accumulated", gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match=r"an epoch of this run took 6 batches of 8 examples on each process \(3 "
                                         r"optimizer steps at gradient accumulation 2\), which 24 examples cannot give"):
        sf.Trajectory.from_trainer(out, model, torch.utils.data.Subset(data, range(24)), 3)
    model, data = _model(), Tokens(48, 12, 40, seed=1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "stream"), max_steps=10, save_steps=5, per_device_train_batch_size=8,
        learning_rate=LR, logging_steps=1, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        log_level="error", max_grad_norm=0.0)
    transformers.Trainer(model=model, args=args, train_dataset=Stream(data)).train()
    traj = sf.Trajectory.from_trainer(tmp_path / "stream", model, Stream(data), 2, num_examples=48)
    assert [seg.num_examples for seg in traj.segments] == [48, 48]


def test_unlogged_clipping_is_said(tmp_path):
    """Clipping on (max_grad_norm 1.0) but the norms not logged: the steps count as unclipped, said even
    when no logged step shows a clip."""
    out, model, data, _ = _train(tmp_path / "clip", logging_steps=500, max_grad_norm=1.0)
    with pytest.warns(UserWarning, match=r"clipped gradients at max_grad_norm=1 \(0 of the 0 logged steps over it\), but "
                                         r"25 of its 25 steps have no logged grad_norm .*every step counts as unclipped"):
        sf.Trajectory.from_trainer(out, model, data, 3, lrs=_rates())
