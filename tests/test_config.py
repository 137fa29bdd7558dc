"""HybridConfig: presets, step scaling, validation, digest.

(The CFG batch helpers and the agreement summaries are tested in test_batch_and_agreement.py,
what compile / cuda_graphs do at run time in test_compiled.py.)
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt.config import COMPILE_MODES, PRESETS, fit_to_steps, scale_to_steps


def test_presets_are_the_paper_defaults_at_50_steps():
    sdxl = hr.HybridConfig.preset("sdxl")
    assert (sdxl.window, sdxl.slope_eps, sdxl.k, sdxl.tau_cap) == (12, 0.4e-3, 5, 15)
    sd3 = hr.HybridConfig.preset("sd3")
    assert (sd3.window, sd3.slope_eps, sd3.k, sd3.tau_cap) == (15, 0.5e-3, 5, 40)
    assert hr.HybridConfig.preset("sd3-paper").slope_eps == 0.1e-3
    assert hr.HybridConfig.preset("sd3", slope_eps=1e-4).slope_eps == 1e-4
    assert hr.HybridConfig(k=0).k == 0


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("steps", [4, 10, 20, 30, 50, 75, 100])
def test_scaled_presets_give_a_schedule_the_runtime_accepts(name, steps):
    cfg = hr.HybridConfig.preset(name, num_steps=steps)
    schedule = hr.SwitchSchedule(cfg, steps)  # raises if the scaled config does not fit
    assert cfg.k == 0 or cfg.tau_cap + cfg.k <= steps - 2
    ratio = steps / 50
    base = PRESETS[name]
    assert cfg.window == max(1, round(base["window"] * ratio))
    assert cfg.slope_eps == pytest.approx(base["slope_eps"] / ratio)
    assert schedule.mode(0) == "cbp"


def test_scaling_identity_at_50_steps_and_tiny_runs_drop_pipelining():
    assert scale_to_steps(PRESETS["sdxl"], 50) == PRESETS["sdxl"]
    assert hr.HybridConfig.preset("sdxl", num_steps=3).k == 0


def test_a_run_too_short_for_the_pipelined_phase_gets_it_fitted_with_a_note():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(300):
        cfg = hr.HybridConfig(window=rng.randint(1, 20), k=rng.randint(0, 10),
                              tau_cap=rng.randint(1, 40), slope_eps=rng.choice([0.0, 4e-4]))
        steps = rng.randint(1, 60)
        fitted, note = fit_to_steps(cfg, steps)
        hr.SwitchSchedule(fitted, steps)  # always a schedule the runtime accepts
        fits = cfg.k == 0 or cfg.tau_cap + cfg.k <= steps - 2
        if fits:  # nothing changes, nothing to say
            assert fitted is cfg and note is None, (seed, cfg, steps)
            continue
        # only the cap and the pipelined length move, and only down; the cap first
        assert fitted == cfg.replace(tau_cap=fitted.tau_cap, k=fitted.k), (seed, cfg, steps)
        assert 1 <= fitted.tau_cap <= cfg.tau_cap and 0 <= fitted.k <= cfg.k
        assert fitted.k == cfg.k or fitted.tau_cap == 1, (seed, cfg, steps)
        # as long a pipelined phase as fits: k = 0 only when no step can be pipelined
        assert fitted.k == 0 or fitted.tau_cap + fitted.k == steps - 2, (seed, cfg, steps)
        assert (fitted.k == 0) == (steps < 4 or cfg.k == 0), (seed, cfg, steps)
        assert f"this run has {steps} denoiser steps" in note and \
            f"tau_cap={cfg.tau_cap} and k={cfg.k}" in note, note
        assert (f"fitted to tau_cap={fitted.tau_cap}, k={fitted.k}" in note if fitted.k
                else "no pipelined steps (k=0)" in note), note
        assert f"HybridConfig.preset(name, num_steps={steps})" in note
        assert ("needs at least 4 steps" in note if steps < 4 else
                f"tau_cap + k <= {steps - 2})" in note), note
    # the paper's default on a 20-step run keeps its 5 pipelined steps, switching by step 13
    fitted, note = fit_to_steps(hr.HybridConfig(), 20)
    assert (fitted.tau_cap, fitted.k) == (13, 5), note


@pytest.mark.parametrize("field,value,fragment", [
    ("window", 0, "window"), ("k", -1, "k must"), ("tau_cap", 0, "tau_cap"),
    ("slope_eps", float("nan"), "slope_eps"), ("slope_eps", -1e-3, "slope_eps"),
    ("pipeline_guidance", "on", "pipeline_guidance"), ("transport", "nccl", "transport"),
    ("cuda_graphs", True, "cuda_graphs"), ("timeout_s", 0, "timeout_s"),
    ("stage_cuts", (1, 5), "stage_cuts"), ("stage_cuts", (0, 5, 5), "stage_cuts"),
    # every numeric field: no booleans, nothing infinite or NaN
    ("window", True, "window"), ("k", 2.0, "k must"), ("tau_cap", False, "tau_cap"),
    ("slope_eps", True, "slope_eps"), ("slope_eps", float("inf"), "slope_eps"),
    ("timeout_s", float("inf"), "timeout_s"), ("timeout_s", float("nan"), "timeout_s"),
    ("timeout_s", True, "timeout_s"), ("handshake_timeout_s", float("inf"), "handshake"),
    ("handshake_timeout_s", -5, "handshake"), ("handshake_timeout_s", "60", "handshake"),
    ("guidance_scale", float("nan"), "guidance_scale"), ("guidance_scale", True, "guidance"),
    ("guidance_scale", -1.0, "guidance_scale"), ("stage_cuts", (0, True), "stage_cuts"),
    ("stage_cuts", "0,4", "stage_cuts"), ("stage_cuts", (0, 2.5), "stage_cuts"),
    ("compile", "on", "compile must be one of"), ("compile", True, "compile must be one of"),
    ("compile", "max_autotune", "compile must be one of"),
    ("compile_backend", "", "compile_backend"), ("compile_backend", None, "compile_backend"),
])
def test_invalid_fields_are_refused_with_the_field_named(field, value, fragment):
    with pytest.raises(hr.ConfigError, match=fragment):
        hr.HybridConfig(**{field: value})


@pytest.mark.parametrize("graphs", ["on", "off"])
def test_reduce_overhead_with_explicit_graph_settings_is_refused_naming_the_choices(graphs):
    with pytest.raises(hr.ConfigError, match="compile='reduce-overhead'") as info:
        hr.HybridConfig(compile="reduce-overhead", cuda_graphs=graphs)
    assert "cuda_graphs='auto'" in str(info.value) and "compile='default'" in str(info.value)
    for mode in COMPILE_MODES:  # every other pairing is accepted
        if mode != "reduce-overhead":
            assert hr.HybridConfig(compile=mode, cuda_graphs=graphs).compile == mode
    assert hr.HybridConfig(compile="reduce-overhead").cuda_graphs == "auto"


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(hr.ConfigError, match="sdxl"):
        hr.HybridConfig.preset("flux")


def test_digest_follows_every_field_and_config_is_json():
    a = hr.HybridConfig.preset("sdxl")
    assert a.digest() == hr.HybridConfig.preset("sdxl").digest()
    assert a.digest() != a.replace(timeout_s=31).digest()
    assert len({a.replace(compile=m).digest() for m in COMPILE_MODES}) == len(COMPILE_MODES)
    assert a.digest() != a.replace(compile_backend="aot_eager").digest()
    assert a.replace(stage_cuts=[0, 4, 9]).stage_cuts == (0, 4, 9)
    json.dumps(a.to_dict())


@pytest.mark.parametrize("given", ["sdxl", {"k": 0}, 5, hr.HybridConfig.preset])
def test_something_that_is_not_a_config_is_refused_with_how_to_build_one(given):
    from hybridiff_rt import testing

    pipe = testing.build("sd")
    with pytest.raises(hr.ConfigError, match="must be a hybridiff_rt.HybridConfig") as info:
        hr.parallelize(pipe, given)
    if given == "sdxl":
        assert "hr.HybridConfig.preset('sdxl', num_steps=...)" in str(info.value)
    with pytest.raises(hr.ConfigError, match="must be a hybridiff_rt.HybridConfig"):
        hr.HybridDenoiser(pipe.unet, given)
    # nothing was wrapped: the plain pipeline still works and can be parallelized
    assert not hasattr(pipe.unet, "_hybridiff_rt_pipeline")


def test_world_size_one_ignores_pipelining_limits_that_cannot_apply():
    """HybridConfig() has 50-step limits (tau_cap 15 + k 5); a serial run of 6 steps uses none of
    them, so it runs (a world of one never pipelines)."""
    from hybridiff_rt import testing

    pipe = testing.build("sd")
    with pytest.raises(hr.ConfigError):
        hr.SwitchSchedule(hr.HybridConfig(), 6)  # the limits are real for a pipelining run
    runner = hr.parallelize(pipe, hr.HybridConfig())
    out = runner(prompt="a cat", num_inference_steps=6, height=32, width=32,
                 output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    report = hr.last_report(runner)
    assert report.modes == ["serial"] * 6 and report.num_steps == 6
    assert report.tau1 is None and report.tau2 is None
