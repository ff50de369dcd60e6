#!/usr/bin/env bash
# The two commands of the README, each doing its own set-up:
#   bash run.sh demo [--out DIR] [--quick]   the main job (digits: SOURCE vs EK-FAC attribution)
#   bash run.sh test [pytest args]           the whole test suite
# Set-up: a virtualenv in .venv (SOURCE_FAST_VENV overrides), torch, this package installed editable
# with its C++ extension built (SOURCE_FAST_REQUIRE_EXT=1 makes a failed build fatal, as in CI).
set -euo pipefail
here="$PWD"  # the demo's --out is relative to where it is run
cd "$(dirname "$0")"
venv="${SOURCE_FAST_VENV:-.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac
py="$venv/bin/python"

setup() {
  if [ ! -x "$py" ]; then
    # A python3 that already has torch (a GPU machine's CUDA build) shares it with the venv, so
    # nothing replaces it; otherwise the venv gets torch's CPU wheel below.
    if python3 -c "import torch" 2>/dev/null; then
      python3 -m venv --system-site-packages "$venv"
    else
      python3 -m venv "$venv"
    fi
  fi
  local pip=("$py" -m pip install --quiet --disable-pip-version-check)
  if ! "$py" -c "import torch" 2>/dev/null; then
    # torch==2.13.0 is the CPU wheel on these machines; elsewhere set SOURCE_FAST_TORCH, e.g. to a
    # "+cpu" build, so a CPU box does not download a multi-GB CUDA build.
    # numpy with it: torch imported without numpy (the set-up's check below) warns that it is missing.
    "${pip[@]}" "${SOURCE_FAST_TORCH:-torch==2.13.0}" numpy
  fi
  # Installed before from the same build files, torch and build settings, this checkout's package and
  # extension loading: nothing to do (pip would compile the extension again, most of a minute). Python
  # and Triton files are installed editable. The check runs outside the checkout, whose own folder
  # would otherwise be imported whatever the venv holds.
  local stamp="$venv/.source_fast_installed" package="$PWD/source_fast" built
  built="$( { cat setup.py pyproject.toml MANIFEST.in $(find csrc -type f | LC_ALL=C sort)
              "$py" -c "import torch; print(torch.__version__, torch.version.cuda)"
              { env | grep -E "^(SOURCE_FAST_(BUILD_EXT|FORCE_CUDA)|CUDA_HOME|TORCH_CUDA_ARCH_LIST)=" || true; } | LC_ALL=C sort
            } | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && grep -qx "$1 $built" "$stamp" && (cd / && "$py" -c \
      "import os, sys, source_fast._C as c; p = os.path.realpath; sys.exit(p(os.path.dirname(c.__file__)) != p(sys.argv[1]))" \
      "$package") 2>/dev/null; then
    return
  fi
  rm -f "$stamp"
  "${pip[@]}" "setuptools>=64" wheel ninja
  # --no-build-isolation: the extension must be built against the torch that runs it.
  MAX_JOBS="${MAX_JOBS:-2}" "${pip[@]}" --no-build-isolation -e ".[$1]"
  if [ "$1" = test ]; then
    # kronfluence is the reference the interop tests compare against. Its metadata asks for
    # torchvision, which it never imports and which would replace the CPU torch: install it alone.
    "${pip[@]}" --no-deps "kronfluence==1.0.1"
    echo "demo $built" >>"$stamp"  # the test extra holds the demo's
  fi
  echo "$1 $built" >>"$stamp"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  demo)
    setup demo
    cd "$here"
    "$py" -m source_fast demo "$@"
    ;;
  test)
    setup test
    "$py" -m source_fast.info
    # CUDA-marked tests need a GPU: on a CPU machine they are deselected, not skipped.
    if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      "$py" -m pytest -q "$@"
    else
      "$py" -m pytest -q -m "not cuda" "$@"
    fi
    ;;
  *)
    echo "usage: bash run.sh demo [--out DIR] [--quick]  |  bash run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
