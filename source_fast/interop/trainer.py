"""Hugging Face `transformers.Trainer` runs as trajectories: `Trajectory.from_trainer` reads this.

A Trainer run leaves `output_dir/checkpoint-N/` folders, N the optimizer step after which each was
saved: the weights (`model.safetensors` or `pytorch_model.bin`, whole or in shards; a PEFT run's adapter,
`adapter_model.safetensors`, read into the PEFT model's keys), the optimizer's state_dict
(`optimizer.pt`) and `trainer_state.json`, whose `log_history` holds the learning rate of every logged
step. What needs care is checked rather than assumed:
- the save steps are rarely evenly spaced (the last one is the run's end, whatever save_steps is, and
  save_total_limit deletes early ones), so segments take their rates by the steps in the names;
- the Trainer does not clear output_dir: every checkpoint's log must be the start of the last one's;
- Trainer builds its optimizer from two unnamed parameter groups (weights it decays, then biases and
  norms it does not), so which state is whose is rebuilt with Trainer's own rule and checked by
  counts here and by shapes when the factors are fitted;
- a log line's learning rate is its step's since transformers 4.51 and the next step's before; the
  version is in each checkpoint's config.json, and each optimizer state holds the next step's rate;
- gradient clipping scales a step's gradient (not the decay): max_grad_norm from training_args.bin (a
  pickle, read without running any of its code), each step's norm before clipping from the log;
- the data must be the run's: its size is checked against the steps the log says an epoch took.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._deepspeed import zero_folder, zero_optimizer_state
from .._warn import warn
from ..capture import layer_kind
from ..factors import indexed_by_position, not_adam
from .._passes import length
from ..trajectory import (WEIGHTS_FILES, Trajectory, check_checkpoint, is_distributed_checkpoint, load_dict, saved_weights,
                          sharded_training_state)

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def trainer_trajectory(run_dir: str | os.PathLike, model: nn.Module, data: Any, num_segments: int, *,
                       lrs: list[float] | None = None, num_examples: int | None = None) -> Trajectory:
    """See Trajectory.from_trainer."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run} is not a folder: give the Trainer's output_dir, which holds its checkpoint-N folders")
    found = sorted((int(m.group(1)), p) for p in run.iterdir()
                   if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name)))
    if not found:
        raise ValueError(f"{run} has no checkpoint-N folders: train with TrainingArguments(save_strategy='steps') "
                         "(or 'epoch') and give its output_dir")
    if any(getattr(config, "use_dora", False) for config in (getattr(model, "peft_config", None) or {}).values()):
        raise ValueError("DoRA adapters are not supported (a magnitude vector rescales each adapted layer's whole "
                         "weight, which the tracked LoRA layers do not see)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter that trains: give it as it was trained (a PEFT model loaded with "
                         "PeftModel.from_pretrained(base, folder, is_trainable=True)), so its optimizer's parameter "
                         "groups can be named")
    steps = [n for n, _ in found]
    folders = [p for _, p in found]
    logs = _trainer_states(folders, steps)
    history = logs[-1].get("log_history", [])  # the last checkpoint's log holds the earlier ones
    weights = [_weights(folder, model) for folder in folders]
    check_checkpoint(model, weights[-1], str(folders[-1]))  # before the optimizer's groups, named by the model
    settings = _training_args(folders[-1] / "training_args.bin")  # read once: a pickle, read inertly
    if settings.get("label_smoothing_factor"):
        warn(f"{run}: the run trained with label_smoothing_factor={settings['label_smoothing_factor']:g}, a loss that "
             "mixes each target with the uniform distribution: the task's loss should too (CausalLMTask's does not), "
             "or the objective attributed is not the one trained")
    _check_data_size(folders[-1], logs[-1], length(data), settings.get("gradient_accumulation_steps"))
    states = [_optimizer_state(folder, model, moments=False) for folder in folders]
    group = states[-1]["param_groups"][0]
    where = _optimizer_file(folders[-1])
    if {"momentum", "dampening"} <= set(group):  # torch's SGD
        if group.get("maximize"):
            raise ValueError(f"{where}: the SGD optimizer maximizes its objective (maximize=True), going up the "
                             "gradient: source_fast reads runs that minimise the loss")
        optimizer = "sgd"
        betas = [float(st["param_groups"][0]["momentum"]) for st in states]
        if max(betas) - min(betas) > 1e-12:  # e.g. OneCycleLR(cycle_momentum=True)
            warn(f"{folders[0].parent}: the SGD momentum changed during the run ({', '.join(f'{b:g}' for b in betas)} "
                 f"at the checkpoints): SOURCE takes one β for the run, their mean {sum(betas) / len(betas):g}")
        momentum = {"momentum": sum(betas) / len(betas), "dampening": float(group["dampening"]),
                    "nesterov": bool(group.get("nesterov", False))}
    elif not_adam(group) is None:
        # Every Adam the Trainer offers decouples its decay (adamw_torch, adamw_torch_fused, ...); torch's
        # states say so themselves since Adam and AdamW share one implementation.
        optimizer = "adam" if group.get("decoupled_weight_decay") is False else "adamw"
        momentum = {}
    else:
        kind = f"not Adam's ({not_adam(group)})" if {"betas", "eps"} <= set(group) else "neither SGD's nor Adam's"
        raise ValueError(f"{where}: the optimizer is {kind}; source_fast reads SGD, Adam and AdamW runs "
                         "(Trainer's optim='sgd', 'adamw_torch' or 'adamw_torch_fused')")
    if lrs is None:
        lrs = _logged_rates(folders[-1], history, steps, states)
    else:
        _check_rates(list(lrs), steps, states, "lrs= gives")
    return Trajectory.even(
        weights, lrs, num_segments, data, **momentum,
        weight_decay=_weight_decay(states[-1], model), num_examples=num_examples, optimizer=optimizer,
        optimizer_states=None if optimizer == "sgd" else [_optimizer_source(f, st) for f, st in zip(folders, states)],
        steps=steps,
        grad_scales=_clip_factors(folders[-1], history, steps[-1], settings.get("max_grad_norm")),
    )


