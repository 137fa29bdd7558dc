"""Pure helpers that cut a branch batch into image shares and put gathered shares back together.

A branch batch is the keyword inputs of one CFG branch with B images (leading dimension B on every
batch-shaped argument, as :func:`~hybridiff_rt.engine.batch.split_cfg_batch` leaves them). A share
is a contiguous row range ``[start, stop)`` of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .batch import on_batch_axis, rows_per_item


def take_rows(value: Any, batch: int, start: int, stop: int, frames: int = 1) -> Any:
    """Rows ``start:stop`` of every batch-shaped tensor in ``value`` (leading size ``batch``);
    with ``frames`` > 1, rows ``start * frames:stop * frames`` of tensors of ``batch x frames``
    rows (conditioning repeated per frame, each image's frames contiguous); other values
    (scalars, None, tensors of another leading size) are returned unchanged."""
    if isinstance(value, torch.Tensor):
        per_item = rows_per_item(value, batch, frames)
        return value[start * per_item:stop * per_item] if per_item else value
    if isinstance(value, dict):
        return {k: take_rows(v, batch, start, stop, frames) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(v, batch, start, stop, frames) for v in value)
    return value


def take_branch_rows(kw: dict[str, Any], batch: int, start: int, stop: int, frames: int = 1,
                     axes: dict[str, int] | None = None) -> dict[str, Any]:
    """:func:`take_rows` of each argument of a branch call ``kw``, the tensors named in ``axes``
    (``branch_layout.batch_axes``: argument -> batch axis) taken along that axis instead."""
    axes = axes or {}
    return {k: on_batch_axis(lambda v: take_rows(v, batch, start, stop, frames), v,
                             axes.get(k, 0))
            for k, v in kw.items()}


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` ([r, ...], r <= ``rows``) followed by zero rows up to ``rows`` rows (contiguous;
    the first r rows keep their values bit for bit)."""
    missing = rows - tensor.shape[0]
    if missing < 0:
        raise ValueError(f"cannot pad {tensor.shape[0]} rows down to {rows}")
    if missing == 0:
        return tensor.contiguous()
    zeros = torch.zeros((missing, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, zeros], dim=0)


def assemble(parts: Sequence[torch.Tensor], shares: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The batch in image order from padded per-share tensors: ``parts[i][:stop_i - start_i]``
    for each share i, concatenated (shares must be contiguous and in order)."""
    pieces = [part[: stop - start] for part, (start, stop) in zip(parts, shares) if stop > start]
    return torch.cat(pieces, dim=0)
