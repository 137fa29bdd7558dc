"""The processes of bench/e2e_gpu.py: a hand-written 50-step CFG sampling loop on random-init
SDXL-shaped / SD3-medium-shaped denoisers, eager or through hybridiff_rt.

Every function here runs in a child process (``hybridiff_rt.testing.run_ranks``): the parent never
creates a CUDA context, so it can start and stop the MPS daemon around the children. Results go
back as plain Python values and numpy arrays.

Inputs are identical in every process: weights from ``torch.manual_seed(seed)`` (built directly
on the device), text embeddings and the initial latent from a CPU generator. The loop is the one
a diffusers pipeline runs after text encoding: scale the latent (Euler, SDXL), call the denoiser
on ``[uncond; cond]`` (or hand the branches to hybridiff_rt), combine ``u + w (c - u)``, step
the scheduler.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np

#: the published configs of the two denoisers (diffusers config.json of
#: stable-diffusion-xl-base-1.0/unet and stable-diffusion-3-medium-diffusers/transformer)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048, "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
    "pos_embed_max_size": 192,
}
#: per family: text tokens and widths of the conditioning (real models: CLIP 77 tokens for SDXL,
#: 77 CLIP + 256 T5 for SD3), guidance scale, latent channels
FAMILIES = {
    "sdxl": {"tokens": 77, "text": 2048, "pooled": 1280, "w": 5.0, "channels": 4},
    "sd3": {"tokens": 333, "text": 4096, "pooled": 2048, "w": 7.0, "channels": 16},
}
TINY = {  # the tiny random-init models of hybridiff_rt.testing (dry run)
    "sdxl": {"tokens": 8, "text": 64, "pooled": 32, "w": 5.0, "channels": 4},
    "sd3": {"tokens": 8, "text": 32, "pooled": 32, "w": 7.0, "channels": 16},
}


def build(family: str, size: str, device: Any, dtype: Any, seed: int):
    """(model, scheduler) for ``family``: "real" sizes are the published configs at random init,
    built on ``device``; "tiny" the hybridiff_rt.testing models."""
    import torch

    from hybridiff_rt import testing

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"bench/e2e_gpu.py needs a CUDA GPU (torch {torch.__version__}: "
                           "torch.cuda.is_available() is False); --dry-run checks the script "
                           "on CPU")
    if size == "tiny":
        pipe = testing.build(family, seed=seed)
        model = pipe.unet if family == "sdxl" else pipe.transformer
    else:
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel

        torch.manual_seed(seed)
        with torch.device(device):
            model = (UNet2DConditionModel(**SDXL_UNET) if family == "sdxl"
                     else SD3Transformer2DModel(**SD3_MEDIUM))
    model = model.to(device=device).eval()
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype=dtype)
    scheduler = (testing.euler_scheduler() if family == "sdxl"
                 else testing.flow_match_scheduler(shift=3.0))
    return model, scheduler


def inputs(family: str, size: str, side: int, seed: int, device: Any, dtype: Any) -> dict:
    """Initial latent and both branches' conditioning, the same in every process."""
    import torch

    spec = (TINY if size == "tiny" else FAMILIES)[family]
    g = torch.Generator().manual_seed(seed + 1)
    latent = side // 8 if size != "tiny" else side // 2

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def branch():
        if family == "sdxl":
            time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=dtype, device=device)
            return {"encoder_hidden_states": rand(1, spec["tokens"], spec["text"]),
                    "added_cond_kwargs": {"text_embeds": rand(1, spec["pooled"]),
                                          "time_ids": time_ids}}
        return {"encoder_hidden_states": rand(1, spec["tokens"], spec["text"]),
                "pooled_projections": rand(1, spec["pooled"])}

    return {"latent": rand(1, spec["channels"], latent, latent), "uncond": branch(),
            "cond": branch(), "w": spec["w"]}


def _joint(a: Any, b: Any) -> Any:
    import torch

    if isinstance(a, dict):
        return {k: _joint(a[k], b[k]) for k in a}
    return torch.cat([a, b])


