"""Pure-torch versions of every dispatched op: the oracle the fast paths are tested against, and
the path that always runs (CPU, or when Triton / the extension are absent).

Conventions shared by all ops
- Inputs may be float32, float16 or bfloat16 (float64 is accepted too and then computed in float64).
  Products accumulate in float32 (float64 for float64 inputs); results are float32 (float64).
- Token layout: a (n, t, d_a) layer inputs, with the bias ones column already appended when the
  layer has a bias; g (n, t, d_out) gradients of the summed loss w.r.t. the layer outputs.
  n = examples, t = tokens per example (1 for an MLP).
- mask (n, t) or None: tokens with mask == 0 are dropped on both sides.
- Per-example layer gradient G_n = Σ_t g_t a_tᵀ  (d_out, d_a). No op below forms it in memory for
  more than a bounded block of examples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def _masked(x: Tensor, mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x in `dtype` with dropped tokens set to 0: selected, not multiplied, so a NaN or inf in a
    dropped token (say, a fully masked attention row) cannot leak, as the kernels never read them."""
    x = x.to(dtype)
    if mask is None:
        return x
    if mask.shape != x.shape[:2]:  # the kernels take (n, t) only: no broadcasting here either
        raise ValueError(f"mask must be (n, t) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return torch.where((mask != 0).unsqueeze(-1), x, 0)


def covariance_accumulate_(
    covs: list[Tensor], xs: list[Tensor], masks: list[Tensor | None], append_ones: list[bool], alpha: float = 1.0
) -> None:
    """covs[i] += alpha · X̂ᵢᵀ X̂ᵢ over the rows of xs[i] whose mask is non-zero, for every layer i.

    covs[i]:        (D_i, D_i) float32 (float64 accepted by this reference), updated in place
    xs[i]:          (rows_i, d_i) float32/float16/bfloat16
    masks[i]:       (rows_i,) or None; rows with mask == 0 are skipped
    append_ones[i]: X̂ᵢ = [xs[i], 1] (ones column last, D_i = d_i + 1) when True, else D_i = d_i
    """
    if not (len(covs) == len(xs) == len(masks) == len(append_ones)):
        raise ValueError(
            f"covariance_accumulate_: got {len(covs)} covs, {len(xs)} xs, {len(masks)} masks, "
            f"{len(append_ones)} append_ones flags; they must be equal"
        )
    if not math.isfinite(alpha) or abs(alpha) > torch.finfo(torch.float32).max:
        raise ValueError(f"covariance_accumulate_: alpha must be finite (in float32), got {alpha}")
    for i, (cov, x, mask, ones) in enumerate(zip(covs, xs, masks, append_ones)):
        if x.dim() != 2:
            raise ValueError(f"covariance_accumulate_: layer {i}: xs must be (rows, d), got {tuple(x.shape)}")
        if cov.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"covariance_accumulate_: layer {i}: covs must be float32, got {cov.dtype}")
        d = x.shape[1] + (1 if ones else 0)
        if tuple(cov.shape) != (d, d):
            raise ValueError(f"covariance_accumulate_: layer {i}: cov must be ({d}, {d}), got {tuple(cov.shape)}")
        if mask is not None and tuple(mask.shape) != (x.shape[0],):
            raise ValueError(f"covariance_accumulate_: layer {i}: mask must be ({x.shape[0]},), got {tuple(mask.shape)}")
        xf = x.to(cov.dtype)
        if ones:
            xf = torch.cat([xf, xf.new_ones(xf.shape[0], 1)], dim=1)
        if mask is not None:
            xf = xf[mask != 0]
        cov.add_(xf.T @ xf, alpha=alpha)


