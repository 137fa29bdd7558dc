"""``hybridiff-rt curve``: print a pipeline's measured discrepancy curve and where the switching
rule would fire on it, so that users can choose ``window`` / ``slope_eps`` / ``tau_cap``.

The curve is what the runtime itself records: the pipeline is wrapped with ``hr.parallelize`` in
one process (a world of one runs both branches serially and records ``M_i`` per step in the
RunReport, for batched and two-call pipelines alike), called once per seed, and the per-step
``report.rel_mae`` values are averaged over the seeds. The switch points come from
``SwitchSchedule`` run on the mean curve with the chosen configuration.

    hybridiff-rt curve --tiny wan2.1 --steps 30 --guidance 5 --seeds 0 1 2
    hybridiff-rt curve --pipeline ./my-pixart --prompt "a red fox" --steps 20 --preset sdxl
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
from typing import Any

import torch

from ..config import PRESETS, HybridConfig
from ..schedule import SwitchSchedule


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", help="a tiny random-init pipeline of hybridiff_rt.testing "
                                       "(sdxl, sd, sd3, pixart-sigma, sana, wan2.1, wan2.2, "
                                       "wan2.1-i2v, qwen-image, flux-true-cfg)")
    source.add_argument("--pipeline", help="a local diffusers pipeline folder (from_pretrained)")
    parser.add_argument("--prompt", default="a photo of a red fox in the snow")
    parser.add_argument("--negative-prompt", default="blurry, low quality")
    parser.add_argument("--steps", type=int, default=50, help="num_inference_steps")
    parser.add_argument("--guidance", type=float, default=5.0,
                        help="guidance scale w (true_cfg_scale for true-CFG pipelines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="sdxl", choices=sorted(PRESETS),
                        help="switching rule to evaluate on the curve (rescaled to --steps)")
    parser.add_argument("--window", type=int, help="override the preset's window L")
    parser.add_argument("--slope-eps", type=float, help="override the preset's slope_eps")
    parser.add_argument("--tau-cap", type=int, help="override the preset's tau_cap")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def build_source(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """``(pipe, call_kwargs)`` for the chosen pipeline, with guidance switched on."""
    from .. import testing

    if args.tiny is not None:
        if args.tiny in testing.DIT_BUILDERS:
            pipe, kwargs = testing.build_dit(args.tiny)
            scale_key = next(iter(testing.DIT_INFO[args.tiny].guidance_kwargs))
            return pipe, {**kwargs, scale_key: args.guidance}
        if args.tiny in testing.BUILDERS:
            return testing.build(args.tiny), {"prompt": args.prompt,
                                              "negative_prompt": args.negative_prompt,
                                              "guidance_scale": args.guidance}
        known = sorted([*testing.BUILDERS, *testing.DIT_BUILDERS])
        raise SystemExit(f"hybridiff-rt curve: unknown --tiny {args.tiny!r}; choose one of {known}")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    kwargs["true_cfg_scale" if "true_cfg_scale" in params else "guidance_scale"] = args.guidance
    return pipe, kwargs


def measure_curve(pipe: Any, call_kwargs: dict[str, Any], steps: int,
                  seeds: list[int]) -> list[list[float]]:
    """Per seed, the M_i the runtime recorded for each denoiser step of one serial call."""
    import hybridiff_rt as hr

    wrapped = hr.parallelize(pipe, hr.HybridConfig(k=0))
    curves = []
    try:
        for seed in seeds:
            wrapped(num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(seed), **call_kwargs)
            report = hr.last_report(wrapped)
            if set(report.modes) != {"serial"}:
                raise SystemExit("hybridiff-rt curve runs in one process; do not start it under "
                                 "torchrun")
            curves.append([float(m) for m in report.rel_mae])
    finally:
        wrapped.restore()
    return curves


def analyse(curves: list[list[float]], cfg: HybridConfig) -> dict[str, Any]:
    """Mean curve, slopes and switch point of the rule ``cfg`` on it (k is ignored: the point
    is where pipelining would start)."""
    steps = len(curves[0])
    mean = [sum(c[i] for c in curves) / len(curves) for i in range(steps)]
    schedule = _replay(cfg.replace(k=0), mean)
    # the slopes over the whole run: the same rule with a rule that never fires
    slopes = _replay(cfg.replace(k=0, slope_eps=0.0, tau_cap=steps), mean).slopes
    return {"mean": mean, "per_seed": curves, "slopes": list(slopes),
            "tau1": schedule.tau1, "tau1_source": schedule.tau1_source,
            "rule": {"window": cfg.window, "slope_eps": cfg.slope_eps, "tau_cap": cfg.tau_cap}}


def _replay(cfg: HybridConfig, curve: list[float]) -> SwitchSchedule:
    schedule = SwitchSchedule(cfg, len(curve))
    for i, m in enumerate(curve):
        schedule.mode(i)
        schedule.observe(i, m)
    schedule.finish()
    return schedule


def table(result: dict[str, Any]) -> str:
    """The mean curve and its slopes as a markdown table under a line naming the rule's tau1."""
    rule = result["rule"]
    head = (f"rule: window {rule['window']}, slope_eps {rule['slope_eps']:.3g}, tau_cap "
            f"{rule['tau_cap']}: tau1 = {result['tau1']} ({result['tau1_source']})")
    lines = [head, "", "| step | M_i (mean) | G_i |", "|---|---|---|"]
    for i, (m, g) in enumerate(zip(result["mean"], result["slopes"])):
        slope = "-" if g is None or not math.isfinite(g) else f"{g:+.3e}"
        lines.append(f"| {i} | {m:.4f} | {slope} |")
    return "\n".join(lines)


def run_curve(args: argparse.Namespace) -> int:
    pipe, kwargs = build_source(args)
    overrides = {k: v for k, v in (("window", args.window), ("slope_eps", args.slope_eps),
                                   ("tau_cap", args.tau_cap)) if v is not None}
    cfg = HybridConfig.preset(args.preset, num_steps=args.steps, **overrides)
    result = analyse(measure_curve(pipe, kwargs, args.steps, args.seeds), cfg)
    result["pipeline"] = type(pipe).__name__
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0
