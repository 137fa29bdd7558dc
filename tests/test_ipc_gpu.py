"""GPU tests of the CUDA IPC transport: two processes on one GPU (or rank r on GPU r when
HYBRIDIFF_RT_TEST_TWO_GPUS=1 and two GPUs exist).

Each test spawns two ranks that meet through a TCPStore hosted by the test process, build the
transport with ``make_ipc_transport`` and run one scenario. Content is checked on the GPU against
data the receiver regenerates from the same seed; mismatch counts are synchronised once at the end.
Run with ``pytest -m gpu tests/test_ipc_gpu.py`` (bench/device_check.sh does).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import secrets
import signal
import time
import traceback

import pytest
import torch

from hybridiff_rt import env

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int64, torch.uint8, torch.int32]
SCENARIO_TIMEOUT_S = 60  # below device_check.sh's per-test limit, so a hang fails the test itself


# ------------------------------------------------------------------------------------------------
# harness


def _gpu_sleep(microseconds: float) -> None:
    """Keep the current stream busy for about ``microseconds`` of GPU time: the extension's
    kernel where it was compiled with device code (nvcc), else torch's spin kernel (a build
    against the pip CUDA runtime has no device code; about 2,000 cycles per microsecond)."""
    from hybridiff_rt.comm import ipc

    if ipc.build_info().get("archs"):
        ipc._C.device_sleep(torch.cuda.current_stream().cuda_stream, microseconds)
    else:
        torch.cuda._sleep(int(microseconds * 2000))


def _device_for(rank: int) -> torch.device:
    two = env.read("HYBRIDIFF_RT_TEST_TWO_GPUS") == "1" and torch.cuda.device_count() > 1
    return torch.device("cuda", rank if two else 0)


def _rank_main(rank: int, port: int, scenario: str, args: dict, results) -> None:
    try:
        torch.set_num_threads(1)
        from torch.distributed import TCPStore

        from hybridiff_rt.comm import ipc

        device = _device_for(rank)
        torch.cuda.set_device(device)
        store = TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=60))
        transport = ipc.make_ipc_transport(
            store, rank, 2, args.get("device_arg", device), args.get("timeout_s", 20.0),
            num_slots=args.get("num_slots", 4), slot_bytes=args.get("slot_bytes"),
            staging=args.get("staging"))
        out = globals()[f"_scenario_{scenario}"](transport, rank, args)
        transport.close()
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(scenario: str, expect: tuple[int, ...] = (0, 1), **args) -> dict[int, dict]:
    """Run ``_scenario_<scenario>`` on two spawned ranks; returns {rank: result} for ``expect``."""
    import torch.multiprocessing as mp
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=60),
                     wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args.setdefault("seed", secrets.randbits(31))
    procs = [ctx.Process(target=_rank_main, args=(r, store.port, scenario, args, results),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    try:
        while len(out) < len(expect):
            try:
                rank, status, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                pytest.fail(f"scenario {scenario}: ranks {set(expect) - set(out)} did not report "
                            f"within {SCENARIO_TIMEOUT_S} s (hang)")
            assert status == "ok", f"rank {rank} failed:\n{value}"
            out[rank] = value
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return out


# ------------------------------------------------------------------------------------------------
# deterministic random messages


def _message_specs(seed: int, i: int, max_bytes: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
    specs = []
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (), generator=g))]
        esize = torch.empty((), dtype=dtype).element_size()
        # log-uniform sizes from 1 element to max_bytes; a few empty tensors
        nbytes = int(2 ** (torch.rand((), generator=g) * torch.log2(torch.tensor(max_bytes))))
        numel = 0 if torch.rand((), generator=g) < 0.02 else max(1, nbytes // esize)
        cols = int(torch.randint(1, 9, (), generator=g))
        shape = (numel // cols, cols) if numel % cols == 0 and numel else (numel,)
        specs.append((shape, dtype))
    return specs


def _fill(shape, dtype, seed: int, device) -> torch.Tensor:
    """Random bits (any dtype, NaN patterns included) from a device generator seeded by ``seed``."""
    esize = torch.empty((), dtype=dtype).element_size()
    numel = int(torch.Size(shape).numel())
    g = torch.Generator(device=device).manual_seed(seed)
    raw = torch.randint(0, 256, (numel * esize,), dtype=torch.uint8, device=device, generator=g)
    return raw.view(dtype).view(shape)


def _bytes_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).sum()


def _message(seed: int, direction: int, i: int, max_bytes: int, device):
    specs = _message_specs(seed + direction, i, max_bytes)
    return [_fill(shape, dtype, (seed + direction) * 7919 + i * 64 + k, device)
            for k, (shape, dtype) in enumerate(specs)]


# ------------------------------------------------------------------------------------------------
# scenarios (run inside each rank)


def _scenario_random_stream(t, rank, args):
    """Both ranks send and receive `count` random messages at once, checking every byte."""
    count, max_bytes, seed = args["count"], args["max_bytes"], args["seed"]
    peer, device = 1 - rank, t.device
    bad = torch.zeros((), dtype=torch.int64, device=device)
    pending = []
    payload = 0
    for i in range(count):
        msg = _message(seed, rank, i, max_bytes, device)
        pending.append(t.isend(msg, peer, what=f"msg {i}"))
        want = _message(seed, peer, i, max_bytes, device)
        bufs = [torch.empty_like(w) for w in want]
        t.irecv(bufs, peer, what=f"msg {i}").wait()
        for b, w in zip(bufs, want):
            bad += _bytes_differ(b, w)
        payload += sum(w.numel() * w.element_size() for w in want)
        if len(pending) > 8:
            pending.pop(0).wait()
    for p in pending:
        p.wait()
    torch.cuda.synchronize()
    return {"bad_bytes": int(bad), "received_bytes": payload, "bytes_sent": t.bytes_sent,
            "staging": t.staging}


def _scenario_slow_consumer(t, rank, args):
    """Rank 0 fires `count` messages without waiting; rank 1's stream sleeps before each read, so
    the ring is full and the sender's copies must wait for the GPU-side reads (free events)."""
    count, nbytes, seed = args["count"], args["nbytes"], args["seed"]
    if rank == 0:
        pending = [t.isend([_fill((nbytes,), torch.uint8, seed + i, t.device)], 1, what=f"m{i}")
                   for i in range(count)]
        for p in pending:
            p.wait()
        torch.cuda.synchronize()
        return {}

    bad = torch.zeros((), dtype=torch.int64, device=t.device)
    for i in range(count):
        _gpu_sleep(args["sleep_us"])  # the read below starts late on the GPU
        buf = torch.empty(nbytes, dtype=torch.uint8, device=t.device)
        t.irecv([buf], 0, what=f"m{i}").wait()
        bad += _bytes_differ(buf, _fill((nbytes,), torch.uint8, seed + i, t.device))
        if i % 7 == 0:
            time.sleep(0.002)  # and the host is slow now and then
    torch.cuda.synchronize()
    return {"bad_bytes": int(bad)}


