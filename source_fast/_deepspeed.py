"""DeepSpeed ZeRO checkpoints: the optimizer state each rank saved (its partition of flat parameter
groups), put back together as one optimizer state_dict keyed by parameter names, the form FSDP gives a
whole state in. Read without DeepSpeed and without running pickled code.

engine.save_checkpoint(dir) writes dir/global_stepN/ and dir/latest (naming it); Trainer does this
inside each checkpoint-N/. In global_stepN/, each data-parallel rank r wrote
zero_pp_rank_r_mp_rank_00_optim_states.pt, and the model states (mp_rank_00_model_states.pt, or one
per rank with stage 3) record each parameter group's names and shapes in order (param_shapes).
- Stages 1 and 2 flatten each parameter group (its parameters one after another) and give each rank an
  equal slice; each rank records where the fragments of the parameters in its slice are
  (param_slice_mappings; without them the parameters are taken one after another over the slices).
- Stage 3 partitions every parameter by itself: each rank holds ceil(numel / ranks) of it, one
  parameter after another, in sub-groups of at most sub_group_size elements (each its own optimizer
  group, with its own step).
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
import re
import zipfile
from typing import Any

import torch
from torch import Tensor
from torch.torch_version import TorchVersion

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def zero_folder(path: Any) -> str | None:
    """The global_stepN/ folder `path` names (itself, or the one the `latest` file in it names, as in
    a Trainer's checkpoint-N/), or None where it is no ZeRO checkpoint."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    path = os.fspath(path)
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest) and not _partitions(path):
        with open(latest) as f:
            path = os.path.join(path, f.read().strip())
    return path if os.path.isdir(path) and _partitions(path) else None


def _partitions(folder: str) -> dict[int, str]:
    """{data-parallel rank: its optimizer file}; model-parallel partitions are refused."""
    found = {}
    for name in os.listdir(folder):
        m = _OPTIM_FILE.fullmatch(name)
        if m and int(m[2]) != 0:
            raise ValueError(f"{folder} holds model-parallel partitions ({name}), which are not read")
        if m:
            found[int(m[1])] = os.path.join(folder, name)
    return found


class _Inert:
    """One of DeepSpeed's objects (a fragment's address, the loss scaler) as plain data: its attributes."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


# DeepSpeed's classes in its pickles stand in as plain data (its ZeRO stage enum as the number); any other
# deepspeed.* class found is an _Inert too: torch.load(weights_only=True) runs no code but these.
_STAND_INS: dict[str, Any] = {"deepspeed.runtime.zero.config.ZeroStageEnum": int}


def _load(path: str, what: str) -> dict:
    if TorchVersion(torch.__version__) < (2, 6):  # safe_globals with stand-ins under other names
        raise RuntimeError(f"{what}: reading DeepSpeed's checkpoint {path!r} needs torch 2.6 or later")
    stand_ins = dict(_STAND_INS)
    while True:
        try:
            with torch.serialization.safe_globals([(v, k) for k, v in stand_ins.items()]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as exc:
            unknown = set(re.findall(r"GLOBAL (deepspeed\.[\w.]+)", str(exc))) - set(stand_ins)
            if not unknown:
                raise ValueError(f"{what}: cannot read DeepSpeed's file {path!r}: {exc}") from exc
            stand_ins.update(dict.fromkeys(unknown, _Inert))
        except (OSError, RuntimeError, EOFError) as exc:
            raise ValueError(f"{what}: cannot read DeepSpeed's file {path!r} (damaged or incomplete?): "
                             f"{type(exc).__name__}: {exc}") from exc


def _checkpoint(path: Any, what: str, every_rank: bool = True) -> tuple[str, list[dict], int]:
    """The global_stepN/ folder, each rank's optimizer partition in rank order (rank 0's alone without
    `every_rank`), and the ZeRO stage."""
    folder = zero_folder(path)
    files = _partitions(folder)
    first = _load(files[min(files)], what)["optimizer_state_dict"]
    counts = first["partition_count"]  # per group with stages 1 and 2
    ranks = {int(c) for c in (counts if isinstance(counts, (list, tuple)) else [counts])}
    if len(ranks) != 1 or sorted(files) != list(range(ranks.pop())):
        raise ValueError(f"{what}: {folder} holds the optimizer partitions of ranks {sorted(files)}, but they record "
                         f"{counts} ranks: some are missing")
    parts = [first] + [_load(files[r], what)["optimizer_state_dict"] for r in sorted(files)[1:] if every_rank]
    return folder, parts, int(first["zero_stage"])


def _model_states(folder: str, stage: int, rank: int, what: str) -> dict:
    """The model states file: one for all ranks with stages 1 and 2, one per rank with stage 3."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    return _load(os.path.join(folder, name), what)


