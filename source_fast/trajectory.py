"""What SOURCE needs to know about training: checkpoints, data and learning rates, per segment."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Collection, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ._deepspeed import zero_folder, zero_weights
from ._warn import warn

Optimizer = Literal["sgd", "adam", "adamw"]
Checkpoint = dict[str, Tensor] | str | os.PathLike


Part = Literal["weights", "optimizer", "optimizer settings"]  # the last: without the moments


def load_state_dict(checkpoint: Checkpoint, what: str) -> dict[str, Tensor]:
    """A model's state_dict from a dict, a file (.safetensors, or anything torch.load reads) or a
    save_pretrained folder."""
    if isinstance(checkpoint, dict):
        return _tensors_only(checkpoint, what)
    return _tensors_only(load_dict(checkpoint, what, "weights"), f"{what} ({os.fspath(checkpoint)!r})")


def load_dict(checkpoint: Checkpoint, what: str, part: Part | None = None) -> dict[str, Any]:
    """The dict a file holds (a state_dict, an optimizer's), or the dict given; a checkpoint saved in
    shards (save_pretrained's max_shard_size) is read into one state_dict. `part`: what is wanted of a
    torch.distributed.checkpoint folder that holds both (_read_distributed)."""
    if isinstance(checkpoint, dict):
        return checkpoint
    return merged_shards(checkpoint, what, lambda path: _read_file(path, what, part))


def _read_file(path: str, what: str, part: Part | None = None) -> dict[str, Any]:
    if is_distributed_checkpoint(path):
        return _read_distributed(path, what, part=part)
    if zero_folder(path):
        return zero_weights(path, what)
    with readable(path, what):
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{what}: {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _tensors_only(state: Any, what: str) -> dict[str, Tensor]:
    """`state` if it is a state_dict (names to tensors); else an error that says what it holds, and
    where the weights are when they are one level down (a training script's {"model": ..., "step": ...})."""
    if not isinstance(state, dict):
        raise TypeError(f"{what} holds a {type(state).__name__}, not a state_dict")
    # A module's get_extra_state() may save anything under its `_extra_state` key.
    odd = [k for k, v in state.items() if not isinstance(v, Tensor) and not str(k).endswith("_extra_state")]
    if odd:
        inner = [k for k in odd if isinstance(state[k], dict) and state[k]
                 and all(isinstance(v, Tensor) for v in state[k].values())]
        kinds = ", ".join(sorted({type(state[k]).__name__ for k in odd}))
        raise ValueError(f"{what} is not a state_dict: {odd[:4]} hold {kinds}, not tensors"
                         + (f"; the weights look to be under {inner[0]!r}: give checkpoint[{inner[0]!r}] (or save "
                            "model.state_dict() alone)" if inner else ""))
    return state


# A save_pretrained folder's weights, in the order from_pretrained looks for them; then accelerate's
# FSDP state_dicts: whole in one file (FULL_STATE_DICT), or a torch.distributed.checkpoint folder of
# the ranks' pieces (SHARDED_STATE_DICT).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                 "pytorch_model_fsdp.bin", "pytorch_model_fsdp_0")


def saved_weights(folder: str | os.PathLike) -> str | None:
    """The first of WEIGHTS_FILES a folder holds, or None."""
    for name in WEIGHTS_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path) or is_distributed_checkpoint(path):
            return path
    return None


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    """A folder torch.distributed.checkpoint saved (its .metadata says where each rank's pieces are)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def _read_distributed(path: str, what: str, shapes_only: bool = False, part: Part | None = None) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder read whole in this process, nested as it was saved (FSDP's
    sharded state_dicts: each rank's pieces, put together by the checkpoint's own metadata). Adam's
    first moments, which nothing here reads, are left out: they are half of an optimizer state's
    folder. Saved Python values (an optimizer's hyperparameters) are read as torch.load(weights_only=True)
    reads them, running no pickled code. With `shapes_only`, tensors come on the meta device (no data
    read) and other values are left out. Keys that wrap everything are taken off (accelerate saves each
    state under one, {"model": ...}, {"optimizer": ...}; torch's recipe all under {"app": ...}); of a
    folder that holds both, `part` reads only the weights (under "model") or the optimizer's state (the
    one entry with "param_groups"; "optimizer settings": without its moments)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    values: dict[str, Any] = {}  # load() puts back what it was given for them: kept apart

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            values[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    with readable(path, what):
        reader = dcp.FileSystemReader(path)
        metadata = reader.read_metadata()
        saved = metadata.planner_data or {}  # each flat key's path in the nested dict saved
        places = {key: tuple(saved.get(key, (key,))) for key in metadata.state_dict_metadata}
        prefix = _wanted(list(places.values()), part)
        places = {key: place[len(prefix) :] for key, place in places.items() if place[: len(prefix)] == prefix}
        flat: dict[str, Any] = {}
        for key, place in places.items():
            item = metadata.state_dict_metadata[key]
            moment = len(place) >= 3 and place[-3] == "state" and place[-1] != "step"
            if moment and (place[-1] == "exp_avg" or part == "optimizer settings"):
                continue
            if isinstance(item, TensorStorageMetadata):
                flat[key] = torch.empty(item.size, dtype=item.properties.dtype, device="meta" if shapes_only else "cpu")
            elif not shapes_only:
                flat[key] = None
        if not shapes_only:
            with warnings.catch_warnings():  # that it reads in one process, as asked
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                try:
                    dcp.load(flat, storage_reader=reader, planner=Planner(flatten_state_dict=False), no_dist=True)
                except CheckpointException as exc:  # a BaseException, holding this process's own error
                    error = next(iter(exc.failures.values()), None)
                    error = error[0] if isinstance(error, tuple) else error
                    raise (error if isinstance(error, Exception) else RuntimeError(str(exc))) from exc
            flat.update(values)
    nested: dict[Any, Any] = {}
    for key, value in flat.items():
        node = nested
        for step in places[key][:-1]:
            node = node.setdefault(step, {})
        node[places[key][-1]] = value
    return _optimizer_form(_as_lists(nested))


def _wanted(places: list[tuple], part: Part | None) -> tuple:
    """The path, in a torch.distributed.checkpoint's nested dict, of what _read_distributed reads: below
    the keys that wrap everything (never into an optimizer's own entries, nor a list's items)."""
    prefix: tuple = ()
    while (places and all(len(p) > len(prefix) + 1 for p in places) and len({p[len(prefix)] for p in places}) == 1
           and places[0][len(prefix)] not in ("state", "param_groups") and isinstance(places[0][len(prefix)], str)):
        prefix += (places[0][len(prefix)],)
    below = {p[len(prefix)]: set() for p in places}
    for p in places:
        below[p[len(prefix)]].update(p[len(prefix) + 1 : len(prefix) + 2])
    if part == "weights" and any(below.values()) and below.get("model"):
        return prefix + ("model",)
    # An optimizer without state (SGD without momentum) saves its param_groups only.
    optimizers = [k for k, keys in below.items() if "param_groups" in keys]
    if part in ("optimizer", "optimizer settings") and "param_groups" not in below and len(optimizers) == 1:
        return prefix + (optimizers[0],)
    return prefix


def _optimizer_form(node: Any) -> Any:
    """An optimizer state_dict as torch keeps it: its state keyed by the numbers its param_groups list
    (the checkpoint's nested keys are strings), and an empty state where none was saved."""
    if not isinstance(node, dict):
        return node
    node = {k: _optimizer_form(v) for k, v in node.items()}
    groups = node.get("param_groups")
    if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
        state = node.get("state", {})
        numbered = any(isinstance(i, int) for g in groups for i in g.get("params", []))
        node["state"] = {int(k) if numbered and str(k).isdigit() else k: v for k, v in state.items()}
    return node


def _as_lists(node: Any) -> Any:
    """The nested dicts _read_distributed builds, with those keyed 0..n-1 (a saved list's items) as lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _as_lists(v) for k, v in node.items()}
    return [node[i] for i in range(len(node))] if node and set(node) == set(range(len(node))) else node


def weights_path(checkpoint: Checkpoint, what: str) -> str:
    """The file a checkpoint names: itself, or a save_pretrained folder's weights file or shard index (a
    torch.distributed.checkpoint folder is read as one file)."""
    if isinstance(checkpoint, nn.Module):
        raise TypeError(f"{what} is a {type(checkpoint).__name__} module: give its weights, "
                        "{k: v.clone() for k, v in module.state_dict().items()}, or a file of them")
    path = os.fspath(checkpoint)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: checkpoint file {path!r} does not exist")
    if not os.path.isdir(path) or is_distributed_checkpoint(path):
        return path
    found = saved_weights(path) or (path if zero_folder(path) else None)  # DeepSpeed's: read as one file
    if found is None:
        adapters = os.path.isfile(os.path.join(path, "adapter_model.safetensors"))
        raise IsADirectoryError(f"{what}: {path!r} is a folder without model weights (looked for "
                                f"{', '.join(WEIGHTS_FILES)}): " + (
                                    "it holds PEFT adapters, which Trajectory.from_trainer reads into the PEFT "
                                    "model (or load them and pass its state_dict)" if adapters else
                                    sharded_training_state(path) or "pass the weights file"))
    return found


def sharded_training_state(folder: str | os.PathLike) -> str:
    """What to do with a checkpoint that FSDP or DeepSpeed saved in the ranks' pieces, or ''."""
    names = os.listdir(folder)
    if any(re.fullmatch(r"(pytorch_model_fsdp|optimizer)(_\d+)?_rank\d+\.bin", n) for n in names):
        return ("it holds FSDP's state in a file per rank (LOCAL_STATE_DICT, or accelerate's use_dcp=False), which is "
                "not read: save with fsdp_state_dict_type SHARDED_STATE_DICT (through torch.distributed.checkpoint) "
                "or FULL_STATE_DICT")
    broken = [n for n in names if n.startswith(("pytorch_model_fsdp_", "optimizer_"))
              and os.path.isdir(os.path.join(folder, n)) and not is_distributed_checkpoint(os.path.join(folder, n))]
    if broken:
        return (f"its FSDP state folder {broken[0]} has no .metadata, which torch.distributed.checkpoint writes last "
                "(an interrupted save?)")
    if any(n.startswith("global_step") for n in names) or "zero_to_fp32.py" in names:
        tag = None
        if "latest" in names:
            with open(os.path.join(folder, "latest")) as f:
                tag = f.read().strip()
        if tag is not None and not os.path.isdir(os.path.join(folder, tag)):
            return f"it holds a DeepSpeed checkpoint whose file `latest` names {tag!r}, which is not there"
        return ("it holds a DeepSpeed checkpoint without ZeRO's partitions (global_stepN/zero_pp_rank_*_optim_states.pt,"
                " N as its file `latest` says): one of ZeRO stage 0, or an incomplete one, which is not read")
    return ""


def checkpoint_files(checkpoint: Checkpoint, what: str) -> list[str]:
    """The files a checkpoint is read from: its weights file, or the shards its index lists, in order."""
    path = weights_path(checkpoint, what)
    return [path] if not path.endswith(".index.json") else _shards(path, _shard_index(path, what), what)


def _shards(path: str, index: dict[str, str], what: str) -> list[str]:
    """The shards an index lists, in its order, each checked to exist."""
    shards = list(dict.fromkeys(index.values()))
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{what}: shard {shard!r}, listed in {path!r}, does not exist")
    return shards


def _shard_index(path: str, what: str) -> dict[str, str]:
    """A sharded checkpoint's index: {tensor name: the path of the shard holding it}."""
    try:
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        if not weight_map or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise ValueError("its weight_map is empty or not tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{what}: cannot read the shard index {path!r}: {type(exc).__name__}: {exc}") from exc
    folder = os.path.dirname(path)
    return {k: os.path.normpath(os.path.join(folder, v)) for k, v in weight_map.items()}


def merged_shards(checkpoint: Checkpoint, what: str, read: Callable[[str], Mapping[str, Any]]) -> dict[str, Any]:
    """read(file) of a checkpoint's file, or of each of its shards in one dict, each shard checked to
    hold what the index lists (a shard left from another save is not mixed in)."""
    path = weights_path(checkpoint, what)
    if not path.endswith(".index.json"):
        return dict(read(path))
    index = _shard_index(path, what)
    merged: dict[str, Any] = {}
    for shard in _shards(path, index, what):  # the index read once
        part = read(shard)
        listed = {k for k, v in index.items() if v == shard}
        if set(part) != listed:
            odd = sorted(set(part) ^ listed)
            raise ValueError(f"{what}: shard {shard!r} does not hold the tensors {path!r} lists for it ({odd[:3]} "
                             "differ): a shard of another save?")
        merged.update(part)
    return merged


@contextlib.contextmanager
def readable(path: str, what: str) -> Iterator[None]:
    """The readers' own errors (a truncated zip, a bad safetensors header) name neither the file nor the
    checkpoint: say both."""
    try:
        yield
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch's error is formatted for a terminal
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError:
            head = b""
        if head.startswith(b"version https://git-lfs"):
            raise ValueError(f"{what}: checkpoint file {path!r} is a Git LFS pointer, not the weights (a clone "
                             "made without Git LFS: run `git lfs pull` there)") from exc
        # torch.save writes a zip, its legacy format a pickle (protocol 2 and up: byte 0x80 first); safetensors
        # begins with its header's length and the header's JSON.
        if head and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[8:10] == b'{"'):
            raise ValueError(f"{what}: checkpoint file {path!r} is neither a torch.save file nor safetensors (it "
                             f"begins {head[:16]!r})") from exc
        if "Weights only load failed" in text:  # torch.load(weights_only=True) runs no pickled code
            raise ValueError(f"{what}: checkpoint file {path!r} holds pickled objects (a whole nn.Module, an "
                             "optimizer, numpy arrays?), which are not loaded because loading them runs their code: "
                             "save model.state_dict() instead") from exc
        raise ValueError(f"{what}: cannot read checkpoint file {path!r} (damaged or incomplete?): "
                         f"{type(exc).__name__}: {text}") from exc


def load_into(model: nn.Module, checkpoint: Checkpoint, what: str) -> None:
    """Loads a checkpoint into `model` in place, with an error that names the checkpoint and the keys."""
    own = model.state_dict()
    state = _with_tied_weights(_model_keys(load_state_dict(checkpoint, what), own), own)
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, own, what)
    # A diverged run's weights would surface as a NaN loss, blamed on a batch. Trained parameters only:
    # buffers and frozen parameters may hold -inf on purpose (attention masks). float8 has no isfinite.
    trained = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    bad = next((k for k, v in state.items() if k in trained and v.is_floating_point() and not bool(
        (v if v.element_size() > 1 else v.to(torch.float16)).isfinite().all())), None)
    if bad is not None:
        raise FloatingPointError(f"{what}: its weight {bad!r} holds NaN or infinite values (did training diverge "
                                 "before this checkpoint?)")
    model.load_state_dict(state)


