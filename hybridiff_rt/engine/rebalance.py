"""Stage cuts re-planned from the stage times that pipelined phases measured.

The partitioner cuts the units by the costs the profiler measures running each unit eagerly
(``stages/costs.py``). The stages that then run can be faster or slower than those costs say, and
not by one factor for all: compiled or CUDA-graph-replayed stages shed launch overhead, which
weighs most on units of many small kernels; an MPS share or another job can slow one device. With
``HybridConfig(rebalance=True)``:

1. each rank measures its own stage in every pipelined phase: the median compute time (ms) of the
   phase's steps after the fill step (the fill step also compiles or captures the stage);
2. the ranks of the stage chain exchange those medians through the store when the next phase is
   set up (in this run or a later one);
3. that phase is planned from corrected unit costs, per (unit profile, number of stages)::

       corrected cost of unit u = eager cost of u x F_u
       F_u = measured_j / eager_j      for every unit u of stage j of the measured phase

   where ``eager_j`` is what stage j costs by the eager profile: its units plus ``prepare`` (and
   ``finish`` on the last stage), the work the measured compute section holds. When the real
   costs differ from the eager ones by one factor per measured stage, the corrected costs are
   the real ones, and the plan is the plan the real costs give.
4. A cut is worth its measured bottleneck when a phase ran it (measured stage time plus modelled
   transfer, the largest over the stages), else its modelled bottleneck under the corrected
   costs (each stage's ``prepare`` / ``finish`` scaled by the mean factor of its units, as a
   measurement would hold them). The cut in use is replaced only by one worth at least
   ``min_gain`` (5 %) less: the best cut under the corrected costs, or the best cut measured so
   far. Noise therefore does not flip the cut back and forth (every new cut compiles or
   captures its stages anew, and changes which activations are stale, hence the output), and a
   cut that measured worse than it modelled is not tried again: on a device whose speed does not
   change, the search settles after finitely many phases within ``min_gain`` of the best cut it
   measured.
5. When a cut runs again and its bottleneck differs from its last measurement by more than
   ``min_gain``, the device's speed has changed (another job, an MPS neighbour, compiled code
   replacing eager code): the measurements of the other cuts are forgotten, as they no longer
   hold.

The output of a pipelined run depends on its cut, so with ``rebalance`` the output of a run can
depend on the timings earlier runs measured; it is off by default. ``stage_cuts`` (a pinned cut)
is never re-planned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from ..comm import wait_for_keys
from ..stages import UnitProfile
from ..stages.partition import PartitionPlan

#: a cut replaces the one in use only when worth this fraction less (module docstring, point 4)
MIN_GAIN = 0.05
#: measured / eager ratios are clipped to [1 / RATIO_LIMIT, RATIO_LIMIT]
RATIO_LIMIT = 1e3


@dataclasses.dataclass(frozen=True)
class PhaseStages:
    """One rank's part of a pipelined phase: what its measurement is compared with.

    Attributes:
        key: (unit profile key, number of stages): which corrections the measurement updates.
        cuts: the phase's stage cuts (unit indices, ``stages + 1`` of them).
        stage: this rank's stage index (0-based, chain order).
        eager_ms: per stage, what it costs by the eager profile (units + prepare, + finish on the
            last stage), ms.
        first_step: the phase's first (fill) step index.
        exchange: the store key prefix under which the chain's ranks publish their medians
            (one key per stage index), unique to the chain and the phase.
    """

    key: tuple[str, int]
    cuts: tuple[int, ...]
    stage: int
    eager_ms: tuple[float, ...]
    first_step: int
    exchange: str


def stage_overhead_ms(profile: UnitProfile, stage: int, stages: int) -> float:
    """What stage ``stage`` of ``stages`` runs besides its units (ms, eager): ``prepare`` on
    every stage, plus ``finish`` on the last."""
    return profile.prepare_ms + (profile.finish_ms if stage == stages - 1 else 0.0)


def eager_stage_ms(profile: UnitProfile, cuts: Sequence[int]) -> tuple[float, ...]:
    """Per stage of ``cuts``: its units' eager costs plus its overhead (ms)."""
    stages = len(cuts) - 1
    return tuple(sum(profile.unit_ms[a:b]) + stage_overhead_ms(profile, j, stages)
                 for j, (a, b) in enumerate(zip(cuts, cuts[1:])))


