"""kronfluence 1.0.x interoperability: its factor files, and an `Analyzer` that runs source_fast.

    from source_fast.interop.kronfluence import Analyzer, prepare_model   # was: from kronfluence import ...
    factors = load_factors("influence_results/run/factors_ekfac", model, task)   # their files → our Factors
    save_factors(factors, "influence_results/run/factors_mine")                 # our Factors → their files

kronfluence `Task` subclasses work unchanged: source_fast's Task protocol has the same methods
(`compute_train_loss(batch, model, sample)`, `compute_measurement`, `get_influence_tracked_modules`,
`get_attention_mask`).

Differences to know (the file format is in the project's shared KRONFLUENCE_FORMAT.md):
- Scale. kronfluence's score is ∇f(q)ᵀ (Λ/n + λ)⁻¹-preconditioned ∇L(m), NOT divided by the number of
  training examples N. source_fast's native `score`/`self_score` carry the 1/N (scores in the
  measurement's units): native = kronfluence / N, same sign. The `Analyzer` shim multiplies by N, so it
  returns and writes kronfluence's numbers.
- Tracked modules. With `get_influence_tracked_modules()` None, kronfluence tracks the leaf nn.Linear and
  nn.Conv2d modules only; source_fast's own default also tracks nn.Conv1d, transformers' Conv1D and
  layers with children. Everything here uses kronfluence's rule (`tracked_modules`); to score factors from
  `load_factors` natively, pass `kronfluence_task(model, task)` as the task.
- Masks. A mask applies by kronfluence's rule (`MaskWhereItFits`): to a module where it has one
  entry per example and token of the module's input; a module it does not fit is left unmasked (an
  encoder-decoder's decoder given only the encoder's mask), with a warning where kronfluence says
  nothing. A per-module dict masks the modules it names. source_fast's own functions refuse a mask
  that does not fit. Both libraries mask activations, not output gradients, in the covariances
  (dividing by the unmasked tokens), and neither in per-example gradients: a padded token's share of
  a gradient is zero unless the loss reads it (a classifier pooling a left-padded first token does).
- `amp_dtype` runs the task's forward passes under torch.autocast, as kronfluence does. When fitting
  under float16 autocast on CUDA the loss is scaled by `amp_scale` for the backward pass and the
  output gradients unscaled in float32, as kronfluence's GradScaler does (without CUDA it turns itself
  off, and so does the shim; kronfluence 1.0.1 never scales when scoring, nor does the shim). A float16
  model is not scaled: its output gradients are taken in float16 (kronfluence takes them in float32).
- Shared (re-used) modules are taken as with kronfluence's `has_shared_parameters=True`, whatever
  the flag: a per-example gradient sums over the module's calls (kronfluence 1.0.1's pairwise scores
  keep only one call's part of a shared module's score; its factors and self-influence sum them).
- Grouped convolutions and padding modes other than zeros are refused when tracked (kronfluence runs
  them with the groups' inputs averaged and zero padding, which is not their gradient): track the
  other modules (`get_influence_tracked_modules`). `enable_post_process_per_sample_gradient` and
  partition targets are not supported by the shim; it raises instead of silently computing
  something else. Per-module and per-token scores and aggregated query or training gradients are
  (source_fast's `per_module`, `per_token`, `sum_queries`, and a column sum).
- Strategies: all four of kronfluence's, ekfac, kfac (Λ = e_S e_Aᵀ), diagonal (Λ of the per-example
  gradients in the parameter basis) and identity (no preconditioning: method "grad_dot").
- torch.distributed: as kronfluence, every rank is given the whole dataset and the Analyzer splits it
  (contiguous shares; sums all-reduced, scores gathered, files written by rank 0). `prepare_model`
  adds kronfluence's unused `_constant` parameter to each tracked module so that the prepared model
  can be wrapped in DistributedDataParallel, as kronfluence's multi-process scripts do.
- Precision knobs (`*_dtype` fields other than `score_dtype` and `amp_dtype`) are not used, with a
  warning when one asks for another precision: source_fast computes in the model's dtype with float32
  accumulation (float64 for a float64 model, its factor files then float64 too, where kronfluence's
  defaults store float32) and float64 eigendecompositions; scores are cast to `score_dtype`. Partition
  and accumulation knobs only trade memory for passes in kronfluence and do not change results; they
  are ignored. `query_gradient_low_rank` maps to source_fast's `query_rank` (exact SVD, never
  randomized: kronfluence's `use_full_svd=True`). A model wrapped by torch.compile is analysed
  through the module it wraps (kronfluence's module names).
- Rows per example. Where tracked layers see several rows per example (a multiple-choice model runs
  batch × choices rows), source_fast scores whole examples: (n_query, n_train) scores, Λ of each
  example's gradient. kronfluence takes each row as an example: a row and a column per choice, Λ of
  each choice's gradient. The covariances agree; the scores and Λ differ.
- Attributes set on the arguments objects that are none of kronfluence's fields change nothing in
  either library; the shim names them (with the field meant, where one is close).
- Files. A stage (or scoring) that runs removes its old files, and the later stages' computed from
  them, before it computes: kronfluence skips a stage whose files exist, so a run stopped midway must
  not leave old files to be taken for the new data's.
- Batching. `per_device_batch_size=None` does not search for the largest batch: it means 32. Pairwise
  scoring holds as many prepared queries as fit in the larger of `per_device_query_batch_size`
  queries and source_fast's default query budget (1 GiB), and reads the training set once per such
  block: never more often than kronfluence, which reads it once per query batch.
- Token counts. `save_factors` writes covariance sums with the fit's row (unmasked token) counts, as
  kronfluence stores them; only factors that do not know their rows (from an older source_fast, or
  read from a directory without covariance files) are written with count = num_examples, which
  kronfluence, dividing sum by count, reads the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import os
import re
import types
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from .._dist import rank_and_world, same_on_all_ranks
from .._io import SAFETENSORS_TEMP, atomic_dir, atomic_path, own_temps, remove_stale_temps
from .._passes import LOSS_SCALE, check_collate_order, check_summed, model_device, rank_share, share_start, to_device
from .._warn import warn
from ..capture import CONVOLUTIONS, PLACEHOLDER, LayerSpec, MaskWhereItFits, tracked_layers
from ..factors import (Factors, LayerFactors, _covariances, _lambdas, eigendecompose, factor_dtype, pass_seed,
                       restored)
from ..scoring import DEFAULT_QUERY_MEMORY_BUDGET, score, self_score
from ..task import Task
from ..trajectory import Segment, Trajectory

__all__ = ["Analyzer", "FactorsNotFoundError", "kronfluence_task", "load_factors", "prepare_model", "save_factors",
           "tracked_modules"]

# kronfluence's file stems (kronfluence.utils.constants), one safetensors file each, keyed by module,
# in the groups its stages write and its loaders read.
A_COV, S_COV = "activation_covariance", "gradient_covariance"
A_COUNT, S_COUNT = "num_activation_covariance_processed", "num_gradient_covariance_processed"
Q_A, Q_S = "activation_eigenvectors", "gradient_eigenvectors"
E_A, E_S = "activation_eigenvalues", "gradient_eigenvalues"
LAMBDA, LAMBDA_COUNT = "lambda_matrix", "num_lambda_processed"
COVARIANCE_STEMS = (A_COV, S_COV, A_COUNT, S_COUNT)
EIGEN_STEMS = (Q_A, E_A, Q_S, E_S)
LAMBDA_STEMS = (LAMBDA, LAMBDA_COUNT)
STAGES = (COVARIANCE_STEMS, EIGEN_STEMS, LAMBDA_STEMS)  # each computed from the one before
FACTOR_ARGS_FILE = "factor_arguments.json"
SCORE_ARGS_FILE = "score_arguments.json"
MODEL_FILE = "model.safetensors"
ALL_MODULES = "all_modules"
DEFAULT_BATCH_SIZE = 32
# kronfluence's strategies (FactorConfig): the stages each fits, and the groups its scoring reads
# (requires_*_for_precondition). Only EK-FAC rotates the per-example gradients for Λ.
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
FITS = {"identity": (), "diagonal": (LAMBDA_STEMS,), "kfac": (COVARIANCE_STEMS, EIGEN_STEMS),
        "ekfac": (COVARIANCE_STEMS, EIGEN_STEMS, LAMBDA_STEMS)}
PRECONDITION_GROUPS = {"identity": (), "diagonal": ("lambda",), "kfac": ("eigendecomposition",),
                       "ekfac": ("eigendecomposition", "lambda")}
# Every file kronfluence writes in a factor directory (partitioned files before aggregation included).
_FACTOR_FILE = re.compile(
    rf"({'|'.join(COVARIANCE_STEMS + EIGEN_STEMS + LAMBDA_STEMS)})(_data_partition\d+_module_partition\d+)?"
    r"\.safetensors|factor(_loaded_\w+)?_arguments\.json|\w+_dataset_metadata\.json"
)

# FactorArguments / ScoreArguments of kronfluence 1.0.1 with their defaults: what a missing or
# duck-typed argument object stands for, and the complete JSON kronfluence's loaders accept.
FACTOR_DEFAULTS: dict[str, Any] = {
    "strategy": "ekfac",
    "use_empirical_fisher": False,
    "amp_dtype": None,
    "amp_scale": 2.0**16,
    "has_shared_parameters": False,
    "covariance_max_examples": 100_000,
    "covariance_data_partitions": 1,
    "covariance_module_partitions": 1,
    "activation_covariance_dtype": "torch.float32",
    "gradient_covariance_dtype": "torch.float32",
    "eigendecomposition_dtype": "torch.float64",
    "lambda_max_examples": 100_000,
    "lambda_data_partitions": 1,
    "lambda_module_partitions": 1,
    "use_iterative_lambda_aggregation": False,
    "offload_activations_to_cpu": False,
    "per_sample_gradient_dtype": "torch.float32",
    "lambda_dtype": "torch.float32",
}
SCORE_DEFAULTS: dict[str, Any] = {
    "damping_factor": 1e-8,
    "amp_dtype": None,
    "offload_activations_to_cpu": False,
    "data_partitions": 1,
    "module_partitions": 1,
    "compute_per_module_scores": False,
    "compute_per_token_scores": False,
    "query_gradient_accumulation_steps": 1,
    "query_gradient_low_rank": None,
    "use_full_svd": False,
    "aggregate_query_gradients": False,
    "aggregate_train_gradients": False,
    "use_measurement_for_self_influence": False,
    "query_gradient_svd_dtype": "torch.float32",
    "per_sample_gradient_dtype": "torch.float32",
    "precondition_dtype": "torch.float32",
    "score_dtype": "torch.float32",
}
# Score arguments kronfluence resets, with a warning, for self-influence (ScoreComputer.compute_self_scores).
SELF_IGNORED = {"query_gradient_accumulation_steps": 1, "query_gradient_low_rank": None,
                "aggregate_query_gradients": False, "aggregate_train_gradients": False,
                "compute_per_token_scores": False}


try:  # a script's `except kronfluence...FactorsNotFoundError` must catch the shim's
    from kronfluence.utils.exceptions import FactorsNotFoundError as _KronfluenceFactorsNotFoundError
except ImportError:  # the shim runs without kronfluence installed
    _KronfluenceFactorsNotFoundError = ValueError


class FactorsNotFoundError(_KronfluenceFactorsNotFoundError):
    """kronfluence's FactorsNotFoundError (a ValueError): a stage's input factors are missing."""


# ---- tracked modules ---------------------------------------------------------------------------


def tracked_modules(model: nn.Module, task: Task) -> list[str]:
    """The names of the modules kronfluence tracks for `task` on `model`: the task's
    `get_influence_tracked_modules()`, or when that is None every LEAF nn.Linear / nn.Conv2d
    (kronfluence.module.utils.wrap_tracked_modules). Named modules are taken as named (source_fast
    also supports transformers' Conv1D there; kronfluence does not)."""
    names = task.get_influence_tracked_modules()
    if names is not None:
        return list(names)
    names = [name for name, m in model.named_modules()
             if next(m.children(), None) is None and isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ValueError(
            "the model has no leaf nn.Linear or nn.Conv2d module, which is all kronfluence tracks by default; "
            "name the modules to track in task.get_influence_tracked_modules()"
        )
    return names


class _TaskView:
    """A task seen through a wrapper: what the wrapper does not define is the task's."""

    _task: Task

    def __getattr__(self, attr: str) -> Any:
        if attr == "_task":  # not set yet (copy and pickle build the object without __init__)
            raise AttributeError(attr)
        return getattr(self._task, attr)


class _AsKronfluence(_TaskView):
    """`task` as kronfluence runs it: `get_influence_tracked_modules()` fixed to `names`, and its
    attention masks applied by kronfluence's rule (MaskWhereItFits: a module whose inputs a mask does
    not fit is left unmasked); everything else is the task's."""

    def __init__(self, task: Task, names: list[str]) -> None:
        self._task, self._names = task, names

    def get_influence_tracked_modules(self) -> list[str]:
        return list(self._names)

    def get_attention_mask(self, batch: Any) -> MaskWhereItFits | None:
        mask = self._task.get_attention_mask(batch)
        return None if mask is None else MaskWhereItFits(mask)


def kronfluence_task(model: nn.Module, task: Task) -> Task:
    """`task` tracking exactly the modules kronfluence tracks on `model` (`tracked_modules`) and masking
    as kronfluence masks: the task to give source_fast's own functions along with factors from
    `load_factors`."""
    return _AsKronfluence(task, tracked_modules(model, task))  # type: ignore[return-value]


# ---- factor files ------------------------------------------------------------------------------


def _read(factors_dir: Path, stem: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = factors_dir / f"{stem}.safetensors"
    if not path.exists():
        partial = sorted(p.name for p in factors_dir.glob(f"{stem}_data_partition*.safetensors"))
        hint = f" (found unaggregated partitions {partial[:3]}: run kronfluence's aggregation first)" if partial else ""
        raise FileNotFoundError(f"kronfluence factor directory {str(factors_dir)!r} has no {path.name}{hint}")
    return load_file(str(path))


def _exist(factors_dir: Path, stems: tuple[str, ...]) -> bool:
    return all((factors_dir / f"{stem}.safetensors").exists() for stem in stems)


def _load_group(factors_dir: Path, stems: tuple[str, ...]) -> dict[str, dict[str, Tensor]] | None:
    """kronfluence's loaders: {stem: {module: tensor}} for a complete group of files, else None."""
    return {stem: _read(factors_dir, stem) for stem in stems} if _exist(factors_dir, stems) else None


def _write_group(factors_dir: Path, group: dict[str, dict[str, Tensor]], metadata: dict[str, str] | None) -> None:
    from safetensors.torch import save_file

    for stem, tensors in group.items():
        with atomic_path(factors_dir / f"{stem}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# Layers source_fast tracks and kronfluence does not: their factors would be missing there, silently.
UNTRACKED_BY_KRONFLUENCE = {"conv1d": "transformers Conv1D", "nn_conv1d": "torch nn.Conv1d"}


def _kronfluence_layers(layers: list[LayerSpec]) -> list[LayerSpec]:
    """`layers`, refused where one is a grouped convolution's group: kronfluence keeps one pair of factors
    for the module, from its inputs averaged over the groups, source_fast a pair per group."""
    grouped = list(dict.fromkeys(f"{s.module!r} (groups={s.groups})" for s in layers if s.groups > 1))
    if grouped:
        raise ValueError(
            f"modules {grouped[:4]} are grouped convolutions: source_fast fits Kronecker factors per group, kronfluence "
            "one pair per module from the inputs averaged over the groups (not the weights' gradient), so the "
            "kronfluence interop can neither reproduce kronfluence's factors and scores for them nor convert factor "
            "files; leave them out in get_influence_tracked_modules, or use source_fast's own fit_factors and score "
            "with the same task")
    return layers


def _module_tensor(files: dict[str, dict[str, Tensor]], stem: str, spec: LayerSpec, shape: tuple[int, ...],
                   factors_dir: Path) -> Tensor:
    """One module's tensor from one factor file, checked against the model's layer shape."""
    tensors = files[stem]
    if spec.name not in tensors:
        if spec.kind in UNTRACKED_BY_KRONFLUENCE:
            raise ValueError(
                f"{factors_dir / (stem + '.safetensors')} has no factor for module {spec.name!r}: it is a "
                f"{UNTRACKED_BY_KRONFLUENCE[spec.kind]}, which kronfluence does not track"
            )
        raise ValueError(
            f"{factors_dir / (stem + '.safetensors')} has no factor for module {spec.name!r} "
            f"(it has {sorted(tensors)[:8]}); were the factors fitted with the same tracked modules?"
        )
    t = tensors[spec.name]
    if tuple(t.shape) != shape:
        raise ValueError(
            f"module {spec.name!r}: {stem} has shape {tuple(t.shape)} in {str(factors_dir)!r} but the model's "
            f"layer ({spec.kind}, d_out={spec.d_out}, d_a={spec.d_a} with bias={spec.has_bias}) needs {shape}"
        )
    return t


def _count(files: dict[str, dict[str, Tensor]], stem: str, spec: LayerSpec, factors_dir: Path) -> int:
    n = int(_module_tensor(files, stem, spec, (1,), factors_dir).item())
    if n <= 0:
        raise ValueError(f"module {spec.name!r}: {stem} is {n} in {str(factors_dir)!r}; the factors are empty")
    return n


def _factor_args_json(factors_dir: Path) -> dict[str, Any]:
    """factor_arguments.json over kronfluence's defaults (what FactorArguments(**json) holds)."""
    path = factors_dir / FACTOR_ARGS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: kronfluence writes it with every factor directory (and reads it first, "
            "as source_fast does to know the strategy and the Fisher)"
        )
    return {**FACTOR_DEFAULTS, **json.loads(path.read_text())}


def _covariance_examples(factors_dir: Path, args: dict[str, Any]) -> int:
    """The examples kronfluence fitted a directory's covariances on (its dataset metadata and
    covariance_max_examples); 1 where the metadata is not there (covariances copied from another
    directory by load_from_factors_name)."""
    path = factors_dir / "covariance_dataset_metadata.json"
    if not path.exists():
        return 1
    size, limit = json.loads(path.read_text())["dataset_size"], args["covariance_max_examples"]
    return size if limit is None else min(size, limit)


def load_factors(factors_dir: str | os.PathLike, model: nn.Module, task: Task) -> Factors:
    """Reads a kronfluence `factors_<name>/` directory into one-segment source_fast Factors. Each of
    kronfluence's preconditioners is 1/(Λ + damping) in a basis, so `method="ekfac"` scores these as
    kronfluence scores the directory's strategy.

    Per tracked module (kronfluence's rule, `tracked_modules(model, task)`):
      a_cov (d_a, d_a) = activation_covariance / num_activation_covariance_processed
      s_cov (d_out, d_out) = gradient_covariance / num_gradient_covariance_processed
      q_a, q_s = kronfluence's eigenvectors as stored (so scores reproduce kronfluence's)
      lam (d_out, d_a) = lambda_matrix / num_lambda_processed          (strategy "ekfac")
                       = gradient_eigenvalues ⊗ activation_eigenvalues  ("kfac": K-FAC's Λ, e_S e_Aᵀ)
    "diagonal" has no Kronecker factors: a_cov, s_cov, q_a and q_s are None (identity bases), lam =
    lambda_matrix / num_lambda_processed (the mean squared per-example gradient, in the parameter basis). "identity" has no factors at all: score it with method="grad_dot".
    Without covariance files (kronfluence's fit_lambda_matrices(load_from_factors_name=...) writes
    none; scoring never reads them) a_cov and s_cov are rebuilt as Q diag(eigenvalues) Qᵀ and
    the row counts are unknown. Each module's tensors share the widest of their stored dtypes and
    float32 (bfloat16 covariances do not round a float32 Λ). Modules in the files that are not tracked
    are ignored, as kronfluence ignores them. num_examples is num_lambda_processed; "kfac" files count
    no examples, so there it is the covariances' (1 where their dataset metadata is missing), which
    only save_factors reads. Score with a one-checkpoint trajectory,
    `Trajectory([Segment([model.state_dict()], train_data, lr_sum=1.0)])`, method="ekfac", and
    `kronfluence_task(model, task)` as the task.
    """
    factors_dir = Path(factors_dir)
    if not factors_dir.is_dir():
        raise FileNotFoundError(f"kronfluence factor directory {str(factors_dir)!r} does not exist")
    args = _factor_args_json(factors_dir)
    strategy = args["strategy"]
    if strategy == "identity":
        raise ValueError(f"{factors_dir / FACTOR_ARGS_FILE}: strategy 'identity' preconditions with nothing, so "
                         "there are no factors to read; score with method='grad_dot' (kronfluence's scores / N)")
    if strategy not in STRATEGIES:
        raise ValueError(f"{factors_dir / FACTOR_ARGS_FILE}: unknown strategy {strategy!r}; kronfluence's are {STRATEGIES}")
    kronecker = strategy != "diagonal"
    has_cov = kronecker and _exist(factors_dir, COVARIANCE_STEMS)
    eigenvalues = kronecker and (strategy == "kfac" or not has_cov)
    stems: tuple[str, ...] = () if strategy == "kfac" else LAMBDA_STEMS
    if kronecker:
        stems += (COVARIANCE_STEMS if has_cov else ()) + (Q_A, Q_S) + ((E_A, E_S) if eigenvalues else ())
    files = {stem: _read(factors_dir, stem) for stem in stems}
    specs = _kronfluence_layers(tracked_layers(model, tracked_modules(model, task)))
    layers, num_examples = {}, None
    for s in specs:
        sq_a, sq_s = (s.d_a, s.d_a), (s.d_out, s.d_out)
        if eigenvalues:
            e_a, e_s = _module_tensor(files, E_A, s, (s.d_a,), factors_dir), _module_tensor(files, E_S, s, (s.d_out,), factors_dir)
        if strategy == "kfac":
            lam, stored = torch.outer(e_s.double(), e_a.double()), [e_a, e_s]  # kronfluence's Kfac.prepare, in float64
        else:
            raw = _module_tensor(files, LAMBDA, s, (s.d_out, s.d_a), factors_dir)
            n = _count(files, LAMBDA_COUNT, s, factors_dir)
            if num_examples is not None and n != num_examples:
                raise ValueError(f"module {s.name!r}: num_lambda_processed is {n}, other modules have {num_examples}")
            num_examples = n
            lam, stored = raw.double() / n, [raw]  # divided in float64, as kronfluence divides
        a_cov = s_cov = q_a = q_s = rows = None
        if kronecker:
            q_a, q_s = _module_tensor(files, Q_A, s, sq_a, factors_dir), _module_tensor(files, Q_S, s, sq_s, factors_dir)
            stored += [q_a, q_s]
            if has_cov:
                a_sum, s_sum = _module_tensor(files, A_COV, s, sq_a, factors_dir), _module_tensor(files, S_COV, s, sq_s, factors_dir)
                rows = _count(files, A_COUNT, s, factors_dir)
                a_cov, s_cov = a_sum.double() / rows, s_sum.double() / _count(files, S_COUNT, s, factors_dir)
                stored += [a_sum, s_sum]
            else:
                a_cov, s_cov = ((q.double() * e.double()) @ q.double().T for q, e in ((q_a, e_a), (q_s, e_s)))
                stored += [e_a, e_s]
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in stored), torch.float32)
        layers[s.name] = LayerFactors(*(None if t is None else t.to(dtype) for t in (a_cov, s_cov, q_a, q_s, lam)),
                                      rows=rows)
    if num_examples is None:  # kfac
        num_examples = _covariance_examples(factors_dir, args)
    return Factors(specs, [layers], [num_examples], [1], "empirical" if args["use_empirical_fisher"] else "true", False)


def _check_replaceable(factors_dir: Path) -> None:
    """save_factors replaces the whole directory: refuse one that holds anything but factor files."""
    if not factors_dir.exists():
        return
    if not factors_dir.is_dir():
        raise FileExistsError(f"{str(factors_dir)!r} exists and is not a directory")
    foreign = sorted(p.name for p in factors_dir.iterdir() if not (p.is_file() and _FACTOR_FILE.fullmatch(p.name)))
    if foreign:
        raise FileExistsError(
            f"{str(factors_dir)!r} holds more than kronfluence factor files ({foreign[:5]}), and save_factors "
            "replaces the whole directory: give it a factors_<name> folder of its own"
        )


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, torch.dtype) else value


def _args_dict(args: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """kronfluence's `Arguments.to_dict()` for an arguments object (or a duck-typed one, or None):
    the defaults, overridden by the object's fields, dtypes as strings like "torch.float32". An
    attribute that is none of kronfluence's fields (an older name, a typo) changes nothing, in either
    library: said, and kept in the dict as kronfluence's to_dict keeps it."""
    out = dict(defaults)
    if args is not None:
        fields = args.to_dict() if hasattr(args, "to_dict") else vars(args)
        kind = "FactorArguments" if defaults is FACTOR_DEFAULTS else "ScoreArguments"
        for k in fields:
            if k not in defaults:
                close = difflib.get_close_matches(k, defaults, n=1)
                warn(f"{kind} has {k!r}, which is not one of kronfluence 1.0.1's fields: it changes nothing"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))
        out.update({k: _jsonable(v) for k, v in fields.items()})
    return out


def _str_dict(args: dict[str, Any]) -> dict[str, str]:
    """kronfluence's `Arguments.to_str_dict()`: the safetensors metadata of its factor and score files."""
    return {k: str(v) for k, v in args.items()}


def save_factors(factors: Factors, factors_dir: str | os.PathLike, *, factor_args: Any = None) -> None:
    """Writes one-segment EK-FAC Factors as a kronfluence `factors_<name>/` directory.

    The files are written to a temporary folder that then takes `factors_dir`'s place: an existing
    directory is exchanged in one atomic step on Linux (elsewhere it is missing for the moment
    between two renames; see `source_fast._io.atomic_dir`) and deleted. A directory that holds
    anything other than kronfluence's factor files is refused, not replaced.

    Files (keys = module names): covariance sums = mean × rows with counts = rows, the unmasked tokens
    of the fit (num_examples for factors that do not know their rows: kronfluence only uses
    sum / count), eigenvectors as they are, eigenvalues as the Rayleigh quotients diag(Qᵀ C Q) of those
    eigenvectors, lambda_matrix = Λ × N, num_lambda_processed = N, and factor_arguments.json
    (`factor_args`' fields over kronfluence's defaults; strategy and use_empirical_fisher always
    describe these factors). kronfluence's `Analyzer.compute_pairwise_scores(..., factors_name=...)`
    then reproduces source_fast's EK-FAC scores × N. Factors without eigenbases (read from a
    "diagonal" directory) are written as that strategy: lambda_matrix and its count only. (Factors read
    from a "kfac" directory are written as EK-FAC with Λ = e_S e_Aᵀ, which kronfluence scores the same.)
    """
    if len(factors.segments) != 1 or factors.layout != [1]:
        raise ValueError(
            f"kronfluence stores one EK-FAC at one checkpoint; these factors have {len(factors.segments)} segments "
            f"with {factors.layout} checkpoints (fit them on trajectory.final())"
        )
    if factors.average_params:
        raise ValueError(
            "these factors were fitted with average_params=True (Fast-SOURCE, at a segment's mean parameters), "
            "not as an EK-FAC at one checkpoint; fit them with average_params=False on trajectory.final()"
        )
    _kronfluence_layers(factors.layers)
    foreign = [f"{s.name!r} ({UNTRACKED_BY_KRONFLUENCE[s.kind]})" for s in factors.layers
               if s.kind in UNTRACKED_BY_KRONFLUENCE]
    if foreign:  # kronfluence would score without them, silently
        raise ValueError(f"modules {foreign[:4]} are layers kronfluence does not track, so its scores from these files "
                         "would leave them out: fit with `kronfluence_task(model, task)`, which tracks what kronfluence "
                         "tracks")
    layers = factors.segments[0]
    diagonal = any(lf.q_a is None for lf in layers.values())
    for name, lf in layers.items():
        if diagonal and lf.q_a is not None:
            raise ValueError(f"module {name!r} has Kronecker factors, other modules a diagonal curvature (no "
                             "eigenbases); kronfluence stores one strategy for all modules")
    factors_dir = Path(factors_dir)
    _check_replaceable(factors_dir)
    n = factors.num_examples[0]
    files: dict[str, dict[str, Tensor]] = {stem: {} for stem in (
        LAMBDA_STEMS if diagonal else COVARIANCE_STEMS + EIGEN_STEMS + LAMBDA_STEMS)}
    for name, lf in layers.items():
        if lf.precond is not None:
            warn(f"module {name!r}: the Adam preconditioner has no kronfluence counterpart; not written")
        lam = lf.lam.detach().cpu()
        files[LAMBDA][name] = (lam.double() * n).to(lam.dtype)
        files[LAMBDA_COUNT][name] = torch.tensor([n], dtype=torch.int64)
        if diagonal:
            continue
        rows = n if lf.rows is None else lf.rows
        for cov_stem, count_stem, q_stem, e_stem, cov, q in (
            (A_COV, A_COUNT, Q_A, E_A, lf.a_cov, lf.q_a),
            (S_COV, S_COUNT, Q_S, E_S, lf.s_cov, lf.q_s),
        ):
            cpu_cov, cpu_q = cov.detach().cpu(), q.detach().cpu()
            files[cov_stem][name] = (cpu_cov.double() * rows).to(cpu_cov.dtype)
            files[count_stem][name] = torch.tensor([rows], dtype=torch.int64)
            files[q_stem][name] = cpu_q
            qd = cpu_q.double()
            files[e_stem][name] = ((qd * (cpu_cov.double() @ qd)).sum(0)).to(cpu_cov.dtype)
    args = _args_dict(factor_args, FACTOR_DEFAULTS)
    args.update(strategy="diagonal" if diagonal else "ekfac", use_empirical_fisher=factors.fisher == "empirical")
    with atomic_dir(factors_dir) as tmp:
        _write_group(tmp, files, _str_dict(args))
        (tmp / FACTOR_ARGS_FILE).write_text(json.dumps(args, indent=4))


# ---- Analyzer shim -----------------------------------------------------------------------------


def prepare_model(model: nn.Module, task: Task) -> nn.Module:
    """kronfluence's `prepare_model`: eval mode, parameters and buffers frozen. Unlike kronfluence it
    installs no wrappers (source_fast hooks the layers during each pass); like kronfluence's wrapper it
    gives each tracked module a zero parameter `_constant` that trains and is never used, since
    DistributedDataParallel refuses a model with no parameter that trains, and kronfluence's
    multi-process scripts wrap the prepared model in it. It stays out of the model's state_dict (a
    checkpoint saved before or after loads either way) and never counts as training. The modules
    kronfluence would wrap (`tracked_modules`) are checked."""
    names = tracked_modules(model, task)
    _kronfluence_layers(tracked_layers(model, names))
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    for b in model.buffers():
        b.requires_grad = False
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if "_constant" in module._parameters:  # prepared once already
            continue
        constant = nn.Parameter(torch.zeros(1, dtype=module.weight.dtype, device=module.weight.device))
        setattr(constant, PLACEHOLDER, True)
        module.register_parameter("_constant", constant)
        module.register_state_dict_post_hook(_drop_constant)
        module.register_load_state_dict_pre_hook(_keep_constant)
    return model


def _drop_constant(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: Any) -> None:
    state_dict.pop(prefix + "_constant", None)


def _keep_constant(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    # A state_dict without it (every one: _drop_constant) loads, strictly, with the zero it holds.
    state_dict.setdefault(prefix + "_constant", module._constant.detach())


def _get(args: Any, field: str, defaults: dict[str, Any]) -> Any:
    return defaults[field] if args is None else getattr(args, field, defaults[field])


def _autocast_dtype(args: Any, defaults: dict[str, Any], model: nn.Module) -> torch.dtype | None:
    """The dtype kronfluence's `amp_dtype` autocasts the task's forward passes to (None: no autocast)."""
    amp = _get(args, "amp_dtype", defaults)
    if amp is None:
        return None
    amp = _dtype(amp)
    if amp not in (torch.bfloat16, torch.float16):
        # float32 autocast runs a 16-bit model's forward in float32 on CUDA; on the CPU torch warns and
        # turns it off, so it is not run there.
        return amp if next(model.parameters()).device.type == "cuda" else None
    return amp


class _Autocast(_TaskView):
    """`task` whose losses and measurements (the forward passes) run under torch.autocast, as
    kronfluence runs them with `amp_dtype`; backward passes and source_fast's own arithmetic stay outside
    it (factors accumulate in float32). `loss_scale` (kronfluence's `amp_scale` under float16 autocast
    on CUDA) scales the loss for the backward pass (source_fast._passes.LOSS_SCALE)."""

    def __init__(self, task: Task, device_type: str, dtype: torch.dtype, loss_scale: float = 1.0) -> None:
        self._task, self._device_type, self._dtype = task, device_type, dtype
        setattr(self, LOSS_SCALE, loss_scale)

    def compute_train_loss(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self._task.compute_train_loss(*args, **kwargs)

    def compute_measurement(self, *args: Any, **kwargs: Any) -> Tensor:
        with torch.autocast(self._device_type, dtype=self._dtype):
            return self._task.compute_measurement(*args, **kwargs)


def _unused_precisions(args: dict[str, Any], defaults: dict[str, Any], model: nn.Module) -> None:
    """kronfluence's *_dtype knobs other than score_dtype are not used (the module docstring says what
    source_fast computes in): say so when one is set to another precision than that, rather than let
    results differ silently."""
    used = str(factor_dtype(model))
    unused = sorted(k for k, v in args.items() if k.endswith("_dtype") and k not in ("score_dtype", "amp_dtype")
                    and v != defaults[k] and v != ("torch.float64" if k == "eigendecomposition_dtype" else used))
    if unused:
        warn(f"{', '.join(f'{k}={args[k]}' for k in unused)}: not used by source_fast, which computes "
             f"these in {used} for this model (float32 for 32- and 16-bit models, float64 for a float64 "
             "one) and eigendecompositions in float64; cast the model to change it")


def _no_partition_targets(target_data_partitions: Any, target_module_partitions: Any) -> None:
    for field, value in (("target_data_partitions", target_data_partitions),
                         ("target_module_partitions", target_module_partitions)):
        if value is not None:
            raise NotImplementedError(
                f"{field}={value!r} is not supported by source_fast's Analyzer: it computes all partitions in one "
                "call (partitions change nothing but kronfluence's memory use)"
            )


def _subset(dataset: Any, indices: Any) -> Any:
    return dataset if indices is None else Subset(dataset, list(indices))


def _limited(dataset: Any, limit: int | None) -> Any:
    """kronfluence's `*_max_examples`: the first `limit` examples (None: all)."""
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(limit))


def _save_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4))


