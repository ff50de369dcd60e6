"""Every CUDA source compiles with a bare nvcc, for Ampere and Hopper, without a GPU or torch headers.

CPU CI cannot run the CUDA kernels, but it can keep them compiling: the .cu files include only
CUDA headers and csrc/cuda/covariance_kernels.cuh (the torch-facing binding is a separate .cpp),
so `nvcc -c` needs nothing but the toolkit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None
)


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CSRC}"


# torch's CUDAExtension compiles with these (they hide half/bfloat16 operators and implicit float
# conversions); the kernels must build both with and without them.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, /usr/local/cuda/bin or /usr/local/bin")
@pytest.mark.parametrize("defines", [[], TORCH_NVCC_DEFINES], ids=["bare", "torch_defines"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: str(p.relative_to(CSRC)))
def test_nvcc_compiles(source, arch, defines, tmp_path):
    cmd = [NVCC, f"-arch={arch}", "-std=c++17", "-O3", *defines, "-c", str(source), "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    # Warnings in kernel code are usually real bugs (narrowing, unused results): keep them out.
    assert "warning" not in proc.stderr.lower(), proc.stderr
