"""Process-group set-up from torchrun's environment, done once per process.

``init_distributed`` is idempotent: the first call creates the default process group, later calls
return the same answer. Groups are never created per call or per step.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .. import env
from ..errors import ConfigError, PeerTimeoutError

#: Seconds a collective may wait for a peer before failing; override with HYBRIDIFF_RT_TIMEOUT_S.
DEFAULT_TIMEOUT_S = float(env.VARIABLES["HYBRIDIFF_RT_TIMEOUT_S"].default)


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on this node, backend, device."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    Args:
        backend: "nccl", "gloo" or None for automatic: NCCL when every local rank gets a GPU of
            its own, else gloo (NCCL refuses two ranks on one GPU; gloo works with CPU and CUDA
            tensors).
        timeout_s: how long a collective waits for a peer before raising (seconds); default
            HYBRIDIFF_RT_TIMEOUT_S or 30.

    Returns:
        DistInfo. Without torchrun's variables (a plain ``python`` run) the process is a world of
        one: no group is created and parallelize() runs serially.
    """
    if dist.is_available() and dist.is_initialized():
        return current_dist_info()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(0, 1, 0, None, _local_device(0))
    timeout = _timeout_seconds(timeout_s)
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if backend is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        backend = "nccl" if gpus >= local_world else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ConfigError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    device = _local_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout),
                                **kwargs)
    except (RuntimeError, TimeoutError) as exc:  # DistStoreError, gloo/NCCL connect failures
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise PeerTimeoutError(
            f"rank {os.environ.get('RANK', '?')}/{os.environ['WORLD_SIZE']}: joining the process "
            f"group at {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} "
            f"failed within {timeout:g} s ({type(exc).__name__}: {text}). Every rank must start "
            "(torchrun starts them all) and reach init_distributed in time; a slow model load "
            "needs a longer timeout_s here (HybridConfig.handshake_timeout_s).") from exc
    return current_dist_info()


def current_dist_info() -> DistInfo:
    """DistInfo of the already-initialised default group (world of one when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(0, 1, 0, None, _local_device(0))
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    return DistInfo(rank, dist.get_world_size(), local_rank, dist.get_backend(),
                    _local_device(local_rank))


def _local_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _timeout_seconds(timeout_s: float | None) -> float:
    if timeout_s is None:
        timeout_s = float(env.read("HYBRIDIFF_RT_TIMEOUT_S"))
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be positive seconds, got {timeout_s!r}")
    return float(timeout_s)
