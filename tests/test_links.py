"""Per-link transports (hybridiff_rt.comm.links, .nodes): which ranks share a node, each point-to-
point move on its link's own backend, and set-up failures raised on every rank.

CUDA IPC cannot run here: the node-local transport is a stand-in (the node's ranks over a second
gloo process group under their own backend name, tests/scale_out_cases.py), so what is checked is
the routing, the data each route delivers, the notes and the collective decisions. The IPC
transport on four ranks of one GPU is checked by tests/test_ipc_gpu.py on a lent GPU.
"""

from __future__ import annotations

import os
import random

import pytest
import scale_out_cases as cases  # tests/ is on sys.path under pytest
import torch

from hybridiff_rt.comm import LinkTransport, Transport
from hybridiff_rt.comm.nodes import group_by_node
from hybridiff_rt.errors import ExtensionError
from hybridiff_rt.testing import all_ok, run_ranks

WORLD = 4


# ------------------------------------------------------------------------------ node grouping
def test_ranks_are_grouped_by_machine_and_by_launch_node():
    rng = random.Random()
    world = rng.randrange(2, 12)
    identities = [{"host": f"h{rng.randrange(3)}", "boot_id": f"b{rng.randrange(2)}",
                   "launch_node": str(rng.randrange(2))} for _ in range(world)]
    groups = group_by_node(identities)
    assert sorted(r for g in groups for r in g) == list(range(world))
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)

    def key(rank):
        ident = identities[rank]
        return ident["host"], ident["boot_id"], ident["launch_node"]

    for group in groups:
        assert list(group) == sorted(group)
        assert len({key(r) for r in group}) == 1
    assert len({key(g[0]) for g in groups}) == len(groups)  # distinct nodes never merge
    # one machine, two torchrun nodes: two nodes
    same = {"host": "h", "boot_id": "b"}
    assert group_by_node([{**same, "launch_node": n} for n in "0011"]) == [(0, 1), (2, 3)]
    # same host name after a reboot (another boot id): not one node
    assert group_by_node([{"host": "h", "boot_id": b, "launch_node": ""} for b in "xy"]) == \
        [(0,), (1,)]


# ------------------------------------------------------------------- routing, in one process
class _Recorder(Transport):
    """Records every call; moves nothing."""

    def __init__(self, name: str, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, 1.0)
        self.name, self.calls, self.closed = name, [], False

    class _Done:
        def wait(self):
            pass

    def isend(self, tensors, dst, *, what):
        self.calls.append(("isend", dst, what))
        return self._Done()

    def irecv(self, buffers, src, *, what):
        self.calls.append(("irecv", src, what))
        return self._Done()

    def all_gather(self, tensor, *, what):
        self.calls.append(("all_gather", None, what))
        return [tensor] * self.world_size

    def broadcast(self, tensor, src, *, what):
        self.calls.append(("broadcast", src, what))
        return tensor

    def close(self):
        self.closed = True