def _scenario_compute_interleave(t, rank, args):
    """Tensors produced by kernels just before isend (no sync), received on a side stream, read
    by compute on other streams; the sender overwrites its source right after wait()."""
    count, n, seed = args["count"], args["numel"], args["seed"]
    peer, device = 1 - rank, t.device
    side = torch.cuda.Stream(device)
    busy = torch.cuda.Stream(device)
    a = torch.randn(1024, 1024, device=device)
    bad = torch.zeros((), dtype=torch.int64, device=device)
    base = torch.arange(n, device=device, dtype=torch.float32)

    def produce(r, i):
        return torch.sin(base * (1e-3 * (i + 1)) + r) * 3.0 + i  # deterministic elementwise

    for i in range(count):
        with torch.cuda.stream(busy):  # unrelated work competing for the GPU
            a = (a @ a).clamp_(-1, 1)
        x = produce(rank, i)
        p = t.isend([x], peer, what=f"step {i}")
        p.wait()
        x.fill_(float("nan"))  # ordered after the copy by wait(): must not reach the peer
        with torch.cuda.stream(side):
            y = torch.empty(n, device=device)
            t.irecv([y], peer, what=f"step {i}").wait()
            z = y * 2.0  # consumer compute on the receiving stream
        torch.cuda.current_stream().wait_stream(side)
        z.record_stream(torch.cuda.current_stream())
        bad += (z != produce(peer, i) * 2.0).sum()
    torch.cuda.synchronize()
    return {"bad": int(bad)}


