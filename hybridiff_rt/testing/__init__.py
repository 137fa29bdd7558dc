"""Test material for hybridiff_rt and for users' own tests: nothing here is downloaded.

* Tiny random-init diffusers pipelines (:func:`sdxl_pipeline`, :func:`sd_pipeline`,
  :func:`sd3_pipeline`, :func:`build`) built offline with in-memory tokenizers, and the component
  builders they are made of (the bundled demo models are built from the same ones).
* :data:`VARIANTS` / :func:`build_variant`: every diffusers pipeline variant of those families
  (img2img, inpaint, ControlNet, T2I-Adapter, IP-Adapter, PAG, Heun, skip-layer guidance, ...)
  from the same tiny components, with the inputs each needs (:func:`add_ip_adapter` gives a
  U-Net, an SD3, Flux or Chroma transformer a seeded random IP-Adapter); :data:`INFO` and
  :func:`count_denoiser_calls` say how often, and on what batch, each one calls its denoiser.
* :data:`DIT_BUILDERS` / :func:`build_dit`: tiny PixArt-Sigma, Sana, AuraFlow, HunyuanDiT,
  Wan 2.1 / 2.2, SkyReels V2, Lumina2, Qwen-Image, Flux, CogView4 and Chroma pipelines with
  precomputed prompt embeddings (:mod:`.dit_pipelines`).
* :data:`UNET_KIN_BUILDERS` / :func:`build_unet_kin`: tiny DeepFloyd IF and Kandinsky 2.2
  pipelines, U-Nets of block types the stage adapter does not stage, and
  :func:`instruct_pix2pix` (three guidance branches) (:mod:`.unet_pipelines`).
* :func:`run_ranks`: run a function on N local processes with torchrun's environment, one CPU
  thread each, so two processes are two devices on a machine without GPUs.

The runtime core never imports this package.
"""

from .dit_pipelines import DIT_BUILDERS, DIT_INFO, DiTInfo, build_dit
from .pipelines import (
    BUILDERS,
    DEFAULT_IMAGE_SIZE,
    build,
    byte_level_vocab,
    clip_text_config,
    clip_text_encoder,
    clip_tokenizer,
    euler_scheduler,
    flow_match_scheduler,
    sd3_pipeline,
    sd3_transformer,
    sd_pipeline,
    sdxl_pipeline,
    sdxl_unet,
    seeded,
    vae,
)
from .ip_adapters import add_ip_adapter
from .ranks import Outcome, all_ok, free_port, run_ranks
from .reference import hidden_imports_env, per_branch_forward
from .unet_pipelines import UNET_KIN_BUILDERS, build_unet_kin, instruct_pix2pix
from .variants import (
    INFO,
    VARIANTS,
    DenoiserCalls,
    VariantInfo,
    build_variant,
    count_denoiser_calls,
    denoiser,
)

__all__ = ["DIT_BUILDERS", "DIT_INFO", "DiTInfo", "build_dit", "UNET_KIN_BUILDERS",
           "build_unet_kin", "instruct_pix2pix", "hidden_imports_env", "per_branch_forward",
           "BUILDERS", "DEFAULT_IMAGE_SIZE", "INFO", "VARIANTS", "DenoiserCalls", "Outcome",
           "VariantInfo", "add_ip_adapter", "all_ok", "build", "build_variant", "byte_level_vocab",
           "clip_text_config", "clip_text_encoder", "clip_tokenizer", "count_denoiser_calls",
           "denoiser", "euler_scheduler", "flow_match_scheduler", "free_port", "run_ranks",
           "sd3_pipeline", "sd3_transformer", "sd_pipeline", "sdxl_pipeline", "sdxl_unet",
           "seeded", "vae"]
