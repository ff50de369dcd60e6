"""The dispatching ops the engine calls. Each has a pure-torch twin in `reference` with the same
signature and contract (see there); `backend=` forces one implementation (tests and benches)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _triton, reference
from ._dispatch import BackendArg, check_backend, select


def _kernel_dtype(op: str, backend: BackendArg, **tensors: Tensor) -> torch.dtype:
    """The dtype a kernel would run in: the inputs' common dtype. Only the torch reference takes mixed
    dtypes, so for them auto gets float64 (which no kernel takes) and a forced kernel says which differ."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) == 1:
        return next(iter(dtypes.values()))
    if backend not in ("auto", "torch"):
        listed = ", ".join(f"{name} {str(d).removeprefix('torch.')}" for name, d in dtypes.items())
        raise NotImplementedError(f"backend {backend!r} cannot run {op}: the kernel takes one dtype for {listed}")
    return torch.float64


def _needs_reference(op: str, backend: BackendArg, **tensors: Tensor | None) -> bool:
    """Whether autograd must see the op: the kernels record no graph (and would update a leaf that
    requires grad in place), so the reference computes it, and a forced kernel is refused."""
    check_backend(backend)
    if not torch.is_grad_enabled():
        return False
    tracked = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if tracked and backend not in ("auto", "torch"):
        raise NotImplementedError(f"backend {backend!r} cannot run {op}: {', '.join(tracked)} require grad, and the "
                                  "kernels record no autograd graph; call it under torch.no_grad() or use backend='torch'")
    return bool(tracked)


def _wide(weights: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The kernels take scale / u in any 16/32-bit float and return float32; float64 ones make the reference
    compute and return float64 (its contract), so they count as float64, which no kernel takes."""
    return torch.float64 if weights.dtype == torch.float64 else dtype


def covariance_accumulate_(
    covs: list[Tensor],
    xs: list[Tensor],
    masks: list[Tensor | None],
    append_ones: list[bool],
    alpha: float = 1.0,
    *,
    backend: BackendArg = "auto",
) -> None:
    if not xs:
        check_backend(backend)  # nothing to do, but a wrong name is still wrong
        return
    if _needs_reference("covariance_accumulate_", backend, **{f"covs[{i}]": c for i, c in enumerate(covs)},
                        **{f"xs[{i}]": x for i, x in enumerate(xs)}):
        reference.covariance_accumulate_(covs, xs, masks, append_ones, alpha)
        return
    # The extension takes float32 covs and 16/32-bit xs (layers may differ); the reference also float64
    # (a model with a float64 parameter gets float64 factors), so auto sends that there.
    odd = [f"cov {i} {c.dtype}" for i, c in enumerate(covs) if c.dtype != torch.float32] + [
        f"x {i} {x.dtype}" for i, x in enumerate(xs) if x.dtype not in (torch.float32, torch.float16, torch.bfloat16)]
    if odd and backend not in ("auto", "torch"):
        raise NotImplementedError(f"backend {backend!r} cannot run covariance_accumulate_: it takes float32 covs and "
                                  f"float32/float16/bfloat16 xs; got {', '.join(odd)}")
    if select("covariance_accumulate_", xs[0].device, torch.float64 if odd else xs[0].dtype, backend) == "ext":
        torch.ops.source_fast.covariance_accumulate_(covs, xs, masks, append_ones, alpha)
    else:
        reference.covariance_accumulate_(covs, xs, masks, append_ones, alpha)


def accumulate_lambda_(
    lam: Tensor, a_rot: Tensor, g_rot: Tensor, mask: Tensor | None = None, alpha: float = 1.0,
    *, backend: BackendArg = "auto",
) -> None:
    if any(size > 1 and stride == 0 for size, stride in zip(lam.shape, lam.stride())):
        raise ValueError(f"accumulate_lambda_: lam (strides {lam.stride()}) has elements that share memory, e.g. an "
                         "expanded tensor: updated in place, each would get several sums; give a tensor of its own")
    if _needs_reference("accumulate_lambda_", backend, lam=lam, a_rot=a_rot, g_rot=g_rot):
        reference.accumulate_lambda_(lam, a_rot, g_rot, mask, alpha)
        return
    # Kernels take float32 Λ and one dtype for a and g.
    if lam.dtype != torch.float32 and backend not in ("auto", "torch"):
        raise NotImplementedError(f"backend {backend!r} cannot run accumulate_lambda_: lam must be float32, got {lam.dtype}")
    dtype = _kernel_dtype("accumulate_lambda_", backend, a_rot=a_rot, g_rot=g_rot)
    if select("accumulate_lambda_", a_rot.device, dtype if lam.dtype == torch.float32 else torch.float64,
              backend) == "triton":
        with _triton.on_device(a_rot.device):
            _triton.kernels().accumulate_lambda_(lam, a_rot, g_rot, mask, alpha)
    else:
        reference.accumulate_lambda_(lam, a_rot, g_rot, mask, alpha)


def self_scores(
    a_rot: Tensor, g_rot: Tensor, scale: Tensor, mask: Tensor | None = None, *, backend: BackendArg = "auto"
) -> Tensor:
    if _needs_reference("self_scores", backend, a_rot=a_rot, g_rot=g_rot, scale=scale):
        return reference.self_scores(a_rot, g_rot, scale, mask)
    dtype = _kernel_dtype("self_scores", backend, a_rot=a_rot, g_rot=g_rot)
    if select("self_scores", a_rot.device, _wide(scale, dtype), backend) == "triton":
        with _triton.on_device(a_rot.device):
            return _triton.kernels().self_scores(a_rot, g_rot, scale, mask)
    return reference.self_scores(a_rot, g_rot, scale, mask)


def pairwise_scores(
    a: Tensor, g: Tensor, u: Tensor, mask: Tensor | None = None, *, backend: BackendArg = "auto"
) -> Tensor:
    if _needs_reference("pairwise_scores", backend, a=a, g=g, u=u):
        return reference.pairwise_scores(a, g, u, mask)
    if select("pairwise_scores", a.device, _wide(u, _kernel_dtype("pairwise_scores", backend, a=a, g=g)),
              backend) == "triton":
        with _triton.on_device(a.device):
            return _triton.kernels().pairwise_scores(a, g, u, mask)
    return reference.pairwise_scores(a, g, u, mask)
