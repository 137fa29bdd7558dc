"""Hybrid runs (CBP, then stale-activation pipelining, then CBP) on two CPU ranks.

The two-rank output is compared bit for bit with a one-process emulation of the same schedule:
per-branch denoiser calls on CBP steps and the staged model run with the stale boundary on
pipelined steps. The mode sequence is checked against an independent implementation of the
switching rule of docs/method.md applied to the discrepancies the run recorded. A staged model
that cannot take the call's arguments makes the run CBP only with a note; any other error in its
prepare is raised, never turned into a note.
"""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import all_ok, run_ranks

STEPS = 10


def expected_modes(rel_mae, window, slope_eps, k, tau_cap, steps):
    """The rule of docs/method.md, written independently of hybridiff_rt.schedule."""
    tau1 = tau_cap
    for i in range(window, tau_cap):
        slope = (rel_mae[i - window + 1] - rel_mae[i]) / window
        if 0 <= slope < slope_eps:
            tau1 = i
            break
    modes = ["pipeline" if tau1 < i <= tau1 + k else "cbp" for i in range(steps)]
    return tau1, modes


def emulate(pipe, tau1, tau2, cut, policy, **call_kwargs):
    """One process: per-branch calls on CBP steps, the stale stage pipeline on steps
    tau1+1..tau2 (fill step fresh), returning the final latents."""
    import hybridiff_rt as hr
    from hybridiff_rt.engine.batch import join_cfg_batch, split_cfg_batch

    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    staged = hr.stage_denoiser(model)
    original = model.forward
    signature = inspect.signature(original)
    memory = {"step": 0, "stale": None, "difference": None}

    def forward(*args, **kwargs):
        kw = dict(signature.bind(*args, **kwargs).arguments)
        kw.pop("return_dict", None)
        step = memory["step"]
        memory["step"] += 1
        full = kw["sample" if "sample" in kw else "hidden_states"].shape[0]
        pairs = {key: split_cfg_batch(v, full) for key, v in kw.items()}
        uncond_kw = {key: p[0] for key, p in pairs.items()}
        cond_kw = {key: p[1] for key, p in pairs.items()}
        if tau1 < step <= tau2:
            ctx = staged.prepare(**cond_kw)
            boundary = staged.run(ctx.initial_state, ctx, 0, cut)
            source = boundary if step == tau1 + 1 else memory["stale"]
            cond = staged.finish(staged.run(source, ctx, cut, None), ctx)
            memory["stale"] = boundary
            uncond = cond - memory["difference"] if policy == "reuse" else cond
        else:
            uncond = original(**uncond_kw, return_dict=False)[0]
            cond = original(**cond_kw, return_dict=False)[0]
            memory["difference"] = cond - uncond
        return (join_cfg_batch(uncond, cond),)

    model.forward = forward
    try:
        return pipe(**call_kwargs).images.cpu().numpy().copy()
    finally:
        del model.forward


def _rank_hybrid(rank, family, seed, cases):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build(family, seed=seed)
    results = {}
    for name, fields in cases.items():
        call = dict(prompt="a castle on a cliff", negative_prompt="low quality",
                    num_inference_steps=STEPS, height=32, width=32, guidance_scale=4.5,
                    output_type="latent")
        parallel = hr.parallelize(pipe, hr.HybridConfig(**fields))
        out = parallel(generator=torch.Generator().manual_seed(seed), **call).images.numpy()
        report = hr.last_report(parallel).to_dict()
        pipe = parallel.restore()
        emulated = None
        if rank == 0:
            cut = report["extra"]["pipeline"]["plan"]["cuts"][1]
            emulated = emulate(pipe, report["tau1"], report["tau2"], cut,
                               fields["pipeline_guidance"],
                               generator=torch.Generator().manual_seed(seed), **call)
        results[name] = dict(out=out, report=report, emulated=emulated)
    return results


