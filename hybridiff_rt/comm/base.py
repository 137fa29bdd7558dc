"""The Transport interface: move named tensors between ranks in stream order.

A transport knows nothing of models, schedules or pipelines. Every method takes ``what``, a short
label (e.g. ``"cbp/step 7"``) that error messages quote, so a timeout says which exchange hung.

Semantics shared by every backend:
  * Tensors are moved as-is (same dtype, same shape on both sides); receivers pass buffers.
  * On CUDA, work is ordered after the current stream's pending work and the returned tensors are
    safe to use on the current stream; the host does not block unless a method says it does.
  * A peer that dies or does not answer within ``timeout_s`` raises
    :class:`~hybridiff_rt.errors.PeerTimeoutError` on the waiting rank, never hangs.
  * ``bytes_sent`` counts payload bytes this rank has sent since construction.
"""

from __future__ import annotations

import abc
from typing import Protocol, Sequence

import torch


class PendingTransfer(Protocol):
    """An asynchronous send or receive; ``wait()`` completes it or raises PeerTimeoutError."""

    def wait(self) -> None: ...


class Transport(abc.ABC):
    """Point-to-point and small collective moves of tensors between ``world_size`` ranks."""

    #: backend name shown in reports ("torch-gloo", "torch-nccl", "ipc").
    name: str = "abstract"
    #: rough payload bandwidth in bytes per millisecond, used by the stage partitioner to weigh
    #: transfers against compute (1e6 bytes/ms = 1 GB/s).
    bytes_per_ms: float = 1e6
    #: True when ``bytes_per_ms`` was measured at set-up (the same value on every rank); the
    #: runtime then plans with it instead of probing the link again.
    link_measured: bool = False
    #: the ranks of each node of the job (``nodes.group_by_node``; every rank has the same
    #: list), or None where the job runs on one node or the transport was not told.
    nodes: list[tuple[int, ...]] | None = None

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.bytes_sent = 0
        #: remarks from set-up (why a fast path is off, what a self-test or link measurement
        #: found); the runtime copies them into the RunReport notes.
        self.notes: list[str] = []

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        """Every rank contributes one same-shaped tensor; returns all of them in rank order."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int, *, what: str) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with ``src``'s; returns it."""

    @abc.abstractmethod
    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        """Start sending ``tensors`` to rank ``dst``; they must not be modified until ``wait()``."""

    @abc.abstractmethod
    def irecv(self, buffers: Sequence[torch.Tensor], src: int, *, what: str) -> PendingTransfer:
        """Start receiving into ``buffers`` from rank ``src``; read them only after ``wait()``."""

    def link_name(self, peer: int) -> str:
        """The backend that moves this rank's tensors to and from rank ``peer`` (what reports
        show per link); one backend for every link unless a transport routes links apart."""
        return self.name

    def close(self) -> None:
        """Release resources; the transport is unusable afterwards."""

    @staticmethod
    def payload_bytes(tensors: Sequence[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)
