"""Moving tensors between ranks: the Transport interface and its backends.

``make_transport`` picks a backend for a HybridConfig.transport value:
  * "torch": torch.distributed (NCCL on GPUs, gloo on CPUs), works across nodes;
  * "ipc": the CUDA IPC engine of the compiled extension (ranks on one node, CUDA tensors);
  * "auto": IPC when every rank is on this node with CUDA and the engine is usable, else torch.
    On more than two ranks spread over several nodes, each link gets its own backend
    (:mod:`.links`): IPC between ranks of one node, torch.distributed between nodes.
"""

from __future__ import annotations

import os

import torch

from ..errors import ExtensionError
from .base import PendingTransfer, Transport
from .distributed import DistInfo, current_dist_info, init_distributed
from .links import LinkTransport, make_link_transport
from .nodes import node_groups
from .store import default_store, wait_for_keys
from .subset import SubsetTransport
from .torch_backend import TorchTransport

__all__ = ["PendingTransfer", "Transport", "TorchTransport", "SubsetTransport", "LinkTransport",
           "DistInfo", "current_dist_info", "init_distributed", "make_transport",
           "make_link_transport", "node_groups", "all_ranks_on_this_node", "default_store",
           "wait_for_keys"]


def all_ranks_on_this_node() -> bool:
    """True when torchrun says every rank of the job runs on this node."""
    world = os.environ.get("WORLD_SIZE")
    return world is not None and os.environ.get("LOCAL_WORLD_SIZE", world) == world


def make_transport(kind: str, timeout_s: float, device: torch.device,
                   handshake_timeout_s: float | None = None) -> Transport:
    """Create the transport named by ``kind`` ("auto" | "ipc" | "torch") for this rank.

    Collective: every rank calls it in the same order. ``handshake_timeout_s`` bounds the set-up
    (waiting for slow peers; default ``timeout_s``); ``timeout_s`` bounds each transfer after it.
    With "auto", a CUDA IPC set-up that fails on any rank falls back to torch.distributed on every
    rank together, and the returned transport's ``notes`` say why. On more than two CUDA ranks
    over several nodes (torchrun's LOCAL_WORLD_SIZE < WORLD_SIZE) the result is a
    :class:`LinkTransport`: IPC inside each node, torch.distributed between nodes. On more than
    two ranks over several nodes the transport's ``nodes`` says which ranks share a node (a
    collective through the job's store).

    Raises:
        ExtensionError: ``kind="ipc"`` but the IPC engine cannot serve these ranks (the message
            says why: no CUDA compiled in, no two ranks on one node, no usable copy path, ...).
        PeerTimeoutError: a peer did not take part in the set-up within the handshake limit.
    """
    handshake = float(handshake_timeout_s if handshake_timeout_s is not None else timeout_s)
    import torch.distributed as dist

    several_nodes = (dist.is_initialized() and dist.get_world_size() > 2
                     and not all_ranks_on_this_node())
    if device.type == "cuda" and several_nodes and kind != "torch":
        # several nodes: IPC on the links inside each node, torch.distributed between nodes
        return make_link_transport(kind, timeout_s, device, handshake)
    transport = _one_backend(kind, timeout_s, device, handshake)
    if several_nodes:  # which ranks share a node: the image-pairs layout places pairs by it
        try:
            transport.nodes = node_groups(default_store(), dist.get_rank(),
                                          dist.get_world_size(), handshake)
        except BaseException:
            transport.close()
            raise
    return transport


def _one_backend(kind: str, timeout_s: float, device: torch.device,
                 handshake: float) -> Transport:
    """One backend for every link (:func:`make_transport` on one node, or "torch")."""
    if kind == "torch":
        return TorchTransport(timeout_s)
    import torch.distributed as dist

    wants_ipc = device.type == "cuda" and all_ranks_on_this_node()
    if kind == "auto" and not wants_ipc:
        return TorchTransport(timeout_s)
    if kind == "ipc" and not wants_ipc:
        why = (f"needs CUDA tensors, and this rank runs on {device}" if device.type != "cuda"
               else "needs ranks that share a node, and the two ranks of this job run on "
                    "different nodes")
        raise ExtensionError(f"transport='ipc' {why} (use transport='torch' or 'auto')")

    from . import ipc

    store = default_store()
    if kind == "ipc":
        return ipc.make_ipc_transport(store, dist.get_rank(), dist.get_world_size(), device,
                                      timeout_s, handshake_timeout_s=handshake)
    # "auto": the set-up is collective, so every rank falls back to torch together
    transport, reason = ipc.try_make_ipc_transport(store, dist.get_rank(), dist.get_world_size(),
                                                   device, timeout_s,
                                                   handshake_timeout_s=handshake)
    if transport is not None:
        return transport
    fallback = TorchTransport(timeout_s)
    fallback.notes.append(f"transport='auto': CUDA IPC not used ({reason}); torch.distributed "
                          f"({fallback.name}) moves the tensors")
    return fallback