def check_checkpoint(model: nn.Module, checkpoint: Checkpoint, what: str) -> None:
    """load_into's checks without loading the weights: a file's header (safetensors) or its tensors
    memory-mapped (torch.save's zip format), so every checkpoint of a trajectory is checked before
    the first pass rather than when its pass comes, hours later."""
    own = model.state_dict()
    if isinstance(checkpoint, dict):
        shapes = {k: tuple(v.shape) for k, v in _tensors_only(checkpoint, what).items()}
    else:
        shapes = merged_shards(checkpoint, what, lambda path: _file_shapes(path, what))
    _check_shapes(_with_tied_weights(_model_keys(shapes, own), own), own, what)


def _file_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    if is_distributed_checkpoint(path):
        state = _read_distributed(path, what, shapes_only=True, part="weights")
        return {k: tuple(v.shape) for k, v in _tensors_only(state, f"{what} ({path!r})").items()}
    if zero_folder(path):
        return {k: tuple(v.shape) for k, v in zero_weights(path, what, shapes_only=True).items()}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with readable(path, what), safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if zipfile.is_zipfile(path):
        with readable(path, what):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    else:  # torch's legacy format cannot be mapped (a damaged zip lands here too): read it whole
        state = _read_file(path, what)
    return {k: tuple(v.shape) for k, v in _tensors_only(state, f"{what} ({path!r})").items()}


