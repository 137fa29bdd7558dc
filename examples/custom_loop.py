"""A hand-written sampling loop on hr.HybridDenoiser: no diffusers pipeline call.

Run on two devices (two GPUs, or two CPU processes)::

    torchrun --nproc_per_node=2 examples/custom_loop.py --family sdxl   # DDIM over a U-Net
    torchrun --nproc_per_node=2 examples/custom_loop.py --scheduler euler  # Euler over a U-Net
    torchrun --nproc_per_node=2 examples/custom_loop.py --family sd3    # flow-matching Euler, MMDiT
    python examples/custom_loop.py                                      # one device, both branches

The model is a tiny random-init SDXL- or SD3-shaped pipeline (``hybridiff_rt.testing``), so this runs
offline in seconds; only its text encoders (for the prompt embeddings), its denoiser and its
scheduler are used. The loop itself is the few lines in :func:`sample`: the HybridDenoiser stands
in for "run both CFG branches and combine them", the scheduler steps on every rank with identical
inputs, and every rank ends with the same latents.

:func:`branch_inputs` and :func:`sample` do what StableDiffusionXLPipeline /
StableDiffusion3Pipeline do (same prompt embeddings, SDXL micro-conditioning, initial latents and
scheduler calls), so with the same scheduler and seed the loop reproduces, bit for bit in fp32,
the latents of ``hr.parallelize(pipe)(..., output_type="latent")`` (tests/test_custom_loop.py).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import hybridiff_rt as hr


def branch_inputs(pipe: Any, prompt: str, negative_prompt: str, height: int, width: int,
                  device: torch.device) -> tuple[dict, dict]:
    """The denoiser's keyword inputs for the cond and the uncond branch (batch 1 each).

    SDXL (``pipe.unet``): text embeddings of both CLIP encoders plus ``added_cond_kwargs`` (pooled
    embedding and the micro-conditioning ``time_ids`` for (height, width), no crop). SD3
    (``pipe.transformer``): joint text embeddings and pooled projections.
    """
    if hasattr(pipe, "unet"):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, device=device,
            num_images_per_prompt=1, do_classifier_free_guidance=True)
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim).to(device)
        # None entries exactly as the pipeline passes them: the stage-cost profile is cached per
        # input signature, so loop and pipeline then share one profile and one stage cut
        common = dict(timestep_cond=None, cross_attention_kwargs=None)
        cond = dict(encoder_hidden_states=embeds, **common,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
        uncond = dict(encoder_hidden_states=negative, **common,
                      added_cond_kwargs={"text_embeds": negative_pooled, "time_ids": time_ids})
        return cond, uncond
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
        device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond = dict(encoder_hidden_states=embeds, pooled_projections=pooled,
                joint_attention_kwargs=None)
    uncond = dict(encoder_hidden_states=negative, pooled_projections=negative_pooled,
                  joint_attention_kwargs=None)
    return cond, uncond


def sample(pipe: Any, den: hr.HybridDenoiser, cond: dict, uncond: dict, *, steps: int,
           guidance_scale: float, seed: int, height: int, width: int) -> torch.Tensor:
    """Run ``steps`` sampling steps with ``pipe.scheduler``; returns the final latents.

    Call on every rank with the same arguments. The initial noise comes from a CPU generator
    seeded with ``seed`` (``pipe.prepare_latents``), so it does not depend on the device.
    """
    unet = getattr(pipe, "unet", None)
    model = unet if unet is not None else pipe.transformer
    device = next(model.parameters()).device
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    latents = pipe.prepare_latents(1, model.config.in_channels, height, width,
                                   cond["encoder_hidden_states"].dtype, device,
                                   torch.Generator("cpu").manual_seed(seed))
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching: identity
    den.reset()
    for i, t in enumerate(scheduler.timesteps):
        x = scale(latents, t)
        timestep = t if unet is not None else t.expand(x.shape[0])  # the MMDiT wants [batch]
        guided = den(x, timestep, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                     step=i, num_steps=len(scheduler.timesteps))
        latents = scheduler.step(guided, t, latents, return_dict=False)[0]
    return latents


def build_pipeline(family: str, seed: int, device: torch.device, scheduler: str = "ddim") -> Any:
    """The tiny pipeline of ``family``. SDXL: ``scheduler="ddim"`` swaps in a DDIM scheduler
    built from the pipeline's config, "euler" keeps its Euler scheduler. SD3: flow-matching
    Euler (``scheduler`` is ignored)."""
    from diffusers import DDIMScheduler

    from hybridiff_rt import testing

    pipe = testing.build(family, seed=seed).to(device)
    if family == "sdxl" and scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def main(argv: list[str] | None = None) -> torch.Tensor:
    """Command-line entry point; returns the final latents (identical on every rank)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], default="sdxl")
    parser.add_argument("--scheduler", choices=["ddim", "euler"], default="ddim",
                        help="SDXL only (SD3 always uses flow-matching Euler)")
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--negative-prompt", default="blurry")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (tiny: 32)")
    parser.add_argument("--k", type=int, default=3, help="pipelined steps (0 = CBP only)")
    args = parser.parse_args(argv)

    info = hr.init_distributed()
    # a switch as early as the run allows, so the pipelined steps are visible in a short run
    cfg = hr.HybridConfig(window=1, slope_eps=1e-6, k=args.k,
                          tau_cap=max(1, min(4, args.steps - 2 - args.k)))
    pipe = build_pipeline(args.family, seed=0, device=info.device, scheduler=args.scheduler)
    den = hr.HybridDenoiser(pipe.unet if args.family == "sdxl" else pipe.transformer, cfg)
    cond, uncond = branch_inputs(pipe, args.prompt, args.negative_prompt, args.size, args.size,
                                 info.device)
    latents = sample(pipe, den, cond, uncond, steps=args.steps, guidance_scale=args.guidance,
                     seed=args.seed, height=args.size, width=args.size)
    report = den.report
    if info.rank == 0:
        switch = f"tau1={report.tau1} tau2={report.tau2}" if info.world_size > 1 else "serial"
        print(f"{args.family}: {info.world_size} rank(s), modes {' '.join(report.modes)} "
              f"({switch}); {report.total_ms:.0f} ms in the denoiser; "
              f"latents {tuple(latents.shape)} mean {latents.float().mean():+.5f}")
    return latents


if __name__ == "__main__":
    main()
