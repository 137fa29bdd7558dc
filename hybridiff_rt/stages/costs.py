"""Per-unit cost measurement of a staged denoiser, cached per (model config, input shapes, device).

``profile_units(staged, kw)`` runs ``staged`` on the keyword inputs ``kw`` and returns a
:class:`UnitProfile`: the median wall time of each unit (ms), the bytes and layout of the state
leaving each unit (what a cut placed after it ships), plus prepare/finish times. Results are cached
in-process under :func:`profile_cache_key`, so a second call with the same model config, input
shapes/dtypes and device returns the cached profile without measuring. A profile is
JSON-serialisable (``to_dict`` / ``from_dict``) so one rank can measure and share it; costs known
in advance can be given with :meth:`UnitProfile.from_costs`.

Timing: on CPU ``time.perf_counter`` around each unit; on CUDA a pair of events per unit on the
current stream, read after a synchronize at the end of each repeat. One warm-up pass precedes the
``repeats`` timed passes; everything runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from typing import Any, Mapping, Sequence

import torch

from ..errors import ConfigError
from .base import StagedDenoiser, TensorSpec, state_layout, state_nbytes
from .partition import PartitionPlan, plan_partition

_CACHE: dict[str, "UnitProfile"] = {}


@dataclasses.dataclass(frozen=True)
class UnitProfile:
    """Measured (or given) costs of each unit of a staged denoiser.

    Attributes:
        unit_names: ``staged.unit_names``.
        unit_ms: median wall time of each unit, ms.
        boundary_bytes: bytes of the state leaving each unit (a cut after unit u ships
            ``boundary_bytes[u]``); the last entry is the prediction.
        boundary_layouts: per unit, the leaving state's tensors (name, shape, dtype) in
            flatten order; empty tuples when the caller gave costs without layouts.
        prepare_ms / finish_ms: median wall time of ``prepare`` / ``finish``, ms.
        device: where it was measured (e.g. "cpu/threads=1", "cuda:0/NVIDIA H100 80GB HBM3").
        key: the cache key (see :func:`profile_cache_key`); "" for given costs.
        repeats: number of timed passes (0 for given costs).
    """

    unit_names: tuple[str, ...]
    unit_ms: tuple[float, ...]
    boundary_bytes: tuple[int, ...]
    boundary_layouts: tuple[tuple[TensorSpec, ...], ...]
    prepare_ms: float = 0.0
    finish_ms: float = 0.0
    device: str = ""
    key: str = ""
    repeats: int = 0

    def __post_init__(self) -> None:
        n = len(self.unit_names)
        if len(self.unit_ms) != n or len(self.boundary_bytes) != n:
            raise ConfigError(
                f"UnitProfile needs one cost and one boundary size per unit: {n} names, "
                f"{len(self.unit_ms)} costs, {len(self.boundary_bytes)} boundary sizes"
            )
        if self.boundary_layouts and len(self.boundary_layouts) != n:
            raise ConfigError(f"UnitProfile has {len(self.boundary_layouts)} boundary layouts for {n} units")

    @classmethod
    def from_costs(
        cls, unit_names: Sequence[str], unit_ms: Sequence[float], boundary_bytes: Sequence[int], device: str = "given"
    ) -> "UnitProfile":
        """A profile from caller-given costs (ms) and boundary sizes (bytes), no measurement."""
        costs = tuple(float(x) for x in unit_ms)
        return cls(tuple(unit_names), costs, tuple(int(b) for b in boundary_bytes), (), device=device)

    def plan(self, num_stages: int, bytes_per_ms: float | Sequence[float],
             **kwargs: Any) -> PartitionPlan:
        """:func:`~hybridiff_rt.stages.partition.plan_partition` on these costs."""
        return plan_partition(self.unit_ms, self.boundary_bytes, num_stages, bytes_per_ms, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (lists, numbers, strings)."""
        return {
            "unit_names": list(self.unit_names),
            "unit_ms": list(self.unit_ms),
            "boundary_bytes": list(self.boundary_bytes),
            "boundary_layouts": [[s.to_dict() for s in layout] for layout in self.boundary_layouts],
            "prepare_ms": self.prepare_ms,
            "finish_ms": self.finish_ms,
            "device": self.device,
            "key": self.key,
            "repeats": self.repeats,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UnitProfile":
        return cls(
            unit_names=tuple(str(x) for x in d["unit_names"]),
            unit_ms=tuple(float(x) for x in d["unit_ms"]),
            boundary_bytes=tuple(int(x) for x in d["boundary_bytes"]),
            boundary_layouts=tuple(
                tuple(TensorSpec.from_dict(s) for s in layout) for layout in d.get("boundary_layouts", ())
            ),
            prepare_ms=float(d.get("prepare_ms", 0.0)),
            finish_ms=float(d.get("finish_ms", 0.0)),
            device=str(d.get("device", "")),
            key=str(d.get("key", "")),
            repeats=int(d.get("repeats", 0)),
        )


def _input_signature(value: Any) -> Any:
    """Shapes/dtypes of tensors (recursively through dicts, lists, tuples); type names otherwise."""
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), value.device.type]
    if isinstance(value, Mapping):
        return {str(k): _input_signature(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_input_signature(v) for v in value]
    if value is None:
        return None
    return type(value).__name__


def _device_label(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}/{torch.cuda.get_device_name(index)}"
    if device.type == "cpu":
        return f"cpu/threads={torch.get_num_threads()}"
    return str(device)


def profile_cache_key(staged: StagedDenoiser, kw: Mapping[str, Any]) -> str:
    """Hex key of (model class, config, parameter dtype, input shapes/dtypes, device).

    Input values do not enter the key, only tensor shapes/dtypes/device types (recursively through
    dicts and sequences) and the types of other arguments; the device includes the CPU thread
    count or the CUDA device name.
    """
    model = staged.model
    param = next(model.parameters(), None)
    # Config without bookkeeping entries ("_name_or_path", "_diffusers_version", ...).
    config = {k: v for k, v in dict(getattr(model, "config", {})).items() if not str(k).startswith("_")}
    payload = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "staging": type(staged).__qualname__,
        "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
        "param_dtype": str(param.dtype) if param is not None else None,
        # arguments passed as None are the same as arguments left out
        "inputs": _input_signature({k: v for k, v in kw.items() if v is not None}),
        "device": _device_label(model),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def clear_profile_cache() -> None:
    """Forget every cached profile (the next profile_units call measures again)."""
    _CACHE.clear()


class _Clock:
    """Per-pass timer: host clock on CPU, CUDA events on GPU (resolved after a synchronize)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def profile_units(
    staged: StagedDenoiser, kw: Mapping[str, Any], repeats: int = 3, *, use_cache: bool = True
) -> UnitProfile:
    """Measure each unit of ``staged`` on inputs ``kw`` (the model's forward keyword arguments).

    Args:
        staged: the staged denoiser (on the device to measure).
        kw: one call's keyword inputs, e.g. a batch-1 branch of a CFG step.
        repeats: timed passes (>= 1); unit times are their medians.
        use_cache: return a cached profile for the same key instead of measuring.

    Returns:
        UnitProfile (cached under :func:`profile_cache_key` when ``use_cache``).
    """
    if repeats < 1:
        raise ConfigError(f"repeats = {repeats}; profile_units needs at least one timed pass")
    key = profile_cache_key(staged, kw)
    if use_cache and key in _CACHE:
        return _CACHE[key]
    param = next(staged.model.parameters(), None)
    cuda = param is not None and param.device.type == "cuda"
    n = len(staged.units)
    samples: list[list[float]] = [[] for _ in range(n + 2)]  # prepare, units..., finish
    layouts: list[tuple[TensorSpec, ...]] = []
    sizes: list[int] = []
    with torch.inference_mode():
        ctx = staged.prepare(**kw)
        state = ctx.initial_state
        for unit in staged.units:  # warm-up pass, also records the boundary layouts
            state = unit(state, ctx)
            layouts.append(state_layout(state))
            sizes.append(state_nbytes(state))
        staged.finish(state, ctx)
        for _ in range(repeats):
            clock = _Clock(cuda)
            clock.mark()
            ctx = staged.prepare(**kw)
            clock.mark()
            state = ctx.initial_state
            for unit in staged.units:
                state = unit(state, ctx)
                clock.mark()
            staged.finish(state, ctx)
            clock.mark()
            for i, ms in enumerate(clock.intervals_ms()):
                samples[i].append(ms)
    medians = [statistics.median(s) for s in samples]
    profile = UnitProfile(
        unit_names=tuple(staged.unit_names),
        unit_ms=tuple(medians[1 : n + 1]),
        boundary_bytes=tuple(sizes),
        boundary_layouts=tuple(layouts),
        prepare_ms=medians[0],
        finish_ms=medians[-1],
        device=_device_label(staged.model),
        key=key,
        repeats=repeats,
    )
    if use_cache:
        _CACHE[key] = profile
    return profile
