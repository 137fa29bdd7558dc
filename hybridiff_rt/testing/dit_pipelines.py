"""Tiny random-init DiT and video pipelines, built offline: PixArt-Sigma, Sana, AuraFlow,
HunyuanDiT, HiDream-I1, Lumina-Next, CogVideoX, LTX-Video, Mochi, Allegro, Latte, CogView3-Plus,
Wan 2.1 / 2.2 text-to-video, Wan image-to-video, SkyReels V2 text-to-video and image-to-video,
Lumina2, Qwen-Image, Qwen-Image-Edit (and Plus), Flux, Flux Kontext, Flux 2 Klein, Ovis-Image,
Krea 2, Nucleus-MoE-Image, CogView4 (also with a control image), Chroma, ChronoEdit, Wan VACE,
Lucy Edit, HunyuanVideo (text- and image-to-video, SkyReels I2V), HunyuanVideo 1.5 (text- and
image-to-video), Kandinsky 5 (T2V, T2I, I2I, I2V), Cosmos 1.0 text-to-world, Cosmos 2
text-to-image and video-to-world, Cosmos-Predict2.5 text-to-world, HunyuanImage 2.1 and its
refiner, Motif-Video (text- and image-to-video); Flux and Chroma also with an IP-Adapter, Sana,
Flux and Qwen-Image also with a ControlNet. Outside :data:`DIT_BUILDERS` (they run the steps their
``strength`` leaves): Chroma, Flux and Qwen-Image img2img, Flux, Qwen-Image, Flux Kontext,
Qwen-Image-Edit and Flux 2 Klein inpainting, Wan video-to-video.

These pipelines' real text encoders (T5, Gemma, UMT5, Qwen2.5-VL, GLM) have no cheap in-memory
stand-in here, so each builder constructs the stock diffusers pipeline with ``text_encoder=None``,
``tokenizer=None`` and ``vae=None`` (a tiny VAE where the pipeline encodes an image) and returns,
with it, call arguments holding seeded random *precomputed* prompt embeddings (and masks /
pooled embeddings where the pipeline needs them). Call the pipeline with
``output_type="latent"``; without a VAE the pipelines derive their latent size from their
default VAE factor.

``build_dit(name, seed)`` returns ``(pipe, call_kwargs)``; the same seed gives the same weights
and embeddings in every process. :data:`DIT_INFO` records, per name, the pipeline class, how it
applies guidance ("batched" [uncond; cond] or "two-call") and the call arguments that switch
guidance on. Sizes are chosen for unit tests: a denoiser call takes milliseconds on one thread.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .pipelines import flow_match_scheduler, seeded, unzero, vae


@dataclasses.dataclass(frozen=True)
class DiTInfo:
    """Facts about one tiny pipeline.

    Attributes:
        pipeline_class: the diffusers pipeline class name.
        guidance: "batched" (one call on [uncond; cond]) or "two-call" (cond, then uncond).
        guidance_kwargs: the call arguments that switch classifier-free guidance on.
        experts: the pipeline attributes holding denoisers.
        cond_first: a batched pipeline that stacks [cond; uncond] (cond first).
    """

    pipeline_class: str
    guidance: str
    guidance_kwargs: dict[str, Any]
    experts: tuple[str, ...] = ("transformer",)
    cond_first: bool = False


def _embeds(gen: torch.Generator, batch: int, tokens: int, width: int) -> torch.Tensor:
    return torch.randn(batch, tokens, width, generator=gen)


def _masked_embeds(seed: int, tokens: int, width: int) -> dict[str, Any]:
    """Call arguments with seeded prompt and negative embeddings (1, ``tokens``, ``width``)
    drawn from ``seed + 1`` and all-ones attention masks (1, ``tokens``)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {"prompt": None, "prompt_embeds": _embeds(gen, 1, tokens, width),
            "negative_prompt_embeds": _embeds(gen, 1, tokens, width),
            "prompt_attention_mask": torch.ones(1, tokens),
            "negative_prompt_attention_mask": torch.ones(1, tokens)}


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_transformer(size: str = "tiny", **overrides: Any):
    """A ``PixArtTransformer2DModel`` (AdaLN-single DiT with cross-attention), learned sigma
    (8 output channels for 4 latent channels), caption width 32."""
    from diffusers import PixArtTransformer2DModel

    layers, heads = {"tiny": (2, 2), "small": (8, 4)}[size]
    kwargs = {"num_attention_heads": heads, "attention_head_dim": 16, "in_channels": 4,
              "out_channels": 8, "num_layers": layers, "cross_attention_dim": 16 * heads,
              "sample_size": 8, "patch_size": 2, "caption_channels": 32, "norm_num_groups": 2}
    kwargs.update(overrides)
    return PixArtTransformer2DModel(**kwargs)


def pixart_sigma(seed: int = 0, size: str = "tiny"):
    """PixArtSigmaPipeline, 64 px -> 8 x 8 latents (vae=None: factor 8), DDIM."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline

    with seeded(seed):
        transformer = pixart_transformer(size)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None,
                               transformer=transformer, scheduler=DDIMScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    side = 64 if size == "tiny" else 256
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
              "prompt_attention_mask": torch.ones(1, 6),
              "negative_prompt_attention_mask": torch.ones(1, 6),
              "height": side, "width": side, "use_resolution_binning": False}
    return _finish(pipe), kwargs


def sana(seed: int = 0, size: str = "tiny"):
    """SanaPipeline (linear-attention DiT), 256 px -> 8 x 8 latents (vae=None: factor 32)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )

    layers = {"tiny": 2, "small": 8}[size]
    with seeded(seed):
        transformer = SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=layers, num_cross_attention_heads=2, cross_attention_head_dim=16,
            cross_attention_dim=32, caption_channels=32, sample_size=8, patch_size=1)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                        scheduler=DPMSolverMultistepScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
              "prompt_attention_mask": torch.ones(1, 6),
              "negative_prompt_attention_mask": torch.ones(1, 6),
              "height": 256, "width": 256, "use_resolution_binning": False}
    return _finish(pipe), kwargs


def sana_controlnet(seed: int = 0, size: str = "tiny"):
    """SanaControlNetPipeline on :func:`sana`'s transformer and embeddings, with a tiny
    ``SanaControlNetModel`` (two blocks, drawn from ``seed + 3``; its zero-initialised output
    projections re-drawn from ``seed + 4``, so its residuals are not zero) and a tiny
    ``AutoencoderDC`` (32x compression, 4 channels wide, drawn from ``seed + 5``), which encodes
    the ``control_image`` (1, 3, 256, 256) in [0, 1] drawn from ``seed + 6``. One batched
    ``[uncond; cond]`` call per step, with the ControlNet's residuals batched alike."""
    from diffusers import AutoencoderDC, SanaControlNetModel, SanaControlNetPipeline

    base, kwargs = sana(seed, size)
    with seeded(seed + 3):
        controlnet = SanaControlNetModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
            cross_attention_dim=32, caption_channels=32, sample_size=8, patch_size=1)
    unzero(controlnet, seed + 4)
    with seeded(seed + 5):
        autoencoder = AutoencoderDC(
            in_channels=3, latent_channels=4, attention_head_dim=4,
            encoder_block_out_channels=(4,) * 6, decoder_block_out_channels=(4,) * 6,
            encoder_layers_per_block=(1,) * 6, decoder_layers_per_block=(1,) * 6,
            encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6)
    pipe = SanaControlNetPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                                  transformer=base.transformer, controlnet=controlnet,
                                  scheduler=base.scheduler)
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(seed + 6))
    return _finish(pipe), dict(kwargs, control_image=image)


def auraflow(seed: int = 0, size: str = "tiny"):
    """AuraFlowPipeline (MMDiT + single DiT blocks, flow matching), 64 px -> 8 x 8 latents."""
    from diffusers import (
        AuraFlowPipeline,
        AuraFlowTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )

    with seeded(seed):
        transformer = AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
            num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
            pos_embed_max_size=64)
    pipe = AuraFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "prompt_attention_mask": torch.ones(1, 6),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_attention_mask": torch.ones(1, 6), "height": 64, "width": 64}
    return _finish(pipe), kwargs


def hunyuan_dit(seed: int = 0, size: str = "tiny"):
    """HunyuanDiTPipeline (DiT with long skip connections: of its 6 blocks, blocks 4 and 5 take
    the outputs of blocks 1 and 0; CLIP + T5 text, learned sigma, rotary table passed to the
    denoiser), 64 px -> 8 x 8 latents."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    with seeded(seed):
        transformer = HunyuanDiT2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=6, attention_head_dim=8,
            num_attention_heads=2, cross_attention_dim=32, cross_attention_dim_t5=32,
            pooled_projection_dim=16, hidden_size=16, text_len=6, text_len_t5=6,
            learn_sigma=True)
    pipe = HunyuanDiTPipeline(tokenizer=None, text_encoder=None, tokenizer_2=None,
                              text_encoder_2=None, vae=None, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None,
                              feature_extractor=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "prompt_attention_mask": torch.ones(1, 6),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_attention_mask": torch.ones(1, 6),
              "prompt_embeds_2": _embeds(gen, 1, 6, 32),
              "prompt_attention_mask_2": torch.ones(1, 6),
              "negative_prompt_embeds_2": _embeds(gen, 1, 6, 32),
              "negative_prompt_attention_mask_2": torch.ones(1, 6), "height": 64, "width": 64,
              "use_resolution_binning": False}
    return _finish(pipe), kwargs


#: attention heads and blocks of the Wan-shaped transformers, per size
WAN_SIZES = {"tiny": (2, 2), "small": (4, 6)}


def wan_transformer_kwargs(size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """Constructor arguments of a Wan-shaped transformer (Wan, SkyReels V2): 4-channel latents,
    patch (1, 2, 2), head width 16, text width 16; ``overrides`` replace any of them."""
    heads, layers = WAN_SIZES[size]
    kwargs = {"patch_size": (1, 2, 2), "num_attention_heads": heads, "attention_head_dim": 16,
              "in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 16,
              "ffn_dim": 32 * heads, "num_layers": layers, "rope_max_seq_len": 32}
    return {**kwargs, **overrides}


def hidream(seed: int = 0, size: str = "tiny"):
    """HiDreamImagePipeline (dual- then single-stream blocks with mixture-of-experts feed-forward;
    one batched [uncond; cond] call per step) at 64 px -> 8 x 8 latents, 16 tokens. Its text
    conditioning: T5 embeddings (1, 6, 8), the hidden states of two Llama 3 layers stacked in
    front, (2, 1, 5, 4), which the pipeline joins along axis 1, and pooled embeddings (1, 16).
    The transformer appends one of the two Llama layers (in turn) to a stream before each of its
    blocks (2 dual- and 2 single-stream blocks; "small": 3 of each). The pipeline rescales every
    request to the area of ``default_sample_size`` latents a side, set to 8 here; the transformer
    is put in eval mode (in training mode it returns patches)."""
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    layers = {"tiny": 2, "small": 3}[size]
    with seeded(seed):
        transformer = HiDreamImageTransformer2DModel(
            patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
            num_single_layers=layers, attention_head_dim=8, num_attention_heads=4,
            caption_channels=[8, 4], text_emb_dim=16, num_routed_experts=4,
            num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32),
            llama_layers=[0, 1] * layers).eval()
    pipe = HiDreamImagePipeline(
        scheduler=flow_match_scheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        text_encoder_4=None, tokenizer_4=None, transformer=transformer)
    pipe.default_sample_size = 8
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "prompt_embeds_t5": _embeds(gen, 1, 6, 8),
              "negative_prompt_embeds_t5": _embeds(gen, 1, 6, 8),
              "prompt_embeds_llama3": torch.randn(2, 1, 5, 4, generator=gen),
              "negative_prompt_embeds_llama3": torch.randn(2, 1, 5, 4, generator=gen),
              "pooled_prompt_embeds": torch.randn(1, 16, generator=gen),
              "negative_pooled_prompt_embeds": torch.randn(1, 16, generator=gen),
              "height": 64, "width": 64}
    return _finish(pipe), kwargs


def lumina_next(seed: int = 0, size: str = "tiny"):
    """LuminaPipeline (Lumina-Next: a DiT on [cond; uncond], cond first, guiding three latent
    channels), 32 px -> 4 x 4 latents (vae=None: factor 8)."""
    from diffusers import LuminaNextDiT2DModel, LuminaPipeline

    with seeded(seed):
        transformer = LuminaNextDiT2DModel(
            sample_size=4, patch_size=2, in_channels=4, hidden_size=4,
            num_layers={"tiny": 2, "small": 3}[size], num_attention_heads=1, num_kv_heads=1,
            multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True,
            qk_norm=True, cross_attention_dim=8, scaling_factor=1.0)
    pipe = LuminaPipeline(transformer=transformer, scheduler=flow_match_scheduler(), vae=None,
                          text_encoder=None, tokenizer=None)
    kwargs = _masked_embeds(seed, 6, 8)
    return _finish(pipe), dict(kwargs, negative_prompt=None, height=32, width=32,
                               clean_caption=False)


def cogvideox(seed: int = 0, size: str = "tiny"):
    """CogVideoXPipeline (dual-stream video DiT, rotary tables), 9 frames of 16 px -> 3 x 2 x 2
    latents of 4 channels (vae=None: factors 4 in time, 8 in space), 12 video tokens."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    with seeded(seed):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
            time_embed_dim=2, text_embed_dim=32, num_layers={"tiny": 1, "small": 3}[size],
            sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=16)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "prompt_embeds": _embeds(gen, 1, 16, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 16, 32), "height": 16, "width": 16,
              "num_frames": 9}
    return _finish(pipe), kwargs


