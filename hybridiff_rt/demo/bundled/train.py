"""Train the bundled models (deterministic, CPU): ``python -m hybridiff_rt.demo.bundled.train``.

    python -m hybridiff_rt.demo.bundled.train --model all          # classifier, vae, unet, sd3 in order
    python -m hybridiff_rt.demo.bundled.train --model unet --steps 200 --out /tmp/w   # a quick try

Order matters: ``vae`` writes the trained autoencoder into both pipeline folders, and ``unet`` /
``sd3`` encode the digits with it and then save the complete pipeline folder (fp16 safetensors;
load with ``torch_dtype=torch.float32``). Every random draw comes from a seeded generator and
``torch.use_deterministic_algorithms(True)`` is on, so a rerun with the same thread count
reproduces the same weights (a different thread count may change float reductions slightly).
The text encoders are never trained: they stay at their seeded random init (see
:mod:`.components`). Frozen parts are rounded to fp16 before they are used, so training sees
exactly what ships.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import components as C
from .data import IMAGE_SIZE, load_digit_images, train_test_split

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FOLDERS = {"unet": "sdxl_digits", "sd3": "sd3_digits", "classifier": "classifier"}
SEEDS = {"classifier": 1, "vae": 2, "unet": 3, "sd3": 4}
TEXT_ENCODER_SEEDS = {"unet": (11, 12), "sd3": (21, 22)}
PROMPT_TEMPLATE = "a handwritten digit {}"
CFG_DROPOUT = 0.1
CAPTION_NOISE = 0.3
"""Share of training captions whose digit is redrawn uniformly at random (like noisy web
captions). Without it the digit models follow the prompt perfectly at w = 1 and guidance has
nothing to fix; with it the conditional distribution is a mixture (about 73% the right digit),
unguided samples follow that mixture, and CFG (w > 1) sharpens it towards the prompted digit."""
SDXL_TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _setup(seed: int, threads: int) -> torch.Generator:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def _round_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Round parameters and buffers to fp16 precision, keep them fp32 (what ships is fp16)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return module


def _lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the gap)."""
    b, _, h, w = x.shape
    p = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=g)
    return torch.stack([p[i, :, off[i, 0]:off[i, 0] + h, off[i, 1]:off[i, 1] + w] for i in range(b)])


# ----------------------------------------------------------------------------- classifier

