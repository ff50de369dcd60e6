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
- Masks. kronfluence masks activations but not output gradients in the covariances, and masks
  neither in per-example gradients: it relies on padded tokens having zero output gradient (true when
  nothing attends to them and the loss ignores them). source_fast masks both sides; the two agree
  whenever that assumption holds, and source_fast stays right when it does not.
- Per-module masks (a dict from `get_attention_mask`), `enable_post_process_per_sample_gradient`,
  shared (re-used) modules, AMP, per-module / per-token scores and gradient aggregation are not
  supported by the shim; it raises instead of silently computing something else.
- Precision knobs (`*_dtype` fields) are not used: source_fast computes in the model's dtype with
  float32 accumulation (float64 for a float64 model) and float64 eigendecompositions. Partition and
  accumulation knobs only trade memory for passes in kronfluence and do not change results; they are
  ignored. `query_gradient_low_rank` maps to source_fast's `query_rank` (exact SVD, never randomized).
- Batching. `per_device_batch_size=None` does not search for the largest batch: it means 32. Pairwise
  scoring uses `per_device_train_batch_size` for queries and training data alike, and reads the
  training set once for all queries (kronfluence re-reads it per query batch).
- Token counts. source_fast's Factors keep per-row MEAN covariances, not the row counts, so
  `save_factors` writes sums = mean × num_examples with count = num_examples: the pair kronfluence
  divides is exact, but the count is not the number of tokens kronfluence itself would have stored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Subset

from .._io import atomic_path
from ..capture import LayerSpec, tracked_layers
from ..factors import Factors, LayerFactors, fit_factors
from ..scoring import score, self_score
from ..task import Task
from ..trajectory import Segment, Trajectory

__all__ = ["load_factors", "save_factors", "prepare_model", "Analyzer"]

# kronfluence's file stems (kronfluence.utils.constants), one safetensors file each, keyed by module.
A_COV, S_COV = "activation_covariance", "gradient_covariance"
A_COUNT, S_COUNT = "num_activation_covariance_processed", "num_gradient_covariance_processed"
Q_A, Q_S = "activation_eigenvectors", "gradient_eigenvectors"
E_A, E_S = "activation_eigenvalues", "gradient_eigenvalues"
LAMBDA, LAMBDA_COUNT = "lambda_matrix", "num_lambda_processed"
FACTOR_ARGS_FILE = "factor_arguments.json"
SCORE_ARGS_FILE = "score_arguments.json"
ALL_MODULES = "all_modules"
DEFAULT_BATCH_SIZE = 32

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


# ---- factor files ------------------------------------------------------------------------------


