"""Host-only tests of the IPC engine's protocol: slot ring, sequence state machine, message
packing and handle serialisation, driven from two real processes over POSIX shared memory.

No GPU needed: ``_C.SlotRing`` runs the same state machine as the CUDA engine (csrc/slot_ring.h,
csrc/message.h) with host memcpy standing in for the device copies. With
HYBRIDIFF_RT_FAKE_CUDA_TESTS=1 the engine itself runs against a fake CUDA runtime (bounded
shutdown, posted receives, ..., and every-peer traffic on three and four processes). The set-up
logic of comm/ipc.py that needs no GPU (ring planning, the /dev/shm check, the self-test's
patterns, checksums and verdicts, the collective decisions with a stand-in engine) and
bench/transport.py's targets are tested here too.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import secrets
import signal
import threading
import time
import types

import numpy as np
import pytest
import torch

from hybridiff_rt import env
from hybridiff_rt.comm import ipc
from hybridiff_rt.errors import CudaUnavailableError, ExtensionError, PeerTimeoutError

_C = pytest.importorskip("hybridiff_rt._C", reason="extension not built: pip install -e .")

CTX = mp.get_context("fork")
DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "int64": 8, "uint8": 1}


def shm_name(tag: str) -> str:
    return f"/hdrt_test_{tag}_{os.getpid()}_{secrets.token_hex(4)}"


def random_message(rng: np.random.Generator, max_elems: int = 600):
    """[(dtype, shape, payload bytes)] with 1-4 tensors, some empty, sizes not multiples of 256."""
    out = []
    for _ in range(int(rng.integers(1, 5))):
        dtype = list(DTYPES)[int(rng.integers(len(DTYPES)))]
        ndim = int(rng.integers(0, 4))
        shape = [int(rng.integers(0, 12)) for _ in range(ndim)]
        numel = int(np.prod(shape)) if shape else 1
        if numel > max_elems:
            shape, numel = [max_elems], max_elems
        out.append((dtype, shape, rng.bytes(numel * DTYPES[dtype])))
    return out


def specs_of(msg):
    return [(d, s, len(b)) for d, s, b in msg]


def run_child(target, *args):
    """Start ``target(conn, *args)`` in a forked process; returns (process, parent end)."""
    parent, child = CTX.Pipe()
    proc = CTX.Process(target=target, args=(child, *args), daemon=True)
    proc.start()
    child.close()
    return proc, parent


def finish(proc, conn, timeout=20.0):
    """The child's result (read before join), re-raising its error text."""
    assert conn.poll(timeout), "child process did not report"
    status, value = conn.recv()
    proc.join(5)
    assert status == "ok", value
    return value


def _guard(conn, fn):
    try:
        conn.send(("ok", fn()))
    except BaseException as exc:  # report, never hang the parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


# ------------------------------------------------------------------------------------------------
# message packing


def test_plan_covers_every_byte_once_with_aligned_tensors():
    rng = np.random.default_rng(secrets.randbits(32))
    for _ in range(200):
        msg = random_message(rng, max_elems=3000)
        slot_bytes = 256 * int(rng.integers(1, 40))
        plan = _C.plan_message(specs_of(msg), slot_bytes)
        offsets = plan["tensor_offsets"]
        assert all(o % _C.TENSOR_ALIGN == 0 for o in offsets)
        assert plan["payload_bytes"] == sum(len(b) for *_, b in msg)
        covered = [np.zeros(len(b), dtype=np.int32) for *_, b in msg]
        expected_offset = 0
        for offset, nbytes, segments in plan["chunks"]:
            assert offset == expected_offset and 0 <= nbytes <= slot_bytes
            expected_offset += slot_bytes
            for tensor, t_off, s_off, n in segments:
                assert s_off + n <= nbytes
                assert offsets[tensor] + t_off == offset + s_off  # packed position agrees
                covered[tensor][t_off:t_off + n] += 1
        assert all((c == 1).all() for c in covered)
        assert len(plan["chunks"]) == max(1, -(-plan["total_bytes"] // slot_bytes))


def test_plan_refuses_bad_geometry_and_too_many_tensors():
    with pytest.raises(_C.ProtocolError, match="multiple of 256"):
        _C.plan_message([("float32", [4], 16)], 1000)
    with pytest.raises(_C.ProtocolError, match="at most 64 tensors"):
        _C.plan_message([("float32", [1], 4)] * 65, 4096)
    with pytest.raises(_C.ProtocolError, match="dimensions"):
        _C.plan_message([("float32", [1] * 9, 4)], 4096)


# ------------------------------------------------------------------------------------------------
# two processes, many messages, both directions at once


def _peer_stream(conn, name_in, name_out, seed, count, send_first_seed):
    """Receive `count` messages on name_in (checking contents) while a thread sends `count` on
    name_out."""

    def body():
        rx = _C.SlotRing.open(name_in, "receiver", 10000)
        tx = _C.SlotRing.open(name_out, "sender", 10000)
        errors = []

        def sender():
            try:
                rng = np.random.default_rng(send_first_seed)
                for i in range(count):
                    tx.send(random_message(rng), f"msg {i}")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=sender)
        t.start()
        rng = np.random.default_rng(seed)
        for i in range(count):
            msg = random_message(rng)
            got, _ = rx.recv(specs_of(msg), f"msg {i}")
            for (_, _, want), have in zip(msg, got):
                if bytes(have) != want:
                    raise AssertionError(f"message {i}: payload differs")
        t.join()
        if errors:
            raise errors[0]
        return rx.next_seq - 1

    _guard(conn, body)


def test_random_messages_both_directions_with_wraparound_and_chunking():
    base = secrets.randbits(32)
    seed_a, seed_b, count = base, base + 1, 400
    # 3 slots of 512 B: most messages span several slots, the ring wraps hundreds of times.
    a_to_b = _C.SlotRing.create(shm_name("ab"), "sender", 3, 512, 10000)
    b_to_a = _C.SlotRing.create(shm_name("ba"), "receiver", 3, 512, 10000)
    proc, conn = run_child(_peer_stream, a_to_b.name, b_to_a.name, seed_a, count, seed_b)
    errors = []

    def sender():
        try:
            rng = np.random.default_rng(seed_a)
            for i in range(count):
                a_to_b.send(random_message(rng), f"msg {i}")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=sender)
    t.start()
    rng = np.random.default_rng(seed_b)
    for i in range(count):
        msg = random_message(rng)
        got, _ = b_to_a.recv(specs_of(msg), f"msg {i}")
        assert [bytes(g) for g in got] == [b for *_, b in msg], f"message {i} differs"
    t.join()
    assert not errors, errors
    seqs_seen_by_child = finish(proc, conn)
    assert seqs_seen_by_child == a_to_b.next_seq - 1 > 3 * count // 2  # chunked, wrapped
    assert a_to_b.posted == a_to_b.released == seqs_seen_by_child
    a_to_b.close()
    b_to_a.close()


# ------------------------------------------------------------------------------------------------
# back-pressure: a slow consumer is never overwritten


def _slow_consumer(conn, name, hold_s, nbytes):
    def body():
        rx = _C.SlotRing.open(name, "receiver", 10000)
        (first,), seqs = rx.recv([("uint8", [nbytes], nbytes)], "first", hold=True)
        time.sleep(hold_s)  # the sender is blocked on slot 0 meanwhile
        slot0 = rx.slot_data(0)[:nbytes]
        released_at = time.monotonic()
        rx.release_held()
        rest = [bytes(rx.recv([("uint8", [nbytes], nbytes)], f"m{i}")[0][0]) for i in range(3)]
        return bytes(first), slot0, released_at, rest, seqs

    _guard(conn, body)


