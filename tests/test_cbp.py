"""Condition-based partitioning through hr.parallelize on two CPU ranks (gloo, one thread each).

Exactness contract (docs/architecture.md, "A CBP step"): in fp32 the two-rank output equals,
bit for bit, a serial run that calls the denoiser once per CFG branch; it is within BATCH2_TOLERANCE of the
ordinary batch-2 serial run; and it is identical on both ranks.

(World size 1 through hr.parallelize is tested in test_pipeline_adapter.py, the refusal of world
size 3 in test_runtime.py.)
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import all_ok, per_branch_forward, run_ranks

#: fp32 max |difference| between batch-2 and per-branch denoiser calls, propagated through a
#: few sampling steps (measured: 1e-6 to 2e-5 per call).
BATCH2_TOLERANCE = 1e-3
STEPS = 5


def denoiser_of(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _call(pipe, seed, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("height", 32)
    kw.setdefault("width", 32)
    kw.setdefault("output_type", "latent")
    out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    images = out.images
    return images.detach().numpy().copy() if isinstance(images, torch.Tensor) else np.asarray(images)


def _rank_cases(rank, family, seed, cases):
    """Run each case parallel, per-branch serial and batch-2 serial on this rank."""
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    hr.init_distributed()
    pipe = testing.build(family, seed=seed)
    results = {}
    for name, kwargs in cases.items():
        parallel = hr.parallelize(pipe, hr.HybridConfig(k=0))
        seen = []

        def callback(p, i, t, tensors):
            seen.append((int(i), float(tensors["latents"].double().sum())))
            return tensors

        extra = {"callback_on_step_end": callback} if kwargs.pop("callback", False) else {}
        par = _call(parallel, seed + 1, **kwargs, **extra)
        report = hr.last_report(parallel).to_dict()
        pipe = parallel.restore()
        doubled = kwargs.get("guidance_scale", 5.0) > 1
        undo = per_branch_forward(denoiser_of(pipe)) if doubled else (lambda: None)
        branchwise = _call(pipe, seed + 1, **kwargs)
        undo()
        batch2 = _call(pipe, seed + 1, **kwargs)
        results[name] = dict(par=par, branchwise=branchwise, batch2=batch2, report=report,
                             callback=seen)
    return results


def _check_exact(results_by_rank, name):
    r0, r1 = (results_by_rank[r][name] for r in (0, 1))
    assert np.array_equal(r0["par"], r1["par"]), "ranks returned different images"
    assert np.array_equal(r0["par"], r0["branchwise"]), (
        "parallel output differs from the per-branch serial run: max |d| = "
        f"{np.abs(r0['par'] - r0['branchwise']).max()}")
    assert np.abs(r0["par"] - r0["batch2"]).max() <= BATCH2_TOLERANCE
    return r0, r1


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sd"])
def test_cbp_matches_per_branch_serial_bit_for_bit(family):
    seed = random.randrange(1 << 16)
    cases = {
        "basic": dict(prompt="a red fox in snow", guidance_scale=5.0),
        "batched": dict(prompt=["a cat", "a dog on a hill"], negative_prompt=["blurry", "dark"],
                        num_images_per_prompt=2, guidance_scale=4.0),
    }
    results = all_ok(run_ranks(_rank_cases, family, seed, cases))
    for name in cases:
        r0, r1 = _check_exact(results, name)
        for rep, rank in ((r0["report"], 0), (r1["report"], 1)):
            assert rep["rank"] == rank and rep["world_size"] == 2
            assert rep["modes"] == ["cbp"] * STEPS
            assert rep["num_steps"] == STEPS
            assert all(b > 0 for b in rep["bytes_sent"]), rep["bytes_sent"]
            assert len(rep["step_ms"]) == STEPS and all(t > 0 for t in rep["step_ms"])
            assert rep["transport"] == "torch-gloo"
        assert r0["report"]["rel_mae"] == r1["report"]["rel_mae"]
        assert all(m is not None and m > 0 for m in r0["report"]["rel_mae"])
    batched = results[0]["batched"]["par"]
    assert batched.shape[0] == 4, "2 prompts x 2 images per prompt"


def test_cbp_without_guidance_callbacks_and_decoded_output():
    seed = random.randrange(1 << 16)
    cases = {
        "no_cfg": dict(prompt="a boat", guidance_scale=1.0),
        "callback": dict(prompt="a boat", negative_prompt="fog", guidance_scale=6.0,
                         callback=True),
        "decoded": dict(prompt="a tree", guidance_scale=3.0, output_type="np"),
    }
    results = all_ok(run_ranks(_rank_cases, "sdxl", seed, cases))
    r0, r1 = _check_exact(results, "no_cfg")
    for rep in (r0["report"], r1["report"]):
        assert rep["modes"] == ["serial"] * STEPS
        assert any("no classifier-free guidance" in n for n in rep["notes"])
        assert rep["bytes_sent"] == [0] * STEPS
    r0, r1 = _check_exact(results, "callback")
    assert [i for i, _ in r0["callback"]] == list(range(STEPS))
    assert r0["callback"] == r1["callback"], "callbacks saw different latents on the two ranks"
    r0, _ = _check_exact(results, "decoded")
    assert r0["par"].shape == (1, 32, 32, 3) and np.isfinite(r0["par"]).all()


def _rank_mismatch(rank, what):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    cfg = hr.HybridConfig(k=0, timeout_s=20)
    if what == "config" and rank == 1:
        cfg = cfg.replace(slope_eps=1e-3)
    pipe = hr.parallelize(testing.build("sdxl"), cfg)
    prompt = "a red car" if (what == "prompt" and rank == 1) else "a blue car"
    seed = 1 + rank if what == "seed" else 1
    steps = STEPS + rank if what == "steps" else STEPS
    _call(pipe, seed, prompt=prompt, guidance_scale=5.0, num_inference_steps=steps)


@pytest.mark.parametrize("what,field", [("prompt", "cond"), ("seed", "sample"),
                                        ("config", "config"), ("steps", "num_steps")])
def test_rank_disagreement_raises_on_every_rank(what, field):
    outcomes = run_ranks(_rank_mismatch, what)
    assert sorted(outcomes) == [0, 1]
    for outcome in outcomes.values():
        assert outcome.error_type == "RankMismatchError", outcome
        assert field in outcome.error, outcome.error


def _rank_peer_failure(rank, how, timeout_s):
    import os
    import time

    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = hr.parallelize(testing.build("sd3"), hr.HybridConfig(k=0, timeout_s=timeout_s))
    started = {}

    def callback(p, i, t, tensors):
        if i == 2 and rank == 1:
            if how == "exit":
                os._exit(3)
            time.sleep(4 * timeout_s)
        started.setdefault("t", time.monotonic())
        return tensors

    try:
        _call(pipe, 0, prompt="a dog", guidance_scale=5.0, callback_on_step_end=callback)
    except hr.PeerTimeoutError:
        started["waited"] = time.monotonic() - started["t"]
        raise RuntimeError(f"PeerTimeoutError after {started['waited']:.1f} s") from None


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_dead_or_hung_peer_raises_timeout_on_survivor(how):
    timeout_s = 3.0
    outcomes = run_ranks(_rank_peer_failure, how, timeout_s, timeout_s=120)
    assert 0 in outcomes, "the surviving rank hung instead of raising"
    survivor = outcomes[0]
    assert not survivor.ok and survivor.error.startswith("PeerTimeoutError after"), survivor
    waited = float(survivor.error.split("after ")[1].split(" s")[0])
    assert waited < timeout_s + 15, f"survivor needed {waited} s to notice"


def _rank_shared_denoiser(rank, seed):
    """Text-to-image and img2img pipelines sharing one SDXL U-Net (from_pipe), both
    parallelized, called in turn; then each per-branch serial reference."""
    import hybridiff_rt as hr
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from hybridiff_rt import testing

    hr.init_distributed()
    pipe = testing.build("sdxl", seed=seed)
    sibling = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    picture = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    cases = {"text": (pipe, dict(prompt="a fox", guidance_scale=5.0)),
             "image": (sibling, dict(prompt="a fox", guidance_scale=4.0, image=picture,
                                     strength=0.6))}
    wrappers = {name: hr.parallelize(p, hr.HybridConfig(k=0)) for name, (p, _) in cases.items()}
    out = {}
    for name in ("image", "text", "image"):
        out[name] = _call(wrappers[name], seed + 1, **cases[name][1])
        out[name + " modes"] = list(hr.last_report(wrappers[name]).modes)
    for wrapper in wrappers.values():
        wrapper.restore()
    undo = per_branch_forward(pipe.unet)
    for name, (p, kwargs) in cases.items():
        out[name + " reference"] = _call(p, seed + 1, **kwargs)
    undo()
    return out


def test_pipelines_sharing_a_denoiser_each_run_cbp_exactly():
    results = all_ok(run_ranks(_rank_shared_denoiser, random.randrange(1 << 16)))
    r0, r1 = results
    for name, modes in (("text", ["cbp"] * STEPS), ("image", ["cbp"] * 3)):  # 0.6 of 5 steps
        assert np.array_equal(r0[name], r1[name]), f"{name}: ranks differ"
        np.testing.assert_array_equal(r0[name], r0[name + " reference"], err_msg=name)
        assert r0[name + " modes"] == r1[name + " modes"] == modes
