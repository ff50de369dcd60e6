"""Builds the optional native extension `source_fast._C`; all metadata lives in pyproject.toml.

Flags (each "1" or "0"):
  SOURCE_FAST_BUILD_EXT=0    pure-Python install (torch and Triton paths only)
  SOURCE_FAST_REQUIRE_EXT=1  a failed native build fails the install (CI sets this)
  SOURCE_FAST_FORCE_CUDA=1   compile the CUDA part even when torch/CUDA_HOME do not show CUDA
torch's own TORCH_CUDA_ARCH_LIST and MAX_JOBS apply as usual.
"""

import glob
import os
import warnings

from setuptools import setup


def _flag(name: str, default: str = "0") -> bool:
    value = os.getenv(name, default)
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be '0' or '1', got {value!r}")
    return value == "1"


BUILD_EXT = _flag("SOURCE_FAST_BUILD_EXT", "1")
REQUIRE_EXT = _flag("SOURCE_FAST_REQUIRE_EXT")
FORCE_CUDA = _flag("SOURCE_FAST_FORCE_CUDA")


def _extensions_and_cmdclass():
    if not BUILD_EXT:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        # torch's ninja path raises RuntimeError, which setuptools' `optional=True` does not catch,
        # so a failed build is turned into a warning here (unless SOURCE_FAST_REQUIRE_EXT=1).
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if REQUIRE_EXT:
                    raise
                warnings.warn(f"source_fast: building {ext.name} failed; only the torch/Triton paths will run ({exc})")

    # Decided from the torch build and the toolkit, never from a visible GPU: build boxes often have none.
    with_cuda = FORCE_CUDA or (torch.version.cuda is not None and CUDA_HOME is not None)
    # csrc/cuda/ holds everything that needs the CUDA toolkit: the .cu kernels (CUDA headers only)
    # and the thin .cpp that binds them to the dispatcher (needs ATen's CUDA headers).
    sources = sorted(glob.glob("csrc/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    ext_cls = CUDAExtension if with_cuda else CppExtension
    ext = ext_cls(
        "source_fast._C",
        sources,
        define_macros=[("SOURCE_FAST_WITH_CUDA", "1" if with_cuda else "0")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-fopenmp"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
        optional=not REQUIRE_EXT,  # lets setuptools skip copying a .so that was never built
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
