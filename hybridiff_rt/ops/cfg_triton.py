"""Fused Triton implementation of the CFG ops.

One pass over the inputs (two launches in all):
  1. ``cfg_partials_kernel``, grid ``P = cdiv(n, BLOCK)``: program p reads ``uncond`` and ``cond``
     once over elements ``[p*BLOCK, (p+1)*BLOCK)``, writes ``guided = u + w*(c - u)`` (float32
     arithmetic, cast to the input dtype) unless stats-only, and stores its float32 partial sums
     of ``|c - u|`` and ``|u|`` (``tl.sum`` over the block).
  2. ``cfg_finalize_kernel``, one program: lane j of 1024 accumulates partials j, j+1024, ... in
     float64 in index order, then one ``tl.sum`` over the lanes; the result is rounded to float32.

Determinism: the summation order depends only on ``n``, ``BLOCK`` and ``num_warps``, which are a
fixed function of ``n`` (:func:`launch_config`; no autotuning, no float atomics), so the stats are
bit-identical run to run and across ranks with the same inputs, triton version and GPU model.
The combine is launched with ``enable_fp_fusion=False`` so the guided output matches the torch
reference bit for bit in every dtype (no fused multiply-add).

Triton is imported lazily: importing this module never imports triton. Compiled kernels need CUDA
tensors. The Triton interpreter (CPU tensors, about 2 ms per program) needs env
``TRITON_INTERPRET=1`` set before triton is first imported in the process (triton decides then
whether its own library functions such as ``tl.sum`` are interpreted); asking for the
interpreter otherwise raises a HybridError that says so.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any

import torch

from ..errors import HybridError, ShapeError
from ._common import apply_rescale, check_out, check_pair, check_rescale, check_scale

#: Lanes of the single-program final reduction (a power of two).
FINALIZE_RBLOCK = 1024

_lock = threading.Lock()
_kernels: dict[bool, tuple[Any, Any]] = {}


def interpret_requested() -> bool:
    """True when env ``TRITON_INTERPRET`` asks for the Triton interpreter (read at each call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it does not check for a GPU driver)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _get_kernels(interpret: bool) -> tuple[Any, Any]:
    """(partials, finalize) kernels, compiled (JITFunction) or interpreted, built once per mode."""
    with _lock:
        if interpret not in _kernels:
            from . import _triton_kernels as k

            if interpret:
                import triton.language as tl
                from triton.runtime.interpreter import InterpretedFunction as wrap

                if not isinstance(tl.sum, wrap):
                    raise HybridError(
                        "the Triton interpreter was requested, but triton was imported before "
                        "TRITON_INTERPRET=1 was set, so its library functions are compiled-only. "
                        "Set TRITON_INTERPRET=1 in the environment before the process starts "
                        "(e.g. `TRITON_INTERPRET=1 python ...`), or use the torch reference")
            else:
                import triton.language as tl
                from triton.runtime.jit import JITFunction as wrap

                if not isinstance(tl.sum, wrap):
                    raise HybridError(
                        "compiled Triton kernels were requested, but triton was imported with "
                        "TRITON_INTERPRET=1, so its library functions are interpreter-only; "
                        "unset TRITON_INTERPRET before the process starts")
            _kernels[interpret] = (wrap(k.cfg_partials_kernel), wrap(k.cfg_finalize_kernel))
        return _kernels[interpret]


def launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``n`` elements: a fixed function of n (it fixes the sum order).

    Small tensors get small blocks so that more SMs take part; large ones get 4096-element blocks
    (16 elements per thread at 8 warps, 16-byte vector loads for 16-bit dtypes).
    """
    if n <= 1 << 18:
        return 1024, 4
    return 4096, 8


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ShapeError(f"block must be a power of two >= 16, got {block!r}")
    return block


def _launch(u: torch.Tensor, c: torch.Tensor, g: torch.Tensor | None, w: float,
            block: int | None, num_warps: int | None, interpret: bool | None,
            finalize_block: int | None = None) -> torch.Tensor:
    """Run both kernels on contiguous, validated inputs; returns stats (float32 [2])."""
    if interpret is None:
        interpret = interpret_requested()
    if not interpret and u.device.type != "cuda":
        raise ShapeError(
            f"compiled Triton kernels need CUDA tensors, got device {u.device}; use the torch "
            f"reference (hybridiff_rt.ops.cfg_combine dispatches to it for CPU tensors) or set "
            f"TRITON_INTERPRET=1 to run the kernel under the Triton interpreter")
    n = u.numel()
    if n == 0:
        return torch.zeros(2, dtype=torch.float32, device=u.device)
    auto_block, auto_warps = launch_config(n)
    block = auto_block if block is None else _check_block(block)
    num_warps = auto_warps if num_warps is None else int(num_warps)
    programs = -(-n // block)
    # One allocation: [0:2] the returned stats, [2:] the per-program partials.
    workspace = torch.empty(2 + 2 * programs, dtype=torch.float32, device=u.device)
    stats, partials = workspace[:2], workspace[2:]
    partials_kernel, finalize_kernel = _get_kernels(bool(interpret))
    # Launch on the inputs' device and its current stream (no change to the caller's device).
    if u.device.type == "cuda" and u.device.index != torch.cuda.current_device():
        device_ctx = torch.cuda.device(u.device)
    else:
        device_ctx = contextlib.nullcontext()
    with device_ctx:
        partials_kernel[(programs,)](
            u, c, g if g is not None else u, partials, n, programs, w,
            BLOCK=block, WRITE_GUIDED=g is not None, ROUND_BF16=u.dtype == torch.bfloat16,
            num_warps=num_warps, enable_fp_fusion=False)
        finalize_kernel[(1,)](partials, stats, programs,
                              RBLOCK=FINALIZE_RBLOCK if finalize_block is None
                              else _check_block(finalize_block), num_warps=4)
    return stats


def cfg_combine_triton(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    guidance_scale: float,
    out: torch.Tensor | None = None,
    *,
    guidance_rescale: float = 0.0,
    block: int | None = None,
    num_warps: int | None = None,
    interpret: bool | None = None,
    finalize_block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``guided = u + w*(c - u)`` plus stats; same contract as :func:`hybridiff_rt.ops.cfg_combine`.

    Extra keyword arguments (tests, benchmarks): ``block`` (elements per program, power of two;
    changes the stats' summation order), ``num_warps``, ``interpret`` (None: env
    ``TRITON_INTERPRET``), ``finalize_block`` (lanes of the final reduction, default 1024).
    With ``guidance_rescale != 0`` the kernel writes the plain guided prediction and
    :func:`._common.apply_rescale` (torch, deterministic) rescales it afterwards: not fused,
    several extra passes over the tensor.
    """
    op = "cfg_combine"
    w = check_scale(guidance_scale, "guidance_scale", op)
    u, c = check_pair(uncond, cond, op)
    r = check_rescale(guidance_rescale, u.dim(), op)
    if out is not None:
        check_out(out, u, op)
    # With rescale the kernel must not overwrite cond (out may alias it) before std(cond) is read.
    target = out if out is not None and r == 0.0 else torch.empty_like(u)
    stats = _launch(u, c, target, w, block, num_warps, interpret, finalize_block)
    if r != 0.0:
        rescaled = apply_rescale(target, c, r)
        if out is None:
            return rescaled, stats
        out.copy_(rescaled)
        return out, stats
    return target, stats


def discrepancy_stats_triton(
    uncond: torch.Tensor,
    cond: torch.Tensor,
    *,
    block: int | None = None,
    num_warps: int | None = None,
    interpret: bool | None = None,
    finalize_block: int | None = None,
) -> torch.Tensor:
    """Stats only (no guided output written): float32 [2] = [sum|c-u|, sum|u|]."""
    u, c = check_pair(uncond, cond, "discrepancy_stats")
    return _launch(u, c, None, 0.0, block, num_warps, interpret, finalize_block)
