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


def _remove_builds(paths, in_package: bool = True) -> None:
    """Deletes earlier builds of source_fast._C (`paths`, in build/, and with in_package those in the
    package folder, where an editable install loads them), so a pure-Python install or a failed build
    never leaves an old binary to be loaded."""
    package = [*glob.glob(os.path.join("source_fast", "_C.*.so")), *glob.glob(os.path.join("source_fast", "_C.*.pyd"))]
    for path in [*paths, *(package if in_package else [])]:
        if os.path.exists(path):
            os.remove(path)


def _extensions_and_cmdclass():
    if not BUILD_EXT:
        _remove_builds([])
        return [], {}
    try:
        import torch
    except ImportError:  # an isolated build environment (pyproject.toml says why torch is not in it)
        message = ("torch is not importable while building, so source_fast._C cannot be built: install torch "
                   "first and build with `pip install --no-build-isolation`")
        if REQUIRE_EXT:
            raise SystemExit(f"SOURCE_FAST_REQUIRE_EXT=1: {message}") from None
        warnings.warn(f"source_fast: {message}; installing the torch/Triton paths only")
        return [], {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    class OptionalBuildExtension(BuildExtension):
        # torch's ninja path raises RuntimeError, which setuptools' `optional=True` does not catch,
        # so a failed build is turned into a warning here (unless SOURCE_FAST_REQUIRE_EXT=1).
        def build_extension(self, ext):
            # An earlier build's binary must not survive a failed one: setuptools would copy the old
            # build/lib file into the package and stale code would load without a word.
            # A regular install (into another environment) leaves the package folder's binary alone: it is
            # an editable install's of this checkout (run.sh's .venv), which would lose its extension, and
            # the wheel does not take it.
            in_package = self.inplace or getattr(self, "editable_mode", False)
            _remove_builds([self.get_ext_fullpath(ext.name)], in_package)
            try:
                super().build_extension(ext)
            except Exception as exc:
                if REQUIRE_EXT:
                    raise
                warnings.warn(f"source_fast: building {ext.name} failed; only the torch/Triton paths will run ({exc})")

    # Decided from the torch build and the toolkit, never from a visible GPU: build boxes often have none.
    # A CUDA_HOME without nvcc (CUDA runtime images) cannot build the .cu part: build for the CPU then.
    with_cuda = FORCE_CUDA or (
        torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
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
        # The host compiler takes torch's language standard (C++20 for torch 2.13's headers); the .cu
        # files include CUDA headers only.
        extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
        optional=not REQUIRE_EXT,  # lets setuptools skip copying a .so that was never built
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