def _clip_factors(folder: Path, history: list[dict], total: int, limit: int | float | None) -> list[float]:
    """How much gradient clipping scaled each step's gradient, min(1, max_grad_norm / ‖g‖) as torch's
    clip_grad_norm_ does: the log's grad_norm is the norm before clipping, max_grad_norm is in
    training_args.bin. A clipped gradient moves the weights as a smaller rate would (with Adam too: P
    comes from the clipped gradients' second moments); with momentum the buffer carries the clipped
    gradient on; the decay the optimizer adds afterwards is not clipped (Segment.decay_scale). Without
    the setting or a logged norm for every step, the steps count as unclipped."""
    norms = {int(h["step"]): h["grad_norm"] for h in history if "grad_norm" in h and "step" in h}
    if not limit or any(not isinstance(norms.get(k), (int, float)) for k in range(1, total + 1)):
        if limit:  # the norms of the steps not logged are unknown: any of them may have been clipped
            clipped = sum(isinstance(v, (int, float)) and v > limit for v in norms.values())
            warn(f"{folder}: the run clipped gradients at max_grad_norm={limit:g} ({clipped} of the {len(norms)} "
                 f"logged steps over it), but {total - len(norms)} of its {total} steps have no logged grad_norm "
                 "(TrainingArguments(logging_steps=1) logs each): every step counts as unclipped")
        return [1.0] * total
    return [min(1.0, limit / (float(norms[k]) + 1e-6)) for k in range(1, total + 1)]


