"""HybridDenoiser (engine/runtime.py) and its RunReport (engine/report.py), driven directly.

World of one (this process, no torchrun variables): every step is "serial"; the guided prediction
is ``u + w (c - u)`` of two direct model calls, bit for bit, and the step bookkeeping (order,
num_steps, reset) is checked. Two ranks (gloo, one thread each): "cbp" steps equal the local
per-branch computation bit for bit, and "pipeline" steps equal a one-process emulation of the
stale-activation pipeline with the "reuse" guidance policy. World size three is refused.

The model is the SD1.5-shaped tiny U-Net of hybridiff_rt.testing (latents 4 x 16 x 16, text
embeddings 8 x 32), fed fresh random inputs.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt import testing
from hybridiff_rt.engine.report import MODES, RunReport
from hybridiff_rt.ops import discrepancy_stats, rel_mae
from hybridiff_rt.testing import all_ok, run_ranks

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
SIZE = 32
PROMPT, NEGATIVE = "a red fox in the snow", "low quality"
#: modes of the two-rank hybrid run below: window 1 makes every slope exactly 0, so the switch
#: fires at the end of step 1 and k = 2 pipelined steps follow
HYBRID = dict(window=1, slope_eps=1e-6, k=2, tau_cap=2, pipeline_guidance="reuse")
HYBRID_MODES = ["cbp", "cbp", "pipeline", "pipeline", "cbp", "cbp"]


def _examples():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import custom_loop

    return custom_loop


def _inputs(seed: int, steps: int) -> list[dict]:
    """Per step: sample, timestep and the two branches' text embeddings (same for a seed)."""
    g = torch.Generator().manual_seed(seed)
    return [dict(sample=torch.randn(1, 4, 16, 16, generator=g),
                 timestep=torch.tensor(900 - 100 * i),
                 cond={"encoder_hidden_states": torch.randn(1, 8, 32, generator=g)},
                 uncond={"encoder_hidden_states": torch.randn(1, 8, 32, generator=g)})
            for i in range(steps)]


@torch.no_grad()
def _direct(model, step: dict, branch: str) -> torch.Tensor:
    return model(step["sample"], step["timestep"], **step[branch], return_dict=False)[0]


def _call(den, step: dict, i: int, num_steps: int | None, w: float, **overrides):
    kw = dict(cond=step["cond"], uncond=step["uncond"], guidance_scale=w, step=i,
              num_steps=num_steps)
    kw.update(overrides)
    return den(step["sample"], step["timestep"], **kw)


@pytest.fixture(scope="module")
def seed():
    return random.randrange(1 << 16)


@pytest.fixture(scope="module")
def model(seed):
    return testing.sd_pipeline(seed=seed).unet


# ------------------------------------------------------------------------ world of one (serial)
def test_serial_guided_prediction_is_the_torch_cfg_formula_and_steps_are_checked():
    """World of one: den(...) is u + w (c - u) of two direct model calls, bit for bit; step
    bookkeeping rejects out-of-order calls and step 0 starts a new run."""
    loop_mod = _examples()
    seed = random.randrange(1 << 16)
    cpu = torch.device("cpu")
    pipe = loop_mod.build_pipeline("sdxl", seed=seed, device=cpu)
    cond, uncond = loop_mod.branch_inputs(pipe, PROMPT, NEGATIVE, SIZE, SIZE, cpu)
    den = hr.HybridDenoiser(pipe.unet, hr.HybridConfig(k=0))
    sample = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(500)
    with torch.no_grad():
        u = pipe.unet(sample, t, **uncond, return_dict=False)[0]
        c = pipe.unet(sample, t, **cond, return_dict=False)[0]
    w = 7.5
    guided = den(sample, t, cond=cond, uncond=uncond, guidance_scale=w, step=0, num_steps=3)
    assert torch.equal(guided, u + w * (c - u))
    assert not torch.equal(u, c)
    assert den.report.modes == ["serial"] and den.report.num_steps == 3

    call = dict(cond=cond, uncond=uncond, guidance_scale=w)
    with pytest.raises(ValueError, match="out of order"):
        den(sample, t, step=2, **call)
    den(sample, t, **call)  # step=None: the next step (1)
    den(sample, t, step=2, **call)
    with pytest.raises(ValueError, match="past the planned"):
        den(sample, t, step=3, **call)
    assert den.report.modes == ["serial"] * 3
    den(sample, t, step=0, num_steps=5, **call)  # step 0 starts a new run
    assert den.report.modes == ["serial"] and den.report.num_steps == 5
    den.reset()
    with pytest.raises(ValueError, match="num_steps"):
        den(sample, t, step=0, **call)
    assert hr.last_report(den) is den.report
    # a one-element tensor scale is that number; a per-sample scale is refused before the step
    again = den(sample, t, cond=cond, uncond=uncond, guidance_scale=torch.tensor(w), step=0,
                num_steps=2)
    assert torch.equal(again, guided)
    with pytest.raises(hr.ShapeError, match="predict_branches"):
        den(sample, t, cond=cond, uncond=uncond, guidance_scale=torch.full((2,), w), step=1)
    assert den.report.modes == ["serial"]


