"""`import source_fast` does no work: no Triton import (kernels are decorated on first use, after
TRITON_INTERPRET is settled), no CUDA initialisation, and it works with the extension disabled."""

import os
import subprocess
import sys

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
    assert out.stdout.strip() == "disabled by SOURCE_FAST_DISABLE_EXT=1"
