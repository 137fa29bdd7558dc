"""Tiny random-init U-Net pipelines outside the stageable ``[uncond; cond]`` families, built
offline: DeepFloyd IF stage I and the Kandinsky 2.2 decoder (block types the U-Net stage adapter
does not stage), Stable Video Diffusion (a U-Net without a stage adapter, guided by a per-frame
scale), AnimateDiff (a motion U-Net whose text conditioning is repeated per frame) and
InstructPix2Pix (three guidance branches).

IF and Kandinsky 2.2 stack ``[uncond; cond]`` in one ``UNet2DConditionModel`` call per step
(exact CBP), from ``ResnetDownsampleBlock2D`` / ``SimpleCrossAttn*`` blocks with added key/value
attention, and both predict a learned variance next to the noise (twice the latent channels out).
Stable Video Diffusion stacks ``[uncond; cond]`` frames for its ``UNetSpatioTemporalConditionModel``
and guides each frame with its own scale (a ``(B, F, 1, 1, 1)`` tensor). AnimateDiff's
``UNetMotionModel`` takes prompt embeddings of ``2 B x frames`` rows. With ``k > 0`` these four
run CBP throughout, with a note naming the block type or the missing adapter.

InstructPix2Pix stacks ``[text; image; uncond]`` (3 B rows for B images): CBP splits the rows
exactly when there is an even number of them; pipelining is off (no cond/uncond pair to time it).

``build_unet_kin(name, seed)`` and :func:`instruct_pix2pix` return ``(pipe, call_kwargs)``; the
same seed gives the same weights and inputs in every process. IF and Kandinsky 2.2 take
precomputed, seeded conditioning (IF: T5-width prompt embeddings; Kandinsky 2.2: CLIP image
embeddings), so no text or image encoder is needed; Stable Video Diffusion encodes a seeded image
with a tiny CLIP vision model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .pipelines import seeded

#: the keyword arguments of these U-Nets that differ from the repository's SD-shaped ones
_KIN_BLOCKS = dict(
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    resnet_time_scale_shift="scale_shift", layers_per_block=1, block_out_channels=(16, 32),
    norm_num_groups=8)


def deepfloyd_if(seed: int = 0):
    """IFPipeline (stage I: pixel-space 3 -> 6 channels, text added embedding, DDPM with learned
    variance and dynamic thresholding), 16 x 16 px; prompt embeddings 6 tokens x 32."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnAddedKVProcessor

    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=3, out_channels=6, cross_attention_dim=32,
            encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
            addition_embed_type_num_heads=2, cross_attention_norm="group_norm", act_fn="gelu",
            **_KIN_BLOCKS)
    unet.set_attn_processor(AttnAddedKVProcessor())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              thresholding=True, dynamic_thresholding_ratio=0.95,
                              sample_max_value=1.0, variance_type="learned_range")
    pipe = IFPipeline(tokenizer=None, text_encoder=None, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt_embeds": torch.randn(1, 6, 32, generator=gen),
              "negative_prompt_embeds": torch.randn(1, 6, 32, generator=gen),
              "height": 16, "width": 16, "guidance_scale": 4.0, "output_type": "pt"}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def kandinsky22(seed: int = 0):
    """KandinskyV22Pipeline (decoder: image-embedding conditioning through ``image_proj``, MoVQ
    latents 4 -> 8 channels, DDIM), 32 x 32 px -> 4 x 4 latents; image embeddings of width 32."""
    from diffusers import DDIMScheduler, KandinskyV22Pipeline, UNet2DConditionModel, VQModel

    with seeded(seed):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=32,
            encoder_hid_dim_type="image_proj", cross_attention_dim=40, attention_head_dim=4,
            **_KIN_BLOCKS)
        movq = VQModel(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                       down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                       up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                       latent_channels=4, layers_per_block=1, norm_num_groups=8,
                       norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4)
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = KandinskyV22Pipeline(unet=unet, scheduler=scheduler, movq=movq)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"image_embeds": torch.randn(1, 32, generator=gen),
              "negative_image_embeds": torch.randn(1, 32, generator=gen),
              "height": 32, "width": 32, "guidance_scale": 4.0, "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def _seeded_image(seed: int, size: int = 32):
    """An RGB PIL image of seeded uniform noise, ``size`` x ``size`` px."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def stable_video_diffusion(seed: int = 0):
    """StableVideoDiffusionPipeline (image-to-video: a spatio-temporal U-Net, 8 -> 4 channels on
    image-conditioned latents, Karras Euler with v-prediction, the guidance scale ramped per
    frame from 1 to 2.5), 2 frames of 32 x 32 px -> 2 x 4 x 4 x 4 latents."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded(seed):
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=8,
            out_channels=4, cross_attention_dim=32, num_attention_heads=8,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            projection_class_embeddings_input_dim=96, addition_time_embed_dim=32)
        autoencoder = AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"))
        # the pipeline resizes the conditioning image to 224 px for its image encoder
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
            image_size=224, patch_size=14, intermediate_size=37))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        interpolation_type="linear", prediction_type="v_prediction", sigma_max=700.0,
        sigma_min=0.002, steps_offset=1, timestep_spacing="leading", timestep_type="continuous",
        use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(
        vae=autoencoder, image_encoder=encoder, unet=unet, scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    kwargs = {"image": _seeded_image(seed), "num_frames": 2, "decode_chunk_size": 2,
              "height": 32, "width": 32, "min_guidance_scale": 1.0, "max_guidance_scale": 2.5,
              "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def animatediff(seed: int = 0):
    """AnimateDiffPipeline (a UNetMotionModel: the tiny SD U-Net's blocks plus a motion adapter;
    the prompt embeddings are repeated per frame, ``[uncond; cond]`` of ``2 B x frames`` rows),
    two prompts, 2 frames of 32 x 32 px -> 2 videos of 4 x 2 x 16 x 16 latents, DDIM."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    from .pipelines import sd_pipeline

    base = sd_pipeline(seed=seed)
    with seeded(seed + 1):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16),
            layers_per_block=2, norm_num_groups=2, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        motion = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=2,
                               motion_norm_num_groups=2, motion_num_attention_heads=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                              clip_sample=False)
    pipe = AnimateDiffPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        motion_adapter=motion, scheduler=scheduler, feature_extractor=None, image_encoder=None)
    # two prompts: diffusers' AnimateDiff makes one video per prompt (num_videos_per_prompt is
    # fixed to 1), and two videos give per-frame embeddings of 2 x 2 x 2 rows to split
    kwargs = {"prompt": ["a red fox", "a grey cat"], "negative_prompt": ["blur", "noise"],
              "guidance_scale": 7.5, "num_frames": 2, "height": 32, "width": 32,
              "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


def instruct_pix2pix(seed: int = 0, xl: bool = False):
    """StableDiffusionInstructPix2PixPipeline from the tiny SD components (CLIP text encoder,
    32 px VAE) with an 8-channel-input U-Net (latents + image latents), or with ``xl`` the
    StableDiffusionXLInstructPix2PixPipeline from the tiny SDXL ones; a seeded 32 px image."""
    from diffusers import (
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionXLInstructPix2PixPipeline,
        UNet2DConditionModel,
    )

    from .pipelines import sd_pipeline, sdxl_pipeline, sdxl_unet

    base = (sdxl_pipeline if xl else sd_pipeline)(seed=seed)
    with seeded(seed + 1):
        if xl:
            unet = sdxl_unet(in_channels=8)
        else:
            unet = UNet2DConditionModel(
                sample_size=16, in_channels=8, out_channels=4, block_out_channels=(8, 16),
                layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if xl:
        pipe = StableDiffusionXLInstructPix2PixPipeline(
            vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
            scheduler=base.scheduler, force_zeros_for_empty_prompt=False, add_watermarker=False)
    else:
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
            scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    kwargs = {"prompt": "make it red", "negative_prompt": "blur", "image": _seeded_image(seed),
              "guidance_scale": 4.0, "image_guidance_scale": 1.5, "output_type": "latent"}
    pipe.set_progress_bar_config(disable=True)
    return pipe, kwargs


#: name -> builder ``fn(seed=0) -> (pipe, call_kwargs)``
UNET_KIN_BUILDERS: OrderedDict[str, Callable[..., tuple[Any, dict[str, Any]]]] = OrderedDict([
    ("deepfloyd-if", deepfloyd_if),
    ("kandinsky2.2", kandinsky22),
    ("stable-video-diffusion", stable_video_diffusion),
    ("animatediff", animatediff),
])


def build_unet_kin(name: str, seed: int = 0):
    """Build tiny pipeline ``name`` (see :data:`UNET_KIN_BUILDERS`): ``(pipe, call_kwargs)``."""
    if name not in UNET_KIN_BUILDERS:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(UNET_KIN_BUILDERS)}")
    return UNET_KIN_BUILDERS[name](seed=seed)