def ltx_video(seed: int = 0, size: str = "tiny"):
    """LTXPipeline (video DiT, cross-attention to the text, rotary tables), 9 frames of 64 px ->
    2 x 2 x 2 latents of 8 channels (vae=None: factors 8 in time, 32 in space)."""
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    with seeded(seed):
        transformer = LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4,
            attention_head_dim=8, cross_attention_dim=32,
            num_layers={"tiny": 1, "small": 3}[size], caption_channels=32)
    pipe = LTXPipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                       tokenizer=None, transformer=transformer)
    kwargs = _masked_embeds(seed, 6, 32)
    return _finish(pipe), dict(kwargs, height=64, width=64, num_frames=9)


def mochi(seed: int = 0, size: str = "tiny"):
    """MochiPipeline (asymmetric dual-stream video DiT), 7 frames of 16 px -> 2 x 2 x 2 latents
    of 12 channels (vae=None: factors 6 in time, 8 in space)."""
    from diffusers import MochiPipeline, MochiTransformer3DModel

    with seeded(seed):
        transformer = MochiTransformer3DModel(
            patch_size=2, num_attention_heads=2, attention_head_dim=8,
            num_layers={"tiny": 2, "small": 3}[size], pooled_projection_dim=16, in_channels=12,
            qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4, activation_fn="swiglu",
            max_sequence_length=16)
    pipe = MochiPipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)
    kwargs = _masked_embeds(seed, 16, 32)
    return _finish(pipe), dict(kwargs, height=16, width=16, num_frames=7)


def allegro(seed: int = 0, size: str = "tiny"):
    """AllegroPipeline (video DiT with cross-attention, rotary tables), 8 frames of 64 px ->
    latents of 4 channels (vae=None: factors 4 in time, 8 in space)."""
    from diffusers import AllegroPipeline, AllegroTransformer3DModel, DDIMScheduler

    with seeded(seed):
        transformer = AllegroTransformer3DModel(
            num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            num_layers={"tiny": 1, "small": 3}[size], cross_attention_dim=24, sample_width=8,
            sample_height=8, sample_frames=8, caption_channels=24)
    pipe = AllegroPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=DDIMScheduler())
    kwargs = _masked_embeds(seed, 6, 24)
    return _finish(pipe), dict(kwargs, negative_prompt=None, height=64, width=64, num_frames=8,
                               clean_caption=False)


def latte(seed: int = 0, size: str = "tiny"):
    """LattePipeline (spatial and temporal blocks interleaved; one frame of 64 px -> 8 x 8
    latents). Not staged: its forward reshapes the flow between a spatial and a temporal block,
    so it runs CBP only."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    with seeded(seed):
        transformer = LatteTransformer3DModel(
            sample_size=8, num_layers={"tiny": 1, "small": 3}[size], patch_size=2,
            attention_head_dim=8, num_attention_heads=3, caption_channels=8, in_channels=4,
            cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
            norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                         scheduler=DDIMScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 8),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 8), "height": 64, "width": 64,
              "video_length": 1, "mask_feature": False, "clean_caption": False}
    return _finish(pipe), kwargs


def cogview3_plus(seed: int = 0, size: str = "tiny"):
    """CogView3PlusPipeline (dual-stream DiT), 64 px -> 8 x 8 latents of 4 channels."""
    from diffusers import CogView3PlusPipeline, CogView3PlusTransformer2DModel
    from diffusers import CogVideoXDDIMScheduler  # CogView3-Plus's own scheduler

    with seeded(seed):
        transformer = CogView3PlusTransformer2DModel(
            patch_size=2, in_channels=4, num_layers={"tiny": 1, "small": 3}[size],
            attention_head_dim=4, num_attention_heads=2, out_channels=4, text_embed_dim=32,
            time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8)
    pipe = CogView3PlusPipeline(tokenizer=None, text_encoder=None, vae=None,
                                transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32), "height": 64, "width": 64}
    return _finish(pipe), kwargs


def wan_transformer(size: str = "tiny", **overrides: Any):
    """A ``WanTransformer3DModel`` (:func:`wan_transformer_kwargs`)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**wan_transformer_kwargs(size, **overrides))


def skyreels_v2_transformer(size: str = "tiny", **overrides: Any):
    """A ``SkyReelsV2Transformer3DModel`` (Wan-shaped blocks; :func:`wan_transformer_kwargs`)."""
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**wan_transformer_kwargs(size, **overrides))


def wan_vae():
    """A tiny ``AutoencoderKLWan``: 4 latent channels, 8x spatial and 4x temporal compression
    (5 frames -> 2)."""
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4)


def _random_picture(gen: torch.Generator, side: int):
    """A ``side`` x ``side`` RGB PIL image of uniform noise drawn from ``gen``."""
    from PIL import Image

    pixels = (torch.rand(side, side, 3, generator=gen) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")


def _random_video(seed: int, side: int, frames: int) -> list:
    """``frames`` PIL frames of ``side`` px, uniform noise drawn from ``seed + 6`` (the video
    the video-to-video, editing and control pipelines take)."""
    gen = torch.Generator().manual_seed(seed + 6)
    return [_random_picture(gen, side) for _ in range(frames)]


def _flow_unipc(flow_shift: float):
    """The video pipelines' ``UniPCMultistepScheduler`` on flow sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=flow_shift)


def _video_call(seed: int, size: str = "tiny", text_tokens: int = 6,
                with_image: bool = False) -> dict[str, Any]:
    """Call arguments of the tiny video pipelines, drawn from ``seed + 1``: (a 64 px first frame,
    then) precomputed prompt and negative embeddings of ``text_tokens`` tokens of width 16,
    5 frames of 64 px (``size="small"``: 9 frames of 256 px)."""
    gen = torch.Generator().manual_seed(seed + 1)
    image = {"image": _random_picture(gen, 64)} if with_image else {}
    side, frames = (64, 5) if size == "tiny" else (256, 9)
    return {**image, "prompt": None, "negative_prompt": None,
            "prompt_embeds": _embeds(gen, 1, text_tokens, 16),
            "negative_prompt_embeds": _embeds(gen, 1, text_tokens, 16), "height": side,
            "width": side, "num_frames": frames}


def _wan(seed: int, size: str, experts: int):
    from diffusers import WanPipeline

    with seeded(seed):
        transformer = wan_transformer(size)
        extra = {}
        if experts == 2:  # Wan 2.2 A14B: high-noise and low-noise experts, switched at a boundary
            # at t = 875: with 3 steps (timesteps 999, 857, 600) step 0 runs on transformer and
            # steps 1-2 on transformer_2
            extra = {"transformer_2": wan_transformer(size), "boundary_ratio": 0.875}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=_flow_unipc(3.0), **extra)
    kwargs = _video_call(seed, size)
    if experts == 2:
        kwargs["guidance_scale_2"] = 3.0
    return _finish(pipe), kwargs


def wan21(seed: int = 0, size: str = "tiny"):
    """WanPipeline (Wan 2.1 text-to-video), 5 frames of 64 px -> 2 x 8 x 8 latents, UniPC
    (``size="small"``: 9 frames of 256 px -> 3 x 32 x 32 latents)."""
    return _wan(seed, size, 1)


def wan22(seed: int = 0, size: str = "tiny"):
    """WanPipeline with two experts (Wan 2.2 A14B layout: ``transformer`` for t >= 875,
    ``transformer_2`` below, ``guidance_scale_2`` 3.0 for the low-noise expert)."""
    return _wan(seed, size, 2)


def skyreels_v2(seed: int = 0, size: str = "tiny"):
    """SkyReelsV2Pipeline (text-to-video; its loop makes a cond then an uncond call), 5 frames of
    64 px -> 2 x 8 x 8 latents, UniPC (``size="small"``: 9 frames of 256 px -> 3 x 32 x 32)."""
    from diffusers import SkyReelsV2Pipeline

    with seeded(seed):
        transformer = skyreels_v2_transformer(size)
    pipe = SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, vae=None,
                              transformer=transformer, scheduler=_flow_unipc(8.0))
    return _finish(pipe), _video_call(seed, size)


def wan21_i2v(seed: int = 0, size: str = "tiny"):
    """WanImageToVideoPipeline without an image encoder (the Wan 2.2 I2V layout: the image enters
    only as conditioning latents concatenated to the noise), a tiny ``AutoencoderKLWan`` to
    encode the first frame, 5 frames of 64 px -> 2 x 8 x 8 latents (4 + 8 input channels)."""
    from diffusers import WanImageToVideoPipeline

    with seeded(seed):
        autoencoder = wan_vae()
        transformer = wan_transformer(size, in_channels=12)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                                   transformer=transformer, scheduler=_flow_unipc(3.0),
                                   image_encoder=None, image_processor=None)
    return _finish(pipe), _video_call(seed, with_image=True)


def clip_image_encoder():
    """A tiny ``CLIPVisionModelWithProjection`` (32 px, 8 px patches: 16 + 1 tokens of width 16)
    and its ``CLIPImageProcessor``, the image encoder of the Wan 2.1 / SkyReels V2 image-to-video
    layout (the pipelines take its second-to-last hidden states)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, intermediate_size=37))
    return encoder, CLIPImageProcessor(crop_size=32, size=32)


