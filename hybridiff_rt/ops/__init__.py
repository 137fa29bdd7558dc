"""CFG combine and branch-discrepancy ops: a fused Triton kernel plus a torch reference.

Public functions:

    guided, stats = cfg_combine(uncond, cond, guidance_scale, out=None, *, guidance_rescale=0.0)
    stats = discrepancy_stats(uncond, cond)
    m = rel_mae(stats)

``stats`` is a float32 tensor of shape [2] on the inputs' device: ``[sum |cond - uncond|,
sum |uncond|]`` with differences taken in float32. ``rel_mae(stats)`` is the paper's M_i =
mean|c - u| / mean|u| (the element counts cancel). The stats are bit-identical for identical
inputs run to run, across ranks and across CPU thread counts (fixed-order reductions, no float
atomics; see :mod:`.reference` and :mod:`.cfg_triton` for the exact orders).

Dispatch (:func:`backend`): CUDA tensors run the compiled Triton kernel (the torch reference
when triton cannot be imported); CPU tensors run the torch reference, or the Triton kernel under
the interpreter when env ``TRITON_INTERPRET=1`` is set at call time.

Inference only: no autograd through these ops.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import HybridError, ShapeError
from . import cfg_triton, reference
from ._common import SUPPORTED_DTYPES

__all__ = [
    "SUPPORTED_DTYPES",
    "backend",
    "cfg_combine",
    "discrepancy_stats",
    "rel_mae",
]

BACKEND_TRITON = "triton"
BACKEND_INTERPRET = "triton-interpret"
BACKEND_REFERENCE = "reference"


def backend(t: torch.Tensor) -> str:
    """Which implementation :func:`cfg_combine` uses for tensors on ``t``'s device.

    Returns ``"triton-interpret"`` when env TRITON_INTERPRET=1 (any device), else ``"triton"`` for
    CUDA tensors when triton imports, else ``"reference"``.
    """
    if cfg_triton.interpret_requested():
        if not cfg_triton.triton_available():
            raise HybridError(
                "TRITON_INTERPRET=1 is set but triton cannot be imported; install triton or unset "
                "TRITON_INTERPRET to use the torch reference")
        return BACKEND_INTERPRET
    if isinstance(t, torch.Tensor) and t.device.type == "cuda" and cfg_triton.triton_available():
        return BACKEND_TRITON
    return BACKEND_REFERENCE


def cfg_combine(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float,
    out: torch.Tensor | None = None,
    *,
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance combine plus discrepancy stats in one pass.

    Args:
        uncond: unconditional prediction, any shape, float32/float16/bfloat16.
        cond: conditional prediction; same shape, dtype and device as ``uncond`` (else ShapeError).
            Non-contiguous inputs are copied once (``.contiguous()``) before the kernel.
        guidance_scale: w, a finite Python float.
        out: optional preallocated contiguous buffer for the guided prediction with the inputs'
            shape, dtype and device; may be ``uncond`` or ``cond`` itself (in-place), must not
            otherwise overlap them.
        guidance_rescale: diffusers' ``guidance_rescale`` (``rescale_noise_cfg``), 0.0 = off.
            Needs ndim >= 2 (std per sample over dims 1..). Not fused: applied after the kernel.
    Returns:
        ``(guided, stats)``. ``guided = u + w*(c - u)`` computed in float32 (each op rounded, no
        FMA) and cast to the input dtype (then rescaled if asked), shaped like the inputs (``out``
        when given). ``stats``: float32 [2] = ``[sum|c - u|, sum|u|]`` on the inputs' device,
        of the unrescaled branches.
    """
    if backend(uncond) == BACKEND_REFERENCE:
        return reference.cfg_combine_reference(
            uncond, cond, guidance_scale, out, guidance_rescale=guidance_rescale)
    return cfg_triton.cfg_combine_triton(
        uncond, cond, guidance_scale, out, guidance_rescale=guidance_rescale,
        interpret=cfg_triton.interpret_requested())


def discrepancy_stats(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Stats only (no guided output written): float32 [2] = ``[sum|c - u|, sum|u|]``.

    Same kernel family, validation and determinism as :func:`cfg_combine`; used on branches
    exchanged between ranks.
    """
    if backend(uncond) == BACKEND_REFERENCE:
        return reference.discrepancy_stats_reference(uncond, cond)
    return cfg_triton.discrepancy_stats_triton(
        uncond, cond, interpret=cfg_triton.interpret_requested())


def rel_mae(stats: torch.Tensor | Sequence[float]) -> float:
    """M = stats[0] / stats[1] as a Python float (= mean|c - u| / mean|u|).

    ``stats``: the float32 [2] tensor of :func:`cfg_combine` (any device; reading it from a GPU
    synchronises once) or a pair of numbers. The division is done in float64 on the float32
    values, so it is deterministic. Never raises on values: 0/0 -> nan, x/0 -> inf (x > 0),
    NaN in -> nan; the switching schedule records non-finite values instead of switching.
    """
    if isinstance(stats, torch.Tensor):
        if stats.shape != (2,):
            raise ShapeError(f"rel_mae: stats must have shape [2], got {tuple(stats.shape)}; pass "
                             f"the stats returned by cfg_combine or discrepancy_stats")
        num, den = (float(v) for v in stats.detach().tolist())  # one device-to-host copy
    else:
        values = list(stats)
        if len(values) != 2:
            raise ShapeError(f"rel_mae: stats must hold 2 values [sum|c-u|, sum|u|], got {len(values)}")
        num, den = float(values[0]), float(values[1])
    if den == 0.0:
        if num == 0.0 or math.isnan(num):
            return math.nan
        return math.copysign(math.inf, num)
    return num / den
