"""hr.HybridDenoiser as the backend of a hand-written sampling loop (examples/custom_loop.py).

The contract tested here (README "API"): the custom loop, driving the same model, scheduler,
prompt embeddings and seed as a diffusers pipeline, produces on two CPU ranks bit for bit the
latents of ``hr.parallelize(pipe)`` - for pure condition-based partitioning (k=0) and for a hybrid
schedule with stale-activation pipelined steps - with the same per-step report. On one rank it
runs each branch as its own call, so its k=0 result also equals the two-rank one bit for bit.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt.testing import all_ok, run_ranks

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
STEPS = 10
SIZE = 32
GUIDANCE = 4.5
PROMPT, NEGATIVE = "a red fox in the snow", "low quality"
#: name -> (family, scheduler) of the tiny pipeline
VARIANTS = {"sdxl-ddim": ("sdxl", "ddim"), "sdxl-euler": ("sdxl", "euler"), "sd3": ("sd3", None)}
CONFIGS = {
    "cbp": dict(k=0),
    # window 1 makes every slope exactly 0, so the switch fires at step 1: pipelined steps 2..4
    "hybrid": dict(window=1, slope_eps=1e-6, k=3, tau_cap=4),
}


def _examples():
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import custom_loop

    return custom_loop


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _rank_loop_and_pipeline(rank, seed):
    """Per family and config: the custom loop's latents and the parallelized pipeline's."""
    loop_mod = _examples()
    hr.init_distributed()
    cpu = torch.device("cpu")
    results = {}
    for variant, (family, scheduler) in VARIANTS.items():
        pipe = loop_mod.build_pipeline(family, seed=seed, device=cpu, scheduler=scheduler)
        cond, uncond = loop_mod.branch_inputs(pipe, PROMPT, NEGATIVE, SIZE, SIZE, cpu)
        for name, fields in CONFIGS.items():
            cfg = hr.HybridConfig(**fields)
            den = hr.HybridDenoiser(_denoiser(pipe), cfg)
            loop = loop_mod.sample(pipe, den, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE,
                                   seed=seed + 1, height=SIZE, width=SIZE)
            parallel = hr.parallelize(pipe, cfg)
            out = parallel(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                           height=SIZE, width=SIZE, guidance_scale=GUIDANCE, output_type="latent",
                           generator=torch.Generator().manual_seed(seed + 1))
            pipe = parallel.restore()
            results[(variant, name)] = dict(
                loop=loop.numpy().copy(), pipe=out.images.numpy().copy(),
                loop_report=den.report.to_dict(), pipe_report=hr.last_report(parallel).to_dict())
    # the script's own entry point on two ranks (process group already up: init is idempotent)
    results["main"] = loop_mod.main(["--family", "sd3", "--steps", "6", "--k", "2",
                                     "--seed", str(seed)]).numpy().copy()
    # ranks that disagree on the guidance scale fail at the first step, on both ranks
    pipe = loop_mod.build_pipeline("sdxl", seed=seed, device=cpu)
    cond, uncond = loop_mod.branch_inputs(pipe, PROMPT, NEGATIVE, SIZE, SIZE, cpu)
    try:
        loop_mod.sample(pipe, hr.HybridDenoiser(pipe.unet, hr.HybridConfig(k=0)), cond, uncond,
                        steps=STEPS, guidance_scale=GUIDANCE + rank, seed=seed, height=SIZE,
                        width=SIZE)
        results["mismatch"] = None
    except hr.RankMismatchError as exc:
        results["mismatch"] = str(exc)
    return results


@pytest.fixture(scope="module")
def two_rank_results():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_loop_and_pipeline, seed, timeout_s=240))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_custom_loop_equals_parallelized_pipeline_bit_for_bit(two_rank_results, variant, name):
    seed, ranks = two_rank_results
    fields = CONFIGS[name]
    for rank, results in enumerate(ranks):
        r = results[(variant, name)]
        assert r["loop"].dtype == np.float32 and r["loop"].shape == r["pipe"].shape
        np.testing.assert_array_equal(r["loop"], r["pipe"],
                                      err_msg=f"seed {seed} rank {rank}: loop != pipeline")
        lrep, prep = r["loop_report"], r["pipe_report"]
        for key in ("modes", "rel_mae", "tau1", "tau2", "num_steps", "world_size"):
            assert lrep[key] == prep[key], f"{key}: loop {lrep[key]} pipeline {prep[key]}"
        assert len(lrep["step_ms"]) == STEPS and lrep["world_size"] == 2
    r0, r1 = ranks[0][(variant, name)], ranks[1][(variant, name)]
    np.testing.assert_array_equal(r0["loop"], r1["loop"], err_msg="ranks differ")
    modes = r0["loop_report"]["modes"]
    if fields["k"] == 0:
        assert modes == ["cbp"] * STEPS
    else:
        assert modes == ["cbp"] * 2 + ["pipeline"] * 3 + ["cbp"] * (STEPS - 5)
        assert (r0["loop_report"]["tau1"], r0["loop_report"]["tau2"]) == (1, 4)
        # both runs cut the model at the same place (else the stale outputs would differ)
        cuts = [r0[k]["extra"]["pipeline"]["plan"]["cuts"] for k in ("loop_report", "pipe_report")]
        assert cuts[0] == cuts[1]


@pytest.mark.parametrize("variant", ["sdxl-ddim", "sd3"])
def test_one_rank_loop_equals_two_rank_cbp(two_rank_results, variant):
    """A world of one runs each branch as its own call: the k=0 two-rank result, bit for bit."""
    seed, ranks = two_rank_results
    loop_mod = _examples()
    cpu = torch.device("cpu")
    family, scheduler = VARIANTS[variant]
    pipe = loop_mod.build_pipeline(family, seed=seed, device=cpu, scheduler=scheduler)
    cond, uncond = loop_mod.branch_inputs(pipe, PROMPT, NEGATIVE, SIZE, SIZE, cpu)
    den = hr.HybridDenoiser(_denoiser(pipe), hr.HybridConfig(k=0))
    serial = loop_mod.sample(pipe, den, cond, uncond, steps=STEPS, guidance_scale=GUIDANCE,
                             seed=seed + 1, height=SIZE, width=SIZE).numpy()
    assert den.report.modes == ["serial"] * STEPS
    np.testing.assert_array_equal(serial, ranks[0][(variant, "cbp")]["loop"])


def test_main_runs_on_two_ranks_and_mismatch_fails_on_both(two_rank_results):
    _, ranks = two_rank_results
    main0, main1 = ranks[0]["main"], ranks[1]["main"]
    assert main0.shape == (1, 16, SIZE // 2, SIZE // 2) and np.isfinite(main0).all()
    np.testing.assert_array_equal(main0, main1)
    for results in ranks:
        assert results["mismatch"] is not None, "a guidance-scale mismatch went undetected"
        assert "guidance_scale" in results["mismatch"]
