"""The README's code blocks run as written: the example (on a model really trained with SGD +
momentum) and the kronfluence import swap."""

import re
from pathlib import Path

import torch
from _helpers import classification_data, mlp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    section = README.read_text().split("## Example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = mlp(4, 8, 3, dtype=torch.float32)
    train_set = classification_data(48, 4, 3, dtype=torch.float32)
    queries = classification_data(5, 4, 3, seed=1, dtype=torch.float32)
    # What the example assumes: 6 checkpoints saved evenly over training, and every step's rate.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    checkpoints, lrs = [], []
    for step in range(12):
        x, y = train_set.tensors[0][step * 4 : step * 4 + 4], train_set.tensors[1][step * 4 : step * 4 + 4]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        lrs.append(0.05)
        if step % 2 == 1:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    env = {"model": model, "checkpoints": checkpoints, "lrs": lrs, "train_set": train_set, "queries": queries}
    exec(compile(code, str(README), "exec"), env)
    assert env["scores"].shape == env["if_scores"].shape == (5, 48)
    assert torch.isfinite(env["scores"]).all() and env["proponents"].shape == (5, 5)


def test_readme_kronfluence_snippet_runs(tmp_path, monkeypatch):
    """The "Coming from kronfluence" block, with a kronfluence Task, in a scratch folder."""
    from test_kronfluence import ClassifyTask

    section = README.read_text().split("## Coming from kronfluence", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    env = {"model": mlp(4, 8, 3), "task": ClassifyTask(), "train_set": classification_data(40, 4, 3),
           "queries": classification_data(6, 4, 3, seed=1)}
    exec(compile(code, str(README), "exec"), env)
    assert env["scores"].shape == (6, 40) and torch.isfinite(env["scores"]).all()
    assert (tmp_path / "influence_results" / "run" / "scores_scores" / "pairwise_scores.safetensors").exists()


def test_readme_retraining_check_runs(tmp_path, monkeypatch):
    """The "Checking attributions against retraining" block, on a small MLP retrained for real."""
    import source_fast as sf
    from _helpers import ClassifyTask

    section = README.read_text().split("## Checking attributions against retraining", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    train_set = classification_data(40, 4, 3, dtype=torch.float32)
    queries = classification_data(4, 4, 3, seed=1, dtype=torch.float32)
    x, y = train_set.tensors

    def train_fn(indices, seed):
        model = mlp(4, 8, 3, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[indices]), y[indices]).backward()
            opt.step()
        return model

    def measure_fn(model):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(queries.tensors[0]), queries.tensors[1], reduction="none")

    final = train_fn(list(range(40)), 0)
    traj = sf.Trajectory([sf.Segment([{k: v.clone() for k, v in final.state_dict().items()}], train_set, lr_sum=3.0)])
    scores = sf.score(final, ClassifyTask(), traj, None, train_set, queries, method="grad_dot")
    monkeypatch.chdir(tmp_path)
    env = {"train_set": train_set, "train_fn": train_fn, "measure_fn": measure_fn, "scores": scores}
    exec(compile(code, str(README), "exec"), env)
    assert env["measured"].shape == (50, 2, 4) and len(list((tmp_path / "runs").rglob("subset*.pt"))) >= 100
    assert set(env["removal"]) == {"source", "random"}