def _scenario_views_and_collectives(t, rank, args):
    """Zero-copy views (more messages than slots), all_gather and broadcast."""
    seed, device, peer = args["seed"], t.device, 1 - rank
    bad = 0
    for i in range(3 * t.num_slots):
        shape, dtype = (37, 5 + i), [torch.float16, torch.bfloat16, torch.float32][i % 3]
        if rank == 0:
            t.isend([_fill(shape, dtype, seed + i, device)], 1, what=f"view {i}").wait()
        else:
            (v,), release = t.recv_views([(shape, dtype)], 0, what=f"view {i}")
            bad += int(_bytes_differ(v, _fill(shape, dtype, seed + i, device)))
            release()
    x = torch.full((3, 4), float(rank + 1), device=device)
    gathered = t.all_gather(x, what="gather")
    bad += int(sum((g != float(r + 1)).sum() for r, g in enumerate(gathered)))
    y = torch.full((5,), float(rank * 10), device=device)
    t.broadcast(y, 1, what="bcast")
    bad += int((y != 10.0).sum())
    torch.cuda.synchronize()
    return {"bad": bad, "gathered_len": len(gathered)}


def _scenario_mismatch(t, rank, args):
    """The receiver expects another dtype/shape of the same byte size: both sides must refuse."""
    from hybridiff_rt.errors import PeerTimeoutError, ShapeError

    if rank == 0:
        t.isend([torch.ones(4, 4, device=t.device)], 1, what="cbp/step 2").wait()
        time.sleep(0.5)  # the receiver refuses meanwhile
        try:
            for i in range(2 * t.num_slots):
                t.isend([torch.ones(4, 4, device=t.device)], 1, what=f"after {i}").wait()
        except (ShapeError, PeerTimeoutError) as exc:
            return {"sender_error": f"{type(exc).__name__}: {exc}"}
        return {"sender_error": None}
    try:
        t.irecv([torch.empty(4, 8, dtype=torch.float16, device=t.device)], 0,
                what="cbp/step 2").wait()
    except ShapeError as exc:
        return {"receiver_error": str(exc)}
    return {"receiver_error": None}


def _scenario_killed_peer(t, rank, args):
    """Rank 1 exchanges a few messages, then dies (SIGKILL); rank 0 must get PeerTimeoutError
    quickly on receive and on send, and close() must not hang."""
    from hybridiff_rt.errors import PeerTimeoutError

    peer = 1 - rank
    for i in range(3):
        x = torch.full((1000,), float(i), device=t.device)
        t.isend([x], peer, what=f"warm {i}").wait()
        t.irecv([torch.empty_like(x)], peer, what=f"warm {i}").wait()
    torch.cuda.synchronize()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    start = time.monotonic()
    errors = {}
    try:
        t.irecv([torch.empty(1000, device=t.device)], peer, what="after kill").wait()
    except PeerTimeoutError as exc:
        errors["recv"] = str(exc)
    errors["recv_s"] = time.monotonic() - start
    try:
        for i in range(2 * t.num_slots):
            t.isend([torch.zeros(1000, device=t.device)], peer, what=f"to dead {i}").wait()
    except PeerTimeoutError as exc:
        errors["send"] = str(exc)
    start = time.monotonic()
    t.close()
    errors["close_s"] = time.monotonic() - start
    return errors


