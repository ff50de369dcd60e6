"""EK-FAC factors per segment: fitting, and saving/loading them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops
from ._dist import (all_reduce_int, all_reduce_sum_, barrier, differing_on_ranks, fail_together, rank_and_world,
                    same_on_all_ranks, sole_writer)
from ._io import (SAFETENSORS_TEMP, atomic_path, check_folder, folder_lock, own_temps, remove_stale_temps, sha256_file,
                  write_named_by_content)
from ._passes import (
    available_memory, check_collate_order, check_count, check_model_and_task, check_summed, describe_model,
    describe_task, digest_examples, digest_tensors, length, make_loader, rank_share, reuse_large_blocks, run_pass,
    segments_collate, share_start,
)
from ._warn import warn
from .capture import LayerSpec, all_finite, is_placeholder, rotate, tracked_layers, with_ones
from .task import Task
from .tasks import CausalLMTask
from ._deepspeed import zero_folder, zero_optimizer_state
from .trajectory import (Checkpoint, Segment, Trajectory, checkpoint_files, extra_prefix, load_dict, load_into,
                         load_state_dict, readable, unwrapped_name)

# 2: the tensor file is named by its content (factors.json says which); 3: modules may have no bases;
# 4: a grouped convolution's groups are layers of their own ("module[g]", with group and groups). A save
# writes the lowest version that describes its factors, so older readers take what they can read.
FORMAT_VERSION = 4
_NO_BASES_VERSION = 3
# Factors whose every module has bases are written as version 2, which source_fast before version 3 reads too.
_KRONECKER_VERSION = 2
_TENSOR_FILE = re.compile(r"factors(\.[0-9a-f]{16})?\.safetensors")
# A finished pass of a resumable fit (_FitProgress._path): seg{ℓ}_{cov|lam}{c}.safetensors.
PASS_FILE = re.compile(r"seg\d+_(cov|lam)\d+\.safetensors")
Fisher = Literal["true", "empirical"]


@dataclass(frozen=True)
class LayerFactors:
    """One layer in one segment. Eigenvectors in columns (ascending eigenvalues), float64 eigh.

    a_cov: (d_a, d_a) mean over the unmasked rows of a aᵀ (averaged over the segment's checkpoints)
    s_cov: (d_out, d_out) sum over all rows of g gᵀ (zero where padded, unless the loss reads padding)
        divided by the unmasked rows, as kronfluence does
    q_a, q_s: eigenvectors of a_cov, s_cov
    (all four None for a diagonal curvature, kronfluence's "diagonal" strategy read by
    source_fast.interop.kronfluence: the bases are identities and Λ is in the parameter basis)
    lam: (d_out, d_a) Λ = mean over examples of (Q_Sᵀ G_n Q_A)², averaged over the checkpoints
    precond: (d_out, d_a) Adam's diagonal P = 1/(√v̂ + ε) averaged over the checkpoints, or None
    rows: the unmasked rows (tokens) one covariance pass divided by, or None where unknown
    """

    a_cov: Tensor | None
    s_cov: Tensor | None
    q_a: Tensor | None
    q_s: Tensor | None
    lam: Tensor
    precond: Tensor | None = None
    rows: int | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> LayerFactors:
        conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        tensors = (conv(getattr(self, f)) for f in ("a_cov", "s_cov", "q_a", "q_s", "lam", "precond"))
        return LayerFactors(*tensors, rows=self.rows)


@dataclass(frozen=True)
class Factors:
    """EK-FAC factors of every segment of a trajectory (one per segment).

    segments[ℓ][module name] → LayerFactors. `layers` are the tracked layers, `layout` the number of
    checkpoints per segment they were fitted on (1 per segment when `average_params`: Fast-SOURCE).
    """

    layers: list[LayerSpec]
    segments: list[dict[str, LayerFactors]]
    num_examples: list[int]
    layout: list[int]
    fisher: Fisher
    average_params: bool
    # checkpoint_signature of each checkpoint fitted on, per segment: scoring another run's trajectory
    # with these factors is refused (None: not known, e.g. factors read from kronfluence's files).
    checkpoints: list[list[str]] | None = None

    def __repr__(self) -> str:  # the dataclass's would print every tensor
        n = len(self.segments)
        return (f"Factors({n} segment{'s' * (n != 1)} of {self.layout} checkpoints, {len(self.layers)} layers "
                f"{[s.name for s in self.layers][:4]}{'...' if len(self.layers) > 4 else ''}, "
                f"{self.fisher} Fisher, num_examples={self.num_examples}"
                f"{', average_params' if self.average_params else ''})")

    def check_model(self, specs: list[LayerSpec]) -> None:
        """The task's tracked modules must be the factors' (in any order: factors are read by name)."""
        theirs = {s.name: s for s in self.layers}
        for s in specs:
            if s.name not in theirs:
                raise ValueError(f"factors were not fitted for module {s.name!r} (they have {sorted(theirs)})")
            if s != theirs[s.name]:
                raise ValueError(f"module {s.name!r} is {s} in the model but {theirs[s.name]} in the factors")
        extra = sorted(set(theirs) - {s.name for s in specs})
        if extra:
            raise ValueError(f"factors track modules the task does not: {extra}")

    def check_trajectory(self, trajectory: Trajectory, *, average_params: bool) -> None:
        layout = [1] * len(trajectory.segments) if average_params else trajectory.layout()
        if average_params != self.average_params:
            fix = "average_params=True" if average_params else "average_params=False"
            raise ValueError(f"these factors were fitted with average_params={self.average_params}; refit with {fix}")
        if layout != self.layout:
            raise ValueError(
                f"factors were fitted on a trajectory with checkpoints per segment {self.layout}, "
                f"this one has {layout}"
            )
        if self.checkpoints is not None:
            for ell, (given, fitted) in enumerate(zip(_checkpoint_digests(trajectory, checkpoint_signature),
                                                      self.checkpoints)):
                if len(given) != len(fitted):  # average_params: the layout says 1 either way
                    raise ValueError(f"segment {ell} has {len(given)} checkpoints, these factors were fitted "
                                     f"on {len(fitted)}: refit them, or score the trajectory they were fitted on")
                c = next((c for c, (a, b) in enumerate(zip(given, fitted)) if a != b), None)
                if c is not None:
                    raise ValueError(
                        f"segment {ell}, checkpoint {c} is not the checkpoint these factors were fitted on (another "
                        "run's, or a file rewritten since): refit them, or score the trajectory they were fitted on")
        # Not the examples: the curvature of a subset (kronfluence's covariance_max_examples) serves all.
        for ell, seg in enumerate(trajectory.segments):
            adam = any(lf.precond is not None for lf in self.segments[ell].values())
            if adam != (seg.optimizer != "sgd"):
                raise ValueError(f"segment {ell}: the factors were fitted for {'an Adam' if adam else 'an SGD'} segment, "
                                 f"this one's optimizer is {seg.optimizer!r}; refit with this trajectory")

    # ---- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the tensors to `path/factors.<sha256[:16]>.safetensors`, then `path/factors.json`,
        which names them: the json's rename is the one commit point, so a save killed at any moment
        leaves the previous factors loadable (an earlier save's tensor file goes only afterwards)."""
        from safetensors.torch import save_file

        check_folder(path, "the factors' folder")
        path = Path(path)
        tensors = {}
        for ell, seg in enumerate(self.segments):
            for name, lf in seg.items():
                for field in ("a_cov", "s_cov", "q_a", "q_s", "lam", "precond"):
                    t = getattr(lf, field)
                    if t is not None:
                        tensors[f"{ell}/{name}/{field}"] = t.detach().cpu().contiguous()
        with folder_lock(path, ".factors.lock") as locked:  # a concurrent save would delete this one's tensors
            if locked:
                remove_stale_temps(path, own_temps("factors"), own_temps("factors.json"), SAFETENSORS_TEMP)
            else:
                warn(f"{path}: the file system does not lock files: earlier saves' files are left in place, as a "
                     "save running at the same time may be writing them")
            tensors_file, digest = write_named_by_content(path, "factors", ".safetensors",
                                                          lambda tmp: save_file(tensors, str(tmp)))
            meta = {
                "format": "source_fast.factors",
                # A reader older than version 3 would call a module without bases damaged.
                "format_version": FORMAT_VERSION if any(s.groups > 1 for s in self.layers)
                else _NO_BASES_VERSION if any(lf.q_a is None for seg in self.segments for lf in seg.values())
                else _KRONECKER_VERSION,
                "layers": [vars(s) if s.groups > 1 else {k: v for k, v in vars(s).items() if k not in ("group", "groups")}
                           for s in self.layers],
                "num_examples": self.num_examples,
                "rows": {f"{ell}/{name}": lf.rows for ell, seg in enumerate(self.segments) for name, lf in seg.items()
                         if lf.rows is not None},
                "layout": self.layout,
                "fisher": self.fisher,
                "average_params": self.average_params,
                "checkpoints": self.checkpoints,
                "tensors_file": tensors_file,
                "tensors_sha256": digest,
            }
            with atomic_path(path / "factors.json") as tmp:
                tmp.write_text(json.dumps(meta, indent=1))
            for old in path.iterdir() if locked else ():  # earlier saves' tensors (format 1's fixed name included)
                if old.name != tensors_file and _TENSOR_FILE.fullmatch(old.name):
                    old.unlink()

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Factors:
        """The factors `save` wrote into `path`. A save into the same folder while this reads (it replaces
        factors.json, then deletes the tensors the old one named) is met by reading the new factors."""
        meta_path = Path(path) / "factors.json"
        for attempt in range(3):
            before = _identity(meta_path)
            try:
                return cls._load(Path(path), map_location)
            except (OSError, ValueError):
                if attempt == 2 or before is None or _identity(meta_path) == before:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, path: Path, map_location: str | torch.device) -> Factors:
        from safetensors.torch import load_file

        meta_path = path / "factors.json"
        if not path.is_dir():
            raise FileNotFoundError(f"factor directory {str(path)!r} does not exist" if not path.exists() else
                                    f"{str(path)!r} is a file, not a factor directory (what Factors.save writes)")
        if not meta_path.exists():
            raise FileNotFoundError(f"factor directory {str(path)!r} is incomplete: factors.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path} is corrupted: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != "source_fast.factors":
            raise ValueError(f"{meta_path} is not a source_fast factor file")
        if meta.get("format_version") not in range(1, FORMAT_VERSION + 1):
            raise ValueError(f"{meta_path} has format version {meta.get('format_version')}, this source_fast reads "
                             f"1 to {FORMAT_VERSION}")
        tensors_file = meta.get("tensors_file", "factors.safetensors")  # format 1: a fixed name
        if not isinstance(tensors_file, str) or not _TENSOR_FILE.fullmatch(tensors_file):  # never outside the folder
            raise ValueError(f"{meta_path} is damaged: tensors_file {tensors_file!r} is no name Factors.save writes")
        tensor_path = path / tensors_file
        if not tensor_path.exists():
            raise FileNotFoundError(f"factor directory {str(path)!r} is incomplete: {tensor_path.name} is missing")
        try:
            if sha256_file(tensor_path) != meta["tensors_sha256"]:
                raise ValueError(f"{tensor_path} is corrupted or was replaced: its checksum does not match factors.json")
            tensors = load_file(str(tensor_path), device=str(map_location))
            layers = [LayerSpec(**d) for d in meta["layers"]]
            layout, fisher, average_params = meta["layout"], meta["fisher"], meta["average_params"]
            num_examples = meta["num_examples"]
            if (fisher not in get_args(Fisher) or not isinstance(average_params, bool)
                    or len(num_examples) != len(layout) or not all(isinstance(c, int) and c > 0 for c in layout)
                    or not all(isinstance(n, int) and n > 0 for n in num_examples)):
                raise ValueError(f"{meta_path} is damaged: fisher {fisher!r}, average_params {average_params!r}, "
                                 f"layout {layout!r}, num_examples {num_examples!r}")
            rows = meta.get("rows", {})
            checkpoints = meta.get("checkpoints")  # absent before 2026-11-29: not checked
            if checkpoints is not None and (len(checkpoints) != len(layout) or not all(
                    isinstance(c, list) and all(isinstance(x, str) for x in c) for c in checkpoints)):
                raise ValueError(f"{meta_path} is damaged: checkpoints {checkpoints!r} for layout {layout!r}")
        except (KeyError, TypeError, AttributeError) as exc:  # a hand-edited or damaged json
            raise ValueError(f"{meta_path} is damaged ({type(exc).__name__}: {exc}); refit the factors") from None
        if any(int(k.split("/", 1)[0]) >= len(layout) for k in tensors):
            raise ValueError(f"{meta_path} names {len(layout)} segment(s), {tensor_path.name} holds more")
        segments = []
        for ell in range(len(layout)):
            seg = {}
            for spec in layers:
                key = lambda f: f"{ell}/{spec.name}/{f}"  # noqa: E731
                # Λ, with the covariances and bases: all four, or none (a diagonal curvature).
                kronecker = ("a_cov", "s_cov", "q_a", "q_s")
                diagonal = key("lam") in tensors and not any(key(f) in tensors for f in kronecker)
                missing = [f for f in (() if diagonal else kronecker) + ("lam",) if key(f) not in tensors]
                if missing:
                    raise ValueError(f"{tensor_path}: segment {ell}, module {spec.name!r} lacks {missing}")
                lf = LayerFactors(*(tensors.get(key(f)) for f in ("a_cov", "s_cov", "q_a", "q_s", "lam")),
                                  tensors.get(key("precond")), rows.get(f"{ell}/{spec.name}"))
                shapes = {"a_cov": (spec.d_a,) * 2, "s_cov": (spec.d_out,) * 2, "q_a": (spec.d_a,) * 2,
                          "q_s": (spec.d_out,) * 2, "lam": (spec.d_out, spec.d_a), "precond": (spec.d_out, spec.d_a)}
                for field, shape in shapes.items():
                    t = getattr(lf, field)
                    if t is not None and tuple(t.shape) != shape:
                        raise ValueError(f"{tensor_path}: segment {ell}, module {spec.name!r}: {field} has shape "
                                         f"{tuple(t.shape)}, the layer needs {shape}")
                    # A fit that went wrong, saved anyway (the sum first: one pass; an overflowing one is checked).
                    if t is not None and not bool(all_finite(t)) and not bool(t.isfinite().all()):
                        raise ValueError(f"{tensor_path}: segment {ell}, module {spec.name!r}: {field} holds NaN or "
                                         "inf; refit the factors")
                seg[spec.name] = lf
            segments.append(seg)
        return cls(layers, segments, num_examples, layout, fisher, average_params, checkpoints)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file `path` is now (an atomic rename makes another), or None where there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# ---- fitting ---------------------------------------------------------------------------------


def factor_dtype(model: nn.Module) -> torch.dtype:
    """Factors and scores are float64 for a float64 model, float32 otherwise."""
    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Runs the block with the model in eval mode and puts its weights and mode back afterwards."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.load_state_dict(state)
        model.train(was_training)


def averaged_checkpoint(segment: Segment, what: str) -> dict[str, Tensor]:
    """Fast-SOURCE: the mean of the segment's checkpoints (floating tensors; others from the last).
    Keys some checkpoints leave out are tied weights a save_pretrained file stores once (the checkpoints
    were checked against the model first): loading the mean restores them from their twin."""
    # Under bare names: checkpoints of one run saved through DDP or torch.compile and not (load_into maps them back).
    states = [{unwrapped_name(k): v for k, v in load_state_dict(c, f"{what}, checkpoint {i}").items()}
              for i, c in enumerate(segment.checkpoints)]
    shared = set(states[0]).intersection(*states[1:])
    out = {}
    for key, last in states[-1].items():
        if key not in shared:
            continue
        if last.is_floating_point():
            out[key] = sum(s[key].double() for s in states).div(len(states)).to(last.dtype)
        else:
            out[key] = last
    return out


def segment_checkpoints(segment: Segment, average_params: bool, what: str) -> list[Checkpoint]:
    return [averaged_checkpoint(segment, what)] if average_params else list(segment.checkpoints)


def pass_seed(seed: int, ell: int, c: int, kind: str, rank: int) -> int:
    """The RNG seed of one fitting pass (kind "cov" or "lam"): per pass, so a resumed fit samples the
    labels an uninterrupted one would, and per rank, so ranks draw independent labels for their
    examples (one process: rank 0's). Within torch.manual_seed's 64 bits for any seed."""
    return (seed * 1_000_003 + 2 * (ell * 10_007 + c) + (kind == "lam") + 1_000_000_007 * rank) % 2**64


def _progress(enabled: bool, total: int | None, desc: str, unit: str = "ex"):
    """A progress bar, on rank 0 only (under torchrun every rank would draw its own, unlabelled), with
    rank 0's share standing for all. Redrawn 10 times a second on a terminal, and cleared when done;
    into a log file, every 30 s (else about 1 KB/s per rank of log), and its final state is left there
    (a pass shorter than 30 s would otherwise log only its 0 %)."""
    rank, world = rank_and_world()
    if not enabled or rank != 0:
        return None
    from tqdm.auto import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(total=total, desc=desc if world == 1 else f"{desc} [rank 0 of {world}]", unit=unit, dynamic_ncols=True,
                leave=not terminal, mininterval=0.1 if terminal else 30.0)


def _share(loader, expected: int | None) -> int | None:
    """Examples this rank reads in a pass (a progress bar's total): a stream's from its segment's N."""
    n = length(loader.dataset)
    if n is None and expected is not None:
        rank, world = rank_and_world()
        n = len(range(rank, expected, world))
    return n


def _eigh(cov: Tensor, count: Tensor | float = 1):
    """torch.linalg.eigh of a covariance (divided by `count`) in float64, symmetrized first (round-off
    leaves it slightly asymmetric): eigenvalues ascending, eigenvectors in columns. A batch of them too."""
    c = cov.double() / count
    return torch.linalg.eigh((c + c.mT) / 2)


_BATCHED_EIGH = 64  # the largest size eigendecompose batches


def eigendecompose(covs: list[Tensor], dtypes: list[torch.dtype], device: torch.device,
                   counts: list[Tensor | float] | None = None) -> list[tuple[Tensor, Tensor]]:
    """(eigenvalues, eigenvectors) on `device` of each covariance (divided by its count, in float64:
    _eigh), each pair in its entry of `dtypes`. Under torch.distributed the ranks split the matrices,
    balanced by d³ (eigh's cost), and broadcast what they found: the one part of a fit every rank would
    otherwise repeat whole (GPT-2 small's 24 matrices of 3072² take minutes on a CPU core). Each
    covariance goes to `device` only to be decomposed, one at a time."""
    counts = [1] * len(covs) if counts is None else counts
    rank, world = rank_and_world()
    load = [0] * world
    owners = [0] * len(covs)
    for i in sorted(range(len(covs)), key=lambda i: -covs[i].shape[0] ** 3):  # largest first, to the least loaded
        owners[i] = min(range(world), key=lambda r: (load[r], r))
        load[owners[i]] += covs[i].shape[0] ** 3
    out: list[tuple[Tensor, Tensor]] = []
    # Small matrices of one size go to eigh as one batch: a depthwise convolution's groups are thousands
    # of layers with (k² + 1)² covariances, where a call per matrix costs more than the decomposition.
    small: dict[int, list[int]] = {}
    for i, c in enumerate(covs):
        if owners[i] == rank and c.shape[0] <= _BATCHED_EIGH:
            small.setdefault(c.shape[0], []).append(i)
    found: dict[int, tuple[Tensor, Tensor]] = {}
    with fail_together(device):  # a covariance one rank cannot decompose stops every rank
        for same in small.values():
            if len(same) > 1:
                values, vectors = _eigh(torch.stack([covs[i].to(device, torch.float64) for i in same]),
                                        torch.tensor([float(counts[i]) for i in same], dtype=torch.float64,
                                                     device=device)[:, None, None])
                found.update(zip(same, zip(values.unbind(0), vectors.unbind(0))))
        for i, (c, count, dtype, owner) in enumerate(zip(covs, counts, dtypes, owners)):
            if owner == rank:
                pair = found[i] if i in found else _eigh(c.to(device), count)
                out.append(tuple(t.to(dtype).contiguous() for t in pair))
            else:
                d = c.shape[0]
                out.append((torch.empty(d, dtype=dtype, device=device), torch.empty(d, d, dtype=dtype, device=device)))
    if world > 1:
        for (values, vectors), owner in zip(out, owners):
            dist.broadcast(values, src=owner)
            dist.broadcast(vectors, src=owner)
    return out


def fit_factors(
    model: nn.Module,
    task: Task,
    trajectory: Trajectory,
    *,
    fisher: Fisher = "true",
    average_params: bool = False,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    seed: int = 0,
    progress: bool = False,
    resume_dir: str | os.PathLike | None = None,
) -> Factors:
    """Fits one EK-FAC per segment: covariances A and S averaged over the
    segment's checkpoints, one float64 eigendecomposition (the segment's basis), then each
    checkpoint's eigenvalue corrections Λ in that basis, averaged.

    fisher: "true" draws labels from the model (`compute_train_loss(..., sample=True)`);
        "empirical" uses the data's labels.
    average_params: Fast-SOURCE — fit at the mean of each segment's checkpoints (L fits, not C).
    seed: seeds the label sampling, pass by pass (the caller's RNG state is restored afterwards); the
        labels are drawn batch by batch, so batch_size and the collator's padding change the draw too
        (as another seed does: a sample of the true Fisher, not another curvature).
    resume_dir: keep each finished pass's sums there (atomically, by rank 0; every rank must see the
        folder) and skip the passes already there: a fit killed midway resumes after its last finished
        pass with the same result. A folder from a different fit (layers, checkpoints, data, options,
        or the task: its class, settings and collate_fn) is refused, and so is a second fit into the
        folder while one still writes it. The resumed fit may run on
        another number of ranks (a pass's sums are over all ranks): the result then equals the other
        count's up to float summation order, and with fisher="true" its labels are another draw.
    The model's weights and train/eval mode are restored on return.
    """
    check_model_and_task(model, task, trajectory)
    if fisher not in get_args(Fisher):
        raise ValueError(f"unknown fisher {fisher!r}; valid: {sorted(get_args(Fisher))}")
    if fisher == "empirical" and isinstance(task, CausalLMTask) and task.normalize == "mean":
        raise ValueError("CausalLMTask(normalize='mean') with fisher='empirical': the empirical Fisher of a loss "
                         "averaged over an example's T tokens is T-fold smaller than its curvature; use "
                         "fisher='true' (the default), which fits the mean's curvature")
    check_count("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    seed, batch_size = int(seed), int(batch_size)  # numpy's too: they go into resume_dir's fit.json
    if resume_dir is not None:
        check_folder(resume_dir, "resume_dir")
    specs = tracked_layers(model, task.get_influence_tracked_modules())
    warn_batchnorm(model)
    dtype = factor_dtype(model)
    objective = "fisher" if fisher == "true" else "train"
    device = next(model.parameters()).device
    _check_factor_memory(specs, len(trajectory.segments), dtype, device)
    # Read before any pass, not after hours: the task's loss (summed over the batch?), every checkpoint
    # (the ranks compare them, and resume_dir's fingerprint names them) and Adam's states (names, decay,
    # optimizer kind and step counts checked).
    distributed = rank_and_world()[1] > 1
    notes: set[str] = set()
    try:
        for data in {id(seg.data): seg.data for seg in trajectory.segments}.values():  # each stage's data once
            check_summed(model, task, data, collate_fn, batch_size, "train")
            check_collate_order(data, collate_fn, batch_size)
        ckpt_digests = _checkpoint_digests(trajectory) if distributed or resume_dir is not None else None
        state_steps: list[list[float]] = [[] for _ in trajectory.segments]
        preconds = [{k: p.to(device=device, dtype=dtype) for k, p in _adam_preconditioner(
            model, seg, specs, f"segment {ell}", notes, state_steps[ell]).items()} if seg.optimizer != "sgd" else {}
            for ell, seg in enumerate(trajectory.segments)]  # the factors' dtype: float64 only transiently
        _check_adam_steps(trajectory, state_steps, notes)
        unreadable = None
    except Exception as e:  # under torch.distributed, raised after the ranks compare: none waits for this one
        if not distributed:
            raise
        ckpt_digests, preconds, unreadable = None, None, e
    if distributed:
        _check_same_inputs_on_ranks(model, specs, trajectory, ckpt_digests, preconds, unreadable, task, collate_fn,
                                    fisher, average_params, seed, batch_size, resume_dir is not None, device)
    for note in sorted(notes):
        warn(note)
    trajectory.check_checkpoints(model)
    signatures = _checkpoint_digests(trajectory, checkpoint_signature)
    _warn_repeated(signatures)
    segments, num_examples = [], []

    def run(kind, ell, c, compute):
        """One pass's sums: from resume_dir when finished there before, else computed (and kept)."""
        found = saved.load(kind, ell, c, device)
        # Ranks that disagree would pair their sums with other passes' in the all-reduces (a folder on
        # each node's own disk): wrong factors, saved as right.
        if not same_on_all_ranks(int(found is not None), device):
            raise ValueError(f"segment {ell}, checkpoint {c}: the ranks disagree on whether resume_dir {resume_dir!r} "
                             f"holds this {'Λ' if kind == 'lam' else 'covariance'} pass: every rank must see the same "
                             "folder (shared storage)")
        if found is not None:
            if progress and rank_and_world()[0] == 0:  # a resumed fit says what it skips, as score_corpus does
                print(f"{'Λ' if kind == 'lam' else 'covariance'} pass of segment {ell}, checkpoint {c}: already done in "
                      f"{resume_dir}", flush=True)
            return found
        torch.manual_seed(pass_seed(seed, ell, c, kind, rank_and_world()[0]))
        result = compute()
        saved.store(kind, ell, c, result)
        return result

    # One fit at a time into resume_dir: a second would delete this one's temp files as stale.
    one_writer = sole_writer(Path(resume_dir), "fit_factors", device) if resume_dir is not None else contextlib.nullcontext()
    with one_writer, restored(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            reuse_large_blocks(device):
        saved = _FitProgress(resume_dir, specs, trajectory, ckpt_digests,
                             describe_task(task, segments_collate(trajectory, collate_fn)), fisher,
                             average_params, seed, batch_size, dtype, device)
        for ell, seg in enumerate(trajectory.segments):
            what = f"segment {ell}"
            ckpts = segment_checkpoints(seg, average_params, what)
            # Under torch.distributed each rank reads its share (rank_share); sums are all-reduced.
            loader = make_loader(rank_share(seg.data), batch_size, collate_fn)
            first = share_start(seg.data)
            a_cov = {s.name: torch.zeros(s.d_a, s.d_a, device=device, dtype=dtype) for s in specs}
            s_cov = {s.name: torch.zeros(s.d_out, s.d_out, device=device, dtype=dtype) for s in specs}
            for c, ckpt in enumerate(ckpts):
                where = f"{what}, checkpoint {c}"

                def covariances(ckpt=ckpt, where=where, loader=loader, n=seg.num_examples, first=first):
                    load_into(model, ckpt, where)
                    return _covariances(model, task, specs, loader, objective, where, progress, expected=n, first=first)

                a_c, s_c, rows = run("cov", ell, c, covariances)
                for s in specs:
                    a_cov[s.name] += a_c[s.name] / len(ckpts)
                    s_cov[s.name] += s_c[s.name] / len(ckpts)
            names = [s.name for s in specs]
            bases = eigendecompose([a_cov[n] for n in names] + [s_cov[n] for n in names], [dtype] * 2 * len(names),
                                   device)
            q_a = {n: vectors for n, (_, vectors) in zip(names, bases[: len(names)])}
            q_s = {n: vectors for n, (_, vectors) in zip(names, bases[len(names) :])}
            lam = {s.name: torch.zeros(s.d_out, s.d_a, device=device, dtype=dtype) for s in specs}
            for c, ckpt in enumerate(ckpts):
                where = f"{what}, checkpoint {c}"

                def lambdas(ckpt=ckpt, where=where, loader=loader, n=seg.num_examples, q_a=q_a, q_s=q_s, first=first):
                    load_into(model, ckpt, where)
                    return (_lambdas(model, task, specs, loader, objective, q_a, q_s, where, progress, expected=n,
                                     first=first),)

                (lam_c,) = run("lam", ell, c, lambdas)
                for s in specs:
                    lam[s.name] += lam_c[s.name] / len(ckpts)
            precond = preconds[ell]
            segments.append(
                {
                    s.name: LayerFactors(
                        a_cov[s.name], s_cov[s.name], q_a[s.name], q_s[s.name], lam[s.name],
                        precond.get(s.name),
                        int(rows[s.name]),  # every checkpoint's pass reads the same rows
                    )
                    for s in specs
                }
            )
            num_examples.append(seg.num_examples)
    layout = [1] * len(trajectory.segments) if average_params else trajectory.layout()
    return Factors(specs, segments, num_examples, layout, fisher, average_params, signatures)


def _check_factor_memory(specs: list[LayerSpec], n_segments: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuses, before any pass, factors that cannot fit: every segment keeps each layer's two
    covariances and two eigenbases (2·(d_a² + d_out²)) and Λ (with Adam's P: 2·d_out·d_a), and the
    float64 eigendecomposition of the largest factor needs about three d² float64 buffers more. A
    language model's output head alone (GPT-2: 50,257 outputs) takes tens of GB."""
    per_layer = {s.name: n_segments * dtype.itemsize * (2 * (s.d_a**2 + s.d_out**2) + 2 * s.d_out * s.d_a)
                 for s in specs}
    need = sum(per_layer.values()) + 3 * 8 * max(max(s.d_a, s.d_out) for s in specs) ** 2
    available = available_memory(device)
    if available and need > available:
        largest = sorted(per_layer, key=per_layer.get, reverse=True)[:3]
        listed = ", ".join(f"{n!r} ({per_layer[n] / 1e9:.1f} GB)" for n in largest)
        raise ValueError(
            f"the factors of these {len(specs)} tracked layers ({n_segments} segment(s)) take about {need / 1e9:.1f} "
            f"GB, more than the {available / 1e9:.1f} GB free on {device}; the largest: {listed}. Track fewer "
            "modules (the task's get_influence_tracked_modules; for a language model, leave out the output head)"
        )


class _FitProgress:
    """fit_factors' finished passes in `folder`: seg{ℓ}_{cov|lam}{c}.safetensors, one per pass, plus
    fit.json naming what is being fitted (layers, trajectory, data, options)."""

    def __init__(self, folder, specs, trajectory, ckpt_digests, task, fisher, average_params, seed, batch_size, dtype,
                 device):
        self.folder = None if folder is None else Path(folder)
        if self.folder is None:
            return
        rank = rank_and_world()[0]
        problem = None
        if rank == 0:  # rank 0 decides, and every rank raises together (none is left waiting at a barrier)
            # Every example (a read of the data, no forward pass): a changed one would reuse stale sums.
            # The segments of one training stage share their data: it is read once.
            digests: dict[int, str] = {}
            for seg in trajectory.segments:
                if id(seg.data) not in digests:
                    digests[id(seg.data)] = digest_examples(seg.data, limit=None)
            fingerprint = {
                "layers": [[s.name, s.d_out, s.d_a] for s in specs], "layout": trajectory.layout(), "task": task,
                "checkpoints": ckpt_digests,
                "data": [digests[id(seg.data)] for seg in trajectory.segments],
                "num_examples": [seg.num_examples for seg in trajectory.segments],
                "fisher": fisher, "average_params": average_params, "seed": seed, "batch_size": batch_size,
                "dtype": str(dtype),  # not the world size: a finished pass holds the sums over all ranks
                # What the attention mask drops (passes of fits before it was in here dropped padding's gradients).
                "mask_rule": "padding out of the activation covariance only",
            }
            path = self.folder / "fit.json"
            if path.exists():
                try:
                    old = json.loads(path.read_text()).get("fingerprint", {})
                except (json.JSONDecodeError, UnicodeDecodeError):
                    old = None
                diff = [] if old is None else sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
                if old is None:
                    problem = f"{path} is corrupted: delete {self.folder} to start the fit over"
                elif diff:
                    problem = (f"{self.folder} holds the passes of a different fit (it differs in: {', '.join(diff)}); "
                               "use another resume_dir or delete this one")
            elif any(self.folder.glob("seg*_*.safetensors")):  # fit.json comes first: someone deleted it
                problem = (f"{self.folder} holds finished passes but no fit.json to say which fit they belong to: "
                           "delete the folder, or use another resume_dir")
            else:
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps({"format": "source_fast.fit_progress", "fingerprint": fingerprint}, indent=1))
            remove_stale_temps(self.folder, own_temps(), SAFETENSORS_TEMP)  # under sole_writer's lock
        if all_reduce_int(problem is not None, device):
            raise ValueError(problem if rank == 0 else f"{self.folder} cannot be resumed here: rank 0 says why")

    def _path(self, kind, ell, c) -> Path:
        return self.folder / f"seg{ell}_{kind}{c}.safetensors"

    def load(self, kind, ell, c, device) -> tuple[dict[str, Tensor], ...] | None:
        """A finished pass's sums, or None to compute the pass (again: a damaged file is reported)."""
        path = self._path(kind, ell, c) if self.folder is not None else None
        if path is None or not path.exists():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                flat = {k: f.get_tensor(k) for k in sorted(f.keys())}
                recorded = (f.metadata() or {}).get("sha256")
        except (SafetensorError, OSError):
            recorded, flat = None, {}
        if recorded is None or recorded != digest_tensors(flat.values()):
            warn(f"{path} is corrupted or incomplete: computing its pass (segment {ell}, checkpoint {c}) again")
            return None
        parts = sorted({int(k.split(".", 1)[0]) for k in flat})
        return tuple({k.split(".", 1)[1]: v.to(device) for k, v in flat.items() if k.startswith(f"{i}.")} for i in parts)

    def store(self, kind, ell, c, result: tuple[dict[str, Tensor], ...]) -> None:
        if self.folder is None:
            return
        if rank_and_world()[0] == 0:
            from safetensors.torch import save_file

            flat = {f"{i}.{name}": t.detach().cpu().contiguous() for i, part in enumerate(result) for name, t in part.items()}
            flat = dict(sorted(flat.items()))
            with atomic_path(self._path(kind, ell, c)) as tmp:
                save_file(flat, str(tmp), metadata={"sha256": digest_tensors(flat.values())})
        barrier()


def _check_same_inputs_on_ranks(model, specs, trajectory, ckpt_digests, preconds, unreadable, task, collate_fn, fisher,
                                average_params, seed, batch_size, resume: bool, device) -> None:
    """Under torch.distributed every rank must be given the same model, checkpoints, optimizer states
    and whole data: each reads its own share of the data (rank_share) and the sums are all-reduced
    (Adam's P is rank 0's), so a rank with a stale checkpoint, another dtype or a pre-sharded part
    (DDP's habit) would mix another fit into this one, silently. Everything but the examples must
    agree (else refused, naming what differs); examples that differ where sampled are only warned
    about, since data augmented at random per rank differs too. `unreadable`: this rank's error
    reading its checkpoints or states, raised once every rank has compared (none is left waiting)."""
    rank = rank_and_world()[0]
    inputs = {
        "tracked layers": [[s.name, s.d_out, s.d_a] for s in specs],
        "model (parameter and buffer names, shapes, dtypes)": describe_model(model),
        "checkpoints (contents)": ckpt_digests,
        "optimizer states (Adam's preconditioner)": None if preconds is None else [
            {k: digest_tensors([p]) for k, p in seg.items()} for seg in preconds],
        "trajectory (checkpoints per segment, learning rates, data sizes)": [
            row + [length(seg.data)] for row, seg in zip(trajectory.settings(), trajectory.segments)],
        "task": describe_task(task, segments_collate(trajectory, collate_fn)),
        "options (fisher, average_params, seed, batch_size, resume_dir or not)": [fisher, average_params, seed,
                                                                                  batch_size, resume],
    }
    differ = differing_on_ranks(inputs, device)
    if unreadable is not None:
        raise unreadable
    if differ:
        raise ValueError(f"rank {rank}: the ranks were given different inputs to fit_factors: they differ in "
                         f"{'; '.join(differ)}. Under torch.distributed give every rank the same model, checkpoints "
                         "and whole data; each reads its own share")
    if differing_on_ranks({"data": [digest_examples(seg.data) for seg in trajectory.segments]}, device) and rank == 0:
        warn("the ranks' data differ at sampled examples: each rank reads its own share of the data it is "
             "given, so if each was given its own part (DDP's habit), the factors fit only part of the data; "
             "data augmented at random per rank differs this way too")


_SIGNATURE_ROWS, _SIGNATURE_ROW_VALUES = 16, 1024


def checkpoint_signature(checkpoint: Checkpoint, what: str) -> str:
    """A checkpoint told from others cheaply: the set of its tensors' dtypes, shapes and a sample of
    their values (16 rows spread over the first dimension, the first 1,024 values of each; vectors and
    scalars whole). Two runs, or two checkpoints of one run, differ in every trained tensor, and the
    spread rows also catch a run that trained only some rows (new tokens' embeddings, appended last); a
    file is read only that far (safetensors lazily). Names are left out and copies merged, so a tied
    weight stored once in a file and twice in a state_dict, or a file against the state_dict it holds,
    agree."""
    heads = {(str(dtype), shape, digest_tensors([sample])) for dtype, shape, sample in _tensor_samples(checkpoint, what)}
    return hashlib.sha256(repr(sorted(heads)).encode()).hexdigest()[:16]


def factors_signature(factors: Any) -> str | None:
    """Factors told from others cheaply, as checkpoint_signature tells checkpoints: sampled rows of
    every tensor scoring reads (bases, Λ, Adam's preconditioner), layer by layer; None for no Factors."""
    if not isinstance(factors, Factors):
        return None
    samples = (t if t.dim() < 2 else t[_sample_rows(t.shape[0])].flatten(1)[:, :_SIGNATURE_ROW_VALUES]
               for seg in factors.segments for _, lf in sorted(seg.items())
               for t in (lf.q_a, lf.q_s, lf.lam, lf.precond) if t is not None)
    return digest_tensors(samples)


def _sample_rows(n: int) -> list[int]:
    return sorted({round(i * (n - 1) / (_SIGNATURE_ROWS - 1)) for i in range(_SIGNATURE_ROWS)}) if n else []


def _tensor_samples(checkpoint: Checkpoint, what: str) -> Iterator[tuple[torch.dtype, tuple[int, ...], Tensor]]:
    """(dtype, shape, sampled values) of each tensor of a checkpoint, reading a file no further."""
    def sample(t: Tensor) -> Tensor:
        return t if t.dim() < 2 else t[_sample_rows(t.shape[0])].flatten(1)[:, :_SIGNATURE_ROW_VALUES]

    if isinstance(checkpoint, dict):
        yield from ((v.dtype, tuple(v.shape), sample(v)) for v in checkpoint.values() if isinstance(v, Tensor))
        return
    for path in checkpoint_files(checkpoint, what):
        if not path.endswith(".safetensors"):
            state = load_state_dict(path, what)
            yield from ((v.dtype, tuple(v.shape), sample(v)) for v in state.values() if isinstance(v, Tensor))
            continue
        from safetensors import safe_open

        with readable(path, what), safe_open(path, "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                if len(shape) < 2:
                    t = f.get_tensor(key)
                    yield t.dtype, shape, t
                    continue
                rows = torch.cat([piece[i : i + 1] for i in _sample_rows(shape[0])]) if shape[0] else f.get_tensor(key)
                yield rows.dtype, shape, rows.flatten(1)[:, :_SIGNATURE_ROW_VALUES]


def warn_batchnorm(model: nn.Module) -> None:
    """Fitting and scoring run the model in eval mode, as kronfluence does; training normalised each
    batch by its own statistics, so with BatchNorm the model attributed is the one evaluated."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    running = [n for n, m in norms if m.track_running_stats]
    batch = [n for n, m in norms if not m.track_running_stats]
    if running:
        warn(f"the model's BatchNorm modules ({running[:4]}{' ...' if len(running) > 4 else ''}) run in eval mode here, "
             "with their running statistics (training normalised each batch by its own): factors and scores are those "
             "of the model as it is evaluated; BatchNorm's own weight and bias are not tracked")
    if batch:
        warn(f"the model's BatchNorm modules ({batch[:4]}{' ...' if len(batch) > 4 else ''}) keep no running statistics, "
             "so even in eval mode they normalise each batch by its own: an example's gradient depends on the others "
             "in its batch, and the scores on batch_size")


def _warn_repeated(signatures: list[list[str]]) -> None:
    """Consecutive checkpoints with the same weights: most likely one given twice (the final weights
    as the last of C saved checkpoints and again as a file of their own), which shifts the steps
    Trajectory.even takes each checkpoint to be saved after; a stretch trained at rate 0 also does it."""
    order = [(f"segment {ell}, checkpoint {c}", sig) for ell, seg in enumerate(signatures) for c, sig in enumerate(seg)]
    for (first, a), (second, b) in zip(order, order[1:]):
        if a == b:
            warn(f"{first} and {second} hold the same weights: the same checkpoint given twice? Trajectory.even takes "
                 "C checkpoints as saved evenly over the run (or at steps=), so a repeated one shifts the others")


def _checkpoint_digests(trajectory: Trajectory, digest: Callable[[Checkpoint, str], str] | None = None
                        ) -> list[list[str]]:
    """digest (default: the full _checkpoint_digest) of every checkpoint, per segment."""
    digest = digest or _checkpoint_digest
    return [[digest(c, f"segment {ell}, checkpoint {i}") for i, c in enumerate(seg.checkpoints)]
            for ell, seg in enumerate(trajectory.segments)]


def _checkpoint_digest(checkpoint: Checkpoint, what: str) -> str:
    """A checkpoint by content: every tensor with its name, dtype and shape, in name order, so the same
    weights are the same checkpoint whether a file (either format, anywhere) or a state_dict in any
    key order. One read of each, less than a data pass."""
    state = load_state_dict(checkpoint, what)
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if isinstance(value, Tensor):
            h.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
            h.update(digest_tensors([value]).encode())
    return h.hexdigest()[:16]


def _covariances(model, task, specs, loader, objective, what, progress, expected: int | None = None,
                 first: int | None = 0):
    """Sums of a aᵀ (ones column last) over the unmasked rows and of g gᵀ over all rows (zero where padded,
    unless the loss reads padding), each divided by the unmasked rows, as kronfluence does; every layer at once,
    and the row counts. expected: the segment's N_ℓ, checked against the examples read."""
    dtype = factor_dtype(model)
    device = next(model.parameters()).device
    # float32 accumulators (the kernels' contract); float64 for a float64 model (exact references).
    a_sum = {s.name: torch.zeros(s.d_a, s.d_a, device=device, dtype=dtype) for s in specs}
    s_sum = {s.name: torch.zeros(s.d_out, s.d_out, device=device, dtype=dtype) for s in specs}
    rows = dict.fromkeys((s.name for s in specs), 0)
    examples = 0
    bar = _progress(progress, _share(loader, expected), f"covariances ({what})")
    for _, n, rec in run_pass(model, task, specs, loader, objective, what, bar, first):
        examples += n
        covs, xs, masks, ones = [], [], [], []
        for s in specs:
            r = rec[s.name]
            m = None if r.mask is None else r.mask.reshape(-1)
            rows[s.name] += r.a.shape[0] * r.a.shape[1] if m is None else (m != 0).sum()  # on device: no sync
            covs += [a_sum[s.name], s_sum[s.name]]
            xs += [r.a.reshape(-1, s.d_in), r.g.reshape(-1, s.d_out)]
            masks += [m, None]  # kronfluence's: padded inputs out of A; gradients all in S (zero unless read)
            ones += [s.has_bias, False]
        ops.covariance_accumulate_(covs, xs, masks, ones)
    if bar is not None:
        bar.close()
    all_reduce_sum_([*a_sum.values(), *s_sum.values()])
    rows = {k: all_reduce_int(int(v), device) for k, v in rows.items()}
    _check_count(all_reduce_int(examples, device), expected, what)
    for s in specs:
        if rows[s.name] == 0:
            raise ValueError(f"{what}: module {s.name!r} saw no unmasked rows")
    return (  # divided in place: a new copy of every factor costs a page fault per 4 KiB on the CPU
        {k: v.div_(rows[k]) for k, v in a_sum.items()},
        {k: v.div_(rows[k]) for k, v in s_sum.items()},
        {k: torch.tensor([v], dtype=torch.int64) for k, v in rows.items()},  # a tensor, so resume_dir keeps it
    )


def _lambdas(model, task, specs, loader, objective, q_a, q_s, what, progress, expected: int | None = None,
             first: int | None = 0):
    """Λ = mean over examples of (Q_Sᵀ G_n Q_A)²: rotate the token matrices, then reduce per example.
    q_a = q_s = None: mean of G_n² (the diagonal Fisher in the parameter basis).
    expected: the segment's N_ℓ; a pass that read another number of examples is an error."""
    dtype = factor_dtype(model)
    device = next(model.parameters()).device
    lam = {s.name: torch.zeros(s.d_out, s.d_a, device=device, dtype=dtype) for s in specs}
    count = 0
    bar = _progress(progress, _share(loader, expected), f"eigenvalue corrections ({what})")
    for _, n, rec in run_pass(model, task, specs, loader, objective, what, bar, first):
        for s in specs:
            r = rec[s.name]
            a = with_ones(r.a, s)
            # Rotating the token matrices first (two GEMMs over all rows) is what lets Λ avoid
            # per-example d_out × d_a gradients; matmuls in the data dtype accumulate in fp32.
            # Without bases (a diagonal curvature) Λ is in the parameter basis.
            a, g = (a, r.g) if q_a is None else (rotate(a, q_a[s.name]), rotate(r.g, q_s[s.name]))
            ops.accumulate_lambda_(lam[s.name], a, g)
        count += n
    if bar is not None:
        bar.close()
    all_reduce_sum_(list(lam.values()))
    count = all_reduce_int(count, device)
    _check_count(count, expected, what)
    for name, value in lam.items():  # factors that would make every score inf or NaN are not returned
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"{what}: the eigenvalue corrections of module {name!r} are not finite (the "
                                     "layer's inputs or output gradients overflow in the model's dtype?)")
    return {k: v / count for k, v in lam.items()}


def _check_count(count: int, expected: int | None, what: str) -> None:
    if expected is not None and count != expected:
        raise ValueError(
            f"{what}: the data yielded {count} examples but the segment has num_examples={expected}; a stream must "
            "yield the same examples on every pass"
        )


def _adam_preconditioner(model: nn.Module, seg: Segment, specs: list[LayerSpec], what: str,
                         notes: set[str], steps_out: list[float]) -> dict[str, Tensor]:
    """P = 1/(√v̂ + ε) per tracked parameter, from each checkpoint's Adam state, averaged (d_out, d_a).
    Only the tracked layers' parameters need a state (a frozen or unused head has none). What
    deserves a warning goes into `notes`, once for the whole fit however many states repeat it.
    Each state's step count (its tracked parameters' largest) is appended to `steps_out`."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    needed = list(dict.fromkeys(f"{s.module}.{p}" for s in specs for p in (("weight", "bias") if s.has_bias else ("weight",))))
    out: dict[str, Tensor] = {}
    assert seg.optimizer_states is not None
    for c, st in enumerate(seg.optimizer_states):
        where = f"{what}, optimizer state {c}"
        if isinstance(st, torch.optim.Optimizer):
            raise TypeError(f"{where} is the optimizer itself: pass its state_dict(), saved with the checkpoint")
        state = zero_optimizer_state(st, where) if zero_folder(st) else load_dict(st, where, "optimizer")
        if "state" not in state or "param_groups" not in state:
            raise ValueError(f"{where} is not an optimizer state_dict (needs 'state', 'param_groups')")
        state = indexed_by_position(state)
        for g, group in enumerate(state["param_groups"]):
            why = not_adam(group)
            if why:
                raise ValueError(f"{where}: parameter group {g} is not Adam's or AdamW's ({why})")
        index = _optimizer_indices(model, state["param_groups"], where, by_name=bool(state.get(KEYED_BY_NAME)))
        index_group = {i: g for g in state["param_groups"] for i in g["params"]}
        p_by_name, wd_by_name, steps = {}, {}, []
        for name in needed:
            i = index.get(name)
            group = index_group.get(i)
            # AMSGrad divides by the running maximum of the second moment, not the moment itself.
            moment = "max_exp_avg_sq" if group is not None and group.get("amsgrad") else "exp_avg_sq"
            s = state["state"].get(i) if i is not None else None
            if s is None or moment not in s:
                raise ValueError(f"{where} has no {moment} for tracked parameter {name!r}: if the optimizer did not "
                                 "train it (frozen), leave its module out of the task's get_influence_tracked_modules")
            if tuple(s[moment].shape) != tuple(params[name].shape):
                raise ValueError(f"{where}: the {moment} it holds for parameter {name!r} has shape "
                                 f"{tuple(s[moment].shape)}, the parameter {tuple(params[name].shape)}")
            decoupled = group.get("decoupled_weight_decay")
            if decoupled is not None and decoupled != (seg.optimizer == "adamw") and group.get("weight_decay"):
                raise ValueError(
                    f"{where}: parameter {name!r} was trained with "
                    f"{'decoupled (AdamW)' if decoupled else 'L2 (Adam)'} weight decay, but the segment says "
                    f"optimizer={seg.optimizer!r}"
                )
            step = float(s.get("step", 0))
            if not step >= 1:
                raise ValueError(f"{where}: parameter {name!r} records step {s.get('step')!r}; Adam's bias correction "
                                 "needs the number of steps taken (≥ 1)")
            if not bool(torch.isfinite(s[moment]).all()) or bool((s[moment] < 0).any()):
                raise ValueError(f"{where}: the {moment} of parameter {name!r} holds NaN, infinite or negative values "
                                 "(a diverged run?)")
            steps.append(step)
            v_hat = s[moment].double() / (1 - group["betas"][1] ** step)
            p_by_name[name] = 1.0 / (v_hat.sqrt() + group["eps"])
            wd_by_name[name] = float(group.get("weight_decay", 0.0))
        _check_weight_decay(specs, wd_by_name, seg, where, notes)
        steps_out.append(max(steps))  # checked against each other and the rates: _check_adam_steps
        lrs = {float(index_group[index[name]]["lr"]) for name in needed}
        if len(lrs) > 1:  # the segment's one learning-rate sum (its horizon) applies to every layer
            notes.add(f"the tracked parameters' optimizer groups have different learning rates {sorted(lrs)}; "
                      "a segment's lr_sum applies to all of them")
        for spec in specs:
            out[spec.name] = out.get(spec.name, 0) + spec.param_matrix(p_by_name).double() / len(seg.optimizer_states)
    return out


def _check_adam_steps(trajectory: Trajectory, state_steps: list[list[float]], notes: set[str]) -> None:
    """The step counts Adam's states record (each state's largest). Saved with each checkpoint they go
    up, unless the optimizer was restarted: a decrease inside a segment is a mistake in order (states
    reversed with their checkpoints) or a restart, which is better a segment boundary (each state's
    bias correction uses its own step either way). Between two checkpoints of one Trajectory.even run
    the states cannot record more steps than the learning rates put there (more: rates given per
    epoch or per checkpoint, not per optimizer step, so every c is that much too small); fewer is a
    restarted optimizer or rates per micro-batch."""
    previous = None  # (where, its state's step, (run, the step its checkpoint was saved after))
    for ell, (seg, steps) in enumerate(zip(trajectory.segments, state_steps)):
        for c in range(1, len(steps)):
            if steps[c] < steps[c - 1]:
                notes.add(f"segment {ell}, optimizer state {c} records step {steps[c]:g}, but optimizer state {c - 1} "
                          f"before it records step {steps[c - 1]:g}: give the states, like the checkpoints, in "
                          "training order (a restarted optimizer is best where a segment starts)")
        if seg.saved_after is None:
            previous = None
            continue
        run, saved = seg.saved_after
        for c, step in enumerate(steps):
            where = f"segment {ell}, optimizer state {c}"
            if previous is not None and previous[2][0] is run and step >= previous[1]:
                taken, given = step - previous[1], saved[c] - previous[2][1]
                said = (f"{where} records step {step:g} and {previous[0]} step {previous[1]:g}: {taken:g} optimizer "
                        f"steps between their checkpoints, where the learning rates have {given} (checkpoints after "
                        f"rates {previous[2][1]} and {saved[c]})")
                if taken > given:
                    raise ValueError(f"{said}; give lrs one rate per optimizer step (and steps= the step each "
                                     "checkpoint was saved after, if not evenly spaced)")
                if taken < given:
                    notes.add(f"{said}: rates per micro-batch, not per optimizer step? (or a restarted optimizer)")
            previous = (where, step, (run, saved[c]))


def not_adam(group: dict) -> str | None:
    """Why an optimizer state's parameter group is not Adam's or AdamW's, or None when it is.
    NAdam's, RAdam's and Adamax's states also hold betas (and the first two exp_avg_sq), but their
    steps are not Adam's: NAdam's groups have momentum_decay, the others are torch's (differentiable)
    without amsgrad. Other libraries' Adams (transformers', DeepSpeed's) have no amsgrad either, nor
    the differentiable flag: read as Adams without AMSGrad."""
    missing = sorted({"betas", "eps"} - set(group))
    if missing:
        return f"it lacks {missing}"
    if "momentum_decay" in group or ("differentiable" in group and "amsgrad" not in group):
        return "its steps are another Adam variant's: NAdam's, RAdam's or Adamax's"
    if group.get("correct_bias", True) is False or group.get("bias_correction", True) is False:
        return "it skips Adam's bias correction, which P = 1/(√v̂ + ε) assumes"
    if group.get("maximize"):
        return "it maximizes the objective (maximize=True): every step goes up the gradient"
    return None


KEYED_BY_NAME = "source_fast_keyed_by_name"  # marks a state indexed_by_position numbered from names


def indexed_by_position(state: dict) -> dict:
    """An optimizer state_dict keyed by parameter names, as FSDP gives the whole state
    (FSDP.optim_state_dict, get_optimizer_state_dict(full_state_dict=True)), in torch's own form: the
    states numbered group after group, each group's names kept as its param_names."""
    groups = state["param_groups"]
    if not any(g["params"] and isinstance(g["params"][0], str) for g in groups):
        return state
    index: dict[str, int] = {}
    numbered = [{**g, "params": [index.setdefault(n, len(index)) for n in g["params"]], "param_names": list(g["params"])}
                for g in groups]
    # FSDP orders the states by its own units, not as the model's parameters: never read by position.
    return {"state": {index[k]: v for k, v in state["state"].items() if k in index}, "param_groups": numbered,
            KEYED_BY_NAME: True}


def _optimizer_indices(model: nn.Module, groups: list[dict], where: str, by_name: bool = False) -> dict[str, int]:
    """Each parameter name's index in an optimizer state_dict. torch numbers the states group after
    group, so only the names torch records with each group (optimizers built from named parameters)
    say which state is whose; names recorded through a wrapper (DDP's `module.`, torch.compile's
    `_orig_mod.`, or one prefix all share, a LightningModule's attribute) are read without it. Without
    names, one group built from model.parameters() is read in that order (never a state `by_name`,
    FSDP's). The names of a tied weight all map to its one state."""
    # An optimizer never saw placeholders (kronfluence's _constant, added after training).
    params = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not is_placeholder(p)}
    order = [p for p in model.parameters() if not is_placeholder(p)]
    if all("param_names" in g for g in groups):
        recorded = [(unwrapped_name(n), i) for g in groups for n, i in zip(g["param_names"], g["params"])]
        prefix = extra_prefix([n for n, _ in recorded], params)
        recorded = [(n[len(prefix):], i) for n, i in recorded]
        unknown = [n for n, _ in recorded if n not in params]
        if not unknown:
            by_id = {id(params[n]): i for n, i in recorded}
            return {n: by_id[id(p)] for n, p in params.items() if id(p) in by_id}
        if by_name or len(groups) != 1 or len(recorded) != len(order):
            raise ValueError(f"{where} records parameter names the model does not have, e.g. {unknown[:3]}: build "
                             "the optimizer from the named parameters of the model given here")
    elif len(groups) != 1:
        raise ValueError(
            f"{where} has {len(groups)} parameter groups that do not record their parameters' names, so which "
            "state belongs to which parameter is unknown (torch numbers them group after group): build the "
            "optimizer from named parameters (torch.optim.AdamW(model.named_parameters()), or groups of "
            "(name, parameter) pairs), or add each group's names to the saved state as group['param_names']"
        )
    if len(groups[0]["params"]) != len(order):
        raise ValueError(
            f"{where} covers {len(groups[0]['params'])} parameters, the model has {len(order)}: build the "
            "optimizer from model.parameters(), or from named parameters so that its states say whose they are"
        )
    by_id = {id(p): i for p, i in zip(order, groups[0]["params"])}
    return {n: by_id[id(p)] for n, p in params.items() if id(p) in by_id}


def _check_weight_decay(specs: list[LayerSpec], wd_by_name: dict[str, float], seg: Segment, what: str,
                        notes: set[str]) -> None:
    """The segment's weight decay must be the one its optimizer applied to every tracked weight
    (torch's AdamW decays by 0.01 unless told otherwise: a segment left at 0 would silently drop it).
    A bias decayed differently (often not at all) shares its layer's Kronecker-factored curvature,
    which can only give it the weight's decay: a warning says so."""
    odd_biases = []
    for name, has_bias in dict.fromkeys((s.module, s.has_bias) for s in specs):  # a grouped convolution's once
        wd, expected = wd_by_name[f"{name}.weight"], seg.decay(name)
        if not math.isclose(wd, expected, rel_tol=1e-9, abs_tol=0.0):
            fix = (f"weight_decay[{name!r}]={wd:g}" if isinstance(seg.weight_decay, dict)
                   else f"Segment(weight_decay={wd:g}), or a dict per tracked module if they differ")
            raise ValueError(
                f"{what}: parameter '{name}.weight' was trained with weight_decay={wd:g}, but the segment "
                f"says weight_decay={expected:g} for it; pass {fix}"
            )
        if has_bias and not math.isclose(wd_by_name[f"{name}.bias"], wd, rel_tol=1e-9, abs_tol=0.0):
            odd_biases.append(name)
    if odd_biases:
        notes.add(f"the biases of {odd_biases} were trained with another weight decay than their weights (as "
                  "Hugging Face's Trainer does); a layer's Kronecker-factored curvature gives its bias the weight's "
                  "decay: an approximation, nothing to change")
