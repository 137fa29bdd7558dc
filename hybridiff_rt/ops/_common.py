"""Input validation and fixed-order reductions shared by the reference and the Triton paths.

Nothing here launches a Triton kernel; everything is plain torch and works on any device.

Fixed-order summation (used by the reference stats and by ``guidance_rescale``):
    a row of ``n`` values is zero-padded to ``nb * b`` values, where ``b = min(REDUCE_BLOCK,
    next_pow2(n))`` and ``nb = ceil(n / b)``. Each block of ``b`` values is summed in the input
    dtype by repeated halving: ``x[j] + x[j + h]`` for ``h = b/2, b/4, ..., 1``. The ``nb`` block
    sums are converted to float64, zero-padded to a power of two and summed by the same halving.
    Every step is an elementwise tensor add, so the result depends only on ``n`` and the values:
    not on the number of CPU threads, not on the device, not on timing.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import ShapeError

#: dtypes the CFG ops accept.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Block size (elements, a power of two) of the reference's first-level partial sums.
REDUCE_BLOCK = 4096


def next_pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def check_pair(uncond: torch.Tensor, cond: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the two branch predictions and return contiguous versions of them.

    Shapes, dtypes and devices must match exactly (no broadcasting, no promotion); the dtype must be
    float32, float16 or bfloat16. A non-contiguous input is copied once with ``.contiguous()``
    (documented cost: one extra read and write of that tensor); contiguous inputs are not copied.
    """
    for name, t in (("uncond", uncond), ("cond", cond)):
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ShapeError(
                f"{op}: {name} has dtype {t.dtype}; supported are float32, float16 and bfloat16 "
                f"(convert with .to(torch.float32) or the model's dtype)")
    if uncond.device != cond.device:
        raise ShapeError(
            f"{op}: uncond is on {uncond.device} but cond is on {cond.device}; move both to one "
            f"device (e.g. cond.to(uncond.device)) before combining")
    if uncond.dtype != cond.dtype:
        raise ShapeError(
            f"{op}: uncond has dtype {uncond.dtype} but cond has {cond.dtype}; cast one so both "
            f"match (no implicit promotion is done)")
    if uncond.shape != cond.shape:
        raise ShapeError(
            f"{op}: uncond has shape {tuple(uncond.shape)} but cond has {tuple(cond.shape)}; "
            f"the two branch predictions must have identical shapes (no broadcasting)")
    return uncond.contiguous(), cond.contiguous()


def check_out(out: torch.Tensor, like: torch.Tensor, op: str) -> None:
    """Validate a caller-provided output buffer for the guided prediction."""
    if not isinstance(out, torch.Tensor):
        raise ShapeError(f"{op}: out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ShapeError(
            f"{op}: out has shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}; it "
            f"must match the inputs: shape {tuple(like.shape)}, dtype {like.dtype}, device "
            f"{like.device} (allocate it with torch.empty_like(uncond))")
    if not out.is_contiguous():
        raise ShapeError(f"{op}: out must be contiguous; allocate it with torch.empty_like(uncond)")


def check_scale(value: object, name: str, op: str) -> float:
    """A finite real Python number (bool and tensors refused), returned as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, torch.Tensor):
        raise ShapeError(f"{op}: {name} must be a Python float, got {type(value).__name__} "
                         f"(pass float(x) for a 0-d tensor)")
    value = float(value)
    if not math.isfinite(value):
        raise ShapeError(f"{op}: {name} must be finite, got {value!r}")
    return value


def check_rescale(value: object, ndim: int, op: str) -> float:
    """guidance_rescale: a finite float; non-zero needs a batch dimension (ndim >= 2)."""
    value = check_scale(value, "guidance_rescale", op)
    if value != 0.0 and ndim < 2:
        raise ShapeError(
            f"{op}: guidance_rescale needs inputs with a batch dimension (ndim >= 2, std is taken "
            f"per sample over dims 1..), got ndim={ndim}; pass guidance_rescale=0.0 or add a "
            f"batch dimension with .unsqueeze(0)")
    return value


def _tree_sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum each row of ``x`` ([R, n], n a power of two) by repeated halving; returns [R]."""
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def fixed_order_row_sums(rows: torch.Tensor, block: int = REDUCE_BLOCK) -> torch.Tensor:
    """Deterministic sums of each row of ``rows`` ([R, n]); returns float64 [R].

    The order is the one described in the module docstring: halving trees inside blocks of
    ``min(block, next_pow2(n))`` values in ``rows.dtype``, then a float64 halving tree over the
    block sums. ``block`` must be a power of two.
    """
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    r, n = rows.shape
    if n == 0:
        return torch.zeros(r, dtype=torch.float64, device=rows.device)
    b = min(block, next_pow2(n))
    nb = -(-n // b)
    if nb * b != n:
        rows = torch.nn.functional.pad(rows, (0, nb * b - n))
    partial = _tree_sum_rows(rows.reshape(r * nb, b)).reshape(r, nb).to(torch.float64)
    width = next_pow2(nb)
    if width != nb:
        partial = torch.nn.functional.pad(partial, (0, width - nb))
    return _tree_sum_rows(partial)


def apply_rescale(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg(guided, cond, guidance_rescale)`` with deterministic std.

    Per sample b (dim 0): ``std_x[b]`` is the Bessel-corrected standard deviation over dims 1..
    (as ``torch.std``), computed in float64 with :func:`fixed_order_row_sums` (two passes: mean,
    then squared deviations), rounded to float32. Then, in float32,
    ``r * (g * (std_c / std_g)) + (1 - r) * g`` and a cast back to ``guided.dtype``.
    Returns a new tensor shaped like ``guided``.
    """
    batch = guided.shape[0]
    g32 = guided.reshape(batch, -1).to(torch.float32)
    c32 = cond.reshape(batch, -1).to(torch.float32)
    n = g32.shape[1]

    def std(x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        mean = fixed_order_row_sums(x64) / n
        dev = x64 - mean[:, None]
        var = fixed_order_row_sums(dev * dev) / (n - 1) if n > 1 else torch.full_like(mean, math.nan)
        return var.sqrt().to(torch.float32)

    ratio = (std(c32) / std(g32))[:, None]
    out = guidance_rescale * (g32 * ratio) + (1.0 - guidance_rescale) * g32
    return out.to(guided.dtype).reshape(guided.shape)