@pytest.mark.parametrize("num_steps", [None, 0, -2])
def test_step_zero_needs_a_positive_num_steps_and_a_refused_call_records_nothing(model, seed,
                                                                                  num_steps):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    (step,) = _inputs(seed, 1)
    with pytest.raises(ValueError, match="num_steps .* must be given at step 0"):
        _call(den, step, 0, num_steps, 3.0)
    assert den.report.modes == [] and den.report.num_steps is None
    with pytest.raises(ValueError, match="step 1 called out of order: this run expects step 0"):
        _call(den, step, 1, 2, 3.0)
    _call(den, step, 0, 1, 3.0)  # the denoiser is still at step 0
    assert den.report.modes == ["serial"] and den.report.num_steps == 1


def test_reset_starts_a_fresh_report_and_keeps_the_old_one_intact(model, seed):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    steps = _inputs(seed + 1, 3)
    for i in range(2):
        _call(den, steps[i], i, 3, 2.0)
    old = den.report
    den.reset()
    assert den.report is not old
    assert den.report.modes == [] and den.report.num_steps is None and den.report.step_ms == []
    assert old.modes == ["serial"] * 2 and old.num_steps == 3 and len(old.step_ms) == 2
    with pytest.raises(ValueError, match="out of order"):
        _call(den, steps[2], 2, None, 2.0)  # reset forgot the old run's position
    _call(den, steps[0], None, 1, 2.0)  # step=None after reset is step 0
    assert den.report.modes == ["serial"] and old.modes == ["serial"] * 2


