"""Seeded random IP-Adapters for tiny denoisers, laid out as diffusers' loaders lay out real ones
(attention processors with image key/value projections, and an image projection), so that a
pipeline called with ``ip_adapter_image_embeds`` runs its IP-Adapter path offline."""

from __future__ import annotations

from .pipelines import seeded


def add_ip_adapter(model, seed: int, image_dim: int = 16, tokens: int = 4):
    """Give ``model`` a seeded random IP-Adapter, laid out as diffusers' ``load_ip_adapter``
    lays out a real one, projecting ``image_dim``-wide image embeddings to ``tokens`` image
    tokens. Returns ``model``.

    * ``UNet2DConditionModel``: IP-Adapter attention processors (extra key/value projections of
      the image tokens) on every cross-attention, and an ``ImageProjection`` as
      ``encoder_hid_proj``; it reads ``added_cond_kwargs["image_embeds"]`` (a list of
      (2B, 1, image_dim) tensors).
    * ``SD3Transformer2DModel``: ``SD3IPAdapterJointAttnProcessor2_0`` on every joint attention,
      and an ``IPAdapterTimeImageProjection`` (timestep-conditioned resampler) as ``image_proj``;
      it reads ``joint_attention_kwargs["ip_adapter_image_embeds"]`` ((2B, N, image_dim)).
    * ``FluxTransformer2DModel``, ``ChromaTransformer2DModel``: ``FluxIPAdapterAttnProcessor`` on
      the dual-stream blocks (the single-stream blocks keep theirs), and an ``ImageProjection``
      as ``encoder_hid_proj``; it reads ``joint_attention_kwargs["ip_adapter_image_embeds"]``
      (a list of (B, 1, image_dim) tensors; these pipelines call once per branch).

    Raises:
        ValueError: another model class.
    """
    kind = type(model).__name__
    if kind not in _LAYOUTS:
        raise ValueError(f"no IP-Adapter layout for a {kind}; known: {', '.join(_LAYOUTS)}")
    return _LAYOUTS[kind](model, seed, image_dim, tokens)


def _add_unet_ip_adapter(unet, seed: int, image_dim: int, tokens: int):
    """The U-Net layout (``UNet2DConditionLoadersMixin._load_ip_adapter_weights``)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    config = unet.config
    widths = list(config.block_out_channels)
    processors = {}
    with seeded(seed):
        for name, processor in unet.attn_processors.items():
            if name.endswith("attn1.processor"):  # self-attention keeps its processor
                processors[name] = type(processor)()
                continue
            if name.startswith("mid_block"):
                width = widths[-1]
            elif name.startswith("up_blocks"):
                width = widths[::-1][int(name.split(".")[1])]
            else:
                width = widths[int(name.split(".")[1])]
            processors[name] = IPAdapterAttnProcessor2_0(
                hidden_size=width, cross_attention_dim=config.cross_attention_dim, scale=1.0,
                num_tokens=[tokens])
        unet.set_attn_processor(processors)
        projection = ImageProjection(cross_attention_dim=config.cross_attention_dim,
                                     image_embed_dim=image_dim, num_image_text_embeds=tokens)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    return unet


def _add_sd3_ip_adapter(transformer, seed: int, image_dim: int, tokens: int,
                        resampler_width: int = 32):
    """SD3's layout (``SD3Transformer2DLoadersMixin._load_ip_adapter_weights``): the resampler's
    time embedding (``resampler_width`` wide) also conditions each processor's image-token norm."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterTimeImageProjection

    config = transformer.config
    inner = config.attention_head_dim * config.num_attention_heads
    with seeded(seed):
        transformer.set_attn_processor({
            name: SD3IPAdapterJointAttnProcessor2_0(
                hidden_size=inner, ip_hidden_states_dim=inner, head_dim=config.attention_head_dim,
                timesteps_emb_dim=resampler_width, scale=1.0)
            for name in transformer.attn_processors})
        transformer.image_proj = IPAdapterTimeImageProjection(
            embed_dim=image_dim, output_dim=inner, hidden_dim=resampler_width, depth=1,
            dim_head=16, heads=2, num_queries=tokens, timestep_in_dim=16)
    return transformer


def _add_flux_ip_adapter(transformer, seed: int, image_dim: int, tokens: int):
    """Flux's layout (``FluxTransformer2DLoadersMixin._load_ip_adapter_weights``), which
    Chroma's transformer shares."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    config = transformer.config
    inner = config.attention_head_dim * config.num_attention_heads
    width = config.joint_attention_dim
    processors = {}
    with seeded(seed):
        for name, processor in transformer.attn_processors.items():
            if name.startswith("single_transformer_blocks"):  # no image tokens there
                processors[name] = type(processor)()
            else:
                processors[name] = FluxIPAdapterAttnProcessor(
                    hidden_size=inner, cross_attention_dim=width, scale=1.0, num_tokens=[tokens])
        transformer.set_attn_processor(processors)
        projection = ImageProjection(cross_attention_dim=width, image_embed_dim=image_dim,
                                     num_image_text_embeds=tokens)
    transformer.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    return transformer


#: model class name -> how its IP-Adapter is laid out
_LAYOUTS = {"UNet2DConditionModel": _add_unet_ip_adapter,
            "SD3Transformer2DModel": _add_sd3_ip_adapter,
            "FluxTransformer2DModel": _add_flux_ip_adapter,
            "ChromaTransformer2DModel": _add_flux_ip_adapter}
