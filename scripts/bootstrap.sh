#!/usr/bin/env bash
# Set up (or refresh) the virtual environment with everything hybridiff_rt needs; idempotent.
#
#   bash scripts/bootstrap.sh          # uses .venv (override with VENV=path)
#
# torch: kept if already importable. Otherwise a machine with an NVIDIA driver gets the registry's
# default CUDA build, and a machine without one gets torch==2.13.0, a local CPU build, so a
# CPU-only machine never downloads gigabytes of CUDA libraries.
#
# A second run with nothing changed returns at once: the venv keeps a stamp (.venv/.bootstrap-stamp)
# of what the install depends on (this script, pyproject.toml, setup.py, CMakeLists.txt, every file
# under csrc/, the interpreter). A changed input, or an extension that no longer imports,
# reinstalls; FORCE_BOOTSTRAP=1 always does.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.bootstrap-stamp"
inputs_digest() {
  { "$PY" --version; find scripts/bootstrap.sh pyproject.toml setup.py CMakeLists.txt csrc -type f \
      -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1
}
if [[ "${FORCE_BOOTSTRAP:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_digest)" ]] &&
   "$PY" -c "import torch, hybridiff_rt._C" >/dev/null 2>&1; then
  echo "[bootstrap] $VENV is up to date (nothing it depends on changed; FORCE_BOOTSTRAP=1 reinstalls)"
  exit 0
fi
rm -f "$STAMP"

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[bootstrap] NVIDIA driver found: installing torch with CUDA"
    "$PY" -m pip install -q --no-compile torch
  else
    echo "[bootstrap] no NVIDIA driver: installing the CPU build torch==2.13.0"
    "$PY" -m pip install -q --no-compile torch==2.13.0
  fi
fi

echo "[bootstrap] build tools and the package (extension built with CMake)"
"$PY" -m pip install -q --no-compile setuptools wheel pybind11 cmake ninja
"$PY" -m pip install -q --no-compile --no-build-isolation -e '.[test]'
# pip byte-compiles file by file; compileall on every core does the same in about half the time
# (what is already compiled is skipped). Failures are files that are not Python 3 (templates).
"$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  >/dev/null 2>&1 || true
"$PY" -c "import hybridiff_rt._C as c; i = c.build_info(); print('[bootstrap] extension:', 'CUDA ' + str(i['cuda_version']) if i['cuda_compiled'] else 'host-only')"
inputs_digest > "$STAMP"