def test_sender_waits_for_slow_consumer_and_never_overwrites_its_slot():
    nbytes, slots = 1024, 2
    rng = np.random.default_rng(secrets.randbits(32))
    payloads = [rng.bytes(nbytes) for _ in range(4)]
    tx = _C.SlotRing.create(shm_name("bp"), "sender", slots, nbytes, 10000)
    proc, conn = run_child(_slow_consumer, tx.name, 0.4, nbytes)
    for p in payloads[:slots]:  # fill the ring
        tx.send([("uint8", [nbytes], p)])
    tx.send([("uint8", [nbytes], payloads[2])])  # needs slot 0 back: blocks until released
    returned_at = time.monotonic()
    tx.send([("uint8", [nbytes], payloads[3])])
    first, slot0, released_at, rest, seqs = finish(proc, conn)
    assert seqs == [1]
    assert first == payloads[0]
    assert slot0 == payloads[0], "the sender overwrote a slot the receiver still held"
    assert returned_at >= released_at, "send returned before the receiver released the slot"
    assert rest == payloads[1:]


def test_full_ring_without_a_reader_times_out_naming_the_sequence():
    tx = _C.SlotRing.create(shm_name("full"), "sender", 2, 256, 150)
    tx.check_pid = False  # no receiver attached at all
    for _ in range(2):
        tx.send([("uint8", [8], b"x" * 8)])
    start = time.monotonic()
    with pytest.raises(_C.PeerTimeout, match=r"release sequence 1 \(slot 0\) before writing "
                                              r"sequence 3.*within 150 ms"):
        tx.send([("uint8", [8], b"y" * 8)])
    assert 0.14 < time.monotonic() - start < 2.0


# ------------------------------------------------------------------------------------------------
# refusals: sequence, size, dtype


def test_receiver_refuses_a_slot_holding_the_wrong_sequence():
    tx = _C.SlotRing.create(shm_name("seq"), "sender", 4, 256, 2000)
    rx = _C.SlotRing.open(tx.name, "receiver", 2000)
    tx.send([("float32", [2], np.arange(2, dtype=np.float32).tobytes())])
    tx._forge_slot_seq(0, 99)
    with pytest.raises(_C.ProtocolError, match="slot 0 holds sequence 99 but sequence 1 was expected"):
        rx.recv([("float32", [2], 8)], "step 0")
    with pytest.raises(_C.PeerTimeout, match="slot 0 holds sequence 99"):  # the sender hears of it
        tx.send([("float32", [2], b"\0" * 8)])


@pytest.mark.parametrize("case", ["dtype", "shape", "size", "count"])
def test_mismatched_messages_are_refused_on_both_sides(case):
    tx = _C.SlotRing.create(shm_name("mm"), "sender", 4, 1024, 2000)
    rx = _C.SlotRing.open(tx.name, "receiver", 2000)
    good = ("float32", [4, 4], 64)
    tx.send([("uint8", [8], b"a" * 8)], "warm-up")
    rx.recv([("uint8", [8], 8)], "warm-up")
    tx.send([(good[0], good[1], os.urandom(64))], "cbp/step 3")
    want = {"dtype": [("float16", [4, 8], 64)], "shape": [("float32", [16], 64)],
            "size": [("float32", [4, 5], 80)], "count": [good, good]}[case]
    with pytest.raises(_C.MessageMismatch) as info:
        rx.recv(want, "cbp/step 3")
    text = str(info.value)
    assert "refused sequence 2 in slot 1" in text
    assert "float32[4,4] (64 B)" in text and "cbp/step 3" in text
    with pytest.raises(_C.MessageMismatch, match="refused sequence 2"):
        tx.send([good[:2] + (os.urandom(64),)], "next")


# ------------------------------------------------------------------------------------------------
# liveness: timeouts, exits, clean closes


def test_receiver_times_out_when_the_sender_stops_advancing():
    rx = _C.SlotRing.create(shm_name("to"), "receiver", 2, 256, 200)
    tx = _C.SlotRing.open(rx.name, "sender", 200)
    tx.send([("uint8", [4], b"abcd")])
    rx.recv([("uint8", [4], 4)])
    start = time.monotonic()
    with pytest.raises(_C.PeerTimeout, match=r"waits for sequence 2 \(slot 1, 'step 1'\).*within 200 ms"):
        rx.recv([("uint8", [4], 4)], "step 1")
    assert 0.19 < time.monotonic() - start < 2.0


def _attach_and_sleep(conn, name):
    tx = _C.SlotRing.open(name, "sender", 60000)
    tx.send([("uint8", [4], b"live")])
    conn.send(("ok", os.getpid()))
    time.sleep(60)


def test_killed_peer_is_detected_long_before_the_timeout():
    rx = _C.SlotRing.create(shm_name("kill"), "receiver", 2, 256, 30000)
    proc, conn = run_child(_attach_and_sleep, rx.name)
    assert conn.poll(10)
    conn.recv()
    assert bytes(rx.recv([("uint8", [4], 4)])[0][0]) == b"live"
    os.kill(proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(_C.PeerTimeout, match=rf"peer process \(pid {proc.pid}\) exited"):
        rx.recv([("uint8", [4], 4)], "after kill")  # the child is a zombie until joined
    assert time.monotonic() - start < 2.0
    proc.join(5)


def test_clean_close_of_the_peer_ends_a_wait():
    rx = _C.SlotRing.create(shm_name("close"), "receiver", 2, 256, 30000)
    tx = _C.SlotRing.open(rx.name, "sender", 30000)
    threading.Timer(0.1, tx.close).start()
    with pytest.raises(_C.PeerTimeout, match="closed the channel"):
        rx.recv([("uint8", [4], 4)])


def test_one_sender_per_channel_and_segment_removed_on_close():
    name = shm_name("own")
    rx = _C.SlotRing.create(name, "receiver", 2, 256)
    tx = _C.SlotRing.open(name, "sender")
    with pytest.raises(_C.ProtocolError, match="already attached"):
        _C.SlotRing.open(name, "sender")
    with pytest.raises(_C.ProtocolError, match="stale segment"):
        _C.SlotRing.create(name, "receiver", 2, 256)
    assert os.path.exists("/dev/shm" + name)
    rx.unlink()  # the engine unlinks once both ends are attached: nothing leaks on a crash
    assert not os.path.exists("/dev/shm" + name)
    tx.send([("uint8", [3], b"abc")])  # the mapping still works
    assert bytes(rx.recv([("uint8", [3], 3)])[0][0]) == b"abc"
    with pytest.raises(_C.ProtocolError, match="not a hybridiff_rt slot ring|shm_open"):
        _C.SlotRing.open(name, "sender")


def test_creator_removes_the_name_when_destroyed():
    name = shm_name("del")
    ring = _C.SlotRing.create(name, "receiver", 2, 256)
    assert os.path.exists("/dev/shm" + name)
    del ring
    assert not os.path.exists("/dev/shm" + name)


# ------------------------------------------------------------------------------------------------
# handle serialisation


def random_exports(rng: np.random.Generator):
    out = []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(1, 9))
        out.append({
            "src_rank": int(rng.integers(0, 8)), "dst_rank": int(rng.integers(0, 8)),
            "side": ["sender", "receiver"][int(rng.integers(2))],
            "staging": ["device", "host"][int(rng.integers(2))],
            "num_slots": n, "slot_bytes": 256 * int(rng.integers(1, 1 << 20)),
            "pid": int(rng.integers(1, 1 << 22)), "shm_name": f"/hdrt_{rng.integers(1 << 30)}",
            "mem_handle": rng.bytes(64) if rng.integers(2) else b"",
            "event_handles": [rng.bytes(64) for _ in range(n)],
        })
    return out


def test_handle_blob_round_trip():
    rng = np.random.default_rng(secrets.randbits(32))
    for _ in range(50):
        entries = random_exports(rng)
        assert _C.decode_exports(_C.encode_exports(entries)) == entries


