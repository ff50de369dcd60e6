"""Ready-made tasks for common models."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .capture import layer_kind
from .task import Task


class ClassificationTask(Task):
    """Cross-entropy on (inputs, labels) batches, summed; the measurement is the query's loss
    (positive score: a proponent). `sample=True` draws labels from the model's softmax (true Fisher).

    The tasks here draw their random numbers in float64 whatever the model's dtype, so a float64 copy
    of a model draws the labels its float32 original draws from the same seed, up to rounding: where
    the logits differ, a draw near a boundary between two labels can differ (about 2 % of a bfloat16
    model's draws from its float64 copy's, measured on small GPT-2 and Llama models; 0.1–0.6 % in
    float16)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = _at_least_float32(model(x))
        if sample:
            with torch.no_grad():
                # A row with NaN or +inf (or only -inf: no class allowed) draws from even odds, so its loss, NaN
                # or inf, is what gets reported; -inf alone masks classes, as Categorical takes it.
                bad = (logits.isnan() | (logits == torch.inf)).any(-1) | (logits == -torch.inf).all(-1)
                safe = torch.where(bad.unsqueeze(-1), 0.0, logits)
                y = torch.distributions.Categorical(logits=safe.double()).sample()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(_at_least_float32(model(x)), y, reduction="sum")


