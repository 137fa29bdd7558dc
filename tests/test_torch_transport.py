"""TorchTransport (comm/torch_backend.py) on two gloo ranks, one CPU thread each.

Checked: all_gather returns every rank's tensor in rank order; broadcast overwrites the buffer
with the source's tensor; isend/irecv move lists of tensors of several dtypes (contiguous or not)
exactly; ``bytes_sent`` counts exactly the payload this rank sent; a dead peer becomes a
PeerTimeoutError that quotes the exchange's ``what`` label (receive, gather, broadcast); closing a
transport leaves the others working. make_transport picks TorchTransport on CPU ranks and refuses
the IPC transport there.
"""

from __future__ import annotations

import random

import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt.comm import Transport, TorchTransport, make_transport
from hybridiff_rt.testing import all_ok, run_ranks

#: seconds a rank waits for its dead peer before the transport gives up
PEER_TIMEOUT_S = 3.0


def _data(seed: int) -> dict[str, list[torch.Tensor]]:
    """The same tensors on both ranks (from the seed); each rank sends its own share."""
    g = torch.Generator().manual_seed(seed)
    return {
        "gather": [torch.randn(3, 5, generator=g) for _ in range(2)],
        "gather_t": [torch.randn(4, 6, generator=g).t() for _ in range(2)],  # non-contiguous
        "broadcast": [torch.randn(7, generator=g).to(torch.float16)],
        "to_rank1": [torch.randn(2, 3, generator=g), torch.randn(4, generator=g).half(),
                     torch.randint(-9, 9, (5,), generator=g), torch.randn(4, 3, generator=g).t()],
        "to_rank0": [torch.randn(3, 2, generator=g).to(torch.bfloat16)],
    }