def zero_optimizer_state(path: Any, what: str, moments: bool = True) -> dict:
    """The optimizer state of the ZeRO checkpoint at `path` (zero_folder), whole and keyed by names:
    {"state": {name: {"step": ..., "exp_avg_sq": ...}}, "param_groups": [{..., "params": [names]}]}.
    Adam's first moments are left out (nothing here reads them: a third of the state); all moments
    without `moments` (the settings and steps only)."""
    folder, parts, stage = _checkpoint(path, what)
    shapes = _model_states(folder, stage, 0, what)["param_shapes"]  # [{name: shape} per parameter group]
    bases = [p["optimizer_state_dict" if stage == 3 else "base_optimizer_state"] for p in parts]
    if not isinstance(bases[0], dict):  # a list of each group's state, padding cut off
        raise ValueError(f"{what}: {folder} was saved with zero_optimization.elastic_checkpoint, which keeps the "
                         "optimizer's state without its settings (betas, eps, weight decay): it is not read; save "
                         "with elastic_checkpoint false, DeepSpeed's default")
    # torch's numbering: each optimizer group lists its states (one flat partition per group, or with
    # stage 3 one per sub-group).
    group_of_state = {i: g for g, group in enumerate(bases[0]["param_groups"]) for i in group["params"]}
    pieces: dict[str, dict] = {}
    state_of: dict[str, int] = {}
    if stage == 3:  # the sub-groups hold the parameters in order: each one's place says which holds it
        named = {k: v for group in shapes for k, v in group.items()}
        # The float32 weights are laid out as the state (the n-th sub-group is the optimizer's n-th tensor):
        # they place each parameter, also for an optimizer without state (SGD without momentum).
        sizes = [t.numel() for t in parts[0]["fp32_flat_groups"]]
        state_of = {k: i for k, (i, _, _) in _stage3_places(sizes, named, len(parts), what).items()}
        pieces = {name: {} for name in named}
        first = bases[0]["state"].get(0, {})
        for key in [k for k, v in first.items() if k != "exp_avg" and _flat(v) and moments]:
            split = _stage3_split([[b["state"][i][key] for i in range(len(b["state"]))] for b in bases], named, what)
            for name, (_, t) in split.items():
                pieces[name][key] = t
        for name, i in state_of.items():  # the sub-group's step
            pieces[name].update({k: _copy(v) for k, v in bases[0]["state"].get(i, {}).items() if not _flat(v)})
    else:
        mappings = [p.get("param_slice_mappings") for p in parts]
        for g, named in enumerate(shapes):
            (i,) = bases[0]["param_groups"][g]["params"]
            pieces.update(_stage12([b["state"].get(i, {}) for b in bases], named,
                                   None if None in mappings else [m[g] for m in mappings], what, moments))
            state_of.update(dict.fromkeys(named, i))
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in bases[0]["param_groups"]]
    for name, i in state_of.items():
        groups[group_of_state[i]]["params"].append(name)
    return {"state": pieces, "param_groups": groups}


def zero_weights(path: Any, what: str, shapes_only: bool = False) -> dict[str, Tensor]:
    """The weights of the ZeRO checkpoint at `path`, a state_dict (on the meta device with
    `shapes_only`): the model states' own with stages 1 and 2 (the weights the model ran with); with
    stage 3, whose model states hold only buffers, the optimizer's float32 partitions put back together
    (as DeepSpeed's zero_to_fp32.py does), frozen parameters from each rank's fragments, tied weights
    from their twins."""
    # The other ranks' partitions only for stage 3's float32 weights: the stage and the rank count are in
    # rank 0's, the weights of stages 1 and 2 and every shape in the model states.
    folder, parts, stage = _checkpoint(path, what, every_rank=False)
    ranks = len(_partitions(folder))
    states = _model_states(folder, stage, 0, what)
    if stage > 1 and states.get("frozen_param_shapes") is None:  # stage 1 never records them
        raise ValueError(f"{what}: DeepSpeed saved {folder} without its frozen parameters (exclude_frozen_parameters, "
                         "as Trainer saves a PEFT model), so it holds no whole weights: give the weights otherwise (a "
                         "PEFT run's adapters, which Trajectory.from_trainer reads, with the base model's own)")
    if stage < 3:
        return {k: v.to("meta") if shapes_only else v for k, v in states["module"].items()}
    named = {k: v for group in states["param_shapes"] for k, v in group.items()}
    if shapes_only:
        weights = {k: torch.empty(tuple(v), device="meta") for k, v in named.items()}
    else:
        parts = _checkpoint(path, what)[1]
        flats = [[t.detach() for t in p["fp32_flat_groups"]] for p in parts]  # saved as Parameters
        weights = {k: t for k, (_, t) in _stage3_split(flats, named, what).items()}
    weights.update({k: states["module"][k] for k in states["buffer_names"]})
    frozen = states.get("frozen_param_shapes") or {}
    fragments = [] if shapes_only or not frozen else [
        _model_states(folder, stage, r, what)["frozen_param_fragments"] for r in range(ranks)]
    for name, shape in frozen.items():
        weights[name] = (torch.empty(tuple(shape), device="meta") if shapes_only else
                         torch.cat([f[name].reshape(-1) for f in fragments])[: _numel(shape)].view(tuple(shape)))
    for name, twin in (states.get("shared_params") or {}).items():
        weights[name] = weights[twin]
    return weights