def test_handle_blob_corruption_is_detected():
    rng = np.random.default_rng(secrets.randbits(32))
    blob = bytearray(_C.encode_exports(random_exports(rng)))
    for _ in range(20):
        bad = bytearray(blob)
        i = int(rng.integers(8, len(bad)))
        bad[i] ^= 1 + int(rng.integers(255))
        with pytest.raises(_C.ProtocolError, match="checksum|version|invalid|too|wrong|trailing|truncated"):
            _C.decode_exports(bytes(bad))
    with pytest.raises(_C.ProtocolError, match="truncated|checksum"):
        _C.decode_exports(bytes(blob[:-9]))
    with pytest.raises(_C.ProtocolError, match="bad magic"):
        _C.decode_exports(b"XXXXXXXX" + bytes(blob[8:]))
    with pytest.raises(_C.ProtocolError, match="64 bytes"):
        _C.encode_exports([dict(random_exports(rng)[0], mem_handle=b"short")])


# ------------------------------------------------------------------------------------------------
# The CUDA engine's host logic against a fake CUDA runtime (csrc/testing/fake_cudart.cpp): "device"
# memory is shared memory, copies are synchronous, events inert. Opt-in because it compiles a
# second module (about a minute on 2 cores): HYBRIDIFF_RT_FAKE_CUDA_TESTS=1 pytest tests/test_ipc_host.py

FAKE = env.read("HYBRIDIFF_RT_FAKE_CUDA_TESTS") == "1"


@pytest.fixture(scope="module")
def fake_c():
    if not FAKE:
        pytest.skip("set HYBRIDIFF_RT_FAKE_CUDA_TESTS=1 to build and test the engine against a "
                    "fake CUDA runtime")
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    import pybind11

    root = Path(__file__).resolve().parent.parent
    build = root / "build" / f"fake-cuda-py{sys.version_info[0]}{sys.version_info[1]}"
    out = build / "module"
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), "-DHYBRIDIFF_RT_FAKE_CUDA=ON",
                    f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    path = next(out.glob("_C*.so"))
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.build_info()["cuda_version"] == "fake"
    yield module
    _remove_segments_of_dead_processes()


def _remove_segments_of_dead_processes() -> None:
    """Delete the fake runtime's /dev/shm segments (``hdrt_fakedev_<pid>_...``) and the test
    engines' rings (``hdrt_fk<pid>_...``) whose creating process is gone: a test process that
    dies (on purpose, in the fault tests) cannot free its fake device memory itself."""
    import re
    from pathlib import Path

    shm = Path("/dev/shm")
    if not shm.is_dir():
        return
    for entry in shm.iterdir():
        found = re.match(r"hdrt_(?:fakedev_|fk)(\d+)_", entry.name)
        if found is None:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            entry.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _ref(a: np.ndarray):
    return (a.ctypes.data, a.nbytes, str(a.dtype), list(a.shape))


def _fake_engine(c, rank, conn, slots=4, slot_bytes=4096, timeout_ms=3000, staging="device"):
    eng = c.Engine(rank, 2, 0, slots, slot_bytes, timeout_ms,
                   f"/hdrt_fk{os.getpid()}_{secrets.token_hex(3)}", [int(staging == "host")] * 2)
    conn.send(eng.export_handles())
    eng.connect(1 - rank, conn.recv(), True)
    conn.send("connected")
    conn.recv()
    eng.unlink_shm()
    return eng


def _fake_arrays(rng, max_elems=3000):
    out = []
    for _ in range(int(rng.integers(1, 4))):
        dt = [np.float16, np.float32, np.int64, np.uint8][int(rng.integers(4))]
        n = int(rng.integers(0, max_elems))
        out.append(rng.integers(0, 255, size=n * np.dtype(dt).itemsize, dtype=np.uint8).view(dt))
    return out


def _fake_stream(c, rank, conn, seed, count):
    eng = _fake_engine(c, rank, conn)
    send_rng, recv_rng = np.random.default_rng(seed + rank), np.random.default_rng(seed + 1 - rank)
    keep, bad = [], 0
    for i in range(count):
        msg = _fake_arrays(send_rng)
        keep.append((eng.send(1 - rank, [_ref(a) for a in msg], f"m{i}", 0), msg))
        want = _fake_arrays(recv_rng)
        bufs = [np.empty_like(w) for w in want]
        eng.recv(1 - rank, [_ref(b) for b in bufs], f"m{i}", 0)
        bad += sum(int((b.view(np.uint8) != w.view(np.uint8)).sum()) for b, w in zip(bufs, want))
        if len(keep) > 40:
            eng.wait_sent(1 - rank, keep.pop(0)[0], 0)
    for ticket, _ in keep:
        eng.wait_sent(1 - rank, ticket, 0)
    sent = eng.bytes_sent(1 - rank)
    assert eng.quiesce(2000)
    eng.close()
    return bad, sent


def _fake_both_send_more_than_the_ring_first(c, rank, conn):
    eng = _fake_engine(c, rank, conn, slots=2, slot_bytes=1024)
    a = np.full(10000, rank, np.uint8)
    ticket = eng.send(1 - rank, [_ref(a)], "big", 0)  # 10 chunks, ring holds 2: worker thread
    b = np.empty(10000, np.uint8)
    eng.recv(1 - rank, [_ref(b)], "big", 0)
    eng.wait_sent(1 - rank, ticket, 0)
    eng.close()
    return bool((b == 1 - rank).all())


def _fake_views_and_mismatch(c, rank, conn):
    import ctypes

    eng = _fake_engine(c, rank, conn)
    seen = []
    for i in range(10):  # more views than slots
        if rank == 0:
            a = np.arange(100, dtype=np.float32) + i
            eng.wait_sent(1, eng.send(1, [_ref(a)], f"v{i}", 0), 0)
        else:
            (ptr,) = eng.recv_view(0, [("float32", [100], 400)], f"v{i}", 0)
            seen.append(float(np.ctypeslib.as_array((ctypes.c_float * 100).from_address(ptr))[i % 100]))
            eng.release_view(0, 0)
    if rank == 0:
        a = np.ones((4, 4), np.float32)
        eng.send(1, [_ref(a)], "step 2", 0)
        time.sleep(0.3)
        try:
            for i in range(10):
                eng.wait_sent(1, eng.send(1, [_ref(a)], f"after {i}", 0), 0)
        except c.MessageMismatch as exc:
            return str(exc)
        return None
    try:
        eng.recv(0, [_ref(np.empty((4, 8), np.float16))], "step 2", 0)
    except c.MessageMismatch as exc:
        return seen, str(exc)
    return seen, None


def _fake_child(out, c, fn, rank, conn, args):
    _guard(out, lambda: fn(c, rank, conn, *args))


def _fake_run(c, fn, *args):
    """Run ``fn(c, rank, conn, *args)`` on ranks 0 and 1 (forked); returns [result 0, result 1]."""
    results = _fake_run_expecting(c, fn, (0, 1), *args)
    return [results[0], results[1]]


def test_fake_engine_random_stream_both_directions(fake_c):
    (bad0, sent0), (bad1, sent1) = _fake_run(fake_c, _fake_stream, secrets.randbits(31), 1500)
    assert bad0 == bad1 == 0 and sent0 > 0 and sent1 > 0


def test_fake_engine_does_not_deadlock_when_both_send_large_messages_first(fake_c):
    assert _fake_run(fake_c, _fake_both_send_more_than_the_ring_first) == [True, True]


def test_fake_engine_views_and_mismatch(fake_c):
    sender_error, (seen, receiver_error) = _fake_run(fake_c, _fake_views_and_mismatch)
    assert seen == [float(2 * i) for i in range(10)]
    assert "refused sequence 11 in slot 2" in receiver_error and "float16[4,8]" in receiver_error
    assert sender_error and "refused sequence 11" in sender_error


def _fake_run_expecting(c, fn, expect, *args, timeout=60):
    """Run ``fn(c, rank, conn, *args)`` on ranks 0 and 1; {rank: result} of the ranks in
    ``expect`` (the others may be killed on purpose; they are ended afterwards)."""
    a, b = CTX.Pipe()
    procs, outs = [], []
    for rank, conn in ((0, a), (1, b)):
        proc, out = run_child(_fake_child, c, fn, rank, conn, args)
        procs.append(proc)
        outs.append(out)
    results = {r: finish(procs[r], outs[r], timeout) for r in expect}
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return results


