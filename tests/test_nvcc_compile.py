"""Every CUDA source compiles with a bare nvcc, for Ampere and Hopper, without a GPU or torch headers.

CPU CI cannot run the CUDA kernels, but it can keep them compiling: the .cu files include only
CUDA headers and csrc/cuda/covariance_kernels.cuh (the torch-facing binding is a separate .cpp),
so `nvcc -c` needs nothing but the toolkit.
"""

from __future__ import annotations

import os
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


STUBS = Path(__file__).resolve().parent / "cuda_stubs"
CXX = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(NVCC is None or CXX is None, reason="needs nvcc's CUDA headers and a C++ compiler")
def test_cuda_binding_type_checks():
    """The torch-facing CUDA binding is compiled only in CUDA builds, which CPU machines never make;
    type-checking it here against torch's headers (c10/cuda declared by tests/cuda_stubs) and the
    CUDA runtime headers keeps a broken binding from reaching a GPU session."""
    import torch.utils.cpp_extension as ext

    # nvcc may be a wrapper script outside the toolkit: ask the toolkit layouts where the headers are.
    roots = [os.environ.get("CUDA_HOME"), str(Path(NVCC).resolve().parents[1]), "/usr/local/cuda"]
    cuda_include = next((Path(r) / "include" for r in roots if r and (Path(r) / "include" / "cuda_runtime_api.h").exists()), None)
    assert cuda_include is not None, f"nvcc is at {NVCC} but cuda_runtime_api.h is under none of {roots}"
    binding = CSRC / "cuda" / "covariance_cuda_binding.cpp"
    cmd = [CXX, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", f"-I{STUBS}", f"-I{cuda_include}"]
    cmd += [f"-isystem{p}" for p in ext.include_paths()]
    proc = subprocess.run([*cmd, str(binding)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} {binding}\n{proc.stderr}"
    assert "warning" not in proc.stderr.lower(), proc.stderr