def _save_or_compare(path: Path, obj: dict[str, Any], overwrite: bool, differs: str) -> None:
    """kronfluence's `_save_arguments` / `_save_dataset_metadata`: write `obj`, or when the file exists
    and not `overwrite`, refuse (ValueError) if it holds something else."""
    obj = json.loads(json.dumps(obj))  # as it would read back (tuples become lists)
    if path.exists() and not overwrite:
        saved = json.loads(path.read_text())
        if saved != obj:
            raise ValueError(f"{differs} (`{path}`). Set `overwrite_output_dir=True` to overwrite the existing "
                             f"experiment.\nNew: {obj}\nSaved: {saved}")
    else:
        _save_json(obj, path)


def _save_dataset_metadata(name: str, dataset: Any, indices: Any, out: Path, overwrite: bool) -> None:
    meta = {"type": type(dataset).__name__, "dataset_size": len(dataset),
            "indices": None if indices is None else [int(i) for i in indices]}
    _save_or_compare(out / f"{name}_dataset_metadata.json", meta, overwrite,
                     "Attempting to use the dataset that differs from the one already saved")


def _save_arguments(path: Path, args: dict[str, Any], overwrite: bool) -> None:
    _save_or_compare(path, args, overwrite, "New arguments differ from saved arguments")


