"""Host-only tests of the IPC engine's protocol: slot ring, sequence state machine, message
packing and handle serialisation, driven from two real processes over POSIX shared memory.

No GPU needed: ``_C.SlotRing`` runs the same state machine as the CUDA engine (csrc/slot_ring.h,
csrc/message.h) with host memcpy standing in for the device copies.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import signal
import threading
import time

import numpy as np
import pytest

from hybridiff_rt import env

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
    return module


def _ref(a: np.ndarray):
    return (a.ctypes.data, a.nbytes, str(a.dtype), list(a.shape))


def _fake_engine(c, rank, conn, slots=4, slot_bytes=4096, timeout_ms=3000):
    eng = c.Engine(rank, 2, 0, slots, slot_bytes, timeout_ms,
                   f"/hdrt_fk{os.getpid()}_{secrets.token_hex(3)}", [0, 0])
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
    a, b = CTX.Pipe()
    procs, outs = [], []
    for rank, conn in ((0, a), (1, b)):
        proc, out = run_child(_fake_child, c, fn, rank, conn, args)
        procs.append(proc)
        outs.append(out)
    return [finish(p, o, 60) for p, o in zip(procs, outs)]


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
