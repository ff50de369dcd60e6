"""The README's code blocks run as written: the example (on a model really trained with SGD +
momentum) and the kronfluence import swap."""

import re
from pathlib import Path

import torch
from _helpers import classification_data, mlp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    """Both blocks, as a user copies them: the training run on the digits, then the attribution."""
    section = README.read_text().split("## Example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    env: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), env)
    assert len(env["checkpoints"]) == 6 and len(env["lrs"]) == 300
    assert env["scores"].shape == env["if_scores"].shape == (10, 1000)
    assert torch.isfinite(env["scores"]).all() and env["proponents"].shape == (10, 5)
    # SOURCE and its one-checkpoint special case rank alike on this converging run, not identically.
    agree = torch.corrcoef(torch.stack([env["scores"].flatten(), env["if_scores"].flatten()]))[0, 1]
    assert 0.5 < agree < 1 - 1e-6


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