def _save_scores(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load_scores(path: Path) -> dict[str, Tensor] | None:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.exists() else None


def _dtype(value: Any) -> torch.dtype:
    """A dtype field: a torch.dtype, or its string as the JSON files hold it ("torch.float32")."""
    return value if isinstance(value, torch.dtype) else getattr(torch, str(value).removeprefix("torch."))


def _arguments(cls_name: str, fields: dict[str, Any]) -> Any:
    """kronfluence's FactorArguments / ScoreArguments when kronfluence is installed, else a namespace.
    Fields that are not the class's (written from an attribute set on it: _args_dict said so) are
    left out, where kronfluence's loader fails on them."""
    try:
        from kronfluence import arguments
    except ImportError:
        return types.SimpleNamespace(**fields)
    cls = getattr(arguments, cls_name)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in known})


def _kronfluence_state_dict(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """The state_dict kronfluence's `_save_model` writes for the prepared model: its TrackedModule
    wrapper puts each tracked module X's tensors under X.original_module and adds X._constant = zeros(1)."""
    tracked = set(names)
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        # Cloned (as kronfluence does): safetensors refuses tensors that share memory (tied weights).
        out[f"{module}.original_module.{leaf}" if module in tracked else key] = value.detach().cpu().clone()
    modules = dict(model.named_modules())
    for name in names:
        out[f"{name}._constant"] = torch.zeros(1, dtype=modules[name].weight.dtype)
    return out


def _same_model(saved: dict[str, Tensor], current: dict[str, Tensor]) -> bool:
    """kronfluence's verify_models_equivalence: same keys, values allclose in float32 on the CPU."""
    return saved.keys() == current.keys() and all(
        torch.allclose(saved[k].float().cpu(), current[k].float().cpu(), rtol=1.3e-6, atol=1e-5) for k in saved
    )


def _start_process_group(cpu: bool) -> None:
    """Under torchrun without a process group, start one, as kronfluence's Analyzer does (through
    accelerate): NCCL between GPUs (each rank's is chosen by _device), gloo on the CPU."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if not cpu and torch.cuda.is_available() else "gloo")


def _device(model: nn.Module, cpu: bool) -> torch.device:
    """kronfluence's device: the CPU with cpu=True or without CUDA; else the GPU the model is on, or
    this rank's (LOCAL_RANK under torchrun, where it is made the current device: NCCL's collectives
    run there), or the current one."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    on = next(model.parameters()).device
    if on.type == "cuda":
        device = on
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if rank_and_world()[1] > 1:
        torch.cuda.set_device(device)
    return device


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module DistributedDataParallel or torch.compile wraps (kronfluence's scripts wrap the prepared
    model in either): the same parameters, under the names kronfluence keys its files by."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    while True:
        if isinstance(model, FullyShardedDataParallel):
            raise NotImplementedError("FullyShardedDataParallel models are not supported by source_fast's Analyzer "
                                      "(each rank needs the whole model): pass the unwrapped model, or wrap it in "
                                      "DistributedDataParallel")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _method(factors: Factors | None, score_args: dict[str, Any]) -> tuple[str, Any]:
    """source_fast's method and damping for kronfluence's score arguments: EK-FAC's 1/(Λ + damping)
    serves the ekfac, kfac and diagonal strategies (load_factors); identity (no factors) is the plain
    gradient dot product, which takes no damping (kronfluence ignores damping_factor there)."""
    if factors is None:
        return "grad_dot", None
    damping = score_args["damping_factor"]
    return "ekfac", "heuristic" if damping is None else float(damping)


