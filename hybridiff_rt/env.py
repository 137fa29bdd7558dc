"""Every environment variable hybridiff_rt reads, with its default and meaning, in one place.

Plain standard library only: ``setup.py`` loads this file by path at build time, before the
package (or torch) can be imported. Read a variable with :func:`read`; the README lists them
(generated from :data:`VARIABLES` by ``hybridiff-rt env``).
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default (as text), who reads it, and what it does."""

    name: str
    default: str
    read_by: str  # "build", "runtime" or "tests"
    meaning: str


VARIABLES: dict[str, Variable] = {v.name: v for v in (
    Variable("HYBRIDIFF_RT_CUDA", "auto", "build",
             "auto | on | off: build the CUDA transfer engine into hybridiff_rt._C when a CUDA "
             "toolkit is found (auto), require it (on), or build the host-only module (off)."),
    Variable("HYBRIDIFF_RT_CUDA_ARCHS", "", "build",
             "CMake CUDA architectures for the build, e.g. \"90\" or \"80-real;90\"; empty: 75, 80, "
             "86, 89, 90 plus 100 and 120 where the toolkit supports them (PTX for the newest)."),
    Variable("HYBRIDIFF_RT_CUDA_HOME", "", "build",
             "a CUDA runtime folder (include/cuda_runtime_api.h with include/crt/, and "
             "lib/libcudart.so.N), e.g. site-packages/nvidia/cu13: build the CUDA engine against "
             "it without nvcc (shared cudart, no device code); empty: nvcc when found, else the "
             "nvidia-cuda-runtime pip package of the building interpreter."),
    Variable("HYBRIDIFF_RT_TIMEOUT_S", "30", "runtime",
             "seconds a collective waits for a peer when init_distributed() is called without "
             "timeout_s (HybridConfig(timeout_s=...) sets the runtime's own limit)."),
    Variable("HYBRIDIFF_RT_IPC_STAGING", "auto", "runtime",
             "auto | device | host: how the CUDA IPC transport stages transfers between two "
             "GPUs (host forces pinned host memory even where peer access exists)."),
    Variable("HYBRIDIFF_RT_RANKS_START", "auto", "runtime",
             "auto | spawn: how hybridiff_rt.testing.run_ranks (the tests, the CPU demo and "
             "benchmarks) starts local ranks: forked from a server that imported torch and "
             "diffusers once (auto, where the platform has a forkserver), or each a fresh "
             "interpreter (spawn)."),
    Variable("HYBRIDIFF_RT_FAKE_CUDA_TESTS", "0", "tests",
             "1: the IPC host tests also build the transfer engine against the fake CUDA runtime "
             "(csrc/testing/fake_cudart.cpp) and run it between two processes, no GPU needed."),
    Variable("HYBRIDIFF_RT_TEST_TWO_GPUS", "0", "tests",
             "1: the GPU IPC tests use two GPUs (ranks on devices 0 and 1) instead of one."),
)}


def read(name: str) -> str:
    """The value of variable ``name`` (stripped), or its default when unset or empty.

    Raises:
        KeyError: ``name`` is not one of :data:`VARIABLES` (every variable is declared here).
    """
    variable = VARIABLES[name]
    value = os.environ.get(name, "").strip()
    return value if value else variable.default


def markdown_table() -> str:
    """The variables as a markdown table (name, default, read by, meaning)."""
    lines = ["| variable | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for v in VARIABLES.values():
        default = f"`{v.default}`" if v.default else "(empty)"
        meaning = v.meaning.replace("|", "\\|")
        lines.append(f"| `{v.name}` | {default} | {v.read_by} | {meaning} |")
    return "\n".join(lines)


def _cudart_version(header: str) -> tuple[int, int] | None:
    try:
        with open(header, encoding="utf-8", errors="replace") as f:
            match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", f.read())
    except OSError:
        return None
    if not match:
        return None
    number = int(match.group(1))
    return number // 1000, (number % 1000) // 10


def cuda_runtime_at(home: str) -> dict | None:
    """The CUDA runtime in folder ``home`` (headers and shared libcudart), or None.

    ``home`` holds include/cuda_runtime_api.h and lib/ (or lib64/) libcudart.so.<major>; the
    crt/ headers that cuda_runtime_api.h includes come from include/crt/ (a toolkit; the
    nvidia-cuda-crt package merges them into nvidia/cu13/include) or, for the CUDA 12 pip
    layout, from the sibling nvidia/cuda_nvcc/include (package nvidia-cuda-nvcc-cu12).
    Returns {"home", "include_dirs", "library", "version": (major, minor)}, plus "rpath" when
    the library lies in a pip ``nvidia/`` tree: its folder from ``nvidia`` on (e.g.
    "nvidia/cuda_runtime/lib"), so a module installed at <site-packages>/hybridiff_rt/ finds it
    at $ORIGIN/../<rpath>.
    """
    include = os.path.join(home, "include")
    version = _cudart_version(os.path.join(include, "cuda_runtime_api.h"))
    if version is None:
        return None
    include_dirs = [include]
    if not os.path.isfile(os.path.join(include, "crt", "host_defines.h")):
        nvcc_include = os.path.join(os.path.dirname(home), "cuda_nvcc", "include")
        if not os.path.isfile(os.path.join(nvcc_include, "crt", "host_defines.h")):
            return None
        include_dirs.append(nvcc_include)
    for lib in ("lib", "lib64"):
        library = os.path.join(home, lib, f"libcudart.so.{version[0]}")
        if os.path.isfile(library):
            found = {"home": home, "include_dirs": include_dirs, "library": library,
                     "version": version}
            parts = os.path.dirname(os.path.abspath(library)).split(os.sep)
            if "nvidia" in parts:
                found["rpath"] = "/".join(parts[len(parts) - 1 - parts[::-1].index("nvidia"):])
            return found
    return None


def find_pip_cuda_runtime(roots: list[str]) -> dict | None:
    """The first CUDA runtime installed by pip under one of ``roots`` (site-packages folders).

    Layouts: CUDA 13 ``nvidia/cu13`` (packages nvidia-cuda-runtime + nvidia-cuda-crt), CUDA 12
    ``nvidia/cuda_runtime`` (nvidia-cuda-runtime-cu12, crt/ from nvidia-cuda-nvcc-cu12); the
    result is :func:`cuda_runtime_at`'s, "rpath" included.
    """
    for root in roots:
        for sub in ("nvidia/cu13", "nvidia/cuda_runtime"):
            found = cuda_runtime_at(os.path.join(root, sub))
            if found:
                return found
    return None
