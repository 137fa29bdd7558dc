"""What the stage partitioner needs to know before a pipelined phase, shared by the two-rank
runtime and the 2N-rank scale-out: the unit profile (measured once, on one rank, and handed to the
others through the store, so every rank cuts identically), and the bytes per millisecond of a
link between two ranks (timed round trips of a boundary-sized message), cached per process so
repeated runs cut alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from ..comm import Transport, wait_for_keys
from ..stages import StagedDenoiser, UnitProfile, profile_units

#: Round trips per link measurement; the figure comes from their median.
LINK_PROBE_ROUNDS = 3
#: The probe message is the largest boundary, capped at this many bytes.
LINK_PROBE_MAX_BYTES = 64 << 20
#: cache key (chosen by the caller: transport name, ranks, probe bytes) -> measured figure(s)
_LINK_CACHE: dict[Hashable, Any] = {}


def clear_link_cache() -> None:
    """Forget measured link figures (the next pipelined run measures again)."""
    _LINK_CACHE.clear()


def cached_link_figure(key: Hashable, measure: Callable[[], Any]) -> Any:
    """``measure()`` the first time ``key`` is asked for in this process, the cached result
    after. Every rank runs the same calls, so every rank's cache holds the same keys and the
    ranks skip or take part in a measurement together."""
    if key not in _LINK_CACHE:
        _LINK_CACHE[key] = measure()
    return _LINK_CACHE[key]


def probe_bytes(boundary_bytes: Sequence[int]) -> int:
    """Size of the probe message: the largest boundary state (bytes), at most
    LINK_PROBE_MAX_BYTES; 0 when there is no boundary."""
    return min(max(boundary_bytes, default=0), LINK_PROBE_MAX_BYTES)


def round_trip_bytes_per_ms(transport: Transport, peer: int, nbytes: int, device: torch.device,
                            *, first: bool) -> float:
    """Payload bytes per millisecond between this rank and ``peer`` (``nbytes`` > 0), from the
    median of LINK_PROBE_ROUNDS round trips: the ``first`` side sends then receives, the peer
    receives then sends. Both sides must call it; the ``first`` side's figure is the one to
    publish. Counts in ``transport.bytes_sent`` like any transfer (callers that do not report
    probe traffic restore it)."""
    buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    round_trips_ms = []
    for _ in range(LINK_PROBE_ROUNDS):
        started = time.perf_counter()
        if first:
            transport.isend([buffer], peer, what="link measurement").wait()
            transport.irecv([buffer], peer, what="link measurement").wait()
        else:
            transport.irecv([buffer], peer, what="link measurement").wait()
            transport.isend([buffer], peer, what="link measurement").wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        round_trips_ms.append((time.perf_counter() - started) * 1e3)
    median_ms = sorted(round_trips_ms)[len(round_trips_ms) // 2]
    return 2 * nbytes / max(median_ms, 1e-6)


def shared_profile(staged: StagedDenoiser, kw: dict[str, Any], *, store: Any, key: str,
                   publish: bool, timeout_s: float, what: str) -> UnitProfile:
    """The unit profile of ``staged`` on inputs ``kw``: measured (``profile_units``, cached per
    model/shape/device) and published under ``key`` by the one rank with ``publish``, read from
    the store by the others, who wait at most ``timeout_s`` (``what``: what they wait for, for
    the timeout message)."""
    if publish:
        profile = profile_units(staged, kw)
        store.set(key, json.dumps(profile.to_dict()))
        return profile
    wait_for_keys(store, [key], timeout_s, what,
                  "The limit is HybridConfig(handshake_timeout_s=...).")
    return UnitProfile.from_dict(json.loads(store.get(key)))