class _Inert:
    """Whatever a pickle names, in place of the real thing: reading training_args.bin runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


class _InertUnpickler(pickle._Unpickler):  # the pure-Python one: its memo is a dict a crafted index cannot inflate
    def find_class(self, module, name):
        return _Inert

    def persistent_load(self, pid):
        return None


def _training_args(path: Path) -> dict[str, int | float]:
    """The positive numbers among the TrainingArguments in the Trainer's training_args.bin (a
    torch.save'd pickle of the arguments object, a few kB): max_grad_norm, gradient_accumulation_steps,
    ...; empty when it cannot be read. A file that is not that (a zip bomb, a pickle of another size)
    is not read."""
    try:
        with zipfile.ZipFile(path) as archive:
            entry = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
            if entry.file_size > 1 << 20:
                return {}
            pickled = archive.read(entry)
        state = _InertUnpickler(io.BytesIO(pickled)).load().state
        state = state[0] if isinstance(state, tuple) else state
        return {k: v for k, v in state.items() if type(v) in (int, float) and 0 < v < math.inf}
    except Exception:  # missing, another format, another layout: the settings are then not known
        return {}


def _weights(folder: Path, model: nn.Module) -> str | dict[str, Any]:
    """A checkpoint's weights: the folder of a full model (one file or shards), or a PEFT (LoRA) run's
    adapters as a state_dict."""
    if saved_weights(folder) is not None:
        return str(folder)
    if getattr(model, "peft_config", None):  # DeepSpeed saves a PEFT model's adapters whole too
        return _adapter_state(folder, model)
    if zero_folder(folder):  # DeepSpeed's: the ranks' partitions
        return str(folder)
    if any(folder.rglob("adapter_model.*")):
        raise ValueError(f"{folder} holds PEFT adapters: pass the PEFT model as it was trained (peft.get_peft_model, "
                         "or PeftModel.from_pretrained(base, folder, is_trainable=True)), not the base model")
    hint = sharded_training_state(folder)
    raise ValueError(f"{folder} has none of {', '.join(WEIGHTS_FILES)} or adapter_model.safetensors"
                     + (f": {hint}" if hint else ""))


def _adapter_state(folder: Path, model: nn.Module) -> dict[str, Any]:
    """A PEFT checkpoint as the whole model's state_dict. PEFT saves each adapter (checkpoint-N/ for
    "default", checkpoint-N/<name>/ for others) under its own keys (without the adapter's name, and
    modules_to_save without their wrapper): peft's get_peft_model_state_dict says which live tensor each
    saved key is, matched by identity. The rest, the frozen base, is the model's own tensors, shared."""
    from peft.utils import get_peft_model_state_dict

    own = model.state_dict(keep_vars=True)
    key_of = {id(v): k for k, v in own.items()}
    state = {k: v.detach() for k, v in own.items()}
    covered = set()
    for adapter in model.peft_config:
        where = folder if adapter == "default" else folder / adapter
        path = next((where / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (where / n).is_file()), None)
        if path is None:
            continue  # an adapter this run did not save; a trainable one is caught below
        saved_as = {k: key_of[id(v)] for k, v in get_peft_model_state_dict(model, state_dict=own, adapter_name=adapter).items()}
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            saved = load_file(str(path))
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        unknown = [k for k in saved if k not in saved_as]
        if unknown:
            raise ValueError(f"{path} holds weights adapter {adapter!r} of the PEFT model does not have, e.g. "
                             f"{unknown[:3]}: pass the model with the adapter configuration it was trained with")
        for k, v in saved.items():
            state[saved_as[k]] = v
            covered.add(saved_as[k])
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
    if missing:
        raise ValueError(f"{folder}: parameters that train were not saved with the adapters, e.g. {missing[:3]}, so "
                         "their values at this checkpoint are unknown: freeze them as in training, or save whole "
                         "checkpoints")
    return state


def _optimizer_file(folder: Path) -> Path:
    """optimizer.pt, or where only that is there what accelerate saves for FSDP, optimizer.bin (whole,
    FULL_STATE_DICT) or the optimizer_0 folder (the ranks' pieces, SHARDED_STATE_DICT), or DeepSpeed's
    global_stepN folder (each rank's ZeRO partition)."""
    for path in (folder / "optimizer.pt", folder / "optimizer.bin"):
        if path.is_file():
            return path
    if is_distributed_checkpoint(folder / "optimizer_0"):
        return folder / "optimizer_0"
    zero = zero_folder(folder)
    return Path(zero) if zero else folder / "optimizer.pt"  # the one to name as missing


def _optimizer_source(folder: Path, state: dict) -> dict | str:
    """What the trajectory reads Adam's moments from: the state (optimizer.pt's is memory-mapped, and
    its groups named here), or the folder of the ranks' pieces, read when its segment is fitted, one
    at a time: put together, every checkpoint's would be the model's size each."""
    path = _optimizer_file(folder)
    return str(path) if path.is_dir() else state