class State:
    """kronfluence's `Analyzer.state`, for scripts that read it (`if analyzer.state.is_main_process:`):
    this process's place among torch.distributed's ranks, and its device."""

    def __init__(self, cpu: bool, rank: int, world: int, device: torch.device) -> None:
        self.cpu, self.device = cpu, device
        self.process_index, self.num_processes = rank, world
        self.local_process_index = int(os.environ.get("LOCAL_RANK", -1)) if world > 1 else 0
        self.n_gpus = torch.cuda.device_count()

    @property
    def use_distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        return self.local_process_index == 0

    @property
    def is_last_process(self) -> bool:
        return self.process_index == self.num_processes - 1

    def wait_for_everyone(self) -> None:
        if self.use_distributed:
            dist.barrier()


class Analyzer:
    """kronfluence's `Analyzer`, computed by source_fast's engine (method="ekfac" for kronfluence's
    ekfac, kfac and diagonal strategies, "grad_dot" for identity).

    Same constructor, same method names and arguments (FactorArguments / ScoreArguments from
    kronfluence, or any objects with those fields), same output layout:
      <output_dir>/<analysis_name>/factors_<name>/   kronfluence's factor files, stage by stage
      <output_dir>/<analysis_name>/scores_<name>/pairwise_scores.safetensors  {"all_modules": (n_query, n_train)}
      <output_dir>/<analysis_name>/scores_<name>/self_scores.safetensors      {"all_modules": (n_train,)}
    with kronfluence's argument and dataset-metadata JSON files (an existing one that differs is an
    error unless `overwrite_output_dir`), and scores in kronfluence's convention (NOT divided by N).
    Factors written by kronfluence itself can be scored here, and kronfluence can score factors
    fitted here.

    Under torch.distributed (torchrun, the model wrapped in DistributedDataParallel or not; a process
    group is started, as kronfluence starts one, where the script did not) the work is split as
    kronfluence splits it: every rank is given the whole dataset and fits on, and scores, a
    contiguous share of it; the sums are all-reduced and the scores gathered, rank 0 writes the files
    (to storage every rank reads) and every rank returns the whole result.
    """

    def __init__(
        self,
        analysis_name: str,
        model: nn.Module,
        task: Task,
        cpu: bool = False,
        log_level: int | None = None,
        log_main_process_only: bool = True,
        profile: bool = False,
        disable_tqdm: bool = False,
        output_dir: str = "./influence_results",
        disable_model_save: bool = True,
    ) -> None:
        del log_level, log_main_process_only  # kronfluence's logging knobs
        if profile:
            warn("profile=True: source_fast's Analyzer has no profiler; no profiler_output is written")
        model = _unwrapped(model)
        if getattr(task, "enable_post_process_per_sample_gradient", False):
            raise NotImplementedError("tasks with enable_post_process_per_sample_gradient are not supported")
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "original_module")]
        if wrapped:
            raise ValueError(
                f"the model has kronfluence TrackedModule wrappers ({wrapped[:3]}...): prepare it with "
                "source_fast.interop.kronfluence.prepare_model, not kronfluence's"
            )
        _start_process_group(cpu)
        self.model = model.to(_device(model, cpu))
        self.task = task
        self._names = tracked_modules(model, task)
        self._task = _AsKronfluence(task, self._names)  # what source_fast runs: kronfluence's tracked modules
        self._specs = _kronfluence_layers(tracked_layers(model, self._names))
        self.progress = not disable_tqdm
        self.output_dir = Path(output_dir).joinpath(analysis_name).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._dataloader_kwargs: Any = None
        self._rank, self._world = rank_and_world()
        self.state = State(cpu, self._rank, self._world, model_device(self.model))
        if not disable_model_save:
            self._rank0(self._save_model)

    def _rank0(self, write: Callable[[], None]) -> None:
        """write() on rank 0 alone under torch.distributed (files are written once, as kronfluence's main
        process writes them); then every rank goes on together, and an error rank 0 met is raised on
        every rank (none is left waiting for it)."""
        if self._world == 1:
            write()
            return
        error = None
        if self._rank == 0:
            try:
                write()
            except Exception as exc:  # noqa: BLE001 (raised below, on every rank)
                error = exc
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise error if error is not None else box[0]

    def _same_on_ranks(self, data: Any, what: str) -> None:
        """Under torch.distributed every rank must be given the same dataset (and indices): its length
        and the indices' digest are compared, on every rank together."""
        if self._world == 1:
            return
        digest = zlib.crc32(json.dumps([int(i) for i in data.indices]).encode()) if isinstance(data, Subset) else 0
        device = next(self.model.parameters()).device
        if not (same_on_all_ranks(len(data), device) and same_on_all_ranks(digest, device)):
            raise ValueError(f"rank {self._rank}: the ranks were given different {what} datasets or indices (this "
                             f"rank's has {len(data)} examples): give every rank the whole dataset; the Analyzer "
                             "splits it")

    def _share(self, data: Any) -> Any:
        """This rank's contiguous share of `data` under torch.distributed (all of it in one process).
        Every rank must be given the whole dataset, as kronfluence splits it itself."""
        if self._world == 1:
            return data
        self._same_on_ranks(data, "training")
        if len(data) < self._world:
            raise ValueError(f"{len(data)} examples for {self._world} ranks: run on fewer ranks")
        return rank_share(data)

    def _save_model(self) -> None:
        """kronfluence's `_save_model`: model.safetensors with its key names, or a check against it."""
        from safetensors.torch import load_file, save_file

        path = self.output_dir / MODEL_FILE
        state = _kronfluence_state_dict(self.model, self._names)
        if path.exists():
            if not _same_model(load_file(str(path)), state):
                raise ValueError(
                    f"Detected a difference between the current model and the one saved at `{path}`. "
                    "Consider using a different `analysis_name` to avoid conflicts."
                )
        else:
            with atomic_path(path) as tmp:
                save_file(state, str(tmp))

    def set_dataloader_kwargs(self, dataloader_kwargs: Any) -> None:
        """kronfluence's DataLoaderKwargs (or any object with DataLoader keyword fields), used by every
        call that is not given its own."""
        self._dataloader_kwargs = dataloader_kwargs

    def factors_output_dir(self, factors_name: str) -> Path:
        return self.output_dir / f"factors_{factors_name}"

    def scores_output_dir(self, scores_name: str) -> Path:
        return self.output_dir / f"scores_{scores_name}"

    def _loader(self, dataset: Any, batch_size: int | None, dataloader_kwargs: Any) -> DataLoader:
        """kronfluence's DataLoader: in order, every example, with all of the DataLoaderKwargs fields
        (source_fast reads a DataLoader that reads in order as it comes)."""
        kwargs = self._dataloader_kwargs if dataloader_kwargs is None else dataloader_kwargs
        fields = {} if kwargs is None else kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(vars(kwargs))
        return DataLoader(dataset, batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size, shuffle=False,
                          drop_last=False, **fields)

    def _modules_without_tokens(self, task: Task, loader: DataLoader) -> list[str]:
        """The tracked modules kronfluence scores whole, not per token, with compute_per_token_scores:
        convolutions, and linear layers whose input is not (batch, tokens, features). Their inputs are
        seen in one forward pass of the first batch."""
        dims: dict[str, int] = {}
        modules = dict(self.model.named_modules())

        def hook(name: str) -> Callable:
            def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                dims.setdefault(name, inputs[0].dim())
            return record

        batch = next(iter(loader), None)
        if batch is None:  # no queries: score() says so
            return []
        handles = [modules[s.name].register_forward_hook(hook(s.name)) for s in self._specs]
        training = self.model.training
        self.model.eval()  # as score() runs it: no dropout, no BatchNorm statistics updated
        try:
            with torch.no_grad():
                task.compute_measurement(to_device(batch, model_device(self.model)), self.model)
        finally:
            self.model.train(training)
            for h in handles:
                h.remove()
        # A module that did not run is score()'s to report.
        return [s.name for s in self._specs if s.kind in CONVOLUTIONS or dims.get(s.name, 3) != 3]

    def _checkpoint(self) -> dict[str, Tensor]:
        """The model's current weights, the one checkpoint of the EK-FAC trajectory. Not copied:
        source_fast puts the weights back after every pass."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    @contextlib.contextmanager
    def _seeded(self, kind: str):
        """One fitting pass: weights restored afterwards, labels sampled as fit_factors(seed=s) samples
        them for one checkpoint, s = torch.initial_seed() (what the caller's torch.manual_seed set, as
        kronfluence's sampling follows it; the caller's RNG state is left untouched)."""
        device = next(self.model.parameters()).device
        with restored(self.model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(pass_seed(torch.initial_seed(), 0, 0, kind, self._rank))  # ranks draw their own labels
            yield

    # ---- factors ---------------------------------------------------------------------------------

    def _task_for(self, args: Any, defaults: dict[str, Any], amp_scale: float = 1.0) -> Task:
        """The task as these arguments run it: under autocast with `amp_dtype`. When fitting (`amp_scale`
        given) under float16 autocast on CUDA, its loss is scaled by `amp_scale` for the backward pass,
        as kronfluence's GradScaler scales it (which turns itself off without CUDA; kronfluence 1.0.1
        never scales when scoring: its factor arguments come back from JSON with amp_dtype a string,
        which is never torch.float16). Not for a float16 model: its captured output gradients stay
        float16, so unscaling them would lose what the scaling kept (kronfluence takes them in float32)."""
        dtype = _autocast_dtype(args, defaults, self.model)
        if dtype is None:
            return self._task
        device = model_device(self.model)
        half = {p.dtype for p in self.model.parameters() if p.is_floating_point()} == {torch.float16}
        scale = float(amp_scale) if dtype == torch.float16 and device.type == "cuda" and not half else 1.0
        return _Autocast(self._task, device.type, dtype, scale)  # type: ignore[return-value]

    def _factor_args(self, factor_args: Any, out: Path, overwrite_output_dir: bool) -> dict[str, Any]:
        """The factor arguments as kronfluence's JSON, checked, and saved (or compared with the saved)."""
        strategy = _get(factor_args, "strategy", FACTOR_DEFAULTS)
        if strategy not in STRATEGIES:  # kronfluence fails on it later, with a KeyError
            raise ValueError(f"unknown strategy {strategy!r}: kronfluence's are {STRATEGIES}")
        args = _args_dict(factor_args, FACTOR_DEFAULTS)
        _unused_precisions(args, FACTOR_DEFAULTS, self.model)
        self._rank0(lambda: _save_arguments(out / FACTOR_ARGS_FILE, args, overwrite_output_dir))
        return args

    def _stage(self, factors_name: str, stems: tuple[str, ...], factor_args: Any,
               overwrite_output_dir: bool) -> tuple[Path, dict[str, Any]] | None:
        """A fitting stage's folder and checked arguments, or None when its files exist (kronfluence
        then skips the stage, unless overwrite_output_dir)."""
        out = self.factors_output_dir(factors_name)
        out.mkdir(parents=True, exist_ok=True)
        if _exist(out, stems) and not overwrite_output_dir:
            return None
        return out, self._factor_args(factor_args, out, overwrite_output_dir)

    def _clear(self, out: Path, stems: tuple[str, ...]) -> None:
        self._rank0(lambda: self._clear_files(out, stems))

    @staticmethod
    def _clear_files(out: Path, stems: tuple[str, ...]) -> None:
        """Before a stage computes (its checks passed): a stage whose files exist is skipped, so a run
        stopped in this one must not leave this stage's old files, or a later stage's, for the next run
        to take as this data's. Also the temp files of writes a killed run never finished (one run
        writes a folder at a time, as with kronfluence)."""
        for later in STAGES[STAGES.index(stems):]:
            for stem in later:
                (out / f"{stem}.safetensors").unlink(missing_ok=True)
        remove_stale_temps(out, own_temps(), SAFETENSORS_TEMP)

    def _save_loaded_arguments(self, stage: str, source: Path, out: Path) -> None:
        """kronfluence records the arguments of factors taken from another directory (always overwritten)."""
        _save_arguments(out / f"factor_loaded_{stage}_arguments.json", _factor_args_json(source), True)

    def fit_all_factors(
        self,
        factors_name: str,
        dataset: Any,
        per_device_batch_size: int | None = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Any = None,
        factor_args: Any = None,
        overwrite_output_dir: bool = False,
    ) -> None:
        """Covariances, eigendecomposition and Λ (empirical Fisher if `use_empirical_fisher`, else
        labels sampled by `compute_train_loss(..., sample=True)`), written as kronfluence's files by
        the three stages, as kronfluence runs them: each stage is skipped when its files exist (unless
        `overwrite_output_dir`), and otherwise first checks the factor arguments against the saved ones.
        `factor_args.strategy` is any of kronfluence's: "ekfac" fits all three, "kfac" the covariances
        and eigendecompositions, "diagonal" Λ in the parameter basis, "identity" nothing; a stage the
        strategy does not use saves the arguments and is skipped, as in kronfluence."""
        self.fit_covariance_matrices(factors_name, dataset, per_device_batch_size, initial_per_device_batch_size_attempt,
                                     dataloader_kwargs, factor_args, overwrite_output_dir=overwrite_output_dir)
        self.perform_eigendecomposition(factors_name, factor_args, overwrite_output_dir)
        self.fit_lambda_matrices(factors_name, dataset, per_device_batch_size, initial_per_device_batch_size_attempt,
                                 dataloader_kwargs, factor_args, overwrite_output_dir=overwrite_output_dir)

    def fit_covariance_matrices(
        self,
        factors_name: str,
        dataset: Any,
        per_device_batch_size: int | None = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Any = None,
        factor_args: Any = None,
        target_data_partitions: Any = None,
        target_module_partitions: Any = None,
        overwrite_output_dir: bool = False,
    ) -> None:
        """Activation and gradient covariance sums over the first `covariance_max_examples` examples,
        with their row (unmasked token) counts."""
        del initial_per_device_batch_size_attempt
        _no_partition_targets(target_data_partitions, target_module_partitions)
        stage = self._stage(factors_name, COVARIANCE_STEMS, factor_args, overwrite_output_dir)
        if stage is None:
            return
        out, args = stage
        if COVARIANCE_STEMS not in FITS[args["strategy"]]:  # kronfluence: arguments saved, stage skipped
            return
        self._rank0(lambda: _save_dataset_metadata("covariance", dataset, None, out, overwrite_output_dir))
        data = _limited(dataset, args["covariance_max_examples"])
        loader = self._loader(self._share(data), per_device_batch_size, dataloader_kwargs)
        objective = "train" if args["use_empirical_fisher"] else "fisher"
        task = self._task_for(factor_args, FACTOR_DEFAULTS, args["amp_scale"])
        # On the whole data, not this rank's share: every rank reaches the same verdict.
        whole = self._loader(data, per_device_batch_size, dataloader_kwargs)
        check_summed(self.model, task, whole, None, 0, "train")
        check_collate_order(whole, None, 0)
        self._clear(out, COVARIANCE_STEMS)
        with self._seeded("cov"):  # sums over every rank's share
            a_cov, s_cov, rows = _covariances(self.model, task, self._specs, loader, objective, "covariances",
                                              self.progress, expected=len(data), first=share_start(data))
        group: dict[str, dict[str, Tensor]] = {stem: {} for stem in COVARIANCE_STEMS}
        for s in self._specs:
            n = int(rows[s.name])
            for stem, count_stem, mean in ((A_COV, A_COUNT, a_cov[s.name]), (S_COV, S_COUNT, s_cov[s.name])):
                group[stem][s.name] = (mean.double() * n).to(mean.dtype)
                group[count_stem][s.name] = torch.tensor([n], dtype=torch.int64)
        self._rank0(lambda: _write_group(out, group, _str_dict(args)))

    def perform_eigendecomposition(
        self,
        factors_name: str,
        factor_args: Any = None,
        overwrite_output_dir: bool = False,
        load_from_factors_name: str | None = None,
    ) -> None:
        """Eigenvectors and eigenvalues of covariance / count (float64, symmetrized, stored in the
        covariances' dtype), from this directory's covariances or `load_from_factors_name`'s (copied here)."""
        stage = self._stage(factors_name, EIGEN_STEMS, factor_args, overwrite_output_dir)
        if stage is None:
            return
        out, args = stage
        if EIGEN_STEMS not in FITS[args["strategy"]]:
            return
        source = out if load_from_factors_name is None else self.factors_output_dir(load_from_factors_name)
        covs = _load_group(source, COVARIANCE_STEMS)
        if covs is None:
            raise FactorsNotFoundError(f"Covariance matrices not found at `{source}`. To perform eigendecomposition, "
                                       "covariance matrices need to be first computed.")
        # Each module's covariance and count, checked before anything is removed.
        means = {(s.name, q_stem, e_stem): (_module_tensor(covs, cov_stem, s, (d, d), source),
                                            _count(covs, count_stem, s, source))
                 for s in self._specs for cov_stem, count_stem, q_stem, e_stem, d in (
                     (A_COV, A_COUNT, Q_A, E_A, s.d_a), (S_COV, S_COUNT, Q_S, E_S, s.d_out))}
        self._clear(out, EIGEN_STEMS)
        device = next(self.model.parameters()).device
        # Under torch.distributed the ranks split the matrices and share the results; rank 0 writes them.
        found = eigendecompose([total for total, _ in means.values()], [total.dtype for total, _ in means.values()],
                               device, [count for _, count in means.values()])  # stored in the covariances' dtype

        def decompose() -> None:  # on rank 0 only: its files are what every rank reads next
            if load_from_factors_name is not None:
                _write_group(out, covs, None)
                self._save_loaded_arguments("covariance", source, out)
            group: dict[str, dict[str, Tensor]] = {stem: {} for stem in EIGEN_STEMS}
            for (name, q_stem, e_stem), (values, vectors) in zip(means, found):
                group[e_stem][name], group[q_stem][name] = values, vectors
            _write_group(out, group, _str_dict(args))

        self._rank0(decompose)

    def fit_lambda_matrices(
        self,
        factors_name: str,
        dataset: Any,
        per_device_batch_size: int | None = None,
        initial_per_device_batch_size_attempt: int = 4096,
        dataloader_kwargs: Any = None,
        factor_args: Any = None,
        target_data_partitions: Any = None,
        target_module_partitions: Any = None,
        overwrite_output_dir: bool = False,
        load_from_factors_name: str | None = None,
    ) -> None:
        """Λ sums over the first `lambda_max_examples` examples in this directory's eigenbasis or
        `load_from_factors_name`'s (copied here), with the example count; for the diagonal strategy
        in the parameter basis (the summed squared per-example gradients)."""
        del initial_per_device_batch_size_attempt
        _no_partition_targets(target_data_partitions, target_module_partitions)
        stage = self._stage(factors_name, LAMBDA_STEMS, factor_args, overwrite_output_dir)
        if stage is None:
            return
        out, args = stage
        strategy = args["strategy"]
        if LAMBDA_STEMS not in FITS[strategy]:
            return
        self._rank0(lambda: _save_dataset_metadata("lambda", dataset, None, out, overwrite_output_dir))
        # EK-FAC's Λ is in the eigenbasis; the diagonal strategy's in the parameter basis (no eigenbases).
        eigen, q_a, q_s = None, None, None
        if EIGEN_STEMS in FITS[strategy]:
            source = out if load_from_factors_name is None else self.factors_output_dir(load_from_factors_name)
            eigen = _load_group(source, EIGEN_STEMS)
            if eigen is None:
                raise FactorsNotFoundError(
                    f"Eigendecomposition results not found at `{source}`. To fit Lambda matrices for `{strategy}`, "
                    "eigendecomposition must be performed before computing Lambda matrices."
                )
            device, dtype = next(self.model.parameters()).device, factor_dtype(self.model)
            q_a = {s.name: _module_tensor(eigen, Q_A, s, (s.d_a, s.d_a), source).to(device, dtype) for s in self._specs}
            q_s = {s.name: _module_tensor(eigen, Q_S, s, (s.d_out, s.d_out), source).to(device, dtype)
                   for s in self._specs}
        data = _limited(dataset, args["lambda_max_examples"])
        loader = self._loader(self._share(data), per_device_batch_size, dataloader_kwargs)
        objective = "train" if args["use_empirical_fisher"] else "fisher"
        task = self._task_for(factor_args, FACTOR_DEFAULTS, args["amp_scale"])
        # On the whole data, not this rank's share: every rank reaches the same verdict.
        whole = self._loader(data, per_device_batch_size, dataloader_kwargs)
        check_summed(self.model, task, whole, None, 0, "train")
        check_collate_order(whole, None, 0)
        self._clear(out, LAMBDA_STEMS)
        if eigen is not None and load_from_factors_name is not None:
            def copy_eigen() -> None:
                _write_group(out, eigen, None)
                self._save_loaded_arguments("eigendecomposition", source, out)

            self._rank0(copy_eigen)
        with self._seeded("lam"):  # sums over every rank's share
            lam = _lambdas(self.model, task, self._specs, loader, objective, q_a, q_s, "Lambda matrices",
                           self.progress, expected=len(data), first=share_start(data))
        group = {
            LAMBDA: {name: (mean.double() * len(data)).to(mean.dtype) for name, mean in lam.items()},
            LAMBDA_COUNT: {name: torch.tensor([len(data)], dtype=torch.int64) for name in lam},
        }
        self._rank0(lambda: _write_group(out, group, _str_dict(args)))

    @staticmethod
    def get_module_summary(model: nn.Module) -> str:
        """kronfluence's summary of the leaf modules that have parameters (what a task may track)."""
        lines = ["==Model Summary=="]
        lines += [f"Module Name: `{name}`, Module: {module!r}" for name, module in model.named_modules()
                  if not any(module.children()) and any(True for _ in module.parameters())]
        return "\n".join(lines)

    def aggregate_covariance_matrices(self, factors_name: str) -> None:
        """kronfluence's aggregation of data-partitioned covariance files: nothing to do here, which
        writes every partition in one file (kronfluence does nothing either for unpartitioned fits)."""
        self._nothing_to_aggregate(self.factors_output_dir(factors_name) / FACTOR_ARGS_FILE, "factors", factors_name)

    def aggregate_lambda_matrices(self, factors_name: str) -> None:
        """As aggregate_covariance_matrices: nothing is partitioned."""
        self._nothing_to_aggregate(self.factors_output_dir(factors_name) / FACTOR_ARGS_FILE, "factors", factors_name)

    def aggregate_pairwise_scores(self, scores_name: str) -> None:
        """As aggregate_covariance_matrices: nothing is partitioned."""
        self._nothing_to_aggregate(self.scores_output_dir(scores_name) / SCORE_ARGS_FILE, "scores", scores_name)

    def aggregate_self_scores(self, scores_name: str) -> None:
        """As aggregate_covariance_matrices: nothing is partitioned."""
        self._nothing_to_aggregate(self.scores_output_dir(scores_name) / SCORE_ARGS_FILE, "scores", scores_name)

    @staticmethod
    def _nothing_to_aggregate(arguments: Path, what: str, name: str) -> None:
        if not arguments.exists():  # kronfluence's check before aggregating
            raise ValueError(f"Arguments for {what} with name `{name}` was not found when trying to aggregate {what}.")

    def load_factor_args(self, factors_name: str) -> Any:
        """factor_arguments.json as kronfluence's FactorArguments (a namespace without kronfluence), or None."""
        path = self.factors_output_dir(factors_name) / FACTOR_ARGS_FILE
        return _arguments("FactorArguments", json.loads(path.read_text())) if path.exists() else None

    def load_covariance_matrices(self, factors_name: str) -> dict[str, dict[str, Tensor]] | None:
        return _load_group(self.factors_output_dir(factors_name), COVARIANCE_STEMS)

    def load_eigendecomposition(self, factors_name: str) -> dict[str, dict[str, Tensor]] | None:
        return _load_group(self.factors_output_dir(factors_name), EIGEN_STEMS)

    def load_lambda_matrices(self, factors_name: str) -> dict[str, dict[str, Tensor]] | None:
        return _load_group(self.factors_output_dir(factors_name), LAMBDA_STEMS)

    def load_all_factors(self, factors_name: str) -> dict[str, dict[str, Tensor]]:
        """kronfluence's `load_all_factors`: {file stem: {module: tensor}} of the files its strategy
        preconditions with (EK-FAC: eigendecomposition and Λ). `load_factors` gives source_fast Factors."""
        factors_dir = self.factors_output_dir(factors_name)
        args = self.load_factor_args(factors_name)
        if args is None:
            raise FileNotFoundError(f"Factors with name `{factors_name}` was not found at `{factors_dir}`.")
        loaded: dict[str, dict[str, Tensor]] = {}
        for group in PRECONDITION_GROUPS[args.strategy]:
            found = {"eigendecomposition": self.load_eigendecomposition, "lambda": self.load_lambda_matrices}[group](
                factors_name)
            if found is None:
                raise FactorsNotFoundError(f"Strategy `{args.strategy}` requires {group} results. However, the "
                                           f"{group} results were not found at `{factors_dir}`.")
            loaded.update(found)
        return loaded

    # ---- scores ----------------------------------------------------------------------------------

    def _score_setup(self, out: Path, scores_file: str, factors_name: str, score_args: Any, overwrite_output_dir: bool,
                     datasets: dict[str, tuple[Any, Any]]) -> tuple[Factors | None, dict[str, Any]]:
        """kronfluence's order: the score arguments and the factors' arguments saved (or compared), the
        datasets' metadata likewise, then the factors loaded (None for the identity strategy, which has
        none). The old scores go (as the factors' stages do): a run stopped before writing them must not
        leave them to be returned as this run's."""
        factors_dir = self.factors_output_dir(factors_name)
        if not (factors_dir / FACTOR_ARGS_FILE).exists():
            raise FactorsNotFoundError(f"Factors with name `{factors_name}` not found at `{factors_dir}`.")
        strategy = _factor_args_json(factors_dir)["strategy"]
        if strategy not in STRATEGIES:
            raise ValueError(f"{factors_dir / FACTOR_ARGS_FILE}: unknown strategy {strategy!r}; kronfluence's are "
                             f"{STRATEGIES}")
        for group in PRECONDITION_GROUPS[strategy]:
            name, stems = {"eigendecomposition": ("Eigendecomposition", EIGEN_STEMS),
                           "lambda": ("Lambda", LAMBDA_STEMS)}[group]
            if not _exist(factors_dir, stems):  # kronfluence's error, and its type (a ValueError)
                raise FactorsNotFoundError(f"Strategy `{strategy}` requires {name} results. However, the {name} "
                                           f"results were not found at `{factors_dir}`.")
        args = _args_dict(score_args, SCORE_DEFAULTS)
        _unused_precisions(args, SCORE_DEFAULTS, self.model)

        def record() -> None:
            _save_arguments(out / SCORE_ARGS_FILE, args, overwrite_output_dir)
            _save_arguments(out / FACTOR_ARGS_FILE, _factor_args_json(factors_dir), overwrite_output_dir)
            for name, (dataset, indices) in datasets.items():
                _save_dataset_metadata(name, dataset, indices, out, overwrite_output_dir)

        self._rank0(record)
        factors = None if strategy == "identity" else load_factors(factors_dir, self.model, self._task)

        def clear() -> None:
            (out / scores_file).unlink(missing_ok=True)
            remove_stale_temps(out, own_temps(), SAFETENSORS_TEMP)

        self._rank0(clear)
        return factors, args

    def _query_budget(self, queries: int, rank: int | None) -> int:
        """The bytes `score` may hold for prepared queries: at least `queries` of them (the per-query
        size source_fast.scoring.query_blocks counts, one EK-FAC copy), as kronfluence holds a query
        batch, and at least source_fast's default budget, so a pass never holds fewer queries than
        either library would (each pass reads the whole training set)."""
        itemsize = factor_dtype(self.model).itemsize
        per_query = itemsize * sum(s.d_out * s.d_a if not rank else rank * (s.d_out + s.d_a) for s in self._specs)
        return max(queries * per_query, DEFAULT_QUERY_MEMORY_BUDGET)

    def compute_pairwise_scores(
        self,
        scores_name: str,
        factors_name: str,
        query_dataset: Any,
        train_dataset: Any,
        per_device_query_batch_size: int,
        per_device_train_batch_size: int | None = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        query_indices: Any = None,
        train_indices: Any = None,
        dataloader_kwargs: Any = None,
        score_args: Any = None,
        target_data_partitions: Any = None,
        target_module_partitions: Any = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, Tensor]:
        """EK-FAC influence of every training example on every query, kronfluence's scale:
        {"all_modules": (n_query, n_train)} = N × source_fast.score(method="ekfac"), in `score_dtype`
        ({module: ...} with `compute_per_module_scores`; (n_query, n_train, tokens) with
        `compute_per_token_scores`; one row for the summed queries with `aggregate_query_gradients`, one
        column for the summed training examples with `aggregate_train_gradients`).
        Also written to scores_<name>/pairwise_scores.safetensors; existing scores are returned unless
        overwrite. `use_measurement_for_self_influence` does not apply here and is ignored, as kronfluence does."""
        del initial_per_device_train_batch_size_attempt
        _no_partition_targets(target_data_partitions, target_module_partitions)
        out = self.scores_output_dir(scores_name)
        if (out / "pairwise_scores.safetensors").exists() and not overwrite_output_dir:
            return _load_scores(out / "pairwise_scores.safetensors")
        factors, args = self._score_setup(
            out, "pairwise_scores.safetensors", factors_name, score_args, overwrite_output_dir,
            {"query": (query_dataset, query_indices), "train": (train_dataset, train_indices)})
        task = self._task_for(score_args, SCORE_DEFAULTS)
        fitted = _factor_args_json(self.factors_output_dir(factors_name))
        for flag, source in (("aggregate_train_gradients", args), ("has_shared_parameters", fitted)):
            if args["compute_per_token_scores"] and source.get(flag):
                warn(f"per-token scores do not apply with {flag}=True: compute_per_token_scores is ignored, as "
                     "kronfluence does")
                args = {**args, "compute_per_token_scores": False}  # the scores' metadata records what was used
        queries = self._loader(_subset(query_dataset, query_indices), per_device_query_batch_size, dataloader_kwargs)
        per_token, tokenless = args["compute_per_token_scores"], []
        if per_token:  # kronfluence scores a module per token only where its input is (batch, tokens, features)
            tokenless = self._modules_without_tokens(task, queries)
            if not args["compute_per_module_scores"] and tokenless:
                if len(tokenless) < len(self._specs):  # kronfluence's error, and its type
                    raise RuntimeError(f"{tokenless} have no token axis: the model does not support token-wise score "
                                       "computation. Set `compute_per_module_scores=True` or "
                                       "`compute_per_token_scores=False` to avoid this error.")
                per_token, tokenless = False, []  # no module has tokens: kronfluence's scores are (n_query, n_train)
        # Under torch.distributed score() splits the training data across the ranks and gathers the columns.
        train = self._loader(_subset(train_dataset, train_indices), per_device_train_batch_size, dataloader_kwargs)
        rank = args["query_gradient_low_rank"]
        method, damping = _method(factors, args)
        scores = score(
            self.model, task, Trajectory([Segment([self._checkpoint()], train, lr_sum=1.0)]), factors, train,
            queries, method=method, damping=damping, query_rank=rank,
            progress=self.progress, query_memory_budget=self._query_budget(per_device_query_batch_size, rank),
            per_token=per_token, per_module=args["compute_per_module_scores"],
            sum_queries=args["aggregate_query_gradients"],
        )
        if not args["compute_per_module_scores"]:
            scores = {ALL_MODULES: scores}
        for name in tokenless:  # per module: (n_query, n_train) for the modules kronfluence scores whole
            scores[name] = scores[name].sum(-1)
        scores = {name: s * len(train.dataset) for name, s in scores.items()}  # × N undoes score's 1/N
        if args["aggregate_train_gradients"]:  # linear in the training gradient: the columns' sum is exact
            scores = {name: s.sum(1, keepdim=True) for name, s in scores.items()}
        dtype = _dtype(args["score_dtype"])
        result = {name: s.to(dtype) for name, s in scores.items()}
        self._rank0(lambda: _save_scores(result, out / "pairwise_scores.safetensors", _str_dict(args)))
        return result

    def compute_self_scores(
        self,
        scores_name: str,
        factors_name: str,
        train_dataset: Any,
        per_device_train_batch_size: int | None = None,
        initial_per_device_train_batch_size_attempt: int = 4096,
        train_indices: Any = None,
        dataloader_kwargs: Any = None,
        score_args: Any = None,
        target_data_partitions: Any = None,
        target_module_partitions: Any = None,
        overwrite_output_dir: bool = False,
    ) -> dict[str, Tensor]:
        """Self-influence of every training example, kronfluence's scale, in `score_dtype`:
        {"all_modules": (n_train,)} = N × source_fast.self_score(method="ekfac") (training loss on both
        sides; {module: ...} with `compute_per_module_scores`), or with
        `use_measurement_for_self_influence` ∇f(z)ᵀ (preconditioner) ∇L(z). Query
        low rank / accumulation, gradient aggregation and per-token scores do not apply to
        self-influence: ignored with a warning, as kronfluence does."""
        del initial_per_device_train_batch_size_attempt
        _no_partition_targets(target_data_partitions, target_module_partitions)
        out = self.scores_output_dir(scores_name)
        if (out / "self_scores.safetensors").exists() and not overwrite_output_dir:
            return _load_scores(out / "self_scores.safetensors")
        factors, args = self._score_setup(out, "self_scores.safetensors", factors_name, score_args,
                                          overwrite_output_dir, {"train": (train_dataset, train_indices)})
        task = self._task_for(score_args, SCORE_DEFAULTS)
        ignored = sorted(k for k, v in SELF_IGNORED.items() if args[k] != v)
        if ignored:
            warn(f"{ignored} do not apply to self-influence scores: ignored, as kronfluence does")
            args = {**args, **SELF_IGNORED}  # the scores' metadata records what was used, as kronfluence's does
        data = _subset(train_dataset, train_indices)  # under torch.distributed self_score splits it across ranks
        train = self._loader(data, per_device_train_batch_size, dataloader_kwargs)
        method, damping = _method(factors, args)
        # With the measurement, examples go a batch at a time (as kronfluence's per-example gradients do),
        # not as many as the free memory would hold.
        scores = self_score(self.model, task, Trajectory([Segment([self._checkpoint()], train, lr_sum=1.0)]), factors,
                            train, method=method, damping=damping, progress=self.progress, per_module=True,
                            use_measurement=args["use_measurement_for_self_influence"], chunk_size=train.batch_size)
        if not args["compute_per_module_scores"]:
            scores = {ALL_MODULES: sum(scores.values())}  # (n,) per module: small
        dtype = _dtype(args["score_dtype"])
        result = {name: (s * len(data)).to(dtype) for name, s in scores.items()}  # × N undoes the 1/N
        self._rank0(lambda: _save_scores(result, out / "self_scores.safetensors", _str_dict(args)))
        return result

    def load_score_args(self, scores_name: str) -> Any:
        """score_arguments.json as kronfluence's ScoreArguments (a namespace without kronfluence), or None."""
        path = self.scores_output_dir(scores_name) / SCORE_ARGS_FILE
        return _arguments("ScoreArguments", json.loads(path.read_text())) if path.exists() else None

    def load_pairwise_scores(self, scores_name: str) -> dict[str, Tensor] | None:
        return _load_scores(self.scores_output_dir(scores_name) / "pairwise_scores.safetensors")

    def load_self_scores(self, scores_name: str) -> dict[str, Tensor] | None:
        return _load_scores(self.scores_output_dir(scores_name) / "self_scores.safetensors")

    @staticmethod
    def load_file(path: str | os.PathLike) -> dict[str, Tensor]:
        """kronfluence's `Analyzer.load_file`: the tensors of one safetensors file."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"File not found: {path}.")
        return _load_scores(path)