def _read(factors_dir: Path, stem: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    path = factors_dir / f"{stem}.safetensors"
    if not path.exists():
        partial = sorted(p.name for p in factors_dir.glob(f"{stem}_data_partition*.safetensors"))
        hint = f" (found unaggregated partitions {partial[:3]}: run kronfluence's aggregation first)" if partial else ""
        raise FileNotFoundError(f"kronfluence factor directory {str(factors_dir)!r} has no {path.name}{hint}")
    return load_file(str(path))


def _module_tensor(files: dict[str, dict[str, Tensor]], stem: str, spec: LayerSpec, shape: tuple[int, ...],
                   factors_dir: Path) -> Tensor:
    """One module's tensor from one factor file, checked against the model's layer shape."""
    tensors = files[stem]
    if spec.name not in tensors:
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


def _normalized(total: Tensor, count: int) -> Tensor:
    # Divide in float64 (kronfluence divides Λ in float64 too), keep the stored dtype.
    return (total.double() / count).to(total.dtype)


def load_factors(factors_dir: str | os.PathLike, model: nn.Module, task: Task) -> Factors:
    """Reads a kronfluence EK-FAC `factors_<name>/` directory into one-segment source_fast Factors.

    Per tracked module (as `task.get_influence_tracked_modules()` selects them on `model`):
      a_cov (d_a, d_a) = activation_covariance / num_activation_covariance_processed
      s_cov (d_out, d_out) = gradient_covariance / num_gradient_covariance_processed
      q_a, q_s = kronfluence's eigenvectors as stored (so scores reproduce kronfluence's)
      lam (d_out, d_a) = lambda_matrix / num_lambda_processed
    Each module's tensors keep the dtype they were stored in. Modules in the files that the task does
    not track are ignored, as kronfluence ignores them. Use the factors with a one-checkpoint
    trajectory, `Trajectory([Segment([model.state_dict()], train_data, lr_sum=1.0)])`, and
    method="ekfac".
    """
    factors_dir = Path(factors_dir)
    if not factors_dir.is_dir():
        raise FileNotFoundError(f"kronfluence factor directory {str(factors_dir)!r} does not exist")
    fisher = "true"
    args_path = factors_dir / FACTOR_ARGS_FILE
    if args_path.exists():
        args = json.loads(args_path.read_text())
        if args.get("strategy", "ekfac") != "ekfac":
            raise ValueError(f"{args_path}: strategy {args['strategy']!r}; source_fast reads EK-FAC factors only")
        fisher = "empirical" if args.get("use_empirical_fisher") else "true"
    stems = (A_COV, S_COV, A_COUNT, S_COUNT, Q_A, Q_S, LAMBDA, LAMBDA_COUNT)
    files = {stem: _read(factors_dir, stem) for stem in stems}
    specs = tracked_layers(model, task.get_influence_tracked_modules())
    layers, num_examples = {}, None
    for s in specs:
        sq_a, sq_s = (s.d_a, s.d_a), (s.d_out, s.d_out)
        rows = _count(files, A_COUNT, s, factors_dir)
        a_cov = _normalized(_module_tensor(files, A_COV, s, sq_a, factors_dir), rows)
        s_cov = _normalized(_module_tensor(files, S_COV, s, sq_s, factors_dir), _count(files, S_COUNT, s, factors_dir))
        n = _count(files, LAMBDA_COUNT, s, factors_dir)
        if num_examples is not None and n != num_examples:
            raise ValueError(f"module {s.name!r}: num_lambda_processed is {n}, other modules have {num_examples}")
        num_examples = n
        lam = _normalized(_module_tensor(files, LAMBDA, s, (s.d_out, s.d_a), factors_dir), n)
        dtype = a_cov.dtype
        layers[s.name] = LayerFactors(
            a_cov, s_cov.to(dtype), _module_tensor(files, Q_A, s, sq_a, factors_dir).to(dtype),
            _module_tensor(files, Q_S, s, sq_s, factors_dir).to(dtype), lam.to(dtype), rows=rows,
        )
    assert num_examples is not None  # tracked_layers never returns an empty list
    return Factors(specs, [layers], [num_examples], [1], fisher, False)


@contextlib.contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            # A non-empty folder cannot be renamed over: move the old one aside, then drop it.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, torch.dtype) else value


def _args_dict(args: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """kronfluence's `Arguments.to_dict()` for an arguments object (or a duck-typed one, or None):
    the defaults, overridden by the object's fields, dtypes as strings like "torch.float32"."""
    out = dict(defaults)
    if args is not None:
        fields = args.to_dict() if hasattr(args, "to_dict") else vars(args)
        out.update({k: _jsonable(v) for k, v in fields.items()})
    return out


def save_factors(factors: Factors, factors_dir: str | os.PathLike, *, factor_args: Any = None) -> None:
    """Writes one-segment EK-FAC Factors as a kronfluence `factors_<name>/` directory, atomically
    (a temporary folder renamed into place; an existing directory is replaced).

    Files (keys = module names): covariance sums = mean × rows with counts = rows, the unmasked tokens
    of the fit (num_examples for factors that do not know their rows, e.g. from an older
    source_fast: kronfluence only uses sum / count), eigenvectors as they are,
    eigenvalues as the Rayleigh quotients diag(Qᵀ C Q) of those eigenvectors, lambda_matrix = Λ × N,
    num_lambda_processed = N, and factor_arguments.json (`factor_args`' fields over kronfluence's
    defaults; strategy and use_empirical_fisher always describe these factors). kronfluence's
    `Analyzer.compute_pairwise_scores(..., factors_name=...)` then reproduces source_fast's EK-FAC
    scores × N.
    """
    from safetensors.torch import save_file

    if len(factors.segments) != 1 or factors.layout != [1]:
        raise ValueError(
            f"kronfluence stores one EK-FAC at one checkpoint; these factors have {len(factors.segments)} segments "
            f"with {factors.layout} checkpoints (fit them on trajectory.final())"
        )
    n = factors.num_examples[0]
    count = torch.tensor([n], dtype=torch.int64)
    files: dict[str, dict[str, Tensor]] = {stem: {} for stem in (A_COV, S_COV, A_COUNT, S_COUNT, Q_A, Q_S, E_A, E_S,
                                                                  LAMBDA, LAMBDA_COUNT)}
    for name, lf in factors.segments[0].items():
        if lf.precond is not None:
            warnings.warn(f"module {name!r}: the Adam preconditioner has no kronfluence counterpart; not written",
                          stacklevel=2)
        rows = n if lf.rows is None else lf.rows
        for cov_stem, count_stem, q_stem, e_stem, cov, q in (
            (A_COV, A_COUNT, Q_A, E_A, lf.a_cov, lf.q_a),
            (S_COV, S_COUNT, Q_S, E_S, lf.s_cov, lf.q_s),
        ):
            cpu_cov, cpu_q = cov.detach().cpu(), q.detach().cpu()
            files[cov_stem][name] = (cpu_cov.double() * rows).to(cpu_cov.dtype).contiguous()
            files[count_stem][name] = torch.tensor([rows], dtype=torch.int64)
            files[q_stem][name] = cpu_q.contiguous()
            qd = cpu_q.double()
            files[e_stem][name] = ((qd * (cpu_cov.double() @ qd)).sum(0)).to(cpu_cov.dtype).contiguous()
        lam = lf.lam.detach().cpu()
        files[LAMBDA][name] = (lam.double() * n).to(lam.dtype).contiguous()
        files[LAMBDA_COUNT][name] = count.clone()
    args = _args_dict(factor_args, FACTOR_DEFAULTS)
    args.update(strategy="ekfac", use_empirical_fisher=factors.fisher == "empirical")
    with _atomic_dir(Path(factors_dir)) as tmp:
        for stem, tensors in files.items():
            save_file(tensors, str(tmp / f"{stem}.safetensors"))
        (tmp / FACTOR_ARGS_FILE).write_text(json.dumps(args, indent=4))


# ---- Analyzer shim -----------------------------------------------------------------------------


def prepare_model(model: nn.Module, task: Task) -> nn.Module:
    """kronfluence's `prepare_model`: eval mode, parameters and buffers frozen. Unlike kronfluence it
    installs no wrappers (source_fast hooks the layers during each pass), so the model is unchanged
    otherwise; `task` is accepted for signature compatibility and its tracked modules are checked."""
    tracked_layers(model, task.get_influence_tracked_modules())
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    for b in model.buffers():
        b.requires_grad = False
    return model


def _get(args: Any, field: str, defaults: dict[str, Any]) -> Any:
    return defaults[field] if args is None else getattr(args, field, defaults[field])


def _reject(args: Any, defaults: dict[str, Any], fields: dict[str, str]) -> None:
    for field, why in fields.items():
        value = _get(args, field, defaults)
        if value != defaults[field]:
            raise NotImplementedError(f"{field}={value!r} is not supported by source_fast's Analyzer: {why}")


def _subset(dataset: Any, indices: Any) -> Any:
    return dataset if indices is None else Subset(dataset, list(indices))


def _save_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=4))