#: text tokens of the image-to-video layouts with an image encoder: their attention takes the last
#: 512 context tokens as the text (hard-coded in diffusers) and the ones before as the image's
I2V_TEXT_TOKENS = 512


def _i2v_with_clip(seed: int, size: str, make_transformer: Callable[..., Any],
                   pipeline_class: str, flow_shift: float):
    """An image-to-video pipeline of the Wan 2.1 I2V layout (see :func:`wan21_i2v_clip`) on the
    transformer ``make_transformer(size, **overrides)`` makes."""
    import diffusers

    with seeded(seed):
        autoencoder = wan_vae()
        transformer = make_transformer(size, in_channels=12, image_dim=16,
                                       added_kv_proj_dim=16 * WAN_SIZES[size][0])
        encoder, processor = clip_image_encoder()
    pipe = getattr(diffusers, pipeline_class)(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer,
        scheduler=_flow_unipc(flow_shift), image_encoder=encoder, image_processor=processor)
    return _finish(pipe), _video_call(seed, text_tokens=I2V_TEXT_TOKENS, with_image=True)


def wan21_i2v_clip(seed: int = 0, size: str = "tiny"):
    """WanImageToVideoPipeline in the Wan 2.1 I2V layout: a tiny CLIP image encoder whose tokens
    both calls of a step get as ``encoder_hidden_states_image`` (projected by the transformer's
    image embedder, attended through added key/value projections), 512 text tokens, and the first
    frame's latents concatenated to the noise as in :func:`wan21_i2v`."""
    return _i2v_with_clip(seed, size, wan_transformer, "WanImageToVideoPipeline", 3.0)


def skyreels_v2_i2v(seed: int = 0, size: str = "tiny"):
    """SkyReelsV2ImageToVideoPipeline: :func:`wan21_i2v_clip`'s layout (a tiny CLIP image
    encoder, 512 text tokens, the first frame's latents concatenated to the noise) on a
    ``SkyReelsV2Transformer3DModel``."""
    return _i2v_with_clip(seed, size, skyreels_v2_transformer, "SkyReelsV2ImageToVideoPipeline",
                          5.0)


def chronoedit_transformer(size: str = "tiny", **overrides: Any):
    """A ``ChronoEditTransformer3DModel`` (Wan-shaped blocks; :func:`wan_transformer_kwargs`)."""
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**wan_transformer_kwargs(size, **overrides))


def chronoedit(seed: int = 0, size: str = "tiny"):
    """ChronoEditPipeline (image editing as a short video: :func:`wan21_i2v_clip`'s layout, a
    tiny CLIP image encoder, 512 text tokens, the input image's latents concatenated to the
    noise) on a ``ChronoEditTransformer3DModel``; without temporal reasoning the pipeline makes
    5 frames (2 x 8 x 8 latents)."""
    return _i2v_with_clip(seed, size, chronoedit_transformer, "ChronoEditPipeline", 5.0)


def wan_vace(seed: int = 0, size: str = "tiny"):
    """WanVACEPipeline (Wan with a VACE control branch: its blocks, run before the main ones,
    make hints the forward adds after main blocks 0 and 2 of 3, at per-layer scales 0.7 and 1.3):
    :func:`wan21`'s call, a tiny ``AutoencoderKLWan`` encoding the control ``video`` (5 frames of
    64 px, seeded noise) and a ``mask`` keeping its left half, 4 x 2 + 64 control channels."""
    from PIL import Image
    from diffusers import WanVACEPipeline, WanVACETransformer3DModel

    with seeded(seed):
        autoencoder = wan_vae()
        transformer = WanVACETransformer3DModel(
            **wan_transformer_kwargs(size, num_layers=3 if size == "tiny" else 6),
            vace_layers=[0, 2], vace_in_channels=4 * 2 + 64)
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                           transformer=transformer, scheduler=_flow_unipc(3.0))
    kwargs = _video_call(seed, size)
    side, frames = kwargs["height"], kwargs["num_frames"]
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (0, 0, side // 2, side))
    return _finish(pipe), dict(kwargs, video=_random_video(seed, side, frames),
                               mask=[mask] * frames, conditioning_scale=[0.7, 1.3])


def wan21_v2v(seed: int = 0, size: str = "tiny"):
    """WanVideoToVideoPipeline: :func:`wan21`'s transformer and scheduler, a tiny
    ``AutoencoderKLWan`` encoding ``video`` (5 frames of 64 px, seeded noise) and ``strength``
    0.6 in the call arguments: with N steps it calls the denoiser on ``int(0.6 N)`` of them. Not
    in :data:`DIT_BUILDERS` (those run every step)."""
    from diffusers import WanVideoToVideoPipeline

    base, kwargs = _wan(seed, size, 1)
    with seeded(seed + 5):
        autoencoder = wan_vae()
    pipe = WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                                   transformer=base.transformer, scheduler=base.scheduler)
    video = _random_video(seed, kwargs["height"], kwargs["num_frames"])
    kwargs = {k: v for k, v in kwargs.items() if k != "num_frames"}
    return _finish(pipe), dict(kwargs, video=video, strength=0.6)


def lucy_edit(seed: int = 0, size: str = "tiny"):
    """LucyEditPipeline (video editing on a Wan transformer: the edited video's latents are
    concatenated to the noise in every call, 4 + 4 input channels), a tiny ``AutoencoderKLWan``
    encoding ``video`` (5 frames of 64 px, seeded noise) -> 2 x 8 x 8 latents, UniPC."""
    from diffusers import LucyEditPipeline

    with seeded(seed):
        autoencoder = wan_vae()
        transformer = wan_transformer(size, in_channels=8)
    pipe = LucyEditPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                            transformer=transformer, scheduler=_flow_unipc(3.0))
    kwargs = _video_call(seed)
    return _finish(pipe), dict(kwargs, video=_random_video(seed, kwargs["height"],
                                                           kwargs["num_frames"]))


def lumina2(seed: int = 0, size: str = "tiny"):
    """Lumina2Pipeline (Lumina-Image 2.0: two calls per step, CFG renormalised, and truncated to
    cond-only calls after ``cfg_trunc_ratio`` of the steps), 64 px -> 8 x 8 latents."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )

    with seeded(seed):
        transformer = Lumina2Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=2,
            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16,
            ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=[4, 2, 2],
            cap_feat_dim=16)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=None, text_encoder=None, tokenizer=None)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 16),
              "prompt_attention_mask": torch.ones(1, 6, dtype=torch.long),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 16),
              "negative_prompt_attention_mask": torch.ones(1, 6, dtype=torch.long),
              "height": 64, "width": 64}
    return _finish(pipe), kwargs


def qwen_image(seed: int = 0, size: str = "tiny"):
    """QwenImagePipeline (MMDiT), 64 px -> 8 x 8 latents packed to 16 tokens of 16 channels."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    layers = {"tiny": 2, "small": 6}[size]
    with seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))
    pipe = QwenImagePipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 16),
              "prompt_embeds_mask": torch.ones(1, 6, dtype=torch.long),
              "negative_prompt_embeds": _embeds(gen, 1, 5, 16),
              "negative_prompt_embeds_mask": torch.ones(1, 5, dtype=torch.long),
              "height": 64, "width": 64}
    return _finish(pipe), kwargs


def qwen_vae():
    """A tiny ``AutoencoderKLQwenImage``: 4 latent channels (what :func:`qwen_image`'s
    transformer takes, packed 2 x 2), 8x spatial compression, one frame."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                  latents_std=[1.0] * 4)


def _qwen_with_vae(cls_name: str, seed: int, size: str, edit: bool = False):
    """A Qwen-Image pipeline class of diffusers on :func:`qwen_image`'s transformer and
    embeddings, with a VAE drawn from ``seed + 5`` and an ``image`` drawn from ``seed + 6`` in
    its call arguments: :func:`qwen_vae` (64 px -> 4 x 8 x 8 latents -> 16 tokens) and a tensor
    (1, 3, 64, 64) in [0, 1]; for the edit pipelines (``edit``), :func:`qwen_edit_vae`, a 64 px
    PIL image (they read its size) and no VL processor."""
    import diffusers

    base, kwargs = qwen_image(seed, size)
    with seeded(seed + 5):
        autoencoder = qwen_edit_vae() if edit else qwen_vae()
    processor = {"processor": None} if edit else {}
    pipe = getattr(diffusers, cls_name)(scheduler=base.scheduler, vae=autoencoder,
                                        text_encoder=None, tokenizer=None,
                                        transformer=base.transformer, **processor)
    gen = torch.Generator().manual_seed(seed + 6)
    image = _random_picture(gen, 64) if edit else torch.rand(1, 3, 64, 64, generator=gen)
    return _finish(pipe), dict(kwargs, image=image)


def qwen_image_img2img(seed: int = 0, size: str = "tiny"):
    """QwenImageImg2ImgPipeline (:func:`_qwen_with_vae`), ``strength`` 0.6: with N steps it
    calls the denoiser on ``int(0.6 N)`` of them. Not in :data:`DIT_BUILDERS` (those run every
    step). Call with ``true_cfg_scale > 1`` for true CFG."""
    pipe, kwargs = _qwen_with_vae("QwenImageImg2ImgPipeline", seed, size)
    return pipe, dict(kwargs, strength=0.6)


def qwen_image_inpaint(seed: int = 0, size: str = "tiny"):
    """QwenImageInpaintPipeline (:func:`_qwen_with_vae`) with :func:`_left_half_mask`;
    ``strength`` 0.6 as in :func:`qwen_image_img2img`."""
    pipe, kwargs = _qwen_with_vae("QwenImageInpaintPipeline", seed, size)
    return pipe, dict(kwargs, mask_image=_left_half_mask(), strength=0.6)


def qwen_image_controlnet(seed: int = 0, size: str = "tiny"):
    """QwenImageControlNetPipeline (:func:`_qwen_with_controlnet`): the ``control_image`` is
    encoded by the VAE. Every step runs the ControlNet once, and both calls add its residuals
    after the transformer's blocks. Call with ``true_cfg_scale > 1`` for true CFG."""
    return _qwen_with_controlnet("QwenImageControlNetPipeline", seed, size)


def qwen_image_controlnet_inpaint(seed: int = 0, size: str = "tiny"):
    """QwenImageControlNetInpaintPipeline (:func:`_qwen_with_controlnet`, its ControlNet taking
    4 more input channels: the packed mask) with :func:`_left_half_mask` as the
    ``control_mask``: the ControlNet gets the encoded image, its masked half blanked, and the
    mask. Generates from noise over every step, as :func:`qwen_image_controlnet`."""
    pipe, kwargs = _qwen_with_controlnet("QwenImageControlNetInpaintPipeline", seed, size,
                                         extra_channels=4)
    return pipe, dict(kwargs, control_mask=_left_half_mask())