CASES = {
    # window 1 makes every slope exactly 0, so detection fires at step 1
    "detect_reuse": dict(window=1, slope_eps=1e-6, k=3, tau_cap=5, pipeline_guidance="reuse"),
    # slope_eps 0 never fires: the cap path, tau1 = tau_cap
    "cap_off": dict(window=2, slope_eps=0.0, k=2, tau_cap=4, pipeline_guidance="off"),
    # a free-form slope rule: whichever path the data takes must match the independent rule
    "free_off": dict(window=2, slope_eps=0.05, k=2, tau_cap=6, pipeline_guidance="off"),
}


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_hybrid_schedule_and_outputs_match_one_process_emulation(family):
    seed = random.randrange(1 << 16)
    results = all_ok(run_ranks(_rank_hybrid, family, seed, CASES))
    for name, fields in CASES.items():
        r0, r1 = results[0][name], results[1][name]
        assert np.array_equal(r0["out"], r1["out"]), f"{name}: ranks differ"
        rep = r0["report"]
        assert rep["rel_mae"] == r1["report"]["rel_mae"] and rep["modes"] == r1["report"]["modes"]
        measured = [m for m, mode in zip(rep["rel_mae"], rep["modes"]) if mode == "cbp"]
        assert all(m is not None and m > 0 for m in measured)
        tau1, modes = expected_modes(rep["rel_mae"], fields["window"], fields["slope_eps"],
                                     fields["k"], fields["tau_cap"], STEPS)
        assert rep["modes"] == modes, f"{name}: modes {rep['modes']} expected {modes}"
        assert (rep["tau1"], rep["tau2"]) == (tau1, tau1 + fields["k"])
        if name == "detect_reuse":
            assert tau1 == 1
        if name == "cap_off":
            assert tau1 == fields["tau_cap"]
        for i, mode in enumerate(rep["modes"]):
            if mode == "pipeline":
                assert rep["rel_mae"][i] is None
        # the boundary state leaves rank 0 on the fill step and on every pipelined step but the
        # last; the last rank sends only the prediction on pipelined steps
        first, last = tau1 + 1, tau1 + fields["k"]
        prediction_bytes = r0["out"].nbytes
        pipeline = rep["extra"]["pipeline"]
        boundary_bytes = pipeline["boundary_bytes"][pipeline["plan"]["cuts"][1] - 1]
        assert rep["bytes_sent"][first:last] == [boundary_bytes] * (fields["k"] - 1)
        assert rep["bytes_sent"][last] == 0
        # the cut was planned with a measured link figure, the same on both ranks
        assert pipeline["link_measured"] and pipeline["link_bytes_per_ms"] > 0
        assert r1["report"]["extra"]["pipeline"]["link_bytes_per_ms"] == \
            pipeline["link_bytes_per_ms"]
        assert r1["report"]["extra"]["pipeline"]["plan"] == pipeline["plan"]
        assert r1["report"]["bytes_sent"][first:last + 1] == [prediction_bytes] * fields["k"]
        np.testing.assert_array_equal(r0["out"], r0["emulated"], err_msg=name)
        plan = rep["extra"]["pipeline"]["plan"]
        assert plan["cuts"][0] == 0 and plan["cuts"][-1] == len(rep["extra"]["pipeline"]
                                                                ["unit_names"])
        # modelled with the measured link: on two CPU processes a tiny model's boundary costs
        # about as much as its stages, so the model may even predict a loss (honestly)
        assert 0.0 < plan["ideal_speedup"] <= 2.0


def _rank_pipeline_failure(rank):
    import os

    import hybridiff_rt as hr
    from hybridiff_rt import testing

    cfg = hr.HybridConfig(window=1, slope_eps=1e-6, k=4, tau_cap=3, timeout_s=3.0)
    pipe = hr.parallelize(testing.build("sdxl"), cfg)

    def callback(p, i, t, tensors):
        if rank == 1 and i == 3:  # inside the pipelined steps 2..5
            os._exit(5)
        return tensors

    pipe(prompt="a dog", num_inference_steps=STEPS, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=callback)


def test_peer_death_during_pipelined_steps_raises_timeout_on_survivor():
    outcomes = run_ranks(_rank_pipeline_failure, timeout_s=120)
    assert 1 not in outcomes or not outcomes[1].ok
    assert 0 in outcomes, "rank 0 hung"
    assert outcomes[0].error_type == "PeerTimeoutError", outcomes[0]
    assert "pipeline step" in outcomes[0].error


def _rank_staging_checks(rank, seed):
    """What the first pipelined run does when the staged model's prepare (a) is not given an
    argument it takes, (b) fails inside: (a) runs CBP only with a note, (b) raises."""
    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.stages.mmdit import StagedSD3Transformer

    cfg = hr.HybridConfig(window=1, slope_eps=0.0, k=2, tau_cap=1, timeout_s=20)
    call = {"prompt": "a red fox", "height": 32, "width": 32, "num_inference_steps": 5,
            "output_type": "latent", "generator": torch.Generator().manual_seed(seed)}
    results = {}
    original = StagedSD3Transformer.prepare
    # (a) a prepare that takes no joint_attention_kwargs (the pipeline passes it, None)
    StagedSD3Transformer.prepare = lambda self, hidden_states, encoder_hidden_states, \
        pooled_projections, timestep, return_dict=True: original(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep)
    try:
        runner = hr.parallelize(testing.build("sd3", seed=seed), cfg)
        runner(**call)
        report = hr.last_report(runner)
        results["unbound"] = (list(report.modes), list(report.notes))
        runner.restore()

        # (b) a bug inside prepare: it must surface, not pass for a note
        def broken(self, **kw):
            raise TypeError("a bug inside prepare")

        StagedSD3Transformer.prepare = broken
        runner = hr.parallelize(testing.build("sd3", seed=seed), cfg)
        try:
            runner(**call)
            results["bug"] = None
        except TypeError as exc:
            results["bug"] = str(exc)
    finally:
        StagedSD3Transformer.prepare = original
    return results


def test_an_argument_the_stages_do_not_take_is_noted_and_a_bug_in_prepare_is_raised():
    seed = random.randrange(1 << 16)
    for rank, results in enumerate(all_ok(run_ranks(_rank_staging_checks, seed,
                                                    timeout_s=240))):
        modes, notes = results["unbound"]
        assert modes == ["cbp"] * 5, (rank, modes)
        assert any("the stage pipeline cannot carry these inputs (its prepare:" in n and
                   "joint_attention_kwargs" in n for n in notes), (rank, notes)
        assert results["bug"] == "a bug inside prepare", (rank, results["bug"])
