"""Tiny random-init diffusers pipelines and the component builders they are made of, offline.

Each pipeline builder returns a stock diffusers pipeline (StableDiffusionXLPipeline,
StableDiffusion3Pipeline, StableDiffusionPipeline) whose models are small random-init versions of
the real architectures, with in-memory byte-level CLIP tokenizers, so nothing is downloaded. The
same ``seed`` gives the same weights in every process, which is what multi-rank runs need.

Sizes: ``size="tiny"`` is for unit tests (a denoiser call takes milliseconds on one CPU thread);
``size="small"`` is for benchmarks (tens to hundreds of milliseconds per call).

The component builders (:func:`clip_tokenizer`, :func:`clip_text_config`,
:func:`clip_text_encoder`, :func:`vae`, :func:`sdxl_unet`, :func:`sd3_transformer`,
:func:`euler_scheduler`, :func:`flow_match_scheduler`) take the tiny defaults and accept
overrides; the bundled demo models are built from them with their own sizes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

#: Image side in pixels each pipeline builder's default expects (latent side = image side / 2 for
#: the two-level tiny VAE).
DEFAULT_IMAGE_SIZE = 32
TOKENIZER_MAX_LENGTH = 32
#: SDXL's training noise schedule (scaled-linear betas), shared by the U-Net builders.
SDXL_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def byte_level_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary of the 256 byte symbols (plus word-final forms) and two specials."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    symbols = [chr(c) for c in codes]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def clip_tokenizer(max_length: int = TOKENIZER_MAX_LENGTH, vocab: dict[str, int] | None = None,
                   merges: Sequence[tuple[str, str]] = (), **special_tokens: str):
    """An in-memory ``CLIPTokenizer`` (no files, no network).

    Args:
        max_length: ``model_max_length`` in tokens.
        vocab: BPE vocabulary; default :func:`byte_level_vocab`.
        merges: BPE merges (default none: every word tokenizes to its bytes).
        special_tokens: ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` overrides.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab() if vocab is None else vocab,
                         merges=list(merges), model_max_length=max_length, **special_tokens)


def clip_text_config(hidden: int, projection: int | None, max_length: int = TOKENIZER_MAX_LENGTH,
                     **overrides: Any):
    """A 2-layer, 2-head ``CLIPTextConfig`` of width ``hidden`` for the byte-level vocabulary.

    Args:
        hidden: hidden size; the MLP is twice as wide.
        projection: ``projection_dim`` (pooled output width of the ``...WithProjection`` model),
            or None to keep transformers' default.
        max_length: ``max_position_embeddings`` in tokens.
        overrides: any other CLIPTextConfig field (vocabulary size, special token ids, ...).
    """
    from transformers import CLIPTextConfig

    kwargs = dict(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                  bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")
    if projection is not None:
        kwargs["projection_dim"] = projection
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def clip_text_encoder(config: Any, with_projection: bool):
    """``CLIPTextModelWithProjection`` (pooled projection, as SDXL's second and SD3's encoders)
    or ``CLIPTextModel`` from ``config``, at random init from the global torch generator."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vae(latent_channels: int = 4, **overrides: Any):
    """``AutoencoderKL``, by default 3 x 32 x 32 pixels <-> ``latent_channels`` x 16 x 16."""
    from diffusers import AutoencoderKL

    kwargs = dict(in_channels=3, out_channels=3, latent_channels=latent_channels,
                  down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                  block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                  sample_size=DEFAULT_IMAGE_SIZE)
    kwargs.update(overrides)
    if "block_out_channels" in overrides and "down_block_types" not in overrides:
        levels = len(kwargs["block_out_channels"])
        kwargs["down_block_types"] = ("DownEncoderBlock2D",) * levels
        kwargs["up_block_types"] = ("UpDecoderBlock2D",) * levels
    return AutoencoderKL(**kwargs)


def _unet_widths(size: str) -> tuple[int, ...]:
    widths = {"tiny": (32, 64), "small": (64, 128, 256)}
    if size not in widths:
        raise ValueError(f"size must be one of {sorted(widths)}, got {size!r}")
    return widths[size]


def sdxl_unet(widths: Sequence[int] = (32, 64), *, pooled_dim: int = 32, time_embed_dim: int = 8,
              **overrides: Any):
    """An SDXL-shaped ``UNet2DConditionModel``: a plain first level, cross-attention below it,
    ``text_time`` added conditioning (pooled text projection of width ``pooled_dim`` + 6 time ids
    x ``time_embed_dim``), linear projections in the transformers.

    Args:
        widths: ``block_out_channels``, one per resolution level.
        overrides: any other UNet2DConditionModel argument (depths, head dims, sizes, ...).
    """
    from diffusers import UNet2DConditionModel

    levels = len(widths)
    kwargs = dict(
        sample_size=DEFAULT_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        block_out_channels=tuple(widths), layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        transformer_layers_per_block=tuple(range(levels)) if levels > 2 else (1, 2),
        attention_head_dim=tuple(max(1, w // 32) for w in widths), cross_attention_dim=64,
        norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim)
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)


def sd3_transformer(**overrides: Any):
    """An ``SD3Transformer2DModel`` (joint attention blocks), by default 2 layers of 2 heads x 16
    on 16-channel latents, patch 2; ``overrides`` replace any constructor argument."""
    from diffusers import SD3Transformer2DModel

    heads = overrides.get("num_attention_heads", 2)
    kwargs = dict(sample_size=DEFAULT_IMAGE_SIZE // 2, patch_size=2, in_channels=16, num_layers=2,
                  attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                  caption_projection_dim=16 * heads, pooled_projection_dim=32, out_channels=16,
                  pos_embed_max_size=32)
    kwargs.update(overrides)
    return SD3Transformer2DModel(**kwargs)


def euler_scheduler(**overrides: Any):
    """``EulerDiscreteScheduler`` with SDXL's training betas, "leading" spacing, offset 1."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**{**SDXL_BETAS, "timestep_spacing": "leading",
                                     "steps_offset": 1, **overrides})


def flow_match_scheduler(shift: float = 3.0, **overrides: Any):
    """``FlowMatchEulerDiscreteScheduler`` (SD3's, shift 3 by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, **overrides)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global torch generator seeded by ``seed``; restore it afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def unzero(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Re-draw (seeded, normal with ``std``) every all-zero weight (diffusers' zero-initialised
    output projections), so the module's residuals are not identically zero."""
    with seeded(seed), torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("weight") and param.dim() > 1 and not param.any():
                param.normal_(0.0, std)
    return module


def sdxl_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusionXLPipeline with an SDXL-shaped U-Net (text_time added embeddings, two
    CLIP encoders, cross-attention transformer depth growing with resolution level)."""
    from diffusers import StableDiffusionXLPipeline

    widths = _unet_widths(size)
    with seeded(seed):
        unet = sdxl_unet(widths)
        text_encoder = clip_text_encoder(clip_text_config(32, None), with_projection=False)
        text_encoder_2 = clip_text_encoder(clip_text_config(32, 32), with_projection=True)
        autoencoder = vae(4, scaling_factor=0.5)
    pipe = StableDiffusionXLPipeline(
        vae=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
        scheduler=euler_scheduler(), force_zeros_for_empty_prompt=False)
    return _finish(pipe, dtype)


def sd_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline (SD1.5-shaped U-Net, one CLIP encoder, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    widths = _unet_widths(size)
    levels = len(widths)
    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=DEFAULT_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
            block_out_channels=widths, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8)
        text_encoder = clip_text_encoder(clip_text_config(32, None), with_projection=False)
        autoencoder = vae(4, scaling_factor=0.5)
    scheduler = DDIMScheduler(**SDXL_BETAS, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=autoencoder, text_encoder=text_encoder,
                                   tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _finish(pipe, dtype)


def sd3_pipeline(seed: int = 0, size: str = "tiny", dtype: torch.dtype = torch.float32):
    """A StableDiffusion3Pipeline with an SD3-shaped MMDiT (joint attention blocks, two CLIP
    encoders with projections, no T5), a 16-channel VAE and flow-matching Euler."""
    from diffusers import StableDiffusion3Pipeline

    layers, heads = {"tiny": (2, 2), "small": (6, 4)}.get(size, (None, None))
    if layers is None:
        raise ValueError(f"size must be 'tiny' or 'small', got {size!r}")
    with seeded(seed):
        transformer = sd3_transformer(num_layers=layers, num_attention_heads=heads)
        text_encoder = clip_text_encoder(clip_text_config(16, 16), with_projection=True)
        text_encoder_2 = clip_text_encoder(clip_text_config(16, 16), with_projection=True)
        autoencoder = vae(16, scaling_factor=1.5, shift_factor=0.06, use_quant_conv=False,
                          use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_match_scheduler(), vae=autoencoder,
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
