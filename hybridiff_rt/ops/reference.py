"""Torch reference implementations of the CFG ops (any device; used for CPU tensors).

Arithmetic, shared with the Triton kernel so that both agree bit for bit on the guided output:
    u32 = float32(uncond), c32 = float32(cond), d = c32 - u32          (float32, rounded)
    guided = cast_to_input_dtype(u32 + float32(w) * d)                  (mul and add each rounded,
                                                                          no fused multiply-add)
Stats (float32 tensor of shape [2]): ``[sum |d|, sum |u32|]`` over every element, summed in the
fixed order of :func:`hybridiff_rt.ops._common.fixed_order_row_sums` (float32 halving trees in
blocks of up to 4096 elements, then a float64 halving tree over the block sums, then rounded to
float32). Only elementwise tensor ops are used, so the result is identical for any
``torch.get_num_threads()`` and run to run. The Triton kernel sums in a different (also fixed)
order, so kernel and reference stats agree to a relative 1e-5, not bit for bit.
"""

from __future__ import annotations

import torch

from ._common import (
    apply_rescale,
    check_out,
    check_pair,
    check_rescale,
    check_scale,
    fixed_order_row_sums,
)


def _stats(u32: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    rows = torch.stack((d.abs(), u32.abs()))
    return fixed_order_row_sums(rows).to(torch.float32)


@torch.no_grad()
def cfg_combine_reference(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float,
    out: torch.Tensor | None = None,
    *,
    guidance_rescale: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`hybridiff_rt.ops.cfg_combine` (same contract, any device).

    Args:
        uncond, cond: the two branch predictions, same shape/dtype/device; float32, float16 or
            bfloat16. Non-contiguous inputs are copied once.
        guidance_scale: w (Python float).
        out: optional contiguous buffer for the guided prediction (shape/dtype/device of the
            inputs); it may be ``uncond`` or ``cond`` itself.
        guidance_rescale: diffusers' ``guidance_rescale`` (0 = off); see :func:`_common.apply_rescale`.
    Returns:
        ``(guided, stats)``: guided in the input dtype and shape; stats float32 [2] on the inputs'
        device: ``[sum |cond - uncond|, sum |uncond|]`` (the stats never include the rescale).
    """
    op = "cfg_combine"
    w = check_scale(guidance_scale, "guidance_scale", op)
    u, c = check_pair(uncond, cond, op)
    r = check_rescale(guidance_rescale, u.dim(), op)
    if out is not None:
        check_out(out, u, op)
    u32 = u.reshape(-1).to(torch.float32)
    d = c.reshape(-1).to(torch.float32) - u32
    guided = (u32 + d * w).to(u.dtype).reshape(u.shape)
    stats = _stats(u32, d)
    if r != 0.0:
        guided = apply_rescale(guided, c, r)
    if out is not None:
        out.copy_(guided)
        guided = out
    return guided, stats


@torch.no_grad()
def discrepancy_stats_reference(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`hybridiff_rt.ops.discrepancy_stats`: float32 [2] = [sum|c-u|, sum|u|]."""
    u, c = check_pair(uncond, cond, "discrepancy_stats")
    u32 = u.reshape(-1).to(torch.float32)
    d = c.reshape(-1).to(torch.float32) - u32
    return _stats(u32, d)


def eager_rel_mae(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> tuple[torch.Tensor, float]:
    """The reference code's eager sequence (Hybridiff), kept as the benchmark baseline.

    ``guided = u + w * (c - u)``; ``m = ((c - u).abs().mean() / (u.abs().mean() + 1e-12)).item()``,
    in the input dtype, with torch's own (thread-count-dependent) reductions. Not deterministic
    across thread counts and not used by the runtime.
    """
    guided = uncond + guidance_scale * (cond - uncond)
    m = ((cond - uncond).abs().mean() / (uncond.abs().mean() + 1e-12)).item()
    return guided, m