def _qwen_with_controlnet(cls_name: str, seed: int, size: str, extra_channels: int = 0):
    """A Qwen-Image ControlNet pipeline class of diffusers on :func:`qwen_image`'s transformer
    and embeddings, with a tiny ``QwenImageControlNetModel`` (one block, ``extra_channels``
    more input channels, drawn from ``seed + 3``; its zero-initialised output projections
    re-drawn from ``seed + 4``, so its residuals are not zero) and :func:`qwen_vae` (drawn from
    ``seed + 5``), and a ``control_image`` (1, 3, 64, 64) in [0, 1] drawn from ``seed + 6`` in
    its call arguments."""
    import diffusers
    from diffusers import QwenImageControlNetModel

    base, kwargs = qwen_image(seed, size)
    with seeded(seed + 3):
        controlnet = QwenImageControlNetModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
            extra_condition_channels=extra_channels)
    unzero(controlnet, seed + 4)
    with seeded(seed + 5):
        autoencoder = qwen_vae()
    pipe = getattr(diffusers, cls_name)(scheduler=base.scheduler, vae=autoencoder,
                                        text_encoder=None, tokenizer=None,
                                        transformer=base.transformer, controlnet=controlnet)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 6))
    return _finish(pipe), dict(kwargs, control_image=image)


def qwen_edit_vae():
    """A tiny ``AutoencoderKLQwenImage`` for the edit pipelines, which rescale their reference
    image to about 1024 x 1024 for it whatever its size: two channels wide (the narrowest whose
    decoder has no empty layers) and 16x spatial compression (64 x 64 latents, 1024 reference
    tokens), so that an encode takes about two seconds on one CPU thread; 4 latent channels, as
    :func:`qwen_vae`."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=2, z_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                                  temperal_downsample=[False, False, True, True],
                                  latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def qwen_image_edit(seed: int = 0, size: str = "tiny"):
    """QwenImageEditPipeline (:func:`_qwen_with_vae`, ``edit``): the output stays at 64 px
    (4 x 4 latents, 4 tokens). Every call gets the 4 noisy tokens followed by the 1024 reference
    tokens, and the loop slices the prediction of the first 4 off each call's result, the cond
    call's before the uncond call is made. Call with ``true_cfg_scale > 1`` for true CFG."""
    return _qwen_with_vae("QwenImageEditPipeline", seed, size, edit=True)


def qwen_image_edit_plus(seed: int = 0, size: str = "tiny"):
    """QwenImageEditPlusPipeline, as :func:`qwen_image_edit` (one reference image)."""
    return _qwen_with_vae("QwenImageEditPlusPipeline", seed, size, edit=True)


def qwen_image_edit_inpaint(seed: int = 0, size: str = "tiny"):
    """QwenImageEditInpaintPipeline (:func:`_qwen_with_vae`, ``edit``) with
    :func:`_left_half_mask`, at ``strength`` 0.6 (with N steps it calls the denoiser on
    ``int(0.6 N)`` of them). Its output takes the size it rescales the image to (about
    1024 x 1024: it masks that image with the mask at the output size, so no other output size
    works): 1024 noisy tokens followed by the image's 1024 reference tokens in every call; the
    loop slices the noisy tokens' prediction off each call's result, the cond call's before the
    uncond call is made. Call with ``true_cfg_scale > 1`` for true CFG."""
    pipe, kwargs = _qwen_with_vae("QwenImageEditInpaintPipeline", seed, size, edit=True)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
    return pipe, dict(kwargs, mask_image=_left_half_mask(), strength=0.6)


def flux(seed: int = 0, size: str = "tiny"):
    """FluxPipeline (dual- and single-stream blocks), 64 px -> 16 tokens; call with
    ``true_cfg_scale > 1`` and the negative embeddings for true CFG."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    layers = {"tiny": 1, "small": 3}[size]
    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    pipe = FluxPipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
              "height": 64, "width": 64}
    return _finish(pipe), kwargs


def hunyuan_video_vae():
    """A tiny ``AutoencoderKLHunyuanVideo``: 4 latent channels, 8x spatial and 4x temporal
    compression (HunyuanVideo's and Kandinsky 5's video autoencoder)."""
    from diffusers import AutoencoderKLHunyuanVideo

    return AutoencoderKLHunyuanVideo(latent_channels=4, block_out_channels=(32,) * 4,
                                     layers_per_block=1)


def hunyuan_video_transformer(size: str = "tiny", **overrides: Any):
    """A tiny ``HunyuanVideoTransformer3DModel``: 4-channel latents, patch 1, width 16, 1 + 1
    (``size="small"``: 3 + 3) dual- and single-stream blocks, text width 16, pooled width 8."""
    from diffusers import HunyuanVideoTransformer3DModel

    layers = {"tiny": 1, "small": 3}[size]
    return HunyuanVideoTransformer3DModel(**{
        "in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
        "num_layers": layers, "num_single_layers": layers, "num_refiner_layers": 1,
        "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16, "pooled_projection_dim": 8,
        "rope_axes_dim": (2, 2, 4), **overrides})


def hunyuan_video(seed: int = 0, size: str = "tiny"):
    """HunyuanVideoPipeline (dual- then single-stream blocks, a token refiner on the text, a
    guidance embedding; true CFG when ``true_cfg_scale > 1`` and negative embeddings are given),
    5 frames of 32 px -> 2 x 4 x 4 latents of 4 channels (vae=None: 4x temporal and 8x spatial
    compression); the negative prompt's last two tokens masked out."""
    from diffusers import HunyuanVideoPipeline

    with seeded(seed):
        transformer = hunyuan_video_transformer(size)
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformer,
                                vae=None, scheduler=flow_match_scheduler(), text_encoder_2=None,
                                tokenizer_2=None)
    kwargs = _masked_embeds(seed, 6, 16)
    kwargs["negative_prompt_attention_mask"][:, -2:] = 0
    gen = torch.Generator().manual_seed(seed + 2)
    return _finish(pipe), dict(kwargs, negative_prompt=None,
                               pooled_prompt_embeds=torch.randn(1, 8, generator=gen),
                               negative_pooled_prompt_embeds=torch.randn(1, 8, generator=gen),
                               height=32, width=32, num_frames=5)


def _hunyuan_video_i2v(seed: int, size: str, condition: str | None,
                       cls_name: str = "HunyuanVideoImageToVideoPipeline"):
    """An image-to-video HunyuanVideo pipeline class of diffusers on :func:`hunyuan_video`'s
    call (precomputed text, so the text encoder never sees the image) with a 32 px first frame
    encoded by a tiny ``AutoencoderKLHunyuanVideo``; the transformer's ``image_condition_type``
    is ``condition`` (None: SkyReels' image latents concatenated to the noise)."""
    import diffusers

    channels = {"latent_concat": 4 + 4 + 1, "token_replace": 4, None: 4 + 4}[condition]
    with seeded(seed):
        autoencoder = hunyuan_video_vae()
        transformer = hunyuan_video_transformer(size, in_channels=channels,
                                                image_condition_type=condition)
    extra = {} if condition is None else {"image_processor": None}
    pipe = getattr(diffusers, cls_name)(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=autoencoder,
        scheduler=flow_match_scheduler(), text_encoder_2=None, tokenizer_2=None, **extra)
    _, kwargs = hunyuan_video(seed, size)
    gen = torch.Generator().manual_seed(seed + 3)
    return _finish(pipe), dict(kwargs, image=_random_picture(gen, 32))


def hunyuan_video_i2v(seed: int = 0, size: str = "tiny"):
    """:func:`_hunyuan_video_i2v` with the image's latents and a mask concatenated to the noise
    (4 + 4 + 1 input channels)."""
    return _hunyuan_video_i2v(seed, size, "latent_concat")


def hunyuan_video_i2v_token_replace(seed: int = 0, size: str = "tiny"):
    """:func:`_hunyuan_video_i2v` with the image's latents as the first frame, whose tokens the
    token-replace blocks modulate with their own (timestep 0) embedding."""
    return _hunyuan_video_i2v(seed, size, "token_replace")


def hunyuan_skyreels_i2v(seed: int = 0, size: str = "tiny"):
    """HunyuanSkyreelsImageToVideoPipeline (:func:`_hunyuan_video_i2v`: the image's latents
    concatenated to the noise, 4 + 4 input channels)."""
    return _hunyuan_video_i2v(seed, size, None, "HunyuanSkyreelsImageToVideoPipeline")


def hunyuan_video15_transformer(size: str = "tiny", **overrides: Any):
    """A tiny ``HunyuanVideo15Transformer3DModel``: 4-channel latents (+ 4 condition channels
    and a mask), width 16, 2 (``size="small"``: 4) blocks, text widths 16 and 8, image width 8,
    target size 64 px."""
    from diffusers import HunyuanVideo15Transformer3DModel

    return HunyuanVideo15Transformer3DModel(**{
        "in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8,
        "num_layers": {"tiny": 2, "small": 4}[size], "num_refiner_layers": 1,
        "text_embed_dim": 16, "text_embed_2_dim": 8, "image_embed_dim": 8,
        "rope_axes_dim": (2, 2, 4), "target_size": 64, **overrides})


def hunyuan_video15(seed: int = 0, size: str = "tiny"):
    """HunyuanVideo15Pipeline (text-to-video; dual-stream blocks on the noise, zero condition
    latents and a mask, 4 + 4 + 1 input channels; the text of two encoders and 729 masked-out
    image tokens joined into one context), guided by a ``ClassifierFreeGuidance`` guider at
    scale 6, 5 frames of 64 px -> 2 x 4 x 4 latents (a tiny ``AutoencoderKLHunyuanVideo15``,
    16x spatial compression, which only its configuration is read of); the negative prompt's
    last two tokens masked out."""
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15Pipeline,
    )

    with seeded(seed):
        autoencoder = AutoencoderKLHunyuanVideo15(
            latent_channels=4, block_out_channels=(32,) * 5, layers_per_block=1)
        transformer = hunyuan_video15_transformer(size, task_type="t2v")
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=autoencoder,
        scheduler=flow_match_scheduler(), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0))
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "height": 64, "width": 64,
              "num_frames": 5}
    for prefix in ("", "negative_"):
        kwargs[prefix + "prompt_embeds"] = _embeds(gen, 1, 6, 16)
        kwargs[prefix + "prompt_embeds_mask"] = torch.ones(1, 6)
        kwargs[prefix + "prompt_embeds_2"] = _embeds(gen, 1, 4, 8)
        kwargs[prefix + "prompt_embeds_mask_2"] = torch.ones(1, 4)
    kwargs["negative_prompt_embeds_mask"][:, -2:] = 0
    return _finish(pipe), kwargs


def _kandinsky5(cls_name: str, seed: int, size: str, autoencoder: Any = None, **model: Any):
    """A Kandinsky 5 pipeline class of diffusers (``vae=None``: 8x spatial, 4x temporal
    compression) on a tiny ``Kandinsky5Transformer3DModel`` (its text blocks before the visual
    blocks; channels-last latents), called with seeded packed text embeddings of 6 (negative: 4)
    tokens and their ``cu_seqlens``: the two calls get text of different lengths. The
    zero-initialised modulations (which would gate every visual block off, leaving the
    prediction blind to the text) are re-drawn."""
    import diffusers
    from diffusers import Kandinsky5Transformer3DModel

    with seeded(seed):
        transformer = Kandinsky5Transformer3DModel(
            in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
            patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
            num_visual_blocks={"tiny": 3, "small": 6}[size], axes_dims=(4, 6, 6), **model)
    unzero(transformer, seed + 2)
    pipe = getattr(diffusers, cls_name)(
        transformer=transformer, vae=autoencoder, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, scheduler=flow_match_scheduler())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = {"prompt": None}
    for prefix, tokens in (("", 6), ("negative_", 4)):
        kwargs[prefix + "prompt_embeds_qwen"] = _embeds(gen, 1, tokens, 16)
        kwargs[prefix + "prompt_embeds_clip"] = torch.randn(1, 8, generator=gen)
        kwargs[prefix + "prompt_cu_seqlens"] = torch.tensor([0, tokens], dtype=torch.int32)
    return _finish(pipe), kwargs


