"""The README's example runs as written, on a model really trained with SGD + momentum."""

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