def _fake_world_rank(out, c, rank, world, hub, staging, seed, count):
    """One rank of a ``world``-rank fake engine. Handles travel through ``hub`` (a pipe to the
    test process, which hands every rank all of them: no store server, so the test process
    forks its ranks without threads of its own); then every rank sends ``count`` random messages
    to every peer (all its sends of a round before its receives, so the rings fill and the
    worker threads carry the rest) and checks every byte it receives."""

    def body():
        eng = c.Engine(rank, world, 0, 3, 2048, 5000,
                       f"/hdrt_fk{os.getpid()}_{secrets.token_hex(3)}",
                       [int(staging == "host")] * world)
        hub.send(eng.export_handles())
        blobs = hub.recv()
        peers = [p for p in range(world) if p != rank]
        for p in peers:
            eng.connect(p, blobs[p], True)
        hub.send("connected")
        hub.recv()  # every rank has connected
        eng.unlink_shm()

        def message(src, dst, i):
            return _fake_arrays(np.random.default_rng([seed, src, dst, i]), max_elems=2000)

        outstanding, bad = [], 0
        for i in range(count):
            for p in peers:
                msg = message(rank, p, i)
                outstanding.append((p, eng.send(p, [_ref(a) for a in msg], f"m{i}", 0), msg))
            for p in rng_order(peers, seed + rank + i):
                want = message(p, rank, i)
                bufs = [np.empty_like(w) for w in want]
                eng.recv(p, [_ref(b) for b in bufs], f"m{i}", 0)
                bad += sum(int((b.view(np.uint8) != w.view(np.uint8)).sum())
                           for b, w in zip(bufs, want))
            while len(outstanding) > 30:
                p, ticket, _ = outstanding.pop(0)
                eng.wait_sent(p, ticket, 0)
        for p, ticket, _ in outstanding:
            eng.wait_sent(p, ticket, 0)
        sent = {p: eng.bytes_sent(p) for p in peers}
        expected = {p: sum(a.nbytes for i in range(count) for a in message(rank, p, i))
                    for p in peers}
        assert eng.quiesce(5000)
        hub.send("done")
        hub.recv()  # no engine closes while a peer still reads
        eng.close()
        return bad, sent, expected

    _guard(out, body)


def rng_order(items, seed):
    """``items`` in a random order drawn from ``seed`` (each rank receives from its peers in its
    own order)."""
    order = list(items)
    np.random.default_rng(seed).shuffle(order)
    return order


def _hub_round(hubs, outs, expect=None, reply=None, timeout=60.0):
    """Receive one message from every rank's hub pipe (each equal to ``expect`` when given), then
    send each rank ``reply`` (default: the list of what the ranks sent). A rank that reports
    (``outs``: its result pipe) instead of reaching the hub failed: its error fails the test at
    once."""
    from multiprocessing.connection import wait

    got = []
    for rank, (hub, out) in enumerate(zip(hubs, outs)):
        ready = wait([hub, out], timeout)
        assert ready, f"rank {rank} did not reach the hub within {timeout:g} s"
        if hub not in ready:
            status, value = out.recv()
            raise AssertionError(f"rank {rank} ended early ({status}): {value}")
        got.append(hub.recv())
        assert expect is None or got[-1] == expect, (rank, got[-1])
    for hub in hubs:
        hub.send(got if reply is None else reply)


@pytest.mark.parametrize("world, staging", [(3, "device"), (4, "device"), (4, "host")])
def test_fake_engine_on_more_than_two_ranks_delivers_every_message_to_every_peer(
        fake_c, world, staging):
    seed, count = secrets.randbits(31), 120
    pipes = [CTX.Pipe() for _ in range(world)]
    runs = [run_child(_fake_world_rank, fake_c, rank, world, pipes[rank][1], staging, seed, count)
            for rank in range(world)]
    hubs, outs = [mine for mine, _ in pipes], [out for _, out in runs]
    try:
        _hub_round(hubs, outs)  # handles
        _hub_round(hubs, outs, "connected", "go")
        _hub_round(hubs, outs, "done", "close", timeout=120)
        results = [finish(proc, out, timeout=60) for proc, out in runs]
    finally:
        for proc, _ in runs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
    for rank, (bad, sent, expected) in enumerate(results):
        assert bad == 0, (rank, bad)
        assert sent == expected and all(v > 0 for v in sent.values()), (rank, sent, expected)


def _fake_peer_dies_with_sends_outstanding(c, rank, conn, path):
    """Rank 0's worker is waiting for a completion mark on a 'GPU' that never finishes (stuck
    mode: a dead peer's IPC events never fire) when rank 1 is killed; close() must return."""
    eng = _fake_engine(c, rank, conn, timeout_ms=30000)
    msg = np.arange(1000, dtype=np.int32).view(np.uint8)[:1000]
    buf = np.empty_like(msg)
    if rank == 1:
        for i in range(33):
            eng.recv(0, [_ref(buf)], f"m{i}", 0)
        conn.send(os.getpid())
        conn.recv()  # rank 0 is stuck now
        if path == "worker":
            eng.recv(0, [_ref(buf)], "m33", 0)  # frees a slot: rank 0's worker issues ticket 38
        conn.send("ready")
        time.sleep(60)  # killed by rank 0
        return None
    tickets = [eng.send(1, [_ref(msg)], f"m{i}", 0) for i in range(33)]  # 33 reuses mark 1
    peer_pid = conn.recv()  # all 33 received
    if path == "worker":
        tickets += [eng.send(1, [_ref(msg)], f"m{33 + i}", 0) for i in range(4)]  # ring full
        tickets.append(eng.send(1, [_ref(msg)], "m37", 0))  # queued: the worker issues it
    c._fake_set_stuck(True)
    conn.send("go")
    conn.recv()
    if path == "worker":
        time.sleep(0.2)  # the worker is in the completion-mark wait of ticket 38 now
    os.kill(peer_pid, signal.SIGKILL)
    out = {"settled_before": eng.settled(1), "last_ticket": tickets[-1]}
    if path == "inline":  # ticket 34 reuses mark 2 on the caller's thread
        start = time.monotonic()
        try:
            eng.send(1, [_ref(msg)], "after kill", 0)
        except c.PeerTimeout as exc:
            out["send_error"] = str(exc)
        out["send_s"] = time.monotonic() - start
    start = time.monotonic()
    eng.close()
    out["close_s"] = time.monotonic() - start
    out["counters"] = c._fake_counters()
    out["settled_after"] = eng.settled(1)
    return out


@pytest.mark.parametrize("path", ["worker", "inline"])
def test_fake_engine_close_returns_when_the_peer_died_with_sends_outstanding(fake_c, path):
    out = _fake_run_expecting(fake_c, _fake_peer_dies_with_sends_outstanding, (0,), path)[0]
    assert out["close_s"] < 5.0, out  # timeout_ms is 30 s (cap 10 s): liveness ended the drain
    counters = out["counters"]
    assert counters.get("cudaEventSynchronize", 0) == 0, counters  # never blocks in the driver
    # the copy stream never drained: the peer's mapped slots are leaked, not closed under it
    assert counters.get("cudaIpcCloseMemHandle", 0) == 0 and counters.get("cudaFree", 0) == 0
    assert out["settled_after"] == out["last_ticket"] + (path == "inline")
    if path == "inline":
        assert "exited while copies to or from it were outstanding" in out["send_error"], out
        assert out["send_s"] < 5.0, out
    else:
        assert out["settled_before"] == out["last_ticket"] - 1  # ticket 38 was in the mark wait