def kandinsky5_t2v(seed: int = 0, size: str = "tiny"):
    """Kandinsky5T2VPipeline (:func:`_kandinsky5`, with ``visual_cond``: zero conditioning
    channels and a mask ride along in the latents, which the loop updates in place), 5 frames
    of 64 px -> 2 x 8 x 8 latents of 4 (+ 4 + 1) channels."""
    pipe, kwargs = _kandinsky5("Kandinsky5T2VPipeline", seed, size, visual_cond=True)
    return pipe, dict(kwargs, height=64, width=64, num_frames=5)


def kandinsky5_i2i(seed: int = 0, size: str = "tiny"):
    """Kandinsky5I2IPipeline (:func:`_kandinsky5`, with ``visual_cond``): a 64 px ``image``,
    which it resizes to 1024 x 1024 and encodes with a tiny 8x ``AutoencoderKL``; its latents
    and a mask of ones ride along with the noise in every call (4 + 4 + 1 channels)."""
    with seeded(seed + 5):
        autoencoder = vae(block_out_channels=(8, 8, 8, 8))
    pipe, kwargs = _kandinsky5("Kandinsky5I2IPipeline", seed, size, autoencoder,
                               visual_cond=True)
    gen = torch.Generator().manual_seed(seed + 6)
    return pipe, dict(kwargs, image=_random_picture(gen, 64))


def kandinsky5_i2v(seed: int = 0, size: str = "tiny"):
    """Kandinsky5I2VPipeline (:func:`_kandinsky5`, with ``visual_cond``): a 64 px first frame
    encoded by a tiny ``AutoencoderKLHunyuanVideo``, 17 frames -> 5 x 8 x 8 latents (the
    pipeline renormalises the first 4 latent frames against the ones after them: with fewer
    than 5 the output is NaN); the loop keeps frame 0 and steps the others."""
    with seeded(seed + 5):
        autoencoder = hunyuan_video_vae()
    pipe, kwargs = _kandinsky5("Kandinsky5I2VPipeline", seed, size, autoencoder,
                               visual_cond=True)
    gen = torch.Generator().manual_seed(seed + 6)
    return pipe, dict(kwargs, image=_random_picture(gen, 64), height=64, width=64,
                      num_frames=17)


def kandinsky5_t2i(seed: int = 0, size: str = "tiny"):
    """Kandinsky5T2IPipeline (:func:`_kandinsky5`), which resizes any size to one of its
    resolutions: 1024 x 1024 -> 128 x 128 latents (4096 tokens)."""
    pipe, kwargs = _kandinsky5("Kandinsky5T2IPipeline", seed, size)
    return pipe, dict(kwargs, height=1024, width=1024)


def hunyuan_video15_i2v(seed: int = 0, size: str = "tiny"):
    """HunyuanVideo15ImageToVideoPipeline: :func:`hunyuan_video15`'s call, guider and
    autoencoder (which here also encodes the image), a 64 px image whose 16 tokens from a tiny
    ``SiglipVisionModel`` (32 px, 8 px patches, width 8) both calls of a step get as
    ``image_embeds``, and a transformer for the i2v task."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    base, kwargs = hunyuan_video15(seed, size)
    with seeded(seed + 4):
        encoder = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8))
        transformer = hunyuan_video15_transformer(size, task_type="i2v")
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=base.vae,
        scheduler=base.scheduler, text_encoder_2=None, tokenizer_2=None, guider=base.guider,
        image_encoder=encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}))
    gen = torch.Generator().manual_seed(seed + 5)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
    return _finish(pipe), dict(kwargs, image=_random_picture(gen, 64))


class GuardrailStandIn(torch.nn.Module):
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker``, which the Cosmos pipelines make
    when given none (and refuse to run without): every prompt passes, every video is returned
    unchanged. Only for these tiny pipelines; real checkpoints use the real guardrail."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros(()))

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, video: Any) -> Any:
        return video


def cosmos_transformer(size: str = "tiny", **overrides: Any):
    """A tiny ``CosmosTransformer3DModel`` (DiT blocks with self-attention, cross-attention to
    the T5 text and AdaLN-LoRA modulation): 4-channel latents, patch (1, 2, 2), width 32, 3
    (``size="small"``: 6) blocks, text width 16, learnable positions; no padding-mask channel
    (which would need torchvision). Its zero-initialised weights are re-drawn."""
    from diffusers import CosmosTransformer3DModel

    with seeded(overrides.pop("seed", 0)):
        model = CosmosTransformer3DModel(**{
            "in_channels": 4, "out_channels": 4, "num_attention_heads": 2,
            "attention_head_dim": 16, "num_layers": {"tiny": 3, "small": 6}[size],
            "mlp_ratio": 2.0, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32),
            "patch_size": (1, 2, 2), "concat_padding_mask": False, **overrides})
    return unzero(model, 2)


def _cosmos(cls_name: str, seed: int, size: str, scheduler: Any, transformer: dict[str, Any],
            autoencoder: Any = None, text_width: int = 16):
    """A Cosmos pipeline class of diffusers on :func:`cosmos_transformer` with the
    :class:`GuardrailStandIn`, called with seeded text embeddings of 6 tokens (``text_width``
    wide: the T5 width of the tiny transformer by default)."""
    import diffusers

    pipe = getattr(diffusers, cls_name)(
        text_encoder=None, tokenizer=None, vae=autoencoder, scheduler=scheduler,
        transformer=cosmos_transformer(size, seed=seed, **transformer),
        safety_checker=GuardrailStandIn())
    gen = torch.Generator().manual_seed(seed + 1)
    return _finish(pipe), {"prompt": None, "prompt_embeds": _embeds(gen, 1, 6, text_width),
                           "negative_prompt_embeds": _embeds(gen, 1, 6, text_width)}


def cosmos_t2w(seed: int = 0, size: str = "tiny"):
    """CosmosTextToWorldPipeline (Cosmos 1.0: EDM Euler steps on x0, guided after both calls),
    9 frames of 64 px -> 2 x 8 x 8 latents (``vae=None``: 8x spatial and temporal)."""
    from diffusers import EDMEulerScheduler

    scheduler = EDMEulerScheduler(sigma_max=80.0, sigma_min=0.002, sigma_data=0.5,
                                  sigma_schedule="karras", prediction_type="epsilon", rho=7.0,
                                  final_sigmas_type="sigma_min")
    pipe, kwargs = _cosmos("CosmosTextToWorldPipeline", seed, size, scheduler, {})
    return pipe, dict(kwargs, height=64, width=64, num_frames=9)


def cosmos2_t2i(seed: int = 0, size: str = "tiny"):
    """Cosmos2TextToImagePipeline (Cosmos-Predict2: each call's prediction is turned into an
    x0 estimate, ``c_skip * latents + c_out * prediction``, the cond one *before* the uncond
    call), 64 px -> 8 x 8 latents (``vae=None``: 8x)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, kwargs = _cosmos("Cosmos2TextToImagePipeline", seed, size,
                           FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), {})
    return pipe, dict(kwargs, height=64, width=64)