def _save_scores(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _load_scores(path: Path) -> dict[str, Tensor] | None:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.exists() else None


class Analyzer:
    """kronfluence's `Analyzer`, computed by source_fast's engine (method="ekfac").

    Same constructor, same method names and arguments (FactorArguments / ScoreArguments from
    kronfluence, or any objects with those fields), same output layout:
      <output_dir>/<analysis_name>/factors_<name>/   kronfluence's factor files (`save_factors`)
      <output_dir>/<analysis_name>/scores_<name>/pairwise_scores.safetensors  {"all_modules": (n_query, n_train)}
      <output_dir>/<analysis_name>/scores_<name>/self_scores.safetensors      {"all_modules": (n_train,)}
    and scores in kronfluence's convention (NOT divided by N). Factors written by kronfluence itself
    can be scored here, and kronfluence can score factors fitted here.
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
        del log_level, log_main_process_only, profile  # kronfluence's logging/profiling knobs
        if getattr(task, "enable_post_process_per_sample_gradient", False):
            raise NotImplementedError("tasks with enable_post_process_per_sample_gradient are not supported")
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "original_module")]
        if wrapped:
            raise ValueError(
                f"the model has kronfluence TrackedModule wrappers ({wrapped[:3]}...): prepare it with "
                "source_fast.interop.kronfluence.prepare_model, not kronfluence's"
            )
        device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
        self.model = model.to(device)
        self.task = task
        self.progress = not disable_tqdm
        self.output_dir = Path(output_dir).joinpath(analysis_name).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.collate_fn = None
        if not disable_model_save:
            from safetensors.torch import save_file

            with atomic_path(self.output_dir / "model.safetensors") as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))

    def set_dataloader_kwargs(self, dataloader_kwargs: Any) -> None:
        """Only `collate_fn` matters to source_fast (it loads data in the main process, in order)."""
        self.collate_fn = getattr(dataloader_kwargs, "collate_fn", None)

    def factors_output_dir(self, factors_name: str) -> Path:
        return self.output_dir / f"factors_{factors_name}"

    def scores_output_dir(self, scores_name: str) -> Path:
        return self.output_dir / f"scores_{scores_name}"

    def _collate(self, dataloader_kwargs: Any) -> Any:
        return self.collate_fn if dataloader_kwargs is None else getattr(dataloader_kwargs, "collate_fn", None)

    def _checkpoint(self) -> dict[str, Tensor]:
        """The model's current weights: the one checkpoint of the EK-FAC trajectory."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

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
        labels sampled by `compute_train_loss(..., sample=True)`), written as kronfluence's files.
        Existing factors are kept unless `overwrite_output_dir`. kronfluence fits on the first
        `covariance_max_examples` / `lambda_max_examples` examples; source_fast needs both equal."""
        del initial_per_device_batch_size_attempt
        out = self.factors_output_dir(factors_name)
        if (out / f"{LAMBDA}.safetensors").exists() and not overwrite_output_dir:
            return
        _reject(factor_args, FACTOR_DEFAULTS, {
            "strategy": "source_fast fits EK-FAC only",
            "amp_dtype": "cast the model to the low-precision dtype instead (accumulation stays float32)",
            "has_shared_parameters": "source_fast does not support modules that run twice per forward pass",
        })
        limits = {
            field: len(dataset) if _get(factor_args, field, FACTOR_DEFAULTS) is None
            else min(len(dataset), _get(factor_args, field, FACTOR_DEFAULTS))
            for field in ("covariance_max_examples", "lambda_max_examples")
        }
        if len(set(limits.values())) != 1:
            raise NotImplementedError(
                f"{limits} select different examples; source_fast fits covariances and Λ on the same data"
            )
        limit = limits["covariance_max_examples"]
        data = dataset if limit == len(dataset) else Subset(dataset, range(limit))
        fisher = "empirical" if _get(factor_args, "use_empirical_fisher", FACTOR_DEFAULTS) else "true"
        trajectory = Trajectory([Segment([self._checkpoint()], data, lr_sum=1.0)])
        factors = fit_factors(
            self.model, self.task, trajectory, fisher=fisher, batch_size=per_device_batch_size or DEFAULT_BATCH_SIZE,
            collate_fn=self._collate(dataloader_kwargs), progress=self.progress,
        )
        save_factors(factors, out, factor_args=factor_args)

    def load_all_factors(self, factors_name: str) -> Factors:
        """The named factors (kronfluence's files, whoever wrote them) as source_fast Factors."""
        return load_factors(self.factors_output_dir(factors_name), self.model, self.task)

    def _score_setup(self, scores_name: str, factors_name: str, score_args: Any, datasets: dict[str, tuple]) -> tuple:
        _reject(score_args, SCORE_DEFAULTS, {
            "amp_dtype": "cast the model to the low-precision dtype instead",
            "compute_per_module_scores": "source_fast sums the modules' scores",
            "compute_per_token_scores": "source_fast scores whole examples",
            "aggregate_query_gradients": "score the queries and sum the rows",
            "aggregate_train_gradients": "score the examples and sum the columns",
            "use_measurement_for_self_influence": "self-influence uses the training loss",
        })
        factors = self.load_all_factors(factors_name)
        damping = _get(score_args, "damping_factor", SCORE_DEFAULTS)
        out = self.scores_output_dir(scores_name)
        args = _args_dict(score_args, SCORE_DEFAULTS)
        _save_json(args, out / SCORE_ARGS_FILE)
        factor_args_path = self.factors_output_dir(factors_name) / FACTOR_ARGS_FILE
        if factor_args_path.exists():
            _save_json(json.loads(factor_args_path.read_text()), out / FACTOR_ARGS_FILE)
        for name, (dataset, indices) in datasets.items():
            meta = {"type": type(dataset).__name__, "dataset_size": len(dataset),
                    "indices": None if indices is None else list(indices)}
            _save_json(meta, out / f"{name}_dataset_metadata.json")
        return factors, "heuristic" if damping is None else float(damping), out, {k: str(v) for k, v in args.items()}

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
        overwrite_output_dir: bool = False,
    ) -> dict[str, Tensor]:
        """EK-FAC influence of every training example on every query, kronfluence's scale:
        {"all_modules": (n_query, n_train)} = N × source_fast.score(method="ekfac"). Also written to
        scores_<name>/pairwise_scores.safetensors; existing scores are returned unless overwrite."""
        del per_device_query_batch_size, initial_per_device_train_batch_size_attempt
        path = self.scores_output_dir(scores_name) / "pairwise_scores.safetensors"
        if path.exists() and not overwrite_output_dir:
            return _load_scores(path)
        factors, damping, out, meta = self._score_setup(
            scores_name, factors_name, score_args,
            {"query": (query_dataset, query_indices), "train": (train_dataset, train_indices)},
        )
        queries, train = _subset(query_dataset, query_indices), _subset(train_dataset, train_indices)
        trajectory = Trajectory([Segment([self._checkpoint()], train, lr_sum=1.0)])
        scores = score(
            self.model, self.task, trajectory, factors, train, queries, method="ekfac", damping=damping,
            batch_size=per_device_train_batch_size or DEFAULT_BATCH_SIZE,
            query_rank=_get(score_args, "query_gradient_low_rank", SCORE_DEFAULTS),
            collate_fn=self._collate(dataloader_kwargs), progress=self.progress,
        )
        result = {ALL_MODULES: scores * len(train)}
        _save_scores(result, out / "pairwise_scores.safetensors", meta)
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
        overwrite_output_dir: bool = False,
    ) -> dict[str, Tensor]:
        """Self-influence of every training example (training loss on both sides), kronfluence's
        scale: {"all_modules": (n_train,)} = N × source_fast.self_score(method="ekfac")."""
        del initial_per_device_train_batch_size_attempt
        path = self.scores_output_dir(scores_name) / "self_scores.safetensors"
        if path.exists() and not overwrite_output_dir:
            return _load_scores(path)
        factors, damping, out, meta = self._score_setup(
            scores_name, factors_name, score_args, {"train": (train_dataset, train_indices)}
        )
        train = _subset(train_dataset, train_indices)
        trajectory = Trajectory([Segment([self._checkpoint()], train, lr_sum=1.0)])
        scores = self_score(
            self.model, self.task, trajectory, factors, train, method="ekfac", damping=damping,
            batch_size=per_device_train_batch_size or DEFAULT_BATCH_SIZE,
            collate_fn=self._collate(dataloader_kwargs), progress=self.progress,
        )
        result = {ALL_MODULES: scores * len(train)}
        _save_scores(result, out / "self_scores.safetensors", meta)
        return result

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
