"""Run a function on N local ranks (processes, one CPU thread each) as torchrun would.

Used by the CPU demo, the CPU benchmarks and the tests: two processes with one thread each are
our two devices on a machine without GPUs.

``run_ranks(fn, *args)`` spawns ``world_size`` processes with torchrun's environment variables,
calls ``fn(rank, *args)`` in each and returns one Outcome per rank. Results travel back through a
queue that is drained before joining (a join-first parent deadlocks on large results); return
numpy arrays, bytes or plain Python values, not tensors.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


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


def _child(rank: int, world_size: int, port: int, env: dict, threads: int, fn: Callable,
           args: tuple, results) -> None:
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


def run_ranks(fn: Callable, *args: Any, world_size: int = 2, timeout_s: float = 180.0,
              env: dict | None = None, threads_per_rank: int = 1) -> dict[int, Outcome]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks; returns {rank: Outcome}.

    ``fn`` must be importable by name (a module-level function). Each rank uses
    ``threads_per_rank`` CPU threads.

    A rank that exits without reporting (killed, os._exit) is missing from the result. Ranks still
    alive after ``timeout_s`` are killed and reported missing.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, daemon=True,
                         args=(r, world_size, port, env or {}, threads_per_rank, fn, args, results))
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
