"""Staged adapter for diffusers' ``SD3Transformer2DModel`` (SD3, SD3.5 incl. dual attention, qk-norm).

The units mirror ``SD3Transformer2DModel.forward`` (diffusers 0.42), calling the model's own
submodules with the same arguments in the same order, so running them all equals the model's
forward bit for bit.

Units, in order:

* ``pos_embed``: patch embedding + positional embedding of the latent (``pos_embed``, then
  ``.contiguous()`` as diffusers does) and the caption projection (``context_embedder``).
* ``blocks.I``: ``transformer_blocks[I]`` (a ``JointTransformerBlock``; identity when I is in
  ``skip_layers``), then the ControlNet residual for that block, if given.
* ``out``: ``norm_out`` (AdaLN with the time embedding), ``proj_out`` and unpatchify.

State names (B = batch, N = H*W / patch_size**2 image tokens, S = text tokens, D = inner dim):

* before ``pos_embed``: ``"sample"`` (B, C_in, H, W) and ``"encoder"`` (B, S, joint_attention_dim);
* after ``pos_embed`` and after every block but the last: ``"hidden"`` (B, N, D) and
  ``"encoder"`` (B, S, caption_projection_dim);
* after the last block: ``"hidden"`` only (its text stream is not used afterwards; diffusers'
  last block is ``context_pre_only``);
* after ``out``: ``"sample"`` (B, out_channels, H, W), the prediction.

``prepare`` computes the time + pooled-text embedding and the attention kwargs (IP-adapter image
projection, when the model has one loaded).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..errors import ShapeError, UnsupportedModelError
from .base import StageContext, StagedDenoiser, State, Unit, require_plain_forward, strip_lora_scale


@dataclasses.dataclass
class MMDiTContext(StageContext):
    """Per-step context of a staged SD3Transformer2DModel.

    Attributes:
        initial_state: ``{"sample": (B, C_in, H, W), "encoder": (B, S, joint_attention_dim)}``.
        temb: (B, D) timestep + pooled-text embedding.
        joint_attention_kwargs: passed to every block (LoRA ``scale`` removed), or None.
        block_controlnet_hidden_states: ControlNet residuals (each (B, N, D)), or None.
        skip_layers: indices of blocks to skip (SD3.5 skip-layer guidance), or None.
        height, width: latent H and W (pixels of the latent, not patches).
    """

    temb: torch.Tensor
    joint_attention_kwargs: dict[str, Any] | None
    block_controlnet_hidden_states: list[torch.Tensor] | None
    skip_layers: list[int] | None
    height: int
    width: int


class PosEmbed(Unit):
    """``sample`` -> patch/pos embedding -> ``hidden``; ``encoder`` -> ``context_embedder``."""

    def __init__(self, model: SD3Transformer2DModel) -> None:
        self.name, self.model = "pos_embed", model

    def __call__(self, state: State, ctx: MMDiTContext) -> State:
        hidden = self.model.pos_embed(state["sample"])
        hidden = hidden.contiguous()
        encoder = self.model.context_embedder(state["encoder"])
        return {"encoder": encoder, "hidden": hidden}


class JointBlock(Unit):
    """``transformer_blocks[index]`` on (``hidden``, ``encoder``), plus its ControlNet residual."""

    def __init__(self, model: SD3Transformer2DModel, index: int) -> None:
        self.name, self.index = f"blocks.{index}", index
        self.block = model.transformer_blocks[index]
        self.num_blocks = len(model.transformer_blocks)
        self.last = index == self.num_blocks - 1

    def __call__(self, state: State, ctx: MMDiTContext) -> State:
        hidden, encoder = state["hidden"], state["encoder"]
        is_skip = True if ctx.skip_layers is not None and self.index in ctx.skip_layers else False
        if not is_skip:
            encoder, hidden = self.block(
                hidden_states=hidden,
                encoder_hidden_states=encoder,
                temb=ctx.temb,
                joint_attention_kwargs=ctx.joint_attention_kwargs,
            )
        controlnet = ctx.block_controlnet_hidden_states
        if controlnet is not None and self.block.context_pre_only is False:
            interval_control = self.num_blocks / len(controlnet)
            hidden = hidden + controlnet[int(self.index / interval_control)]
        if self.last:
            return {"hidden": hidden}
        return {"encoder": encoder, "hidden": hidden}


class Out(Unit):
    """``hidden`` -> norm_out -> proj_out -> unpatchify -> ``sample`` (B, out_channels, H, W)."""

    def __init__(self, model: SD3Transformer2DModel) -> None:
        self.name, self.model = "out", model

    def __call__(self, state: State, ctx: MMDiTContext) -> State:
        m = self.model
        hidden = m.norm_out(state["hidden"], ctx.temb)
        hidden = m.proj_out(hidden)
        patch_size = m.config.patch_size
        height = ctx.height // patch_size
        width = ctx.width // patch_size
        hidden = hidden.reshape(shape=(hidden.shape[0], height, width, patch_size, patch_size, m.out_channels))
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        output = hidden.reshape(shape=(hidden.shape[0], m.out_channels, height * patch_size, width * patch_size))
        return {"sample": output}


class StagedSD3Transformer(StagedDenoiser):
    """An ``SD3Transformer2DModel`` as prepare / units / finish (see the module docstring).

    ``prepare`` takes exactly the keyword arguments of ``SD3Transformer2DModel.forward``;
    ``finish`` returns the (B, out_channels, H, W) prediction.
    """

    def __init__(self, model: SD3Transformer2DModel) -> None:
        require_plain_forward(model, SD3Transformer2DModel)
        for i, block in enumerate(model.transformer_blocks):
            if type(block) is not JointTransformerBlock:
                raise UnsupportedModelError(
                    f"SD3Transformer2DModel.transformer_blocks[{i}] is a {type(block).__name__}; staging "
                    "supports JointTransformerBlock only (the SD3 / SD3.5 layouts)"
                )
        self.model = model
        self.units: list[Unit] = [PosEmbed(model)]
        self.units += [JointBlock(model, i) for i in range(len(model.transformer_blocks))]
        self.units.append(Out(model))

    def prepare(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        block_controlnet_hidden_states: list | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        skip_layers: list[int] | None = None,
    ) -> MMDiTContext:
        """The cheap part of ``SD3Transformer2DModel.forward``: the time/pooled-text embedding and
        attention kwargs. Arguments as in that forward; ``return_dict`` is ignored.

        Returns:
            MMDiTContext whose ``initial_state`` is ``{"sample": hidden_states, "encoder":
            encoder_hidden_states}``.
        """
        m = self.model
        joint_attention_kwargs = strip_lora_scale(m, joint_attention_kwargs, "joint_attention_kwargs")
        if encoder_hidden_states is None:
            raise ShapeError("SD3Transformer2DModel needs encoder_hidden_states (B, S, joint_attention_dim)")
        height, width = hidden_states.shape[-2:]
        temb = m.time_text_embed(timestep, pooled_projections)
        if joint_attention_kwargs is not None and "ip_adapter_image_embeds" in joint_attention_kwargs:
            ip_adapter_image_embeds = joint_attention_kwargs.pop("ip_adapter_image_embeds")
            ip_hidden_states, ip_temb = m.image_proj(ip_adapter_image_embeds, timestep)
            joint_attention_kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)
        return MMDiTContext(
            initial_state={"encoder": encoder_hidden_states, "sample": hidden_states},
            temb=temb,
            joint_attention_kwargs=joint_attention_kwargs,
            block_controlnet_hidden_states=block_controlnet_hidden_states,
            skip_layers=skip_layers,
            height=int(height),
            width=int(width),
        )

    def finish(self, state: State, ctx: MMDiTContext) -> torch.Tensor:
        """The prediction (B, out_channels, H, W) from the state after the ``out`` unit."""
        if set(state) != {"sample"}:
            raise ShapeError(f"finish expects the state after the last unit ('out'), got keys {sorted(state)}")
        return state["sample"]
