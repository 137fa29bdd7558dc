"""U-Net pipelines the stage pipeline cannot serve run condition-based partitioning, with a note.

DeepFloyd IF and the Kandinsky 2.2 decoder build their ``UNet2DConditionModel`` from
``ResnetDownsampleBlock2D`` / ``SimpleCrossAttn*`` blocks; Stable Video Diffusion's
spatio-temporal U-Net has no stage adapter and is guided by a per-frame scale tensor; a U-Net
with a forward hook on its top module (the units would bypass the hook) is another case;
InstructPix2Pix, whose batch stacks three guidance branches, the last. On two CPU ranks, for
each:

* k=0: every step CBP, both ranks identical and equal bit for bit to the plain pipeline with its
  denoiser's batch computed in two halves (the per-branch reference);
* the default config (k=5) or a config that pipelines steps 3 and 4 of a stageable model: CBP
  throughout, a note naming why, and the output equal bit for bit to the k=0 output (the same
  CBP computation); the hook runs once per step on the whole batch;
* InstructPix2Pix (SD and SDXL) with one image (3 rows): refused at step 0 on both ranks,
  naming the even image count that works; with image_guidance_scale < 1 (guidance off) every
  rank runs each step whole, equal to the plain pipeline.
"""

from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import UNET_KIN_BUILDERS, all_ok, run_ranks

STEPS = 4
#: what the k > 0 note names: the block type the U-Net adapter refuses, or the missing adapter
CBP_ONLY_NOTES = {"deepfloyd-if": "ResnetDownsampleBlock2D",
                  "kandinsky2.2": "ResnetDownsampleBlock2D",
                  "stable-video-diffusion": "UNetSpatioTemporalConditionModel has no stage adapter",
                  "animatediff": "UNetMotionModel has no stage adapter"}
#: on a stageable model this pipelines steps 3 and 4 (slope_eps 0 never fires, tau_cap 2)
PIPELINED = {"window": 1, "slope_eps": 0.0, "k": 2, "tau_cap": 2}
STEPS_PIPELINED = 6
#: fp32, batch-2 calls vs one call per branch of a tiny random model, relative to the largest
#: magnitude of the plain result (as tests/test_dit_pipelines.py states it)
BATCH_TOLERANCE = 1e-4


def _images(out):
    x = out.frames if hasattr(out, "frames") else out.images
    return x.detach().float().numpy().copy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _run(pipe, kwargs, seed, steps, images=2):
    # video pipelines (Stable Video Diffusion, AnimateDiff) count videos, not images
    plain = getattr(pipe, "pipe", pipe)  # the pipeline a ParallelPipeline wraps
    videos = "num_videos_per_prompt" in inspect.signature(type(plain).__call__).parameters
    kwargs = dict(kwargs, **{"num_videos_per_prompt" if videos else "num_images_per_prompt": images})
    return _images(pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                        **kwargs))


def _parallel(pipe, cfg, run):
    import hybridiff_rt as hr

    runner = hr.parallelize(pipe, cfg)
    out = run(runner)
    report = hr.last_report(runner).to_dict()
    return out, report, runner.restore()


def _per_branch(pipe, run):
    """``run(pipe)`` with the denoiser computing each CFG branch as its own call (the exact
    serial reference)."""
    from hybridiff_rt.testing import denoiser, per_branch_forward

    undo = per_branch_forward(denoiser(pipe))
    try:
        return run(pipe)
    finally:
        undo()


