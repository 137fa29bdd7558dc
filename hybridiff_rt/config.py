"""HybridConfig: every knob of the hybrid runtime, validated at construction, plus paper presets.

The presets are the paper's defaults for 50 sampling steps (docs/method.md). For another step
count T, :meth:`HybridConfig.preset` rescales them with one documented rule (see
:func:`scale_to_steps`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from .errors import ConfigError

PIPELINE_GUIDANCE_POLICIES = ("off", "reuse")
TRANSPORTS = ("auto", "ipc", "torch")
CUDA_GRAPH_MODES = ("auto", "on", "off")
#: torch.compile modes of HybridConfig.compile ("off": eager). "reduce-overhead" and
#: "max-autotune" replay CUDA graphs on CUDA devices (torch's own CUDA-graph trees).
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
SCALE_OUT_LAYOUTS = ("auto", "pairs", "layers")

#: Paper defaults for 2 devices and 50 steps. SD3's slope_eps is the reference scripts' 0.5e-3;
#: the paper's 0.1e-3 stays reachable as preset "sd3-paper" (or ``preset("sd3", slope_eps=1e-4)``).
PRESETS: dict[str, dict[str, Any]] = {
    "sdxl": dict(window=12, slope_eps=0.4e-3, k=5, tau_cap=15, guidance_scale=5.0),
    "sd3": dict(window=15, slope_eps=0.5e-3, k=5, tau_cap=40, guidance_scale=7.0),
    "sd3-paper": dict(window=15, slope_eps=0.1e-3, k=5, tau_cap=40, guidance_scale=7.0),
}
PRESET_STEPS = 50


@dataclasses.dataclass(frozen=True)
class HybridConfig:
    """Configuration of the hybrid data/pipeline-parallel runtime.

    Attributes:
        window: L, the number of steps the discrepancy slope is measured over (>= 1).
        slope_eps: switch to pipelining at the first step whose slope G_i satisfies
            ``0 <= G_i < slope_eps`` (dimensionless, per step).
        k: number of stale-activation pipelined steps; 0 means condition-based partitioning
            throughout.
        tau_cap: latest switch point: if no slope fired by the end of step ``tau_cap - 1``,
            tau1 = tau_cap.
        pipeline_guidance: what the guided prediction is during pipelined steps: "off" (the
            pipelined cond prediction alone, the paper's behaviour) or "reuse" (cond prediction plus
            (w-1) times the last measured cond-uncond difference).
        transport: "auto" (CUDA IPC between ranks that share a node, with CUDA; torch.distributed
            between nodes and on CPU), "ipc" (IPC required on every same-node link) or "torch".
        cuda_graphs: CUDA-graph replay of the denoiser (CBP and serial steps) and of each stage
            (pipelined steps) on CUDA devices: "auto" (as the compile mode implies: torch's
            CUDA-graph trees for compile="reduce-overhead" / "max-autotune", none otherwise),
            "on" (explicit ``torch.cuda.CUDAGraph`` capture per input layout, on top of
            compile="off" / "default" / "max-autotune"), or "off" (never). Where capture is
            impossible (a CPU device, a capture that raises, changing shapes) the call runs
            without replay and the RunReport notes why.
        compile: run the denoiser and the stages through ``torch.compile``: "off" (eager),
            "default", "reduce-overhead" or "max-autotune" (torch.compile's ``mode``). A call
            that cannot be compiled runs eagerly, noted in the RunReport.
        compile_backend: torch.compile backend ("inductor"; "aot_eager" traces without code
            generation, for debugging); ignored when compile="off".
        timeout_s: seconds a rank waits for a peer during a step before raising PeerTimeoutError.
        handshake_timeout_s: seconds start-up (joining the job, the first-call agreement check,
            creating the transport) waits for slow peers (model loading can skew ranks by tens
            of seconds).
        guidance_scale: the preset's recommended w (informational; the call's own value is used).
        stage_cuts: pin the stage partition instead of choosing it from measured unit costs:
            unit indices ``(0, c1, ..., n_units)``, stage j runs units[cuts[j]:cuts[j+1]]. Measured
            cuts can differ between processes when two cuts cost nearly the same, so pin them
            (e.g. the ``extra["pipeline"]["plan"]["cuts"]`` of an earlier RunReport) when runs
            must be reproducible bit for bit across launches.
        rebalance: re-plan the stage cut from the stage times earlier pipelined phases of this
            denoiser measured (engine/rebalance.py), for stages that run faster or slower than
            their eager unit costs say (compiled or graph-replayed stages, a shared device). A
            new cut replaces the one in use only when it is worth at least 5% less (measured,
            or modelled from the corrected costs); the output then depends on measured
            timings, so it is off by default. Ignored when ``stage_cuts`` is pinned.
        scale_out: layout on more than two ranks (world size 2N, N > 1; docs/scale-out.md):
            "pairs" deals the images to the N rank pairs, "layers" runs one batch over 2N
            pipelined stages, "auto" takes pairs when there are at least N images per branch.
            Ignored on one or two ranks.
    """

    window: int = 12
    slope_eps: float = 0.4e-3
    k: int = 5
    tau_cap: int = 15
    pipeline_guidance: str = "off"
    transport: str = "auto"
    cuda_graphs: str = "auto"
    compile: str = "off"
    compile_backend: str = "inductor"
    timeout_s: float = 30.0
    handshake_timeout_s: float = 300.0
    guidance_scale: float | None = None
    stage_cuts: tuple[int, ...] | None = None
    rebalance: bool = False
    scale_out: str = "auto"

    def __post_init__(self) -> None:
        _check_int("window", self.window, minimum=1)
        _check_int("k", self.k, minimum=0)
        _check_int("tau_cap", self.tau_cap, minimum=1)
        _check_number("slope_eps", self.slope_eps, minimum=0.0, strict=False,
                       meaning="a finite number >= 0")
        _check_choice("pipeline_guidance", self.pipeline_guidance, PIPELINE_GUIDANCE_POLICIES)
        _check_choice("transport", self.transport, TRANSPORTS)
        _check_choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPH_MODES)
        _check_choice("compile", self.compile, COMPILE_MODES)
        if not isinstance(self.compile_backend, str) or not self.compile_backend.strip():
            raise ConfigError(f"compile_backend must be a torch.compile backend name such as "
                              f"'inductor' or 'aot_eager', got {self.compile_backend!r}")
        if self.compile == "reduce-overhead" and self.cuda_graphs != "auto":
            raise ConfigError(
                f"compile='reduce-overhead' replays torch's own CUDA graphs, which "
                f"cuda_graphs={self.cuda_graphs!r} contradicts: use cuda_graphs='auto' with it, "
                "or compile='default' with cuda_graphs='on' (explicit capture) or 'off'")
        _check_choice("scale_out", self.scale_out, SCALE_OUT_LAYOUTS)
        if not isinstance(self.rebalance, bool):
            raise ConfigError(f"rebalance must be True or False, got {self.rebalance!r}")
        if self.stage_cuts is not None:
            cuts = tuple(self.stage_cuts) if isinstance(self.stage_cuts, (list, tuple)) else None
            if (cuts is None or len(cuts) < 2 or any(isinstance(c, bool) or not isinstance(c, int)
                                                     for c in cuts)
                    or cuts[0] != 0 or any(b <= a for a, b in zip(cuts, cuts[1:]))):
                raise ConfigError(f"stage_cuts must be increasing unit indices starting at 0, "
                                  f"e.g. (0, 8, 16); got {self.stage_cuts!r}")
            object.__setattr__(self, "stage_cuts", cuts)
        for name in ("timeout_s", "handshake_timeout_s"):
            _check_number(name, getattr(self, name), minimum=0.0, strict=True,
                          meaning="a finite, positive number of seconds")
        if self.guidance_scale is not None:
            _check_number("guidance_scale", self.guidance_scale, minimum=0.0, strict=False,
                          meaning="None or a finite number >= 0")

    @classmethod
    def preset(cls, name: str, num_steps: int = PRESET_STEPS, **overrides: Any) -> "HybridConfig":
        """The paper's defaults for model family ``name`` ("sdxl", "sd3", "sd3-paper").

        Args:
            name: preset name.
            num_steps: sampling steps the config will be used with; values other than 50 are
                rescaled by :func:`scale_to_steps`.
            overrides: any HybridConfig field, applied after scaling.
        """
        key = name.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = scale_to_steps(PRESETS[key], num_steps)
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes: Any) -> "HybridConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short stable hash of every field, used to check that all ranks share one config."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def scale_to_steps(fields: dict[str, Any], num_steps: int) -> dict[str, Any]:
    """Rescale 50-step preset fields to ``num_steps`` steps.

    Rule: with r = num_steps / 50, window, tau_cap and k scale by r (rounded, window and tau_cap
    at least 1, k at least 1 when it was positive), and slope_eps scales by 1/r because the
    discrepancy changes r times faster per step when there are fewer steps. If the result would
    leave no CBP step at the end (tau_cap + k > num_steps - 2), tau_cap is lowered to fit; if even
    tau_cap = 1 does not fit, k is lowered. Fewer than 4 steps cannot hold a schedule with k > 0,
    so k becomes 0 (condition-based partitioning throughout).
    """
    _check_int("num_steps", num_steps, minimum=1)
    out = dict(fields)
    if num_steps == PRESET_STEPS:
        return out
    ratio = num_steps / PRESET_STEPS
    out["window"] = max(1, round(fields["window"] * ratio))
    out["tau_cap"] = max(1, round(fields["tau_cap"] * ratio))
    out["k"] = max(1, round(fields["k"] * ratio)) if fields["k"] > 0 else 0
    out["slope_eps"] = fields["slope_eps"] / ratio
    out["tau_cap"], out["k"] = _fitted_cap_and_k(out["tau_cap"], out["k"], num_steps)
    return out


def _fitted_cap_and_k(tau_cap: int, k: int, num_steps: int) -> tuple[int, int]:
    """(tau_cap, k) lowered until tau_cap + k <= num_steps - 2 (a CBP step is left after the
    pipelined ones): tau_cap first (not below 1), then k (not below 0)."""
    limit = num_steps - 2
    if tau_cap + k > limit:
        tau_cap = max(1, limit - k)
        k = max(0, min(k, limit - tau_cap))
    return tau_cap, k


def fit_to_steps(cfg: HybridConfig, num_steps: int) -> tuple[HybridConfig, str | None]:
    """``cfg`` with its pipelined phase fitted into a run of ``num_steps`` denoiser steps, and a
    note for the run report saying what changed (None when nothing did).

    A run must end with at least one CBP step after its pipelined ones: tau_cap + k <= num_steps
    - 2. A run too short for ``cfg`` (img2img at a low strength, a few-step sampler, a 2-step
    test) gets tau_cap lowered to fit, then k; below 4 steps k becomes 0 (condition-based
    partitioning throughout). Only the switch point's cap and the pipelined length change; the
    other fields stay as given (:meth:`HybridConfig.preset` with ``num_steps`` rescales them all).
    """
    _check_int("num_steps", num_steps, minimum=1)
    if cfg.k == 0:
        return cfg, None
    tau_cap, k = _fitted_cap_and_k(cfg.tau_cap, cfg.k, num_steps)
    if (tau_cap, k) == (cfg.tau_cap, cfg.k):
        return cfg, None
    rule = ("a pipelined phase needs at least 4 steps" if num_steps < 4 else
            f"a CBP step must follow the pipelined ones: tau_cap + k <= {num_steps - 2}")
    why = (f"this run has {num_steps} denoiser steps, too few for tau_cap={cfg.tau_cap} and "
           f"k={cfg.k} ({rule})")
    if k == 0:
        done = "no pipelined steps (k=0), condition-based partitioning only"
    else:
        done = f"fitted to tau_cap={tau_cap}, k={k}"
    return (cfg.replace(tau_cap=tau_cap, k=k),
            f"{why}: {done}; HybridConfig.preset(name, num_steps={num_steps}) tunes every field "
            f"to {num_steps} steps")


def require_config(cfg: Any) -> HybridConfig:
    """``cfg`` itself when it is a HybridConfig, HybridConfig() for None, else a ConfigError that
    says how to build one (a preset name is the usual mistake)."""
    if cfg is None:
        return HybridConfig()
    if isinstance(cfg, HybridConfig):
        return cfg
    hint = (f"hr.HybridConfig.preset({cfg!r}, num_steps=...)" if isinstance(cfg, str)
            else "hr.HybridConfig(...) or hr.HybridConfig.preset(name, num_steps=...)")
    raise ConfigError(f"the config must be a hybridiff_rt.HybridConfig, got "
                      f"{type(cfg).__name__} {cfg!r:.60}; build one with {hint}")


def _check_number(name: str, value: Any, minimum: float, strict: bool, meaning: str) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > minimum if strict else value >= minimum))
    if not ok:
        raise ConfigError(f"{name} must be {meaning}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")