def _fake_receiver_drains_before_freeing(c, rank, conn, how):
    """Rank 1 received a message whose copy-out 'still runs' on its (the consumer's) stream, and
    closes or drops its engine: both must wait for the copy-out, bounded, and leak the slots
    instead of freeing them under it."""
    import gc

    eng = _fake_engine(c, rank, conn, timeout_ms=700)
    data = np.arange(3000, dtype=np.uint8)
    if rank == 0:
        eng.wait_sent(1, eng.send(1, [_ref(data)], "x", 0), 0)
        conn.recv()  # rank 1 is done
        eng.close()
        return None
    buf = np.empty_like(data)
    eng.recv(0, [_ref(buf)], "x", 0)
    c._fake_set_stuck(True, streams=False)  # the engine's copy streams are idle
    start = time.monotonic()
    if how == "close":
        eng.close()
    else:  # the garbage-collection path: the destructor closes (and drains) too
        del eng
        gc.collect()
    elapsed = time.monotonic() - start
    c._fake_set_stuck(False)
    leaked = c._fake_counters()
    conn.send("done")
    return elapsed, leaked, bool((buf == data).all())


@pytest.mark.parametrize("how", ["close", "destructor"])
def test_fake_engine_drains_the_copies_out_of_its_slots_before_freeing_them(fake_c, how):
    _, (elapsed, counters, ok) = _fake_run(fake_c, _fake_receiver_drains_before_freeing, how)
    assert ok
    assert 0.6 < elapsed < 5.0, elapsed  # waited for the copy-out up to the limit (0.7 s) ...
    assert counters.get("cudaFree", 0) == 0, counters  # ... then leaked the slots, not freed


def test_fake_engine_frees_its_slots_after_a_clean_close(fake_c):
    def body(c, rank, conn):
        eng = _fake_engine(c, rank, conn)
        data = np.arange(100, dtype=np.uint8)
        buf = np.empty_like(data)
        ticket = eng.send(1 - rank, [_ref(data)], "x", 0)
        eng.recv(1 - rank, [_ref(buf)], "x", 0)
        eng.wait_sent(1 - rank, ticket, 0)
        assert eng.quiesce(2000)
        conn.send("closing")
        conn.recv()
        start = time.monotonic()
        eng.close()
        return time.monotonic() - start, c._fake_counters()

    for elapsed, counters in _fake_run(fake_c, _fake_call, body):
        assert elapsed < 1.0
        assert counters.get("cudaFree", 0) >= 1 and counters.get("cudaIpcCloseMemHandle", 0) >= 1
        assert counters.get("cudaStreamDestroy", 0) == 0  # copy streams outlive the engine


def _fake_call(c, rank, conn, body):
    return body(c, rank, conn)


def _fake_settled_tickets(c, rank, conn):
    eng = _fake_engine(c, rank, conn, slots=4, slot_bytes=1024)
    msg = np.ones(2500, np.uint8)  # 3 chunks; the ring holds 4
    if rank == 1:
        conn.recv()
        buf = np.empty_like(msg)
        for i in range(3):
            eng.recv(0, [_ref(buf)], f"m{i}", 0)
        conn.send("received")
        return None
    tickets = [eng.send(1, [_ref(msg)], f"m{i}", 0) for i in range(3)]
    settled_early = eng.settled(1)  # ticket 1 went inline, 2 and 3 wait for room
    conn.send("go")
    conn.recv()
    eng.wait_sent(1, tickets[-1], 0)
    return tickets, settled_early, eng.settled(1)


def test_fake_engine_settles_queued_sends_only_once_their_copies_are_enqueued(fake_c):
    (tickets, early, late), _ = _fake_run(fake_c, _fake_settled_tickets)
    assert tickets == [1, 2, 3] and early == 1 and late == 3


def _fake_abort_and_timeouts(c, rank, conn):
    eng = _fake_engine(c, rank, conn, timeout_ms=30000)
    small = np.empty(4, np.uint8)
    if rank == 1:
        eng.set_timeout(300)  # the transfer limit after a set-up under the handshake limit
        assert eng.timeout_ms == 300
        start = time.monotonic()
        try:
            eng.recv(0, [_ref(small)], "nothing comes", 0)
        except c.PeerTimeout as exc:
            timed_out = (time.monotonic() - start, str(exc))
        eng.set_timeout(30000)
        conn.send("waiting")  # now wait (up to 30 s) for rank 0's abort
        start = time.monotonic()
        try:
            eng.recv(0, [_ref(small)], "self-test", 0)
        except c.PeerTimeout as exc:
            return timed_out, (time.monotonic() - start, str(exc))
        return timed_out, None
    conn.recv()
    time.sleep(0.3)  # rank 1 is blocked in recv (limit 30 s)
    eng.abort("its IPC self-test found corrupted data")
    with pytest.raises(c.PeerTimeout, match="aborted"):
        eng.send(1, [_ref(small)], "after abort", 0)
    return None


def test_fake_engine_set_timeout_and_abort_end_the_peers_waits(fake_c):
    _, ((timeout_s, timeout_text), aborted) = _fake_run(fake_c, _fake_abort_and_timeouts)
    assert 0.25 < timeout_s < 2.0 and "within 300 ms" in timeout_text
    assert aborted is not None, "the abort did not reach the waiting peer"
    abort_s, text = aborted
    assert abort_s < 2.0 and "rank 0 aborted: its IPC self-test found corrupted data" in text



def _fake_posted_receive_drains_as_data_arrives(c, rank, conn):
    """Host staging, a 2-slot ring, a 10-chunk message: the sender finishes issuing all of it while
    the receiver's thread only posted the receive and waits for nothing (it drains the slots as
    chunks arrive, as the runtime's receive of the next step's boundary does)."""
    eng = _fake_engine(c, rank, conn, slots=2, slot_bytes=1024, staging="host")
    data = np.arange(10_000, dtype=np.uint32).view(np.uint8)[:10_000].copy()
    if rank == 1:
        buf = np.zeros_like(data)
        ticket = eng.post_recv(0, [_ref(buf)], "boundary", 0)
        conn.send("posted")
        conn.recv()  # rank 0 has issued every chunk: only possible if this rank drained them
        deadline = time.monotonic() + 5
        while eng.recv_settled(0) < ticket and time.monotonic() < deadline:
            time.sleep(0.005)  # the last chunks are drained without a wait_recv() too
        settled = eng.recv_settled(0)
        eng.wait_recv(0, ticket, 0)
        return ticket, settled, bool((buf == data).all())
    conn.recv()
    ticket = eng.send(1, [_ref(data)], "boundary", 0)
    eng.wait_sent(1, ticket, 0)  # fails after timeout_ms (3 s) if nobody drains the ring
    conn.send("sent")
    return eng.staging(1)


def test_fake_engine_posted_receive_drains_host_slots_without_waiting_for_wait(fake_c):
    staging, (ticket, settled, ok) = _fake_run(fake_c, _fake_posted_receive_drains_as_data_arrives)
    assert staging == "host" and ticket == 1 and settled == 1 and ok


def _fake_posted_receives_in_order(c, rank, conn):
    eng = _fake_engine(c, rank, conn, staging="host")
    msgs = [np.full((100,), i, np.float32) for i in range(3)]
    if rank == 0:
        conn.recv()
        try:  # the refusal of m1 may already reach the send of m2
            for i, m in enumerate(msgs):
                eng.send(1, [_ref(m)], f"m{i}", 0)
            for _ in range(10):
                eng.wait_sent(1, eng.send(1, [_ref(msgs[0])], "after", 0), 0)
                time.sleep(0.05)
        except c.MessageMismatch as exc:
            return str(exc)
        return None
    bufs = [np.zeros((100,), np.float32), np.zeros((10, 10), np.float32),
            np.zeros((100,), np.float32)]
    tickets = [eng.post_recv(0, [_ref(b)], f"m{i}", 0) for i, b in enumerate(bufs)]
    with pytest.raises(c.ProtocolError, match="while posted receives are pending"):
        eng.recv(0, [_ref(bufs[0])], "sync", 0)
    conn.send("posted")
    eng.wait_recv(0, tickets[0], 0)
    out = [float(bufs[0][0])]
    for t in tickets[1:]:
        try:
            eng.wait_recv(0, t, 0)
            out.append("no error")
        except c.MessageMismatch as exc:
            out.append(str(exc))
    return out, eng.recv_settled(0)