def _optimizer_state(folder: Path, model: nn.Module, moments: bool = True) -> dict:
    """optimizer.pt, memory-mapped (a state is twice the model), its groups named by Trainer's rule; or
    what accelerate saves for FSDP or DeepSpeed (_optimizer_file), keyed by names, whose ranks' pieces
    are put together: `moments` False reads their settings and steps only (see _optimizer_source)."""
    path = _optimizer_file(folder)
    if not path.exists():
        cause = sharded_training_state(folder) or "an incomplete checkpoint, or a run with save_only_model=True"
        raise ValueError(f"{path} is missing ({cause}): the optimizer's kind, momentum or second moments are read "
                         "from it; without it build the trajectory with Trajectory.even(..., steps=) yourself")
    if zero_folder(path):  # its own errors say what is wrong
        return indexed_by_position(zero_optimizer_state(path, str(folder), moments))
    try:
        if path.is_dir():
            saved = load_dict(str(path), str(path), "optimizer" if moments else "optimizer settings")
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = indexed_by_position(saved)
    except Exception as exc:  # a truncated or foreign file: say which
        raise ValueError(f"{path} cannot be read as an optimizer state_dict ({exc})") from exc
    groups = state["param_groups"]
    if len(groups) == 1 or all("param_names" in g for g in groups):
        return state  # one group is read in model.parameters() order, named ones by their names
    from transformers import Trainer

    # Trainer.create_optimizer: the trainable parameters it decays, then the others, each in
    # named_parameters() order. get_decay_parameter_names does not use the Trainer instance.
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    names = [[n for n in trained if n in decayed], [n for n in trained if n not in decayed]]
    sizes = [len(g["params"]) for g in groups]
    if sizes != [len(x) for x in names]:
        raise ValueError(
            f"{path}: its parameter groups hold {sizes} parameters, but Trainer's split of this model's trainable "
            f"parameters into decayed and not decayed gives {[len(x) for x in names]}: give the model as it was "
            "trained (the same parameters trainable); an optimizer of your own must be built from named "
            "parameters so its state says whose each is"
        )
    return {**state, "param_groups": [{**g, "param_names": n} for g, n in zip(groups, names)]}


def _weight_decay(state: dict, model: nn.Module) -> float | dict[str, float]:
    """The decay of each trackable layer's weight, as its group says (one number when they all agree).
    A tied weight (GPT-2's lm_head is its embedding) is named once in the groups, decays under each name."""
    groups = state["param_groups"]
    if "param_names" not in groups[0]:
        return float(groups[0]["weight_decay"])  # one group, read in parameter order
    params = dict(model.named_parameters(remove_duplicate=False))
    decay_of = {id(params[n]): float(g["weight_decay"]) for g in groups for n in g["param_names"] if n in params}
    by_module = {name: decay_of[id(m.weight)] for name, m in model.named_modules(remove_duplicate=False)
                 if layer_kind(m) is not None and id(m.weight) in decay_of}
    decays = set(by_module.values())
    return decays.pop() if len(decays) == 1 else by_module


def _trainer_states(folders: list[Path], steps: list[int]) -> list[dict]:
    """Each checkpoint's trainer_state.json, its log_history checked to be one run's: the Trainer does not
    clear output_dir, so a second run into it leaves the first's checkpoints beside its own (at other steps, or
    overwritten at the same), and their weights and optimizer states belong to another run."""
    states = []
    for folder, n in zip(folders, steps):
        path = folder / "trainer_state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path} is missing (an incomplete checkpoint?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is damaged ({exc}): an incomplete checkpoint? Move that folder out of "
                             f"{folder.parent}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not Trainer's state")
        if state.get("global_step") != n:
            raise ValueError(f"{path} records global_step {state.get('global_step')}, not {n}")
        states.append(state)
    last = states[-1].get("log_history", [])
    for folder, state in zip(folders[:-1], states[:-1]):
        history = state.get("log_history", [])
        # Training log lines of one run are the start of its later checkpoints' logs (also when it was
        # resumed from a checkpoint: the resumed run continues that checkpoint's log).
        if history != last[: len(history)]:
            raise ValueError(f"{folder.name} is not from the same run as {folders[-1].name} (their trainer_state.json "
                             f"logs differ): the Trainer does not clear output_dir, so another run's checkpoints stay "
                             f"in {folder.parent}; move them out")
    return states


def _own_step_rates(folder: Path) -> tuple[bool | None, str]:
    """Whether the transformers that wrote this checkpoint logged each step's own learning rate (4.51
    and later) or the next step's (before): (None, "") when its config.json does not say."""
    try:
        version = str(json.loads((folder / "config.json").read_text())["transformers_version"])
    except (FileNotFoundError, KeyError, TypeError, json.JSONDecodeError):
        return None, ""
    m = re.match(r"(\d+)\.(\d+)", version)
    return (None, version) if m is None else ((int(m[1]), int(m[2])) >= (4, 51), version)


