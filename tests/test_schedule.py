"""Table-driven tests of SwitchSchedule (docs/method.md) over synthetic discrepancy curves.

Values chosen at the slope boundaries are binary fractions so that G_i is computed exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
from types import SimpleNamespace

import pytest

from hybridiff_rt.config import HybridConfig
from hybridiff_rt.errors import ConfigError
from hybridiff_rt.schedule import SwitchSchedule

NAN, INF = math.nan, math.inf
SKIP = None  # no observation for this step


def cfg(window=3, slope_eps=0.01, k=3, tau_cap=10):
    return SimpleNamespace(window=window, slope_eps=slope_eps, k=k, tau_cap=tau_cap)


def simulate(sched: SwitchSchedule, ms):
    """Drive the schedule like the engine: mode(i) at the start of step i, observe(i, M_i) at
    its end for CBP steps that have a measurement. Returns the list of modes."""
    modes = []
    for i in range(sched.num_steps):
        mode = sched.mode(i)
        modes.append(mode)
        m = ms[i] if i < len(ms) else SKIP
        if mode == "cbp" and m is not SKIP:
            sched.observe(i, m)
    sched.finish()
    return modes


def expected_modes(T, tau1, k):
    return ["pipeline" if tau1 is not None and tau1 < i <= tau1 + k else "cbp" for i in range(T)]


def falling(n, start=1.0, step=0.1):
    return [start - step * i for i in range(n)]


E = 2.0 ** -11  # an exactly representable slope_eps
ONE = [1.0 - j * 2.0 ** -10 for j in range(7)]  # falls by 2*E per step: with L=2, G = E exactly

# name, config, T, sequence, tau1, source
CASES = [
    ("detection", cfg(), 20,
     [1.0, 0.8, 0.6, 0.45, 0.40, 0.39, 0.385, 0.38, 0.38, 0.5], 6, "detected"),
    ("cap: steep fall never flattens", cfg(), 20, falling(20), 10, "cap"),
    ("rising curve: negative slopes never fire", cfg(), 20,
     [0.1 * i for i in range(20)], 10, "cap"),
    ("U-shape rising part ignored", cfg(window=2, slope_eps=0.01), 20,
     [1.0, 0.5, 0.3, 0.35, 0.5, 0.8, 1.0, 1.3, 1.5, 2.0], 10, "cap"),
    ("slope exactly 0 fires (constant curve, first possible step i = L)",
     cfg(window=4, slope_eps=E), 20, [0.5] * 20, 4, "detected"),
    ("slope exactly 0 after a fall", cfg(window=2, slope_eps=E, tau_cap=12), 20,
     ONE + [ONE[-1]] + [0.0] * 12, 7, "detected"),
    ("slope exactly slope_eps does not fire, just below does",
     cfg(window=2, slope_eps=E, tau_cap=12), 20,
     ONE + [ONE[-1] - E] + [0.0] * 12, 7, "detected"),
    ("slope exactly slope_eps never fires -> cap", cfg(window=2, slope_eps=E, tau_cap=6), 20,
     ONE + [ONE[-1] - 2 * E], 6, "cap"),
    ("slope slightly negative does not fire", cfg(window=2, slope_eps=E, tau_cap=9), 20,
     ONE + [ONE[-1] + E, ONE[-1] + 2 * E], 9, "cap"),
    ("slope_eps = 0 can never fire", cfg(window=2, slope_eps=0.0, tau_cap=9), 20, [0.5] * 20, 9, "cap"),
    ("window 1: G = (M_i - M_i)/1 = 0 fires at i = 1", cfg(window=1), 20, falling(20), 1, "detected"),
    ("window longer than the run", cfg(window=50, tau_cap=10), 20, [0.5] * 20, 10, "cap"),
    ("window longer than tau_cap", cfg(window=12, tau_cap=10), 20, [0.5] * 20, 10, "cap"),
    ("detection on the last chance, step tau_cap - 1", cfg(window=3, tau_cap=10), 20,
     falling(9) + [falling(9)[7]] + [0.0] * 10, 9, "detected"),  # G_9 = (M_7 - M_9)/3 = 0
    ("flat only from step tau_cap: cap", cfg(window=3, tau_cap=10), 20,
     falling(11) + [falling(11)[-1]] * 9, 10, "cap"),
    ("NaN inside the window blocks the slope until it leaves",
     cfg(window=3), 20, [1.0, 0.8, 0.6, 0.45, 0.40, NAN, 0.40, 0.40, 0.40, 0.40], 8, "detected"),
    ("NaN at the step itself", cfg(window=3), 20, [0.5, 0.5, 0.5, NAN, 0.5, 0.5, 0.5], 6, "detected"),
    ("+inf at the old end of the window", cfg(window=3), 20, [1.0, INF, 0.5, 0.5, 0.5], 4, "detected"),
    ("-inf at the new end", cfg(window=3), 20, [0.5, 0.5, 0.5, -INF, 0.5, 0.5, 0.5], 6, "detected"),
    ("all NaN -> cap", cfg(), 20, [NAN] * 20, 10, "cap"),
    ("missing observation inside the window", cfg(window=3), 20,
     [0.5, 0.5, 0.5, SKIP, 0.5, 0.5, 0.5], 6, "detected"),
    ("no observations at all -> cap", cfg(), 20, [], 10, "cap"),
    ("step tau_cap - 1 unobserved: cap still fires", cfg(window=3, tau_cap=10), 20,
     falling(9) + [SKIP], 10, "cap"),
    ("k = 0: cbp throughout, tau1 still recorded", cfg(k=0), 20,
     [1.0, 0.8, 0.6, 0.45, 0.40, 0.39, 0.385], 6, "detected"),
    ("k = 0 and tau_cap beyond the run: tau1 never known", cfg(k=0, tau_cap=40), 20,
     falling(20), None, None),
    ("largest tau_cap + k = T - 2 leaves one final CBP step", cfg(window=3, k=5, tau_cap=13), 20,
     falling(20), 13, "cap"),
    ("paper SDXL preset, detection on step tau_cap - 1 = 14", HybridConfig.preset("sdxl"), 50,
     [1.0, 0.9, 0.8, 0.7] + [0.7] * 46, 14, "detected"),  # window 3..14 flat first at i = 14
    ("paper SDXL preset, flat from the start: first slope at i = L = 12",
     HybridConfig.preset("sdxl"), 50, [0.3] * 50, 12, "detected"),
    ("paper SD3 preset, cap", HybridConfig.preset("sd3"), 50, falling(50, 5.0, 0.1), 40, "cap"),
]


@pytest.mark.parametrize("name, config, T, ms, tau1, source", CASES, ids=[c[0] for c in CASES])
def test_switch_rule(name, config, T, ms, tau1, source):
    sched = SwitchSchedule(config, T)
    modes = simulate(sched, ms)
    assert sched.tau1 == tau1, name
    assert sched.tau1_source == source, name
    assert sched.tau2 == (None if tau1 is None else tau1 + config.k), name
    assert modes == expected_modes(T, tau1 if config.k else None, config.k), name
    if config.k and tau1 is not None:
        assert modes.count("pipeline") == config.k
        assert modes[-1] == "cbp" and modes[tau1] == "cbp"
    # non-finite values are recorded, and only those
    observed = [i for i, m in enumerate(ms[:T]) if m is not SKIP and modes[i] == "cbp"]
    assert sched.nonfinite_steps == [i for i in observed if not math.isfinite(ms[i])]
    for i in observed:
        assert sched.history[i] is not None
        assert (math.isnan(sched.history[i]) and math.isnan(ms[i])) or sched.history[i] == ms[i]


def test_exact_boundary_slopes_are_computed_exactly():
    sched = SwitchSchedule(cfg(window=2, slope_eps=E, tau_cap=12), 20)
    for i, m in enumerate(ONE):
        sched.observe(i, m)
    assert sched.slopes[2:7] == [E] * 5 and sched.tau1 is None
    assert sched.slopes[:2] == [None, None]  # i < L: no slope


def test_decision_timing_detected_tau1_known_only_at_end_of_step():
    sched = SwitchSchedule(cfg(window=3), 20)
    for i, m in enumerate([1.0, 0.8, 0.6, 0.45, 0.40, 0.39]):
        assert sched.mode(i) == "cbp"
        sched.observe(i, m)
    assert sched.tau1 is None
    assert sched.mode(6) == "cbp"
    sched.observe(6, 0.385)  # G_6 = (0.40 - 0.385)/3 < 0.01
    assert (sched.tau1, sched.tau2) == (6, 9)
    assert [sched.mode(i) for i in range(7, 12)] == ["pipeline"] * 3 + ["cbp"] * 2


def test_cap_decided_at_end_of_step_tau_cap_minus_1():
    sched = SwitchSchedule(cfg(window=3, tau_cap=10), 20)
    for i in range(9):
        sched.mode(i)
        sched.observe(i, 1.0 - 0.1 * i)
    assert sched.tau1 is None and sched.mode(9) == "cbp"
    sched.observe(9, 0.0)
    assert (sched.tau1, sched.tau1_source) == (10, "cap")
    assert sched.mode(10) == "cbp" and sched.mode(11) == "pipeline"


def test_finish_applies_a_pending_cap_on_the_last_step():
    sched = SwitchSchedule(cfg(k=0, tau_cap=5), 5)  # cap step 4 is the last step
    for i in range(4):
        sched.observe(i, 1.0 - 0.1 * i)
    sched.mode(4)  # the last step runs, without a measurement
    assert sched.tau1 is None
    sched.finish()
    assert (sched.tau1, sched.tau1_source) == (5, "cap")
    sched.finish()  # idempotent
    with pytest.raises(ConfigError):
        sched.observe(4, 0.5)


def test_mode_queries_are_stable_and_repeatable():
    sched = SwitchSchedule(cfg(window=3, tau_cap=10), 20)
    first = [sched.mode(i) for i in range(20)]  # no observations: the cap fires on the way
    assert first == [sched.mode(i) for i in range(20)]
    assert sched.tau1 == 10 and first == expected_modes(20, 10, 3)


@pytest.mark.parametrize("at", range(20))
def test_end_pipelining_cuts_the_phase_short_and_nothing_else(at):
    """end_pipelining(i): no pipelined step from i on (tau2 = i - 1 when it was later, never
    before tau1); the steps before i keep their modes, and a call before the phase is set, or
    after it, changes nothing."""
    sched = SwitchSchedule(cfg(window=3, tau_cap=10, k=4), 20)
    before = [sched.mode(i) for i in range(at)]
    sched.end_pipelining(at)
    modes = before + [sched.mode(i) for i in range(at, 20)]
    full = expected_modes(20, 10, 4)
    assert sched.tau1 == 10
    if at <= 10:  # tau1 was not known yet (the cap fires when step 9 ends, at mode(10))
        assert modes == full and sched.tau2 == 14
    else:
        assert sched.tau2 == min(14, at - 1)
        assert modes == ["pipeline" if 10 < i <= min(14, at - 1) else "cbp" for i in range(20)]
    with pytest.raises(ConfigError, match="end_pipelining: step 20 is outside"):
        sched.end_pipelining(20)


# ------------------------------------------------------------------------------ refused configs
REFUSED = [
    ("k < 0", cfg(k=-1), 20, r"k must be an integer >= 0"),
    ("k not an int", cfg(k=2.0), 20, r"k must be an integer"),
    ("window < 1", cfg(window=0), 20, r"window must be an integer >= 1"),
    ("window not an int", cfg(window=1.5), 20, r"window"),
    ("tau_cap < 1", cfg(tau_cap=0), 20, r"tau_cap must be an integer >= 1"),
    ("slope_eps < 0", cfg(slope_eps=-1e-4), 20, r"slope_eps"),
    ("slope_eps NaN", cfg(slope_eps=NAN), 20, r"slope_eps"),
    ("slope_eps inf", cfg(slope_eps=INF), 20, r"slope_eps"),
    ("missing field", SimpleNamespace(window=3, k=1, tau_cap=5), 20, r"slope_eps"),
    ("num_steps 0", cfg(), 0, r"num_steps must be an integer >= 1"),
    ("num_steps negative", cfg(), -5, r"num_steps"),
    ("num_steps float", cfg(), 20.0, r"num_steps"),
    ("num_steps bool", cfg(), True, r"num_steps"),
    ("tau_cap beyond the steps", cfg(tau_cap=25, k=3), 20,
     r"tau_cap=25 is beyond the run .*lower tau_cap to at most 15"),
    ("tau_cap on the last step", cfg(tau_cap=19, k=1), 20, r"lower tau_cap to at most 17"),
    ("tau_cap + k leaves no CBP step", cfg(tau_cap=15, k=5), 20,
     r"tau_cap \+ k = 15 \+ 5 = 20 exceeds num_steps - 2 = 18.*lower tau_cap to at most 13"),
    ("tau_cap + k = T - 1", cfg(tau_cap=14, k=5), 20, r"exceeds num_steps - 2"),
    ("k too large for any tau_cap", cfg(tau_cap=1, k=4), 5, r"lower k to at most 2"),
    ("paper preset at 50 steps used for 20", HybridConfig.preset("sdxl"), 20,
     r"HybridConfig.preset\(name, num_steps=20\)"),
]


@pytest.mark.parametrize("name, config, T, pattern", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_configurations(name, config, T, pattern):
    with pytest.raises(ConfigError, match=pattern):
        SwitchSchedule(config, T)


def test_accepted_boundaries():
    SwitchSchedule(cfg(tau_cap=13, k=5), 20)  # tau_cap + k == T - 2
    SwitchSchedule(cfg(tau_cap=1, k=2), 5)
    SwitchSchedule(cfg(k=0, tau_cap=100), 3)  # k = 0: nothing pipelined, tau_cap unchecked
    SwitchSchedule(cfg(window=100), 20)  # a window longer than the run is allowed (cap path)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "sd3-paper"])
def test_every_scaled_preset_is_accepted(name):
    for T in range(1, 81):
        c = HybridConfig.preset(name, num_steps=T)
        sched = SwitchSchedule(c, T)
        modes = simulate(sched, [NAN] * T)  # never detects: the worst case, the cap path
        assert modes[-1] == "cbp", (name, T)
        assert modes.count("pipeline") == (c.k if sched.tau1 is not None else 0), (name, T)


def test_hybrid_config_refuses_negative_k_itself():
    with pytest.raises(ConfigError, match="k"):
        HybridConfig(k=-1)
    with pytest.raises(ConfigError, match="window"):
        HybridConfig(window=0)


# ------------------------------------------------------------------------------ misuse
def test_observations_must_ascend_once_per_step():
    sched = SwitchSchedule(cfg(), 20)
    sched.observe(5, 0.5)
    with pytest.raises(ConfigError, match="increasing step order"):
        sched.observe(5, 0.5)
    with pytest.raises(ConfigError, match="increasing step order"):
        sched.observe(3, 0.5)


def test_observe_after_step_ended_is_refused():
    sched = SwitchSchedule(cfg(), 20)
    sched.mode(4)
    with pytest.raises(ConfigError, match="observe step i before asking mode"):
        sched.observe(3, 0.5)
    sched.observe(4, 0.5)  # the current step is fine


@pytest.mark.parametrize("call", [
    lambda s: s.mode(20), lambda s: s.mode(-1), lambda s: s.observe(20, 0.1),
    lambda s: s.observe(-1, 0.1), lambda s: s.mode(1.0), lambda s: s.observe(0, "0.1"),
    lambda s: s.observe(0, None), lambda s: s.slope(20),
], ids=["mode T", "mode -1", "observe T", "observe -1", "mode float", "m str", "m None", "slope T"])
def test_bad_arguments(call):
    with pytest.raises(ConfigError):
        call(SwitchSchedule(cfg(), 20))


def test_to_dict_is_strict_json_and_reset_clears():
    sched = SwitchSchedule(cfg(), 20)
    simulate(sched, [1.0, NAN, INF, -INF, 0.5])
    d = sched.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["history"][:5] == [1.0, "nan", "inf", "-inf", 0.5]
    assert d["nonfinite_steps"] == [1, 2, 3] and d["tau1"] == 10 and d["tau1_source"] == "cap"
    sched.reset()
    assert sched.tau1 is None and sched.nonfinite_steps == [] and sched.history == [None] * 20
    assert simulate(sched, [0.5] * 20) == expected_modes(20, 3, 3)


# ------------------------------------------------------------------------------ random curves
def oracle_tau1(ms, T, L, eps, tau_cap):
    """The rule stated declaratively over a full list (None = not observed)."""
    def ok(v):
        return v is not None and math.isfinite(v)
    for i in range(L, min(tau_cap, T)):
        window = ms[i - L + 1:i + 1]
        if all(ok(v) for v in window):
            g = (window[0] - window[-1]) / L
            if 0 <= g < eps:
                return i
    return tau_cap if tau_cap - 1 <= T - 1 else None


def test_random_curves_against_declarative_rule():
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    fired = capped = 0
    for trial in range(300):
        T = rng.randint(4, 60)
        k = rng.randint(0, max(0, T - 3))
        tau_cap = rng.randint(1, max(1, T - 2 - k)) if k else rng.randint(1, T + 5)
        L = rng.randint(1, 15)
        eps = rng.choice([0.0, 1e-4, 4e-4, 1e-3, 1e-2])
        # U-shaped discrepancy with noise, some missing and non-finite values
        bottom = rng.uniform(0.2, 0.8) * T
        ms = []
        for i in range(T):
            v = 0.02 + 1e-3 * (i - bottom) ** 2 / T + rng.gauss(0, 2e-3)
            r = rng.random()
            ms.append(SKIP if r < 0.05 else NAN if r < 0.08 else INF if r < 0.09 else v)
        c = cfg(window=L, slope_eps=eps, k=k, tau_cap=tau_cap)
        sched = SwitchSchedule(c, T)
        modes = simulate(sched, ms)
        want = oracle_tau1(ms, T, L, eps, tau_cap)
        info = f"seed={seed} trial={trial} T={T} L={L} eps={eps} k={k} tau_cap={tau_cap}"
        assert sched.tau1 == want, info
        assert modes == expected_modes(T, want if k else None, k), info
        fired += sched.tau1_source == "detected"
        capped += sched.tau1_source == "cap"
    assert fired > 10 and capped > 10  # both paths were exercised
