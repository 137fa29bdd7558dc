"""Tiny random-init diffusers pipelines built offline, for tests, the CPU demo and benchmarks.

Each builder returns a stock diffusers pipeline (StableDiffusionXLPipeline, StableDiffusion3Pipeline,
StableDiffusionPipeline) whose models are small random-init versions of the real architectures, with
in-memory byte-level CLIP tokenizers, so nothing is downloaded. The same ``seed`` gives the same
weights in every process, which is what multi-rank runs need.

Sizes: ``size="tiny"`` is for unit tests (a denoiser call takes milliseconds on one CPU thread);
``size="small"`` is for benchmarks (tens to hundreds of milliseconds per call).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: Image side in pixels each builder's default expects (latent side = image side / 2 for the
#: one-level tiny VAE).
DEFAULT_IMAGE_SIZE = 32
TOKENIZER_MAX_LENGTH = 32


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte symbols (plus word-final forms) and two specials."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    bytes_ = printable[:]
    for b in range(256):
        if b not in printable:
            bytes_.append(b)
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def clip_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH):
    """An in-memory CLIPTokenizer over byte symbols (no merges, no files, no network)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=max_length)


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _clip_text_config(hidden: int, projection: int | None, max_length: int) -> Any:
    from transformers import CLIPTextConfig

    kwargs = dict(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                  bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")
    if projection is not None:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def _vae(latent_channels: int, **extra: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         sample_size=DEFAULT_IMAGE_SIZE, **extra)


def _unet_widths(size: str) -> tuple[int, ...]:
    widths = {"tiny": (32, 64), "small": (64, 128, 256)}
    if size not in widths:
        raise ValueError(f"size must be one of {sorted(widths)}, got {size!r}")
    return widths[size]


def sdxl_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with an SDXL-shaped U-Net (text_time added embeddings, two
    CLIP encoders, cross-attention transformer depth growing with resolution level)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    widths = _unet_widths(size)
    levels = len(widths)
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=DEFAULT_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
            block_out_channels=widths, layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
            transformer_layers_per_block=tuple(range(levels)) if levels > 2 else (1, 2),
            attention_head_dim=tuple(max(1, w // 32) for w in widths), cross_attention_dim=64,
            norm_num_groups=8, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8)
        text_encoder = CLIPTextModel(_clip_text_config(32, None, TOKENIZER_MAX_LENGTH))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(32, 32,
                                                                        TOKENIZER_MAX_LENGTH))
        vae = _vae(4, scaling_factor=0.5)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", timestep_spacing="leading",
                                       steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=False)
    return _finish(pipe, dtype)


def sd_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline (SD1.5-shaped U-Net, one CLIP encoder, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    widths = _unet_widths(size)
    levels = len(widths)
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=DEFAULT_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
            block_out_channels=widths, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
        text_encoder = CLIPTextModel(_clip_text_config(32, None, TOKENIZER_MAX_LENGTH))
        vae = _vae(4, scaling_factor=0.5)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _finish(pipe, dtype)


def sd3_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusion3Pipeline with an SD3-shaped MMDiT (joint attention blocks, two CLIP
    encoders with projections, no T5), a 16-channel VAE and flow-matching Euler."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    layers, heads = {"tiny": (2, 2), "small": (6, 4)}.get(size, (None, None))
    if layers is None:
        raise ValueError(f"size must be 'tiny' or 'small', got {size!r}")
    with _seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=DEFAULT_IMAGE_SIZE // 2, patch_size=2, in_channels=16, num_layers=layers,
            attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
            caption_projection_dim=16 * heads, pooled_projection_dim=32, out_channels=16,
            pos_embed_max_size=32)
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(16, 16, TOKENIZER_MAX_LENGTH))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(16, 16,
                                                                        TOKENIZER_MAX_LENGTH))
        vae = _vae(16, scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False,
                   use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    return _finish(pipe, dtype)


BUILDERS = {"sdxl": sdxl_pipeline, "sd3": sd3_pipeline, "sd": sd_pipeline}


def build(family: str, seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """Build the tiny pipeline of ``family`` ("sdxl", "sd3", "sd")."""
    if family not in BUILDERS:
        raise ValueError(f"family must be one of {sorted(BUILDERS)}, got {family!r}")
    return BUILDERS[family](seed=seed, size=size, dtype=dtype)


def _finish(pipe, dtype: torch.dtype):
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