def test_each_peer_takes_its_route_with_the_peer_index_of_that_route():
    rank, node = 5, (4, 5, 6)
    world = _Recorder("torch-nccl", rank, 8)
    local = _Recorder("ipc", node.index(rank), len(node))
    world.bytes_per_ms, local.bytes_per_ms = 1e7, 4e7
    t = LinkTransport(world, local, node)
    assert t.name == "ipc+torch-nccl" and t.bytes_per_ms == 1e7 and not t.link_measured
    assert t.routes() == {p: ("ipc" if p in node else "torch-nccl") for p in range(8) if p != 5}
    assert [t.link_name(p) for p in (4, 6, 0, 7)] == ["ipc", "ipc", "torch-nccl", "torch-nccl"]
    x = torch.randn(3, 7)
    for peer in (4, 6, 0, 7):
        t.isend([x], peer, what=f"to {peer}").wait()
        t.irecv([x], peer, what=f"from {peer}").wait()
    assert local.calls == [("isend", 0, "to 4"), ("irecv", 0, "from 4"),
                           ("isend", 2, "to 6"), ("irecv", 2, "from 6")]
    assert world.calls == [("isend", 0, "to 0"), ("irecv", 0, "from 0"),
                           ("isend", 7, "to 7"), ("irecv", 7, "from 7")]
    assert t.bytes_sent == 4 * x.numel() * 4
    t.all_gather(x, what="g")
    t.broadcast(x, 5, what="b")
    assert world.calls[-2:] == [("all_gather", None, "g"), ("broadcast", 5, "b")]
    assert t.bytes_sent == 4 * x.numel() * 4 + 2 * 7 * x.numel() * 4
    with pytest.raises(ValueError, match="no link to rank 5"):
        t.isend([x], 5, what="self")
    t.close()
    assert local.closed and world.closed
    # without a node-local transport every link is the world's
    alone = LinkTransport(_Recorder("torch-gloo", 1, 4), None, (1,))
    assert alone.name == "torch-gloo" and set(alone.routes().values()) == {"torch-gloo"}
    with pytest.raises(ValueError, match="node-local transport has 2 ranks"):
        LinkTransport(_Recorder("torch-gloo", 1, 4), _Recorder("ipc", 0, 2), (1, 2, 3))


# ------------------------------------------------------------------- four ranks, two "nodes"
def _failing_node_link(bad_node_first_rank: int):
    def make(store, node_ranks, device, timeout_s, handshake_timeout_s):
        if node_ranks[0] == bad_node_first_rank:
            raise ExtensionError("CUDA IPC self-test failed: rank 0 -> rank 1 (device staging)")
        return None, "not asked for"

    return make


def _falling_back_node_link(carrier, fallback_node_first_rank: int):
    stand_in = cases.stand_in_node_link(carrier)

    def make(store, node_ranks, device, timeout_s, handshake_timeout_s):
        if node_ranks[0] == fallback_node_first_rank:
            return None, "ipc set-up failed on purpose"
        return stand_in(store, node_ranks, device, timeout_s, handshake_timeout_s)

    return make


