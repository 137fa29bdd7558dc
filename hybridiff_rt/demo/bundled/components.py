"""Architectures of the bundled models: configs and builders (no weights, no training).

They are the public tiny builders of :mod:`hybridiff_rt.testing` with the bundled sizes.
Everything here is tiny on purpose (a few hundred thousand parameters per model) so that the
stock diffusers pipelines run the models on a CPU in seconds:

- ``build_tokenizer``: an in-memory byte-level ``CLIPTokenizer`` whose vocabulary is the
  characters a-z, 0-9, the words of the prompts and CLIP's two special tokens; 8 tokens of context.
- ``build_text_encoder``: a 2-layer, 32-wide ``CLIPTextModel`` / ``CLIPTextModelWithProjection``
  at seeded random init (frozen: it is never trained; token and position embeddings are drawn
  with unit variance so the prompt's digit token stands out).
- ``build_vae``: ``AutoencoderKL``, 1 x 32 x 32 pixels <-> 4 x 8 x 8 latents (vae_scale_factor 4).
- ``build_unet``: an SDXL-shaped ``UNet2DConditionModel`` (DownBlock2D + 2 CrossAttnDownBlock2D,
  ``addition_embed_type="text_time"``, two text encoders concatenated), epsilon prediction.
- ``build_sd3_transformer``: an ``SD3Transformer2DModel`` (4 joint blocks, width 64, patch 1).
- ``build_unet_scheduler`` / ``build_sd3_scheduler``: ``EulerDiscreteScheduler`` with SDXL's
  training betas / ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import string

import torch

from ...testing import pipelines as tiny
from .data import IMAGE_SIZE

TOKEN_CONTEXT = 8
"""Tokenizer ``model_max_length`` and text-encoder ``max_position_embeddings`` (tokens)."""

LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 4  # 8
TEXT_WIDTH = 32  # hidden size of each text encoder
TEXT_PROJECTION = 32  # projection_dim of CLIPTextModelWithProjection

PROMPT_WORDS = ("a", "handwritten", "digit")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tokenizer_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE tables for ``CLIPTokenizer``: ``(vocab, merges)``.

    Symbols: the two specials, each of a-z and 0-9 with and without the end-of-word marker
    ``</w>``, and every prefix of the prompt words, so that "a handwritten digit 7" tokenizes
    to ``[BOS, a, handwritten, digit, 7, EOS, EOS, EOS]``. Unknown words fall back to letters.
    """
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in PROMPT_WORDS:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        cur = syms[0]
        for s in syms[1:]:
            if (cur, s) not in merges:
                merges.append((cur, s))
            cur = cur + s
            vocab.setdefault(cur, len(vocab))
    return vocab, merges


def build_tokenizer():
    """A ``transformers.CLIPTokenizer`` built in memory (no files, no network)."""
    vocab, merges = tokenizer_vocab_and_merges()
    return tiny.clip_tokenizer(TOKEN_CONTEXT, vocab=vocab, merges=merges, bos_token=BOS,
                               eos_token=EOS, unk_token=EOS, pad_token=EOS)


def text_encoder_config():
    vocab, _ = tokenizer_vocab_and_merges()
    return tiny.clip_text_config(TEXT_WIDTH, TEXT_PROJECTION, TOKEN_CONTEXT,
                                 vocab_size=len(vocab), hidden_act="quick_gelu",
                                 bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_text_encoder(seed: int, with_projection: bool):
    """A frozen random ``CLIPTextModel`` (or ``...WithProjection``), fixed by ``seed``."""
    torch.manual_seed(seed)
    model = tiny.clip_text_encoder(text_encoder_config(), with_projection)
    g = torch.Generator().manual_seed(seed + 1)
    emb = getattr(model, "text_model", model).embeddings
    with torch.no_grad():
        emb.token_embedding.weight.copy_(torch.randn(emb.token_embedding.weight.shape, generator=g))
        emb.position_embedding.weight.copy_(
            0.5 * torch.randn(emb.position_embedding.weight.shape, generator=g))
    return model.eval().requires_grad_(False)


def build_vae(scaling_factor: float = 1.0, shift_factor: float = 0.0):
    """``AutoencoderKL``: ``[B,1,32,32]`` in [-1,1] <-> latents ``[B,4,8,8]``."""
    return tiny.vae(LATENT_CHANNELS, in_channels=1, out_channels=1,
                    block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=IMAGE_SIZE,
                    scaling_factor=scaling_factor, shift_factor=shift_factor, force_upcast=False)


ADDITION_TIME_EMBED_DIM = 8


def build_unet():
    """SDXL-shaped ``UNet2DConditionModel`` on ``[B,4,8,8]`` latents (epsilon prediction).

    Cross-attention width 64 = the two text encoders' hidden states concatenated (as SDXL);
    ``text_time`` added conditioning = pooled projection of text encoder 2 (32) + 6 time ids x 8.
    """
    return tiny.sdxl_unet(
        (32, 48, 48), pooled_dim=TEXT_PROJECTION, time_embed_dim=ADDITION_TIME_EMBED_DIM,
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        layers_per_block=1, transformer_layers_per_block=1, attention_head_dim=(2, 3, 3),
        cross_attention_dim=2 * TEXT_WIDTH)


def build_sd3_transformer():
    """Tiny ``SD3Transformer2DModel`` on ``[B,4,8,8]`` latents (flow matching, velocity)."""
    return tiny.sd3_transformer(
        sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=4, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH, caption_projection_dim=64,
        pooled_projection_dim=2 * TEXT_PROJECTION, pos_embed_max_size=2 * LATENT_SIZE)


def build_unet_scheduler():
    """``EulerDiscreteScheduler`` with SDXL's training schedule (scaled-linear betas)."""
    return tiny.euler_scheduler(num_train_timesteps=1000, prediction_type="epsilon")


SD3_SHIFT = 3.0


def build_sd3_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` (SD3's, shift 3)."""
    return tiny.flow_match_scheduler(SD3_SHIFT, num_train_timesteps=1000)
