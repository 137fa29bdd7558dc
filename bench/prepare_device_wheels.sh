#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/, to carry with bench/device_check.sh
# (device tool: carry [".whl"]); device_check.sh installs them into /tmp/site there.
#
# The GPU machine (Python 3.12, torch 2.11 CUDA 13.0, triton 3.6, transformers, pillow, pybind11,
# cmake, ninja, pytest, pytest-timeout) has no diffusers and no network. diffusers is pure Python,
# its other requirements are there already; it is pinned to the version in .venv (else 0.42.1).
set -euo pipefail
cd "$(dirname "$0")/.."
# .whl/ must stay out of git (it travels only when carried): .gitignore has /.whl/; else exclude it
if ! git check-ignore -q .whl/probe.whl 2>/dev/null; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  echo "/.whl/" >>"$exclude"
fi
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("diffusers"))' \
  2>/dev/null || echo 0.42.1)
mkdir -p .whl
rm -f .whl/diffusers-*.whl  # one version only: two would stop the install there
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
  -d .whl "diffusers==$version"
ls -la .whl
du -sh .whl