def _check_shapes(shapes: dict[str, tuple[int, ...]], own: dict[str, Tensor], what: str) -> None:
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            + _prefix_hint(missing, unexpected)
        )
    for key, shape in shapes.items():
        if shape != tuple(own[key].shape):
            raise ValueError(f"{what}: {key!r} has shape {shape} in the checkpoint but {tuple(own[key].shape)} in the model")


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """The model's names carry one leading prefix the checkpoint's lack (a wrapper around the module that
    was trained): said only where stripping it names the checkpoint's tensors (a tied weight a file
    stores once may stay missing). The other way round is read (_model_keys)."""
    prefix = extra_prefix(missing, set(unexpected))
    return (f"; the model's names carry the prefix {prefix!r} the checkpoint's lack: give the module inside the "
            f"model, whose names lack it (model.{prefix[:-1]}?)") if prefix and unexpected else ""


def extra_prefix(names: Collection[str], other: Container[str]) -> str:
    """The one leading prefix every name carries (a LightningModule's attribute, `net.`) where stripping it
    names only the other side's: saved names read under the model's, never guessed; "" otherwise."""
    prefix = next(iter(names), "").partition(".")[0] + "."
    if prefix == "." or all(n in other for n in names):
        return ""
    return prefix if all(n.startswith(prefix) and n[len(prefix):] in other for n in names) else ""