def phase_median_ms(compute_ms: Sequence[float], first_step: int, last_step: int) -> float | None:
    """Median compute ms of steps ``first_step + 1 .. last_step`` (the fill step left out);
    None when no such step has a finite, positive time."""
    values = [compute_ms[s] for s in range(first_step + 1, last_step + 1)
              if s < len(compute_ms) and math.isfinite(compute_ms[s]) and compute_ms[s] > 0]
    return statistics.median(values) if values else None


class StageCalibration:
    """Per-unit corrections of the eager unit costs, learned from measured stage times and kept
    for the lifetime of one denoiser (across runs); see the module docstring.

    Args:
        min_gain: fraction by which a cut must be worth less than the cut in use to replace it.
    """

    def __init__(self, min_gain: float = MIN_GAIN) -> None:
        self.min_gain = float(min_gain)
        self._factors: dict[tuple[str, int], list[float]] = {}
        self._cuts: dict[tuple[str, int], tuple[int, ...]] = {}
        #: per key: cuts -> the measured stage times (ms) of the last phase that ran them
        self._history: dict[tuple[str, int], dict[tuple[int, ...], tuple[float, ...]]] = {}
        self._measured: dict[tuple[str, int], dict[str, Any]] = {}

    def factors(self, key: tuple[str, int]) -> tuple[float, ...] | None:
        """The per-unit factors F_u learned for ``key`` (None before any measurement)."""
        found = self._factors.get(key)
        return tuple(found) if found is not None else None

    def learn(self, phase: PhaseStages, measured_ms: Sequence[float | None]) -> bool:
        """Update the factors of ``phase.key`` from every stage's measured median (ms, chain
        order). Returns False (and learns nothing) unless every stage has a finite, positive
        figure and a positive eager cost."""
        stages = len(phase.cuts) - 1
        if len(measured_ms) != stages or len(phase.eager_ms) != stages:
            return False
        for m, e in zip(measured_ms, phase.eager_ms):
            if m is None or not math.isfinite(m) or m <= 0 or not math.isfinite(e) or e <= 0:
                return False
        factors = self._factors.setdefault(phase.key, [1.0] * phase.cuts[-1])
        for j, (a, b) in enumerate(zip(phase.cuts, phase.cuts[1:])):
            ratio = min(max(measured_ms[j] / phase.eager_ms[j], 1.0 / RATIO_LIMIT), RATIO_LIMIT)
            factors[a:b] = [ratio] * (b - a)
        measured = tuple(float(m) for m in measured_ms)
        history = self._history.setdefault(phase.key, {})
        before = history.get(tuple(phase.cuts))
        if before is not None and not (max(before) / (1.0 + self.min_gain) <= max(measured)
                                       <= max(before) * (1.0 + self.min_gain)):
            history.clear()  # the same cut runs at another speed now: older measurements are stale
        history[tuple(phase.cuts)] = measured
        self._measured[phase.key] = {"cuts": list(phase.cuts),
                                     "measured_stage_ms": list(measured),
                                     "eager_stage_ms": list(phase.eager_ms)}
        return True

    def corrected(self, profile: UnitProfile, stages: int) -> UnitProfile:
        """``profile`` with every unit cost times its factor (``profile`` itself when nothing was
        learned for it)."""
        factors = self._factors.get((profile.key, stages))
        if factors is None or len(factors) != len(profile.unit_ms):
            return profile
        return dataclasses.replace(profile, unit_ms=tuple(
            c * f for c, f in zip(profile.unit_ms, factors)))

    def plan(self, profile: UnitProfile, stages: int, bytes_per_ms: float | Sequence[float],
             pinned: Sequence[int] | None = None,
             ) -> tuple[PartitionPlan, UnitProfile, dict[str, Any] | None]:
        """Plan ``stages`` stages: ``(plan, costs it was planned from, what re-planning did)``.

        The third item is None when nothing was measured for this profile yet (or the cut is
        pinned); else a dict with the last measurement, the factors, the cut in use before, the
        best cut under the corrected costs and what each candidate is worth (ms, see the module
        docstring), and ``changed`` (whether the returned cut differs from the one in use)."""
        key = (profile.key, stages)
        costs = self.corrected(profile, stages)
        if pinned is not None or costs is profile:
            plan = profile.plan(stages, bytes_per_ms, cuts=pinned)
            self._cuts[key] = plan.cuts
            return plan, profile, None
        history = self._history.get(key, {})
        factors = self._factors[key]
        worths: dict[tuple[int, ...], float] = {}

        def worth(cuts: tuple[int, ...]) -> float:
            if cuts not in worths:
                modelled = costs.plan(stages, bytes_per_ms, cuts=cuts)
                if cuts in history:
                    worths[cuts] = max(m + t for m, t in zip(history[cuts], modelled.transfer_ms))
                else:
                    # what a measurement would hold: the corrected units plus the stage's
                    # overhead scaled by the mean factor of its units
                    worths[cuts] = max(
                        t + stage_overhead_ms(profile, j, stages) * statistics.fmean(factors[a:b])
                        for j, (t, a, b) in enumerate(zip(modelled.stage_ms, cuts, cuts[1:])))
            return worths[cuts]

        best = costs.plan(stages, bytes_per_ms)
        previous = self._cuts.get(key)
        candidates = [best.cuts]
        if history:
            candidates.append(min(history, key=worth))
        chosen = previous if previous is not None else best.cuts
        for cuts in candidates:
            if cuts != chosen and worth(cuts) * (1.0 + self.min_gain) < worth(chosen):
                chosen = cuts
        plan = costs.plan(stages, bytes_per_ms, cuts=chosen)
        self._cuts[key] = plan.cuts
        info = {
            **self._measured.get(key, {}),
            "factors": list(factors),
            "eager_unit_ms": list(profile.unit_ms),
            "previous_cuts": list(previous) if previous is not None else None,
            "best_cuts": list(best.cuts),
            "best_bottleneck_ms": best.bottleneck_ms,
            "worth_ms": {",".join(map(str, c)): worth(c)
                         for c in dict.fromkeys([*candidates, chosen]
                                                + ([previous] if previous else []))},
            "min_gain": self.min_gain,
            "changed": previous is not None and plan.cuts != previous,
        }
        return plan, costs, info


