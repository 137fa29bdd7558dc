"""Staged denoisers: a model cut into ordered units, and the partitioner that groups units into stages.

``stage_denoiser(model)`` picks the adapter for a supported model family:

* ``UNet2DConditionModel`` -> :class:`~hybridiff_rt.stages.unet.StagedUNet`
* ``SD3Transformer2DModel`` -> :class:`~hybridiff_rt.stages.mmdit.StagedSD3Transformer`
* the DiT families described in :data:`~hybridiff_rt.stages.dit.DIT_FAMILIES` (PixArt-Sigma,
  Sana, Wan, Qwen-Image, Flux, HiDream-I1 and the others listed there) ->
  :class:`~hybridiff_rt.stages.dit.StagedDiT`

See :mod:`hybridiff_rt.stages.base` for the prepare / units / finish contract and the state format,
:mod:`hybridiff_rt.stages.partition` for the cut search and :mod:`hybridiff_rt.stages.costs` for
per-unit cost measurement.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import (
    StageContext,
    StagedDenoiser,
    State,
    TensorSpec,
    Unit,
    empty_state_like,
    flatten_state,
    model_device,
    state_layout,
    state_nbytes,
    unflatten_state,
)
from .costs import UnitProfile, clear_profile_cache, profile_cache_key, profile_units
from .partition import PartitionPlan, partition, plan_partition, stage_times_ms

SUPPORTED_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel")


def has_stage_adapter(model: torch.nn.Module) -> bool:
    """Whether :func:`stage_denoiser` has an adapter for ``model``'s class (it may still refuse a
    particular instance, e.g. one with hooks, with UnsupportedModelError)."""
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from .dit import dit_family

    return (isinstance(model, (UNet2DConditionModel, SD3Transformer2DModel))
            or dit_family(model) is not None)


def stage_denoiser(model: torch.nn.Module) -> StagedDenoiser:
    """Wrap a supported denoiser as a :class:`StagedDenoiser` (shares the model's weights).

    Raises:
        UnsupportedModelError: the model is not one of ``SUPPORTED_MODELS``, or uses a block type,
            hook or input feature the adapter does not stage (the message says which).
    """
    from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        from .unet import StagedUNet

        return StagedUNet(model)
    if isinstance(model, SD3Transformer2DModel):
        from .mmdit import StagedSD3Transformer

        return StagedSD3Transformer(model)
    from .dit import DIT_FAMILIES, StagedDiT, dit_family

    family = dit_family(model)
    if family is not None:
        return StagedDiT(model, family)
    raise UnsupportedModelError(
        f"cannot stage a {type(model).__module__}.{type(model).__qualname__}; supported denoisers are "
        f"diffusers {' and '.join(SUPPORTED_MODELS)}, and the DiTs described in stages.dit.DIT_FAMILIES "
        f"({', '.join(sorted(DIT_FAMILIES))}); describe a new DiT there, or unwrap torch.compile / "
        "DDP wrappers first"
    )


__all__ = [
    "SUPPORTED_MODELS",
    "PartitionPlan",
    "StageContext",
    "StagedDenoiser",
    "State",
    "TensorSpec",
    "Unit",
    "UnitProfile",
    "clear_profile_cache",
    "empty_state_like",
    "flatten_state",
    "has_stage_adapter",
    "model_device",
    "partition",
    "plan_partition",
    "profile_cache_key",
    "profile_units",
    "stage_denoiser",
    "stage_times_ms",
    "state_layout",
    "state_nbytes",
    "unflatten_state",
]