def _rank_exchanges(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.comm import TorchTransport, make_transport

    hr.init_distributed()
    data = _data(seed)
    t = TorchTransport(30.0)
    out = {"name": t.name, "rank": t.rank, "world_size": t.world_size, "bytes": [t.bytes_sent]}

    gathered = t.all_gather(data["gather"][rank], what="gather")
    out["gather"] = [torch.equal(x, data["gather"][r]) for r, x in enumerate(gathered)]
    out["bytes"].append(t.bytes_sent)
    gathered = t.all_gather(data["gather_t"][rank], what="gather non-contiguous")
    out["gather_t"] = [torch.equal(x, data["gather_t"][r]) for r, x in enumerate(gathered)]
    out["bytes"].append(t.bytes_sent)

    (payload,) = data["broadcast"]
    buffer = payload.clone() if rank == 1 else torch.zeros_like(payload)
    returned = t.broadcast(buffer, src=1, what="broadcast from rank 1")
    out["broadcast"] = returned is buffer and torch.equal(buffer, payload)
    out["bytes"].append(t.bytes_sent)

    if rank == 0:
        pending = t.isend(data["to_rank1"], 1, what="to rank 1")
        buffers = [torch.empty_like(x) for x in data["to_rank0"]]
        incoming = t.irecv(buffers, 1, what="to rank 0")
    else:
        buffers = [torch.empty(x.shape, dtype=x.dtype) for x in data["to_rank1"]]
        incoming = t.irecv(buffers, 0, what="to rank 1")
        pending = t.isend(data["to_rank0"], 0, what="to rank 0")
    incoming.wait()
    pending.wait()
    pending.wait()  # a completed transfer may be waited on again
    expected = data["to_rank0"] if rank == 0 else data["to_rank1"]
    out["p2p"] = [b.dtype == x.dtype and torch.equal(b, x) for b, x in zip(buffers, expected)]
    out["bytes"].append(t.bytes_sent)
    out["nbytes"] = {k: [Transport.payload_bytes([x]) for x in v] for k, v in data.items()}
    out["p2p_nbytes"] = {k: Transport.payload_bytes(v) for k, v in data.items()}

    # closing one transport leaves the process group and the other transports working
    other = make_transport("torch", 30.0, torch.device("cpu"))
    auto = make_transport("auto", 30.0, torch.device("cpu"))
    t.close()
    t.close()
    out["auto_kind"] = [type(x).__name__ for x in (other, auto)]
    out["after_close"] = [x.tolist() for x in auto.all_gather(torch.tensor([rank + 0.5]),
                                                              what="after close")]
    out["other_bytes"] = (other.bytes_sent, auto.bytes_sent)
    return out


def test_gather_broadcast_send_receive_and_byte_counts_on_two_gloo_ranks():
    seed = random.randrange(1 << 16)
    ranks = all_ok(run_ranks(_rank_exchanges, seed))
    for rank, r in enumerate(ranks):
        assert (r["name"], r["rank"], r["world_size"]) == ("torch-gloo", rank, 2)
        assert r["gather"] == [True, True] and r["gather_t"] == [True, True], f"seed {seed}"
        assert r["broadcast"] is True
        assert r["p2p"] == [True] * (4 if rank == 1 else 1), f"seed {seed} rank {rank}"
        assert r["auto_kind"] == ["TorchTransport", "TorchTransport"]
        assert r["after_close"] == [[0.5], [1.5]]
        assert r["other_bytes"] == (0, 4)
    nbytes, p2p = ranks[0]["nbytes"], ranks[0]["p2p_nbytes"]
    gather, gather_t = nbytes["gather"][0], nbytes["gather_t"][0]
    broadcast = nbytes["broadcast"][0]
    # all_gather: each rank sends its tensor to the one other rank; broadcast: only the source
    # counts; isend: the payload of every tensor sent; irecv: nothing
    assert ranks[0]["bytes"] == [0, gather, gather + gather_t, gather + gather_t,
                                 gather + gather_t + p2p["to_rank1"]]
    assert ranks[1]["bytes"] == [0, gather, gather + gather_t, gather + gather_t + broadcast,
                                 gather + gather_t + broadcast + p2p["to_rank0"]]
    assert p2p["to_rank1"] == 2 * 3 * 4 + 4 * 2 + 5 * 8 + 4 * 3 * 4


def _rank_peer_dies(rank, timeout_s):
    import os

    import hybridiff_rt as hr
    from hybridiff_rt.comm import TorchTransport

    hr.init_distributed()
    t = TorchTransport(timeout_s)
    t.all_gather(torch.ones(2), what="warm-up")  # both ranks are connected
    if rank == 1:
        os._exit(4)
    errors = {}
    exchanges = {
        "irecv": lambda: t.irecv([torch.empty(3)], 1, what="boundary of step 4").wait(),
        "all_gather": lambda: t.all_gather(torch.ones(2), what="cbp step 5"),
        "broadcast": lambda: t.broadcast(torch.empty(2), 1, what="pipeline step 6 prediction"),
    }
    for name, exchange in exchanges.items():
        try:
            exchange()
            errors[name] = None
        except hr.PeerTimeoutError as exc:
            errors[name] = str(exc)
    return errors


def test_a_dead_peer_raises_peer_timeout_naming_the_exchange():
    outcomes = run_ranks(_rank_peer_dies, PEER_TIMEOUT_S, timeout_s=120)
    assert 1 not in outcomes, "rank 1 was meant to die without reporting"
    assert 0 in outcomes, "the surviving rank hung instead of raising"
    errors = outcomes[0].unwrap()
    labels = {"irecv": "boundary of step 4", "all_gather": "cbp step 5",
              "broadcast": "pipeline step 6 prediction"}
    for name, label in labels.items():
        message = errors[name]
        assert message is not None, f"{name} to a dead peer returned normally"
        # the message says what happened: a reset connection (the peer died), or the limit
        # running out with no answer
        if message.startswith("rank 0/2: the connection to a peer failed after "):
            assert f"(the limit is {PEER_TIMEOUT_S:g} s)" in message
            assert "A peer process died" in message
        else:
            assert message.startswith("rank 0/2: no answer from a peer"), message
            assert "HybridConfig(timeout_s=...)" in message
        assert f"during '{label}' over torch-gloo" in message, message


# ------------------------------------------------------------------------------- one process
def test_without_a_process_group_construction_is_refused():
    with pytest.raises(RuntimeError, match="needs an initialised default process group"):
        TorchTransport(5.0)


def test_ipc_transport_is_refused_for_cpu_tensors():
    with pytest.raises(hr.ExtensionError, match="transport='ipc' needs CUDA tensors"):
        make_transport("ipc", 5.0, torch.device("cpu"))


def test_payload_bytes_counts_every_element_of_every_tensor():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    tensors = [torch.randn(3, 4, generator=g), torch.randn(8, 2, generator=g).t().half(),
               torch.zeros(0), torch.ones((), dtype=torch.int64)]
    assert Transport.payload_bytes(tensors) == 3 * 4 * 4 + 8 * 2 * 2 + 0 + 8
    assert Transport.payload_bytes([]) == 0
