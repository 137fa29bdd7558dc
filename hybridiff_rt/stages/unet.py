"""Staged adapter for diffusers' ``UNet2DConditionModel`` (SD1.x, SD2.x, SDXL and alike).

The units mirror ``UNet2DConditionModel.forward`` (diffusers 0.42) step by step, calling the
model's own submodules with the same arguments in the same order, so running them all equals the
model's forward bit for bit.

Units, in order (B = block index, I = index inside the block):

* ``conv_in``: ``conv_in`` on the input sample.
* ``downB.attnI`` (cross-attention block) / ``downB.resI`` (plain block): resnet I, then its
  transformer I if the block has one.
* ``downB.down``: the block's downsampler(s).
* ``mid.res0``: the mid block's first resnet; ``mid.attnI``: mid attention I followed by mid
  resnet I+1. The mid ControlNet residual is added at the end of the last mid unit.
* ``upB.attnI`` / ``upB.resI``: pop one skip, (FreeU if enabled), concat, resnet I, transformer I.
  Up blocks have ``layers_per_block + 1`` of these, so cuts can fall inside SDXL's deepest block.
* ``upB.up``: the block's upsampler(s), with diffusers' forced output size when the latent is not
  a multiple of ``2 ** num_upsamplers``.
* ``out``: ``conv_norm_out`` + ``conv_act`` (when present) and ``conv_out``.

State names: ``"sample"`` (input of ``conv_in``, and the prediction after ``out``), ``"skipNN"``
(NN = index of the skip tensor in diffusers' ``down_block_res_samples``, zero-padded to two
digits) and ``"hidden"`` (the running activation after the mid block). On the down path the
running activation is always the most recent skip, so it is not stored twice: a down unit reads
the highest-numbered live skip and adds the next one. Up units remove the skip they consume, so a
state holds exactly the skips still to be consumed. ControlNet residuals live in the context and
are added where each skip is consumed (the same single addition diffusers does).

Supported blocks: down ``DownBlock2D``, ``CrossAttnDownBlock2D``; mid ``UNetMidBlock2DCrossAttn``,
``UNetMidBlock2D`` or none; up ``UpBlock2D``, ``CrossAttnUpBlock2D``. All time/class/added
embeddings, encoder projections and GLIGEN run in ``prepare`` through the model's own methods.
Not supported (UnsupportedModelError): T2I-Adapter residuals
(``down_intrablock_additional_residuals`` or the legacy ``down_block_additional_residuals``
without ``mid_block_additional_residual``), other block types, a per-call LoRA ``scale``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils.torch_utils import apply_freeu

from ..errors import ShapeError, UnsupportedModelError
from .base import StageContext, StagedDenoiser, State, Unit, require_plain_forward, strip_lora_scale

SUPPORTED_DOWN_BLOCKS = (DownBlock2D, CrossAttnDownBlock2D)
SUPPORTED_MID_BLOCKS = (UNetMidBlock2DCrossAttn, UNetMidBlock2D)
SUPPORTED_UP_BLOCKS = (UpBlock2D, CrossAttnUpBlock2D)


def skip_key(index: int) -> str:
    """State name of skip tensor ``index`` (its position in diffusers' ``down_block_res_samples``)."""
    return f"skip{index:02d}"


@dataclasses.dataclass
class UNetContext(StageContext):
    """Per-step context of a staged UNet2DConditionModel.

    Attributes:
        initial_state: ``{"sample": (B, C_in, H, W)}`` (after ``center_input_sample`` / the
            image hint concat, when the config asks for them).
        emb: (B, time_embed_dim) time (+class, +added) embedding after ``time_embed_act``.
        encoder_hidden_states: (B, S, D) text context after ``encoder_hid_proj`` (a tuple for
            IP-adapter image projections, as diffusers passes it).
        attention_mask / encoder_attention_mask: the masks as additive biases (B, 1, S), or None.
        cross_attention_kwargs: passed to every transformer (LoRA ``scale`` removed, GLIGEN
            objects projected), or None.
        down_residuals: ControlNet residuals indexed like the skips, or None.
        mid_residual: ControlNet residual added after the mid block, or None.
        forward_upsample_size: whether upsamplers get an explicit output size (latent H or W not
            a multiple of ``2 ** num_upsamplers``).
    """

    emb: torch.Tensor
    encoder_hidden_states: Any
    attention_mask: torch.Tensor | None
    encoder_attention_mask: torch.Tensor | None
    cross_attention_kwargs: dict[str, Any] | None
    down_residuals: tuple[torch.Tensor, ...] | None
    mid_residual: torch.Tensor | None
    forward_upsample_size: bool


def _cross_attn(attn: torch.nn.Module, h: torch.Tensor, ctx: UNetContext) -> torch.Tensor:
    """A transformer of a cross-attention block, called exactly as the diffusers blocks call it."""
    return attn(
        h,
        encoder_hidden_states=ctx.encoder_hidden_states,
        cross_attention_kwargs=ctx.cross_attention_kwargs,
        attention_mask=ctx.attention_mask,
        encoder_attention_mask=ctx.encoder_attention_mask,
        return_dict=False,
    )[0]


class ConvIn(Unit):
    """``sample`` -> ``conv_in`` -> first skip (which is also the running activation)."""

    def __init__(self, model: UNet2DConditionModel, dst: str) -> None:
        self.name, self.conv, self.dst = "conv_in", model.conv_in, dst

    def __call__(self, state: State, ctx: UNetContext) -> State:
        out = {k: v for k, v in state.items() if k != "sample"}
        out[self.dst] = self.conv(state["sample"])
        return out


class DownLayer(Unit):
    """Resnet ``index`` (+ its transformer) of a down block: reads skip ``src``, adds skip ``dst``."""

    def __init__(self, name: str, block: torch.nn.Module, index: int, src: str, dst: str) -> None:
        self.name, self.src, self.dst = name, src, dst
        self.resnet = block.resnets[index]
        self.attn = block.attentions[index] if isinstance(block, CrossAttnDownBlock2D) else None

    def __call__(self, state: State, ctx: UNetContext) -> State:
        h = self.resnet(state[self.src], ctx.emb)
        if self.attn is not None:
            h = _cross_attn(self.attn, h, ctx)
        out = dict(state)
        out[self.dst] = h
        return out


class Downsample(Unit):
    """The downsampler(s) of a down block: reads skip ``src``, adds skip ``dst``."""

    def __init__(self, name: str, block: torch.nn.Module, src: str, dst: str) -> None:
        self.name, self.block, self.src, self.dst = name, block, src, dst

    def __call__(self, state: State, ctx: UNetContext) -> State:
        h = state[self.src]
        for downsampler in self.block.downsamplers:
            h = downsampler(h)
        out = dict(state)
        out[self.dst] = h
        return out


class MidLayer(Unit):
    """One slice of the mid block: ``resnets[0]`` (index -1) or ``attentions[i]`` + ``resnets[i+1]``.

    Reads ``src`` (the last skip for the first slice, else ``"hidden"``), writes ``"hidden"``;
    the last slice adds the ControlNet mid residual.
    """

    def __init__(self, name: str, mid: torch.nn.Module, attn_index: int, src: str, last: bool) -> None:
        self.name, self.src, self.last = name, src, last
        self.cross = isinstance(mid, UNetMidBlock2DCrossAttn)
        if attn_index < 0:
            self.attn, self.resnet = None, mid.resnets[0]
        else:
            self.attn, self.resnet = mid.attentions[attn_index], mid.resnets[attn_index + 1]

    def __call__(self, state: State, ctx: UNetContext) -> State:
        h = state[self.src]
        if self.attn is not None:
            h = _cross_attn(self.attn, h, ctx) if self.cross else self.attn(h, temb=ctx.emb)
        h = self.resnet(h, ctx.emb)
        if self.last and ctx.mid_residual is not None:
            h = h + ctx.mid_residual
        out = dict(state)
        out["hidden"] = h
        return out


class UpLayer(Unit):
    """Resnet ``index`` (+ transformer) of an up block; consumes (removes) skip ``skip``.

    ``src`` is ``"hidden"``, except for the first up slice of a model without a mid block, where
    the running activation is still the last skip (then the mid ControlNet residual is added here,
    as diffusers adds it even without a mid block).
    """

    def __init__(
        self, name: str, block: torch.nn.Module, index: int, skip: int, src: str, add_mid_residual: bool
    ) -> None:
        self.name, self.block, self.skip, self.src = name, block, skip, src
        self.add_mid_residual = add_mid_residual
        self.resnet = block.resnets[index]
        self.attn = block.attentions[index] if isinstance(block, CrossAttnUpBlock2D) else None

    def __call__(self, state: State, ctx: UNetContext) -> State:
        h = state[self.src]
        if self.add_mid_residual and ctx.mid_residual is not None:
            h = h + ctx.mid_residual
        res = state[skip_key(self.skip)]
        if ctx.down_residuals is not None:
            res = res + ctx.down_residuals[self.skip]
        b = self.block
        if getattr(b, "s1", None) and getattr(b, "s2", None) and getattr(b, "b1", None) and getattr(b, "b2", None):
            h, res = apply_freeu(b.resolution_idx, h, res, s1=b.s1, s2=b.s2, b1=b.b1, b2=b.b2)
        h = torch.cat([h, res], dim=1)
        h = self.resnet(h, ctx.emb)
        if self.attn is not None:
            h = _cross_attn(self.attn, h, ctx)
        out = {k: v for k, v in state.items() if k != skip_key(self.skip) and k != self.src}
        out["hidden"] = h
        return out


class Upsample(Unit):
    """The upsampler(s) of an up block on ``"hidden"``.

    With ``ctx.forward_upsample_size`` the output size is the spatial size of skip
    ``size_skip`` (the next skip to be consumed), as diffusers forwards it.
    """

    def __init__(self, name: str, block: torch.nn.Module, size_skip: int) -> None:
        self.name, self.block, self.size_skip = name, block, size_skip

    def __call__(self, state: State, ctx: UNetContext) -> State:
        size = state[skip_key(self.size_skip)].shape[2:] if ctx.forward_upsample_size else None
        h = state["hidden"]
        for upsampler in self.block.upsamplers:
            h = upsampler(h, size)
        out = dict(state)
        out["hidden"] = h
        return out


class ConvOut(Unit):
    """``hidden`` -> conv_norm_out -> conv_act -> conv_out -> ``sample`` (the prediction)."""

    def __init__(self, model: UNet2DConditionModel) -> None:
        self.name, self.model = "out", model

    def __call__(self, state: State, ctx: UNetContext) -> State:
        m, h = self.model, state["hidden"]
        if m.conv_norm_out:
            h = m.conv_norm_out(h)
            h = m.conv_act(h)
        return {"sample": m.conv_out(h)}


def _unsupported_block(where: str, block: torch.nn.Module, supported: tuple[type, ...]) -> UnsupportedModelError:
    names = ", ".join(t.__name__ for t in supported)
    return UnsupportedModelError(
        f"UNet2DConditionModel {where} is a {type(block).__name__}; staging supports {names} there. "
        "Use a model built from those block types (SD1.x / SD2.x / SDXL layouts)."
    )


class StagedUNet(StagedDenoiser):
    """A ``UNet2DConditionModel`` as prepare / units / finish (see the module docstring).

    ``prepare`` takes exactly the keyword arguments of ``UNet2DConditionModel.forward``;
    ``finish`` returns the (B, out_channels, H, W) prediction.
    """

    def __init__(self, model: UNet2DConditionModel) -> None:
        require_plain_forward(model, UNet2DConditionModel)
        self.model = model
        units: list[Unit] = []
        skips: list[int] = [0]  # stack of live skip indices, as diffusers' down_block_res_samples
        units.append(ConvIn(model, skip_key(0)))
        for b, block in enumerate(model.down_blocks):
            if type(block) not in SUPPORTED_DOWN_BLOCKS:
                raise _unsupported_block(f"down_blocks[{b}]", block, SUPPORTED_DOWN_BLOCKS)
            kind = "attn" if isinstance(block, CrossAttnDownBlock2D) else "res"
            for i in range(len(block.resnets)):
                nxt = skips[-1] + 1
                units.append(DownLayer(f"down{b}.{kind}{i}", block, i, skip_key(skips[-1]), skip_key(nxt)))
                skips.append(nxt)
            if block.downsamplers is not None:
                nxt = skips[-1] + 1
                units.append(Downsample(f"down{b}.down", block, skip_key(skips[-1]), skip_key(nxt)))
                skips.append(nxt)
        self.num_skips = len(skips)
        if self.num_skips > 100:
            raise UnsupportedModelError(f"UNet with {self.num_skips} skip tensors; at most 100 are supported")

        mid = model.mid_block
        if mid is not None:
            if type(mid) not in SUPPORTED_MID_BLOCKS:
                raise _unsupported_block("mid_block", mid, SUPPORTED_MID_BLOCKS)
            n_pairs = len(mid.attentions)
            units.append(MidLayer("mid.res0", mid, -1, skip_key(skips[-1]), last=n_pairs == 0))
            for i in range(n_pairs):
                units.append(MidLayer(f"mid.attn{i}", mid, i, "hidden", last=i == n_pairs - 1))

        first_up = True
        for b, block in enumerate(model.up_blocks):
            if type(block) not in SUPPORTED_UP_BLOCKS:
                raise _unsupported_block(f"up_blocks[{b}]", block, SUPPORTED_UP_BLOCKS)
            kind = "attn" if isinstance(block, CrossAttnUpBlock2D) else "res"
            for i in range(len(block.resnets)):
                if not skips:
                    raise UnsupportedModelError(
                        "UNet up blocks consume more skip tensors than the down blocks produce; "
                        "this layout is not a standard UNet2DConditionModel"
                    )
                skip = skips.pop()
                src = skip_key(skip) if (first_up and mid is None) else "hidden"
                add_mid = first_up and mid is None
                units.append(UpLayer(f"up{b}.{kind}{i}", block, i, skip, src, add_mid_residual=add_mid))
                first_up = False
            if block.upsamplers is not None:
                if b == len(model.up_blocks) - 1 or not skips:
                    raise UnsupportedModelError(
                        f"up_blocks[{b}] has an upsampler but no skip follows it; staging supports "
                        "upsamplers only on non-final up blocks (the standard layout)"
                    )
                units.append(Upsample(f"up{b}.up", block, skips[-1]))
        if skips or first_up:
            raise UnsupportedModelError(
                f"UNet down blocks produce {self.num_skips} skip tensors but the up blocks consume "
                f"{self.num_skips - len(skips)}; this layout is not a standard UNet2DConditionModel"
            )
        units.append(ConvOut(model))
        self.units = units

    def prepare(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNetContext:
        """Everything of ``UNet2DConditionModel.forward`` before ``conv_in`` (cheap: embeddings,
        masks, text projections). Arguments as in that forward; ``return_dict`` is ignored.

        Returns:
            UNetContext whose ``initial_state`` is ``{"sample": (B, C_in, H, W)}``.
        """
        m = self.model
        cross_attention_kwargs = strip_lora_scale(m, cross_attention_kwargs, "cross_attention_kwargs")
        if down_intrablock_additional_residuals is not None:
            raise UnsupportedModelError(
                "down_intrablock_additional_residuals (T2I-Adapter) is not supported by staging; "
                "run without the adapter or use ControlNet residuals"
            )
        if down_block_additional_residuals is not None and mid_block_additional_residual is None:
            raise UnsupportedModelError(
                "down_block_additional_residuals without mid_block_additional_residual is diffusers' "
                "legacy T2I-Adapter path, which staging does not support; for ControlNet pass both"
            )

        default_overall_up_factor = 2**m.num_upsamplers
        forward_upsample_size = any(dim % default_overall_up_factor != 0 for dim in sample.shape[-2:])

        if attention_mask is not None:
            attention_mask = (1 - attention_mask.to(sample.dtype)) * -10000.0
            attention_mask = attention_mask.unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            encoder_attention_mask = encoder_attention_mask.unsqueeze(1)

        if m.config.center_input_sample:
            sample = 2 * sample - 1.0

        t_emb = m.get_time_embed(sample=sample, timestep=timestep)
        emb = m.time_embedding(t_emb, timestep_cond)
        class_emb = m.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            if m.config.class_embeddings_concat:
                emb = torch.cat([emb, class_emb], dim=-1)
            else:
                emb = emb + class_emb
        aug_emb = m.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        if m.config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        emb = emb + aug_emb if aug_emb is not None else emb
        if m.time_embed_act is not None:
            emb = m.time_embed_act(emb)
        encoder_hidden_states = m.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

        if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen", None) is not None:
            cross_attention_kwargs = cross_attention_kwargs.copy()
            gligen_args = cross_attention_kwargs.pop("gligen")
            cross_attention_kwargs["gligen"] = {"objs": m.position_net(**gligen_args)}

        down_residuals = mid_residual = None
        if down_block_additional_residuals is not None and mid_block_additional_residual is not None:
            down_residuals = tuple(down_block_additional_residuals)
            mid_residual = mid_block_additional_residual
            if len(down_residuals) != self.num_skips:
                raise ShapeError(
                    f"down_block_additional_residuals has {len(down_residuals)} tensors but this UNet "
                    f"has {self.num_skips} skip connections; pass one residual per skip (the "
                    "ControlNet must match the UNet's block layout)"
                )

        return UNetContext(
            initial_state={"sample": sample},
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            down_residuals=down_residuals,
            mid_residual=mid_residual,
            forward_upsample_size=forward_upsample_size,
        )

    def finish(self, state: State, ctx: UNetContext) -> torch.Tensor:
        """The prediction (B, out_channels, H, W) from the state after the ``out`` unit."""
        if set(state) != {"sample"}:
            raise ShapeError(f"finish expects the state after the last unit ('out'), got keys {sorted(state)}")
        return state["sample"]
