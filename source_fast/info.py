"""`python -m source_fast.info`: versions, the native extension, and the backend each op uses here."""

from __future__ import annotations

import os
import platform

import torch

from . import _dispatch, _ext, _triton
from ._version import __version__

FLAGS = [
    "SOURCE_FAST_BACKEND", "SOURCE_FAST_DISABLE_TRITON", "SOURCE_FAST_DISABLE_EXT", "SOURCE_FAST_COV_PIPELINE",
    "SOURCE_FAST_PAIRWISE_GEMM", "TRITON_INTERPRET",
]


def report() -> str:
    lines = [
        f"source_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}",
        f"triton: {_triton.import_error() or __import__('triton').__version__}",
        f"extension source_fast._C: {'loaded ' + str(_ext.build_info()) if _ext._C is not None else 'not loaded: ' + str(_ext.load_error)}",
    ]
    info = _ext.build_info()
    running = torch.__version__.split("+")[0]  # the local tag (+cpu, +cu128) is not in the build's version
    if info and info.get("torch_version") and info["torch_version"].split("+")[0] != running:
        lines.append(f"  warning: built for torch {info['torch_version']}, running {torch.__version__}: rebuild it")
    lines.append("flags: " + ", ".join(f"{k}={os.environ.get(k, '')!r}" for k in FLAGS))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    try:
        _dispatch.select("pairwise_scores", devices[0], torch.float32)
    except ValueError as exc:  # a bad SOURCE_FAST_BACKEND: every automatic choice would raise it
        lines.append(f"backend chosen automatically: none ({exc})")
        return "\n".join(lines)
    lines.append("backend chosen automatically (op × device × dtype), and why not the others:")
    for op in _dispatch.PRIORITY:
        for dev in devices:
            for dtype in (torch.float32, torch.bfloat16):
                chosen = _dispatch.select(op, dev, dtype)
                why = [f"{b}: {'; '.join(_dispatch.why_not_auto(b, op, dev, dtype))}"
                       for b in _dispatch.PRIORITY[op] if b != chosen]
                lines.append(f"  {op:<24} {dev.type:<5} {str(dtype).removeprefix('torch.'):<9} -> {chosen}"
                             + (f"   ({' | '.join(why)})" if why else ""))
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