def test_serial_report_records_every_step(model, seed):
    w, n = 5.0, 3
    cfg = hr.HybridConfig(k=0)
    den = hr.HybridDenoiser(model, cfg)
    steps = _inputs(seed + 2, n)
    expected = []
    for i, step in enumerate(steps):
        guided = _call(den, step, i, n, w)
        u, c = _direct(model, step, "uncond"), _direct(model, step, "cond")
        assert torch.equal(guided, u + w * (c - u)), f"seed {seed} step {i}"
        expected.append(rel_mae(discrepancy_stats(u, c)))
    report = den.report
    assert (report.rank, report.world_size, report.num_steps) == (0, 1, n)
    assert report.transport is None and report.tau1 is None and report.tau2 is None
    assert report.modes == ["serial"] * n and report.bytes_sent == [0] * n
    assert report.rel_mae == expected and all(0 < m < math.inf for m in expected)
    assert len(report.step_ms) == n and all(ms > 0 for ms in report.step_ms)
    assert report.nonfinite_steps == []
    assert report.notes == ["world size 1: serial run (both branches on this rank)"]
    as_dict = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert as_dict["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert as_dict["total_ms"] == pytest.approx(sum(report.step_ms))


def test_predict_branches_with_joint_inputs_runs_the_batch_two_call(model, seed):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    step = _inputs(seed + 3, 1)[0]
    uncond_kw = {"sample": step["sample"], "timestep": step["timestep"], **step["uncond"]}
    cond_kw = {"sample": step["sample"], "timestep": step["timestep"], **step["cond"]}
    u, c = den.predict_branches(uncond_kw, cond_kw, guidance_scale=3.0, step=0, num_steps=2)
    assert torch.equal(u, _direct(model, step, "uncond"))
    assert torch.equal(c, _direct(model, step, "cond"))
    joint_kw = {"sample": torch.cat([step["sample"]] * 2), "timestep": step["timestep"],
                "encoder_hidden_states": torch.cat([step["uncond"]["encoder_hidden_states"],
                                                    step["cond"]["encoder_hidden_states"]])}
    u2, c2 = den.predict_branches(uncond_kw, cond_kw, guidance_scale=3.0, joint_kw=joint_kw)
    with torch.no_grad():
        batch2 = model(**joint_kw, return_dict=False)[0]
    assert torch.equal(torch.cat([u2, c2]), batch2)
    assert den.report.modes == ["serial", "serial"]


def test_serial_step_returns_the_model_output_unchanged_and_notes_the_reason(model, seed):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    step = _inputs(seed + 4, 1)[0]
    kw = {"sample": step["sample"], "timestep": step["timestep"], **step["cond"]}
    with torch.no_grad():
        out = den.serial_step(dict(kw, return_dict=False), step=0, num_steps=2, reason="why not")
        again = den.serial_step(kw, reason="why not")
    assert isinstance(out, tuple) and torch.equal(out[0], _direct(model, step, "cond"))
    assert torch.equal(again.sample, out[0])  # return_dict left to the model: its output class
    report = den.report
    assert report.modes == ["serial", "serial"] and report.notes == ["why not"]
    assert all(math.isnan(m) for m in report.rel_mae) and report.bytes_sent == [0, 0]
    assert report.to_dict()["rel_mae"] == [None, None]
    with pytest.raises(ValueError, match="past the planned 2 steps"):
        den.serial_step(kw, reason="why not")


@pytest.mark.parametrize("branch", ["uncond", "cond"])
def test_non_finite_prediction_raises_naming_the_branch_and_step(model, seed, branch):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    steps = _inputs(seed + 5, 2)
    _call(den, steps[0], 0, 2, 4.0)
    bad = steps[1][branch]["encoder_hidden_states"].clone()
    bad[0, random.randrange(8), random.randrange(32)] = math.nan
    steps[1][branch] = {"encoder_hidden_states": bad}
    with pytest.raises(hr.NonFinitePredictionError,
                       match=f"step 1: the {branch} prediction contains NaN or infinite"):
        _call(den, steps[1], 1, None, 4.0)
    assert issubclass(hr.NonFinitePredictionError, FloatingPointError)
    assert den.report.modes == ["serial"]  # the failed step is not recorded


def test_all_zero_uncond_prediction_is_noted_and_never_raises(seed):
    """mean |u| = 0 makes M_i infinite: the step is listed as non-finite and the run goes on."""
    model = testing.sd_pipeline(seed=seed).unet
    original = model.forward

    def forward(*args, **kwargs):  # the uncond branch (all-zero embeddings) predicts zeros
        out = original(*args, **kwargs)
        if not kwargs["encoder_hidden_states"].any():
            return (torch.zeros_like(out[0]),)
        return out

    model.forward = forward
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    w, steps = 6.0, _inputs(seed + 6, 2)
    for i, step in enumerate(steps):
        step["uncond"] = {"encoder_hidden_states": torch.zeros(1, 8, 32)}
        guided = _call(den, step, i, 2, w)
        zero = torch.zeros_like(guided)
        assert torch.equal(guided, zero + w * (_direct(model, step, "cond") - zero))
    report = den.report
    assert report.nonfinite_steps == [0, 1] and report.modes == ["serial"] * 2
    assert report.rel_mae == [math.inf, math.inf]
    assert report.to_dict()["rel_mae"] == [None, None]
    assert any("non-finite discrepancy" in note for note in report.notes)


def test_unsupported_model_is_refused_with_the_supported_families():
    with pytest.raises(hr.UnsupportedModelError, match="UNet2DConditionModel"):
        hr.HybridDenoiser(torch.nn.Linear(4, 4))


def test_cuda_graphs_on_without_a_gpu_runs_eagerly_and_says_so(model, seed):
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0, cuda_graphs="on"))
    step = _inputs(seed, 1)[0]
    guided = _call(den, step, 0, 1, 3.0)
    u, c = _direct(model, step, "uncond"), _direct(model, step, "cond")
    assert torch.equal(guided, u + 3.0 * (c - u))
    assert any(n.startswith("cuda_graphs='on' needs a CUDA device") for n in den.report.notes)


