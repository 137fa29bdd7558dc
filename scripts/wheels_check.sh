#!/usr/bin/env bash
# Check every hybridiff_rt wheel in DIST (default dist/) installed on its own, away from the
# source tree: a fresh venv per wheel, the CPU torch 2.13.0 first (never a CUDA torch), then the
# wheel with --no-deps plus its runtime dependencies (numpy, diffusers, transformers, tqdm, and
# nvidia-cuda-runtime-cu12 for the +cu12x wheel; no triton), then, from an empty folder outside
# the tree with PYTHONPATH empty:
#   - hybridiff_rt._C.build_info() reports the CUDA version of the wheel's local tag
#   - `hybridiff-rt info` runs (and names the missing driver)
#   - tests/test_extension.py passes against the installed wheel
#   - for one wheel (DEMO_WHEEL, default the first +cpu one): `hybridiff-rt demo --steps 4
#     --per-prompt 1` with the [demo] extra (matplotlib)
# A wheel for an interpreter without a local CPU torch 2.13.0 (pip would fetch a CUDA torch) gets
# the checks that need no torch (its module loads from the installed wheel and reports the CUDA
# version of its tag) and is reported PARTIAL. The sdist is pip-installed (an isolated build) in
# a fresh venv and checked the same way (version, build_info, tests/test_extension.py).
# The artefacts are checked JOBS at a time (default: the number of CPUs), each with its own venv,
# log and pip cache; the logs are printed in order once all are done.
# Prints PASS/PARTIAL/FAIL/SKIP per artefact; exits 1 when any fails.
#
# usage: scripts/wheels_check.sh [DIST]
# env:   TORCH_SPEC (default torch==2.13.0), JOBS (default nproc), KEEP_WORK=1
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="${1:-${DIST:-dist}}"
case "$DIST" in /*) ;; *) DIST="$ROOT/$DIST" ;; esac
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
JOBS="${JOBS:-$(nproc)}"
DEPS=(numpy "diffusers>=0.30" transformers tqdm pytest)

WORK="$(mktemp -d /tmp/hybridiff_wheels_check.XXXXXX)"
if [[ "${KEEP_WORK:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "work folder: $WORK"; fi
RUN_DIR="$WORK/cwd"   # outside the source tree, empty
mkdir -p "$RUN_DIR" "$WORK/log" "$WORK/result"

find_python() {  # find_python 311 -> an interpreter of Python 3.11
  local v="${1:0:1}.${1:1}" c
  for c in "python$v" /root/.pyenv/versions/"$v".*/bin/python"$v" /usr/bin/python"$v"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$v'.split('.'))))" 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}
quiet_pip() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
# The check venvs install without byte-compiling (pip's compiling of torch and the dependencies
# is about half of an install); the checks then write the .pyc of what they import, once per
# venv, under the venv (PYTHONPYCACHEPREFIX), even where PYTHONDONTWRITEBYTECODE is set.
in_run_dir() {  # in_run_dir VENV CMD...: CMD from the empty folder, PYTHONPATH empty
  local venv="$1"; shift
  (cd "$RUN_DIR" && env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX="$venv/pycache" PYTHONPATH= "$@")
}