def _numel(shape: Any) -> int:
    return math.prod(int(n) for n in shape)


def _flat(value: Any) -> bool:
    """A partition of a flat group (moments), not a group's scalar (its step)."""
    return isinstance(value, Tensor) and value.dim() > 0


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value


def _stage12(states: list[dict], named: dict[str, Any], mappings: list[dict] | None, what: str,
             moments: bool) -> dict[str, dict]:
    """One parameter group's state, each rank's slice of the flat group put back into its parameters."""
    out: dict[str, dict] = {name: {} for name in named}
    for key, value in states[0].items():
        if key == "exp_avg" or (_flat(value) and not moments):
            continue
        if not _flat(value):  # the group's step
            for name in named:
                out[name][key] = _copy(value)
            continue
        flats = [s[key].reshape(-1) for s in states]
        if mappings is None:  # before DeepSpeed 0.10: the parameters one after another over the slices
            whole, offset, fragments = torch.cat(flats), 0, {}
            for name, shape in named.items():
                fragments[name] = [whole[offset : offset + _numel(shape)]]
                offset += _numel(shape)
        else:
            fragments = {name: [] for name in named}
            for flat, mapping in zip(flats, mappings):
                for name, place in mapping.items():
                    fragments[name].append(flat[place.start : place.start + place.numel])
        for name, shape in named.items():
            t = torch.cat(fragments[name]) if fragments[name] else flats[0][:0]
            if t.numel() != _numel(shape):
                raise ValueError(f"{what}: DeepSpeed's partitions hold {t.numel()} values of {key} for parameter "
                                 f"{name!r}, whose shape is {tuple(shape)}")
            out[name][key] = t.view(tuple(shape))
    return out


def _stage3_places(sizes: list[int], named: dict[str, Any], ranks: int, what: str) -> dict[str, tuple[int, int, int]]:
    """Where stage 3 keeps each parameter in every rank's sub-group partitions (of `sizes` values each):
    (the sub-group's position, the start in it, the share). Each rank holds ceil(numel / ranks) values of
    every parameter, one parameter after another through the sub-groups, in order."""
    ends = list(itertools.accumulate(sizes))
    places: dict[str, tuple[int, int, int]] = {}
    offset = 0
    for name, shape in named.items():
        share = -(-_numel(shape) // ranks)
        k = next((i for i, end in enumerate(ends) if offset < end), None)
        if k is None or offset + share > ends[k]:
            raise ValueError(f"{what}: DeepSpeed's stage-3 partitions end before parameter {name!r}")
        places[name] = k, offset - (ends[k] - sizes[k]), share
        offset += share
    if offset != (ends[-1] if ends else 0):  # stage 3 pads no parameter: another model's shapes?
        raise ValueError(f"{what}: DeepSpeed's stage-3 partitions hold {ends[-1] if ends else 0} values per rank, "
                         f"but the parameters the checkpoint lists take {offset}")
    return places


def _stage3_split(flats: list[list[Tensor]], named: dict[str, Any], what: str) -> dict[str, tuple[int, Tensor]]:
    """Stage 3's parameters from each rank's sub-group partitions (flats[rank][sub-group]), with the
    position of the sub-group each is in (_stage3_places)."""
    places = _stage3_places([f.numel() for f in flats[0]], named, len(flats), what)
    return {name: (k, torch.cat([f[k].reshape(-1)[start : start + share] for f in flats])[: _numel(named[name])]
                   .view(tuple(named[name])))
            for name, (k, start, share) in places.items()}