def _rank_kin(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build, build_unet_kin

    hr.init_distributed()
    results = {}
    for name in UNET_KIN_BUILDERS:
        pipe, kwargs = build_unet_kin(name, seed=seed)
        cell = {}
        cell["k0"], cell["k0_report"], pipe = _parallel(
            pipe, hr.HybridConfig(k=0), lambda p: _run(p, kwargs, seed, STEPS))
        cell["default"], cell["default_report"], pipe = _parallel(
            pipe, hr.HybridConfig(), lambda p: _run(p, kwargs, seed, STEPS))
        cell["reference"] = _per_branch(pipe, lambda p: _run(p, kwargs, seed, STEPS))
        cell["plain"] = _run(pipe, kwargs, seed, STEPS)
        results[name] = cell

    # a forward hook on the U-Net's top module: CBP calls go through it, stages would not
    pipe = build("sd", seed=seed)
    rows = []
    pipe.unet.register_forward_hook(lambda module, args, output: rows.append(output[0].shape[0]))
    prompt = {"prompt": "a red fox", "negative_prompt": "blur", "guidance_scale": 4.0,
              "output_type": "latent"}
    cell = {}
    cell["k0"], _, pipe = _parallel(pipe, hr.HybridConfig(k=0),
                                    lambda p: _run(p, prompt, seed, STEPS_PIPELINED, images=1))
    del rows[:]
    cell["pipelined"], cell["pipelined_report"], pipe = _parallel(
        pipe, hr.HybridConfig(**PIPELINED),
        lambda p: _run(p, prompt, seed, STEPS_PIPELINED, images=1))
    cell["hook_rows"] = list(rows)
    results["hooked-sd"] = cell

    for xl in (False, True):
        results["instruct-pix2pix" + ("-xl" if xl else "")] = _pix2pix_cell(seed, xl)
    return results


def _pix2pix_cell(seed, xl):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import instruct_pix2pix

    pipe, kwargs = instruct_pix2pix(seed=seed, xl=xl)
    cell = {}
    cell["k0"], cell["k0_report"], pipe = _parallel(
        pipe, hr.HybridConfig(k=0), lambda p: _run(p, kwargs, seed, STEPS_PIPELINED))
    cell["pipelined"], cell["pipelined_report"], pipe = _parallel(
        pipe, hr.HybridConfig(**PIPELINED), lambda p: _run(p, kwargs, seed, STEPS_PIPELINED))
    cell["reference"] = _per_branch(pipe, lambda p: _run(p, kwargs, seed, STEPS_PIPELINED))
    runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
    try:
        _run(runner, kwargs, seed, STEPS_PIPELINED, images=1)
        cell["one_image"] = None
    except hr.UnsupportedModelError as exc:
        cell["one_image"] = (str(exc), hr.last_report(runner).to_dict()["modes"])
    pipe = runner.restore()
    # image_guidance_scale < 1 turns all guidance off: one branch, whole on every rank
    unguided = dict(kwargs, image_guidance_scale=0.5)
    cell["unguided"], cell["unguided_report"], pipe = _parallel(
        pipe, hr.HybridConfig(k=0), lambda p: _run(p, unguided, seed, STEPS_PIPELINED, images=1))
    cell["unguided_plain"] = _run(pipe, unguided, seed, STEPS_PIPELINED, images=1)
    return cell


@pytest.fixture(scope="module")
def ranks():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_kin, seed, timeout_s=600))


@pytest.mark.parametrize("name", list(UNET_KIN_BUILDERS))
def test_k0_equals_the_exact_serial_reference_on_both_ranks(ranks, name):
    seed, (r0, r1) = ranks
    a, b = r0[name], r1[name]
    assert np.array_equal(a["k0"], b["k0"]), f"{name}: the ranks differ (seed {seed})"
    assert np.isfinite(a["k0"]).all()
    np.testing.assert_array_equal(a["k0"], a["reference"], err_msg=f"{name} seed {seed}")
    # and the reference is the plain batch-2 pipeline up to batch-size rounding
    scale = float(np.abs(a["plain"]).max())
    assert float(np.abs(a["k0"] - a["plain"]).max()) <= BATCH_TOLERANCE * scale, name
    for report in (a["k0_report"], b["k0_report"]):
        assert report["modes"] == ["cbp"] * STEPS


