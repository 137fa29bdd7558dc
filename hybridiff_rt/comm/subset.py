"""A Transport over a subset of the job's ranks, with bytes counted per link.

``SubsetTransport(parent, ranks)`` lets code written for "ranks 0 .. n-1" (the stage pipeline, a
link probe) run on any ordered subset of a bigger job, e.g. one rank pair ``(p, N + p)`` of a
world of 2N, without creating process groups: local rank ``i`` is global rank ``ranks[i]``, and
point-to-point moves go through the parent's links. ``broadcast`` and ``all_gather`` of a proper
subset are built from point-to-point moves (the parent's collectives would involve every rank);
over the whole world, in any order (a placement of the ranks), they use the parent's
collectives.

Every method counts the payload this rank sends on each link in :attr:`link_bytes`
(global destination rank -> bytes), besides the usual ``bytes_sent``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import PendingTransfer, Transport


class _All:
    """Several pending transfers completed together."""

    def __init__(self, pending: list[PendingTransfer]) -> None:
        self._pending = pending

    def wait(self) -> None:
        for p in self._pending:
            p.wait()
        self._pending = []


class SubsetTransport(Transport):
    """The ranks ``ranks`` (global, in local order) of ``parent``'s job as a job of their own.

    Args:
        parent: a transport over the whole job (its ``rank`` must be in ``ranks``).
        ranks: the member ranks; local rank i is ``ranks[i]``.
        ledger: the dict to count link bytes in (share one between several subsets of a job);
            default a new one.
    """

    def __init__(self, parent: Transport, ranks: Sequence[int],
                 ledger: dict[int, int] | None = None) -> None:
        ranks = tuple(int(r) for r in ranks)
        if len(set(ranks)) != len(ranks) or parent.rank not in ranks:
            raise ValueError(f"rank {parent.rank} is not one of the distinct ranks {ranks}")
        if any(not 0 <= r < parent.world_size for r in ranks):
            raise ValueError(f"ranks {ranks} do not fit a world of {parent.world_size}")
        super().__init__(ranks.index(parent.rank), len(ranks), parent.timeout_s)
        self.parent = parent
        self.ranks = ranks
        self.name = parent.name
        self.bytes_per_ms = parent.bytes_per_ms
        self.link_measured = parent.link_measured
        #: every rank of the job (in some order): the parent's collectives serve
        self._whole = len(ranks) == parent.world_size
        #: global destination rank -> payload bytes this rank sent there.
        self.link_bytes: dict[int, int] = {} if ledger is None else ledger

    def _count(self, nbytes: int, local_dst: int) -> None:
        dst = self.ranks[local_dst]
        self.link_bytes[dst] = self.link_bytes.get(dst, 0) + nbytes
        self.bytes_sent += nbytes

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        self._count(self.payload_bytes(tensors), dst)
        return self.parent.isend(tensors, self.ranks[dst], what=what)

    def irecv(self, buffers: Sequence[torch.Tensor], src: int, *, what: str) -> PendingTransfer:
        return self.parent.irecv(buffers, self.ranks[src], what=what)

    def broadcast(self, tensor: torch.Tensor, src: int, *, what: str) -> torch.Tensor:
        others = [r for r in range(self.world_size) if r != src]
        if self._whole:
            self.parent.broadcast(tensor, self.ranks[src], what=what)
            if self.rank == src:
                for r in others:
                    self._count(self.payload_bytes([tensor]), r)
            return tensor
        if self.rank == src:
            sends = [self.isend([tensor], r, what=what) for r in others]
            _All(sends).wait()
        else:
            buffer = tensor if tensor.is_contiguous() else torch.empty_like(tensor)
            self.irecv([buffer], src, what=what).wait()
            if buffer is not tensor:
                tensor.copy_(buffer)
        return tensor

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        tensor = tensor.contiguous()
        others = [r for r in range(self.world_size) if r != self.rank]
        if self._whole:
            out = self.parent.all_gather(tensor, what=what)
            for r in others:
                self._count(self.payload_bytes([tensor]), r)
            return [out[r] for r in self.ranks]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        out[self.rank] = tensor
        pending = []
        for r in others:
            # each pair posts in one order (the lower local rank sends first): NCCL runs a pair's
            # sends and receives in posting order on one stream, so two receives posted first
            # would wait on each other forever
            if self.rank < r:
                pending.append(self.isend([tensor], r, what=what))
                pending.append(self.irecv([out[r]], r, what=what))
            else:
                pending.append(self.irecv([out[r]], r, what=what))
                pending.append(self.isend([tensor], r, what=what))
        _All(pending).wait()
        return out

    def link_name(self, peer: int) -> str:
        """The parent's backend for the link to local rank ``peer``."""
        return self.parent.link_name(self.ranks[peer])

    def close(self) -> None:
        """Nothing to release: the parent owns the links."""