def _rank_links(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.comm import TorchTransport, make_link_transport

    hr.init_distributed(timeout_s=30)
    out = {}
    cpu = torch.device("cpu")
    # every rank alone on its node: transport="ipc" has no link to serve, on every rank
    os.environ["GROUP_RANK"] = str(rank)
    try:
        make_link_transport("ipc", 20, cpu)
    except ExtensionError as exc:
        out["alone"] = str(exc)
    os.environ["GROUP_RANK"] = str(rank // 2)  # nodes (0, 1) and (2, 3)
    # node (2, 3) fails its IPC set-up under transport="ipc": every rank raises
    try:
        make_link_transport("ipc", 20, cpu, node_link=_failing_node_link(2))
    except ExtensionError as exc:
        out["refused"] = str(exc)
    carrier = TorchTransport(20)
    # node (0, 1) falls back, node (2, 3) uses its node-local transport
    t = make_link_transport("auto", 20, cpu, node_link=_falling_back_node_link(carrier, 0))
    out["routes"], out["name"], out["notes"] = t.routes(), t.name, list(t.notes)
    out["nodes"] = t.nodes
    # every ordered pair exchanges fresh random data through its route
    g = torch.Generator().manual_seed(seed)
    data = {(a, b): torch.randn(int(torch.randint(1, 40, (1,), generator=g)), 3, generator=g)
            for a in range(WORLD) for b in range(WORLD) if a != b}
    sends = [t.isend([data[(rank, p)]], p, what=f"{rank}->{p}")
             for p in range(WORLD) if p != rank]
    got = {}
    for p in range(WORLD):
        if p != rank:
            buf = torch.empty_like(data[(p, rank)])
            t.irecv([buf], p, what=f"{p}->{rank}").wait()
            got[p] = bool(torch.equal(buf, data[(p, rank)]))
    for s in sends:
        s.wait()
    out["received"] = got
    gathered = t.all_gather(torch.full((2,), float(rank)), what="gather")
    out["gathered"] = [x.tolist() for x in gathered]
    out["bytes_sent"] = t.bytes_sent
    out["expected_bytes"] = (sum(data[(rank, p)].nbytes for p in range(WORLD) if p != rank)
                             + 3 * 2 * 4)
    t.close()
    # a proper subset of the job as a job of its own: local rank i is global rank ranks[i]
    from hybridiff_rt.comm import SubsetTransport

    ranks = (3, 1) if rank % 2 else (0, 2)
    sub = SubsetTransport(carrier, ranks)
    mine = torch.randn(5, generator=torch.Generator().manual_seed(seed + rank))
    out["subset_gather"] = [x.tolist() for x in sub.all_gather(mine, what="subset gather")]
    value = mine.clone()
    sub.broadcast(value, 1, what="subset broadcast")  # from local rank 1: global ranks[1]
    out["subset_broadcast"] = value.tolist()
    out["subset_link_bytes"] = dict(sub.link_bytes)
    out["subset_members"] = list(ranks)
    # the whole job in another order (a placement): the parent's collectives, results in order
    order = [int(r) for r in torch.randperm(WORLD, generator=torch.Generator().manual_seed(seed))]
    whole = SubsetTransport(carrier, order)
    out["placed_rank"] = whole.rank
    out["placed_gather"] = [x.tolist() for x in whole.all_gather(mine, what="placed gather")]
    value = mine.clone()
    whole.broadcast(value, 1, what="placed broadcast")
    out["placed_broadcast"] = value.tolist()
    out["placed_link_bytes"] = dict(whole.link_bytes)
    carrier.close()
    return out


def test_routes_data_notes_and_failures_on_four_ranks_over_two_nodes():
    seed = random.randrange(1 << 16)
    ranks = all_ok(run_ranks(_rank_links, seed, world_size=WORLD, timeout_s=200), WORLD)
    for rank, out in enumerate(ranks):
        assert "no two of the 4 ranks share a node (4 nodes)" in out["alone"], out
        assert out["refused"].startswith("transport='ipc': the node-local CUDA IPC set-up "
                                         "failed: node ranks [2, 3]: CUDA IPC self-test failed")
        node = (0, 1) if rank < 2 else (2, 3)
        peers = [p for p in range(WORLD) if p != rank]
        # node (0, 1) fell back to gloo; node (2, 3) uses the stand-in inside the node
        inside = "torch-gloo" if node == (0, 1) else "node-stand-in"
        assert out["routes"] == {p: (inside if p in node else "torch-gloo") for p in peers}
        assert out["name"] == ("torch-gloo" if node == (0, 1) else "node-stand-in+torch-gloo")
        note = out["notes"][-1]
        assert note.startswith(f"links of rank {rank} (node ranks {list(node)}, 2 nodes "
                               "[[0, 1], [2, 3]])"), note
        assert ("fell back to torch-gloo: ipc set-up failed on purpose" in note) == (node == (0, 1))
        assert out["received"] == {p: True for p in peers}
        assert out["gathered"] == [[float(r)] * 2 for r in range(WORLD)]
        assert out["bytes_sent"] == out["expected_bytes"]
        members = out["subset_members"]

        def drawn(r):
            return torch.randn(5, generator=torch.Generator().manual_seed(seed + r)).tolist()

        assert out["subset_gather"] == [drawn(r) for r in members]
        assert out["subset_broadcast"] == drawn(members[1])
        other = [r for r in members if r != rank][0]
        # 20 bytes gathered to the other member, plus 20 broadcast from local rank 1
        assert out["subset_link_bytes"] == {other: 20 + 20 * (rank == members[1])}
        assert [tuple(n) for n in out["nodes"]] == [(0, 1), (2, 3)]
        order = [int(r) for r in
                 torch.randperm(WORLD, generator=torch.Generator().manual_seed(seed))]
        assert out["placed_rank"] == order.index(rank)
        assert out["placed_gather"] == [drawn(r) for r in order]
        assert out["placed_broadcast"] == drawn(order[1])
        assert out["placed_link_bytes"] == {p: 20 + 20 * (rank == order[1]) for p in peers}