shopt -s nullglob
wheels=("$DIST"/hybridiff_rt-*.whl)
[[ ${#wheels[@]} -gt 0 ]] || { echo "no hybridiff_rt wheels in $DIST (make wheels)"; exit 1; }
demo_wheel="${DEMO_WHEEL:-}"
if [[ -z "$demo_wheel" ]]; then
  for w in "${wheels[@]}"; do [[ "$(basename "$w")" == *+cpu-cp311-* ]] && demo_wheel="$w" && break; done
  [[ -n "$demo_wheel" ]] || demo_wheel="${wheels[0]}"
fi

module_check_py() {  # module_check_py VENV LOCAL_TAG -> Python that loads only _C (no torch)
  local want
  if [[ "$2" == cpu ]]; then want="None"; else want="'${2:2:2}.${2:4}'"; fi
  cat <<PYEOF
import glob, importlib.util, sys
(path,) = glob.glob('$1/lib/python*/site-packages/hybridiff_rt/_C*.so')
spec = importlib.util.spec_from_file_location('hybridiff_rt._C', path)
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
info = c.build_info(); print(info)
assert 'torch' not in sys.modules, 'the extension module must load without torch'
assert info['cuda_version'] == $want, (info['cuda_version'], $want)
assert info['version'].endswith('+$2'), info['version']
PYEOF
}

result() { echo "$2" > "$WORK/result/$1"; }  # result NAME TEXT

check_wheel() {  # check_wheel WHEEL: prints its log, records its result
  local whl="$1" name local_tag pytag py venv vpy torch_version want
  name="$(basename "$whl")"
  local_tag="$(sed -E 's/^hybridiff_rt-[^+]*\+([a-z0-9]+)-.*/\1/' <<<"$name")"   # cu130 / cu128 / cpu
  pytag="$(sed -E 's/.*-cp([0-9]+)-cp[0-9]+-.*/\1/' <<<"$name")"
  echo "[started $(date -u +%H:%M:%S)]"
  py="$(find_python "$pytag")" || { result "$name" "SKIP (no python ${pytag})"; return; }
  venv="$WORK/venv-${name%.whl}"
  "$py" -m venv "$venv"
  vpy="$venv/bin/python"
  quiet_pip "$vpy" -m pip install -q --no-compile --upgrade pip
  # Never a CUDA torch: only go on when pip would install a +cpu build.
  torch_version="$(quiet_pip "$vpy" -m pip install --dry-run --no-deps --quiet --report - "$TORCH_SPEC" \
                   | "$vpy" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' 2>/dev/null)"
  if [[ "$torch_version" != *+cpu ]]; then
    # No CPU torch for this interpreter: check what needs no torch (the module loads from the
    # installed wheel, against the CUDA runtime package for +cu12x, and says what it was built for).
    local no_torch=()
    [[ "$local_tag" == cu12* ]] && no_torch+=(nvidia-cuda-runtime-cu12)
    if quiet_pip "$vpy" -m pip install -q --no-compile --no-deps "$whl" "${no_torch[@]}" &&
       in_run_dir "$venv" "$vpy" -c "$(module_check_py "$venv" "$local_tag")"; then
      result "$name" "PARTIAL (module_build_info:ok; torch-dependent checks skipped: no CPU build of $TORCH_SPEC for cp$pytag here, got '${torch_version:-none}')"
    else
      result "$name" "FAIL (module_build_info)"
    fi
    return
  fi
  local extra=()
  [[ "$local_tag" == cu12* ]] && extra+=(nvidia-cuda-runtime-cu12)
  [[ "$whl" == "$demo_wheel" ]] && extra+=(matplotlib)
  if ! quiet_pip "$vpy" -m pip install -q --no-compile "$TORCH_SPEC" ||
     ! quiet_pip "$vpy" -m pip install -q --no-compile --no-deps "$whl" ||
     ! quiet_pip "$vpy" -m pip install -q --no-compile "${DEPS[@]}" "${extra[@]}"; then
    result "$name" "FAIL (install)"; return
  fi
  "$vpy" -m pip check 2>&1 | grep -v -i triton || true   # triton is left out on purpose

  local steps=() ok=1
  step() {  # step LABEL CMD...: run in RUN_DIR with PYTHONPATH empty, record pass/fail
    local label="$1"; shift
    echo "-- $label"
    if in_run_dir "$venv" PATH="$venv/bin:$PATH" "$@"; then steps+=("$label:ok")
    else steps+=("$label:FAIL"); ok=0; fi
  }
  if [[ "$local_tag" == cpu ]]; then want="None"; else want="'${local_tag:2:2}.${local_tag:4}'"; fi
  step build_info "$vpy" -c "
import hybridiff_rt, hybridiff_rt._C as c
info = c.build_info(); print(info)
assert '$venv' in c.__file__ and '$ROOT' not in hybridiff_rt.__file__, (c.__file__, hybridiff_rt.__file__)
want = $want
assert info['cuda_version'] == want, (info['cuda_version'], want)
assert info['version'].endswith('+$local_tag'), info['version']
print('built for CUDA', info['cuda_version'], 'cudart', info.get('cudart'), 'archs', info['archs'])"
  step info bash -c "set -o pipefail; '$venv/bin/hybridiff-rt' info 2>&1 | tee '$venv/info.txt'"
  step test_extension "$vpy" -m pytest -q -p no:cacheprovider --import-mode=importlib \
       --rootdir "$RUN_DIR" -c /dev/null "$ROOT/tests/test_extension.py"
  if [[ "$whl" == "$demo_wheel" ]]; then
    step demo "$venv/bin/hybridiff-rt" demo --steps 4 --per-prompt 1 --out "$WORK/democheck"
  fi
  if [[ $ok == 1 ]]; then result "$name" "PASS (${steps[*]})"; else result "$name" "FAIL (${steps[*]})"; fi
}

# The sdist, installed by pip as from a package index (find-links: pip then discards an sdist whose
# built metadata names another version than its file name) with an isolated build, in a fresh
# venv with the CPU torch: pip accepts it, and the module it compiled works. CUDA is what this machine offers (nvcc -> CUDA engine); one GPU
# architecture (HYBRIDIFF_RT_CUDA_ARCHS=90) keeps the compile short.
check_sdist() {  # check_sdist SDIST: prints its log, records its result
  local sdist="$1" name version venv vpy py tag steps=() ok=1 check cmd
  name="$(basename "$sdist")"
  version="$(sed -E 's/^hybridiff_rt-(.*)\.tar\.gz$/\1/' <<<"$name")"
  echo "[started $(date -u +%H:%M:%S)]"
  venv="$WORK/venv-sdist"; vpy="$venv/bin/python"
  if ! py="$(find_python 311)"; then
    result "$name" "SKIP (no python 3.11)"
  elif ! { "$py" -m venv "$venv" && quiet_pip "$vpy" -m pip install -q --no-compile --upgrade pip &&
           quiet_pip "$vpy" -m pip install -q --no-compile "$TORCH_SPEC" &&
           mkdir -p "$WORK/sdist-index" && cp "$sdist" "$WORK/sdist-index/" &&
           (cd "$RUN_DIR" && HYBRIDIFF_RT_CUDA_ARCHS=90 quiet_pip "$vpy" -m pip install -q --no-compile \
              --no-cache-dir --no-deps --find-links "$WORK/sdist-index" "hybridiff_rt==$version") &&
           quiet_pip "$vpy" -m pip install -q --no-compile "${DEPS[@]}"; }; then
    result "$name" "FAIL (pip install of the sdist)"
  else
    if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then tag=cu; else tag=cpu; fi
    for check in version build_info test_extension; do
      echo "-- $check"
      case $check in
        version) cmd=("$vpy" -c "import importlib.metadata as m; v = m.version('hybridiff_rt'); print(v); assert v == '$version', v") ;;
        build_info) cmd=("$vpy" -c "import hybridiff_rt._C as c; i = c.build_info(); print(i); assert i['version'].split('+')[1].startswith('$tag'), i") ;;
        test_extension) cmd=("$vpy" -m pytest -q -p no:cacheprovider --import-mode=importlib --rootdir "$RUN_DIR" -c /dev/null "$ROOT/tests/test_extension.py") ;;
      esac
      if in_run_dir "$venv" "${cmd[@]}"; then steps+=("$check:ok"); else steps+=("$check:FAIL"); ok=0; fi
    done
    if [[ $ok == 1 ]]; then result "$name" "PASS (${steps[*]})"; else result "$name" "FAIL (${steps[*]})"; fi
  fi
}