def unwrapped_name(name: str) -> str:
    """A parameter's name without the prefixes of wrappers: DDP's `module.`, torch.compile's `_orig_mod.`."""
    while name.startswith(("module.", "_orig_mod.")):  # in any order: torch.compile(DDP(model)) is both
        name = name.partition(".")[2]
    return name


def _model_keys(state: dict[str, Any], own: dict[str, Tensor]) -> dict[str, Any]:
    """`state` under the model's names where the two differ only by wrappers' prefixes (a checkpoint of
    a DDP or torch.compile'd model for the bare model, or the other way round), or by one prefix all the
    checkpoint's names carry (a LightningModule's attribute), as optimizer states are read."""
    if set(state) <= set(own):
        return state
    own_by_bare = {unwrapped_name(k): k for k in own}
    renamed = {own_by_bare.get(unwrapped_name(k), k): v for k, v in state.items()}
    if len(own_by_bare) == len(own) and len(renamed) == len(state) and set(renamed) <= set(own):
        return renamed
    prefix = extra_prefix(state, own)
    return {k[len(prefix):]: v for k, v in state.items()} if prefix else state


def _with_tied_weights(state: dict[str, Any], own: dict[str, Tensor]) -> dict[str, Any]:
    """`state` (tensors or their shapes) plus the model's tied duplicates it leaves out: Hugging
    Face's save_pretrained stores one of weights that share storage (GPT-2's lm_head.weight is
    transformer.wte.weight), and the model's load would refill it from the other anyway."""
    missing = set(own) - set(state)
    if not missing:
        return state
    by_storage = {}
    for key, value in own.items():
        if key in state:
            by_storage.setdefault((value.data_ptr(), tuple(value.shape), value.stride()), key)
    filled = dict(state)
    for key in missing:
        value = own[key]
        twin = by_storage.get((value.data_ptr(), tuple(value.shape), value.stride()))
        if twin is not None and value.numel() > 0:
            filled[key] = state[twin]
    return filled


def _storages(obj: Any) -> set[tuple]:
    """Where the tensors of an in-memory state_dict (optimizer states: nested) keep their data: the
    memory each one views (not its storage: rows of one stacked history are different checkpoints)."""
    if isinstance(obj, Tensor):
        return {(obj.data_ptr(), tuple(obj.shape), obj.stride())} if obj.numel() else set()
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return set().union(*(_storages(v) for v in obj)) if obj else set()
    return set()


def _check_saved_copies(saved: list[tuple[str, Any]], fix: str, steps: bool = False) -> None:
    """Refuses two in-memory states whose tensors are all the same memory: state_dict() returns
    references to the live tensors, so states kept without a copy all hold the weights (or moments)
    training ended with, and SOURCE would silently model another run. (Some shared tensors, such as
    frozen weights kept once, are fine.) With `steps`, optimizer states that share a step counter are
    refused too: FSDP's whole state gathers fresh moments but hands out the optimizer's live steps."""
    seen: dict[frozenset[tuple], str] = {}
    counters: dict[tuple, str] = {}
    objects = set()
    for what, state in saved:
        if isinstance(state, (str, os.PathLike)) or id(state) in objects:  # one object given twice is one state
            continue
        objects.add(id(state))
        ptrs = frozenset(_storages(state))
        if not ptrs:
            continue
        per_param = state.get("state", {}) if steps and isinstance(state, Mapping) else {}
        mine = _storages([s.get("step") for s in per_param.values() if isinstance(s, Mapping)])
        twin = next((counters[p] for p in mine if p in counters), None)
        counters.update(dict.fromkeys(mine, what))
        twin = twin or next((other for key, other in seen.items() if ptrs <= key or key <= ptrs), None)
        if twin is not None:
            raise ValueError(f"{twin} and {what} are the same tensors in memory: a state_dict holds references to the "
                             f"live tensors, so keep a copy of each as it is saved: {fix}")
        seen[ptrs] = what


def _rates(lrs: Sequence[float], what: str, name: str = "learning rates") -> list[float]:
    """Per-step values (learning rates, gradient scales) as floats; a negative one is refused even when
    the sum is not."""
    if isinstance(lrs, (numbers.Real, str)) or (isinstance(lrs, Tensor) and lrs.dim() == 0):
        raise TypeError(f"{what}: {name} must be one number per step (a list), got the single value {lrs!r}")
    odd = next((k for k, x in enumerate(lrs) if isinstance(x, bool) or not (
        isinstance(x, numbers.Real) or (isinstance(x, Tensor) and x.dim() == 0))), None)
    if odd is not None:
        raise TypeError(f"{what}: {name} must be one number per step, step {odd} has {lrs[odd]!r}")
    rates = [float(x) for x in lrs]
    bad = [k for k, x in enumerate(rates) if not (math.isfinite(x) and x >= 0)]
    if bad:
        raise ValueError(f"{what}: {name} must be >= 0 and finite, step {bad[0]} has {rates[bad[0]]}")
    return rates