def _scenario_setup_report(t, rank, args):
    """What the set-up decided: device (given as "cuda"), self-test notes, measured bandwidth."""
    return {"device": str(t.device), "notes": list(t.notes), "bytes_per_ms": t.bytes_per_ms,
            "staging": t.staging}


def _scenario_dropped_sends(t, rank, args):
    """Sends whose pending transfer and source tensor are dropped at once (no wait()), while the
    ring is full so the worker enqueues the copies later: the freed memory is reused and
    overwritten right away, yet the receiver must get the original contents."""
    from hybridiff_rt.comm.store import barrier

    n, count = args["numel"], args["count"]
    if rank == 0:
        for i in range(count):
            t.isend([torch.full((n,), float(i), device=t.device)], 1, what=f"drop {i}")
            junk = torch.full((n,), float("nan"), device=t.device)  # may reuse the freed block
            del junk
        barrier(t._store, "test/dropped_sends", 2, 60)
        return {}
    barrier(t._store, "test/dropped_sends", 2, 60)  # every send was posted before any receive
    bad = torch.zeros((), dtype=torch.int64, device=t.device)
    for i in range(count):
        y = torch.empty(n, device=t.device)
        t.irecv([y], 0, what=f"drop {i}").wait()
        bad += (y != float(i)).sum()
    return {"bad": int(bad)}


def _scenario_killed_with_copies_outstanding(t, rank, args):
    """Rank 1 receives while its stream is blocked (a long sleep kernel before the copy-outs),
    then dies: its free events never fire, so rank 0's copy stream waits on them forever. Rank 0's
    sends must fail and close() must return soon, not hang in a CUDA synchronize."""
    from hybridiff_rt.errors import PeerTimeoutError

    nbytes = t.slot_bytes
    if rank == 1:
        _gpu_sleep(10e6)  # 10 s
        for i in range(2):
            t.irecv([torch.empty(nbytes, dtype=torch.uint8, device=t.device)], 0,
                    what=f"m{i}").wait()
        os.kill(os.getpid(), signal.SIGKILL)
    pending = [t.isend([torch.full((nbytes,), i % 256, dtype=torch.uint8, device=t.device)], 1,
                       what=f"m{i}") for i in range(40)]  # > 32: completion marks get reused
    time.sleep(1.0)
    out = {}
    start = time.monotonic()
    try:
        for p in pending:
            p.wait()
    except PeerTimeoutError as exc:
        out["send"] = str(exc)
    out["send_s"] = time.monotonic() - start
    start = time.monotonic()
    t.close()
    out["close_s"] = time.monotonic() - start
    return out


def _scenario_host_staging_overlap(t, rank, args):
    """Host staging, a boundary larger than the ring: the receiver posts irecv and computes for
    a while before wait() (as the pipeline does); the sender's whole message must still go out
    meanwhile (the engine drains the ring as it arrives), and the content must be right."""
    from hybridiff_rt.comm.store import barrier

    n = args["nbytes"]
    seed = args["seed"]
    if rank == 0:
        barrier(t._store, "test/overlap_posted", 2, 60)
        start = time.monotonic()
        t.isend([_fill((n,), torch.uint8, seed, t.device)], 1, what="boundary").wait()
        torch.cuda.current_stream().synchronize()
        sent_s = time.monotonic() - start
        barrier(t._store, "test/overlap_sent", 2, 60)
        return {"sent_s": sent_s}
    y = torch.empty(n, dtype=torch.uint8, device=t.device)
    pending = t.irecv([y], 0, what="boundary")
    _gpu_sleep(3e6)  # "compute": 3 s
    barrier(t._store, "test/overlap_posted", 2, 60)
    barrier(t._store, "test/overlap_sent", 2, 60)  # the sender finished while we computed
    start = time.monotonic()
    pending.wait()
    bad = int(_bytes_differ(y, _fill((n,), torch.uint8, seed, t.device)))
    return {"bad": bad, "wait_s": time.monotonic() - start, "staging": t.staging}


