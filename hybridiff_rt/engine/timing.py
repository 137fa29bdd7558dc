"""Per-step timings of compute, transfer and wait, for the RunReport.

Sections of one denoiser step, in milliseconds:

* ``compute``: this rank's model work (the denoiser call, or its stage with ``prepare`` and,
  on the last stage, ``finish``).
* ``transfer``: exchanges on the critical path of the step, which also hold any wait for a
  slower peer (the CBP all-gather of the two predictions, the broadcast of the pipelined
  prediction, the fill step's boundary receive).
* ``wait``: time spent completing a transfer posted in an earlier step, i.e. the part of an
  overlapped transfer that compute did not hide (the stale boundary received during step s-1
  and taken at step s; the previous boundary send that must finish before the next one).

On CUDA devices each section is bracketed by CUDA events on the current stream, so it measures
stream time; the events are resolved without a host synchronisation when they have completed
(:meth:`StepTimer.collect` at the end of each step), and with one when the run ends
(``block=True``). On CPU each section is ``time.perf_counter`` wall time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

KINDS = ("compute", "transfer", "wait")


class StepTimer:
    """Accumulates sections per step; see the module docstring.

    Args:
        device: the device the rank computes on (CUDA: events; else perf_counter).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.clock = "cuda-events" if self.cuda else "perf_counter"
        self._step: int | None = None
        self._totals: dict[int, dict[str, float]] = {}
        self._pending: list[tuple[int, str, object, object]] = []

    def begin_step(self, step: int) -> None:
        """Sections from now on belong to ``step``."""
        self._step = step
        self._totals[step] = {kind: 0.0 for kind in KINDS}

    def end_step(self) -> None:
        """Sections from now on (work between steps, e.g. an extra side call) are not timed."""
        self._step = None

    def timed(self, fn: Callable[..., Any], kind: str = "compute") -> Callable[..., Any]:
        """``fn`` with every call inside a ``kind`` section."""
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.section(kind):
                return fn(*args, **kwargs)
        return timed_call

    @contextlib.contextmanager
    def section(self, kind: str) -> Iterator[None]:
        """Time the enclosed work as ``kind`` (one of KINDS) of the current step."""
        if kind not in KINDS:
            raise ValueError(f"section kind must be one of {KINDS}, got {kind!r}")
        step = self._step
        if step is None:
            yield
            return
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._totals.setdefault(step, dict.fromkeys(KINDS, 0.0))
                self._pending.append((step, kind, start, end))
        else:
            started = time.perf_counter()
            try:
                yield
            finally:
                totals = self._totals.setdefault(step, dict.fromkeys(KINDS, 0.0))
                totals[kind] += (time.perf_counter() - started) * 1e3

    def collect(self, block: bool = False) -> dict[int, tuple[float, float, float]]:
        """``{step: (compute, transfer, wait)}`` in ms of every step whose sections are all
        resolved, removed from the timer (call it after a step's last section). Without
        ``block``, CUDA sections still running stay pending (their steps come back from a later
        call); with it, the host waits for them."""
        unresolved = set()
        still = []
        for step, kind, start, end in self._pending:
            if block:
                end.synchronize()
            if block or end.query():
                self._totals[step][kind] += start.elapsed_time(end)
            else:
                still.append((step, kind, start, end))
                unresolved.add(step)
        self._pending = still
        done = {}
        for step in sorted(self._totals):
            if step not in unresolved:
                t = self._totals.pop(step)
                done[step] = tuple(t[k] for k in KINDS)
        return done
