"""The task protocol: how to compute the training loss and the measurement on a batch.

It is kronfluence's `Task` protocol, so a kronfluence Task subclass works unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task:
    """Subclass and implement `compute_train_loss` and `compute_measurement`.

    The per-example training loss L(z, θ) is what `compute_train_loss` returns for a batch holding
    only z; training is assumed to minimise the mean of it over the batch. For SOURCE the scale
    matters (curvature enters exp(−cσ)), so L must be the per-example objective that was really
    optimised, with the same token normalisation.
    """

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        """Loss summed over the batch. `sample=True`: labels drawn from the model (true Fisher)."""
        raise NotImplementedError

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """The measurement f (loss, margin, log-probability...) summed over the batch."""
        raise NotImplementedError

    def get_influence_tracked_modules(self) -> list[str] | None:
        """Names (as in `model.named_modules()`) of the layers to track; None tracks every supported layer."""
        return None

    def get_attention_mask(self, batch: Any) -> torch.Tensor | dict[str, torch.Tensor] | None:
        """(batch, tokens) mask; tokens where it is 0 (padding) are left out of the activation covariance,
        as in kronfluence; gradients take every token, so padding counts where the loss reads it. Modules that
        see different sequences (an encoder-decoder's) take a dict from module name to its mask; a tracked
        module the dict leaves out is unmasked, and a shared layer (run several times per forward pass) may
        take a list, one mask per call."""
        return None
