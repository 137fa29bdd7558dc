#!/usr/bin/env bash
# GPU device check (one run, at most 8 minutes on one H100/H200):
#   1. build hybridiff_rt._C in place with CUDA (no network: no build isolation),
#   2. run the GPU tests (pytest -m gpu over tests/: IPC engine, Triton kernel),
#   3. run bench/transport.py and bench/cfg_kernel.py.
# The GPU machine has no diffusers and no network: run bench/prepare_device_wheels.sh here first
# and carry .whl (device tool: carry [".whl"]).
# Logs and JSON go to "$OUT" (default ./out). Every step runs even if an earlier one failed; the
# exit status is non-zero when any step failed. Append more GPU steps with `step NAME TIMEOUT CMD`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
FAILED=()
T0=$SECONDS

log() { echo "[device_check +$((SECONDS - T0))s] $*"; }

# step NAME TIMEOUT_S CMD...: run CMD with a time limit, output to $OUT/NAME.log, record failure.
step() {
  local name=$1 limit=$2
  shift 2
  log "start $name (limit ${limit}s)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  tail -n 40 "$OUT/$name.log"
  if [[ $rc -ne 0 ]]; then
    log "FAILED $name (exit $rc)"
    FAILED+=("$name")
  else
    log "ok $name"
  fi
  return 0
}

# Carried wheels (pybind11, cmake, ninja, pytest, diffusers, ...) for a machine without network.
if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing carried wheels from .whl/ into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi

{
  nvidia-smi || true
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  command -v nvcc && nvcc --version | tail -n 2
  command -v cmake && cmake --version | head -n 1
  "$PY" -c "import pybind11; print('pybind11', pybind11.__version__)" || true
} >"$OUT/environment.txt" 2>&1 || true
cat "$OUT/environment.txt"

# Hopper only by default for speed (H100/H200 are sm_90); override to build more.
export HYBRIDIFF_RT_CUDA=on
export HYBRIDIFF_RT_CUDA_ARCHS="${HYBRIDIFF_RT_CUDA_ARCHS:-90}"
step build 120 "$PY" setup.py build_ext --inplace
step build_info 30 "$PY" -c "import json, hybridiff_rt._C as c; print(json.dumps(c.build_info()))"

step gpu_tests 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/ \
  --junitxml="$OUT/gpu_tests.xml"

step transport_bench 110 "$PY" bench/transport.py --out "$OUT" --timeout 100
step cfg_kernel_bench 60 "$PY" bench/cfg_kernel.py --out-dir "$OUT"

log "done in $((SECONDS - T0))s; failed steps: ${FAILED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]