def _steps(steps: Sequence[int], n_ckpt: int, n_steps: int) -> list[int]:
    """Checkpoints' save steps for Trajectory.even: integers, increasing, the last one the run's end."""
    steps = list(steps)
    if len(steps) != n_ckpt or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in steps):
        raise ValueError(f"Trajectory.even: steps must be {n_ckpt} integers, one per checkpoint, got {steps!r}")
    if steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"Trajectory.even: steps must increase from 1 or more (a checkpoint is saved after a step), "
                         f"got {steps}")
    if steps[-1] != n_steps:
        raise ValueError(f"Trajectory.even: the last checkpoint was saved after step {steps[-1]}, but lrs has "
                         f"{n_steps} rates: give the rates of the steps up to the last checkpoint (the final weights)")
    return [int(k) for k in steps]


def _scales(grad_scales: Sequence[float] | None, n_steps: int) -> list[float]:
    if grad_scales is None:
        return [1.0] * n_steps
    if len(grad_scales) != n_steps:
        raise ValueError(f"Trajectory.even: {len(grad_scales)} grad_scales for {n_steps} learning rates: give one per step")
    scales = _rates(grad_scales, "Trajectory.even", "grad_scales")
    if max(scales, default=0.0) > 1:
        warn(f"Trajectory.even: grad_scales go up to {max(scales):g}, and clipping only shrinks gradients, "
             "min(1, max_norm/‖g‖): given the norms clip_grad_norm_ returns instead?")
    return scales


