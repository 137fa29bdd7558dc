"""DiT and video pipelines on two CPU ranks: batched CFG without a class list, two-call CFG, and
the generic DiT stage adapter.

One spawn of two ranks runs, for every tiny pipeline of hybridiff_rt.testing.dit_pipelines
(PixArt-Sigma, Sana with and without a ControlNet, AuraFlow, HunyuanDiT, HiDream-I1,
CogVideoX, LTX-Video, Mochi, Allegro, Latte (CBP only), CogView3-Plus: batched [uncond; cond];
Lumina-Next: batched [cond; uncond]; Wan 2.1, Wan 2.2 with two experts, Wan image-to-video, Lumina2
(with CFG truncation), Qwen-Image, Flux true CFG, CogView4 with and without a control image,
Chroma, Flux and Chroma with an IP-Adapter (their loops write the negative image embeddings into a
dict both calls share, between the calls), Flux and Qwen-Image with a ControlNet (run once per
step, its residuals added between the blocks of both calls; Qwen-Image's also for inpainting), and
Flux Kontext, Qwen-Image-Edit and Flux 2 Klein (their loops slice the cond call's result before the
uncond call), Cosmos 1.0 text-to-world, Cosmos 2 text-to-image and video-to-world and Cosmos 2.5
text-to-world (their loops turn the cond call's result into an x0 estimate, or mask it, before the
uncond call), HunyuanImage (guided through the guider its loop picks per call: the OCR guider,
adaptive projected mix guidance, for text to render, else CFG) and its refiner, and Motif-Video
text- and image-to-video (guided through a ClassifierFreeGuidance guider; the loop clones the
cond call's result before the uncond call): two calls per step):

* k=0: both ranks identical; every guided step a CBP step (Lumina2's truncated steps: one
  call, whole on every rank); equal bit for bit to the exact serial
  reference: for batched pipelines the plain pipeline with its denoiser called once per branch,
  for two-call pipelines the plain pipeline itself (it already calls once per branch, so the
  two-call protocol must change nothing at all); batched pipelines also within BATCH_TOLERANCE
  (relative to the largest magnitude) of the ordinary batch-2 pipeline;
* k>0 for the families with a DiT stage adapter (PixArt-Sigma, Sana, CogVideoX, LTX-Video, Mochi,
  Allegro, CogView3-Plus, Lumina-Next (its halves swapped into the runtime's roles), AuraFlow,
  HunyuanDiT with its long skip connections, HiDream-I1 with its Llama layers appended around each
  block, Wan 2.1 T2V and I2V, Wan 2.2 with two experts,
  Lumina2, Qwen-Image, Flux and Chroma with and without an IP-Adapter, Flux and Qwen-Image with a
  ControlNet, CogView4 with and without a control image):
  the modes follow the schedule and the output equals, bit for bit, a one-process emulation of
  the same schedule (per-branch calls on CBP steps, the staged model on the stale boundary on
  pipelined steps; Wan 2.2: the expert the pipeline called);
* Wan 2.2 with its expert switch inside the pipelined phase: the phase starts over with a fill
  step at the switch, equal to the emulation; on four ranks likewise, in both layouts;
* the img2img pipelines of Chroma, Flux and Qwen-Image, the inpainting pipelines of Flux,
  Qwen-Image, Flux Kontext, Qwen-Image-Edit and Flux 2 Klein (the last three slicing the cond
  call's result before the uncond call), and WanVideoToVideoPipeline (from an image or a video,
  strength 0.6):
  k=0 equal to the plain pipeline bit for bit on the steps they run, and the input matters; k=2
  over the steps the strength leaves, equal to the emulation;
* ChromaImg2ImgPipeline and a ChromaPipeline made from it with from_pipe (one transformer), both
  parallelized and called in turn: each equal to its plain pipeline bit for bit;
* Flux without true CFG: one call per step, run whole on every rank, equal to the plain pipeline;
* Flux Kontext with a denoiser that predicts only the noisy half of its sample's tokens: the
  loop's early slice is replayed on that prediction, equal to the plain pipeline bit for bit;
* a denoiser that returns a second output is refused at step 0 on both ranks.
"""

from __future__ import annotations

import functools
import inspect
import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import DIT_BUILDERS, DIT_INFO, all_ok, run_ranks

STEPS_K0 = 3
STEPS_PIPELINED = 6
#: slope_eps 0 never fires: tau1 = tau_cap = 2, pipelined steps 3 and 4, CBP again at step 5
PIPELINED = {"window": 1, "slope_eps": 0.0, "k": 2, "tau_cap": 2}
WITH_ADAPTER = {"pixart-sigma": "reuse", "sana": "off", "auraflow": "reuse", "hunyuan-dit": "off",
                "wan2.1": "reuse", "wan2.1-i2v": "off", "lumina2": "reuse", "qwen-image": "reuse",
                "flux-true-cfg": "off", "cogview4": "reuse", "cogview4-control": "off",
                "chroma": "off", "flux-ip-adapter": "reuse", "chroma-ip-adapter": "reuse",
                "wan2.2": "reuse", "skyreels-v2": "off",
                "ovis-image": "reuse", "krea2": "reuse", "nucleus-moe": "off",
                "wan2.1-i2v-clip": "reuse", "skyreels-v2-i2v": "off", "flux-kontext": "reuse",
                "qwen-image-edit": "off", "qwen-image-edit-plus": "reuse", "flux2-klein": "off",
                "flux-controlnet": "reuse", "qwen-image-controlnet": "off",
                "sana-controlnet": "reuse", "qwen-image-controlnet-inpaint": "reuse",
                "cogvideox": "off", "ltx-video": "reuse", "mochi": "off", "allegro": "reuse",
                "cogview3-plus": "off", "lumina-next": "reuse", "lucy-edit": "off",
                "hunyuan-video": "reuse", "hunyuan-video15": "off",
                "chronoedit": "reuse", "wan-vace": "off", "kandinsky5-t2v": "reuse",
                "hunyuan-video-i2v": "off", "hunyuan-video-i2v-token-replace": "reuse",
                "hunyuan-skyreels-i2v": "off", "kandinsky5-i2v": "off",
                "hunyuan-video15-i2v": "reuse", "cosmos-t2w": "off", "cosmos2-t2i": "reuse",
                "cosmos2-v2w": "off", "motif-video": "reuse", "motif-video-i2v": "off",
                "cosmos2.5-t2w": "reuse", "hunyuan-image": "off",
                "hunyuan-image-refiner": "reuse", "hidream": "off"}
