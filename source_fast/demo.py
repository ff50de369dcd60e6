"""The demo: an MLP trained on scikit-learn's bundled digits with SGD + momentum and a warm-up/cosine
schedule; SOURCE and EK-FAC influence name each query digit's top proponents and opponents.

Run with `source-fast demo [--out DIR] [--quick]` or `python -m source_fast demo`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from . import Factors, Segment, Task, Trajectory, fit_factors, score
from ._io import atomic_path


class DigitsTask(Task):
    """Cross-entropy on digits; the measurement is the query's loss (positive score: a proponent)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        logits = model(x)
        if sample:
            with torch.no_grad():
                y = torch.distributions.Categorical(logits=logits).sample()
        return nn.functional.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="sum")


def digits_data(n_train: int, n_test: int, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    mean, std = x[tr].mean(0), x[tr].std(0) + 0.1
    return TensorDataset((x[tr] - mean) / std, y[tr]), TensorDataset((x[te] - mean) / std, y[te])


def make_mlp(seed: int = 0, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def schedule(steps: int, peak: float, warmup: int) -> list[float]:
    """Linear warm-up, then cosine decay to 0: the real per-step rates SOURCE sums per segment."""
    return [peak * (k + 1) / warmup if k < warmup else peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (steps - warmup))) for k in range(steps)]


@dataclass
class Run:
    model: nn.Module
    checkpoints: list[dict]
    lrs: list[float]
    test_accuracy: float


def train(train_data, test_data, *, epochs: int, batch_size: int = 64, lr: float = 0.05, momentum: float = 0.9,
          checkpoints: int = 6, seed: int = 0) -> Run:
    """Minibatch SGD with momentum; saves `checkpoints` state_dicts evenly over the run (the last is final)."""
    model = make_mlp(seed)
    task = DigitsTask()
    n = len(train_data)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    lrs = schedule(total, lr, max(1, total // 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    save_at = {round((c + 1) * total / checkpoints) for c in range(checkpoints)}
    saved, step = [], 0
    g = torch.Generator().manual_seed(seed)
    x, y = train_data.tensors
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lrs[step]
            opt.zero_grad()
            (task.compute_train_loss((x[idx], y[idx]), model) / len(idx)).backward()
            opt.step()
            step += 1
            if step in save_at:
                saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    with torch.no_grad():
        acc = float((model(test_data.tensors[0]).argmax(1) == test_data.tensors[1]).float().mean())
    return Run(model, saved, lrs, acc)


def _save_run(out: Path, run: Run) -> None:
    from safetensors.torch import save_file

    for c, state in enumerate(run.checkpoints):
        with atomic_path(out / "checkpoints" / f"checkpoint_{c}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    with atomic_path(out / "checkpoints" / "lrs.json") as tmp:
        tmp.write_text(json.dumps(run.lrs))


def main(out: str | Path = "source_fast_demo", quick: bool = False, queries: int = 4, top: int = 3) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    n_train, n_test, epochs = (400, 100, 4) if quick else (1200, 400, 12)
    train_data, test_data = digits_data(n_train, n_test)
    print(f"training an MLP (64-64-64-10) on {n_train} digits: SGD, momentum 0.9, warm-up + cosine, {epochs} epochs")
    run = train(train_data, test_data, epochs=epochs)
    _save_run(out, run)
    print(f"  test accuracy {run.test_accuracy:.3f}; {len(run.checkpoints)} checkpoints and the schedule in {out / 'checkpoints'}")
    task = DigitsTask()
    ckpt_files = [out / "checkpoints" / f"checkpoint_{c}.safetensors" for c in range(len(run.checkpoints))]
    trajectory = Trajectory.even(ckpt_files, run.lrs, num_segments=3, data=train_data, momentum=0.9)
    model = run.model
    print("fitting EK-FAC factors: one per segment (SOURCE, 3 segments × 2 checkpoints) and one at the final weights")
    factors = fit_factors(model, task, trajectory, progress=True)
    factors.save(out / "factors_source")
    final = trajectory.final()
    if_factors = fit_factors(model, task, final, progress=True)
    if_factors.save(out / "factors_ekfac")
    query_set = torch.utils.data.Subset(test_data, range(queries))
    print("scoring every training digit against each query")
    results = {
        "source": score(model, task, trajectory, Factors.load(out / "factors_source"), train_data, query_set, method="source"),
        "ekfac": score(model, task, final, if_factors, train_data, query_set, method="ekfac", damping="implied"),
    }
    labels = train_data.tensors[1]
    summary = {"test_accuracy": run.test_accuracy, "queries": []}
    for q in range(queries):
        qlabel = int(test_data.tensors[1][q])
        entry = {"query": q, "label": qlabel}
        print(f"\nquery {q} (a {qlabel}): training digits whose removal would most raise (+) or lower (−) its loss")
        for method, s in results.items():
            pro = s[q].topk(top).indices.tolist()
            con = (-s[q]).topk(top).indices.tolist()
            fmt = lambda idx: ", ".join(f"#{i} (a {int(labels[i])}, {float(s[q, i]):+.2e})" for i in idx)  # noqa: E731
            print(f"  {method:>6} proponents: {fmt(pro)}")
            print(f"  {method:>6} opponents:  {fmt(con)}")
            entry[method] = {"proponents": pro, "opponents": con}
        summary["queries"].append(entry)
    rank = [torch.corrcoef(torch.stack([results["source"][q], results["ekfac"][q]]))[0, 1].item() for q in range(queries)]
    summary["pearson_source_vs_ekfac"] = rank
    summary["seconds"] = time.perf_counter() - t0
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(f"\nPearson correlation of SOURCE and EK-FAC scores per query: {', '.join(f'{r:.2f}' for r in rank)}")
    print(f"done in {summary['seconds']:.0f} s; outputs in {out.resolve()}")
    return summary