# ----------------------------------------------------------------------------------- RunReport
def test_run_report_records_steps_refuses_unknown_modes_and_is_strict_json():
    report = RunReport(rank=1, world_size=2)
    values = [random.uniform(0.01, 1.0) for _ in range(3)]
    for mode, value in zip(MODES, values):
        report.record_step(mode, value, 2.5, 7)
    report.record_step("cbp", math.nan, 1.0, 0)
    with pytest.raises(ValueError, match="mode must be one of"):
        report.record_step("async", 0.1, 1.0, 0)
    assert report.modes == list(MODES) + ["cbp"]  # the refused step left no trace
    report.note("a")
    report.note("b")
    report.note("a")
    assert report.notes == ["a", "b"]
    report.extra["stage"] = {"ms": (1.0, math.inf), 3: [math.nan]}
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["rel_mae"] == values + [None]
    assert d["extra"] == {"stage": {"ms": [1.0, None], "3": [None]}}
    assert d["total_ms"] == report.total_ms == 2.5 * 3 + 1.0
    assert d["bytes_sent"] == [7, 7, 7, 0] and d["rank"] == 1 and d["world_size"] == 2


# -------------------------------------------------------------------------------- world size 2
def _rank_engine(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.comm import TorchTransport

    hr.init_distributed()
    model = testing.sd_pipeline(seed=seed).unet
    w = 4.0
    results = {}

    # CBP on an injected transport, then a second run on the same denoiser (step 0 restarts)
    transport = TorchTransport(30.0)
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0), transport=transport)
    for name, steps in (("cbp", _inputs(seed + 1, 3)), ("cbp_rerun", _inputs(seed + 2, 2))):
        exact, expected = [], []
        for i, step in enumerate(steps):
            guided = _call(den, step, i, len(steps), w)
            u, c = _direct(model, step, "uncond"), _direct(model, step, "cond")
            exact.append(torch.equal(guided, u + w * (c - u)))
            expected.append(rel_mae(discrepancy_stats(u, c)))
        results[name] = dict(exact=exact, expected_rel_mae=expected,
                             report=den.report.to_dict(), prediction_bytes=u.nbytes)
    results["cbp_rerun"]["transport_bytes"] = transport.bytes_sent

    # hybrid: CBP, two stale-pipelined steps, CBP; reference computed here in one process
    den = hr.HybridDenoiser(model, hr.HybridConfig(**HYBRID))
    steps = _inputs(seed + 3, len(HYBRID_MODES))
    guided = [_call(den, step, i, len(steps), w) for i, step in enumerate(steps)]
    report = den.report.to_dict()
    cut = report["extra"]["pipeline"]["plan"]["cuts"][1]
    staged = hr.stage_denoiser(model)
    reference, boundary, difference, stale_differs = [], None, None, []
    with torch.no_grad():
        for i, step in enumerate(steps):
            if HYBRID_MODES[i] == "pipeline":
                ctx = staged.prepare(sample=step["sample"], timestep=step["timestep"],
                                     **step["cond"])
                fresh = staged.run(ctx.initial_state, ctx, 0, cut)
                source = fresh if HYBRID_MODES[i - 1] == "cbp" else boundary
                c = staged.finish(staged.run(source, ctx, cut, None), ctx)
                boundary = fresh
                stale_differs.append(not torch.equal(c, _direct(model, step, "cond")))
                u = c - difference  # the "reuse" policy: c + (w - 1) d after combination
            else:
                u, c = _direct(model, step, "uncond"), _direct(model, step, "cond")
                difference = c - u
            reference.append(u + w * (c - u))
    results["hybrid"] = dict(exact=[torch.equal(a, b) for a, b in zip(guided, reference)],
                             stale_differs=stale_differs, report=report,
                             guided=[g.numpy().copy() for g in guided])

    # a transport that measured its link at set-up (as the IPC self-test does): the runtime
    # plans with that figure and probes nothing
    measured = TorchTransport(30.0)
    measured.bytes_per_ms, measured.link_measured = 1.234e6, True
    den = hr.HybridDenoiser(model, hr.HybridConfig(**HYBRID), transport=measured)
    for i, step in enumerate(steps):
        _call(den, step, i, len(steps), w)
    results["setup_link"] = den.report.to_dict()["extra"]["pipeline"]

    # guidance that starts late (a guider's start, a custom loop's choice): steps 0 and 1 run
    # whole (serial_step), steps 2 and 3 CBP; each agreement round of the run has its own key
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    steps = _inputs(seed + 5, 4)
    exact = []
    for i, step in enumerate(steps):
        if i < 2:
            out = den.serial_step(dict(sample=step["sample"], timestep=step["timestep"],
                                       **step["cond"], return_dict=False),
                                  step=i, num_steps=4 if i == 0 else None, reason="unguided")
            exact.append(torch.equal(out[0], _direct(model, step, "cond")))
        else:
            u, c = _direct(model, step, "uncond"), _direct(model, step, "cond")
            exact.append(torch.equal(_call(den, step, i, None, w), u + w * (c - u)))
    results["late_guidance"] = dict(exact=exact, modes=den.report.to_dict()["modes"])

    # a NaN in the cond branch at step 1: rank 1 computes it, both ranks raise
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    steps = _inputs(seed + 4, 2)
    _call(den, steps[0], 0, 2, w)
    bad = steps[1]["cond"]["encoder_hidden_states"].clone()
    bad[0, 3, 5] = float("nan")
    try:
        _call(den, steps[1], 1, None, w, cond={"encoder_hidden_states": bad})
        results["nonfinite"] = None
    except hr.NonFinitePredictionError as exc:
        results["nonfinite"] = str(exc)
    return results


