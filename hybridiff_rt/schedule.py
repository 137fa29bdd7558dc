"""The switching rule (docs/method.md) as a pure state machine (no torch, no I/O).

Steps are ``i = 0 .. T-1``. The caller asks :meth:`SwitchSchedule.mode` at the start of step i
and reports the discrepancy with :meth:`SwitchSchedule.observe` at the end of step i (CBP steps;
steps without a measurement are simply not observed). With L = window:

* slope ``G_i = (M_{i-L+1} - M_i) / L`` (older minus newer, Python float arithmetic), defined
  for ``i >= L`` when every M_j of the window ``j = i-L+1 .. i`` was observed and is finite;
  otherwise step i has no slope (a missing, NaN or infinite M never triggers a switch).
* detection path: tau1 = the first step ``i`` with ``L <= i <= tau_cap - 1`` and
  ``0 <= G_i < slope_eps``, decided at the end of step i.
* cap path: if nothing fired by the end of step ``tau_cap - 1``, tau1 = tau_cap (step tau_cap
  still runs CBP).
* tau2 = tau1 + k; steps ``tau1+1 .. tau1+k`` are "pipeline", every other step "cbp". k = 0 means
  "cbp" throughout (tau1 is still recorded).

"The end of step j" is reached by ``observe(j, m)``, by ``observe(i, m)`` for any i > j, by
``mode(i)`` for any i > j, or by :meth:`SwitchSchedule.finish`; so the cap fires even when step
tau_cap - 1 has no measurement.
Observations must come in increasing step order and not for a step whose end has passed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import ConfigError

MODE_CBP = "cbp"
MODE_PIPELINE = "pipeline"

TAU1_DETECTED = "detected"
TAU1_CAP = "cap"


class SwitchSchedule:
    """When to switch from condition-based partitioning to stale-activation pipelining and back.

    Args:
        cfg: a :class:`~hybridiff_rt.config.HybridConfig` (or any object with ``window``,
            ``slope_eps``, ``k``, ``tau_cap``).
        num_steps: T, the number of sampling steps of the run (>= 1).

    Raises:
        ConfigError: at construction, with what to change, when k < 0, window < 1, slope_eps is
            not a finite number >= 0, tau_cap < 1, num_steps < 1, or (k > 0) when tau_cap is
            beyond the run or ``tau_cap + k > num_steps - 2`` (no CBP step would be left after
            the pipelined steps). With k = 0 nothing is pipelined, so tau_cap is not checked
            against num_steps (tau1 stays None if the run ends before the cap).

    Attributes (read-only):
        tau1, tau2: int, or None until known.
        tau1_source: "detected", "cap" or None.
        history: list of T entries, M_i as observed (float, possibly NaN/inf) or None.
        slopes: list of T entries, G_i where it was evaluated, else None.
        nonfinite_steps: steps whose observed M_i was NaN or infinite, ascending.
    """

    def __init__(self, cfg: Any, num_steps: int) -> None:
        self.num_steps = _int_at_least("num_steps", num_steps, 1, "the number of sampling steps")
        self.window = _int_at_least("window", getattr(cfg, "window", None), 1,
                                    "the slope window L; use window >= 1")
        self.k = _int_at_least("k", getattr(cfg, "k", None), 0,
                               "the number of pipelined steps; use k >= 0 (0 disables pipelining)")
        self.tau_cap = _int_at_least("tau_cap", getattr(cfg, "tau_cap", None), 1,
                                     "the latest switch step; use tau_cap >= 1")
        eps = getattr(cfg, "slope_eps", None)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) \
                or eps < 0:
            raise ConfigError(f"slope_eps must be a finite number >= 0, got {eps!r}")
        self.slope_eps = float(eps)
        if self.k > 0:
            last_cbp = self.num_steps - 1
            limit = self.num_steps - 2
            if self.tau_cap > limit - self.k:
                options = []
                if limit - self.k >= 1:
                    options.append(f"lower tau_cap to at most {limit - self.k}")
                if limit - self.tau_cap >= 1:
                    options.append(f"lower k to at most {limit - self.tau_cap}")
                options.append("set k=0 (no pipelining)")
                fix = ", or ".join(options)
                where = (f"tau_cap={self.tau_cap} is beyond the run (last step {last_cbp})"
                         if self.tau_cap > last_cbp else
                         f"tau_cap + k = {self.tau_cap} + {self.k} = {self.tau_cap + self.k} "
                         f"exceeds num_steps - 2 = {limit}")
                raise ConfigError(
                    f"{where}: with num_steps={self.num_steps} the pipelined steps "
                    f"tau1+1..tau1+k could reach the last step, leaving no CBP step after them. "
                    f"Need tau_cap + k <= num_steps - 2: {fix}, or build the config "
                    f"with HybridConfig.preset(name, num_steps={self.num_steps}), which rescales it")
        self.reset()

    # ----------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every observation (a new run with the same config and step count)."""
        self.tau1: int | None = None
        self.tau2: int | None = None
        self.tau1_source: str | None = None
        self.history: list[float | None] = [None] * self.num_steps
        self.slopes: list[float | None] = [None] * self.num_steps
        self.nonfinite_steps: list[int] = []
        self._last_observed = -1
        self._ended = -1  # every step <= _ended has ended

    def observe(self, i: int, m: float) -> None:
        """Record M_i, the discrepancy measured at the end of step ``i``.

        Args:
            i: step index, 0 <= i < num_steps, larger than any step observed before and not a
                step whose end has already passed (``mode(j)`` for j > i ends step i).
            m: M_i (dimensionless, >= 0 normally). NaN or infinite values are recorded in
                ``history`` and ``nonfinite_steps`` and never trigger a switch.
        """
        i = self._check_step(i, "observe")
        if i <= self._last_observed:
            raise ConfigError(f"observe({i}, ...) after observe({self._last_observed}, ...): "
                              f"observations must come in increasing step order, once per step")
        if i <= self._ended:
            raise ConfigError(f"observe({i}, ...) arrived after step {i} ended (mode({self._ended + 1}) "
                              f"was already asked); observe step i before asking mode(i + 1)")
        if isinstance(m, bool) or not isinstance(m, numbers.Real):
            raise ConfigError(f"observe({i}, m): m must be a float, got {type(m).__name__} "
                              f"(pass hybridiff_rt.ops.rel_mae(stats))")
        m = float(m)
        self._end_steps_before(i)  # steps < i have ended (the cap may fire here)
        self._last_observed = i
        self.history[i] = m
        if not math.isfinite(m):
            self.nonfinite_steps.append(i)
        self._end_step(i)

    def mode(self, i: int) -> str:
        """The mode step ``i`` runs in: "cbp" or "pipeline". Asking it ends every step < i."""
        i = self._check_step(i, "mode")
        self._end_steps_before(i)
        if self.k == 0 or self.tau1 is None:
            return MODE_CBP
        return MODE_PIPELINE if self.tau1 < i <= self.tau2 else MODE_CBP

    def end_pipelining(self, i: int) -> None:
        """No pipelined step from step ``i`` on: ``tau2`` becomes ``i - 1`` if it was later (never
        below ``tau1``), for a step of the phase that cannot be pipelined (its sample changed
        shape, so the stale activations no longer fit, or it is unguided). Steps after ``tau2``
        run CBP as usual."""
        i = self._check_step(i, "end_pipelining")
        if self.tau2 is not None and self.tau2 >= i:
            self.tau2 = max(i - 1, self.tau1)

    def finish(self) -> None:
        """End every step of the run (call after the last step). Only matters when the cap step
        ``tau_cap - 1`` is the run's last step and had no observation (possible with k = 0):
        tau1 is then set as the cap rule says. Idempotent; later observe() calls are refused."""
        self._end_steps_before(self.num_steps)

    def slope(self, i: int) -> float | None:
        """G_i from the recorded history, or None when step i has no slope (see module doc)."""
        i = self._check_step(i, "slope")
        L = self.window
        if i < L:
            return None
        values = self.history[i - L + 1:i + 1]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return (values[0] - values[-1]) / L

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (non-finite floats written as the strings "nan"/"inf"/"-inf")."""
        return {
            "num_steps": self.num_steps,
            "window": self.window,
            "slope_eps": self.slope_eps,
            "k": self.k,
            "tau_cap": self.tau_cap,
            "tau1": self.tau1,
            "tau2": self.tau2,
            "tau1_source": self.tau1_source,
            "history": [_json_float(v) for v in self.history],
            "slopes": [_json_float(v) for v in self.slopes],
            "nonfinite_steps": list(self.nonfinite_steps),
        }

    def __repr__(self) -> str:
        return (f"SwitchSchedule(num_steps={self.num_steps}, window={self.window}, "
                f"slope_eps={self.slope_eps}, k={self.k}, tau_cap={self.tau_cap}, "
                f"tau1={self.tau1}, tau2={self.tau2})")

    # ----------------------------------------------------------------------------- internals
    def _check_step(self, i: Any, what: str) -> int:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ConfigError(f"{what}: step must be an int, got {type(i).__name__}")
        i = int(i)
        if not 0 <= i < self.num_steps:
            raise ConfigError(f"{what}: step {i} is outside the run's steps 0..{self.num_steps - 1}")
        return i

    def _end_steps_before(self, i: int) -> None:
        for j in range(self._ended + 1, i):
            self._end_step(j)

    def _end_step(self, j: int) -> None:
        """Apply the end-of-step-j decision (detection, then cap). Called once per step, ascending."""
        self._ended = j
        if self.tau1 is not None or j > self.tau_cap - 1:
            return
        g = self.slope(j)
        self.slopes[j] = g
        if g is not None and 0.0 <= g < self.slope_eps:
            self._set_tau1(j, TAU1_DETECTED)
        elif j == self.tau_cap - 1:
            self._set_tau1(self.tau_cap, TAU1_CAP)

    def _set_tau1(self, tau1: int, source: str) -> None:
        self.tau1 = tau1
        self.tau2 = tau1 + self.k
        self.tau1_source = source


def _int_at_least(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}")
    return int(value)


def _json_float(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
