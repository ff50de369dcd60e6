"""`import source_fast` does no work: no Triton import (kernels are decorated on first use, after
TRITON_INTERPRET is settled), no CUDA initialisation, and it works with the extension disabled."""

import os
import shutil
import subprocess
import sys
import sysconfig

CHECK = """
import sys, torch
torch.cuda.current_device = lambda: (_ for _ in ()).throw(RuntimeError("CUDA initialised at import"))
import source_fast, source_fast.ops, source_fast.corpus, source_fast.interop.kronfluence
assert "triton" not in sys.modules, "triton imported at import time"
assert not torch.cuda.is_initialized()
from source_fast import _ext
print(_ext.load_error)
"""


def test_import_is_lazy():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    assert out.returncode == 0


def test_import_with_the_extension_disabled():
    env = {**os.environ, "SOURCE_FAST_DISABLE_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "disabled by SOURCE_FAST_DISABLE_EXT=1 when source_fast was imported"


def test_an_extension_that_was_not_built_says_so(tmp_path):
    """(Python's own words would be "a circular import".)"""
    package = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "source_fast")
    shutil.copytree(package, tmp_path / "source_fast", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(tmp_path)!r}); import source_fast; from source_fast import _ext; "
            "assert source_fast.__file__.startswith(sys.path[0]); print(_ext.load_error)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("not built: install with `pip install --no-build-isolation`"), out.stdout


# setup.py where torch cannot be imported: an isolated build (pyproject.toml keeps torch out of it).
NO_TORCH_SETUP = """
import os, sys
sys.modules["torch"] = None
sys.argv = ["setup.py", "--name"]
exec(compile(open("setup.py").read(), "setup.py", "exec"))
"""


def test_build_without_torch_installs_pure_python_or_fails_when_the_extension_is_required():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOURCE_FAST_")}
    ok = subprocess.run([sys.executable, "-c", NO_TORCH_SETUP], cwd=repo, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("source_fast"), ok.stderr[-2000:]
    assert "torch is not importable while building" in ok.stderr and "--no-build-isolation" in ok.stderr
    required = subprocess.run([sys.executable, "-c", NO_TORCH_SETUP], cwd=repo, capture_output=True, text=True,
                              env={**env, "SOURCE_FAST_REQUIRE_EXT": "1"})
    assert required.returncode != 0 and "SOURCE_FAST_REQUIRE_EXT=1: torch is not importable" in required.stderr


def test_a_regular_build_leaves_the_checkouts_editable_binary(tmp_path):
    """setup.py's build_ext, on a copy of the build files with a one-line C++ source: built in place (an
    editable install) it replaces the package folder's binary (an old one must never survive a failed
    build there); built for another environment (`pip install --no-build-isolation .`) it leaves it,
    or the checkout's run.sh venv would lose its extension without a word."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy(os.path.join(repo, name), tmp_path)
    shutil.copytree(os.path.join(repo, "source_fast"), tmp_path / "source_fast",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(repo, "kernels"), tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "one.cpp").write_text("int source_fast_test_symbol = 1;\n")
    editable = tmp_path / "source_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOURCE_FAST_")}

    def build(*args):
        editable.write_bytes(b"the checkout's own build")
        run = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]

    build("--build-lib", str(tmp_path / "elsewhere"), "--build-temp", str(tmp_path / "tmp"))
    assert editable.read_bytes() == b"the checkout's own build"
    assert (tmp_path / "elsewhere" / "source_fast" / editable.name).stat().st_size > 0
    build("--inplace", "--build-temp", str(tmp_path / "tmp"))
    assert editable.read_bytes()[:4] == b"\x7fELF"  # the new build in its place
