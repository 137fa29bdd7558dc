"""Moving tensors between ranks: the Transport interface and its backends.

``make_transport`` picks a backend for a HybridConfig.transport value:
  * "torch": torch.distributed (NCCL on GPUs, gloo on CPUs), works across nodes;
  * "ipc": the CUDA IPC engine of the compiled extension (ranks on one node, CUDA tensors);
  * "auto": IPC when every rank is on this node with CUDA and the engine is usable, else torch;
    on more than two ranks, torch for every link.
"""

from __future__ import annotations

import os

import torch

from ..errors import ExtensionError
from .base import PendingTransfer, Transport
from .distributed import DistInfo, current_dist_info, init_distributed
from .store import default_store, wait_for_keys
from .subset import SubsetTransport
from .torch_backend import TorchTransport

__all__ = ["PendingTransfer", "Transport", "TorchTransport", "SubsetTransport", "DistInfo", "current_dist_info",
           "init_distributed", "make_transport", "all_ranks_on_this_node", "default_store",
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
    rank together, and the returned transport's ``notes`` say why.

    Raises:
        ExtensionError: ``kind="ipc"`` but the IPC engine cannot serve these ranks (the message
            says why: no CUDA compiled in, ranks on several nodes, no usable copy path, ...).
        PeerTimeoutError: a peer did not take part in the set-up within the handshake limit.
    """
    handshake = float(handshake_timeout_s if handshake_timeout_s is not None else timeout_s)
    if kind == "torch":
        return TorchTransport(timeout_s)
    wants_ipc = device.type == "cuda" and all_ranks_on_this_node()
    if kind == "auto" and not wants_ipc:
        return TorchTransport(timeout_s)
    import torch.distributed as dist

    if kind == "auto" and dist.get_world_size() > 2:
        # world size 2N > 2: every link on torch.distributed (NCCL on GPUs) for now
        transport = TorchTransport(timeout_s)
        transport.notes.append(f"transport='auto' on {dist.get_world_size()} ranks: every link "
                               f"uses torch.distributed ({transport.name}); the CUDA IPC "
                               "transport serves runs on two ranks (transport='ipc' asks for it)")
        return transport
    if kind == "ipc" and not wants_ipc:
        raise ExtensionError("transport='ipc' needs CUDA tensors and every rank on one node; "
                             f"this rank runs on {device} (use transport='torch' or 'auto')")

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
