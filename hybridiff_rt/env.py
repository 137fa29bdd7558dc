"""Every environment variable hybridiff_rt reads, with its default and meaning, in one place.

Plain standard library only: ``setup.py`` loads this file by path at build time, before the
package (or torch) can be imported. Read a variable with :func:`read`; the README lists them
(generated from :data:`VARIABLES` by ``hybridiff-rt env``).
"""

from __future__ import annotations

import dataclasses
import os


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
    Variable("HYBRIDIFF_RT_TIMEOUT_S", "30", "runtime",
             "seconds a collective waits for a peer when init_distributed() is called without "
             "timeout_s (HybridConfig(timeout_s=...) sets the runtime's own limit)."),
    Variable("HYBRIDIFF_RT_IPC_STAGING", "auto", "runtime",
             "auto | device | host: how the CUDA IPC transport stages transfers between two "
             "GPUs (host forces pinned host memory even where peer access exists)."),
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