def test_fake_engine_posted_receives_complete_in_order_and_refuse_mismatches(fake_c):
    sender_error, (out, settled) = _fake_run(fake_c, _fake_posted_receives_in_order)
    assert out[0] == 0.0 and settled == 3
    assert "refused sequence 2" in out[1] and "float32[10,10]" in out[1], out
    assert out[2] == out[1]  # the failed channel drops the receive posted after it
    assert sender_error and "refused sequence 2" in sender_error


def _fake_posted_receive_wait_is_bounded_but_stays_posted(c, rank, conn):
    eng = _fake_engine(c, rank, conn, timeout_ms=400, staging="host")
    data = np.arange(50, dtype=np.int64)
    if rank == 0:
        conn.recv()  # rank 1's first wait timed out
        eng.wait_sent(1, eng.send(1, [_ref(data)], "late", 0), 0)
        conn.recv()
        return None
    buf = np.zeros_like(data)
    ticket = eng.post_recv(0, [_ref(buf)], "late", 0)
    start = time.monotonic()
    with pytest.raises(c.PeerTimeout, match=r"posted receive 1 .*within 400 ms.*stays posted"):
        eng.wait_recv(0, ticket, 0)
    timed_out = time.monotonic() - start
    time.sleep(0.3)  # longer than the limit: the engine's own wait for a first chunk has none
    conn.send("timed out")
    eng.wait_recv(0, ticket, 0)
    late_ok = bool((buf == data).all())
    eng.post_recv(0, [_ref(buf)], "never sent", 0)  # pending at close: close still returns
    start = time.monotonic()
    eng.close()
    closed = time.monotonic() - start
    conn.send("closed")
    return timed_out, late_ok, closed


def test_fake_engine_posted_receive_wait_times_out_and_can_wait_again(fake_c):
    _, (timed_out, late_ok, closed) = _fake_run(
        fake_c, _fake_posted_receive_wait_is_bounded_but_stays_posted)
    assert 0.35 < timed_out < 3.0 and late_ok and closed < 3.0

# ------------------------------------------------------------------------------------------------
# The set-up logic of comm/ipc.py that needs no GPU: device resolution, ring planning and the
# /dev/shm check, the self-test's patterns, checksums and verdicts, the lifetime of sent tensors,
# and the collective decisions of make_ipc_transport (with a stand-in engine, two CPU processes).

def test_resolve_device_gives_cuda_without_an_index_the_current_device():
    assert ipc.resolve_device("cuda", lambda: 3) == torch.device("cuda", 3)
    assert ipc.resolve_device(torch.device("cuda"), lambda: 1) == torch.device("cuda", 1)
    assert ipc.resolve_device("cuda:2", lambda: 0) == torch.device("cuda", 2)
    assert ipc.resolve_device(1) == torch.device("cuda", 1)
    with pytest.raises(CudaUnavailableError, match="needs a CUDA device, got cpu"):
        ipc.resolve_device("cpu")


def _info(rank, uuid="GPU-A", visible=("GPU-A",), access=None, shm_free=64 << 30, **settings):
    merged = {"staging": "auto", "num_slots": 4, "slot_bytes": None, "self_test": True,
              "probe_bytes": ipc.DEFAULT_PROBE_BYTES, **settings}
    n = len(visible)
    return {"rank": rank, "pid": 1000 + rank, "host": "node", "boot_id": "boot", "ok": True,
            "reason": "", "settings": merged, "shm_free": shm_free,
            "index": list(visible).index(uuid), "uuid": uuid, "visible": list(visible),
            "access": access or [[True] * n for _ in range(n)]}


def test_plan_rings_decides_staging_slot_size_and_shm_space_from_the_infos():
    seg = _C.ring_segment_bytes
    same_gpu = ipc.plan_rings([_info(0), _info(1)], seg)
    assert same_gpu.pair == [["self", "device"], ["device", "self"]]
    assert same_gpu.slot_bytes == ipc.DEFAULT_DEVICE_SLOT_BYTES
    assert same_gpu.shm_bytes == 2 * seg(4, ipc.DEFAULT_DEVICE_SLOT_BYTES, False) < 1 << 20
    no_peer = [[True, False], [False, True]]
    two_gpus = [_info(0, "GPU-A", ("GPU-A", "GPU-B"), no_peer),
                _info(1, "GPU-B", ("GPU-A", "GPU-B"), no_peer)]
    host = ipc.plan_rings(two_gpus, seg)
    assert host.pair[0][1] == host.pair[1][0] == "host"
    assert host.slot_bytes == ipc.DEFAULT_HOST_SLOT_BYTES
    assert host.shm_bytes == 2 * seg(4, ipc.DEFAULT_HOST_SLOT_BYTES, True) < 64 << 20  # docker
    forced = ipc.plan_rings([_info(r, staging="host") for r in range(2)], seg)
    assert forced.pair[0][1] == "host"
    with pytest.raises(ExtensionError, match=r"staging='device' was requested but ranks 0<->1"):
        ipc.plan_rings([dict(i, settings=dict(i["settings"], staging="device")) for i in two_gpus],
                       seg)


def test_plan_rings_refuses_rings_larger_than_dev_shm_saying_what_to_change():
    # bench/transport.py --slot-mib 64 between two GPUs without peer access, docker's 64 MiB
    infos = [_info(r, staging="host", slot_bytes=64 << 20, shm_free=64 << 20) for r in range(2)]
    with pytest.raises(ExtensionError) as info:
        ipc.plan_rings(infos, _C.ring_segment_bytes)
    text = str(info.value)
    assert "need 512 MiB of /dev/shm" in text and "only 64 MiB are free" in text, text
    assert "2 host-staged ring(s) of 4 x 64 MiB" in text and "--shm-size=1g" in text, text
    assert "slot_bytes" in text and "--slot-mib" in text
    ok = [dict(i, shm_free=600 << 20) for i in infos]
    assert ipc.plan_rings(ok, _C.ring_segment_bytes).slot_bytes == 64 << 20
    unknown = [dict(i, shm_free=None) for i in infos]  # no /dev/shm to measure: not refused
    assert ipc.plan_rings(unknown, _C.ring_segment_bytes).shm_bytes > 512 << 20
    assert ipc.shm_shortage(100, 99, 1, 4, 256).startswith("the IPC rings need")
    assert ipc.shm_shortage(100, 100, 1, 4, 256) == ""


def test_plan_rings_refuses_together_when_any_rank_cannot_or_disagrees():
    seg = _C.ring_segment_bytes
    broken = {"rank": 1, "ok": False, "reason": "no driver"}
    with pytest.raises(CudaUnavailableError, match="rank 1: no driver"):
        ipc.plan_rings([_info(0), broken], seg)
    with pytest.raises(CudaUnavailableError, match="different nodes"):
        ipc.plan_rings([_info(0), dict(_info(1), host="other")], seg)
    with pytest.raises(CudaUnavailableError, match="share one process"):
        ipc.plan_rings([_info(0), dict(_info(1), pid=1000)], seg)
    with pytest.raises(ExtensionError, match="different IPC settings"):
        ipc.plan_rings([_info(0), _info(1, slot_bytes=1 << 20)], seg)


def test_selftest_pattern_and_checksum_catch_corrupt_misplaced_and_stale_chunks(monkeypatch):
    n, slot = 5099, 1024
    p = ipc.selftest_pattern(7, n)
    assert p.dtype == torch.uint8 and p.numel() == n
    assert torch.equal(p, ipc.selftest_pattern(7, n))
    assert (p != ipc.selftest_pattern(8, n)).float().mean() > 0.9
    assert len(torch.unique(ipc.selftest_pattern(1, 1 << 16))) == 256
    want = int(ipc.pattern_checksum(7, n))
    assert int(ipc.checksum(p)) == want and ipc.pattern_mismatch(p, 7) == (0, -1)
    monkeypatch.setattr(ipc, "_PATTERN_BLOCK", 1000)  # the blocked paths give the same answers
    assert torch.equal(ipc.selftest_pattern(7, n), p)
    assert int(ipc.pattern_checksum(7, n)) == int(ipc.checksum(p)) == want
    flipped = p.clone()
    flipped[3001] ^= 0x10
    swapped = p.clone()
    swapped[:slot], swapped[slot:2 * slot] = p[slot:2 * slot].clone(), p[:slot].clone()
    stale = p.clone()
    stale[2 * slot:3 * slot] = p[:slot]  # a slot read before the sender rewrote it
    for bad in (flipped, swapped, stale):
        assert int(ipc.checksum(bad)) != want
    assert ipc.pattern_mismatch(flipped, 7) == (1, 3001)
    assert ipc.pattern_mismatch(stale, 7)[1] == 2 * slot


