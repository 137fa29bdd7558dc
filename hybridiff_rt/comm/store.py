"""The job's key-value store (torch.distributed's TCPStore): one place to reach it and wait on it.

Ranks exchange small set-up records through the store (the first-call agreement digests, the
stage profile, the IPC handles). Every wait there goes through :func:`wait_for_keys`, so a peer
that never publishes becomes a :class:`~hybridiff_rt.errors.PeerTimeoutError` naming what was
awaited and which keys are missing, never a raw store error and never a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import Any

from ..errors import PeerTimeoutError


def default_store() -> Any:
    """The store of the default process group (created by ``init_distributed``).

    Raises:
        RuntimeError: no process group is initialised (not started under torchrun).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("no torch.distributed process group is initialised; call "
                           "hybridiff_rt.init_distributed() under torchrun first")
    return dist.distributed_c10d._get_default_store()


def wait_for_keys(store: Any, keys: list[str], timeout_s: float, what: str,
                  advice: str = "") -> None:
    """Block until every key in ``keys`` is set, at most ``timeout_s`` seconds.

    Args:
        store: a torch.distributed Store.
        keys: store keys the other ranks publish.
        timeout_s: seconds to wait.
        what: what is being awaited, quoted in the error (e.g. "the stage profile from rank 0").
        advice: a sentence appended to the error saying what to check or change.

    Raises:
        PeerTimeoutError: some key was not set in time (or the store itself is gone because the
            rank hosting it died); the message names ``what`` and the missing keys.
    """
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
        return
    except Exception as exc:  # the store raises DistStoreError / RuntimeError on timeout
        cause = exc
    missing = []
    for key in keys:
        with contextlib.suppress(Exception):
            if not store.check([key]):
                missing.append(key)
    first_line = str(cause).splitlines()[0] if str(cause) else ""
    raise PeerTimeoutError(
        f"{what}: not every rank answered within {timeout_s:g} s (missing store keys "
        f"{missing or keys}; {type(cause).__name__}: {first_line}). A peer died, hangs, or "
        f"started a different number of runs.{(' ' + advice) if advice else ''}") from cause


def gather_bytes(store: Any, key: str, rank: int, world_size: int, value: bytes,
                 timeout_s: float, what: str) -> list[bytes]:
    """Publish ``value`` under ``key/rank`` and return every rank's value in rank order.

    Raises:
        PeerTimeoutError: some rank did not publish within ``timeout_s`` seconds.
    """
    store.set(f"{key}/{rank}", value)
    keys = [f"{key}/{r}" for r in range(world_size)]
    wait_for_keys(store, keys, timeout_s, what)
    return [bytes(store.get(k)) for k in keys]


def barrier(store: Any, key: str, world_size: int, timeout_s: float) -> None:
    """Count this rank in at ``key`` and wait until ``world_size`` ranks have.

    Raises:
        PeerTimeoutError: not every rank arrived within ``timeout_s`` seconds.
    """
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world_size:
        if time.monotonic() > deadline:
            raise PeerTimeoutError(f"barrier {key}: not every rank arrived within "
                                   f"{timeout_s:g} s")
        time.sleep(0.002)