def describe(info: dict[str, Any], cuts: Sequence[int]) -> str:
    """One report note for what :meth:`StageCalibration.plan` did."""
    measured = " / ".join(f"{m:.3g}" for m in info.get("measured_stage_ms", []))
    eager = " / ".join(f"{m:.3g}" for m in info.get("eager_stage_ms", []))
    seen = (f"stages of cut {tuple(info.get('cuts', ()))} measured {measured} ms "
            f"against {eager} ms by the eager unit costs")
    if info["changed"]:
        return (f"stage cut re-planned from measured stage times: {tuple(info['previous_cuts'])}"
                f" -> {tuple(cuts)} ({seen})")
    if info["previous_cuts"] is not None and tuple(info["best_cuts"]) != tuple(cuts):
        return (f"stage cut {tuple(cuts)} kept: no other cut is worth {info['min_gain']:.0%} "
                f"less by the measured stage times (the best under the corrected unit costs: "
                f"{tuple(info['best_cuts'])}; {seen})")
    return f"stage cut {tuple(cuts)} confirmed by measured stage times ({seen})"


def publish_median(store: Any, phase: PhaseStages, median_ms: float | None) -> None:
    """Publish this rank's median of ``phase`` for its chain (None: nothing measured)."""
    store.set(f"{phase.exchange}/{phase.stage}", json.dumps(median_ms))


def gather_medians(store: Any, phase: PhaseStages, timeout_s: float,
                   what: str) -> list[float | None]:
    """Every stage's median of ``phase``, in stage order (waits at most ``timeout_s``;
    PeerTimeoutError naming ``what`` when a rank never published)."""
    keys = [f"{phase.exchange}/{j}" for j in range(len(phase.cuts) - 1)]
    wait_for_keys(store, keys, timeout_s, what)
    return [json.loads(store.get(k)) for k in keys]