#: call arguments of the pipelined runs: Lumina2 without CFG truncation, so that the pipelined
#: steps are guided (its truncated steps run whole on every rank, as in the k=0 runs)
PIPELINED_CALL = {"lumina2": {"cfg_trunc_ratio": 1.0}}
#: call arguments that switch guidance off where the pipeline's own rule reads them (not a
#: property the pipeline sets): one denoiser call per step, run whole on every rank
UNGUIDED_CALL = {"flux-true-cfg": {"true_cfg_scale": 1.0}, "flux-kontext": {"true_cfg_scale": 1.0},
                 "ovis-image": {"guidance_scale": 1.0},
                 "krea2": {"guidance_scale": 0.0}, "nucleus-moe": {"guidance_scale": 1.0},
                 "flux2-klein": {"guidance_scale": 1.0}, "hunyuan-video": {"true_cfg_scale": 1.0},
                 "kandinsky5-t2v": {"guidance_scale": 1.0}, "cosmos2-t2i": {"guidance_scale": 1.0}}
#: ChronoEdit with temporal reasoning: 9 frames (3 latent frames), of which the loop keeps the
#: first and the last from step 4 on (latents[:, :, [0, -1]]), inside the pipelined steps 3, 4
TEMPORAL_REASONING = {"num_frames": 9, "enable_temporal_reasoning": True,
                      "num_temporal_reasoning_steps": 4}
#: Guiders of the guider pipeline (HunyuanVideo 1.5: class, settings) and the modes of its
#: STEPS_K0 = 3 steps: start 0.34 skips step 0 (int(0.34 * 3) = 1), disabled skips all; adaptive
#: projected guidance with momentum (its state carried across steps) guides every step
GUIDER_VARIANTS = {
    "guider-late-start": ("ClassifierFreeGuidance", {"guidance_scale": 6.0, "start": 0.34}),
    "guider-disabled": ("ClassifierFreeGuidance", {"guidance_scale": 6.0, "enabled": False}),
    "guider-apg": ("AdaptiveProjectedGuidance",
                   {"guidance_scale": 6.0, "adaptive_projected_guidance_momentum": -0.5,
                    "eta": 0.5})}
GUIDER_MODES = {"guider-late-start": ["serial", "cbp", "cbp"], "guider-disabled": ["serial"] * 3,
                "guider-apg": ["cbp"] * 3}
#: Motif-Video with that adaptive projected guidance, pipelined (equal to the emulation)
APG_PIPELINED = "motif-video-apg"
#: HunyuanImage picks its guider per call: without text to render (zero ByT5 embeddings) its
#: ``guider``, not the OCR one; without either guider, none (one call per step)
HUNYUAN_IMAGE_VARIANTS = {"hunyuan-image-no-glyphs": ["cbp"] * 3,
                          "hunyuan-image-unguided": ["serial"] * 3}
#: the two-call loops that compute on the cond call's result before the uncond call, and one
#: operation each applies to it (read off their source)
COMPUTES_EARLY = {"cosmos2-t2i": "float", "cosmos2-v2w": "float", "cosmos2.5-t2w": "mul",
                  "motif-video": "clone", "motif-video-i2v": "clone",
                  "flux-kontext": "__getitem__", "qwen-image-edit": "__getitem__",
                  "qwen-image-edit-plus": "__getitem__", "flux2-klein": "__getitem__"}
#: fp32, batch-2 calls vs two batch-1 calls over a few steps of a tiny random model: the largest
#: difference relative to the largest magnitude of the plain result (random models drive the
#: latents to magnitudes of hundreds; measured: 3e-7 of that for Sana, up to 2.3e-5 for the
#: 6-block HunyuanDiT over 8 seeds, whose DDPM scheduler clips the sample to [-1, 1])
BATCH_TOLERANCE = 1e-4


def _latents(out):
    # video pipelines return frames; Kandinsky 5's text-to-image pipeline names its field image
    x = next(getattr(out, name) for name in ("frames", "images", "image") if hasattr(out, name))
    return x.detach().float().numpy().copy()


def _call(pipe, name, kwargs, steps, seed, **extra):
    torch.manual_seed(seed)  # CogView4Control's VAE samples its control latents from it
    call = dict(kwargs, num_inference_steps=steps, output_type="latent",
                **DIT_INFO[name].guidance_kwargs)
    call.update(extra)
    return _latents(pipe(generator=torch.Generator().manual_seed(seed), **call))