@pytest.fixture(scope="module")
def two_ranks():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_engine, seed, timeout_s=240))


def test_cbp_steps_equal_the_local_per_branch_computation_bit_for_bit(two_ranks):
    seed, ranks = two_ranks
    for rank, results in enumerate(ranks):
        r = results["cbp"]
        assert r["exact"] == [True] * 3, f"seed {seed} rank {rank}"
        report = r["report"]
        assert (report["rank"], report["world_size"], report["num_steps"]) == (rank, 2, 3)
        assert report["modes"] == ["cbp"] * 3 and report["transport"] == "torch-gloo"
        assert report["rel_mae"] == r["expected_rel_mae"]
        # each rank sends its own branch's prediction once per step, nothing else
        assert report["bytes_sent"] == [r["prediction_bytes"]] * 3
        assert report["tau1"] is None and report["tau2"] is None  # k = 0 never switches
        assert report["config"] == json.loads(json.dumps(hr.HybridConfig(k=0).to_dict()))
        rerun = results["cbp_rerun"]
        assert rerun["exact"] == [True] * 2
        assert rerun["report"]["modes"] == ["cbp"] * 2 and rerun["report"]["num_steps"] == 2
        # the injected transport carried every byte of both runs
        assert rerun["transport_bytes"] == 5 * r["prediction_bytes"]
    assert ranks[0]["cbp"]["report"]["rel_mae"] == ranks[1]["cbp"]["report"]["rel_mae"]