def test_selftest_message_spans_several_chunks_and_wraps_the_ring():
    for slot in (1024, ipc.DEFAULT_HOST_SLOT_BYTES, ipc.DEFAULT_DEVICE_SLOT_BYTES):
        sizes = ipc.selftest_sizes(slot)
        assert all(n % 256 for n in sizes) and sizes[0] > slot  # odd sizes, one crosses a border
        plan = _C.plan_message([("uint8", [n], n) for n in sizes], slot)
        assert len(plan["chunks"]) == 3
        assert ipc.SELFTEST_MESSAGES * len(plan["chunks"]) > ipc.DEFAULT_NUM_SLOTS


def _check(src, dst, ok=True, error="", staging="device"):
    return {"src": src, "dst": dst, "staging": staging, "bytes": 1234, "ok": ok, "error": error}


def test_decide_self_test_sets_the_slowest_measured_bandwidth_and_names_failures():
    link = {"a": 0, "b": 1, "staging": "device", "bytes": 40_000_000, "one_way_ms": 0.5}
    reports = [{"rank": 0, "error": "", "checks": [_check(1, 0)], "links": [link]},
               {"rank": 1, "error": "", "checks": [_check(0, 1)], "links": []}]
    out = ipc.decide_self_test(reports)
    assert out.ok and out.reason == "" and out.bytes_per_ms == pytest.approx(8e7)
    assert out.notes[0].startswith("ipc self-test passed") and "0->1 (device)" in out.notes[0]
    assert "80.0 GB/s" in out.notes[1] and "bytes_per_ms=8e+07" in out.notes[1]
    slow = dict(link, a=0, b=2, staging="host", one_way_ms=4.0)
    out3 = ipc.decide_self_test([dict(reports[0], links=[link, slow]), reports[1]])
    assert out3.bytes_per_ms == pytest.approx(1e7) and "slowest of 2 pairs" in out3.notes[1]
    unmeasured = ipc.decide_self_test([dict(r, links=[]) for r in reports])
    assert unmeasured.ok and unmeasured.bytes_per_ms is None and "not measured" in unmeasured.notes[1]
    bad = [dict(reports[0], error="PeerTimeoutError: rank 1 aborted"),
           dict(reports[1], checks=[_check(0, 1, False, "message 1 tensor 0: checksum 0x1",
                                           "host")])]
    failed = ipc.decide_self_test(bad)
    assert not failed.ok and failed.bytes_per_ms is None and failed.notes == []
    assert failed.reason.startswith("CUDA IPC self-test failed: rank 0 -> rank 1 (host "
                                    "staging): message 1 tensor 0: checksum 0x1; rank 0: "
                                    "PeerTimeoutError"), failed.reason


def test_held_tensors_are_released_in_ticket_order_once_settled():
    held = ipc._HeldTensors()
    a, b, c = torch.zeros(1), torch.ones(2), torch.zeros(3)
    held.hold(1, [a])
    held.hold(3, [b])
    held.hold(4, [c])
    out = []
    assert held.release(2, out.append) == 1 and out == [[a]] and len(held) == 2
    assert held.release(2, out.append) == 0
    assert held.release(math.inf, out.append) == 2 and out[1:] == [[b], [c]] and not held
    held.hold(5, [a])
    with pytest.raises(ValueError, match="tickets must grow"):
        held.hold(5, [b])


class _PipeTransport:
    """Stands in for IpcTransport in ``ipc._run_self_test`` on CPU: messages travel through a
    pipe; ``corrupt=(message, offset)`` flips one received byte; abort() wakes the peer like the
    engine's (an error record the peer's waits see)."""

    class _Done:
        def wait(self):
            pass

    class _Recv:
        def __init__(self, t, bufs):
            self._t, self._bufs = t, bufs

        def wait(self):
            t = self._t
            msg = t._conn.recv()
            if isinstance(msg, str):
                raise PeerTimeoutError(f"channel failed: {msg}")
            if t._corrupt and t._corrupt[0] == t._received:
                flat = bytearray(msg[0])
                flat[t._corrupt[1]] ^= 0x01
                msg[0] = bytes(flat)
            t._received += 1
            for buf, data in zip(self._bufs, msg):
                buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def __init__(self, rank, conn, slot_bytes, corrupt=None):
        self.rank, self.world_size, self.device = rank, 2, torch.device("cpu")
        self.slot_bytes, self.staging = slot_bytes, {1 - rank: "host"}
        self._conn, self._corrupt, self._received = conn, corrupt, 0
        self._engine = types.SimpleNamespace(abort=lambda reason: conn.send(
            f"rank {rank} aborted: {reason}"))

    def isend(self, tensors, dst, *, what):
        self._conn.send([t.numpy().tobytes() for t in tensors])
        return self._Done()

    def irecv(self, buffers, src, *, what):
        return self._Recv(self, buffers)


def _self_test_rank(conn, peer, rank, corrupt):
    def body():
        ipc._gpu_wait = lambda device, deadline, what: None  # CPU tensors: nothing to wait for
        t = _PipeTransport(rank, peer, 1024, corrupt if rank == 1 else None)
        return ipc._run_self_test(t, 5, 20_000, time.monotonic() + 20)

    _guard(conn, body)


def _run_self_tests(corrupt=None):
    a, b = CTX.Pipe()
    runs = [run_child(_self_test_rank, peer, rank, corrupt) for rank, peer in ((0, a), (1, b))]
    return [finish(proc, out) for proc, out in runs]


def test_self_test_reports_pass_and_measure_the_link_between_two_processes():
    reports = _run_self_tests()
    assert [r["error"] for r in reports] == ["", ""]
    assert [c["ok"] for r in reports for c in r["checks"]] == [True, True]
    assert reports[0]["links"][0]["bytes"] == 20_000 and not reports[1]["links"]
    out = ipc.decide_self_test(reports)
    assert out.ok and out.bytes_per_ms > 0, out


def test_self_test_finds_a_corrupted_byte_and_both_ranks_fail_together():
    reports = _run_self_tests(corrupt=(1, 1500))  # message 1, tensor 0, offset 1500: chunk 1
    check = reports[1]["checks"][0]
    assert not check["ok"] and check["src"] == 0 and check["dst"] == 1
    assert "message 1 tensor 0 (2,027 B)" in check["error"], check
    assert "1 byte(s) differ, the first at offset 1,500 (in chunk 1 of the message)" in check["error"]
    assert "rank 1 aborted: its IPC self-test found corrupted data" in reports[0]["error"]
    out = ipc.decide_self_test(reports)
    assert not out.ok and out.reason.startswith("CUDA IPC self-test failed: rank 0 -> rank 1 "
                                                "(host staging): message 1 tensor 0")


class _StubEngine:
    """Stands in for _C.Engine in make_ipc_transport: records what the set-up asked of it."""

    log: list = []  # noqa: RUF012 (one process per rank: the log of that process)

    def __init__(self, rank, world_size, device, num_slots, slot_bytes, timeout_ms, prefix,
                 staging):
        self.state = {"device": device, "slot_bytes": slot_bytes, "created_timeout_ms": timeout_ms,
                      "timeout_ms": timeout_ms, "closed": False, "aborted": None}
        _StubEngine.log.append(self.state)
        self.rank = rank

    def export_handles(self):
        return f"handles of rank {self.rank}".encode()

    def connect(self, peer, blob, check_pid):
        assert blob == f"handles of rank {peer}".encode()

    def unlink_shm(self):
        pass

    def copy_stream(self, peer):
        return 0

    def settled(self, dst):
        return 0

    def quiesce(self, timeout_ms):
        return True

    def set_timeout(self, timeout_ms):
        self.state["timeout_ms"] = timeout_ms

    def abort(self, reason):
        self.state["aborted"] = reason

    def close(self):
        self.state["closed"] = True