def emulate(pipe, name, kwargs, tau1, tau2, cuts, policy, seed, steps=STEPS_PIPELINED):
    """One process: the same schedule as a hybrid run whose stage chain is cut at ``cuts`` (the
    report's plan: two stages on two ranks, one per rank in the layer-wise layout). CBP steps =
    per-branch calls; steps tau1+1..tau2 = the staged cond model, the fill step fresh (its stages
    in sequence), later steps with stage j on the boundary stage j-1 made one step earlier.
    With two experts (Wan 2.2) each step runs the expert the pipeline called, and a pipelined
    step whose expert differs from the previous step's is a fill step too."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    import hybridiff_rt as hr
    from hybridiff_rt.engine.batch import join_cfg_batch
    from hybridiff_rt.engine.branch_layout import batch_axes, split_branch_kwargs
    from hybridiff_rt.stages.base import prediction_of

    memory = {"step": 0, "stale": None, "difference": None, "cond": None, "expert": None}

    def pipelined_cond(staged, cond_kw, step):
        ctx = staged.prepare(**cond_kw)
        fill = step == tau1 + 1 or memory["expert"] is not staged
        fresh = []
        for j in range(len(cuts) - 1):
            source = (ctx.initial_state if j == 0 else
                      fresh[j - 1] if fill else memory["stale"][j - 1])
            fresh.append(staged.run(source, ctx, cuts[j], cuts[j + 1]))
        memory["stale"], memory["expert"] = fresh, staged
        return staged.finish(fresh[-1], ctx)

    def synth_uncond(cond):
        return cond - memory["difference"] if policy == "reuse" else cond

    def emulated_forward(model):
        staged = hr.stage_denoiser(model)
        original = model.forward
        signature = inspect.signature(original)

        def batched(*args, **kw_in):
            kw = dict(signature.bind(*args, **kw_in).arguments)
            kw.pop("return_dict", None)
            step = memory["step"]
            memory["step"] += 1
            # HiDream's stacked Llama states are split along their own batch axis
            uncond_kw, cond_kw = split_branch_kwargs(kw, kw["hidden_states"].shape[0],
                                                     axes=batch_axes(model))
            if DIT_INFO[name].cond_first:
                uncond_kw, cond_kw = cond_kw, uncond_kw
            if tau1 < step <= tau2:
                cond = pipelined_cond(staged, cond_kw, step)
                uncond = synth_uncond(cond)
            else:
                uncond = prediction_of(original(**uncond_kw, return_dict=False))
                cond = prediction_of(original(**cond_kw, return_dict=False))
                memory["difference"] = cond - uncond
            if DIT_INFO[name].cond_first:
                return (join_cfg_batch(cond, uncond),)
            return (join_cfg_batch(uncond, cond),)

        def two_call(*args, **kw_in):  # cond call first, then the uncond call of the same step
            kw = dict(signature.bind(*args, **kw_in).arguments)
            # Kandinsky 5 asks for its model's output class
            wrap = ((lambda p: Transformer2DModelOutput(sample=p)) if kw.pop("return_dict", True)
                    else (lambda p: (p,)))
            step = memory["step"]
            if memory["cond"] is None:  # the cond call
                if tau1 < step <= tau2:
                    memory["cond"] = pipelined_cond(staged, kw, step)
                else:
                    memory["cond"] = prediction_of(original(**kw, return_dict=False))
                return wrap(memory["cond"])
            cond, memory["cond"] = memory["cond"], None
            memory["step"] += 1
            if tau1 < step <= tau2:
                return wrap(synth_uncond(cond))
            uncond = prediction_of(original(**kw, return_dict=False))
            memory["difference"] = cond - uncond
            return wrap(uncond)

        return batched if DIT_INFO[name].guidance == "batched" else two_call

    models = [getattr(pipe, attr) for attr in DIT_INFO[name].experts]
    for model in models:
        model.forward = emulated_forward(model)
    try:
        return _call(pipe, name, kwargs, steps, seed, **PIPELINED_CALL.get(name, {}))
    finally:
        for model in models:
            del model.forward


def _rank_dit(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_dit, per_branch_forward

    hr.init_distributed()
    results = {}
    for name in DIT_BUILDERS:
        info = DIT_INFO[name]
        pipe, kwargs = build_dit(name, seed=seed)
        cell = {}
        runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
        called = []
        hooks = [getattr(pipe, attr).register_forward_pre_hook(
            lambda module, args, kw, attr=attr, called=called: called.append(attr),
            with_kwargs=True)
            for attr in info.experts]
        cell["k0"] = _call(runner, name, kwargs, STEPS_K0, seed)
        cell["experts_called"] = called
        for hook in hooks:
            hook.remove()
        cell["k0_report"] = hr.last_report(runner).to_dict()
        pipe = runner.restore()
        if rank == 0:
            cell["plain"] = _call(pipe, name, kwargs, STEPS_K0, seed)
            if info.guidance == "batched":
                undo = per_branch_forward(pipe.transformer)
                try:
                    cell["reference"] = _call(pipe, name, kwargs, STEPS_K0, seed)
                finally:
                    undo()
        if name in WITH_ADAPTER:
            policy = WITH_ADAPTER[name]
            runner = hr.parallelize(pipe, hr.HybridConfig(**PIPELINED, pipeline_guidance=policy))
            cell["k2"] = _call(runner, name, kwargs, STEPS_PIPELINED, seed,
                               **PIPELINED_CALL.get(name, {}))
            report = hr.last_report(runner).to_dict()
            cell["k2_report"] = report
            pipe = runner.restore()
            if rank == 0:
                cuts = report["extra"]["pipeline"]["plan"]["cuts"]
                cell["emulated"] = emulate(pipe, name, kwargs, report["tau1"], report["tau2"],
                                           cuts, policy, seed)
        if name in UNGUIDED_CALL:  # unguided: one call per step, whole on every rank
            runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
            cell["unguided"] = _call(runner, name, kwargs, STEPS_K0, seed, **UNGUIDED_CALL[name])
            cell["unguided_report"] = hr.last_report(runner).to_dict()
            pipe = runner.restore()
            if rank == 0:
                cell["unguided_plain"] = _call(pipe, name, kwargs, STEPS_K0, seed,
                                               **UNGUIDED_CALL[name])
        results[name] = cell
    # a guider that makes one batch at some steps (a late start) or at all (disabled): those
    # steps make one call, which every rank runs whole; and adaptive projected guidance
    import diffusers.guiders
    from diffusers import ClassifierFreeGuidance

    for key, (guider, settings) in GUIDER_VARIANTS.items():
        pipe, kwargs = build_dit("hunyuan-video15", seed=seed)
        pipe.guider = getattr(diffusers.guiders, guider)(**settings)
        runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
        got = _call(runner, "hunyuan-video15", kwargs, STEPS_K0, seed)
        modes = list(hr.last_report(runner).modes)
        pipe = runner.restore()
        results[key] = (got, _call(pipe, "hunyuan-video15", kwargs, STEPS_K0, seed), modes)
    # HunyuanImage without glyphs (its loop picks ``guider``) or without guiders (none)
    for key in HUNYUAN_IMAGE_VARIANTS:
        pipe, kwargs = build_dit("hunyuan-image", seed=seed)
        if key == "hunyuan-image-no-glyphs":
            kwargs = dict(kwargs, **{name: torch.zeros_like(kwargs[name]) for name in
                                     ("prompt_embeds_2", "negative_prompt_embeds_2")})
        else:
            pipe.guider = pipe.ocr_guider = None
        runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
        got = _call(runner, "hunyuan-image", kwargs, STEPS_K0, seed)
        modes = list(hr.last_report(runner).modes)
        pipe = runner.restore()
        results[key] = (got, _call(pipe, "hunyuan-image", kwargs, STEPS_K0, seed), modes)
    # adaptive projected guidance, pipelined: the guider combines what the steps return
    pipe, kwargs = build_dit("motif-video", seed=seed)
    pipe.guider = diffusers.guiders.AdaptiveProjectedGuidance(**GUIDER_VARIANTS["guider-apg"][1])
    runner = hr.parallelize(pipe, hr.HybridConfig(**PIPELINED, pipeline_guidance="reuse"))
    cell = {"k2": _call(runner, "motif-video", kwargs, STEPS_PIPELINED, seed)}
    cell["k2_report"] = report = hr.last_report(runner).to_dict()
    pipe = runner.restore()
    if rank == 0:
        cell["emulated"] = emulate(pipe, "motif-video", kwargs, report["tau1"], report["tau2"],
                                   report["extra"]["pipeline"]["plan"]["cuts"], "reuse", seed)
        pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0)  # another combination
        cell["cfg"] = _call(pipe, "motif-video", kwargs, STEPS_PIPELINED, seed)
    results[APG_PIPELINED] = cell
    # the guider stops guiding at step 4 of 6, inside the pipelined steps 3 and 4: the phase
    # ends before step 4, which runs whole, as does step 5
    pipe, kwargs = build_dit("hunyuan-video15", seed=seed)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=6.0, stop=0.67)
    runner = hr.parallelize(pipe, hr.HybridConfig(**PIPELINED))
    got = _call(runner, "hunyuan-video15", kwargs, STEPS_PIPELINED, seed)
    results["guider-stops-in-phase"] = (got, hr.last_report(runner).to_dict())
    runner.restore()
    # ChronoEdit's temporal reasoning keeps 2 of its 3 latent frames from step 4 on: CBP stays
    # exact; the pipelined phase (steps 3 and 4) ends at the change, the rest runs CBP
    pipe, kwargs = build_dit("chronoedit", seed=seed)
    kwargs = dict(kwargs, **TEMPORAL_REASONING)
    cell = {}
    for key, config in (("k0", {"k": 0}), ("k2", dict(PIPELINED, pipeline_guidance="reuse"))):
        runner = hr.parallelize(pipe, hr.HybridConfig(**config))
        cell[key] = _call(runner, "chronoedit", kwargs, STEPS_PIPELINED, seed)
        cell[key + "_report"] = report = hr.last_report(runner).to_dict()
        pipe = runner.restore()
    if rank == 0:
        cell["plain"] = _call(pipe, "chronoedit", kwargs, STEPS_PIPELINED, seed)
        cell["emulated"] = emulate(pipe, "chronoedit", kwargs, report["tau1"], report["tau2"],
                                   report["extra"]["pipeline"]["plan"]["cuts"], "reuse", seed)
    results["chronoedit-reasoning"] = cell
    # a denoiser with a second output cannot be split: refused at step 0 on every rank
    torch.manual_seed(seed)
    den = hr.HybridDenoiser(TwoOutputs(), hr.HybridConfig(k=0))
    x = torch.randn(1, 4, generator=torch.Generator().manual_seed(seed))
    try:
        den(x, None, cond={}, uncond={}, guidance_scale=3.0, step=0, num_steps=2)
        results["refusal"] = None
    except hr.UnsupportedModelError as exc:
        results["refusal"] = (str(exc), list(den.report.modes))
    den.close()
    # Kontext's loop slices the first call's result before the second call (recorded on the
    # deferred prediction, whose stand-in has the sample's 128 tokens): a denoiser predicting
    # only the 64 noisy tokens gets the loop's slice of what it predicts, as in the plain loop
    pipe, kwargs = build_dit("flux-kontext", seed=seed)
    pipe.transformer.forward = _noisy_tokens_only(pipe.transformer.forward)
    runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
    got = _call(runner, "flux-kontext", kwargs, STEPS_K0, seed)
    modes = list(hr.last_report(runner).modes)
    pipe = runner.restore()
    results["other shape"] = (got, modes, _call(pipe, "flux-kontext", kwargs, STEPS_K0, seed))
    return results


def _noisy_tokens_only(forward):
    """``forward`` predicting only the first half of the tokens it is given (Kontext's noisy
    tokens, without the reference image's)."""
    @functools.wraps(forward)
    def cropped(*args, **kwargs):
        out = forward(*args, **kwargs)
        return (out[0][:, :out[0].shape[1] // 2],) + tuple(out[1:])
    return cropped


class TwoOutputs(torch.nn.Module):
    """A diffusers-style denoiser that also returns an auxiliary tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep=None, return_dict=True):
        out = self.proj(hidden_states)
        return out, out.mean(dim=-1)


@pytest.fixture(scope="module")
def ranks():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_dit, seed, timeout_s=600))


def expected_k0_modes(name):
    """CBP on every guided step; Lumina2's truncated steps ((i + 1) / T > cfg_trunc_ratio) make
    one cond call, run whole on every rank ("serial")."""
    ratio = DIT_INFO[name].guidance_kwargs.get("cfg_trunc_ratio")
    return ["serial" if ratio is not None and (i + 1) / STEPS_K0 > ratio else "cbp"
            for i in range(STEPS_K0)]


@pytest.mark.parametrize("name", list(DIT_BUILDERS))
def test_k0_equals_the_exact_serial_reference_on_both_ranks(ranks, name):
    seed, (r0, r1) = ranks
    a, b = r0[name], r1[name]
    assert np.array_equal(a["k0"], b["k0"]), f"{name}: the ranks differ (seed {seed})"
    assert np.isfinite(a["k0"]).all()
    modes = expected_k0_modes(name)
    for report in (a["k0_report"], b["k0_report"]):
        assert report["modes"] == modes and report["num_steps"] == STEPS_K0
        assert all(m is not None and m > 0
                   for m, mode in zip(report["rel_mae"], modes) if mode == "cbp")
    assert a["k0_report"]["rel_mae"] == b["k0_report"]["rel_mae"]
    two_call = DIT_INFO[name].guidance == "two-call"
    assert len(a["experts_called"]) == sum(2 if two_call and m == "cbp" else 1 for m in modes)
    assert set(a["experts_called"]) == set(DIT_INFO[name].experts)  # Wan 2.2: both experts ran
    if DIT_INFO[name].guidance == "two-call":
        np.testing.assert_array_equal(a["k0"], a["plain"], err_msg=f"{name} seed {seed}")
        assert any(n.startswith("two-call CFG: " + DIT_INFO[name].pipeline_class)
                   for n in a["k0_report"]["notes"]), a["k0_report"]["notes"]
    else:
        np.testing.assert_array_equal(a["k0"], a["reference"], err_msg=f"{name} seed {seed}")
        scale = float(np.abs(a["plain"]).max())
        assert float(np.abs(a["k0"] - a["plain"]).max()) <= BATCH_TOLERANCE * scale


def test_the_report_names_what_a_loop_computed_before_its_second_call(ranks):
    """The loops that compute on the cond call's result before the uncond call (slices, x0
    estimates, masks, clones) get one report note naming those operations, replayed at the
    second call; no other loop gets one (it computes nothing on the deferred prediction)."""
    seed, (r0, _) = ranks
    for name in DIT_BUILDERS:
        notes = [n for n in r0[name]["k0_report"]["notes"] if "recorded and replayed" in n]
        if name not in COMPUTES_EARLY:
            assert not notes, (name, notes)
            continue
        assert len(notes) == 1, (name, r0[name]["k0_report"]["notes"])
        operations = notes[0].split("before its second call (")[1].split(")")[0].split(", ")
        assert COMPUTES_EARLY[name] in operations, (name, notes)


@pytest.mark.parametrize("name", list(WITH_ADAPTER))
def test_pipelined_steps_match_a_one_process_emulation(ranks, name):
    seed, (r0, r1) = ranks
    a, b = r0[name], r1[name]
    assert np.array_equal(a["k2"], b["k2"]), f"{name}: the ranks differ"
    report = a["k2_report"]
    tau1 = PIPELINED["tau_cap"]
    assert (report["tau1"], report["tau2"]) == (tau1, tau1 + PIPELINED["k"])
    assert report["modes"] == ["pipeline" if tau1 < i <= tau1 + PIPELINED["k"] else "cbp"
                               for i in range(STEPS_PIPELINED)]
    assert report["extra"]["pipeline"]["unit_names"][0].endswith(".0")
    np.testing.assert_array_equal(a["k2"], a["emulated"], err_msg=f"{name} seed {seed}")


#: Wan 2.2 with its expert switch inside the pipelined phase: 8 steps (timesteps 999, 954, 900,
#: 833, 750, 643, 500, 301), boundary_ratio 0.8 (t >= 800 on transformer), pipelined steps 3, 4, 5:
#: step 3 runs transformer (fill), step 4 transformer_2 (fill again), step 5 on step 4's boundary
WAN22_SWITCH_STEPS = 8
WAN22_SWITCH = {"window": 1, "slope_eps": 0.0, "k": 3, "tau_cap": 2, "pipeline_guidance": "reuse"}


def _rank_wan22_switch(rank, seed, layouts, size):
    """One Wan 2.2 run per ``scale_out`` layout on this rank: ``[(latents, report), ...]``, and
    on rank 0 the one-process emulation of each run's schedule and cut, plus the timesteps."""
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_dit

    hr.init_distributed()
    pipe, kwargs = build_dit("wan2.2", seed=seed, size=size)
    pipe.register_to_config(boundary_ratio=0.8)
    runs, emulated = [], []
    for layout in layouts:
        runner = hr.parallelize(pipe, hr.HybridConfig(**WAN22_SWITCH, scale_out=layout))
        runs.append((_call(runner, "wan2.2", kwargs, WAN22_SWITCH_STEPS, seed),
                     hr.last_report(runner).to_dict()))
        pipe = runner.restore()
    if rank == 0:
        for _, report in runs:
            emulated.append(emulate(pipe, "wan2.2", kwargs, report["tau1"], report["tau2"],
                                    report["extra"]["pipeline"]["plan"]["cuts"],
                                    WAN22_SWITCH["pipeline_guidance"], seed,
                                    steps=WAN22_SWITCH_STEPS))
    return runs, emulated, [int(t) for t in pipe.scheduler.timesteps]


def _check_wan22_switch(results, layouts, stages, seed):
    """Every rank returns the same latents and modes, the phase restarts once at step 4 (one
    fill step per expert), and each layout's run equals the emulation of its cut."""
    runs0, emulated, timesteps = results[0]
    assert timesteps[3] >= 0.8 * 1000 > timesteps[4], timesteps  # the premise: experts change at 4
    for i, layout in enumerate(layouts):
        for runs, _, _ in results:
            out, report = runs[i]
            assert np.array_equal(out, runs0[i][0]), f"{layout}: the ranks differ (seed {seed})"
            assert report["modes"] == ["cbp"] * 3 + ["pipeline"] * 3 + ["cbp"] * 2
            restarts = [n for n in report["notes"] if "started over with a fill step" in n]
            assert len(restarts) == 1 and restarts[0].startswith("pipelined step 4 "), \
                report["notes"]
        cuts = runs0[i][1]["extra"]["pipeline"]["plan"]["cuts"]
        assert len(cuts) == stages[i] + 1, (layout, cuts)
        np.testing.assert_array_equal(runs0[i][0], emulated[i], err_msg=f"{layout} seed {seed}")


def test_wan22_pipelined_phase_starts_over_when_the_expert_changes():
    seed = random.randrange(1 << 16)
    results = all_ok(run_ranks(_rank_wan22_switch, seed, ("auto",), "tiny", timeout_s=300))
    _check_wan22_switch(results, ("auto",), (2,), seed)


def test_wan22_on_four_ranks_pipelines_each_expert_in_both_layouts():
    """On 2N > 2 ranks the pair's (or the world's) stage chain is set up again for the other
    expert: one image pipelines over pair 0 (two stages; pair 1 idles) or over the four ranks
    (layer-wise, one stage each: the small 6-block transformer)."""
    seed = random.randrange(1 << 16)
    layouts = ("pairs", "layers")
    results = all_ok(run_ranks(_rank_wan22_switch, seed, layouts, "small", world_size=4,
                               timeout_s=420), 4)
    _check_wan22_switch(results, layouts, (2, 4), seed)
    for runs, _, _ in results:
        assert [report["layout"]["layout"] for _, report in runs] == list(layouts)


@pytest.mark.parametrize("name", list(UNGUIDED_CALL))
def test_unguided_calls_run_whole_on_every_rank(ranks, name):
    """Flux and Flux Kontext without true CFG, Ovis-Image, Nucleus-MoE-Image and Flux 2 Klein
    at guidance_scale 1, Krea 2 at guidance_scale 0 (its distilled checkpoints): one call per
    step."""
    _, (r0, r1) = ranks
    a, b = r0[name], r1[name]
    assert np.array_equal(a["unguided"], b["unguided"])
    np.testing.assert_array_equal(a["unguided"], a["unguided_plain"])
    assert a["unguided_report"]["modes"] == ["serial"] * STEPS_K0
    assert not np.array_equal(a["unguided"], a["k0"])  # guidance changed the result


@pytest.mark.parametrize("key", list(GUIDER_VARIANTS))
def test_guider_steps_with_one_batch_run_whole_on_every_rank(ranks, key):
    """HunyuanVideo 1.5's guider decides per step whether the step makes one or two calls: the
    steps it leaves unguided (before its ``start``; all, when disabled) run whole on every rank,
    the others CBP, and the output equals the plain pipeline bit for bit; likewise with adaptive
    projected guidance (momentum carried across steps)."""
    _check_variant(ranks, key, GUIDER_MODES[key], "hunyuan-video15")


@pytest.mark.parametrize("key", list(HUNYUAN_IMAGE_VARIANTS))
def test_hunyuan_image_guides_with_the_guider_its_loop_picks(ranks, key):
    """HunyuanImage's loop picks ``ocr_guider`` (adaptive projected mix guidance) for a prompt
    with text to render, else ``guider`` (CFG), else none: the run follows the pick (CBP, or one
    call per step run whole on every rank) and equals the plain pipeline bit for bit; without
    glyphs the output differs from the OCR-guided run (the other guider, the other text)."""
    _check_variant(ranks, key, HUNYUAN_IMAGE_VARIANTS[key], "hunyuan-image")


def _check_variant(ranks, key, expected_modes, base):
    """Variant ``key`` of pipeline ``base``: equal on both ranks and to its plain pipeline bit
    for bit, in ``expected_modes``, and unlike the k=0 run of ``base`` as built."""
    seed, (r0, r1) = ranks
    assert np.array_equal(r0[key][0], r1[key][0])
    for got, plain, modes in (r0[key], r1[key]):
        np.testing.assert_array_equal(got, plain, err_msg=f"{key} seed {seed}")
        assert modes == expected_modes
    assert not np.array_equal(r0[key][0], r0[base]["k0"])


def test_adaptive_projected_guidance_pipelined_equals_the_emulation(ranks):
    """Motif-Video guided by AdaptiveProjectedGuidance with momentum (state the guider carries
    across steps, fed by both predictions): pipelined steps 3 and 4 equal the one-process
    emulation bit for bit on both ranks, and the guider matters (CFG at the same scale differs)."""
    seed, (r0, r1) = ranks
    a, b = r0[APG_PIPELINED], r1[APG_PIPELINED]
    assert np.array_equal(a["k2"], b["k2"]) and np.isfinite(a["k2"]).all()
    assert a["k2_report"]["modes"] == ["cbp"] * 3 + ["pipeline"] * 2 + ["cbp"]
    np.testing.assert_array_equal(a["k2"], a["emulated"], err_msg=f"seed {seed}")
    assert not np.array_equal(a["emulated"], a["cfg"])


def test_an_unguided_step_inside_the_pipelined_phase_ends_the_phase(ranks):
    """HunyuanVideo 1.5's guider stops at step 4 of 6, inside the pipelined steps 3 and 4: step 4
    makes one call, run whole on every rank, and the phase ends before it (tau2 = 3, a note)."""
    seed, (r0, r1) = ranks
    (a, report), (b, other) = r0["guider-stops-in-phase"], r1["guider-stops-in-phase"]
    assert np.array_equal(a, b) and np.isfinite(a).all(), f"seed {seed}"
    for rep in (report, other):
        assert rep["modes"] == ["cbp", "cbp", "cbp", "pipeline", "serial", "serial"]
        assert (rep["tau1"], rep["tau2"]) == (2, 3)
        assert any(n.startswith("step 4 makes one (unguided) denoiser call") and
                   "the pipelined phase ended before it" in n for n in rep["notes"]), rep["notes"]


def test_a_sample_that_changes_shape_inside_the_pipelined_phase_ends_the_phase(ranks):
    """ChronoEdit with temporal reasoning: CBP equals the plain pipeline bit for bit across the
    change; pipelined, the stale activations of step 3 do not fit step 4's sample, so the phase
    ends there (tau2 = 3, a note) and the result equals the emulation of that schedule."""
    seed, (r0, r1) = ranks
    a, b = r0["chronoedit-reasoning"], r1["chronoedit-reasoning"]
    for key in ("k0", "k2"):
        assert np.array_equal(a[key], b[key]), key
        assert a[key + "_report"]["modes"] == b[key + "_report"]["modes"]
    np.testing.assert_array_equal(a["k0"], a["plain"], err_msg=f"seed {seed}")
    assert a["k0_report"]["modes"] == ["cbp"] * STEPS_PIPELINED
    report = a["k2_report"]
    assert report["modes"] == ["cbp", "cbp", "cbp", "pipeline", "cbp", "cbp"]
    assert (report["tau1"], report["tau2"]) == (2, 3)
    assert any(n.startswith("step 4 has a sample of shape (1, 12, 2, 8, 8), not (1, 12, 3, 8, 8)")
               and "the pipelined phase ended before it" in n for n in report["notes"])
    np.testing.assert_array_equal(a["k2"], a["emulated"], err_msg=f"seed {seed}")


def test_a_prediction_not_shaped_like_the_sample_where_the_loop_slices_is_served_exactly(ranks):
    """FluxKontextPipeline slices the cond call's result before the uncond call. A denoiser that
    predicts only the 64 noisy tokens of its 128-token sample: the slice is replayed on what it
    predicts, so both ranks equal the plain pipeline with that denoiser bit for bit."""
    seed, results = ranks
    for rank, r in enumerate(results):
        got, modes, plain = r["other shape"]
        assert modes == ["cbp"] * STEPS_K0
        np.testing.assert_array_equal(got, plain, err_msg=f"rank {rank} seed {seed}")
    assert np.array_equal(results[0]["other shape"][0], results[1]["other shape"][0])


def test_a_denoiser_with_a_second_output_is_refused_at_step_0_on_both_ranks(ranks):
    _, results = ranks
    for rank, r in enumerate(results):
        assert r["refusal"] is not None, f"rank {rank} was not refused"
        message, modes = r["refusal"]
        assert "returned 2 outputs" in message and modes == []


#: pipelines that start from an input (strength 0.6 of 5 steps: 3 guided steps, 6 denoiser
#: calls): name -> (builder in dit_pipelines, the DIT_INFO entry of their guidance, input name)
FROM_AN_INPUT = {"chroma-img2img": ("chroma_img2img", "chroma", "image"),
                 "flux-img2img": ("flux_img2img", "flux-true-cfg", "image"),
                 "flux-inpaint": ("flux_inpaint", "flux-true-cfg", "image"),
                 "qwen-image-img2img": ("qwen_image_img2img", "qwen-image", "image"),
                 "qwen-image-inpaint": ("qwen_image_inpaint", "qwen-image", "image"),
                 "flux-kontext-inpaint": ("flux_kontext_inpaint", "flux-kontext", "image"),
                 "qwen-image-edit-inpaint": ("qwen_image_edit_inpaint", "qwen-image-edit", "image"),
                 "flux2-klein-inpaint": ("flux2_klein_inpaint", "flux2-klein", "image"),
                 "wan2.1-v2v": ("wan21_v2v", "wan2.1", "video")}
#: their pipelined runs: strength 0.6 of 10 steps leaves 6, as many as STEPS_PIPELINED
FROM_AN_INPUT_PIPELINED_STEPS = 10


def test_every_verified_two_call_class_is_run_by_this_module():
    """two_call.TWO_CALL_PIPELINES is the list of loops verified here: each class in it is the
    class of a pipeline these tests run (DIT_BUILDERS, or a pipeline from an input)."""
    from hybridiff_rt.testing import dit_pipelines
    from hybridiff_rt.two_call import TWO_CALL_PIPELINES

    run_here = {info.pipeline_class for name, info in DIT_INFO.items() if name in DIT_BUILDERS}
    run_here |= {type(getattr(dit_pipelines, builder)()[0]).__name__
                 for builder, _, _ in FROM_AN_INPUT.values()}
    assert not set(TWO_CALL_PIPELINES) - run_here, sorted(set(TWO_CALL_PIPELINES) - run_here)


def _another(value):
    """Another input of the same shape: the image (a tensor or a PIL image) mirrored, the
    video's frames reversed."""
    from PIL import Image, ImageOps

    if isinstance(value, Image.Image):
        return ImageOps.mirror(value)
    return value.flip(-1) if isinstance(value, torch.Tensor) else list(reversed(value))


def _rank_from_an_input(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import dit_pipelines

    hr.init_distributed()
    results = {}
    for name, (builder, info, key) in FROM_AN_INPUT.items():
        pipe, kwargs = getattr(dit_pipelines, builder)(seed=seed)
        calls = []
        hook = pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
        runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
        got = _call(runner, info, kwargs, 5, seed)
        report = hr.last_report(runner).to_dict()
        pipe = runner.restore()
        hook.remove()
        plain = _call(pipe, info, kwargs, 5, seed)
        other = _call(pipe, info, dict(kwargs, **{key: _another(kwargs[key])}), 5, seed)
        results[name] = (got, plain, other, report, len(calls))
        # pipelined: the schedule counts the steps the strength leaves, not num_inference_steps
        runner = hr.parallelize(pipe, hr.HybridConfig(**PIPELINED,
                                                      pipeline_guidance=WITH_ADAPTER[info]))
        pipelined = _call(runner, info, kwargs, FROM_AN_INPUT_PIPELINED_STEPS, seed)
        report = hr.last_report(runner).to_dict()
        pipe = runner.restore()
        emulated = None
        if rank == 0:
            cuts = report["extra"]["pipeline"]["plan"]["cuts"]
            emulated = emulate(pipe, info, kwargs, report["tau1"], report["tau2"], cuts,
                               WITH_ADAPTER[info], seed, steps=FROM_AN_INPUT_PIPELINED_STEPS)
        results[name + " pipelined"] = (pipelined, report, emulated)
    return results


@pytest.fixture(scope="module")
def from_an_input():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_from_an_input, seed, timeout_s=300))


@pytest.mark.parametrize("name", list(FROM_AN_INPUT))
def test_pipelines_from_an_input_equal_the_plain_pipeline_on_both_ranks(from_an_input, name):
    """The pipelines of FROM_AN_INPUT (img2img, inpainting, video-to-video): on two ranks, equal
    to the plain pipeline bit for bit on the steps their strength leaves, and the input
    matters."""
    seed, results = from_an_input
    for by_rank in results:
        got, plain, other, report, calls = by_rank[name]
        assert calls == 6  # the parallel run's calls, as the pipeline made them
        assert report["modes"] == ["cbp"] * 3 and report["num_steps"] == 3
        np.testing.assert_array_equal(got, plain, err_msg=f"{name} seed {seed}")
        assert not np.array_equal(plain, other)
    assert np.array_equal(results[0][name][0], results[1][name][0])


@pytest.mark.parametrize("name", list(FROM_AN_INPUT))
def test_pipelines_from_an_input_pipeline_the_steps_their_strength_leaves(from_an_input, name):
    """Pipelined (k = 2) on two ranks: the schedule runs over the 6 steps that strength 0.6 of
    10 leaves, and the result equals a one-process emulation of that schedule bit for bit."""
    seed, (r0, r1) = from_an_input
    (got, report, emulated), (other_rank, _, _) = r0[name + " pipelined"], r1[name + " pipelined"]
    assert np.array_equal(got, other_rank), f"{name}: the ranks differ"
    tau1 = PIPELINED["tau_cap"]
    assert report["num_steps"] == STEPS_PIPELINED
    assert (report["tau1"], report["tau2"]) == (tau1, tau1 + PIPELINED["k"])
    assert report["modes"] == ["pipeline" if tau1 < i <= tau1 + PIPELINED["k"] else "cbp"
                               for i in range(STEPS_PIPELINED)]
    np.testing.assert_array_equal(got, emulated, err_msg=f"{name} seed {seed}")


def _rank_shared_transformer(rank, seed):
    """ChromaImg2ImgPipeline and a ChromaPipeline made from it (from_pipe: one transformer),
    both parallelized and called in turn; then the plain pipelines."""
    import hybridiff_rt as hr
    from diffusers import ChromaPipeline

    from hybridiff_rt.testing import dit_pipelines

    hr.init_distributed()
    image_pipe, image_kwargs = dit_pipelines.chroma_img2img(seed=seed)
    text_pipe = ChromaPipeline.from_pipe(image_pipe)
    text_kwargs = {k: v for k, v in image_kwargs.items() if k not in ("image", "strength")}
    cases = {"image": (image_pipe, image_kwargs), "text": (text_pipe, text_kwargs)}
    wrappers = {name: hr.parallelize(pipe, hr.HybridConfig(k=0))
                for name, (pipe, _) in cases.items()}
    out = {}
    for name in ("image", "text", "image"):  # guidance as DIT_INFO["chroma"] gives it
        out[name] = _call(wrappers[name], "chroma", cases[name][1], 5, seed)
        out[name + " modes"] = list(hr.last_report(wrappers[name]).modes)
    for wrapper in wrappers.values():
        wrapper.restore()
    for name, (pipe, kwargs) in cases.items():
        out[name + " plain"] = _call(pipe, "chroma", kwargs, 5, seed)
    return out


def test_two_call_pipelines_sharing_a_transformer_each_run_cbp_exactly():
    seed = random.randrange(1 << 16)
    r0, r1 = all_ok(run_ranks(_rank_shared_transformer, seed, timeout_s=300))
    for name, steps in (("image", 3), ("text", 5)):  # strength 0.6 of 5 steps: 3
        assert np.array_equal(r0[name], r1[name]), f"{name}: ranks differ"
        np.testing.assert_array_equal(r0[name], r0[name + " plain"], err_msg=f"{name} {seed}")
        assert r0[name + " modes"] == r1[name + " modes"] == ["cbp"] * steps
