"""Run a function on N local ranks (processes, one CPU thread each) as torchrun would.

Used by the CPU demo, the CPU benchmarks and the tests: two processes with one thread each are
our two devices on a machine without GPUs.

``run_ranks(fn, *args)`` starts ``world_size`` processes with torchrun's environment variables,
calls ``fn(rank, *args)`` in each and returns one Outcome per rank. Results travel back through a
queue that is drained before joining (a join-first parent deadlocks on large results); return
numpy arrays, bytes or plain Python values, not tensors.

How ranks start: a rank process that imports torch, diffusers and transformers spends 6 to 7.5 s
on imports before it does anything (measured on a 2-core machine), and building one of our tiny
pipelines then takes under 0.1 s. So, where the platform has it, ranks are forked from a
*forkserver* that imported :data:`PRELOAD` once (the first call in a process starts it). The
forkserver never runs torch operations, initialises CUDA or starts threads, so forking from it
is as safe as a fresh interpreter. Its modules were imported under the environment it was
started with: when ``os.environ`` has changed since (other than the names in
:data:`VOLATILE_ENVIRONMENT`), the server is stopped and the next call starts a new one, and a
call with an ``env`` argument spawns its ranks. A forked rank also takes the caller's current
``os.environ`` before it runs. ``HYBRIDIFF_RT_RANKS_START=spawn`` spawns every rank (a fresh
interpreter each).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import time
import traceback
from multiprocessing import forkserver
from typing import Any, Callable

import torch.multiprocessing as mp

from .. import env as variables

#: Modules the forkserver imports before forking ranks (a module missing here is skipped): torch
#: and the diffusers / transformers modules that the bundled tiny pipelines pull in.
PRELOAD: tuple[str, ...] = (
    "torch", "torch.distributed", "numpy",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
    "transformers.models.clip.modeling_clip", "transformers.models.t5.modeling_t5",
)

#: Environment variables that change between calls without bearing on how modules import
#: (pytest names the running test in one).
VOLATILE_ENVIRONMENT: frozenset[str] = frozenset({"PYTEST_CURRENT_TEST"})

#: The environment the forkserver of this process was started with (None: not started).
_forkserver_environment: dict[str, str] | None = None


@dataclasses.dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0

    def unwrap(self) -> Any:
        if not self.ok:
            raise AssertionError(f"rank {self.rank} failed: {self.error_type}: {self.error}\n"
                                 f"{self.traceback}")
        return self.value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, caller_env: dict, env: dict, threads: int,
           fn: Callable, args: tuple, results) -> None:
    os.environ.clear()  # a forked rank starts from the forkserver's environment: take the caller's
    os.environ.update(caller_env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads), **env})
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        value = fn(rank, *args)
        results.put(Outcome(rank, True, value, seconds=time.perf_counter() - started))
    except BaseException as exc:  # report every failure to the parent, including SystemExit
        results.put(Outcome(rank, False, None, type(exc).__name__, str(exc),
                            traceback.format_exc(), time.perf_counter() - started))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def start_method(env: dict | None = None) -> str:
    """How the next :func:`run_ranks` call starts its ranks: "forkserver" or "spawn" (module
    docstring). A running forkserver whose environment is out of date is stopped here, so that
    the next rank starts a new one under the current environment."""
    global _forkserver_environment
    chosen = variables.read("HYBRIDIFF_RT_RANKS_START").lower()
    if chosen not in ("auto", "spawn"):
        raise ValueError(f"HYBRIDIFF_RT_RANKS_START={chosen!r}: set it to auto or spawn, or "
                         "unset it")
    if chosen == "spawn" or env or "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    lasting = _lasting_environment()
    if _forkserver_environment is None:
        mp.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    elif lasting != _forkserver_environment:
        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is None:  # no way to stop it on this Python: spawn
            return "spawn"
        stop()
    _forkserver_environment = lasting
    return "forkserver"


def _lasting_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in VOLATILE_ENVIRONMENT}


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = 180.0,
              env: dict | None = None, threads_per_rank: int = 1) -> dict[int, Outcome]:
    """Run ``fn(rank, *args)`` on ``world_size`` new processes; returns {rank: Outcome}.

    ``fn`` must be importable by name (a module-level function). Each rank uses
    ``threads_per_rank`` CPU threads.

    A rank that exits without reporting (killed, os._exit) is missing from the result. Ranks still
    alive after ``timeout_s`` are killed and reported missing.
    """
    ctx = mp.get_context(start_method(env))
    results = ctx.Queue()
    port = free_port()
    caller_env = dict(os.environ)
    procs = [ctx.Process(target=_child, daemon=True, args=(
                 r, world_size, port, caller_env, env or {}, threads_per_rank, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            try:
                item = results.get(timeout=0.2)
                outcomes[item.rank] = item
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    # drain what the dead processes may still have flushed
                    try:
                        while True:
                            item = results.get(timeout=0.5)
                            outcomes[item.rank] = item
                    except queue.Empty:
                        break
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:  # also when the caller is interrupted (Ctrl-C, a test timeout): no rank lingers
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return outcomes


def all_ok(outcomes: dict[int, Outcome], world_size: int = 2) -> list[Any]:
    """Values of every rank in rank order; fails the test naming any rank that failed."""
    missing = [r for r in range(world_size) if r not in outcomes]
    assert not missing, f"ranks {missing} never reported (killed or timed out)"
    return [outcomes[r].unwrap() for r in range(world_size)]
