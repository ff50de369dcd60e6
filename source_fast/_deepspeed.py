"""DeepSpeed ZeRO checkpoints: the optimizer state each rank saved (its partition of flat parameter
groups), put back together as one optimizer state_dict keyed by parameter names, the form FSDP gives a
whole state in. Read without DeepSpeed and without running pickled code.

engine.save_checkpoint(dir) writes dir/global_stepN/ and dir/latest (naming it); Trainer does this
inside each checkpoint-N/. In global_stepN/, each data-parallel rank r wrote
zero_pp_rank_r_mp_rank_00_optim_states.pt, and the model states (mp_rank_00_model_states.pt, or one
per rank with stage 3) record each parameter group's names and shapes in order (param_shapes).
- Stages 1 and 2 flatten each parameter group (its parameters one after another) and give each rank an
  equal slice; each rank records where the fragments of the parameters in its slice are
  (param_slice_mappings, DeepSpeed 0.10 and later).
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
    if not hasattr(torch.serialization, "safe_globals"):
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


def zero_optimizer_state(path: str | os.PathLike, what: str) -> dict:
    """The optimizer state of the ZeRO checkpoint at `path` (zero_folder), whole and keyed by names:
    {"state": {name: {"step": ..., "exp_avg_sq": ...}}, "param_groups": [{..., "params": [names]}]}.
    Adam's first moments are left out (nothing here reads them: a third of the state)."""
    folder = zero_folder(path)
    files = _partitions(folder)
    first = _load(files[min(files)], what)["optimizer_state_dict"]
    counts = first["partition_count"]  # per group with stages 1 and 2
    ranks = {int(c) for c in (counts if isinstance(counts, (list, tuple)) else [counts])}
    if len(ranks) != 1 or sorted(files) != list(range(ranks.pop())):
        raise ValueError(f"{what}: {folder} holds the optimizer partitions of ranks {sorted(files)}, but they record "
                         f"{counts} ranks: some are missing")
    parts = [first] + [_load(files[r], what)["optimizer_state_dict"] for r in sorted(files)[1:]]
    stage = int(first["zero_stage"])
    model_file = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3
                              else "mp_rank_00_model_states.pt")
    shapes = _load(model_file, what)["param_shapes"]  # [{name: shape} per parameter group]
    bases = [p["optimizer_state_dict" if stage == 3 else "base_optimizer_state"] for p in parts]
    # torch's numbering: each optimizer group lists its states (one flat partition per group, or with
    # stage 3 one per sub-group).
    group_of_state = {i: g for g, group in enumerate(bases[0]["param_groups"]) for i in group["params"]}
    if stage == 3:  # the sub-groups hold the parameters in order: each one's place says which holds it
        named = {k: v for group in shapes for k, v in group.items()}
        pieces, state_of = _stage3(bases, named, what)
    else:
        pieces, state_of = {}, {}
        mappings = [p.get("param_slice_mappings") for p in parts]
        for g, named in enumerate(shapes):
            (i,) = bases[0]["param_groups"][g]["params"]
            pieces.update(_stage12([b["state"][i] for b in bases], named,
                                   None if None in mappings else [m[g] for m in mappings], what))
            state_of.update(dict.fromkeys(named, i))
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in bases[0]["param_groups"]]
    for name, i in state_of.items():
        groups[group_of_state[i]]["params"].append(name)
    return {"state": pieces, "param_groups": groups}


def _numel(shape: Any) -> int:
    return math.prod(int(n) for n in shape)


def _stage12(states: list[dict], named: dict[str, Any], mappings: list[dict] | None, what: str) -> dict[str, dict]:
    """One parameter group's state, each rank's slice of the flat group put back into its parameters."""
    out: dict[str, dict] = {name: {} for name in named}
    for key, value in states[0].items():
        if key == "exp_avg":
            continue
        if not isinstance(value, Tensor) or value.dim() == 0:  # the group's step
            for name in named:
                out[name][key] = value.clone() if isinstance(value, Tensor) else value
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


def _stage3(bases: list[dict], named: dict[str, Any], what: str) -> tuple[dict[str, dict], dict[str, int]]:
    """Stage 3's state, and the state (sub-group) each parameter is in: each rank holds ceil(numel / ranks)
    values of every parameter, one parameter after another through the sub-groups, in order."""
    ranks = len(bases)
    subgroups = sorted(bases[0]["state"])
    sizes = [bases[0]["state"][k]["exp_avg_sq" if "exp_avg_sq" in bases[0]["state"][k] else "exp_avg"].numel()
             for k in subgroups]
    ends = list(itertools.accumulate(sizes))
    out: dict[str, dict] = {}
    state_of: dict[str, int] = {}
    offset = 0
    for name, shape in named.items():
        numel = _numel(shape)
        share = -(-numel // ranks)
        k = next((i for i, end in enumerate(ends) if offset < end), None)
        if k is None or offset + share > ends[k]:
            raise ValueError(f"{what}: DeepSpeed's stage-3 partitions end before parameter {name!r}")
        start = offset - (ends[k] - sizes[k])
        state: dict[str, Any] = {}
        for key, value in bases[0]["state"][subgroups[k]].items():
            if key == "exp_avg":
                continue
            if not isinstance(value, Tensor) or value.dim() == 0:
                state[key] = value.clone() if isinstance(value, Tensor) else value
                continue
            flats = [b["state"][subgroups[k]][key].reshape(-1) for b in bases]
            state[key] = torch.cat([f[start : start + share] for f in flats])[:numel].view(tuple(shape))
        out[name], state_of[name] = state, subgroups[k]
        offset += share
    return out, state_of