def _stub_setup_rank(conn, port, rank, scenario, kwargs):
    def body():
        from torch.distributed import TCPStore

        if scenario == "absent" and rank == 1:
            time.sleep(30)
        ipc.ipc_available = lambda: (True, "")
        ipc.cuda_device_count = lambda: 1
        ipc.device_properties = lambda i: {"uuid": "GPU-A"}
        ipc.peer_access_matrix = lambda: [[True]]
        ipc._require_cuda_extension = lambda: types.SimpleNamespace(
            Engine=_StubEngine, ring_segment_bytes=_C.ring_segment_bytes)
        torch.cuda.ExternalStream = lambda handle, device=None: None
        torch.cuda.current_device = lambda: 0
        if scenario == "shm":
            ipc._shm_free_bytes = lambda path=ipc.SHM_PATH: 64 << 20
        failing = scenario == "selftest_fails" and rank == 1
        deadlines = []

        def fake_self_test(t, generation, probe_bytes, deadline):
            deadlines.append(deadline - time.monotonic())
            if scenario == "dies_in_selftest" and rank == 1:
                os._exit(1)
            check = _check(1 - rank, rank, not failing, "checksum 0x1, expected 0x2" * failing)
            links = [{"a": 0, "b": 1, "staging": "device", "bytes": probe_bytes,
                      "one_way_ms": 2.0}] if rank == 0 else []
            return {"rank": rank, "error": "", "checks": [check], "links": links}

        ipc._run_self_test = fake_self_test
        if scenario == "slow_peer" and rank == 1:
            time.sleep(1.5)  # longer than timeout_s, shorter than handshake_timeout_s
        store = TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=30))
        start = time.monotonic()
        try:
            transport, reason = ipc.try_make_ipc_transport(store, rank, 2, "cuda", **kwargs)
        except PeerTimeoutError as exc:
            return {"peer_timeout": str(exc), "elapsed": time.monotonic() - start,
                    "engines": _StubEngine.log}
        out = {"reason": reason, "engines": _StubEngine.log, "deadline_s": deadlines}
        if transport is not None:
            out.update(notes=transport.notes, bytes_per_ms=transport.bytes_per_ms,
                       device=str(transport.device))
            transport.close()
        return out

    _guard(conn, body)


def _stub_setup(scenario, expect=(0, 1), **kwargs):
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, None, True, timeout=datetime.timedelta(seconds=30),
                     wait_for_workers=False)
    kwargs = {"timeout_s": 0.3, "handshake_timeout_s": 20.0, **kwargs}
    runs = [run_child(_stub_setup_rank, store.port, rank, scenario, kwargs) for rank in range(2)]
    out = {r: finish(*runs[r], timeout=40) for r in expect}
    for proc, _ in runs:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    return out


def test_setup_waits_for_slow_peers_under_the_handshake_limit_and_records_the_self_test():
    res = _stub_setup("slow_peer")  # rank 1 arrives 1.5 s late; timeout_s is 0.3 s
    for r in res.values():
        assert r["reason"] == "" and r["device"] == "cuda:0", r  # "cuda": the current device
        (engine,) = r["engines"]
        assert engine["device"] == 0
        assert engine["created_timeout_ms"] == 20_000  # the set-up (self-test) limit ...
        assert engine["timeout_ms"] == 300  # ... then the transfer limit
        assert 19 < r["deadline_s"][0] <= 20.0
        assert r["bytes_per_ms"] == pytest.approx(ipc.DEFAULT_PROBE_BYTES / 2.0)
        assert r["notes"][0].startswith("ipc self-test passed")
        assert "the stage partitioner uses bytes_per_ms=2e+07" in r["notes"][1]


def test_a_failed_self_test_falls_back_on_every_rank_and_closes_the_engines():
    res = _stub_setup("selftest_fails")
    for r in res.values():
        assert r["reason"].startswith("CUDA IPC self-test failed: rank 0 -> rank 1 (device "
                                      "staging): checksum 0x1, expected 0x2"), r
        assert r["engines"][0]["closed"], r


def test_rings_too_large_for_dev_shm_fall_back_on_every_rank_before_allocating():
    res = _stub_setup("shm", staging="host", slot_bytes=64 << 20)
    for r in res.values():
        assert "need 512 MiB of /dev/shm" in r["reason"] and "only 64 MiB are free" in r["reason"]
        assert r["engines"] == []  # refused up front


def test_an_absent_peer_is_a_peer_timeout_error_bounded_by_the_handshake_limit():
    res = _stub_setup("absent", expect=(0,), handshake_timeout_s=1.0)
    assert "not every rank answered within 1 s" in res[0]["peer_timeout"], res
    assert res[0]["elapsed"] < 5.0


# ------------------------------------------------------------------------------------------------
# bench/transport.py: each receive mode is held to the device copies it performs


def _load_transport_bench():
    """bench/transport.py by path. It imports its sibling as ``common``; another test may have
    imported examples/common.py under that name, so bench's is put in place for the import."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    saved = sys.modules.get("common")
    sys.modules["common"] = load("common", bench / "common.py")
    try:
        return load("_transport_bench", bench / "transport.py")
    finally:
        if saved is None:
            del sys.modules["common"]
        else:
            sys.modules["common"] = saved


def test_transport_bench_holds_copy_mode_to_two_copies_and_view_mode_to_one():
    bench = _load_transport_bench()
    mb40 = bench.TARGET_BYTES

    def row(transport, mode, gbps, nbytes=mb40):
        return {"transport": transport, "mode": mode, "bytes": nbytes, "gb_per_s": gbps,
                "latency_us": nbytes / gbps / 1e3}

    rows = bench.annotate_targets([
        row("same-process copy", "d2d", 1000.0), row("ipc (device)", "copy", 450.0),
        row("ipc (device)", "view", 850.0), row("ipc (host)", "copy", 20.0),
        row("torch gloo", "broadcast", 5.0), row("ipc (device)", "copy", 400.0, 10 * bench.MB)])
    _, copy, view, host, gloo, small = rows
    assert copy["ref_copies"] == 2 and copy["vs_reference"] == pytest.approx(0.9)
    assert copy["target"] == ">= 80% of 2 same-process copies" and copy["target_met"] is True
    assert view["ref_copies"] == 1 and view["vs_reference"] == pytest.approx(0.85)
    assert view["target"] == ">= 80% of 1 same-process copy" and view["target_met"] is True
    for r in (host, gloo):
        assert r["ref_copies"] is None and r["target"] is None and r["target_met"] is None
    assert small["target"] is None and small["vs_reference"] is None  # no 10 MB reference row
    notes = bench.target_notes(rows)
    assert "target 40 MB >= 80% of 2 same-process copies: ipc (device) copy 90 % -> met" in notes
    assert any(n.startswith("no 40 MB device-copy target for ipc (host) copy") for n in notes)
    slow = bench.annotate_targets([row("same-process copy", "d2d", 1000.0),
                                   row("ipc (device)", "copy", 350.0)])[1]
    assert slow["target_met"] is False  # 70 % of two copies' speed


def test_a_peer_lost_during_the_self_test_is_a_peer_timeout_and_frees_this_ranks_engine():
    res = _stub_setup("dies_in_selftest", expect=(0,), handshake_timeout_s=1.0)[0]
    assert "self-test verdicts" in res["peer_timeout"] and res["elapsed"] < 6.0, res
    (engine,) = res["engines"]
    assert engine["aborted"] and engine["closed"], engine  # peers told, rings released
