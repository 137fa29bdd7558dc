"""Which ranks of the job share a node: gathered once through the job's store.

A node is one machine (host name and kernel boot id) as one torchrun agent sees it: ranks that
torchrun started as different nodes (``--node_rank``, exported as ``GROUP_RANK``) count as
different nodes even on one machine, so a launch says where the fast links are. Every rank
publishes its identity and computes the same grouping from all of them.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from .store import gather_bytes


def boot_id() -> str:
    """The kernel's boot id ("" where /proc does not give one): two processes with the same host
    name and boot id run on one machine."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def node_identity() -> dict[str, str]:
    """This process's node: ``{"host", "boot_id", "launch_node"}`` (``launch_node``: torchrun's
    GROUP_RANK, "" when not started by torchrun)."""
    return {"host": socket.gethostname(), "boot_id": boot_id(),
            "launch_node": os.environ.get("GROUP_RANK", "")}


def group_by_node(identities: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    """The ranks of each node, given every rank's :func:`node_identity` in rank order: a list of
    rank tuples (each ascending), ordered by their first rank. A pure function of its input, so
    every rank groups alike."""
    nodes: dict[tuple[str, str, str], list[int]] = {}
    for rank, ident in enumerate(identities):
        key = (str(ident["host"]), str(ident["boot_id"]), str(ident["launch_node"]))
        nodes.setdefault(key, []).append(rank)
    return sorted((tuple(ranks) for ranks in nodes.values()), key=lambda ranks: ranks[0])


def node_groups(store: Any, rank: int, world_size: int, timeout_s: float) -> list[tuple[int, ...]]:
    """Collective (every rank calls it, in the same order): the ranks of each node
    (:func:`group_by_node`), the same list on every rank.

    Raises:
        PeerTimeoutError: a rank did not publish its node within ``timeout_s`` seconds.
    """
    generation = (int(store.add("hybridiff_rt/nodes/generation", 1)) - 1) // world_size
    identities = gather_bytes(store, f"hybridiff_rt/nodes/{generation}", rank, world_size,
                              json.dumps(node_identity()).encode(), timeout_s,
                              f"rank {rank}: which ranks share a node")
    return group_by_node([json.loads(b) for b in identities])
