"""Transport over torch.distributed: NCCL on GPUs, gloo on CPUs (and CUDA tensors when NCCL
cannot be used, e.g. two ranks on one GPU). Works across nodes.

The transport owns one process group, created once at construction with the transport's timeout.
On gloo every wait is bounded by ``timeout_s`` on the host; on NCCL waits are stream-ordered and
the group's own timeout (the NCCL watchdog) bounds a hang.
"""

from __future__ import annotations

import datetime
import time
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

from ..errors import PeerTimeoutError
from .base import PendingTransfer, Transport


class _TorchWork:
    """One or more torch.distributed work handles completed together; ``copy_back`` pairs
    (device buffer, host staging buffer) are filled after the receives complete."""

    def __init__(self, transport: "TorchTransport", works: list, what: str,
                 copy_back: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        self._transport = transport
        self._works = works
        self._what = what
        self._copy_back = list(copy_back)

    def wait(self) -> None:
        for work in self._works:
            self._transport._wait(work, self._what)
        for device_buffer, host_buffer in self._copy_back:
            device_buffer.copy_(host_buffer)
        self._works, self._copy_back = [], []


class TorchTransport(Transport):
    """torch.distributed point-to-point and collectives on a dedicated process group."""

    def __init__(self, timeout_s: float, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("TorchTransport needs an initialised default process group; "
                               "call hybridiff_rt.init_distributed() under torchrun first")
        backend = dist.get_backend()
        self._owns_group = group is None
        if group is None:
            # collective: every rank creates it at the same point (the runtime does so right
            # after all ranks agreed on the run, so every peer is there)
            try:
                group = dist.new_group(backend=backend,
                                       timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as exc:
                raise PeerTimeoutError(
                    f"rank {dist.get_rank()}/{dist.get_world_size()}: creating the process group "
                    f"of the {backend} transport failed ({type(exc).__name__}: "
                    f"{_first_line(exc)}). A peer died or did not take part.") from exc
        super().__init__(dist.get_rank(), dist.get_world_size(), timeout_s)
        self.group = group
        self.backend = backend
        self.name = f"torch-{backend}"
        # measured on our CPU boxes: a 4 MB gloo broadcast takes about 1.7 ms;
        # NCCL over PCIe without NVLink moves roughly 10 GB/s.
        self.bytes_per_ms = 2.4e6 if backend == "gloo" else 1e7
        self._host_timeout = datetime.timedelta(seconds=timeout_s) if backend == "gloo" else None
        _LIVE.add(self)

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        work = self._call(what, dist.all_gather, out, tensor, group=self.group, async_op=True)
        self._wait(work, what)
        self.bytes_sent += self.payload_bytes([tensor]) * (self.world_size - 1)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, *, what: str) -> torch.Tensor:
        work = self._call(what, dist.broadcast, tensor, src=src, group=self.group, async_op=True)
        self._wait(work, what)
        if self.rank == src:
            self.bytes_sent += self.payload_bytes([tensor]) * (self.world_size - 1)
        return tensor

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        # gloo's point-to-point reads host memory only: CUDA tensors are staged through the host
        staged = [t.cpu() if self._stage_on_host(t) else t.contiguous() for t in tensors]
        works = [self._call(what, dist.isend, t, dst=dst, group=self.group) for t in staged]
        self.bytes_sent += self.payload_bytes(tensors)
        return _TorchWork(self, works, what)

    def irecv(self, buffers: Sequence[torch.Tensor], src: int, *, what: str) -> PendingTransfer:
        copy_back, targets = [], []
        for buffer in buffers:
            if self._stage_on_host(buffer):
                host = torch.empty(buffer.shape, dtype=buffer.dtype)
                copy_back.append((buffer, host))
                targets.append(host)
            else:
                targets.append(buffer)
        works = [self._call(what, dist.irecv, t, src=src, group=self.group) for t in targets]
        return _TorchWork(self, works, what, copy_back)

    def _stage_on_host(self, tensor: torch.Tensor) -> bool:
        return self.backend == "gloo" and tensor.device.type != "cpu"

    def close(self) -> None:
        """Destroy the transport's own process group (not the default one); idempotent. Any
        later call raises RuntimeError."""
        group, self.group = self.group, None
        if group is not None and self._owns_group:
            try:
                dist.destroy_process_group(group)
            except Exception:  # a group broken by a dead peer still goes away locally
                pass
        _LIVE.discard(self)

    def _call(self, what: str, fn, *args, **kwargs):
        if self.group is None:
            raise RuntimeError(f"{what}: this transport was closed")
        started = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            raise self._peer_error(what, exc, time.monotonic() - started) from exc

    def _wait(self, work, what: str) -> None:
        started = time.monotonic()
        try:
            if self._host_timeout is not None:
                work.wait(timeout=self._host_timeout)
            else:
                work.wait()
        except RuntimeError as exc:
            raise self._peer_error(what, exc, time.monotonic() - started) from exc

    def _peer_error(self, what: str, exc: BaseException, waited_s: float) -> PeerTimeoutError:
        if waited_s < 0.9 * self.timeout_s:  # the link broke; nobody waited out the limit
            happened = (f"the connection to a peer failed after {waited_s:.2f} s (the limit is "
                        f"{self.timeout_s:g} s)")
            advice = "A peer process died: check the other ranks' logs."
        else:
            happened = f"no answer from a peer within {self.timeout_s:g} s"
            advice = ("A peer process died or hangs: check the other ranks' logs. The limit is "
                      "HybridConfig(timeout_s=...).")
        return PeerTimeoutError(
            f"rank {self.rank}/{self.world_size}: {happened} during '{what}' over {self.name} "
            f"({type(exc).__name__}: {_first_line(exc)}). {advice}")


#: TorchTransports not closed yet (weakly held): what live_transports() counts.
_LIVE: "weakref.WeakSet[TorchTransport]" = weakref.WeakSet()


def live_transports() -> int:
    """How many TorchTransports of this process are open (constructed and not closed)."""
    return len(_LIVE)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else ""