def cosmos2_v2w(seed: int = 0, size: str = "tiny"):
    """Cosmos2VideoToWorldPipeline (:func:`cosmos2_t2i`'s loop; a first frame encoded by a tiny
    ``AutoencoderKLWan`` conditions the video through a mask channel and is kept), a 64 px image,
    5 frames -> 2 x 8 x 8 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with seeded(seed + 5):
        autoencoder = wan_vae()
    pipe, kwargs = _cosmos("Cosmos2VideoToWorldPipeline", seed, size,
                           FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                           {"in_channels": 5}, autoencoder)
    gen = torch.Generator().manual_seed(seed + 6)
    return pipe, dict(kwargs, image=_random_picture(gen, 64), height=64, width=64,
                      num_frames=5)


def cosmos25_t2w(seed: int = 0, size: str = "tiny"):
    """Cosmos2_5_PredictBasePipeline in its text-to-world mode (Cosmos-Predict2.5: each call's
    velocity is replaced by the conditioning frames' own where the condition mask says, the cond
    call's *before* the uncond call), UniPC on flow sigmas, 5 frames of 64 px -> 2 x 8 x 8
    latents (a tiny ``AutoencoderKLWan``), the transformer projecting 24-wide text embeddings
    (its Qwen2.5-VL layers, stacked) to 16. Its image- and video-to-world modes run the same
    loop but convert their inputs with torchvision, which is not installed here."""
    with seeded(seed + 5):
        autoencoder = wan_vae()
    pipe, kwargs = _cosmos("Cosmos2_5_PredictBasePipeline", seed, size,
                           _flow_unipc(3.0), {"in_channels": 5, "use_crossattn_projection": True,
                                              "crossattn_proj_in_channels": 24,
                                              "encoder_hidden_states_channels": 16},
                           autoencoder, text_width=24)
    return pipe, dict(kwargs, height=64, width=64, num_frames=5)


def hunyuan_image_transformer(size: str, seed: int, **config: Any):
    """A tiny ``HunyuanImageTransformer2DModel`` (dual-, then single-stream blocks, a token
    refiner on the text): 4 output channels, width 16, 2 + 2 (``size="small"``: 3 + 3) blocks,
    text width 16, ``config`` for the rest; drawn from ``seed``, zero-initialised weights
    re-drawn."""
    from diffusers import HunyuanImageTransformer2DModel

    blocks = {"tiny": 2, "small": 3}[size]
    with seeded(seed):
        transformer = HunyuanImageTransformer2DModel(
            out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=blocks,
            num_single_layers=blocks, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16,
            **config)
    return unzero(transformer, seed + 2)


def _apg_mix():
    """HunyuanImage's guider class at scale 3.5: CFG with momentum, then adaptive projected
    guidance after step 1."""
    from diffusers import AdaptiveProjectedMixGuidance

    return AdaptiveProjectedMixGuidance(guidance_scale=3.5,
                                        adaptive_projected_guidance_start_step=1)


def hunyuan_image(seed: int = 0, size: str = "tiny"):
    """HunyuanImagePipeline (HunyuanImage 2.1: dual- then single-stream blocks; the text of a
    Qwen2.5-VL and, for text to render in the image, a ByT5 encoder joined into one context),
    256 px -> 8 x 8 latents (``vae=None``: 32x) of 4 channels, patch 1. Its loop picks its guider
    per call: ``ocr_guider`` when the ByT5 embeddings are not all zero, else ``guider``. Built
    with a ``ClassifierFreeGuidance`` guider at scale 4 and an ``AdaptiveProjectedMixGuidance``
    OCR guider at scale 3.5 (CFG with momentum, then APG after step 1), called with seeded
    glyph embeddings (so the OCR guider guides) of 4 tokens, the negative's last one masked out;
    zero them to make the loop pick ``guider``."""
    from diffusers import ClassifierFreeGuidance, HunyuanImagePipeline

    pipe = HunyuanImagePipeline(
        scheduler=flow_match_scheduler(), vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None,
        transformer=hunyuan_image_transformer(size, seed, in_channels=4, text_embed_2_dim=8,
                                              rope_axes_dim=(4, 4)),
        guider=ClassifierFreeGuidance(guidance_scale=4.0), ocr_guider=_apg_mix())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = {"prompt": None, "height": 256, "width": 256}
    for prefix in ("", "negative_"):
        kwargs[prefix + "prompt_embeds"] = _embeds(gen, 1, 6, 16)
        kwargs[prefix + "prompt_embeds_mask"] = torch.ones(1, 6, dtype=torch.long)
        kwargs[prefix + "prompt_embeds_2"] = _embeds(gen, 1, 4, 8)
        kwargs[prefix + "prompt_embeds_mask_2"] = torch.ones(1, 4, dtype=torch.long)
    kwargs["negative_prompt_embeds_mask_2"][:, -1:] = 0
    return _finish(pipe), kwargs


def hunyuan_image_refiner(seed: int = 0, size: str = "tiny"):
    """HunyuanImageRefinerPipeline (HunyuanImage 2.1's refiner: a guidance-distilled transformer
    on one-frame video latents, the image's latents concatenated to the noise), guided by an
    ``AdaptiveProjectedMixGuidance`` at scale 3.5 (APG after step 1), 128 px -> 1 x 8 x 8
    latents (``vae=None``: 16x) of 4 (+ 4) channels, the image given as seeded latents (the
    pipeline takes a tensor with its latent channels as they are)."""
    from diffusers import HunyuanImageRefinerPipeline

    pipe = HunyuanImageRefinerPipeline(
        scheduler=flow_match_scheduler(), vae=None, text_encoder=None, tokenizer=None,
        transformer=hunyuan_image_transformer(size, seed, in_channels=8, rope_axes_dim=(2, 2, 4),
                                              patch_size=(1, 1, 1), guidance_embeds=True),
        guider=_apg_mix())
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs: dict[str, Any] = {"prompt": None, "height": 128, "width": 128,
                              "distilled_guidance_scale": 3.25}
    for prefix in ("", "negative_"):
        kwargs[prefix + "prompt_embeds"] = _embeds(gen, 1, 6, 16)
        kwargs[prefix + "prompt_embeds_mask"] = torch.ones(1, 6, dtype=torch.long)
    kwargs["negative_prompt_embeds_mask"][:, -2:] = 0
    kwargs["image"] = torch.randn(1, 4, 1, 8, 8, generator=gen)
    return _finish(pipe), kwargs


def motif_video_transformer(size: str = "tiny", **overrides: Any):
    """A tiny ``MotifVideoTransformer3DModel`` (dual-stream, then single-stream blocks that
    take and return both streams): 4-channel latents (+ 4 condition channels and a mask),
    patch 2, width 16, 2 + 2 (``size="small"``: 3 + 3) blocks, text width 16. Its
    zero-initialised weights are re-drawn."""
    from diffusers import MotifVideoTransformer3DModel

    blocks = {"tiny": 2, "small": 3}[size]
    with seeded(overrides.pop("seed", 0)):
        model = MotifVideoTransformer3DModel(**{
            "in_channels": 9, "out_channels": 4, "num_attention_heads": 2,
            "attention_head_dim": 8, "num_layers": blocks, "num_single_layers": blocks,
            "mlp_ratio": 2.0, "text_embed_dim": 16, "rope_axes_dim": (2, 2, 4), **overrides})
    return unzero(model, 2)


def motif_video(seed: int = 0, size: str = "tiny"):
    """MotifVideoPipeline (text-to-video through a ``ClassifierFreeGuidance`` guider at scale 5;
    its loop ``clone()``s each call's result, the cond one before the uncond call), 5 frames of
    64 px -> 2 x 8 x 8 latents (a tiny ``AutoencoderKLWan`` gives the latent channels), the
    negative prompt's last two tokens masked out."""
    from diffusers import ClassifierFreeGuidance, MotifVideoPipeline

    with seeded(seed + 5):
        autoencoder = wan_vae()
    pipe = MotifVideoPipeline(
        scheduler=flow_match_scheduler(), vae=autoencoder, text_encoder=None, tokenizer=None,
        transformer=motif_video_transformer(size, seed=seed),
        guider=ClassifierFreeGuidance(guidance_scale=5.0))
    kwargs = dict(_masked_embeds(seed, 6, 16), height=64, width=64, num_frames=5)
    kwargs["negative_prompt_attention_mask"][:, -2:] = 0
    return _finish(pipe), kwargs


def motif_video_i2v(seed: int = 0, size: str = "tiny"):
    """MotifVideoImage2VideoPipeline: :func:`motif_video`'s transformer, guider, autoencoder
    (which here also encodes the first frame into the condition channels and the mask) and
    call, with a 64 px image (no image tokens: those come from the text encoder's vision
    tower, which these pipelines do without)."""
    from diffusers import MotifVideoImage2VideoPipeline
    from transformers import SiglipImageProcessor

    base, kwargs = motif_video(seed, size)
    pipe = MotifVideoImage2VideoPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=None, tokenizer=None,
        transformer=base.transformer, guider=base.guider,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}))
    gen = torch.Generator().manual_seed(seed + 6)
    return _finish(pipe), dict(kwargs, image=_random_picture(gen, 64))


def _flux_with_vae(cls_name: str, seed: int, size: str):
    """A Flux pipeline class of diffusers on :func:`flux`'s transformer and embeddings, with
    :func:`_kl_vae_and_image`'s VAE (64 px -> 64 tokens) and ``image`` in its call arguments."""
    import diffusers

    base, kwargs = flux(seed, size)
    autoencoder, image = _kl_vae_and_image(seed)
    pipe = getattr(diffusers, cls_name)(
        scheduler=base.scheduler, vae=autoencoder, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=base.transformer)
    return _finish(pipe), dict(kwargs, image=image)


def flux_img2img(seed: int = 0, size: str = "tiny"):
    """FluxImg2ImgPipeline (:func:`_flux_with_vae`), ``strength`` 0.6: with N steps it calls
    the denoiser on ``int(0.6 N)`` of them. Not in :data:`DIT_BUILDERS` (those run every step).
    Call with ``true_cfg_scale > 1`` for true CFG."""
    pipe, kwargs = _flux_with_vae("FluxImg2ImgPipeline", seed, size)
    return pipe, dict(kwargs, strength=0.6)


def flux_inpaint(seed: int = 0, size: str = "tiny"):
    """FluxInpaintPipeline (:func:`_flux_with_vae`) with :func:`_left_half_mask`; ``strength``
    0.6 as in :func:`flux_img2img`."""
    pipe, kwargs = _flux_with_vae("FluxInpaintPipeline", seed, size)
    return pipe, dict(kwargs, mask_image=_left_half_mask(), strength=0.6)


def flux_controlnet(seed: int = 0, size: str = "tiny"):
    """FluxControlNetPipeline on :func:`flux`'s transformer and embeddings, with a tiny
    ``FluxControlNetModel`` (one dual- and one single-stream block, drawn from ``seed + 3``; its
    zero-initialised output projections re-drawn from ``seed + 4``, so its residuals are not
    zero) and :func:`_kl_vae_and_image`'s VAE, which encodes its image as the
    ``control_image``. Every step runs the ControlNet once, and both calls add its residuals
    after the transformer's blocks. Call with ``true_cfg_scale > 1`` for true CFG."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    base, kwargs = flux(seed, size)
    autoencoder, image = _kl_vae_and_image(seed)
    with seeded(seed + 3):
        controlnet = FluxControlNetModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    unzero(controlnet, seed + 4)
    pipe = FluxControlNetPipeline(
        scheduler=base.scheduler, vae=autoencoder, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=base.transformer,
        controlnet=controlnet)
    return _finish(pipe), dict(kwargs, control_image=image)


def flux_kontext(seed: int = 0, size: str = "tiny"):
    """FluxKontextPipeline (:func:`_flux_with_vae`), the ``image`` as the reference, kept at its
    size (``_auto_resize=False``; ``max_area`` 64 x 64 keeps the output at 64 px, which the
    pipeline otherwise rescales to 1024 x 1024): every call gets the 64 noisy tokens followed by
    the reference image's 64 tokens, and the loop slices the prediction of the first 64 off each
    call's result, the cond call's before the uncond call is made. Call with
    ``true_cfg_scale > 1`` for true CFG."""
    pipe, kwargs = _flux_with_vae("FluxKontextPipeline", seed, size)
    return pipe, dict(kwargs, _auto_resize=False, max_area=64 * 64)


def flux_kontext_inpaint(seed: int = 0, size: str = "tiny"):
    """FluxKontextInpaintPipeline (:func:`_flux_with_vae`): the ``image`` repainted where
    :func:`_left_half_mask` says, at ``strength`` 0.6 (with N steps it calls the denoiser on
    ``int(0.6 N)`` of them), guided by an ``image_reference`` (another tensor (1, 3, 64, 64) in
    [0, 1], drawn from ``seed + 7``), both kept at 64 px as in :func:`flux_kontext`. Every call
    gets the 64 noisy tokens followed by the reference's 64 tokens; the loop slices the noisy
    tokens' prediction off each call's result, the cond call's before the uncond call is made.
    Call with ``true_cfg_scale > 1`` for true CFG."""
    pipe, kwargs = _flux_with_vae("FluxKontextInpaintPipeline", seed, size)
    reference = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 7))
    return pipe, dict(kwargs, image_reference=reference, mask_image=_left_half_mask(),
                      strength=0.6, _auto_resize=False, max_area=64 * 64)


def flux2_klein(seed: int = 0, size: str = "tiny"):
    """Flux2KleinPipeline (Flux 2 dual- and single-stream blocks, guided when
    ``guidance_scale > 1``, a cond then an uncond call per step) editing a 64 px PIL ``image``
    with a tiny ``AutoencoderKLFlux2`` (4 latent channels, patchified 2 x 2: 64 px -> 64 noisy
    tokens, plus 64 reference tokens in every call). The loop slices the prediction of the noisy
    tokens off each call's result, the cond call's before the uncond call is made."""
    return _flux2_klein("Flux2KleinPipeline", seed, size)


def flux2_klein_inpaint(seed: int = 0, size: str = "tiny"):
    """Flux2KleinInpaintPipeline (:func:`_flux2_klein`): the ``image`` repainted where
    :func:`_left_half_mask` says, at ``strength`` 0.6 (with N steps it calls the denoiser on
    ``int(0.6 N)`` of them), guided by an ``image_reference`` (another 64 px PIL image, drawn
    from ``seed + 7``). Every call gets 64 noisy tokens followed by the image's 64 and the
    reference's 64 condition tokens; the loop slices the noisy tokens' prediction off each call's
    result, the cond call's before the uncond call is made."""
    pipe, kwargs = _flux2_klein("Flux2KleinInpaintPipeline", seed, size)
    reference = _random_picture(torch.Generator().manual_seed(seed + 7), 64)
    return pipe, dict(kwargs, image_reference=reference, mask_image=_left_half_mask(),
                      strength=0.6)