@pytest.mark.parametrize("name", list(UNET_KIN_BUILDERS))
def test_the_default_config_runs_cbp_with_a_note_naming_why(ranks, name):
    seed, (r0, r1) = ranks
    for cell in (r0[name], r1[name]):
        report = cell["default_report"]
        assert report["config"]["k"] > 0
        assert report["modes"] == ["cbp"] * STEPS
        assert any("no pipelined steps in this run" in n and CBP_ONLY_NOTES[name] in n
                   for n in report["notes"]), report["notes"]
        np.testing.assert_array_equal(cell["default"], cell["k0"], err_msg=f"{name} seed {seed}")


def test_a_hooked_unet_runs_cbp_through_its_hook_with_a_note(ranks):
    seed, (r0, r1) = ranks
    a, b = r0["hooked-sd"], r1["hooked-sd"]
    for cell in (a, b):
        report = cell["pipelined_report"]
        assert report["modes"] == ["cbp"] * STEPS_PIPELINED
        assert any("no pipelined steps in this run" in n and "hook" in n
                   for n in report["notes"]), report["notes"]
        # the pipeline's one call per step reached the hook with the whole [uncond; cond] batch
        assert cell["hook_rows"] == [2] * STEPS_PIPELINED
        np.testing.assert_array_equal(cell["pipelined"], cell["k0"], err_msg=f"seed {seed}")
    assert np.array_equal(a["pipelined"], b["pipelined"])


@pytest.mark.parametrize("name", ["instruct-pix2pix", "instruct-pix2pix-xl"])
def test_instruct_pix2pix_splits_its_rows_exactly_and_refuses_an_odd_count(ranks, name):
    seed, (r0, r1) = ranks
    a, b = r0[name], r1[name]
    assert np.array_equal(a["k0"], b["k0"]) and np.array_equal(a["pipelined"], b["pipelined"])
    np.testing.assert_array_equal(a["k0"], a["reference"], err_msg=f"seed {seed}")
    for cell in (a, b):
        assert cell["k0_report"]["modes"] == ["cbp"] * STEPS_PIPELINED
        report = cell["pipelined_report"]
        assert report["modes"] == ["cbp"] * STEPS_PIPELINED
        assert any("no pipelined steps in this run" in n and "three guidance branches" in n
                   for n in report["notes"]), report["notes"]
        np.testing.assert_array_equal(cell["pipelined"], cell["k0"], err_msg=f"seed {seed}")
        assert cell["one_image"] is not None, "one image (3 rows) was not refused"
        message, modes = cell["one_image"]
        assert "3 rows" in message and "num_images_per_prompt=2" in message
        assert modes == []
        # guidance off by image_guidance_scale < 1: every rank runs the plain pipeline's steps
        assert cell["unguided_report"]["modes"] == ["serial"] * STEPS_PIPELINED
        np.testing.assert_array_equal(cell["unguided"], cell["unguided_plain"])


def _rank_animatediff_on_four(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_unet_kin

    hr.init_distributed()
    pipe, kwargs = build_unet_kin("animatediff", seed=seed)
    out, report, pipe = _parallel(pipe, hr.HybridConfig(k=0),
                                  lambda p: _run(p, kwargs, seed, STEPS))
    return out, report, _per_branch(pipe, lambda p: _run(p, kwargs, seed, STEPS))


def test_per_frame_conditioning_is_dealt_with_its_videos_on_four_ranks():
    """Image pairs on 4 ranks: each pair computes one of the two videos, so each rank takes that
    video's 2 frames x 1 rows of the per-frame prompt embeddings."""
    seed = random.randrange(1 << 16)
    results = all_ok(run_ranks(_rank_animatediff_on_four, seed, world_size=4, timeout_s=300),
                     world_size=4)
    out, report, reference = results[0]
    assert report["layout"]["layout"] == "pairs" and report["modes"] == ["cbp"] * STEPS
    for other, _, _ in results[1:]:
        assert np.array_equal(out, other), f"the ranks differ (seed {seed})"
    # one video per call here, two per branch call in the reference: batch-size rounding only
    scale = float(np.abs(reference).max())
    assert float(np.abs(out - reference).max()) <= BATCH_TOLERANCE * scale, f"seed {seed}"