def _moved(lrs: list[float], momentum: float, dampening: float, nesterov: bool, continued: bool) -> list[float]:
    """SGD's per-step rates as SOURCE counts them: (1 − β) times how far step k's gradient moved the
    weights by the run's end, so that a segment's horizon c/(1 − β) is the sum of those distances.
    torch's SGD puts the first gradient into an empty buffer as it is (not when `continued`) and every
    later one times 1 − d, and steps by η_i·buffer (heavy ball) or η_i·(g_i + β·buffer) (Nesterov);
    the buffer carries step k's gradient on at the later steps' rates: s_k = Σ_{i≥k} η_i β^{i−k}. The
    run's last ~1/(1 − β) gradients were still in the buffer when training stopped (on a 32-step GPT-2
    run with β = 0.9, counting every step as η/(1 − β) put SOURCE's scale against the exact derivative
    at 1.34; this, at 0.99), and a warm-up's zero-rate first step still moves the weights through it."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Trajectory.even: momentum must be in [0, 1), got {momentum}")
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"Trajectory.even: dampening must be in [0, 1], got {dampening}")
    if nesterov and (not momentum or dampening):
        raise ValueError("Trajectory.even: Nesterov momentum needs momentum > 0 and dampening 0 (as torch's SGD)")
    if not momentum:  # no buffer: torch ignores dampening
        return list(lrs)
    moved, carried = [], 0.0
    for k in reversed(range(len(lrs))):
        carried = lrs[k] + momentum * carried
        into_buffer = 1.0 if k == 0 and not continued else 1.0 - dampening
        moved.append(lrs[k] + momentum * carried if nesterov else into_buffer * carried)
    return [(1.0 - momentum) * m for m in reversed(moved)]


class Segment:
    """A stretch of training whose curvature and gradients SOURCE treats as stationary.

    checkpoints: state_dicts or paths saved inside the segment, in training order: .safetensors or
        torch.save files, or save_pretrained folders (whole or in shards, or the shards' *.index.json;
        tied weights stored once); names carrying DDP's `module.` or torch.compile's `_orig_mod.`
        match the model's bare ones, and the other way round
    data: the examples the segment trained on: a dataset (len() is N_ℓ), a re-iterable stream of
        examples (an IterableDataset; give num_examples) or a DataLoader that reads in order;
        multi-stage training gives each stage's segments that stage's data
    num_examples: N_ℓ, needed when `data` is a stream (fit_factors checks it against what it reads)
    lr_sum: c_ℓ = Σ η_k over the segment's steps (warm-up and decay included), or
    lrs: the per-step learning rates, summed for you (give exactly one of the two)
    momentum: SGD's momentum β; the effective horizon is c/(1−β). `lrs` are summed as given: pass
        each step's rate as far as the buffer carried its gradient by the run's end, (1 − β) Σ_{i≥k}
        η_i β^{i−k} (the last steps count less), which Trajectory.even computes from the raw rates
        (with torch's dampening and Nesterov too)
    optimizer: "sgd", "adam" (L2 penalty inside the gradient) or "adamw" (decoupled decay)
    optimizer_states: for adam/adamw, the optimizer state_dicts (or files) saved with each
        checkpoint; their exp_avg_sq give the diagonal preconditioner P = 1/(√v̂ + ε). States are
        matched to parameters by the names torch records when the optimizer is built from named
        parameters (needed with several parameter groups), else in model.parameters() order; FSDP's
        whole state (keyed by names: get_optimizer_state_dict(full_state_dict=True)) is read too, and
        its ranks' pieces (a torch.distributed.checkpoint folder), and DeepSpeed ZeRO's (the folder
        engine.save_checkpoint wrote into, or its global_stepN/)
    weight_decay: SGD: adds wd to every curvature eigenvalue. Adam (L2 in the gradient): adds wd to
        the curvature, inside P's scope, σ = p̃(Λ + wd). AdamW (decoupled): adds wd outside it,
        σ = p̃Λ + wd (see scoring._segment_scales). For adam/adamw
        it must be the decay the optimizer states record for every tracked weight (fit_factors
        checks; torch's AdamW defaults to 0.01). A number for every tracked module, or a dict
        {module name: decay} when they differ (per-layer parameter groups)
    decay_scale: how much longer the decay acted than the loss gradient, Σ η / Σ η·(clip factor):
        gradient clipping shrinks the loss gradient only, not the decay the optimizer adds after it
        (Trajectory.even computes it from grad_scales), so the decay enters as wd·decay_scale
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        data: Any,
        *,
        lr_sum: float | None = None,
        lrs: Sequence[float] | None = None,
        momentum: float = 0.0,
        optimizer: Optimizer = "sgd",
        optimizer_states: Sequence[Any] | None = None,
        weight_decay: float | Mapping[str, float] = 0.0,
        num_examples: int | None = None,
        decay_scale: float = 1.0,
    ):
        from ._passes import length

        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("Segment has no checkpoints; give at least one (the weights at the segment's end)")
        if (lr_sum is None) == (lrs is None):
            raise ValueError("Segment needs exactly one of lr_sum= (Σ η over its steps) or lrs= (per-step rates)")
        if lrs is not None:
            lr_sum = sum(_rates(lrs, "Segment lrs"))
        assert lr_sum is not None
        # c = 0 is a frozen stretch (or a schedule decayed to 0): S̄ = I and r̄ = 0, well defined.
        if not math.isfinite(lr_sum) or lr_sum < 0:
            raise ValueError(f"Segment learning-rate sum must be >= 0 and finite, got {lr_sum}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Segment momentum must be in [0, 1), got {momentum}")
        if optimizer not in get_args(Optimizer):
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: {sorted(get_args(Optimizer))}")
        decays = list(weight_decay.values()) if isinstance(weight_decay, Mapping) else [weight_decay]
        if not all(math.isfinite(float(w)) and float(w) >= 0 for w in decays):
            raise ValueError(f"Segment weight_decay must be >= 0 and finite, got {weight_decay}")
        if not (math.isfinite(decay_scale) and decay_scale > 0):
            raise ValueError(f"Segment decay_scale must be > 0 and finite, got {decay_scale}")
        if optimizer == "sgd":
            if optimizer_states is not None:
                raise ValueError("optimizer_states are only used with optimizer='adam' or 'adamw'")
        else:
            if momentum:
                raise ValueError("momentum applies to SGD; Adam's moments come from optimizer_states")
            if optimizer_states is None or len(optimizer_states) != len(checkpoints):
                raise ValueError(
                    f"optimizer={optimizer!r} needs one optimizer state per checkpoint "
                    f"({len(checkpoints)}), got {0 if optimizer_states is None else len(optimizer_states)}"
                )
        if data is None:
            raise ValueError("Segment data is None: give the examples this segment trained on")
        n = length(data)
        if n is None and num_examples is None:
            raise ValueError(
                f"Segment data is a stream ({type(data).__name__}, read front to back, not indexed): give "
                "num_examples=, the number of examples it yields (N_ℓ in the scores' 1/N)"
            )
        if n is not None and num_examples is not None and n != num_examples:
            raise ValueError(f"Segment num_examples={num_examples} but its data has {n} examples")
        n = n if n is not None else num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Segment data is empty or num_examples is not a positive integer: {n!r}")
        self.checkpoints = checkpoints
        self.data = data
        self.lr_sum = float(lr_sum)
        self.momentum = float(momentum)
        self.optimizer: Optimizer = optimizer
        self.optimizer_states = None if optimizer_states is None else list(optimizer_states)
        self.weight_decay: float | dict[str, float] = (
            {str(k): float(w) for k, w in weight_decay.items()} if isinstance(weight_decay, Mapping) else float(weight_decay)
        )
        self.num_examples = n
        self.decay_scale = float(decay_scale)
        # Set by Trajectory.even: (its run, the step each checkpoint was saved after), which fit_factors
        # checks against the step counts Adam's states record.
        self.saved_after: tuple[object, list[int]] | None = None

    def decay(self, module: str) -> float:
        """The weight decay this segment applied to tracked module `module`."""
        if not isinstance(self.weight_decay, dict):
            return self.weight_decay
        if module not in self.weight_decay:
            raise ValueError(f"Segment weight_decay has no entry for tracked module {module!r} (it has "
                             f"{sorted(self.weight_decay)}): give one for every tracked module")
        return self.weight_decay[module]

    @property
    def horizon(self) -> float:
        """c_ℓ as the curvature sees it: Σ η, divided by (1 − β) for heavy-ball momentum."""
        return self.lr_sum / (1.0 - self.momentum)

    def __repr__(self) -> str:
        return (
            f"Segment({len(self.checkpoints)} checkpoints, {self.num_examples} examples, lr_sum={self.lr_sum:g}, "
            f"momentum={self.momentum:g}, optimizer={self.optimizer!r})"
        )


@dataclass
class Trajectory:
    """The segments of a training run, in training order. The last checkpoint of the last
    segment is the final model θ_T."""

    segments: list[Segment]

    def __post_init__(self):
        self.segments = list(self.segments)
        if not self.segments:
            raise ValueError("Trajectory has no segments")
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, Segment):
                raise TypeError(f"Trajectory segment {i} is a {type(seg).__name__}, not a Segment")
        _check_saved_copies([(f"segment {i}, checkpoint {c}", ck) for i, seg in enumerate(self.segments)
                             for c, ck in enumerate(seg.checkpoints)],
                            "{k: v.clone() for k, v in model.state_dict().items()}, or torch.save each to a file")
        _check_saved_copies([(f"segment {i}, optimizer state {c}", st) for i, seg in enumerate(self.segments)
                             for c, st in enumerate(seg.optimizer_states or [])],
                            "copy.deepcopy(optimizer.state_dict()), or torch.save each to a file", steps=True)

    @classmethod
    def even(
        cls,
        checkpoints: Sequence[Checkpoint],
        lrs: Sequence[float],
        num_segments: int,
        data: Any,
        *,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | Mapping[str, float] = 0.0,
        num_examples: int | None = None,
        optimizer: Optimizer = "sgd",
        optimizer_states: Sequence[Any] | None = None,
        steps: Sequence[int] | None = None,
        grad_scales: Sequence[float] | None = None,
        lrs_after: Sequence[float] = (),
        continued: bool = False,
    ) -> Trajectory:
        """The paper's default: C checkpoints evenly spaced over the run's T steps (checkpoint c,
        counting from 1, saved after step round(c·T/C), so the last is the final weights), split into
        `num_segments` consecutive groups; each segment's c_ℓ sums the real per-step rates `lrs`, with
        momentum each step's as far as torch's SGD moved the weights along its gradient by the run's
        end: heavy-ball β, (1 − β) s_k with s_k = Σ_{i≥k} η_i β^{i−k} (η(1 − β^j) j steps before the end at a
        constant rate); `dampening` d scales every gradient but the first by 1 − d as it enters the
        buffer; `nesterov` (d = 0) moves by (1 − β)(η_k + β s_k).
        steps: the step each checkpoint was saved after (counting from 1, increasing, the last = T)
        when they were not evenly spaced, e.g. a save interval that does not divide T, or only the
        last few kept (Trainer's checkpoint-N folders: `from_trainer` reads them).
        grad_scales: the factor each step's gradient was scaled by before the optimizer took it, e.g.
        gradient clipping's min(1, max_norm/‖g‖) (clip_grad_norm_ returns ‖g‖); it goes with the gradient
        wherever the momentum buffer carries it.
        lrs_after: the rates of the steps the same SGD optimizer took after this run's last checkpoint,
        on other data (a next stage that kept the optimizer): its momentum buffer carried this run's
        last gradients into them; continued=True for that next stage (its optimizer's buffer is not
        empty at its first step, whose gradient torch then damps too). By default the run's momentum
        buffer starts and ends with it.
        num_examples, optimizer: as for Segment (num_examples is needed when `data` is a stream);
        optimizer_states: for adam/adamw, one per checkpoint, split with them."""
        checkpoints = list(checkpoints)
        if (optimizer_states is not None or optimizer != "sgd") and len(optimizer_states or ()) != len(checkpoints):
            raise ValueError(f"Trajectory.even: {len(optimizer_states or ())} optimizer states for {len(checkpoints)} "
                             f"checkpoints: give one per checkpoint{' (optimizer_states=)' if optimizer != 'sgd' else ''}")
        lrs = _rates(lrs, "Trajectory.even")
        n_ckpt, n_steps = len(checkpoints), len(lrs)
        if n_ckpt == 0:
            raise ValueError("Trajectory.even needs at least one checkpoint")
        whole = isinstance(num_segments, numbers.Integral) and not isinstance(num_segments, bool)
        if not whole or not 1 <= num_segments <= n_ckpt:
            raise ValueError(f"num_segments must be an integer between 1 and the number of checkpoints ({n_ckpt}), "
                             f"got {num_segments!r}")
        if n_steps < n_ckpt:
            raise ValueError(f"{n_steps} learning rates for {n_ckpt} checkpoints: give one rate per training step")
        ckpt_step = [round((c + 1) * n_steps / n_ckpt) for c in range(n_ckpt)] if steps is None else _steps(steps, n_ckpt, n_steps)
        scales = _scales(grad_scales, n_steps)
        if optimizer == "sgd":
            unclipped = _moved(lrs + _rates(lrs_after, "Trajectory.even lrs_after"), momentum, dampening, nesterov,
                               continued)[:n_steps]
        else:
            if dampening or nesterov or len(lrs_after) or continued:
                raise ValueError("dampening, nesterov, lrs_after and continued apply to SGD's momentum; Adam's moments "
                                 "come from optimizer_states")
            # Adam's first moment holds gradients back as momentum does, but counting its β₁ that way lowered
            # the rank agreement with exact unrolling (0.868 to 0.862 on the diabetes MLP, Pearson 0.908 to
            # 0.899 on GPT-2): SOURCE leaves out Adam's second-moment path, which it would partly offset, so
            # Adam's rates stay as given.
            unclipped = lrs
        # A clipped gradient moves the weights as far as its scale times what the buffer gave it; the decay
        # the optimizer adds after clipping moves them the unclipped distance (decay_scale).
        lrs = [m * g for m, g in zip(unclipped, scales)]
        bounds = [round(s * n_ckpt / num_segments) for s in range(num_segments + 1)]
        segments, start, run = [], 0, object()
        for s in range(num_segments):
            group = range(bounds[s], bounds[s + 1])
            end = ckpt_step[group[-1]]
            clipped, full = sum(lrs[start:end]), sum(unclipped[start:end])
            segment = Segment(
                [checkpoints[c] for c in group], data, lrs=lrs[start:end], momentum=momentum,
                weight_decay=weight_decay, num_examples=num_examples, optimizer=optimizer,
                optimizer_states=None if optimizer_states is None else [optimizer_states[c] for c in group],
                decay_scale=full / clipped if clipped > 0 else 1.0,
            )
            segment.saved_after = (run, [ckpt_step[c] for c in group])
            segments.append(segment)
            start = end
        return cls(segments)

    @classmethod
    def from_trainer(
        cls,
        run_dir: str | os.PathLike,
        model: nn.Module,
        data: Any,
        num_segments: int,
        *,
        lrs: Sequence[float] | None = None,
        num_examples: int | None = None,
    ) -> Trajectory:
        """A Hugging Face `transformers.Trainer` run: its `run_dir/checkpoint-N/` folders (weights,
        optimizer.pt, trainer_state.json) cut into `num_segments` segments, each with the rates of
        its steps, as `even` with the steps N read from the folders' names. Read from the optimizer
        states: SGD (its dampening, Nesterov and momentum, the checkpoints' mean, warned when it changed)
        or AdamW (Adam when torch's state says its decay is not decoupled), and each weight's decay.
        `model` is the model as trained (the same parameters trainable): Trainer's optimizer groups do not name their parameters, so they are
        named by Trainer's own decay rule. A PEFT (LoRA) run saves only its adapter: `model` is then
        the PEFT model as trained (its adapters trainable), whose frozen base completes each checkpoint.
        `lrs` (the rate of every step) is read from the log history when the run logged every step
        (TrainingArguments(logging_steps=1)); otherwise give it. A step whose gradient was clipped
        (Trainer's max_grad_norm, 1.0 by default, read from training_args.bin) counts at its rate times
        max_grad_norm/‖g‖, the norm ‖g‖ before clipping as logged (every step's, with logging_steps=1).
        `data` and `num_examples`: the examples the run trained on, as for Segment. A multi-stage run
        is `Trajectory(first.segments + second.segments)` of one from_trainer per stage."""
        from .interop.trainer import trainer_trajectory

        return trainer_trajectory(run_dir, model, data, num_segments, lrs=lrs, num_examples=num_examples)

    def final(self) -> Trajectory:
        """One segment holding only the final checkpoint: what EK-FAC influence functions use. Its
        horizon is the run's, so damping="implied" gives 1/c of the run, SOURCE's damping for SGD. A run
        whose last segment is Adam/AdamW gives an Adam segment with the last optimizer state and its
        decay: "implied" is then 1/(c·p̃) per eigen-direction (an Adam step is c·P, not c).

        A run that switched between SGD and Adam keeps the horizon of its last stage only (the trailing
        segments with the last one's kind of optimizer): an SGD horizon counts steps of η, an Adam one
        steps of η·P, and the two do not add. An SGD stage's weight decay is kept as the
        horizon-weighted mean Σ c_ℓ wd_ℓ / Σ c_ℓ (per module where the segments give a dict): its
        exponent Σ c_ℓ (H + wd_ℓ) at one curvature H."""
        last = self.segments[-1]
        start = len(self.segments) - 1
        while start > 0 and (self.segments[start - 1].optimizer == "sgd") == (last.optimizer == "sgd"):
            start -= 1
        stage = self.segments[start:]
        total = sum(s.horizon for s in stage)
        if last.optimizer != "sgd":  # an Adam stage: its last state gives P, its decay stays with it
            return Trajectory([Segment([last.checkpoints[-1]], last.data, lr_sum=total, num_examples=last.num_examples,
                                       optimizer=last.optimizer, optimizer_states=[last.optimizer_states[-1]],
                                       weight_decay=last.weight_decay,
                                       decay_scale=sum(s.horizon * s.decay_scale for s in stage) / total if total > 0
                                       else 1.0)])
        return Trajectory(
            [Segment([last.checkpoints[-1]], last.data, lr_sum=total, num_examples=last.num_examples,
                     weight_decay=_mean_decay(stage, total))]
        )

    @property
    def final_checkpoint(self) -> Checkpoint:
        return self.segments[-1].checkpoints[-1]

    def check_checkpoints(self, model: nn.Module) -> None:
        """Every checkpoint matches the model (keys, shapes) and is not the model's own live weights, and
        a weight_decay dict names the model's modules: refused before any pass."""
        live = _storages([p for p in model.parameters() if p.requires_grad])
        several = sum(self.layout()) > 1
        for ell, seg in enumerate(self.segments):
            for c, ckpt in enumerate(seg.checkpoints):
                check_checkpoint(model, ckpt, f"segment {ell}, checkpoint {c}")
                if c == 0 and isinstance(seg.weight_decay, dict):  # a typo would be silently no module's decay
                    unknown = sorted(set(seg.weight_decay) - {name for name, _ in model.named_modules()})
                    if unknown:
                        raise ValueError(f"segment {ell}: weight_decay names modules the model does not have: {unknown} "
                                         "(give {module name: decay}, names as model.named_modules() gives them)")
                # Loading another checkpoint into the model writes into this one: it would be read as that.
                if several and not isinstance(ckpt, (str, os.PathLike)) and live & _storages(ckpt):
                    raise ValueError(
                        f"segment {ell}, checkpoint {c} is the model's own weights (model.state_dict() holds references "
                        "to them): loading the other checkpoints into the model overwrites it. Keep a copy, "
                        "{k: v.clone() for k, v in model.state_dict().items()}, or torch.save it to a file")

    def layout(self) -> list[int]:
        """Checkpoints per segment: recorded in fitted factors to refuse a mismatched trajectory."""
        return [len(s.checkpoints) for s in self.segments]

    def settings(self) -> list[list]:
        """Per segment: checkpoints, learning rates, momentum, optimizer, weight decay and N, what the
        fingerprints of fits and scoring runs compare (another of any is another run)."""
        return [[len(s.checkpoints), s.lr_sum, s.momentum, s.optimizer, s.weight_decay, s.decay_scale, s.num_examples]
                for s in self.segments]


def _mean_decay(stage: list[Segment], total: float) -> float | dict[str, float]:
    """The horizon-weighted mean weight decay of an SGD stage (per module where segments give dicts)."""
    # With a zero horizon the decay has no effect (S̄ = I, r̄ = 0): any mean will do, so the plain one.
    weights = [s.horizon / total if total > 0 else 1 / len(stage) for s in stage]
    dicts = [set(s.weight_decay) for s in stage if isinstance(s.weight_decay, dict)]
    if not dicts:
        return sum(w * s.decay("") * s.decay_scale for w, s in zip(weights, stage))
    # The modules every segment gives a decay for (a number gives one for all): a module only some
    # segments name cannot be tracked (scoring would refuse the others), so it is left out.
    return {k: sum(w * s.decay(k) * s.decay_scale for w, s in zip(weights, stage)) for k in sorted(set.intersection(*dicts))}
