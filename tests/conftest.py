import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreter vs compiler when @triton.jit runs (module import), so this must
    # happen before anything imports source_fast.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The cuda case carries the `cuda` mark, so `pytest -m cuda` (the device script) runs every
# device-parametrized test compiled on the GPU, not only the tests written for it.
@pytest.fixture(params=[pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in DEVICES])
def device(request):
    return torch.device(request.param)