# Longest checks first, so the last ones running are short: the sdist (it compiles the
# extension), the demo wheel, the other cp311 wheels (torch installed, tests run), then the rest
# (often PARTIAL: no local torch for their interpreter). The results print in the same order.
artefacts=()
sdists=("$DIST"/hybridiff_rt-*.tar.gz)
[[ ${#sdists[@]} -gt 0 ]] && artefacts+=("${sdists[0]}")
artefacts+=("$demo_wheel")
for w in "${wheels[@]}"; do
  [[ "$w" != "$demo_wheel" && "$(basename "$w")" == *-cp311-* ]] && artefacts+=("$w")
done
for w in "${wheels[@]}"; do
  [[ "$w" != "$demo_wheel" && "$(basename "$w")" != *-cp311-* ]] && artefacts+=("$w")
done

# JOBS checks at a time, each in the background with its own log and pip cache
running=0
for artefact in "${artefacts[@]}"; do
  name="$(basename "$artefact")"
  if (( running >= JOBS )); then wait -n || true; running=$((running - 1)); fi
  checker=check_wheel; [[ "$name" == *.tar.gz ]] && checker=check_sdist
  printf '[%s] checking %s\n' "$(date -u +%H:%M:%S)" "$name"
  (export PIP_CACHE_DIR="$WORK/pip-cache-$name"; "$checker" "$artefact") > "$WORK/log/$name" 2>&1 &
  running=$((running + 1))
done
wait

failed=0
for artefact in "${artefacts[@]}"; do
  name="$(basename "$artefact")"
  printf '\n==== %s\n' "$name"
  cat "$WORK/log/$name"
  [[ -s "$WORK/result/$name" ]] || result "$name" "FAIL (the check ended without a result)"
  [[ "$(cat "$WORK/result/$name")" == FAIL* ]] && failed=1
done

printf '\n==== summary  [%s]\n' "$(date -u +%H:%M:%S)"
for artefact in "${artefacts[@]}"; do
  printf '%-64s %s\n' "$(basename "$artefact")" "$(cat "$WORK/result/$(basename "$artefact")")"
done
exit $failed