class _Clock:
    """Per-step and total timing: CUDA events on the device (resolved at the end), else
    perf_counter."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def sample(family: str, model: Any, scheduler: Any, data: dict, steps: int, device: Any,
           predict=None, clock: _Clock | None = None, on_step=None):
    """Run the sampling loop; ``predict(uncond_kw, cond_kw, joint_kw, i) -> (u, c)`` (default:
    the eager batch-2 call). Returns the final latent (float32 numpy)."""
    import torch

    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(steps, device=device)
    latents = data["latent"] * getattr(sched, "init_noise_sigma", 1.0)
    key = "sample" if family == "sdxl" else "hidden_states"
    w = data["w"]
    if predict is None:
        def predict(uncond_kw, cond_kw, joint_kw, i):
            return model(**joint_kw, return_dict=False)[0].chunk(2)
    with torch.no_grad():
        if clock is not None:
            clock.mark()
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(latents, t) if family == "sdxl" else latents
            one = t if family == "sdxl" else t.expand(1)
            two = t if family == "sdxl" else t.expand(2)
            uncond_kw = {key: x, "timestep": one, **data["uncond"]}
            cond_kw = {key: x, "timestep": one, **data["cond"]}
            joint_kw = {key: torch.cat([x, x]), "timestep": two,
                        **_joint(data["uncond"], data["cond"])}
            u, c = predict(uncond_kw, cond_kw, joint_kw, i)
            latents = sched.step(u + w * (c - u), t, latents, return_dict=False)[0]
            if clock is not None:
                clock.mark()
            if on_step is not None:
                on_step()
    return latents.float().cpu().numpy()


def _weights_checksum(model: Any) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.float().sum() for p in list(model.parameters())[:: 37]))


def _config(plan: dict, fields: dict):
    import hybridiff_rt as hr

    fields = dict(fields)
    preset = fields.pop("preset", None)
    common = {"compile": plan["compile"], "cuda_graphs": plan["cuda_graphs"],
              "compile_backend": plan["compile_backend"], "timeout_s": 120.0}
    if preset:
        return hr.HybridConfig.preset(preset, num_steps=plan["steps"], **common, **fields)
    return hr.HybridConfig(**common, **fields)


def _timed_runs(family, model, scheduler, data, plan, predict_for_run, around=None,
                warmups=1):
    """``warmups`` warm-up runs (they compile, capture graphs, measure stage costs; a second
    one runs and compiles the cut re-planned from the first one's measured stage times), then
    one timed run (inside the context ``around``, e. g. a profiler). ``predict_for_run()``
    gives a fresh ``(predict, report_getter)`` per run."""
    import torch

    for _ in range(warmups):
        predict, _ = predict_for_run()
        sample(family, model, scheduler, data, plan["steps"], plan["device"], predict)
    predict, report = predict_for_run()
    clock = _Clock(plan["device"])
    if clock.cuda:
        torch.cuda.synchronize()
    with around if around is not None else contextlib.nullcontext():
        start = time.perf_counter()
        latent = sample(family, model, scheduler, data, plan["steps"], plan["device"], predict,
                        clock, on_step=getattr(around, "step", None))
        if clock.cuda:
            torch.cuda.synchronize()
        total_s = time.perf_counter() - start
    return {"total_s": total_s, "step_ms": clock.step_ms(), "latent": latent,
            "report": report() if report else None}


def serial_worker(rank: int, plan: dict, eager: bool) -> dict:
    """One process: per family, (a) the eager batch-2 loop when ``eager``, (b) hybridiff_rt
    serial (world of one) with the plan's compile / graph settings at batch 2, and the batch-1
    run of (b) for the ideal (T1)."""
    import torch

    import hybridiff_rt as hr

    dtype = getattr(torch, plan["dtype"])
    out = {}
    for family in plan["models"]:
        model, scheduler = build(family, plan["size"], plan["device"], dtype, plan["seed"])
        data = inputs(family, plan["size"], plan["side"], plan["seed"], plan["device"], dtype)
        result = {"weights": _weights_checksum(model)}
        if eager:
            result["eager"] = _timed_runs(family, model, scheduler, data, plan,
                                          lambda: (None, None))
        cfg = _config(plan, {"k": 0})
        for label, joint in (("serial", True), ("serial_b1", False)):
            den = hr.HybridDenoiser(model, cfg)
            result[label] = _timed_runs(family, model, scheduler, data, plan,
                                        _predictor(den, data, plan, joint))
            den.close()
        out[family] = result
        del model
        if plan["device"] != "cpu":
            torch.cuda.empty_cache()
    return out


def _predictor(den, data: dict, plan: dict, joint: bool):
    """``run -> (predict, report)`` for _timed_runs: each step through ``den.predict_branches``
    (with the stacked call when ``joint``, i.e. one batch-2 call on a world of one)."""

    def predict_for_run():
        def predict(uncond_kw, cond_kw, joint_kw, i):
            return den.predict_branches(uncond_kw, cond_kw, guidance_scale=data["w"], step=i,
                                        num_steps=plan["steps"],
                                        joint_kw=joint_kw if joint else None)
        return predict, lambda: den.report.to_dict()

    return predict_for_run


def parallel_worker(rank: int, plan: dict, variants: list) -> dict:
    """Two processes (this is one): per family, each ``(label, config fields)`` of ``variants``
    (CBP, hybrid) through hr.HybridDenoiser; rank 0 writes a profiler trace of one hybrid run
    when ``plan["profile"]`` names a file."""
    import torch

    import hybridiff_rt as hr

    hr.init_distributed()
    dtype = getattr(torch, plan["dtype"])
    out = {}
    traced = False
    for family in plan["models"]:
        model, scheduler = build(family, plan["size"], plan["device"], dtype, plan["seed"])
        data = inputs(family, plan["size"], plan["side"], plan["seed"], plan["device"], dtype)
        result = {"weights": _weights_checksum(model)}
        for label, fields in variants:
            fields = dict(fields)
            if fields.get("preset") == "auto":
                fields["preset"] = family
            den = hr.HybridDenoiser(model, _config(plan, fields))
            predict_for_run = _predictor(den, data, plan, joint=False)
            profile = plan.get("profile") and rank == 0 and label == "hybrid" and not traced
            prof, window = _profiler(plan, family) if profile else (None, None)
            result[label] = _timed_runs(family, model, scheduler, data, plan, predict_for_run,
                                        around=prof, warmups=2 if fields.get("rebalance") else 1)
            if profile:
                result[label]["trace_steps"] = window
                result[label]["trace"] = plan["profile"]
                traced = True
            den.close()
        out[family] = result
        del model
        if plan["device"] != "cpu":
            torch.cuda.empty_cache()
    return out


def _profiler(plan: dict, family: str):
    """(torch profiler, (first, stop) steps it records) for one hybrid run: CPU and, on a GPU,
    CUDA activity of the steps from the earliest possible switch to a few steps past the latest
    possible end of the pipelined phase (the preset's window .. tau_cap + k + 2), so the trace
    shows CBP, pipelined and CBP steps at a size that comes back from the device machine. It is
    written to ``plan["profile"]`` when that window ends. Use it as a context manager and call
    its ``step()`` after each sampling step."""
    import torch

    from hybridiff_rt import HybridConfig

    cfg = HybridConfig.preset(family, num_steps=plan["steps"])
    first = max(0, cfg.window - 1)
    stop = min(plan["steps"], cfg.tau_cap + cfg.k + 3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if plan["device"] != "cpu":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=max(0, first - 1), warmup=min(1, first),
                                         active=max(1, stop - first), repeat=1),
        on_trace_ready=lambda p: p.export_chrome_trace(plan["profile"]))
    return prof, (first, stop)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR in dB of ``test`` against ``reference`` over the reference's value range."""
    ref = reference.astype(np.float64)
    mse = float(np.mean((test.astype(np.float64) - ref) ** 2))
    value_range = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(value_range ** 2 / mse)