def test_pipelined_steps_equal_a_one_process_stale_emulation_bit_for_bit(two_ranks):
    seed, ranks = two_ranks
    for rank, results in enumerate(ranks):
        r = results["hybrid"]
        report = r["report"]
        assert report["modes"] == HYBRID_MODES, f"seed {seed} rank {rank}"
        assert (report["tau1"], report["tau2"]) == (1, 3)
        assert r["exact"] == [True] * len(HYBRID_MODES), f"seed {seed} rank {rank}: {r['exact']}"
        # the fill step runs fresh; the next one really uses the stale boundary
        assert r["stale_differs"] == [False, True]
        for mode, measured in zip(report["modes"], report["rel_mae"]):
            assert (measured is None) == (mode == "pipeline")
        plan = report["extra"]["pipeline"]["plan"]
        assert plan["cuts"][0] == 0 and plan["cuts"][-1] == len(
            report["extra"]["pipeline"]["unit_names"])
    for a, b in zip(ranks[0]["hybrid"]["guided"], ranks[1]["hybrid"]["guided"]):
        np.testing.assert_array_equal(a, b)


def test_guidance_that_starts_after_serial_steps_agrees_again_and_runs_cbp(two_ranks):
    """A run whose first steps are unguided (serial_step: agreed without guidance) agrees again
    at its first guided step, under a key of its own; before, both rounds shared one key and a
    rank could read its peer's first round (all fields "differed")."""
    seed, ranks = two_ranks
    for rank, results in enumerate(ranks):
        r = results["late_guidance"]
        assert r["exact"] == [True] * 4, f"seed {seed} rank {rank}: {r['exact']}"
        assert r["modes"] == ["serial", "serial", "cbp", "cbp"]


def test_a_link_measured_at_transport_set_up_is_used_without_probing_again(two_ranks):
    _, ranks = two_ranks
    for results in ranks:
        probed = results["hybrid"]["report"]["extra"]["pipeline"]
        assert probed["link_source"] == "probe" and probed["link_probe_bytes"] > 0
        link = results["setup_link"]
        assert link["link_source"] == "transport set-up" and link["link_measured"]
        assert link["link_bytes_per_ms"] == 1.234e6 and link["link_probe_bytes"] == 0


def test_non_finite_branch_prediction_raises_on_both_ranks(two_ranks):
    _, ranks = two_ranks
    for results in ranks:
        assert results["nonfinite"] is not None, "a NaN cond prediction went unnoticed"
        assert results["nonfinite"].startswith(
            "step 1: the cond prediction contains NaN or infinite values")


def _rank_world_three(rank):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    hr.HybridDenoiser(testing.sd_pipeline().unet, hr.HybridConfig(k=0))


def test_world_size_three_is_refused_on_every_rank():
    outcomes = run_ranks(_rank_world_three, world_size=3)
    assert sorted(outcomes) == [0, 1, 2]
    for outcome in outcomes.values():
        assert outcome.error_type == "WorldSizeError", outcome
        assert "world size 1 (serial) or 2" in outcome.error and "3 ranks" in outcome.error


def test_one_small_host_read_per_step(model, seed, monkeypatch):
    """Per step the runtime reads back only the two discrepancy sums (rel_mae); it inspects the
    predictions themselves (torch.isfinite) only when that number is not finite."""
    import hybridiff_rt.engine.runtime as runtime

    counts = {"rel_mae": 0, "isfinite": 0}
    real_rel_mae, real_isfinite = runtime.rel_mae, torch.isfinite

    def counting_rel_mae(stats):
        counts["rel_mae"] += 1
        return real_rel_mae(stats)

    def counting_isfinite(x):
        counts["isfinite"] += 1
        return real_isfinite(x)

    monkeypatch.setattr(runtime, "rel_mae", counting_rel_mae)
    monkeypatch.setattr(runtime.torch, "isfinite", counting_isfinite)
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0))
    n = 3
    for i, step in enumerate(_inputs(seed + 11, n)):
        _call(den, step, i, n, 5.0)
    assert counts == {"rel_mae": n, "isfinite": 0}
