"""One forward/backward pass over a dataset, yielding captured layer inputs and output gradients."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .capture import Captured, Capturer, LayerSpec
from .task import Task


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_loader(data: Any, batch_size: int, collate_fn: Callable | None) -> DataLoader:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(data, DataLoader) or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"data must be a map-style dataset (len() and indexing), got {type(data).__name__}; pass a "
            "DataLoader's dataset and its collate_fn instead (source_fast batches, shards and resumes by index)"
        )
    return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def run_pass(
    model: nn.Module,
    task: Task,
    specs: list[LayerSpec],
    loader: DataLoader,
    objective: str,
    what: str,
    progress: Any | None = None,
) -> Iterator[tuple[int, int, dict[str, Captured]]]:
    """For each batch: (first example index, batch size, captured layers) after one backward of the
    objective: "fisher" (sampled labels), "train" (true labels) or "measurement"."""
    device = model_device(model)
    capturer = Capturer(model, specs)
    start = tokens = 0
    for b, batch in enumerate(loader):
        batch = to_device(batch, device)
        mask = task.get_attention_mask(batch)
        with capturer.capture(mask) as records:
            if objective == "measurement":
                out = task.compute_measurement(batch, model)
            else:
                out = task.compute_train_loss(batch, model, objective == "fisher")
            if not isinstance(out, torch.Tensor) or out.dim() != 0:
                raise ValueError(f"{what}, batch {b}: the task must return a scalar tensor (summed over the batch)")
            if not math.isfinite(out.item()):
                raise FloatingPointError(f"{what}, batch {b}: the {objective} loss is {out.item()}")
            missing = [s.name for s in specs if s.name not in records]
            if missing:
                raise ValueError(f"{what}, batch {b}: tracked modules {missing} did not run in the forward pass")
            if not out.requires_grad:
                raise ValueError(f"{what}, batch {b}: the loss does not depend on any tracked module")
            out.backward()
        n = next(iter(records.values())).a.shape[0]
        for spec in specs:
            rec = records[spec.name]
            if rec.g is None:
                raise ValueError(f"{what}, batch {b}: module {spec.name!r} received no gradient from the loss")
            if rec.a.shape[0] != n:
                raise ValueError(
                    f"{what}, batch {b}: module {spec.name!r} saw {rec.a.shape[0]} examples, others {n}; "
                    "examples must be the first dimension of every tracked layer's input"
                )
        # Backward runs from the last layer to the first: the last non-finite one is where it entered.
        for spec in reversed(specs):
            if not torch.isfinite(records[spec.name].g).all():
                raise FloatingPointError(f"{what}, batch {b}: non-finite gradient at module {spec.name!r}")
        yield start, n, records
        start += n
        if progress is not None:
            a = records[specs[0].name].a
            tokens += a.shape[0] * a.shape[1] if mask is None or a.shape[1] == 1 else int((mask != 0).sum())
            progress.set_postfix_str(f"{tokens / max(progress.format_dict['elapsed'], 1e-9):.0f} tok/s", refresh=False)
            progress.update(n)