def _flux2_klein(cls_name: str, seed: int, size: str):
    """A Flux 2 Klein pipeline class of diffusers on a tiny ``Flux2Transformer2DModel`` and a
    tiny ``AutoencoderKLFlux2`` (drawn from ``seed + 5``), with seeded prompt and negative
    embeddings and a 64 px PIL ``image`` (drawn from ``seed + 6``) in its call arguments."""
    import diffusers
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    layers = {"tiny": 1, "small": 3}[size]
    with seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    with seeded(seed + 5):
        autoencoder = AutoencoderKLFlux2(
            latent_channels=4, block_out_channels=(8, 8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3)
    pipe = getattr(diffusers, cls_name)(scheduler=flow_match_scheduler(), vae=autoencoder,
                                        text_encoder=None, tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32), "height": 64, "width": 64,
              "image": _random_picture(torch.Generator().manual_seed(seed + 6), 64)}
    return _finish(pipe), kwargs


def ovis_image(seed: int = 0, size: str = "tiny"):
    """OvisImagePipeline (Flux-like dual- and single-stream blocks; guided when
    ``guidance_scale > 1``, a cond then an uncond call per step), 64 px -> 16 tokens."""
    from diffusers import OvisImagePipeline, OvisImageTransformer2DModel

    layers = {"tiny": 1, "small": 3}[size]
    with seeded(seed):
        transformer = OvisImageTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=16, num_layers=layers,
            num_single_layers=layers, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    pipe = OvisImagePipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32), "height": 64, "width": 64}
    return _finish(pipe), kwargs


def krea2(seed: int = 0, size: str = "tiny"):
    """Krea2Pipeline (single-stream blocks on the joined [text; image] sequence after a text
    fusion stage; a cond then an uncond call per step, guided when ``guidance_scale > 0``),
    64 px -> 16 tokens (patch 2); the prompt embeddings stack 2 tapped text layers per token,
    6 tokens in both branches (the pipeline builds one set of position ids from the cond's
    length), the masks mark 5 of the cond's valid and 3 of the uncond's."""
    from diffusers import Krea2Pipeline, Krea2Transformer2DModel

    layers = {"tiny": 2, "small": 6}[size]
    with seeded(seed):
        transformer = Krea2Transformer2DModel(
            in_channels=16, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
            num_key_value_heads=1, intermediate_size=64, timestep_embed_dim=32,
            text_hidden_dim=32, num_text_layers=2, text_num_attention_heads=2,
            text_num_key_value_heads=2, text_intermediate_size=64, num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))
    pipe = Krea2Pipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                         tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    masks = torch.ones(2, 6, dtype=torch.bool)
    masks[0, 5:] = False
    masks[1, 3:] = False
    kwargs = {"prompt": None, "negative_prompt": None,
              "prompt_embeds": torch.randn(1, 6, 2, 32, generator=gen),
              "prompt_embeds_mask": masks[:1],
              "negative_prompt_embeds": torch.randn(1, 6, 2, 32, generator=gen),
              "negative_prompt_embeds_mask": masks[1:], "height": 64, "width": 64}
    return _finish(pipe), kwargs


def nucleus_moe(seed: int = 0, size: str = "tiny"):
    """NucleusMoEImagePipeline (image-stream blocks attending to the text; blocks 3 .. L-2 are
    mixture-of-experts blocks, 4 experts choosing half the tokens each (capacity factor 2); a cond
    then an uncond call per step, guided when
    ``guidance_scale > 1``, then CFG renormalisation), 64 px -> 16 tokens (patch 2)."""
    from diffusers import NucleusMoEImagePipeline, NucleusMoEImageTransformer2DModel

    layers = {"tiny": 5, "small": 8}[size]
    with seeded(seed):
        transformer = NucleusMoEImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
            num_experts=4, moe_intermediate_dim=32, capacity_factors=2.0,
            mlp_ratio=6.0)  # dense blocks' width rounds down to 128s: 6 x 32 x 2/3 -> 128
        # the experts' weights are torch.empty until a checkpoint loads (garbage, NaN at times)
        for name, param in transformer.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                torch.nn.init.normal_(param, std=0.05)
    pipe = NucleusMoEImagePipeline(transformer=transformer, scheduler=flow_match_scheduler(),
                                   vae=None, text_encoder=None, processor=None)
    gen = torch.Generator().manual_seed(seed + 1)
    masks = torch.ones(2, 8, dtype=torch.long)
    masks[1, 5:] = 0
    kwargs = {"prompt": None, "negative_prompt": None,
              "prompt_embeds": _embeds(gen, 1, 8, 32), "prompt_embeds_mask": masks[:1],
              "negative_prompt_embeds": _embeds(gen, 1, 8, 32),
              "negative_prompt_embeds_mask": masks[1:], "height": 64, "width": 64}
    return _finish(pipe), kwargs


def cogview4_transformer(size: str = "tiny", **overrides: Any):
    """A ``CogView4Transformer2DModel`` (dual-stream blocks returning (hidden, encoder); size and
    crop conditioning) on 4 latent channels, patch 2, text width 32; ``overrides`` replace any
    constructor argument."""
    from diffusers import CogView4Transformer2DModel

    kwargs = {"patch_size": 2, "in_channels": 4, "out_channels": 4,
              "num_layers": {"tiny": 2, "small": 6}[size], "attention_head_dim": 8,
              "num_attention_heads": 2, "text_embed_dim": 32, "time_embed_dim": 16,
              "condition_dim": 8, "pos_embed_max_size": 16, "sample_size": 8,
              "rope_axes_dim": (4, 4)}
    kwargs.update(overrides)
    return CogView4Transformer2DModel(**kwargs)


def cogview4(seed: int = 0, size: str = "tiny"):
    """CogView4Pipeline (two calls per step, cond first), 64 px -> 8 x 8 latents, its
    flow-matching scheduler (dynamic shift, linear time shift). The negative prompt is 4 tokens
    longer than the prompt, as CogView4's padding to multiples of 16 tokens can make it."""
    from diffusers import CogView4Pipeline

    with seeded(seed):
        transformer = cogview4_transformer(size)
    scheduler = flow_match_scheduler(1.0, base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                     use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                            scheduler=scheduler)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 12, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 16, 32), "height": 64, "width": 64}
    return _finish(pipe), kwargs


def cogview4_control(seed: int = 0, size: str = "tiny"):
    """CogView4ControlPipeline: :func:`cogview4`'s layout with 8 input channels (4 latent + 4 of
    the encoded control image, concatenated by the pipeline at every step), a tiny VAE (64 px ->
    4 x 8 x 8) and ``control_image`` (1, 3, 64, 64) in [0, 1] in the call arguments. The VAE
    samples the control latents from the global torch generator: seed it before each call."""
    from diffusers import CogView4ControlPipeline

    base, kwargs = cogview4(seed, size)
    with seeded(seed):
        transformer = cogview4_transformer(size, in_channels=8)
    with seeded(seed + 5):
        autoencoder = vae(4, block_out_channels=(8, 8, 16, 16), scaling_factor=1.5)
    pipe = CogView4ControlPipeline(tokenizer=None, text_encoder=None, vae=autoencoder,
                                   transformer=transformer, scheduler=base.scheduler)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 6))
    # this pipeline wants prompt and negative embeddings of one shape
    negative = kwargs["negative_prompt_embeds"][:, :kwargs["prompt_embeds"].shape[1]]
    return _finish(pipe), dict(kwargs, control_image=image, negative_prompt_embeds=negative)


def _kl_vae_and_image(seed: int) -> tuple[Any, torch.Tensor]:
    """A tiny ``AutoencoderKL`` (64 px -> 4 x 16 x 16 latents) drawn from ``seed + 5``, and an
    ``image`` (1, 3, 64, 64) in [0, 1] drawn from ``seed + 6``: what the Chroma and Flux
    pipelines that encode an image are built and called with."""
    with seeded(seed + 5):
        autoencoder = vae(4, block_out_channels=(8, 8, 16), shift_factor=0.1, scaling_factor=1.5)
    return autoencoder, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 6))


def _left_half_mask() -> torch.Tensor:
    """An inpainting ``mask_image`` (1, 1, 64, 64): the left half repainted, the right half kept
    (the loops put the image's noised latents back there after every step)."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32] = 1
    return mask


def chroma(seed: int = 0, size: str = "tiny"):
    """ChromaPipeline (Flux-like blocks modulated per block from one pooled table, attention
    masks; two calls per step, cond first), 64 px -> 16 tokens."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    layers = {"tiny": 1, "small": 3}[size]
    with seeded(seed):
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=16,
            approximator_layers=1)
    pipe = ChromaPipeline(scheduler=flow_match_scheduler(), vae=None, text_encoder=None,
                          tokenizer=None, transformer=transformer)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0  # padded prompt tokens, as the T5 tokenizer leaves them
    kwargs = {"prompt": None, "negative_prompt": None, "prompt_embeds": _embeds(gen, 1, 6, 32),
              "negative_prompt_embeds": _embeds(gen, 1, 6, 32), "prompt_attention_mask": mask,
              "negative_prompt_attention_mask": torch.ones(1, 6), "height": 64, "width": 64}
    return _finish(pipe), kwargs


def chroma_img2img(seed: int = 0, size: str = "tiny"):
    """ChromaImg2ImgPipeline on :func:`chroma`'s transformer, with a tiny VAE (the pipeline
    encodes the image: 64 px -> 4 x 16 x 16 latents -> 64 tokens) and ``image`` (1, 3, 64, 64)
    in [0, 1] and ``strength`` 0.6 in its call arguments: with N steps it calls the denoiser on
    ``int(0.6 N)`` of them. Not in :data:`DIT_BUILDERS` (those run every step)."""
    from diffusers import ChromaImg2ImgPipeline

    base, kwargs = chroma(seed, size)
    autoencoder, image = _kl_vae_and_image(seed)
    pipe = ChromaImg2ImgPipeline(scheduler=base.scheduler, vae=autoencoder, text_encoder=None,
                                 tokenizer=None, transformer=base.transformer)
    return _finish(pipe), dict(kwargs, image=image, strength=0.6)


