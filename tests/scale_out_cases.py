"""Shared material of the world-size-2N tests (tests/test_scale_out.py and the two-node script
tests/scale_out_node.py): a tiny SDXL-shaped U-Net, fresh random branch inputs, a hand-written
sampling loop over hr.HybridDenoiser, and a one-process emulation of any 2N-rank schedule.

Not a test module itself (no ``test_`` prefix)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

STEPS = 6
GUIDANCE = 4.0
LATENT = 16
#: window 1 makes every slope exactly 0, so the switch fires at step 1: pipelined steps 2..3
HYBRID = {"window": 1, "slope_eps": 1e-6, "k": 2, "tau_cap": 2}
#: the 2-stage cut pinned for image pairs (so a pair and a 2-rank run of its images cut alike)
PAIR_CUTS = (0, 8, 16)

#: name -> (images per branch, HybridConfig fields); the layouts these give on 4 ranks are in
#: the names
CASES: dict[str, tuple[int, dict[str, Any]]] = {
    "pairs_k0": (2, {"k": 0}),
    "pairs_hybrid": (2, dict(HYBRID, stage_cuts=PAIR_CUTS)),
    "pairs_uneven_hybrid": (3, dict(HYBRID, stage_cuts=PAIR_CUTS)),
    "layers_hybrid": (1, dict(HYBRID)),
    "layers_forced_two_images": (2, dict(HYBRID, scale_out="layers")),
    "pairs_forced_one_image": (1, dict(HYBRID, stage_cuts=PAIR_CUTS, scale_out="pairs")),
}


def unet(seed: int):
    from hybridiff_rt import testing

    with testing.seeded(seed):
        return testing.sdxl_unet().eval()


def inputs(seed: int, batch: int) -> tuple[torch.Tensor, dict, dict]:
    """Fresh random ``(sample [B,4,16,16], cond, uncond)`` for the tiny U-Net."""
    g = torch.Generator().manual_seed(seed)

    def branch():
        return {"encoder_hidden_states": torch.randn(batch, 8, 64, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                      "time_ids": torch.randn(batch, 6, generator=g)}}

    sample = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    return sample, branch(), branch()


def rows(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: rows(v, start, stop) for k, v in value.items()}
    return value


def timestep(i: int) -> torch.Tensor:
    return torch.tensor(900.0 - 150.0 * i)


def loop(den, sample: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
    """A plain sampling loop: ``x <- x - 0.1 * guided eps`` for STEPS steps."""
    for i in range(STEPS):
        eps = den(sample, timestep(i), cond=cond, uncond=uncond, guidance_scale=GUIDANCE, step=i,
                  num_steps=STEPS)
        sample = sample - 0.1 * eps
    return sample


def run_case(seed: int, name: str, image: int | None = None, use_transport: Any = None,
             device: str | torch.device = "cpu", **overrides: Any) -> dict[str, Any]:
    """This rank's loop output (numpy) and report for case ``name`` (inputs from ``seed``; only
    image ``image`` of them when given; over ``use_transport`` when given, else the config's; model
    and inputs on ``device``)."""
    import hybridiff_rt as hr

    batch, fields = CASES[name]
    model = unet(seed).to(device)
    sample, cond, uncond = inputs(seed + 1, batch)
    if image is not None:
        sample, cond, uncond = (rows(v, image, image + 1) for v in (sample, cond, uncond))
    sample, cond, uncond = (to_device(v, device) for v in (sample, cond, uncond))
    den = hr.HybridDenoiser(model, hr.HybridConfig(**{**fields, **overrides}),
                            transport=use_transport)
    try:
        out = loop(den, sample, cond, uncond)
    finally:
        den.close()
    return {"out": out.cpu().numpy().copy(), "report": den.report.to_dict()}


def to_device(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def stand_in_node_link(carrier: Any, name: str = "node-stand-in"):
    """A node-local transport factory for ``comm.make_link_transport`` on CPU, where CUDA IPC
    cannot run: the node's links go through ``carrier`` (a second job-wide TorchTransport the
    caller made and closes), under their own backend ``name``, so a run shows which link took
    which route."""
    from hybridiff_rt.comm import SubsetTransport

    def make(store, node_ranks, device, timeout_s, handshake_timeout_s):
        local = SubsetTransport(carrier, node_ranks)
        local.name = name
        return local, ""

    return make


def emulate(seed: int, name: str, pairs: int, chains: list[tuple[tuple[int, int], list[int]]],
            tau1: int | None) -> np.ndarray:
    """One process, the 2N-rank schedule written out: on CBP steps each image share of each
    branch is its own model call (shares dealt to ``pairs`` pairs, first shares larger); on the
    pipelined steps tau1+1 .. tau1+k each chain ``(rows, cuts)`` runs its stages, stage j on the
    boundary stage j-1 produced one step earlier (the first pipelined step fresh, in sequence)."""
    import hybridiff_rt as hr

    batch, fields = CASES[name]
    model = unet(seed)
    staged = hr.stage_denoiser(model)
    sample, cond, uncond = inputs(seed + 1, batch)
    k = fields.get("k", 5)
    base, extra = divmod(batch, pairs)
    shares, start = [], 0
    for p in range(pairs):
        stop = start + base + (1 if p < extra else 0)
        shares.append((start, stop))
        start = stop
    stale: dict[int, list] = {}
    with torch.no_grad():
        for i in range(STEPS):
            t = timestep(i)
            if tau1 is not None and tau1 < i <= tau1 + k:
                first = i == tau1 + 1
                preds = []
                for c, ((a, b), cuts) in enumerate(chains):
                    kw = {"sample": sample[a:b], "timestep": t, **rows(cond, a, b)}
                    ctx = staged.prepare(**kw)
                    fresh = []
                    for j in range(len(cuts) - 1):
                        source = (ctx.initial_state if j == 0 else
                                  fresh[j - 1] if first else stale[c][j - 1])
                        fresh.append(staged.run(source, ctx, cuts[j], cuts[j + 1]))
                    preds.append(staged.finish(fresh[-1], ctx))
                    stale[c] = fresh
                c_pred = torch.cat(preds)
                u_pred = c_pred
            else:
                u_parts, c_parts = [], []
                for a, b in shares:
                    if b > a:
                        u_parts.append(model(sample[a:b], t, **rows(uncond, a, b),
                                             return_dict=False)[0])
                        c_parts.append(model(sample[a:b], t, **rows(cond, a, b),
                                             return_dict=False)[0])
                u_pred, c_pred = torch.cat(u_parts), torch.cat(c_parts)
            guided, _ = hr.ops.cfg_combine(u_pred, c_pred, GUIDANCE)
            sample = sample - 0.1 * guided
    return sample.numpy().copy()


PROMPTS = ("a red fox in the snow", "a castle on a cliff")


def pipeline_call(pipe, seed: int, images: tuple[int, ...]) -> dict[str, Any]:
    """Keyword arguments of a tiny SDXL pipeline call making ``images`` (indices into PROMPTS):
    each prompt encoded on its own (batch 1) and one generator per image, so image i of any call
    gets the same embeddings and initial latents."""
    encoded = [pipe.encode_prompt(PROMPTS[i], device=torch.device("cpu"),
                                  num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt="low quality") for i in images]
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    call = {name: torch.cat([e[n] for e in encoded]) for n, name in enumerate(names)}
    call.update(num_inference_steps=STEPS, height=32, width=32, guidance_scale=GUIDANCE,
                output_type="latent",
                generator=[torch.Generator().manual_seed(seed + 10 + i) for i in images])
    return call
