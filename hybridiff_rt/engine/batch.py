"""Pure helpers that split a CFG-doubled batch of denoiser arguments into its two branches.

Diffusers pipelines call the denoiser once per step with the batch ``[uncond; cond]`` (uncond
first). Every argument whose leading dimension equals the doubled batch size is batch-shaped and
is split at the middle; everything else (scalars, 0-d timesteps, None, config dicts, tensors with
another leading size) is passed to both branches unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import ShapeError


def rows_per_item(value: torch.Tensor, batch: int, frames: int = 1) -> int:
    """Leading rows of ``value`` per item of a ``batch``: 1 for ``batch`` rows, ``frames`` for
    ``batch x frames`` rows (conditioning repeated per frame, each item's rows contiguous), 0
    when ``value`` is not batch-shaped (a scalar, or another leading size)."""
    rows = value.shape[0] if value.dim() >= 1 else 0
    if rows == batch:
        return 1
    return frames if frames > 1 and rows == batch * frames else 0


def split_cfg_batch(value: Any, full_batch: int, frames: int = 1) -> tuple[Any, Any]:
    """Split ``value`` (a tensor or a nested dict/list/tuple of them) into (uncond, cond) halves.

    Args:
        value: an argument of the denoiser call.
        full_batch: the doubled batch size 2B (the sample's leading dimension).
        frames: with > 1, tensors of 2B x ``frames`` rows (conditioning repeated per frame,
            uncond rows first) are split at the middle too.

    Returns:
        (uncond_part, cond_part): tensors of leading size B (or B x frames), or ``value`` itself
        twice where the argument is not batch-shaped.
    """
    if full_batch % 2:
        raise ShapeError(f"a classifier-free-guided batch must have an even size [uncond; cond], "
                         f"got {full_batch}")
    if isinstance(value, torch.Tensor):
        half = rows_per_item(value, full_batch, frames) * (full_batch // 2)
        return (value[:half], value[half:]) if half else (value, value)
    if isinstance(value, dict):
        pairs = {k: split_cfg_batch(v, full_batch, frames) for k, v in value.items()}
        return ({k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()})
    if isinstance(value, (list, tuple)):
        pairs = [split_cfg_batch(v, full_batch, frames) for v in value]
        return (type(value)(p[0] for p in pairs), type(value)(p[1] for p in pairs))
    return value, value


def on_batch_axis(fn: Callable[[Any], Any], value: Any, axis: int) -> Any:
    """``fn(value)`` for a ``value`` whose batch axis is ``axis``: a tensor with more than
    ``axis`` dimensions goes to ``fn`` with that axis moved first, and the tensors ``fn``
    returns (one, or a tuple of them) come back with it moved back; anything else, and axis 0,
    goes to ``fn`` as it is."""
    if not axis or not isinstance(value, torch.Tensor) or value.dim() <= axis:
        return fn(value)
    out = fn(value.movedim(axis, 0))
    if isinstance(out, tuple):
        return tuple(part.movedim(0, axis) for part in out)
    return out.movedim(0, axis)


def join_cfg_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The doubled prediction ``[uncond; cond]`` a diffusers pipeline expects back."""
    return torch.cat([uncond, cond], dim=0)


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a nested argument, in a deterministic order (dict keys sorted)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in tensors_in(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def describe_shapes(value: Any) -> str:
    """A compact, deterministic text of the structure, shapes and dtypes of an argument tree."""
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)}:{str(value.dtype).replace('torch.', '')}"
    if isinstance(value, dict):
        inner = ",".join(f"{k}={describe_shapes(value[k])}" for k in sorted(value, key=str))
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(describe_shapes(v) for v in value) + "]"
    return type(value).__name__ if value is not None else "None"


def guidance_value(scale: Any) -> float | torch.Tensor:
    """A pipeline's guidance scale as the runtime takes it: a float for a number or a
    one-element tensor, the tensor itself for a per-sample or per-frame scale (Stable Video
    Diffusion's ``(B, F, 1, 1, 1)`` ramp), 1.0 for None."""
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        return scale
    return float(scale)
