#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it has torch 2.11, triton 3.6, transformers, pybind11,
# pytest, but no diffusers and no network) into .whl/, for `carry: [".whl"]` with
# bench/device_check.sh. Pure-Python wheels; Python 3.12 x86-64 tags as the device README says.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl "diffusers==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("diffusers"))' 2>/dev/null || echo 0.42.1)"
ls -la .whl