# ------------------------------------------------------------------------------------------------
# tests


def test_ten_thousand_random_messages_both_directions():
    res = run_ranks("random_stream", count=10_000, max_bytes=1 << 20, slot_bytes=1 << 20)
    for rank, r in res.items():
        assert r["received_bytes"] > 0 and r["bad_bytes"] == 0, (rank, r)
        assert r["staging"] == {1 - rank: "device"}
    assert res[0]["bytes_sent"] == res[1]["received_bytes"]
    assert res[1]["bytes_sent"] == res[0]["received_bytes"]


def test_random_messages_through_host_staging():
    res = run_ranks("random_stream", count=500, max_bytes=3 << 20, slot_bytes=1 << 20,
                    staging="host")
    for rank, r in res.items():
        assert r["bad_bytes"] == 0 and r["staging"] == {1 - rank: "host"}, (rank, r)


def test_slow_consumer_is_never_overwritten():
    res = run_ranks("slow_consumer", count=60, nbytes=3 << 20, sleep_us=300.0,
                    slot_bytes=4 << 20, num_slots=2)
    assert res[1]["bad_bytes"] == 0


def test_interleaving_with_compute_on_other_streams():
    res = run_ranks("compute_interleave", count=300, numel=300_000)
    assert res[0]["bad"] == 0 and res[1]["bad"] == 0


def test_zero_copy_views_and_collectives():
    res = run_ranks("views_and_collectives")
    assert res[0]["bad"] == 0 and res[1]["bad"] == 0 and res[0]["gathered_len"] == 2


def test_mismatched_message_is_refused_naming_slot_and_sequence():
    res = run_ranks("mismatch", timeout_s=5.0)
    text = res[1]["receiver_error"]
    assert text and "refused sequence 1 in slot 0" in text and "cbp/step 2" in text, text
    assert "float32[4,4] (64 B)" in text and "float16[4,8] (64 B)" in text
    assert res[0]["sender_error"] and "refused sequence 1" in res[0]["sender_error"]


def test_killed_peer_raises_timeout_error_not_a_hang():
    res = run_ranks("killed_peer", expect=(0,), timeout_s=5.0)[0]
    assert "exited" in res.get("recv", ""), res
    assert res["recv_s"] < 3.0, res
    assert "send" in res, res
    assert res["close_s"] < 15.0, res


@pytest.mark.parametrize("staging", ["auto", "host"])
def test_setup_self_test_measures_the_link_and_resolves_cuda_to_the_current_device(staging):
    res = run_ranks("setup_report", device_arg="cuda", staging=staging)
    for rank, r in res.items():
        assert r["device"] == str(_device_for(rank)), r
        assert r["notes"][0].startswith("ipc self-test passed"), r
        assert r["notes"][1].startswith("ipc link measured at set-up"), r
        assert r["bytes_per_ms"] > 1e6, r  # faster than the 1 GB/s default guess
    assert res[0]["bytes_per_ms"] == res[1]["bytes_per_ms"]  # every rank plans alike


def test_dropped_sends_keep_their_sources_until_the_copy_is_enqueued():
    res = run_ranks("dropped_sends", count=24, numel=1 << 20, slot_bytes=1 << 20)
    assert res[1]["bad"] == 0


def test_peer_killed_with_copies_outstanding_does_not_hang_close():
    res = run_ranks("killed_with_copies_outstanding", expect=(0,), timeout_s=5.0,
                    slot_bytes=1 << 20)[0]
    assert "send" in res and res["send_s"] < 10.0, res
    assert res["close_s"] < 5.0, res


def test_host_staged_boundary_moves_while_the_receiver_computes():
    res = run_ranks("host_staging_overlap", staging="host", nbytes=48 << 20)
    assert res[1]["bad"] == 0 and res[1]["staging"] == {0: "host"}, res
    assert res[0]["sent_s"] < 2.5, res  # did not wait for the receiver's 3 s of compute
