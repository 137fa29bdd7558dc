"""One transport per link: ranks on this node through a node-local transport (CUDA IPC), ranks on
other nodes through torch.distributed.

``make_link_transport`` is what ``make_transport("auto" | "ipc")`` builds on more than two ranks
spread over several nodes:

1. every rank creates the job-wide torch.distributed transport (one process group, collective);
2. the ranks learn which of them share a node (:func:`~hybridiff_rt.comm.nodes.node_groups`);
3. each node with two or more ranks sets up its node-local transport over its own ranks only
   (collective within the node, through a store prefix of its own), by default CUDA IPC; a node
   whose set-up fails falls back to torch.distributed on all of its ranks together, and says why;
4. :class:`LinkTransport` routes each point-to-point move by its peer: a peer on this node through
   the node-local transport, any other through torch.distributed. Collectives over the whole job
   go through torch.distributed (NCCL uses the fast intra-node paths itself).

The transport's :meth:`~LinkTransport.link_name` says which backend serves each link; the
runtime's report copies it per link.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import CudaUnavailableError, ExtensionError
from .base import PendingTransfer, Transport
from .nodes import node_groups
from .store import default_store, gather_bytes
from .torch_backend import TorchTransport

#: ``node_link(store, node_ranks, device, timeout_s, handshake_timeout_s)`` -> (transport over
#: ``node_ranks`` with local rank i = ``node_ranks[i]``, or None, and why not). Collective over
#: the node's ranks; ``store`` is private to the node.
NodeLinkFactory = Callable[[Any, tuple[int, ...], torch.device, float, float],
                           tuple[Transport | None, str]]


class LinkTransport(Transport):
    """Point-to-point moves routed per peer; collectives over the job-wide transport.

    Args:
        world: a transport over every rank of the job (torch.distributed); used for links to
            other nodes, for every link when ``local`` is None, and for collectives.
        local: a transport over this node's ranks ``node_ranks`` (local rank i is global rank
            ``node_ranks[i]``), or None.
        node_ranks: the global ranks of this rank's node, ascending.

    Owns both transports: :meth:`close` closes them.
    """

    def __init__(self, world: Transport, local: Transport | None,
                 node_ranks: Sequence[int]) -> None:
        super().__init__(world.rank, world.world_size, world.timeout_s)
        self.world = world
        self.local = local
        self.node_ranks = tuple(int(r) for r in node_ranks)
        if self.rank not in self.node_ranks:
            raise ValueError(f"rank {self.rank} is not one of its node's ranks {self.node_ranks}")
        if local is not None and local.world_size != len(self.node_ranks):
            raise ValueError(f"the node-local transport has {local.world_size} ranks, the node "
                             f"{len(self.node_ranks)}")
        #: peer (global rank) -> (transport, the peer's rank in that transport)
        self._routes: dict[int, tuple[Transport, int]] = {}
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            if local is not None and peer in self.node_ranks:
                self._routes[peer] = (local, self.node_ranks.index(peer))
            else:
                self._routes[peer] = (world, peer)
        used = {id(t): t for t, _ in self._routes.values()}
        used[id(world)] = world
        self.name = "+".join(sorted({t.name for t in used.values()}))
        # the partitioner's nominal figure: the slowest backend; links are measured per chain
        self.bytes_per_ms = min(t.bytes_per_ms for t in used.values())
        self.link_measured = False
        self.notes = [*world.notes, *(local.notes if local is not None else [])]

    def link_name(self, peer: int) -> str:
        return self._route(peer)[0].name

    def routes(self) -> dict[int, str]:
        """peer (global rank) -> the backend name of the link to it."""
        return {peer: t.name for peer, (t, _) in sorted(self._routes.items())}

    def _route(self, peer: int) -> tuple[Transport, int]:
        try:
            return self._routes[peer]
        except KeyError:
            raise ValueError(f"rank {self.rank}: no link to rank {peer!r} in a world of "
                             f"{self.world_size}") from None

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        transport, index = self._route(dst)
        pending = transport.isend(tensors, index, what=what)
        self.bytes_sent += self.payload_bytes(tensors)
        return pending

    def irecv(self, buffers: Sequence[torch.Tensor], src: int, *, what: str) -> PendingTransfer:
        transport, index = self._route(src)
        return transport.irecv(buffers, index, what=what)

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        out = self.world.all_gather(tensor, what=what)
        self.bytes_sent += self.payload_bytes([tensor]) * (self.world_size - 1)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, *, what: str) -> torch.Tensor:
        self.world.broadcast(tensor, src, what=what)
        if self.rank == src:
            self.bytes_sent += self.payload_bytes([tensor]) * (self.world_size - 1)
        return tensor

    def close(self) -> None:
        """Close the node-local transport (it meets this node's ranks), then the job-wide one."""
        try:
            if self.local is not None:
                self.local.close()
        finally:
            self.world.close()


def ipc_node_link(kind: str) -> NodeLinkFactory:
    """The CUDA IPC transport over one node's ranks: with ``kind="auto"`` a failed set-up is a
    fallback (None and the reason, on every rank of the node), with ``kind="ipc"`` an
    ExtensionError."""

    def make(store: Any, node_ranks: tuple[int, ...], device: torch.device, timeout_s: float,
             handshake_timeout_s: float) -> tuple[Transport | None, str]:
        import torch.distributed as dist

        from . import ipc

        local_rank = node_ranks.index(dist.get_rank())
        if kind == "ipc":
            return ipc.make_ipc_transport(store, local_rank, len(node_ranks), device, timeout_s,
                                          handshake_timeout_s=handshake_timeout_s), ""
        return ipc.try_make_ipc_transport(store, local_rank, len(node_ranks), device, timeout_s,
                                          handshake_timeout_s=handshake_timeout_s)

    return make


def make_link_transport(kind: str, timeout_s: float, device: torch.device,
                        handshake_timeout_s: float | None = None, *,
                        node_link: NodeLinkFactory | None = None) -> Transport:
    """Build the per-link transport (steps 1-4 of the module docstring) on every rank.

    Args:
        kind: "auto" (a node whose local set-up fails uses torch.distributed, with a note) or
            "ipc" (every link between two ranks of one node must use the node-local transport).
        timeout_s: seconds a transfer waits for a peer.
        device: this rank's device.
        handshake_timeout_s: bound on each wait of the set-up (default ``timeout_s``).
        node_link: builds the node-local transport (default: CUDA IPC, :func:`ipc_node_link`).

    Returns:
        A :class:`LinkTransport`; its ``notes`` say which links use which backend and why a
        node fell back.

    Raises:
        ExtensionError: on every rank, when ``kind="ipc"`` and no two ranks share a node, or a
            node's IPC set-up failed.
        PeerTimeoutError: a rank did not take part in the set-up within the handshake limit.
    """
    import torch.distributed as dist

    handshake = float(handshake_timeout_s if handshake_timeout_s is not None else timeout_s)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    store = default_store()
    generation = (int(store.add("hybridiff_rt/links/generation", 1)) - 1) // world_size
    world = TorchTransport(timeout_s)
    local: Transport | None = None
    try:
        nodes = node_groups(store, rank, world_size, handshake)
        mine = next(ranks for ranks in nodes if rank in ranks)
        if kind == "ipc" and all(len(ranks) == 1 for ranks in nodes):
            raise ExtensionError(
                f"transport='ipc': no two of the {world_size} ranks share a node "
                f"({len(nodes)} nodes), so no link can use CUDA IPC; use transport='torch' or "
                "'auto'")
        reason, failure = "no other rank on this node", ""
        if len(mine) > 1:
            from torch.distributed import PrefixStore

            node_store = PrefixStore(f"hybridiff_rt/node{mine[0]}/", store)
            make_local = node_link if node_link is not None else ipc_node_link(kind)
            try:
                local, reason = make_local(node_store, mine, device, timeout_s, handshake)
            except (CudaUnavailableError, ExtensionError) as exc:  # kind="ipc" only
                failure = f"node ranks {list(mine)}: {exc}"
        # every rank learns whether some node refused, so all of them raise together
        failures = [b.decode() for b in gather_bytes(
            store, f"hybridiff_rt/links/{generation}/status", rank, world_size, failure.encode(),
            handshake, f"rank {rank}: the node-local transport set-up of every node") if b]
        if failures:
            raise ExtensionError(f"transport={kind!r}: the node-local CUDA IPC set-up failed: "
                                 + "; ".join(sorted(set(failures))))
    except BaseException:
        if local is not None:
            local.close()
        world.close()
        raise
    transport = LinkTransport(world, local, mine)
    transport.nodes = nodes
    transport.notes.append(_routes_note(transport, nodes, reason if local is None else ""))
    return transport


def _routes_note(transport: LinkTransport, nodes: list[tuple[int, ...]], fallback: str) -> str:
    """One line: this rank's node, which backend each of its links uses, and why a same-node
    link does not use the node-local transport."""
    by_backend: dict[str, list[int]] = {}
    for peer, name in transport.routes().items():
        by_backend.setdefault(name, []).append(peer)
    links = "; ".join(f"{name} to ranks {peers}" for name, peers in sorted(by_backend.items()))
    text = (f"links of rank {transport.rank} (node ranks {list(transport.node_ranks)}, "
            f"{len(nodes)} nodes {[list(n) for n in nodes]}): {links}; collectives over "
            f"{transport.world.name}")
    if fallback and len(transport.node_ranks) > 1:
        text += f"; same-node links fell back to {transport.world.name}: {fallback}"
    return text