class RegressionTask(Task):
    """½(f − y)² on (inputs, targets) batches, summed; the measurement is the query's ½ squared
    error. Sampled targets y ~ N(f, 1) make the true Fisher this loss's Gauss-Newton matrix."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        out = _at_least_float32(model(x))
        y = out.detach() + torch.randn_like(out, dtype=torch.float64).to(out.dtype) if sample else _targets_like(out, y)
        return 0.5 * ((out - y) ** 2).sum()

    def compute_measurement(self, batch, model):
        x, y = batch
        out = _at_least_float32(model(x))
        return 0.5 * ((out - _targets_like(out, y)) ** 2).sum()


def _targets_like(out: Tensor, y: Tensor) -> Tensor:
    """Targets in the outputs' shape: (n,) and (n, 1) are the same targets for a (n, 1) output, but
    subtracting them as they are would broadcast to (n, n) and sum every pair."""
    if y.numel() != out.numel() or y.shape[0] != out.shape[0]:
        raise ValueError(f"RegressionTask: targets of shape {tuple(y.shape)} do not match the model's outputs "
                         f"{tuple(out.shape)}")
    return y.reshape(out.shape)


def mlp_modules(model: nn.Module) -> list[str]:
    """Names of the supported layers of transformer MLP blocks: those inside a module named `mlp`
    (GPT-2, Llama), and those named `fc1` or `fc2` (OPT, BART, Whisper; a CNN's head so named too)."""
    return [n for n, m in model.named_modules()
            if layer_kind(m) is not None and (".mlp." in f"{n}." or n.rsplit(".", 1)[-1] in ("fc1", "fc2"))]


class CausalLMTask(Task):
    """Next-token cross-entropy for Hugging Face causal LMs.

    Batches are dicts with `input_ids` (n, t) and, for padded batches, `attention_mask` (n, t);
    padded positions have mask 0 and are left out of the activation covariance; they predict nothing
    and are predicted by nothing (left or right padding: a token is predicted only from a real token),
    so their output gradients are zero. `position_ids` (n, t), when the batch has them,
    are passed to the model; without them it numbers positions itself (GPT-2 from the first
    column, padding included, so left padding shifts them: pad as in training). Optional `labels` (n, t), as Hugging Face takes
    them: the targets, shifted by the task, and -100 where no token is predicted (a prompt
    fine-tuned on its completion only); the prompt's tokens still count as inputs. `normalize`
    must match training: "sum" (loss summed over an example's predicted tokens) or "mean"
    (averaged over them), because SOURCE's curvature scale is that of the objective really
    optimised. "mean" needs the true Fisher (fit_factors' default), which it fits at the mean's scale;
    the empirical Fisher of a per-example mean is T-fold too small (T predicted tokens), so
    fit_factors refuses that pairing. The measurement is the query's loss with the same labels and
    normalisation.
    `tracked`: module names, or None for every Linear/Conv1D.
    """

    def __init__(self, tracked: list[str] | None = None, normalize: Literal["sum", "mean"] = "sum"):
        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
        self.tracked = tracked
        self.normalize = normalize

    def _loss(self, batch, model, sample: bool) -> torch.Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        positions = {"position_ids": batch["position_ids"]} if batch.get("position_ids") is not None else {}
        logits = model(input_ids=ids, attention_mask=mask, **positions).logits
        if mask is None:  # unpadded batches: every token is real
            mask = torch.ones_like(ids)
        logits = _at_least_float32(logits)
        n, t, vocab = logits.shape
        labels = batch.get("labels")
        if labels is not None and labels.shape != ids.shape:
            raise ValueError(f"CausalLMTask: labels of shape {tuple(labels.shape)} do not match input_ids "
                             f"{tuple(ids.shape)} (Hugging Face's convention: unshifted, -100 where ignored)")
        if sample:
            with torch.no_grad():
                nxt = sample_tokens(logits)[:, :-1]
        else:
            nxt = (ids if labels is None else labels)[:, 1:]
        # Position k predicts token k + 1 and the last position nothing: every position is scored
        # against targets shifted in place (ignored: -100), so the logits stay contiguous. The sliced,
        # transposed (n, V, t - 1) view cross_entropy took before cost a copy of all the logits and a
        # log-softmax along a strided dimension (1.5 s per 1,000 GPT-2 tokens on one CPU core).
        # Scored: positions that are tokens themselves and predict a token. With left padding the
        # padding before the first token would predict it: a pad is not the example's input, so that
        # term is left out, as the mask leaves the pad out of the activation covariance.
        keep = (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
        if labels is not None:  # sampled labels too: the true Fisher of the objective trained
            keep &= labels[:, 1:] != -100
        target = F.pad(torch.where(keep, nxt, -100), (0, 1), value=-100)
        per_token = F.cross_entropy(logits.reshape(n * t, vocab), target.reshape(-1), reduction="none")
        per_example = per_token.view(n, t).sum(1)
        if self.normalize == "mean":
            count = keep.sum(1).clamp_min(1).to(per_example.dtype)
            # The sampled loss only fits the curvature, whose scale must be the mean objective's Hessian,
            # (1/T) Σ_t H_t. Each token's label is drawn independently, so the per-example Fisher of
            # (1/T) Σ_t ℓ_t is (1/T²) Σ_t F_t, T-fold too small; that of Σ_t ℓ_t / √T is (1/T) Σ_t F_t.
            per_example = per_example / (count.sqrt() if sample else count)
        return per_example.sum()

    def compute_train_loss(self, batch, model, sample=False):
        return self._loss(batch, model, sample)

    def compute_measurement(self, batch, model):
        return self._loss(batch, model, False)

    def get_influence_tracked_modules(self):
        return self.tracked

    def get_attention_mask(self, batch):
        return batch.get("attention_mask")


def _at_least_float32(out: Tensor) -> Tensor:
    """A 16-bit model's outputs in float32 for the loss: in 16 bits a confident prediction's p − onehot,
    or a sampled residual f + ε − f at |f| ~ 1000, is mostly rounding (a review measured per-query
    Pearson 0.37 against float64 for confident digits, and a bf16 curvature 27 % small). float64 stays."""
    return out.to(torch.promote_types(out.dtype, torch.float32))


def sample_tokens(logits: torch.Tensor) -> torch.Tensor:
    """One draw per row from softmax(logits) over the last dimension, by inverting the cumulative
    distribution: one uniform per row. torch's Categorical draws an exponential per logit, which over
    a 50k vocabulary is 4 s per 1,000 GPT-2 tokens on one CPU core against 0.5 s here, paid in every
    true-Fisher pass."""
    cdf = torch.softmax(logits, dim=-1).cumsum_(dim=-1)
    # Uniforms drawn in float64 for every dtype: a float64 copy of the model then draws what its float32
    # original draws from the same seed (but where rounding puts u on the other side of a boundary).
    total = cdf[..., -1:]
    u = torch.rand(cdf.shape[:-1] + (1,), device=cdf.device, dtype=torch.float64).to(cdf.dtype) * total
    # right=True: the first token whose cumulative mass exceeds u, so a token of zero mass is never
    # drawn (u = 0 included), as long as u < total: rounding (a float64 uniform rounded to 1.0 in
    # float32, or the product) can put u on the total, which the last token of positive mass then takes.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # A row with NaN or +inf logits has a NaN total and no draw: token 0, whose loss (NaN) the passes
    # report, naming the batch (an index past the vocabulary would fail inside cross_entropy instead).
    return torch.where(torch.isfinite(total.squeeze(-1)), drawn, 0)
