"""RunReport: what one sampling run did on this rank, step by step.

Lists are indexed by denoiser call (step) i = 0 .. steps run - 1. ``to_dict()`` is
JSON-serialisable (non-finite floats become None).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

#: Step modes: "cbp" (one CFG branch per rank, exchanged), "pipeline" (stale-activation stage
#: pipeline), "serial" (this rank ran every branch itself: world size 1, or no CFG in the call).
MODES = ("cbp", "pipeline", "serial")


@dataclasses.dataclass
class RunReport:
    """Per-rank record of one run.

    Attributes:
        rank, world_size: this rank and the number of ranks.
        num_steps: the denoiser calls the run was planned for (None until the first step).
        transport: backend that moved tensors ("torch-gloo", "torch-nccl", "ipc" or None).
        tau1, tau2: switch points of the switching rule (docs/method.md); None until known,
            and in runs that cannot switch (world size 1 or k = 0).
        modes: per step, one of MODES.
        rel_mae: per step, M_i = mean|eps_c - eps_u| / mean|eps_u| (nan where not measured).
        step_ms: per step, wall time of the denoiser call on this rank in milliseconds.
        bytes_sent: per step, payload bytes this rank sent.
        compute_ms, transfer_ms, wait_ms: per step, milliseconds of this rank's model compute,
            of exchanges on the step's critical path (waits for a slower peer included) and of
            completing transfers posted in an earlier step (overlap that compute did not hide);
            nan until known (engine/timing.py defines the sections).
        timing_clock: what measured those: "cuda-events" (stream time) or "perf_counter".
        nonfinite_steps: steps whose M_i was NaN or infinite (never a switch trigger).
        notes: human-readable remarks (e.g. why no partitioning happened).
        config: the HybridConfig used, as a dict.
        extra: room for engine-specific fields (stage cuts, ideal speed-up, ...).
        layout: on more than one rank, who computes what (engine/world.py ``describe``):
            "layout" ("pairs" | "layers"), pairs, branch groups, image shares, stage chains,
            idle ranks, and "links" (this rank -> peer: the transport that link uses).
        link_bytes: payload bytes this rank sent on each link, "src->dst" -> bytes (runs on
            more than two ranks; on two ranks every byte of ``bytes_sent`` goes to the peer).
        modelled_speedup: runs on more than two ranks: the modelled speed-up over one device from
            measured unit costs (engine/scale_model.py); None where nothing was measured.
    """

    rank: int = 0
    world_size: int = 1
    num_steps: int | None = None
    transport: str | None = None
    tau1: int | None = None
    tau2: int | None = None
    modes: list[str] = dataclasses.field(default_factory=list)
    rel_mae: list[float] = dataclasses.field(default_factory=list)
    step_ms: list[float] = dataclasses.field(default_factory=list)
    bytes_sent: list[int] = dataclasses.field(default_factory=list)
    compute_ms: list[float] = dataclasses.field(default_factory=list)
    transfer_ms: list[float] = dataclasses.field(default_factory=list)
    wait_ms: list[float] = dataclasses.field(default_factory=list)
    timing_clock: str | None = None
    nonfinite_steps: list[int] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    layout: dict[str, Any] = dataclasses.field(default_factory=dict)
    link_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    modelled_speedup: dict[str, Any] | None = None

    def record_step(self, mode: str, rel_mae: float, step_ms: float, bytes_sent: int) -> None:
        """Append one step's entry (mode, M_i or nan, wall ms, bytes this rank sent)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.modes.append(mode)
        self.rel_mae.append(float(rel_mae))
        self.step_ms.append(float(step_ms))
        self.bytes_sent.append(int(bytes_sent))
        for values in (self.compute_ms, self.transfer_ms, self.wait_ms):
            values.append(math.nan)

    def set_timing(self, step: int, compute_ms: float, transfer_ms: float,
                   wait_ms: float) -> None:
        """Fill in step ``step``'s compute / transfer / wait milliseconds (recorded step)."""
        if not 0 <= step < len(self.modes):
            raise IndexError(f"step {step} has not been recorded ({len(self.modes)} steps)")
        self.compute_ms[step] = float(compute_ms)
        self.transfer_ms[step] = float(transfer_ms)
        self.wait_ms[step] = float(wait_ms)

    def note(self, text: str) -> None:
        """Add a remark once (repeated remarks are not duplicated)."""
        if text not in self.notes:
            self.notes.append(text)

    @property
    def total_ms(self) -> float:
        return float(sum(self.step_ms))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rel_mae"] = [v if math.isfinite(v) else None for v in self.rel_mae]
        out["total_ms"] = self.total_ms
        return _json_safe(out)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