def train_classifier(out_dir: Path, steps: int = 700, batch: int = 128, threads: int = 1) -> dict:
    """Train the digit CNN on the 80% split (random shifts, light noise); save fp16."""
    from .classifier import DigitClassifier

    g = _setup(SEEDS["classifier"], threads)
    xtr, ytr, xte, yte = train_test_split()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, 2e-3, 50)
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        x = _random_shift(xtr[idx], g, 3)
        x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        loss = F.cross_entropy(model(x), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"classifier step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    _round_fp16(model).eval()
    acc = (model.predict(xte) == yte).float().mean().item()
    model.save(out_dir / FOLDERS["classifier"])
    _log(f"classifier: test accuracy {acc:.4f} on {len(yte)} held-out digits")
    return {"test_accuracy": acc, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- vae

def train_vae(out_dir: Path, steps: int = 600, batch: int = 32, threads: int = 1,
              kl_weight: float = 1e-5, limit: int | None = None) -> dict:
    """Train the autoencoder (MSE + kl_weight * KL) and write it into both pipeline folders.

    ``limit``: use only the first ``limit`` digits (smoke tests); the latent statistics that set
    ``scaling_factor`` (1 / std of posterior means) and ``shift_factor`` (their mean) come from
    the same images.
    """
    g = _setup(SEEDS["vae"], threads)
    x_all, _ = load_digit_images()
    x_all = x_all[:limit]
    vae = C.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, 1e-3, 50)
        x = x_all[torch.randint(0, x_all.shape[0], (batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean()  # summed over the 256 latent values, averaged over the batch
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae step {step} mse {mse.item():.5f} kl {kl.item():.1f} ({time.time() - t0:.0f}s)")
    _round_fp16(vae).eval()
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        mean = post.mean
        shift = mean.mean().item()
        scale = 1.0 / mean.std().item()
        rec_mse = F.mse_loss(vae.decode(mean).sample, x_all).item()
    vae.register_to_config(scaling_factor=round(scale, 5), shift_factor=round(shift, 5))
    for name in ("unet", "sd3"):
        vae.to(torch.float16).save_pretrained(out_dir / FOLDERS[name] / "vae")
        vae.float()
    info = {"recon_mse": rec_mse, "scaling_factor": scale, "shift_factor": shift,
            "posterior_std_mean": post.std.mean().item(), "seconds": time.time() - t0}
    _log(f"vae: {json.dumps(info)}")
    return info


# ----------------------------------------------------------------------------- diffusion

class _RepeatedTokenJointAttnProcessor:
    """Training-only SD3 joint attention where the LAST context token counts ``n`` times.

    With no T5 encoder, ``StableDiffusion3Pipeline`` appends ``max_sequence_length`` (default
    256) all-zero context tokens. Identical tokens stay identical through every joint block (no
    positional embedding on the context stream), and ``n`` identical keys act in the softmax as
    one key with ``log n`` added to its logit. So training with one zero token plus that bias is
    exactly training with ``n`` zero tokens, at the cost of one. ``log_n``: float ``[B]``.
    """

    def __init__(self):
        self.log_n: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads

        def split(t):
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(b, 1, 1, k.shape[2], dtype=q.dtype)
        bias[:, 0, 0, -1] = self.log_n
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        hs, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        hs = attn.to_out[1](attn.to_out[0](hs))
        return hs, ctx


def _encode_prompts(kind: str, tokenizer, te1, te2):
    """Per-digit cond inputs and the uncond inputs exactly as the stock pipeline builds them.

    unet (SDXL pipeline): embeds = cat(te1.hidden[-2], te2.hidden[-2]) [.,8,64], pooled =
    te2.text_embeds [.,32]; uncond = zeros (``force_zeros_for_empty_prompt``).
    sd3 (SD3 pipeline): embeds = cat(te1.hidden[-2], te2.hidden[-2]) [.,8,64] (the zero T5 part is
    appended in the training step), pooled = cat(te1.text_embeds, te2.text_embeds) [.,64];
    uncond = the same for the empty prompt "".
    """
    prompts = [PROMPT_TEMPLATE.format(d) for d in range(10)] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        o1 = te1(ids, output_hidden_states=True)
        o2 = te2(ids, output_hidden_states=True)
    embeds = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    if kind == "unet":
        pooled = o2.text_embeds
        return embeds[:10], pooled[:10], torch.zeros_like(embeds[10]), torch.zeros_like(pooled[10])
    pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)
    return embeds[:10], pooled[:10], embeds[10], pooled[10]


def _strip_local_paths(folder: Path) -> None:
    """Drop ``_name_or_path`` (an absolute path of the training machine) from saved configs."""
    for cfg in folder.rglob("*.json"):
        data = json.loads(cfg.read_text())
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def build_pipeline(kind: str, denoiser, vae):
    """Assemble the stock diffusers pipeline object from components (fp32, CPU)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    s1, s2 = TEXT_ENCODER_SEEDS[kind]
    tok1, tok2 = C.build_tokenizer(), C.build_tokenizer()
    if kind == "unet":
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=_round_fp16(C.build_text_encoder(s1, False)),
            text_encoder_2=_round_fp16(C.build_text_encoder(s2, True)),
            tokenizer=tok1, tokenizer_2=tok2, unet=denoiser, scheduler=C.build_unet_scheduler(),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusion3Pipeline(
        transformer=denoiser, scheduler=C.build_sd3_scheduler(), vae=vae,
        text_encoder=_round_fp16(C.build_text_encoder(s1, True)), tokenizer=tok1,
        text_encoder_2=_round_fp16(C.build_text_encoder(s2, True)), tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None)


def train_diffusion(kind: str, out_dir: Path, steps: int = 1500, batch: int = 64, threads: int = 1,
                    lr: float = 1e-3, ema_decay: float = 0.995, limit: int | None = None) -> dict:
    """Train the ``unet`` (epsilon, DDPM noising with SDXL betas) or ``sd3`` (rectified flow).

    Condition dropout ``CFG_DROPOUT`` replaces the prompt by the pipeline's uncond input, so
    classifier-free guidance works; ``CAPTION_NOISE`` of the captions name a random digit.
    The EMA of the weights (decay ``ema_decay``) is what ships, saved with the rest of the
    stock pipeline into ``out_dir/<folder>``. ``limit``: use only the
    first ``limit`` digits (smoke tests).
    """
    from diffusers import AutoencoderKL

    g = _setup(SEEDS[kind], threads)
    folder = out_dir / FOLDERS[kind]
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'vae'} missing: run `--model vae` first")
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval()
    x_all, y_all = load_digit_images()
    x_all, y_all = x_all[:limit], y_all[:limit]
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        lat_mean, lat_std = post.mean, post.std
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor
    probe = build_pipeline(kind, None, vae)
    c_emb, c_pool, u_emb, u_pool = _encode_prompts(kind, probe.tokenizer, probe.text_encoder,
                                                   probe.text_encoder_2)
    del probe

    if kind == "unet":
        model = C.build_unet()
        abar = C.build_unet_scheduler().alphas_cumprod.float()
        time_ids = torch.tensor(SDXL_TIME_IDS, dtype=torch.float32)
    else:
        model = C.build_sd3_transformer()
        proc = _RepeatedTokenJointAttnProcessor()
        model.set_attn_processor(proc)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, lr, 100)
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=g)
        z = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        noise = torch.randn(z.shape, generator=g)
        drop = torch.rand(batch, generator=g) < CFG_DROPOUT
        labels = y_all[idx]
        wrong = torch.rand(batch, generator=g) < CAPTION_NOISE
        labels = torch.where(wrong, torch.randint(0, 10, (batch,), generator=g), labels)
        emb = torch.where(drop[:, None, None], u_emb, c_emb[labels])
        pool = torch.where(drop[:, None], u_pool, c_pool[labels])
        if kind == "unet":
            z = z * sf
            t = torch.randint(0, abar.numel(), (batch,), generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * z + (1 - a).sqrt() * noise
            pred = model(xt, t, emb, added_cond_kwargs={
                "text_embeds": pool, "time_ids": time_ids.expand(batch, -1)}).sample
            target = noise
        else:
            z = (z - shift) * sf
            sigma = torch.rand(batch, generator=g)
            s = sigma.view(-1, 1, 1, 1)
            xt = (1 - s) * z + s * noise
            # one all-zero "T5" token standing for n = 1..512 of them (log-uniform)
            proc.log_n = torch.rand(batch, generator=g) * math.log(512.0)
            ctx = torch.cat([emb, torch.zeros(batch, 1, emb.shape[-1])], dim=1)
            pred = model(hidden_states=xt, encoder_hidden_states=ctx, pooled_projections=pool,
                         timestep=sigma * 1000.0).sample
            target = noise - z
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        if step % 100 == 0 or step == steps - 1:
            _log(f"{kind} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    if kind == "sd3":
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        ema.set_attn_processor(JointAttnProcessor2_0())
    _round_fp16(ema).eval()
    pipe = build_pipeline(kind, ema, vae)
    pipe.to(torch.float16).save_pretrained(folder)
    _strip_local_paths(folder)
    info = {"steps": steps, "batch": batch, "final_loss": loss.item(), "seconds": time.time() - t0}
    _log(f"{kind}: saved {folder}: {json.dumps(info)}")
    return info


DEFAULT_STEPS = {"classifier": 700, "vae": 600, "unet": 1500, "sd3": 1500}
DEFAULT_BATCH = {"classifier": 128, "vae": 32, "unet": 64, "sd3": 64}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["classifier", "vae", "unet", "sd3", "all"], required=True)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default per model)")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="weights folder")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy 2-core box, 2 OpenMP threads ran 30x slower)")
    a = ap.parse_args(argv)
    from ..extras import require

    require("train", "training the bundled models")
    names = ["classifier", "vae", "unet", "sd3"] if a.model == "all" else [a.model]
    t0 = time.time()
    for name in names:
        steps = a.steps or DEFAULT_STEPS[name]
        ts = time.time()
        if name == "classifier":
            train_classifier(a.out, steps=steps, batch=DEFAULT_BATCH[name], threads=a.threads)
        elif name == "vae":
            train_vae(a.out, steps=steps, batch=DEFAULT_BATCH[name], threads=a.threads)
        else:
            train_diffusion(name, a.out, steps=steps, batch=DEFAULT_BATCH[name], threads=a.threads)
        _log(f"== {name}: {time.time() - ts:.0f} s wall")
    _log(f"== total: {time.time() - t0:.0f} s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