def accumulate_lambda_(lam: Tensor, a_rot: Tensor, g_rot: Tensor, mask: Tensor | None = None, alpha: float = 1.0) -> None:
    """lam += alpha · Σ_n (G̃_n)² elementwise, G̃_n = Σ_t g̃_t ãᵀ_t = Q_Sᵀ G_n Q_A.

    lam:   (d_out, d_a) float32 (or float64), updated in place
    a_rot: (n, t, d_a)   layer inputs already rotated: a Q_A
    g_rot: (n, t, d_out) output gradients already rotated: g Q_S
    mask:  (n, t) or None
    """
    if not math.isfinite(alpha) or abs(alpha) > torch.finfo(torch.float32).max:
        raise ValueError(f"accumulate_lambda_: alpha must be finite (in float32), got {alpha}")
    if lam.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accumulate_lambda_: lam must be float32 (or float64), got {lam.dtype}: a 16-bit Λ "
                         "overflows (it sums squared gradients)")
    dt = compute_dtype(lam, a_rot, g_rot)
    a, g = _masked(a_rot, mask, dt), _masked(g_rot, mask, dt)
    if a.shape[1] == 1:  # one token per example: Σ_n (g ⊗ a)² = (g∘g)ᵀ (a∘a), one GEMM
        lam.add_(((g[:, 0] ** 2).T @ (a[:, 0] ** 2)).to(lam.dtype), alpha=alpha)
        return
    lam.add_(_tiles_transposed(a, g).square_().sum(0).T.to(lam.dtype), alpha=alpha)


