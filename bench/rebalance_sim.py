"""How well stage cuts re-planned from measured stage times (``HybridConfig(rebalance=True)``)
balance stages whose real costs differ from the eager profile, in a model run on this CPU.

No model runs here: each trial draws a chain of ``n`` units (6 to 30) with eager costs (0.2 to
5 ms), boundary sizes (0 to 4 MB) and a link (free, or 0.1 to 10 GB/s), and the real cost of each
unit as its eager cost times its own factor drawn from ``[low, high]`` (compiled or
graph-replayed units speed up by different factors). The planner cuts the chain into 2 to 4
stages from the eager costs; then every phase "measures" each stage as the sum of its units' real
costs, ``StageCalibration`` learns from it and plans the next phase, until the cut repeats.

Per factor range, over ``--trials`` trials: how many phases it took to settle, and the real
bottleneck of the eager cut and of the settled cut, each over the real costs' optimal bottleneck
(1.0 = optimal).

    python bench/rebalance_sim.py                 # 400 trials per row, a few seconds
    python bench/rebalance_sim.py --trials 50

Writes rebalance_sim.json and rebalance_sim.md (bench/results/ or --out).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import machine_detail, write_results  # noqa: E402

from hybridiff_rt.engine.rebalance import (  # noqa: E402
    MIN_GAIN,
    PhaseStages,
    StageCalibration,
    eager_stage_ms,
)
from hybridiff_rt.stages import UnitProfile  # noqa: E402
from hybridiff_rt.stages.partition import plan_partition  # noqa: E402

#: (low, high) of the per-unit factor real / eager cost
FACTOR_RANGES = [(1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (0.2, 3.0)]
MAX_PHASES = 500


def trial(rng: random.Random, low: float, high: float) -> dict:
    """One chain: phases until the cut repeats; real bottlenecks over the real optimum."""
    n = rng.randint(6, 30)
    stages = rng.randint(2, 4)
    eager = [rng.uniform(0.2, 5.0) for _ in range(n)]
    real = [c * rng.uniform(low, high) for c in eager]
    sizes = [rng.randint(0, 4_000_000) for _ in range(n)]
    link = rng.choice([math.inf, rng.uniform(1e5, 1e7)])
    profile = UnitProfile(tuple(f"u{i}" for i in range(n)), tuple(eager), tuple(sizes), (),
                          key="sim")
    calibration = StageCalibration()
    tried: list[tuple[int, ...]] = []
    for _ in range(MAX_PHASES):
        plan, _, _ = calibration.plan(profile, stages, link)
        if tried and tried[-1] == plan.cuts:
            break
        tried.append(plan.cuts)
        measured = [sum(real[a:b]) for a, b in zip(plan.cuts, plan.cuts[1:])]
        calibration.learn(PhaseStages(key=("sim", stages), cuts=plan.cuts, stage=0,
                                      eager_ms=eager_stage_ms(profile, plan.cuts),
                                      first_step=0, exchange="sim"), measured)
    optimal = plan_partition(real, sizes, stages, link).bottleneck_ms

    def real_ms(cuts):
        return plan_partition(real, sizes, stages, link, cuts=cuts).bottleneck_ms

    return {"phases": len(tried), "eager": real_ms(tried[0]) / optimal,
            "settled": real_ms(tried[-1]) / optimal, "cuts_tried": len(set(tried))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=400, help="trials per factor range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the JSON and markdown")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    rng = random.Random(args.seed)
    rows = []
    for low, high in FACTOR_RANGES:
        results = [trial(rng, low, high) for _ in range(args.trials)]

        def col(name):
            return [r[name] for r in results]

        rows.append({
            "factors": f"{low:g} .. {high:g}", "trials": args.trials,
            "phases_median": statistics.median(col("phases")), "phases_max": max(col("phases")),
            "eager_median": statistics.median(col("eager")), "eager_max": max(col("eager")),
            "settled_median": statistics.median(col("settled")),
            "settled_max": max(col("settled")),
            "eager_within_5pct": sum(v <= 1.05 for v in col("eager")) / args.trials,
            "settled_within_5pct": sum(v <= 1.05 for v in col("settled")) / args.trials,
        })
    columns = [("factors", "real / eager cost per unit"), ("trials", "trials"),
               ("phases_median", "cuts run before one repeats (median)"), ("phases_max", "(max)"),
               ("eager_median", "eager cut / optimal (median)"), ("eager_max", "(max)"),
               ("settled_median", "settled cut / optimal (median)"), ("settled_max", "(max)"),
               ("eager_within_5pct", "eager cut within 5%"),
               ("settled_within_5pct", "settled cut within 5%")]
    notes = [f"min_gain {MIN_GAIN:.0%}; a phase is one pipelined phase (one run of the "
             "schedule); the settled cut is the one the last phase repeated",
             "modelled stage times (sums of drawn unit costs), no model runs: this measures the "
             "re-planning rule, not a GPU", f"machine: {machine_detail()}"]
    write_results("rebalance_sim", rows, columns,
                  {"trials": args.trials, "seed": args.seed, "min_gain": MIN_GAIN,
                   "factor_ranges": FACTOR_RANGES}, args.out, notes)


if __name__ == "__main__":
    main()
