"""hybridiff-rt curve: the measured discrepancy curve of a pipeline and where the rule fires."""

from __future__ import annotations

import json
import random

from hybridiff_rt.cli import main


def test_curve_prints_the_runtime_measured_curve_its_slopes_and_the_switch_point(capsys):
    seeds = random.sample(range(1000), 2)
    steps, window, tau_cap = 6, 2, 4
    assert main(["curve", "--tiny", "pixart-sigma", "--steps", str(steps), "--json",
                 "--window", str(window), "--slope-eps", "0.5", "--tau-cap", str(tau_cap),
                 "--seeds", *map(str, seeds)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pipeline"] == "PixArtSigmaPipeline"
    per_seed, mean = result["per_seed"], result["mean"]
    assert len(per_seed) == 2 and all(len(c) == steps for c in per_seed)
    assert per_seed[0] != per_seed[1]  # different seeds, different trajectories
    assert all(0 < m < float("inf") for c in per_seed for m in c)
    assert mean == [(a + b) / 2 for a, b in zip(*per_seed)]
    for i, g in enumerate(result["slopes"]):
        if i < window:
            assert g is None
        else:
            assert g == (mean[i - window + 1] - mean[i]) / window
    fired = next((i for i in range(window, tau_cap) if 0 <= result["slopes"][i] < 0.5), None)
    assert result["tau1"] == (fired if fired is not None else tau_cap)