def _check_rates(lrs: list[float], steps: list[int], states: list[dict], source: str) -> None:
    """Each rate against the optimizer states: a state saved after step n holds the rate of step n + 1
    (the scheduler has stepped), lrs[n]."""
    for n, state in zip(steps, states):
        saved = float(state["param_groups"][0]["lr"])
        if n < len(lrs) and not math.isclose(saved, lrs[n], rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(f"{source} {lrs[n]:g} for step {n + 1}, but checkpoint-{n}'s optimizer state holds {saved:g} "
                             "for that step: pass lrs=, the rate of every step as the run applied it")


def _check_data_size(folder: Path, state: dict, n: int | None, accumulation: int | float | None) -> None:
    """Refuses data of a size the run cannot have trained on (another stage's, say). The log's epoch
    during the first epoch is k·a/B at optimizer step k (a: gradient accumulation, from training_args.bin
    where it can be read; B: batches per epoch on each process, ceil(N/(b·w)), or floor with
    dataloader_drop_last, w processes of b examples, not recorded): only data that no process count
    explains is refused (twice the data passes as two processes). A stream (n None) has no epochs:
    the Trainer counts max_steps as one."""
    batch = state.get("train_batch_size")
    inside = [(int(h["step"]), float(h["epoch"])) for h in state.get("log_history", [])
              if isinstance(h.get("step"), int) and isinstance(h.get("epoch"), (int, float)) and 0 < h["epoch"] < 1]
    if n is None or not isinstance(batch, int) or batch < 1 or not inside:
        return
    k, epoch = max(inside)
    per_step = k / epoch  # B / a
    known = type(accumulation) is int
    for w in range(1, 1025):
        for batches in {-(-n // (batch * w)), n // (batch * w)}:
            a = accumulation if known else max(1, round(batches / per_step))
            if batches and abs(batches / a - per_step) <= 1e-3 * per_step + 0.01:
                return
    took = (f"{per_step * accumulation:g} batches of {batch} examples on each process ({per_step:g} optimizer steps at "
            f"gradient accumulation {accumulation})" if known else
            f"{per_step:g} optimizer steps, each of one or more batches of {batch} examples on each process")
    raise ValueError(f"{folder / 'trainer_state.json'}: an epoch of this run took {took}, which {n} examples cannot "
                     "give: pass the data this run trained on (another stage's data gives wrong scores)")


def _logged_rates(folder: Path, history: list[dict], steps: list[int], states: list[dict]) -> list[float]:
    """The learning rate of every step 1..T from the last checkpoint's log_history, checked against the
    optimizer states (each holds the rate of the step after it) and transformers' logging convention."""
    path = folder / "trainer_state.json"
    logged = {int(h["step"]): float(h["learning_rate"]) for h in history if "learning_rate" in h and "step" in h}
    total = steps[-1]
    have = sum(1 for k in range(1, total + 1) if k in logged)
    if have < total:
        raise ValueError(
            f"{path} records the learning rate of {have} of the {total} steps (the Trainer logs every logging_steps; "
            "TrainingArguments(logging_steps=1) records each): pass lrs=, the rate of every step, e.g. "
            "stepping the scheduler rebuilt with transformers.get_scheduler"
        )
    lrs = [logged[k] for k in range(1, total + 1)]
    if zero_folder(folder):  # accelerate's backward runs DeepSpeed's step, scheduler and all, before Trainer's
        raise ValueError(f"{path}: the run trained with DeepSpeed, whose engine steps the learning-rate scheduler "
                         "before Trainer reads the rate it logs, so the log holds each step's next rate and cannot "
                         f"give the first step's: pass lrs=, the rate of every step (the log's are steps 2 to {total + 1})")
    own, version = _own_step_rates(folder)
    if own is False:  # transformers PR 36973
        raise ValueError(f"{path}: transformers {version} logged each step's next learning rate (fixed in 4.51), so "
                         "the log cannot give the first step's: pass lrs=, the rate of every step")
    _check_rates(lrs, steps, states, f"{path}: the log gives")
    final = float(states[-1]["param_groups"][0]["lr"])  # step T + 1's rate
    if own is None and len(steps) == 1 and len(set(lrs)) > 1 and math.isclose(final, lrs[-1], rel_tol=1e-6):
        # Logged as the next step's, step T's entry would be exactly this; logged as its own, only a
        # schedule flat at its end would be. No version to decide it: ask.
        raise ValueError(f"{path}: which step each logged learning rate belongs to is not known (no config.json with "
                         "transformers_version, one checkpoint): pass lrs=, the rate of every step")
    return lrs