def self_scores(a_rot: Tensor, g_rot: Tensor, scale: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-example Σ_ij scale_ij (G̃_n)_ij², G̃_n = Σ_t g̃_t ã_tᵀ.

    a_rot: (n, t, d_a), g_rot: (n, t, d_out), scale: (d_out, d_a), mask: (n, t) or None
    Returns (n,) float32 (float64 for float64 inputs).
    """
    dt = compute_dtype(a_rot, g_rot, scale)
    a, g = _masked(a_rot, mask, dt), _masked(g_rot, mask, dt)
    if a.shape[1] == 1:  # one token per example: Σ_ij s_ij g_i² a_j² = rowsum(((g∘g) s) ∘ (a∘a)), no tiles
        return (((g[:, 0] ** 2) @ scale.to(dt)) * a[:, 0] ** 2).sum(1)
    return (_tiles_transposed(a, g).square_() * scale.to(dt).T).sum((1, 2))


def _tiles_transposed(a: Tensor, g: Tensor) -> Tensor:
    """The per-example tiles as (n, d_a, d_out), G_nᵀ = Σ_t a_t g_tᵀ: on CPU, MKL's batched GEMM
    forms this orientation 1.3-1.6x faster than (n, d_out, d_a) at GPT-2 shapes (t = 128, one
    thread), and squares and sums do not care which way round a tile is."""
    return torch.bmm(a.transpose(1, 2), g)


def source_factor(sigma: Tensor, horizon: float) -> Tensor:
    """F(σ) = (1 − exp(−cσ))/σ with F(0) = c, evaluated with expm1 (exact for tiny cσ)."""
    y = sigma * horizon
    # y == 0 (not y > 0) selects the limit, so a NaN σ stays NaN instead of becoming F = c.
    safe = torch.where(y == 0, torch.ones_like(y), y)
    phi = torch.where(y == 0, torch.ones_like(y), -torch.expm1(-safe) / safe)
    return horizon * phi


def pairwise_scores(a: Tensor, g: Tensor, u: Tensor, mask: Tensor | None = None) -> Tensor:
    """scores[n, q] = ⟨G_n, U_q⟩ = Σ_t g_tᵀ U_q a_t, in the parameter basis (no rotation of training data).

    a: (n, t, d_a), g: (n, t, d_out), u: (q, d_out, d_a) preconditioned queries, mask: (n, t) or None
    Returns (n, q) float32 (float64 for float64 inputs). Picks the cheaper of two contractions:
    forming the per-example tiles G_n (n·t·d_out·d_a + n·q·d_out·d_a flops) or the token sum
    Σ_t g_tᵀ (U_q a_t) (n·t·q·d_out·d_a flops). With one token the flops are about equal, and from
    64 queries the tiles' one GEMM runs 2.2-2.4× faster on CPU than the token sum's (measured on
    digits- and MLP-shaped layers, 65×256 to 785×1024; the crossover lies between 32 and 64).

    The tiles' GEMM reads every query's whole tile once per block of examples, n/2 flops per byte read:
    on one CPU core (~95 GFLOP/s, a GPT-2 MLP layer's 256 queries 2.4 GB) it runs at 33 GFLOP/s with 6
    examples and 85 with 48. So a block is all the examples, and the tiles are formed a band of their
    rows at a time (TOKEN_BLOCK_BYTES), not an example at a time: callers pass many examples at once.
    """
    dt = compute_dtype(a, g, u)
    a_, g_ = _masked(a, mask, dt), _masked(g, mask, dt)
    u_ = u.to(dt)
    n, t, d_a = a_.shape
    q, d_out = u_.shape[0], u_.shape[1]
    if t * d_out * d_a + q * d_out * d_a <= t * q * d_out * d_a or (t == 1 and q >= 64):
        u_t = u_.transpose(1, 2)
        # Queries laid out (q, d_a, d_out)-major, as scoring keeps them on CPU: bands of d_a rows (the
        # orientation MKL forms faster, _tiles_transposed), else bands of d_out rows. A band of the
        # queries, (q, rows · cols), is a view.
        transposed = u_t.is_contiguous()
        us, left, right = (u_t, a_, g_) if transposed else (u_, g_, a_)
        rows, cols = us.shape[1], us.shape[2]
        row_bytes = cols * torch.finfo(dt).bits // 8
        step = max(1, TOKEN_BLOCK_BYTES // max(1, row_bytes * _MIN_BAND))  # examples, if even that is too many
        out = torch.zeros(n, q, dtype=dt, device=a_.device)
        for s in range(0, n, step):
            lo, ro = left[s : s + step], right[s : s + step]
            band = max(1, TOKEN_BLOCK_BYTES // max(1, len(lo) * row_bytes))
            for r in range(0, rows, band):
                tiles = torch.bmm(lo[:, :, r : r + band].transpose(1, 2), ro)  # (examples, band, cols)
                out[s : s + step].addmm_(tiles.reshape(len(lo), -1), us[:, r : r + band].reshape(q, -1).T)
        return out
    ua = torch.einsum("qoi,nti->ntqo", u_, a_)
    return torch.einsum("ntqo,nto->nq", ua, g_)


def pairwise_scores_lowrank(a: Tensor, g: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """scores[n, q] = Σ_t g_tᵀ (Σ_r left_qr right_qrᵀ) a_t for rank-r query factors: n·t·q·r·(d_out + d_a) flops.

    a: (n, t, d_a), g: (n, t, d_out), left: (q, d_out, r), right: (q, d_a, r)
    """
    dt = compute_dtype(a, g, left)
    gl = torch.einsum("nto,qor->ntqr", g.to(dt), left.to(dt))
    ar = torch.einsum("nti,qir->ntqr", a.to(dt), right.to(dt))
    return (gl * ar).sum((1, 3))


def pairwise_token_scores(a: Tensor, g: Tensor, u: Tensor) -> Tensor:
    """Per-token split of `pairwise_scores`: out[n, q, t] = g_tᵀ U_q a_t, summing over t to the pair's score.

    a: (n, t, d_a), g: (n, t, d_out), u: (q, d_out, d_a). Returns (n, q, t).
    """
    dt = compute_dtype(a, g, u)
    a_, g_, u_ = a.to(dt), g.to(dt), u.to(dt)
    n, t = a.shape[:2]
    q, d_out, d_a = u.shape
    # The (examples, queries, tokens, d) intermediate is the memory (d_out times the result's): U goes
    # onto the side with more features, leaving the smaller d, a block of examples at a time.
    per_example = q * t * min(d_out, d_a) * torch.finfo(dt).bits // 8
    step = max(1, TOKEN_BLOCK_BYTES // max(per_example, 1))
    out = torch.empty(n, q, t, dtype=dt, device=a.device)
    for s in range(0, n, step):
        if d_out <= d_a:
            ua = torch.einsum("qoi,nti->nqto", u_, a_[s : s + step])
            out[s : s + step] = torch.einsum("nqto,nto->nqt", ua, g_[s : s + step])
        else:
            gu = torch.einsum("qoi,nto->nqti", u_, g_[s : s + step])
            out[s : s + step] = torch.einsum("nqti,nti->nqt", gu, a_[s : s + step])
    return out


TOKEN_BLOCK_BYTES = 64 << 20  # bounds pairwise_scores' tiles and pairwise_token_scores' intermediate
_MIN_BAND = 16  # rows: narrower bands of tiles would make the tiles' GEMMs small


def pairwise_token_scores_lowrank(a: Tensor, g: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Per-token split of `pairwise_scores_lowrank`: out[n, q, t] = Σ_r (g_tᵀ left_qr)(a_tᵀ right_qr), (n, q, t)."""
    dt = compute_dtype(a, g, left)
    gl = torch.einsum("nto,qor->nqtr", g.to(dt), left.to(dt))
    ar = torch.einsum("nti,qir->nqtr", a.to(dt), right.to(dt))
    return (gl * ar).sum(-1)
