"""Exact stage partitioning of a unit chain: minimise the slowest stage plus its outgoing transfer.

Definitions (N units, S stages):

* ``cuts`` is a list of S+1 unit indices with ``cuts[0] == 0``, ``cuts[-1] == N`` and strictly
  increasing values; stage j runs ``units[cuts[j]:cuts[j+1]]`` (every stage has >= 1 unit).
* ``boundary_bytes[u]`` is the size of the state leaving unit u, i.e. what crosses a cut placed
  right after unit u; ``boundary_bytes[N-1]`` is the prediction.
* Time of stage j, in ms: its compute (sum of its unit costs) plus its outgoing transfer
  ``boundary_bytes[cuts[j+1]-1] / bytes_per_ms``. The last stage's outgoing transfer is the
  prediction, which it ships to the other ranks (every rank steps the scheduler); it is counted
  unless ``count_final_transfer=False``. With one stage nothing is sent, so no transfer is counted.
* The link figure ``bytes_per_ms`` is one number for every link, or one per stage: entry j is the
  link stage j's outgoing transfer crosses (the last entry: the link its prediction is shipped
  over). Per-stage figures let the cut avoid putting a large boundary on a slow link (e.g. the one
  between two nodes).
* Objective: minimise the bottleneck ``max_j stage_ms[j]`` (the pipelined step time). Among
  optimal partitions the one with the least total transfer time is returned; remaining ties are
  broken deterministically (the last stages are kept as long as possible).

Solved exactly by dynamic programming in O(S * N^2): a first pass finds the optimal bottleneck,
a second the least-transfer partition within it. Compute sums use prefix sums, so every function
here (``partition``, ``stage_times_ms``, ``plan_partition``) reports identical float values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class PartitionPlan:
    """A partition and its modelled timings (all times in ms).

    Attributes:
        cuts: S+1 unit indices (see the module docstring).
        compute_ms / transfer_ms / stage_ms: per stage; ``stage_ms = compute_ms + transfer_ms``.
        bottleneck_ms: ``max(stage_ms)``, the modelled pipelined step time.
        serial_ms: sum of all unit costs (one device, no transfers).
        ideal_speedup: ``serial_ms / bottleneck_ms`` (inf when the bottleneck is 0).
    """

    cuts: tuple[int, ...]
    compute_ms: tuple[float, ...]
    transfer_ms: tuple[float, ...]
    stage_ms: tuple[float, ...]
    bottleneck_ms: float
    serial_ms: float
    ideal_speedup: float

    @property
    def num_stages(self) -> int:
        return len(self.cuts) - 1

    def stage_range(self, stage: int) -> tuple[int, int]:
        """``(start, stop)`` unit indices of ``stage``: it runs ``units[start:stop]``."""
        return self.cuts[stage], self.cuts[stage + 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "cuts": list(self.cuts),
            "compute_ms": list(self.compute_ms),
            "transfer_ms": list(self.transfer_ms),
            "stage_ms": list(self.stage_ms),
            "bottleneck_ms": self.bottleneck_ms,
            "serial_ms": self.serial_ms,
            "ideal_speedup": self.ideal_speedup,
        }


class _Chain:
    """Validated inputs plus the O(1) stage-time model shared by every function in this module."""

    def __init__(
        self,
        unit_costs_ms: Sequence[float],
        boundary_bytes: Sequence[int],
        num_stages: int,
        bytes_per_ms: float | Sequence[float],
        count_final_transfer: bool,
    ) -> None:
        costs = [float(c) for c in unit_costs_ms]
        n = len(costs)
        if n == 0:
            raise ConfigError("partition needs at least one unit cost; got an empty unit_costs_ms")
        if len(boundary_bytes) != n:
            raise ConfigError(
                f"boundary_bytes has {len(boundary_bytes)} entries but unit_costs_ms has {n}; give "
                "one boundary size (bytes of the state leaving that unit) per unit"
            )
        for u, c in enumerate(costs):
            if not math.isfinite(c) or c < 0:
                raise ConfigError(f"unit_costs_ms[{u}] = {c}; unit costs must be finite and >= 0 ms")
        sizes = []
        for u, b in enumerate(boundary_bytes):
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
                raise ConfigError(f"boundary_bytes[{u}] = {b!r}; boundary sizes must be integers >= 0 (bytes)")
            sizes.append(int(b))
        if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral):
            raise ConfigError(f"num_stages = {num_stages!r}; it must be an integer")
        if num_stages < 1:
            raise ConfigError(f"num_stages = {num_stages}; it must be >= 1")
        if num_stages > n:
            raise ConfigError(
                f"num_stages = {num_stages} is more than the {n} units; every stage needs at least "
                "one unit, so use at most that many stages (devices) or a finer staging"
            )
        if isinstance(bytes_per_ms, numbers.Real):
            links = [float(bytes_per_ms)] * int(num_stages)
        else:
            links = [float(x) for x in bytes_per_ms]
            if len(links) != num_stages:
                raise ConfigError(f"bytes_per_ms has {len(links)} link figures for {num_stages} "
                                  "stages; give one number, or one per stage (the link its "
                                  "outgoing transfer crosses)")
        for bpm in links:
            if math.isnan(bpm) or bpm <= 0:
                raise ConfigError(f"bytes_per_ms = {bytes_per_ms}; the link bandwidth must be > 0 bytes/ms (inf = free)")
        self.n, self.s = n, int(num_stages)
        self.prefix = [0.0]
        for c in costs:
            self.prefix.append(self.prefix[-1] + c)
        # transfer[j][b]: outgoing transfer (ms) of stage j when it ends right before unit index b.
        self.transfer = [[0.0] + [sizes[b - 1] / bpm for b in range(1, n + 1)] for bpm in links]
        if self.s == 1 or not count_final_transfer:
            self.transfer[-1][n] = 0.0

    def compute(self, a: int, b: int) -> float:
        return self.prefix[b] - self.prefix[a]

    def stage(self, j: int, a: int, b: int) -> float:
        """Time of stage ``j`` (0-based) running units[a:b] plus its outgoing transfer."""
        return self.compute(a, b) + self.transfer[j][b]

    def validate_cuts(self, cuts: Sequence[int]) -> list[int]:
        cuts = [int(c) for c in cuts]
        ok = len(cuts) == self.s + 1 and cuts[0] == 0 and cuts[-1] == self.n
        if not ok or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ConfigError(
                f"cuts {cuts} are not a partition of {self.n} units into {self.s} stages: need "
                f"{self.s + 1} strictly increasing indices from 0 to {self.n}"
            )
        return cuts

    def solve(self) -> list[int]:
        n, s, inf = self.n, self.s, math.inf
        # Pass 1: best[j][i] = least bottleneck of units[:i] in j stages.
        best = [[inf] * (n + 1) for _ in range(s + 1)]
        best[0][0] = 0.0
        for j in range(1, s + 1):
            for i in range(j, n - (s - j) + 1):
                best[j][i] = min(max(best[j - 1][a], self.stage(j - 1, a, i))
                                 for a in range(j - 1, i))
        limit = best[s][n]
        # Pass 2: least total transfer over partitions whose stages all fit in `limit`.
        cost = [[inf] * (n + 1) for _ in range(s + 1)]
        arg = [[-1] * (n + 1) for _ in range(s + 1)]
        cost[0][0] = 0.0
        for j in range(1, s + 1):
            for i in range(j, n - (s - j) + 1):
                for a in range(j - 1, i):  # ascending + strict '<': ties keep the earliest a
                    if cost[j - 1][a] < inf and self.stage(j - 1, a, i) <= limit:
                        c = cost[j - 1][a] + self.transfer[j - 1][i]
                        if c < cost[j][i]:
                            cost[j][i], arg[j][i] = c, a
        cuts = [n]
        for j in range(s, 0, -1):
            cuts.append(arg[j][cuts[-1]])
        cuts.reverse()
        assert cuts[0] == 0, cuts  # pass 1's optimum is always feasible in pass 2
        return cuts

    def plan(self, cuts: Sequence[int]) -> PartitionPlan:
        cuts = self.validate_cuts(cuts)
        compute = tuple(self.compute(a, b) for a, b in zip(cuts, cuts[1:]))
        transfer = tuple(self.transfer[j][b] for j, b in enumerate(cuts[1:]))
        stage = tuple(self.stage(j, a, b) for j, (a, b) in enumerate(zip(cuts, cuts[1:])))
        bottleneck = max(stage)
        serial = self.prefix[-1]
        speedup = serial / bottleneck if bottleneck > 0 else math.inf
        return PartitionPlan(tuple(cuts), compute, transfer, stage, bottleneck, serial, speedup)


def partition(
    unit_costs_ms: Sequence[float],
    boundary_bytes: Sequence[int],
    num_stages: int,
    bytes_per_ms: float | Sequence[float],
    *,
    count_final_transfer: bool = True,
) -> list[int]:
    """Optimal stage cuts for a chain of units (see the module docstring for the model).

    Args:
        unit_costs_ms: compute time of each unit, ms (finite, >= 0).
        boundary_bytes: bytes of the state leaving each unit (integers >= 0), same length.
        num_stages: number of stages (devices), 1 <= num_stages <= len(unit_costs_ms).
        bytes_per_ms: link bandwidth in bytes per ms (> 0; ``math.inf`` for a free link), one
            number or one per stage (see the module docstring). 1 GB/s is 1e6 bytes/ms.
        count_final_transfer: count the last stage's shipping of the prediction.

    Returns:
        ``cuts``: num_stages + 1 indices; stage j runs ``units[cuts[j]:cuts[j+1]]``.

    Raises:
        ConfigError: empty or mismatched inputs, a negative/non-finite cost, a negative size,
            non-positive bandwidth, or num_stages < 1 or > number of units.
    """
    return _Chain(unit_costs_ms, boundary_bytes, num_stages, bytes_per_ms, count_final_transfer).solve()


def stage_times_ms(
    unit_costs_ms: Sequence[float],
    boundary_bytes: Sequence[int],
    cuts: Sequence[int],
    bytes_per_ms: float | Sequence[float],
    *,
    count_final_transfer: bool = True,
) -> list[float]:
    """Modelled time (compute + outgoing transfer, ms) of each stage of the given ``cuts``."""
    chain = _Chain(unit_costs_ms, boundary_bytes, len(cuts) - 1, bytes_per_ms, count_final_transfer)
    return list(chain.plan(cuts).stage_ms)


def plan_partition(
    unit_costs_ms: Sequence[float],
    boundary_bytes: Sequence[int],
    num_stages: int,
    bytes_per_ms: float | Sequence[float],
    *,
    count_final_transfer: bool = True,
    cuts: Sequence[int] | None = None,
) -> PartitionPlan:
    """:func:`partition` plus per-stage timings and the ideal speed-up; with ``cuts`` given,
    evaluates those cuts instead of searching (same arguments and errors as :func:`partition`)."""
    chain = _Chain(unit_costs_ms, boundary_bytes, num_stages, bytes_per_ms, count_final_transfer)
    return chain.plan(chain.solve() if cuts is None else cuts)