def _with_ip_adapter(built: tuple[Any, dict[str, Any]], seed: int):
    """A Flux-layout IP-Adapter on ``built``'s transformer, and seeded positive and negative
    image embeddings (one IP-Adapter, one image, 16 features) in its call arguments."""
    from .ip_adapters import add_ip_adapter

    pipe, kwargs = built
    add_ip_adapter(pipe.transformer, seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    return pipe, dict(kwargs, ip_adapter_image_embeds=[torch.randn(1, 1, 16, generator=gen)],
                      negative_ip_adapter_image_embeds=[torch.randn(1, 1, 16, generator=gen)])


def flux_ip_adapter(seed: int = 0, size: str = "tiny"):
    """:func:`flux` with an IP-Adapter: its loop writes the negative image embeddings into the
    ``joint_attention_kwargs`` dict both calls get, between the cond and the uncond call."""
    return _with_ip_adapter(flux(seed, size), seed)


def chroma_ip_adapter(seed: int = 0, size: str = "tiny"):
    """:func:`chroma` with an IP-Adapter (the same loop pattern as :func:`flux_ip_adapter`)."""
    return _with_ip_adapter(chroma(seed, size), seed)


#: name -> builder ``fn(seed=0, size="tiny") -> (pipe, call_kwargs)``
DIT_BUILDERS: OrderedDict[str, Callable[..., tuple[Any, dict[str, Any]]]] = OrderedDict([
    ("pixart-sigma", pixart_sigma),
    ("sana", sana),
    ("sana-controlnet", sana_controlnet),
    ("auraflow", auraflow),
    ("hunyuan-dit", hunyuan_dit),
    ("hidream", hidream),
    ("lumina-next", lumina_next),
    ("cogvideox", cogvideox),
    ("ltx-video", ltx_video),
    ("mochi", mochi),
    ("allegro", allegro),
    ("latte", latte),
    ("cogview3-plus", cogview3_plus),
    ("wan2.1", wan21),
    ("wan2.2", wan22),
    ("wan2.1-i2v", wan21_i2v),
    ("wan2.1-i2v-clip", wan21_i2v_clip),
    ("skyreels-v2", skyreels_v2),
    ("skyreels-v2-i2v", skyreels_v2_i2v),
    ("chronoedit", chronoedit),
    ("wan-vace", wan_vace),
    ("lucy-edit", lucy_edit),
    ("lumina2", lumina2),
    ("qwen-image", qwen_image),
    ("qwen-image-controlnet", qwen_image_controlnet),
    ("qwen-image-controlnet-inpaint", qwen_image_controlnet_inpaint),
    ("qwen-image-edit", qwen_image_edit),
    ("qwen-image-edit-plus", qwen_image_edit_plus),
    ("flux-true-cfg", flux),
    ("flux-controlnet", flux_controlnet),
    ("hunyuan-video", hunyuan_video),
    ("hunyuan-video-i2v", hunyuan_video_i2v),
    ("hunyuan-video-i2v-token-replace", hunyuan_video_i2v_token_replace),
    ("hunyuan-skyreels-i2v", hunyuan_skyreels_i2v),
    ("hunyuan-video15", hunyuan_video15),
    ("hunyuan-video15-i2v", hunyuan_video15_i2v),
    ("kandinsky5-t2v", kandinsky5_t2v),
    ("kandinsky5-t2i", kandinsky5_t2i),
    ("kandinsky5-i2i", kandinsky5_i2i),
    ("kandinsky5-i2v", kandinsky5_i2v),
    ("cosmos-t2w", cosmos_t2w),
    ("cosmos2-t2i", cosmos2_t2i),
    ("cosmos2-v2w", cosmos2_v2w),
    ("cosmos2.5-t2w", cosmos25_t2w),
    ("hunyuan-image", hunyuan_image),
    ("hunyuan-image-refiner", hunyuan_image_refiner),
    ("motif-video", motif_video),
    ("motif-video-i2v", motif_video_i2v),
    ("flux-kontext", flux_kontext),
    ("flux2-klein", flux2_klein),
    ("ovis-image", ovis_image),
    ("krea2", krea2),
    ("nucleus-moe", nucleus_moe),
    ("cogview4", cogview4),
    ("cogview4-control", cogview4_control),
    ("chroma", chroma),
    ("flux-ip-adapter", flux_ip_adapter),
    ("chroma-ip-adapter", chroma_ip_adapter),
])

DIT_INFO: dict[str, DiTInfo] = {
    "pixart-sigma": DiTInfo("PixArtSigmaPipeline", "batched", {"guidance_scale": 4.5}),
    "sana": DiTInfo("SanaPipeline", "batched", {"guidance_scale": 4.5}),
    "sana-controlnet": DiTInfo("SanaControlNetPipeline", "batched", {"guidance_scale": 4.5}),
    "auraflow": DiTInfo("AuraFlowPipeline", "batched", {"guidance_scale": 3.5}),
    "hunyuan-dit": DiTInfo("HunyuanDiTPipeline", "batched", {"guidance_scale": 5.0}),
    "hidream": DiTInfo("HiDreamImagePipeline", "batched", {"guidance_scale": 5.0}),
    "lumina-next": DiTInfo("LuminaPipeline", "batched", {"guidance_scale": 4.0}, cond_first=True),
    "cogvideox": DiTInfo("CogVideoXPipeline", "batched", {"guidance_scale": 6.0}),
    "ltx-video": DiTInfo("LTXPipeline", "batched", {"guidance_scale": 3.0}),
    "mochi": DiTInfo("MochiPipeline", "batched", {"guidance_scale": 4.5}),
    "allegro": DiTInfo("AllegroPipeline", "batched", {"guidance_scale": 7.5}),
    "latte": DiTInfo("LattePipeline", "batched", {"guidance_scale": 7.5}),
    "cogview3-plus": DiTInfo("CogView3PlusPipeline", "batched", {"guidance_scale": 5.0}),
    "wan2.1": DiTInfo("WanPipeline", "two-call", {"guidance_scale": 5.0}),
    "wan2.2": DiTInfo("WanPipeline", "two-call", {"guidance_scale": 4.0},
                      experts=("transformer", "transformer_2")),
    "wan2.1-i2v": DiTInfo("WanImageToVideoPipeline", "two-call", {"guidance_scale": 5.0}),
    "wan2.1-i2v-clip": DiTInfo("WanImageToVideoPipeline", "two-call", {"guidance_scale": 5.0}),
    "skyreels-v2": DiTInfo("SkyReelsV2Pipeline", "two-call", {"guidance_scale": 6.0}),
    "skyreels-v2-i2v": DiTInfo("SkyReelsV2ImageToVideoPipeline", "two-call",
                               {"guidance_scale": 5.0}),
    "chronoedit": DiTInfo("ChronoEditPipeline", "two-call", {"guidance_scale": 5.0}),
    "wan-vace": DiTInfo("WanVACEPipeline", "two-call", {"guidance_scale": 5.0}),
    "lucy-edit": DiTInfo("LucyEditPipeline", "two-call", {"guidance_scale": 5.0}),
    # with 3 steps, steps 0 and 1 make two calls, step 2 one: (2 + 1) / 3 > 0.7
    "lumina2": DiTInfo("Lumina2Pipeline", "two-call", {"guidance_scale": 4.0,
                                                       "cfg_trunc_ratio": 0.7}),
    "qwen-image": DiTInfo("QwenImagePipeline", "two-call", {"true_cfg_scale": 4.0}),
    "qwen-image-controlnet": DiTInfo("QwenImageControlNetPipeline", "two-call",
                                     {"true_cfg_scale": 4.0}),
    "qwen-image-controlnet-inpaint": DiTInfo("QwenImageControlNetInpaintPipeline", "two-call",
                                             {"true_cfg_scale": 4.0}),
    "qwen-image-edit": DiTInfo("QwenImageEditPipeline", "two-call", {"true_cfg_scale": 4.0}),
    "qwen-image-edit-plus": DiTInfo("QwenImageEditPlusPipeline", "two-call",
                                    {"true_cfg_scale": 4.0}),
    "flux-true-cfg": DiTInfo("FluxPipeline", "two-call", {"true_cfg_scale": 4.0}),
    "hunyuan-video": DiTInfo("HunyuanVideoPipeline", "two-call", {"true_cfg_scale": 4.0}),
    # the guidance scale is the guider's (6.0), not a call argument
    "hunyuan-video15": DiTInfo("HunyuanVideo15Pipeline", "two-call", {}),
    "hunyuan-video15-i2v": DiTInfo("HunyuanVideo15ImageToVideoPipeline", "two-call", {}),
    "hunyuan-video-i2v": DiTInfo("HunyuanVideoImageToVideoPipeline", "two-call",
                                 {"true_cfg_scale": 4.0}),
    "hunyuan-video-i2v-token-replace": DiTInfo("HunyuanVideoImageToVideoPipeline", "two-call",
                                               {"true_cfg_scale": 4.0}),
    "hunyuan-skyreels-i2v": DiTInfo("HunyuanSkyreelsImageToVideoPipeline", "two-call",
                                    {"true_cfg_scale": 4.0}),
    "kandinsky5-t2v": DiTInfo("Kandinsky5T2VPipeline", "two-call", {"guidance_scale": 5.0}),
    "kandinsky5-t2i": DiTInfo("Kandinsky5T2IPipeline", "two-call", {"guidance_scale": 3.5}),
    "kandinsky5-i2i": DiTInfo("Kandinsky5I2IPipeline", "two-call", {"guidance_scale": 3.5}),
    "kandinsky5-i2v": DiTInfo("Kandinsky5I2VPipeline", "two-call", {"guidance_scale": 5.0}),
    "cosmos-t2w": DiTInfo("CosmosTextToWorldPipeline", "two-call", {"guidance_scale": 7.0}),
    "cosmos2-t2i": DiTInfo("Cosmos2TextToImagePipeline", "two-call", {"guidance_scale": 7.0}),
    "cosmos2-v2w": DiTInfo("Cosmos2VideoToWorldPipeline", "two-call", {"guidance_scale": 7.0}),
    "cosmos2.5-t2w": DiTInfo("Cosmos2_5_PredictBasePipeline", "two-call",
                             {"guidance_scale": 7.0}),
    # the guidance scale is the guider's (5.0; HunyuanImage: the OCR guider's, 3.5)
    "hunyuan-image": DiTInfo("HunyuanImagePipeline", "two-call", {}),
    "hunyuan-image-refiner": DiTInfo("HunyuanImageRefinerPipeline", "two-call", {}),
    "motif-video": DiTInfo("MotifVideoPipeline", "two-call", {}),
    "motif-video-i2v": DiTInfo("MotifVideoImage2VideoPipeline", "two-call", {}),
    "flux-controlnet": DiTInfo("FluxControlNetPipeline", "two-call", {"true_cfg_scale": 4.0}),
    "flux-kontext": DiTInfo("FluxKontextPipeline", "two-call", {"true_cfg_scale": 4.0}),
    "flux2-klein": DiTInfo("Flux2KleinPipeline", "two-call", {"guidance_scale": 4.0}),
    "ovis-image": DiTInfo("OvisImagePipeline", "two-call", {"guidance_scale": 5.0}),
    "krea2": DiTInfo("Krea2Pipeline", "two-call", {"guidance_scale": 4.5}),
    "nucleus-moe": DiTInfo("NucleusMoEImagePipeline", "two-call", {"guidance_scale": 4.0}),
    "cogview4": DiTInfo("CogView4Pipeline", "two-call", {"guidance_scale": 5.0}),
    "cogview4-control": DiTInfo("CogView4ControlPipeline", "two-call", {"guidance_scale": 5.0}),
    "chroma": DiTInfo("ChromaPipeline", "two-call", {"guidance_scale": 4.0}),
    "flux-ip-adapter": DiTInfo("FluxPipeline", "two-call", {"true_cfg_scale": 4.0}),
    "chroma-ip-adapter": DiTInfo("ChromaPipeline", "two-call", {"guidance_scale": 4.0}),
}


def build_dit(name: str, seed: int = 0, size: str = "tiny"):
    """Build tiny pipeline ``name`` (see :data:`DIT_BUILDERS`): ``(pipe, call_kwargs)``."""
    if name not in DIT_BUILDERS:
        raise ValueError(f"unknown pipeline {name!r}; known: {', '.join(DIT_BUILDERS)}")
    return DIT_BUILDERS[name](seed=seed, size=size)
