"""Same-node CUDA IPC transport: the Python face of the C++ transfer engine ``hybridiff_rt._C``.

This module is the only importer of ``_C``. It imports cleanly when the extension is missing or
was built without CUDA; the functions below then report why IPC is unavailable.

How a transport is set up (``make_ipc_transport``), once per job, through the
``torch.distributed`` store; every wait of the set-up is bounded by ``handshake_timeout_s``:

1. every rank publishes what it is (pid, host, boot id, device UUID, the devices it sees and their
   peer access, the free space of /dev/shm) and the ring settings it was given;
2. every rank computes the same per-pair staging from that: ``device`` (the receiver's slots are
   mapped into the sender with CUDA IPC: same GPU, or two GPUs with peer access both ways) or
   ``host`` (pinned shared host memory, chunked, when the GPUs cannot map each other), and checks
   that the rings fit in /dev/shm;
3. each rank allocates its receive rings and publishes its handle blob; each rank imports its
   peers' blobs;
4. a self-test sends a known pattern each way through the real slots (several slot-sized chunks,
   wrapping the ring), compares checksums on the receiver, and times a boundary-sized ping-pong
   that sets :attr:`IpcTransport.bytes_per_ms`; the verdicts are gathered through the store.

Every decision after a gather is computed from the same gathered data on every rank, so any
failure raises :class:`ExtensionError` (or :class:`CudaUnavailableError`) on *every* rank, and
callers fall back to torch.distributed together (see :func:`try_make_ipc_transport`). Only a rank
that never shows up raises :class:`PeerTimeoutError`.

Shapes and units: tensors are moved as-is (same dtype and shape on both sides); sizes are in bytes,
timeouts in seconds on the Python side (milliseconds in ``_C``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import secrets
import socket
import sys
import time
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import env
from ..errors import CudaUnavailableError, ExtensionError, PeerTimeoutError, ShapeError
from .base import PendingTransfer, Transport
from .nodes import boot_id
from .store import barrier, gather_bytes

try:  # the one import of the extension in the package (by name: `from .. import _C` would read,
    # to the import-linter, as an import of the package root and everything it exports)
    _C = importlib.import_module("hybridiff_rt._C")

    _IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # not built, or built for another interpreter
    _C = None
    _IMPORT_ERROR = exc

#: Default ring geometry. Device staging: 4 slots of 32 MiB per incoming channel (GPU memory of
#: the receiver); larger messages are cut into slot-sized chunks. Host staging: 4 slots of 4 MiB of
#: pinned shared memory (docker's default /dev/shm is only 64 MiB).
DEFAULT_NUM_SLOTS = 4
DEFAULT_DEVICE_SLOT_BYTES = 32 << 20
DEFAULT_HOST_SLOT_BYTES = 4 << 20
#: Size of the set-up link measurement: about one SDXL-1024 stage boundary (40-50 MB).
DEFAULT_PROBE_BYTES = 40_000_000
#: Timed round trips of the link measurement (after one untimed).
PROBE_ROUND_TRIPS = 4
STAGING_CHOICES = ("auto", "device", "host")
STAGING_ENV = "HYBRIDIFF_RT_IPC_STAGING"
SHM_PATH = "/dev/shm"

_BUILD_HINT = ("build it with `pip install -e .` (a CUDA toolkit must be found at build time: "
               "nvcc on PATH or CUDA_HOME; HYBRIDIFF_RT_CUDA=on makes that mandatory)")
_MIB = 1 << 20


# ------------------------------------------------------------------------------------------------
# Extension status and device queries


def build_info() -> dict[str, Any]:
    """What the extension was built with: ``available`` (imported), ``import_error`` (str | None),
    and when available ``cuda_compiled``, ``cuda_version``, ``archs``, ``compiler``, ``pybind11``,
    ``version``."""
    if _C is None:
        return {"available": False, "import_error": repr(_IMPORT_ERROR), "cuda_compiled": False,
                "cuda_version": None, "archs": []}
    info = dict(_C.build_info())
    info.update(available=True, import_error=None)
    return info


def _require_cuda_extension() -> Any:
    if _C is None:
        raise CudaUnavailableError(f"the extension hybridiff_rt._C is not importable "
                                   f"({_IMPORT_ERROR}); {_BUILD_HINT}")
    if not _C.cuda_compiled():
        raise CudaUnavailableError(f"hybridiff_rt._C was built without CUDA; {_BUILD_HINT}")
    return _C


@contextlib.contextmanager
def _native(context: str) -> Iterator[None]:
    """Translate the extension's exceptions into hybridiff_rt.errors types, prefixed with
    ``context`` (the transfer's ``what`` label or the operation)."""
    if _C is None:
        yield
        return
    try:
        yield
    except _C.PeerTimeout as exc:
        raise PeerTimeoutError(f"{context}: {exc}") from None
    except _C.MessageMismatch as exc:
        raise ShapeError(f"{context}: {exc}") from None
    except _C.CudaUnavailable as exc:
        raise CudaUnavailableError(f"{context}: {exc}") from None
    except (_C.CudaCallError, _C.ProtocolError) as exc:
        raise ExtensionError(f"{context}: {exc}") from None


def cuda_device_count() -> int:
    """Number of CUDA devices the extension sees (>= 1).

    Raises:
        CudaUnavailableError: no extension, built without CUDA, no driver or no device; the
            message says which and what to do.
    """
    c = _require_cuda_extension()
    with _native("cuda_device_count"):
        return int(c.device_count())


def device_properties(device: int) -> dict[str, Any]:
    """Name, capability, total memory (bytes), UUID and PCI bus id of a visible device."""
    c = _require_cuda_extension()
    with _native("device_properties"):
        return dict(c.device_properties(int(device)))


def peer_access_matrix() -> list[list[bool]]:
    """``m[i][j]``: can visible device i access device j's memory (cudaDeviceCanAccessPeer);
    the diagonal is True. Raises CudaUnavailableError like :func:`cuda_device_count`."""
    n = cuda_device_count()
    with _native("peer_access_matrix"):
        return [[bool(_C.can_access_peer(i, j)) for j in range(n)] for i in range(n)]


def ipc_available() -> tuple[bool, str]:
    """Whether this process can use the IPC engine at all: ``(True, "")`` or ``(False, reason)``.
    Whether a *job* can use it also depends on its peers (same node, distinct processes), which
    :func:`make_ipc_transport` checks collectively."""
    if not sys.platform.startswith("linux"):
        return False, f"CUDA IPC needs Linux, this is {sys.platform}"
    try:
        cuda_device_count()
    except CudaUnavailableError as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False (a CPU-only torch build?)"
    return True, ""


# ------------------------------------------------------------------------------------------------
# Tensors <-> the extension's (pointer, bytes, dtype, shape) tuples


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_device_tensor(t: Any, device: torch.device, role: str, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{what}: {role} must be torch.Tensors, got {type(t).__name__}")
    if t.device != device:
        raise ShapeError(f"{what}: {role} must be on {device} (the transport's device), got a "
                         f"tensor on {t.device}; move it with .to({str(device)!r})")


def _ref(t: torch.Tensor) -> tuple[int, int, str, list[int]]:
    return (t.data_ptr(), t.numel() * t.element_size(), _dtype_name(t.dtype), list(t.shape))


class _SlotArray:
    """A ``__cuda_array_interface__`` wrapper so torch can alias slot memory without copying."""

    _TYPESTR = {torch.float16: "<f2", torch.float32: "<f4", torch.float64: "<f8",
                torch.int8: "|i1", torch.uint8: "|u1", torch.int16: "<i2",
                torch.int32: "<i4", torch.int64: "<i8", torch.bool: "|b1"}

    def __init__(self, ptr: int, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.__cuda_array_interface__ = {"data": (ptr, False), "shape": tuple(shape),
                                         "typestr": self._TYPESTR[dtype], "version": 3,
                                         "strides": None, "stream": None}


def _alias(ptr: int, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor viewing ``ptr`` (device memory the engine owns) as ``dtype[shape]``."""
    if dtype == torch.bfloat16:  # no CAI typestr for bf16: view raw bytes, then reinterpret
        nbytes = int(torch.Size(shape).numel()) * 2
        raw = torch.as_tensor(_SlotArray(ptr, (nbytes,), torch.uint8), device=device)
        return raw.view(torch.bfloat16).view(tuple(shape))
    if dtype not in _SlotArray._TYPESTR:
        raise ShapeError(f"zero-copy views do not support dtype {dtype}; use irecv()")
    return torch.as_tensor(_SlotArray(ptr, shape, dtype), device=device)


# ------------------------------------------------------------------------------------------------
# The transport


class _HeldTensors:
    """Tensors the engine may still read or write (one channel), held until their ticket settles.

    A ticket settles once the engine has enqueued its copies on its stream, or failed or dropped
    it (``Engine.settled``); tickets settle in order. Only then may a tensor be handed to the
    caching allocator with ``record_stream`` on that stream: the allocator records its event at
    *free* time, so a tensor freed before its copy was enqueued could be reused under the copy.
    Holding a reference until then keeps a dropped pending transfer (no ``wait()``) safe.
    """

    def __init__(self) -> None:
        self._held: deque[tuple[int, list[torch.Tensor]]] = deque()

    def hold(self, ticket: int, tensors: list[torch.Tensor]) -> None:
        if self._held and ticket <= self._held[-1][0]:
            raise ValueError(f"tickets must grow: {ticket} after {self._held[-1][0]}")
        self._held.append((ticket, tensors))

    def release(self, settled: float, on_release: Callable[[list[torch.Tensor]], None]) -> int:
        """Hand every held entry with ticket <= ``settled`` to ``on_release`` (oldest first) and
        drop it; returns how many were released."""
        n = 0
        while self._held and self._held[0][0] <= settled:
            on_release(self._held.popleft()[1])
            n += 1
        return n

    def __len__(self) -> int:
        return len(self._held)


def _copy_back(targets: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    for target, buf in zip(targets, buffers):
        if target is not buf:  # a non-contiguous target, received through a contiguous buffer
            target.copy_(buf)


class _TicketPending:
    """A transfer the engine tracks by ticket. ``wait()`` runs the engine's wait for it (which
    orders the current stream after its copies; the host never blocks on the GPU), then hands
    the tensors of settled transfers to the caching allocator."""

    def __init__(self, transport: "IpcTransport", peer: int, ticket: int, what: str) -> None:
        self._t, self._peer, self._ticket, self._what = transport, peer, ticket, what
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        stream = torch.cuda.current_stream(self._t.device).cuda_stream
        with _native(self._what):
            self._engine_wait(stream)
        self._finish()
        self._done = True
        self._t._release_settled()

    def _engine_wait(self, stream: int) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


class _SendPending(_TicketPending):
    """An enqueued send; ``wait()`` makes the current stream wait until the copy has read the
    source tensors (so they may be modified afterwards)."""

    def _engine_wait(self, stream: int) -> None:
        self._t._engine.wait_sent(self._peer, self._ticket, stream)


class _PostedRecvPending(_TicketPending):
    """A receive the engine drains as the data arrives (host-staged channels: the sender's copies
    into the small pinned ring and the copies out of it overlap with this rank's compute);
    ``wait()`` blocks the host until the whole message has been drained (or raises
    PeerTimeoutError; the receive then stays posted), then orders the current stream after its
    copies."""

    def __init__(self, transport: "IpcTransport", src: int, ticket: int,
                 buffers: list[torch.Tensor], targets: list[torch.Tensor], what: str) -> None:
        super().__init__(transport, src, ticket, what)
        self._buffers, self._targets = buffers, targets

    def _engine_wait(self, stream: int) -> None:
        self._t._engine.wait_recv(self._peer, self._ticket, stream)

    def _finish(self) -> None:
        _copy_back(self._targets, self._buffers)


class _RecvPending:
    """A posted receive; ``wait()`` blocks the host until the sender has enqueued the message
    (or raises PeerTimeoutError), then orders the current stream after the data's arrival."""

    def __init__(self, transport: "IpcTransport", src: int, buffers: list[torch.Tensor],
                 targets: list[torch.Tensor], what: str) -> None:
        self._t, self._src, self._buffers, self._targets, self._what = (
            transport, src, buffers, targets, what)
        self._done = False

    def wait(self) -> None:
        queue = self._t._recv_queues[self._src]
        while not self._done:  # receives from one source complete in the order they were posted
            head = queue[0]
            head._complete()
            queue.popleft()

    def _complete(self) -> None:
        stream = torch.cuda.current_stream(self._t.device).cuda_stream
        with _native(self._what):
            self._t._engine.recv(self._src, [_ref(b) for b in self._buffers], self._what, stream)
        _copy_back(self._targets, self._buffers)
        self._done = True


class IpcTransport(Transport):
    """Moves tensors between ranks on one node through the C++ CUDA IPC engine.

    Build it with :func:`make_ipc_transport` (collectively, on every rank). Tensors must be CUDA
    tensors on ``device``. ``isend`` never blocks the host; ``irecv(...).wait()`` blocks the host
    only until the sender has *enqueued* the message, never on GPU work. ``bytes_per_ms`` is the
    bandwidth measured by the set-up self-test (the same value on every rank).

    On host-staged channels (two GPUs without peer access) ``irecv`` posts the receive at once and
    the engine drains the pinned ring into the buffers as chunks arrive, on its receive stream, so
    a boundary larger than the ring still moves while both ranks compute.
    """

    name = "ipc"

    def __init__(self, engine: Any, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, store: Any, key: str, staging: dict[int, str],
                 slot_bytes: int, num_slots: int, peer_pids: dict[int, int] | None = None) -> None:
        super().__init__(rank, world_size, timeout_s)
        self._peer_pids = dict(peer_pids or {})
        self._engine = engine
        self.device = device
        self._store = store
        self._key = key
        #: per peer rank: "device" or "host" staging.
        self.staging = dict(staging)
        self.slot_bytes = int(slot_bytes)
        self.num_slots = int(num_slots)
        peers = [p for p in range(world_size) if p != rank]
        self._recv_queues: dict[int, deque[_RecvPending]] = {p: deque() for p in peers}
        # The engine keeps its copy streams alive after close(), so record_stream on them stays
        # valid for tensors freed later.
        self._copy_streams = {
            p: torch.cuda.ExternalStream(engine.copy_stream(p), device=device) for p in peers}
        self._sources = {p: _HeldTensors() for p in peers}
        self._posted = {p: _HeldTensors() for p in peers if self.staging.get(p) == "host"}
        self._recv_streams = {
            p: torch.cuda.ExternalStream(engine.recv_stream(p), device=device)
            for p in self._posted}
        self._views: dict[int, bool] = {}
        self._closed = False

    # -- point to point -------------------------------------------------------------------------

    def _check_peer(self, peer: int, role: str, what: str) -> None:
        if self._closed:
            raise ExtensionError(f"{what}: the IPC transport is closed")
        if not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise ShapeError(f"{what}: {role} must be another rank in [0, {self.world_size}), "
                             f"got {peer!r} on rank {self.rank}")

    @staticmethod
    def _record_on(stream: Any) -> Callable[[list[torch.Tensor]], None]:
        def record(tensors: list[torch.Tensor]) -> None:
            for t in tensors:  # the caching allocator must not reuse them before the copy ran
                if t.numel():
                    t.record_stream(stream)

        return record

    def _release_settled(self, everything: bool = False) -> None:
        """Hand the tensors of settled sends and posted receives (all, when ``everything``: the
        engine is closed and enqueues nothing more) to the caching allocator, ordered after the
        copies that read or write them (the engine keeps those streams alive)."""
        for dst, held in self._sources.items():
            if held:
                settled = math.inf if everything else self._engine.settled(dst)
                held.release(settled, self._record_on(self._copy_streams[dst]))
        for src, held in self._posted.items():
            if held:
                settled = math.inf if everything else self._engine.recv_settled(src)
                held.release(settled, self._record_on(self._recv_streams[src]))

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        """Enqueue ``tensors`` (each any shape/dtype, CUDA on ``device``) for rank ``dst``."""
        self._check_peer(dst, "dst", what)
        keep = []
        for t in tensors:
            _check_device_tensor(t, self.device, "sent tensors", what)
            keep.append(t if t.is_contiguous() else t.contiguous())
        stream = torch.cuda.current_stream(self.device).cuda_stream
        try:
            with _native(what):
                ticket = self._engine.send(dst, [_ref(t) for t in keep], what, stream)
        except BaseException:
            # a failed send may have enqueued part of its copies: order the frees after them
            self._record_on(self._copy_streams[dst])(keep)
            raise
        # Held until the engine has enqueued the copy (the worker thread may do it later), so a
        # pending send dropped without wait() cannot free its sources under the copy.
        self._sources[dst].hold(ticket, keep)
        self._release_settled()
        self.bytes_sent += self.payload_bytes(keep)
        return _SendPending(self, dst, ticket, what)

    def irecv(self, buffers: Sequence[torch.Tensor], src: int, *, what: str) -> PendingTransfer:
        """Post a receive into ``buffers`` (shapes and dtypes must match what ``src`` sends)."""
        self._check_peer(src, "src", what)
        if self._views.get(src):
            raise ExtensionError(f"{what}: release the zero-copy view from rank {src} first")
        targets, bufs = [], []
        for b in buffers:
            _check_device_tensor(b, self.device, "receive buffers", what)
            targets.append(b)
            bufs.append(b if b.is_contiguous() else torch.empty_like(b, memory_format=torch.contiguous_format))
        if src in self._posted:  # host staging: the engine drains the ring from now on
            stream = torch.cuda.current_stream(self.device).cuda_stream
            with _native(what):
                ticket = self._engine.post_recv(src, [_ref(b) for b in bufs], what, stream)
            self._posted[src].hold(ticket, bufs)  # until its copies are enqueued
            return _PostedRecvPending(self, src, ticket, bufs, targets, what)
        pending = _RecvPending(self, src, bufs, targets, what)
        self._recv_queues[src].append(pending)
        return pending

    def recv_views(self, like: Sequence[tuple[Sequence[int], torch.dtype]], src: int, *,
                   what: str) -> tuple[list[torch.Tensor], Any]:
        """Zero-copy receive: tensors that alias the engine's receive slot.

        Args:
            like: ``[(shape, dtype), ...]`` of the message ``src`` sends; it must fit one slot
                (``slot_bytes``) and the channel must use device staging.
        Returns:
            ``(tensors, release)``: read the tensors on the current stream, then call
            ``release()`` (after enqueueing the last read); until then the slot stays reserved.
        """
        self._check_peer(src, "src", what)
        if self._recv_queues[src]:
            self._recv_queues[src][-1].wait()
        specs = []
        for shape, dtype in like:
            numel = int(torch.Size(shape).numel())
            specs.append((_dtype_name(dtype), list(shape),
                          numel * torch.empty((), dtype=dtype).element_size()))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with _native(what):
            ptrs = self._engine.recv_view(src, specs, what, stream)
        self._views[src] = True
        tensors = [_alias(p, shape, dtype, self.device) for p, (shape, dtype) in zip(ptrs, like)]

        def release() -> None:
            if not self._views.get(src):
                return
            with _native(what):
                self._engine.release_view(src, torch.cuda.current_stream(self.device).cuda_stream)
            self._views[src] = False

        return tensors, release

    # -- collectives over point to point -------------------------------------------------------

    def all_gather(self, tensor: torch.Tensor, *, what: str) -> list[torch.Tensor]:
        """Every rank's ``tensor`` in rank order; each entry is a fresh tensor."""
        _check_device_tensor(tensor, self.device, "all_gather inputs", what)
        peers = [p for p in range(self.world_size) if p != self.rank]
        sends = [self.isend([tensor], p, what=what) for p in peers]
        out = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
               for _ in range(self.world_size)]
        out[self.rank].copy_(tensor)
        recvs = [self.irecv([out[p]], p, what=what) for p in peers]
        for r in recvs:
            r.wait()
        for s in sends:
            s.wait()
        return out

    def broadcast(self, tensor: torch.Tensor, src: int, *, what: str) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s on every rank; returns it."""
        _check_device_tensor(tensor, self.device, "broadcast tensors", what)
        if not 0 <= src < self.world_size:
            raise ShapeError(f"{what}: src must be in [0, {self.world_size}), got {src}")
        if self.rank == src:
            sends = [self.isend([tensor], p, what=what)
                     for p in range(self.world_size) if p != self.rank]
            for s in sends:
                s.wait()
        else:
            self.irecv([tensor], src, what=what).wait()
        return tensor

    # -- shutdown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Drain this rank's copies, meet the other ranks (up to ``timeout_s``, at most 10 s; a
        dead peer is skipped), then free the rings. The transport is unusable afterwards.

        Never hangs: the engine polls the GPU with deadlines and checks the peers' liveness, and
        leaks what it cannot drain instead of freeing memory a copy may still touch."""
        if self._closed:
            return
        self._closed = True
        timeout_ms = int(self.timeout_s * 1000)
        try:
            with _native("close"):
                self._engine.quiesce(timeout_ms)
            if not self._a_peer_exited():  # a dead peer never arrives: do not wait for it
                barrier(self._store, f"{self._key}/closed", self.world_size,
                        min(self.timeout_s, 10.0))
        except (PeerTimeoutError, ExtensionError, RuntimeError):
            pass  # a dead or stuck peer must not make close() hang
        finally:
            self._shutdown_engine()

    def _a_peer_exited(self) -> bool:
        return _C is not None and any(not _C.pid_alive(pid) for pid in self._peer_pids.values())

    def _shutdown_engine(self) -> None:
        """Close the engine (bounded drain of the copies into and out of the slots, then free),
        then hand the held sources to the allocator: nothing is enqueued on them any more."""
        try:
            with _native("close"):
                self._engine.close()
        finally:
            self._release_settled(everything=True)

    def _abandon(self, reason: str) -> None:
        """Close without meeting the other ranks (a set-up that failed on a missing peer):
        fail every channel with ``reason`` so peers stop waiting, then close the engine."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._engine.abort(reason)
        self._shutdown_engine()

    def __del__(self) -> None:  # best effort; close() is the documented way
        if getattr(self, "_engine", None) is not None and not getattr(self, "_closed", True):
            self._closed = True
            with contextlib.suppress(Exception):
                self._shutdown_engine()  # drains like close(), minus the barrier


# ------------------------------------------------------------------------------------------------
# Collective construction through the torch.distributed store


def _pid_visible(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Bytes an unprivileged process may still allocate in ``path`` (None: no such file system)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def resolve_device(device: torch.device | int | str,
                   current_device: Callable[[], int] | None = None) -> torch.device:
    """The CUDA device with an explicit index: ``"cuda"`` (no index) is the current device
    (``torch.cuda.current_device()``, or ``current_device()`` when given), an int ``i`` is
    ``cuda:i``.

    Raises:
        CudaUnavailableError: ``device`` is not a CUDA device.
    """
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise CudaUnavailableError(f"the IPC transport needs a CUDA device, got {dev}")
    if dev.index is None:
        dev = torch.device("cuda", int((current_device or torch.cuda.current_device)()))
    return dev


def _local_info(rank: int, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    ok, reason = ipc_available()
    info: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                            "boot_id": boot_id(), "ok": ok, "reason": reason,
                            "settings": settings, "shm_free": _shm_free_bytes()}
    if ok:
        try:
            n = cuda_device_count()
            index = device.index
            if index is None or not 0 <= index < n:
                raise CudaUnavailableError(f"device {device} is not visible ({n} device(s))")
            uuids = [device_properties(i)["uuid"] for i in range(n)]
            info.update(index=index, uuid=uuids[index], visible=uuids,
                        access=peer_access_matrix())
        except (CudaUnavailableError, ExtensionError) as exc:
            info.update(ok=False, reason=str(exc))
    return info


def _pair_staging(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"device" when a's and b's devices can map each other's memory (same GPU, or peer access
    both ways), else "host". Computed identically on every rank from the published infos."""
    if a["uuid"] == b["uuid"]:
        return "device"

    def can(x: dict[str, Any], y: dict[str, Any]) -> bool:
        if y["uuid"] not in x["visible"]:
            return False
        return bool(x["access"][x["index"]][x["visible"].index(y["uuid"])])

    return "device" if can(a, b) and can(b, a) else "host"


def shm_bytes_needed(pair: list[list[str]], num_slots: int, slot_bytes: int,
                     segment_bytes: Callable[[int, int, bool], int]) -> tuple[int, int]:
    """``(bytes, host rings)``: /dev/shm that the rings of *all* ranks of the node take together.

    Every directed channel has one ring segment: its control block, plus the slot data when the
    pair uses host staging. ``segment_bytes(num_slots, slot_bytes, with_data)`` is
    ``_C.ring_segment_bytes``.
    """
    total, host_rings = 0, 0
    for src, row in enumerate(pair):
        for dst, staging in enumerate(row):
            if src != dst:
                host = staging == "host"
                total += int(segment_bytes(num_slots, slot_bytes, host))
                host_rings += host
    return total, host_rings


def shm_shortage(needed: int, free: int | None, host_rings: int, num_slots: int,
                 slot_bytes: int) -> str:
    """Why the rings do not fit in /dev/shm ("" when they do, or when ``free`` is unknown)."""
    if free is None or needed <= free:
        return ""
    suggest_gib = max(1, math.ceil(needed * 1.25 / (1 << 30)))
    return (f"the IPC rings need {needed / _MIB:.0f} MiB of {SHM_PATH} ({host_rings} host-staged "
            f"ring(s) of {num_slots} x {slot_bytes / _MIB:g} MiB plus control blocks, for all "
            f"ranks of this node together) but only {free / _MIB:.0f} MiB are free there: enlarge "
            f"{SHM_PATH} (docker run --shm-size={suggest_gib}g, or `mount -o remount,"
            f"size={suggest_gib}G {SHM_PATH}`) or use smaller rings (slot_bytes, num_slots; "
            f"bench/transport.py --slot-mib)")


@dataclasses.dataclass(frozen=True)
class RingPlan:
    """What every rank decided from the gathered set-up infos (identical on every rank)."""

    pair: list[list[str]]  # pair[a][b]: "device" | "host" | "self"
    num_slots: int
    slot_bytes: int
    shm_bytes: int


def plan_rings(infos: list[dict[str, Any]],
               segment_bytes: Callable[[int, int, bool], int]) -> RingPlan:
    """Decide staging and ring geometry from every rank's published info (a pure function of
    ``infos``, so every rank decides the same).

    Raises:
        CudaUnavailableError: a rank cannot use IPC, the ranks are on several nodes, or share a
            process.
        ExtensionError: the ranks were given different settings, staging="device" is impossible,
            or the rings do not fit in /dev/shm.
    """
    world_size = len(infos)
    problems = [f"rank {i['rank']}: {i['reason']}" for i in infos if not i["ok"]]
    if not problems:
        if len({(i["host"], i["boot_id"]) for i in infos}) > 1:
            problems.append("ranks run on different nodes: " +
                            ", ".join(f"rank {i['rank']} on {i['host']}" for i in infos))
        if len({i["pid"] for i in infos}) < world_size:
            problems.append("several ranks share one process; CUDA IPC needs one process per rank")
    if problems:
        raise CudaUnavailableError("CUDA IPC transport unavailable; " + "; ".join(problems))
    settings = infos[0]["settings"]
    if any(i["settings"] != settings for i in infos):
        raise ExtensionError("the ranks passed different IPC settings (" + "; ".join(
            f"rank {i['rank']}: {i['settings']}" for i in infos) + "); pass the same staging, "
            f"num_slots and slot_bytes on every rank (staging also comes from {STAGING_ENV})")
    staging, num_slots = settings["staging"], int(settings["num_slots"])
    pair = [[_pair_staging(infos[a], infos[b]) if a != b else "self" for b in range(world_size)]
            for a in range(world_size)]
    if staging == "device":
        bad = [f"{a}<->{b}" for a in range(world_size) for b in range(world_size)
               if a < b and pair[a][b] != "device"]
        if bad:
            raise ExtensionError(f"staging='device' was requested but ranks {', '.join(bad)} run "
                                 "on GPUs without peer access; use staging='auto' or 'host'")
    elif staging == "host":
        pair = [["host" if a != b else "self" for b in range(world_size)]
                for a in range(world_size)]
    slot_bytes = settings["slot_bytes"]
    if slot_bytes is None:
        slot_bytes = (DEFAULT_HOST_SLOT_BYTES if any("host" in row for row in pair)
                      else DEFAULT_DEVICE_SLOT_BYTES)
    needed, host_rings = shm_bytes_needed(pair, num_slots, int(slot_bytes), segment_bytes)
    free = [i["shm_free"] for i in infos if i.get("shm_free") is not None]
    shortage = shm_shortage(needed, min(free) if free else None, host_rings, num_slots,
                            int(slot_bytes))
    if shortage:
        raise ExtensionError("CUDA IPC transport set-up refused: " + shortage)
    return RingPlan(pair, num_slots, int(slot_bytes), needed)


# ------------------------------------------------------------------------------------------------
# The set-up self-test: patterns, checksums, verdicts (pure), and the run on the GPU

_PATTERN_BLOCK = 1 << 22  # bytes per block: bounds the int64 temporaries to 32 MiB


def _blocks(nbytes: int) -> Iterator[tuple[int, int]]:
    for start in range(0, nbytes, _PATTERN_BLOCK):
        yield start, min(start + _PATTERN_BLOCK, nbytes)


def _pattern_block(seed: int, start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    idx = torch.arange(start, stop, dtype=torch.int64, device=device)
    x = idx * 0x9E3779B1 + (seed & 0xFFFFF) * 0x85EBCA77  # < 2**62 for any size below 1 TB
    x = x ^ (x >> 27)
    x = (x & 0x7FFFFFFF) * 0x94D049BB  # < 2**63: no overflow on any device
    return ((x >> 24) & 0xFF).to(torch.uint8)


def selftest_pattern(seed: int, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``nbytes`` pseudo-random bytes (uint8) that depend on ``seed`` and on each byte's offset,
    so a chunk copied to the wrong place, twice, or not at all changes them."""
    out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for start, stop in _blocks(nbytes):
        out[start:stop] = _pattern_block(seed, start, stop, device)
    return out


def _weights(start: int, stop: int, device: torch.device | str) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.int64, device=device) % 65521 + 1


def checksum(data: torch.Tensor) -> torch.Tensor:
    """Position-weighted byte sum of a contiguous tensor, as a 0-dim int64 tensor on its device
    (read it with ``int()`` once the GPU work is done)."""
    flat = data.reshape(-1).view(torch.uint8)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start, stop in _blocks(flat.numel()):
        total += (flat[start:stop].to(torch.int64) * _weights(start, stop, flat.device)).sum()
    return total


def pattern_checksum(seed: int, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``checksum(selftest_pattern(seed, nbytes, device))`` without materialising the pattern."""
    total = torch.zeros((), dtype=torch.int64, device=device)
    for start, stop in _blocks(nbytes):
        total += (_pattern_block(seed, start, stop, device).to(torch.int64) *
                  _weights(start, stop, device)).sum()
    return total


def pattern_mismatch(data: torch.Tensor, seed: int) -> tuple[int, int]:
    """``(bytes that differ from the pattern, offset of the first one or -1)`` (for reports)."""
    flat = data.reshape(-1).view(torch.uint8)
    count, first = 0, -1
    for start, stop in _blocks(flat.numel()):
        bad = flat[start:stop] != _pattern_block(seed, start, stop, flat.device)
        n = int(bad.sum())
        if n and first < 0:
            first = start + int(bad.nonzero()[0, 0])
        count += n
    return count, first


def selftest_sizes(slot_bytes: int) -> list[int]:
    """Byte sizes of the self-test message's two tensors: odd sizes (not multiples of 256), the
    first crossing a slot border, the whole spanning three slot-sized chunks (slots >= 1 KiB)."""
    first = slot_bytes + 1003
    return [first, max(2 * slot_bytes + 300 - _aligned(first), 301)]


def _pattern_seed(generation: int, src: int, dst: int, message: int, tensor: int) -> int:
    return (generation * 7919 + src * 613 + dst * 97 + message * 11 + tensor) & 0xFFFFF


SELFTEST_MESSAGES = 2  # per direction: 2 x 3 chunks through 4 slots wraps the ring


@dataclasses.dataclass(frozen=True)
class SelfTestOutcome:
    """The verdict every rank draws from the gathered self-test reports."""

    ok: bool
    reason: str  # why it failed ("" when ok)
    notes: list[str]  # for Transport.notes when ok
    bytes_per_ms: float | None  # measured link bandwidth (slowest pair), None if not measured


def decide_self_test(reports: list[dict[str, Any]]) -> SelfTestOutcome:
    """Combine every rank's self-test report (a pure function: every rank decides the same).

    A report is ``{"rank", "error": str, "checks": [{"src", "dst", "staging", "bytes", "ok",
    "error"}], "links": [{"a", "b", "staging", "bytes", "one_way_ms"}]}``: ``checks`` are the
    channels this rank received on, ``links`` the ping-pong measurements it led.
    """
    checks = [c for r in reports for c in r.get("checks", [])]
    failures = [f"rank {c['src']} -> rank {c['dst']} ({c['staging']} staging): {c['error']}"
                for c in checks if not c["ok"]]
    failures += [f"rank {r['rank']}: {r['error']}" for r in reports if r.get("error")]
    if failures:
        return SelfTestOutcome(False, "CUDA IPC self-test failed: " + "; ".join(failures), [],
                               None)
    channels = ", ".join(f"{c['src']}->{c['dst']} ({c['staging']})"
                         for c in sorted(checks, key=lambda c: (c["src"], c["dst"])))
    sizes = sorted({int(c["bytes"]) for c in checks})
    notes = [(f"ipc self-test passed: {SELFTEST_MESSAGES} messages of "
              f"{', '.join(f'{b:,}' for b in sizes)} B each way through the real slots on "
              f"channels {channels}; checksums match")]
    links = [lk for r in reports for lk in r.get("links", [])]
    if not links:
        notes.append("ipc link not measured at set-up; the stage partitioner assumes "
                     f"{Transport.bytes_per_ms / 1e6:g} GB/s")
        return SelfTestOutcome(True, "", notes, None)

    def rate(lk: dict[str, Any]) -> float:  # bytes per ms
        return float(lk["bytes"]) / max(float(lk["one_way_ms"]), 1e-6)

    slowest = min(links, key=rate)
    bpm = rate(slowest)
    notes.append(f"ipc link measured at set-up: {slowest['bytes'] / 1e6:.1f} MB one-way in "
                 f"{slowest['one_way_ms']:.3f} ms = {bpm / 1e6:.1f} GB/s (rank {slowest['a']} "
                 f"<-> rank {slowest['b']}, {slowest['staging']} staging, ping-pong"
                 f"{', slowest of ' + str(len(links)) + ' pairs' if len(links) > 1 else ''}); "
                 f"the stage partitioner uses bytes_per_ms={bpm:.4g}")
    return SelfTestOutcome(True, "", notes, bpm)


def _gpu_wait(device: torch.device, deadline: float, what: str) -> None:
    """Wait for the current stream's work without blocking in the driver (a copy stuck on a
    dead peer's event would never return from a synchronize): poll an event until ``deadline``
    (time.monotonic()).

    Raises:
        PeerTimeoutError: the work did not finish in time.
    """
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    while not event.query():
        if time.monotonic() > deadline:
            raise PeerTimeoutError(f"{what}: the GPU work did not finish within the set-up limit "
                                   "(handshake_timeout_s); a peer's copies may be stuck")
        time.sleep(0.0002)


def _ping_pong(t: IpcTransport, a: int, b: int, nbytes: int, deadline: float) -> float:
    """One-way milliseconds of an ``nbytes`` message between ranks a and b: the time of
    PROBE_ROUND_TRIPS round trips (after one untimed) / (2 * PROBE_ROUND_TRIPS). Each message
    waits for the previous one, so neither the ring's depth nor host skew flatters the figure."""
    peer = b if t.rank == a else a
    what = f"IPC set-up link probe rank {a} <-> rank {b}"
    x = torch.zeros(nbytes, dtype=torch.uint8, device=t.device)
    y = torch.empty_like(x)
    sends = []

    def round_trip() -> None:  # x is only read and y only written: no reuse hazards
        if t.rank == a:
            sends.append(t.isend([x], peer, what=what))
            t.irecv([y], peer, what=what).wait()
        else:
            t.irecv([y], peer, what=what).wait()
            sends.append(t.isend([x], peer, what=what))

    round_trip()
    _gpu_wait(t.device, deadline, what)
    start = time.perf_counter()
    for _ in range(PROBE_ROUND_TRIPS):
        round_trip()
    for s in sends:
        s.wait()
    _gpu_wait(t.device, deadline, what)
    return (time.perf_counter() - start) * 1e3 / (2 * PROBE_ROUND_TRIPS)


def _run_self_test(t: IpcTransport, generation: int, probe_bytes: int,
                   deadline: float) -> dict[str, Any]:
    """This rank's self-test report (see :func:`decide_self_test`). Never raises: a local failure
    is reported, and the engine is aborted so peers blocked on this rank stop waiting now."""
    rank, dev = t.rank, t.device
    peers = [p for p in range(t.world_size) if p != rank]
    sizes = selftest_sizes(t.slot_bytes)
    report: dict[str, Any] = {"rank": rank, "error": "", "checks": [], "links": []}
    try:
        sends = [t.isend([selftest_pattern(_pattern_seed(generation, rank, p, m, k), n, dev)
                          for k, n in enumerate(sizes)], p,
                         what=f"IPC self-test message {m} rank {rank} -> rank {p}")
                 for p in peers for m in range(SELFTEST_MESSAGES)]
        received = []
        for p in peers:
            for m in range(SELFTEST_MESSAGES):
                bufs = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes]
                t.irecv(bufs, p, what=f"IPC self-test message {m} rank {p} -> rank {rank}").wait()
                for k, (n, buf) in enumerate(zip(sizes, bufs)):
                    seed = _pattern_seed(generation, p, rank, m, k)
                    received.append((p, m, k, seed, buf, checksum(buf),
                                     pattern_checksum(seed, n, dev)))
        for s in sends:
            s.wait()
        _gpu_wait(dev, deadline, "IPC self-test")
        errors: dict[int, list[str]] = {p: [] for p in peers}
        for p, m, k, seed, buf, got, want in received:
            if int(got) != int(want):
                count, first = pattern_mismatch(buf, seed)
                packed = sum(_aligned(n) for n in sizes[:k]) + first  # offset in the message
                errors[p].append(f"message {m} tensor {k} ({buf.numel():,} B): checksum "
                                 f"{int(got):#x}, expected {int(want):#x}; {count:,} byte(s) "
                                 f"differ, the first at offset {first:,} (in chunk "
                                 f"{packed // t.slot_bytes} of the message)")
        report["checks"] = [{"src": p, "dst": rank, "staging": t.staging[p],
                             "bytes": sum(sizes), "ok": not errors[p],
                             "error": "; ".join(errors[p])} for p in peers]
        if any(errors.values()):
            t._engine.abort("its IPC self-test found corrupted data")
            return report
        if probe_bytes > 0:
            world = range(t.world_size)
            for a, b in [(a, b) for a in world for b in world if a < b and rank in (a, b)]:
                ms = _ping_pong(t, a, b, probe_bytes, deadline)
                if rank == a:
                    report["links"].append({"a": a, "b": b, "staging": t.staging[b],
                                            "bytes": probe_bytes, "one_way_ms": ms})
    except Exception as exc:  # reported and gathered: every rank then decides the same
        report["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            t._engine.abort(f"its IPC self-test failed ({type(exc).__name__}: {exc})")
    return report


def _aligned(nbytes: int) -> int:
    """Offset of the next tensor in a message's packed layout (256-byte aligned)."""
    return -(-nbytes // 256) * 256


# ------------------------------------------------------------------------------------------------
# Collective construction


def _status(fn: Callable[[], bytes], rank: int) -> bytes:
    """b"OK" + fn(), or b"ER" + the error text: what a rank publishes after a local step."""
    try:
        return b"OK" + fn()
    except Exception as exc:
        return b"ER" + f"rank {rank}: {exc}".encode()


def _errors(statuses: list[bytes]) -> list[str]:
    return [b[2:].decode(errors="replace") for b in statuses if not b.startswith(b"OK")]


def make_ipc_transport(store: Any, rank: int, world_size: int, device: torch.device | int | str,
                       timeout_s: float, *, num_slots: int = DEFAULT_NUM_SLOTS,
                       slot_bytes: int | None = None, staging: str | None = None,
                       handshake_timeout_s: float | None = None, self_test: bool = True,
                       probe_bytes: int = DEFAULT_PROBE_BYTES) -> IpcTransport:
    """Build the IPC transport on every rank (collective; call it on all ranks in the same order).

    Args:
        store: the job's ``torch.distributed`` store (handles are exchanged through it once).
        rank, world_size: this rank and the number of ranks (all on this node).
        device: this rank's CUDA device; ``"cuda"`` without an index is the current device.
        timeout_s: seconds a transfer waits for a peer before PeerTimeoutError.
        num_slots: receive slots per incoming channel (>= 2).
        slot_bytes: bytes per slot (multiple of 256); messages larger than a slot are chunked.
            Default 32 MiB with device staging, 4 MiB with host staging.
        staging: "auto" | "device" | "host" (default: env HYBRIDIFF_RT_IPC_STAGING, else auto).
            "host" forces pinned host staging even where device memory could be mapped.
        handshake_timeout_s: seconds each wait of the set-up (slow ranks, the self-test) may
            take (default timeout_s). The self-test's verdict exchange waits up to twice that,
            the self-test itself being bounded by it.
        self_test: send a known pattern each way through the real slots and measure the link
            before returning (the result lands in ``transport.notes``; ``bytes_per_ms`` is set
            from the measurement).
        probe_bytes: size of the timed link measurement (0: not measured, ``bytes_per_ms`` stays
            the 1 GB/s default).

    Raises:
        CudaUnavailableError / ExtensionError: on every rank, naming the rank and the reason, when
            any rank cannot use IPC, the rings do not fit in /dev/shm, or the self-test failed;
            fall back to torch.distributed then.
        PeerTimeoutError: a rank did not take part in the set-up in time (it died, hangs, or
            never called this function).
    """
    hs_timeout = float(handshake_timeout_s if handshake_timeout_s is not None else timeout_s)
    staging = (staging or env.read(STAGING_ENV)).strip().lower()
    generation = (int(store.add("hybridiff_rt/ipc/generation", 1)) - 1) // world_size
    key = f"hybridiff_rt/ipc/{generation}"
    what = f"IPC transport set-up (rank {rank} of {world_size})"
    settings = {"staging": staging, "num_slots": int(num_slots),
                "slot_bytes": None if slot_bytes is None else int(slot_bytes),
                "self_test": bool(self_test), "probe_bytes": int(probe_bytes)}

    # 1. who is where, and can everyone use IPC?
    dev: torch.device | None = None
    try:
        if staging not in STAGING_CHOICES:
            raise ExtensionError(f"staging must be one of {STAGING_CHOICES}, got {staging!r} "
                                 f"(argument or {STAGING_ENV})")
        dev = resolve_device(device)
        info = _local_info(rank, dev, settings)
    except Exception as exc:  # still publish, so the other ranks fail fast, not by timeout
        info = {"rank": rank, "ok": False, "reason": str(exc)}
    infos = [json.loads(b) for b in gather_bytes(store, f"{key}/info", rank, world_size,
                                                 json.dumps(info).encode(), hs_timeout, what)]
    plan = plan_rings(infos, _segment_bytes)
    assert dev is not None  # plan_rings refused unless every rank's info was ok
    my_staging = {p: plan.pair[rank][p] for p in range(world_size) if p != rank}

    # 2.-4. below hold an engine: a peer that is truly absent (PeerTimeoutError) must not leak it
    engine: Any = None
    transport: IpcTransport | None = None
    try:
        # 2. allocate the rings and exchange handles
        def create() -> bytes:
            nonlocal engine
            c = _require_cuda_extension()
            with _native(what):  # set-up waits (the self-test) use the handshake limit
                engine = c.Engine(rank, world_size, dev.index, plan.num_slots, plan.slot_bytes,
                                  _ms(hs_timeout), f"/hdrt{os.getpid()}_{secrets.token_hex(4)}",
                                  [1 if plan.pair[rank][p] == "host" else 0
                                   for p in range(world_size)])
                return engine.export_handles()

        blobs = gather_bytes(store, f"{key}/handles", rank, world_size, _status(create, rank),
                             hs_timeout, what)
        errors = _errors(blobs)
        if errors:
            if engine is not None:
                engine.close()
            raise ExtensionError("CUDA IPC transport set-up failed; " + "; ".join(errors))

        # 3. import the peers' handles; all ranks must succeed before anyone proceeds
        def connect() -> bytes:
            nonlocal transport
            # a peer pid this process cannot see (another pid namespace) cannot be watched
            watched = {p: int(infos[p]["pid"]) for p in range(world_size)
                       if p != rank and _pid_visible(int(infos[p]["pid"]))}
            with _native(what):
                for p in range(world_size):
                    if p != rank:
                        engine.connect(p, blobs[p][2:], p in watched)
                if not self_test:  # transfers from here on use the transfer limit
                    engine.set_timeout(_ms(timeout_s))
            transport = IpcTransport(engine, rank, world_size, dev, timeout_s, store, key,
                                     my_staging, plan.slot_bytes, plan.num_slots, watched)
            return b""

        results = gather_bytes(store, f"{key}/connected", rank, world_size,
                               _status(connect, rank), hs_timeout, what)
        errors = _errors(results)
        if errors:
            engine.close()
            raise ExtensionError("CUDA IPC transport set-up failed while importing handles; " +
                                 "; ".join(errors))
        engine.unlink_shm()  # every peer has mapped the segments: no name can leak from here on
        assert transport is not None
        if not self_test:
            transport.notes.append("ipc self-test skipped (self_test=False); the stage "
                                   f"partitioner assumes {transport.bytes_per_ms / 1e6:g} GB/s")
            return transport

        # 4. the self-test through the real slots, and the link measurement
        report = _run_self_test(transport, generation, int(probe_bytes),
                                time.monotonic() + hs_timeout)
        if not report["error"]:
            try:  # this rank's transfers are done: from here on the transfer limit applies
                with _native(what):
                    engine.set_timeout(_ms(timeout_s))
            except ExtensionError as exc:
                report["error"] = str(exc)
        reports = [json.loads(b) for b in gather_bytes(
            store, f"{key}/selftest", rank, world_size, json.dumps(report).encode(),
            2 * hs_timeout, what + ": self-test verdicts")]
    except PeerTimeoutError:  # a peer is truly absent: free what this rank holds, then say so
        if transport is not None:
            transport._abandon("a peer did not take part in the IPC set-up")
        elif engine is not None:
            engine.close()
        raise
    outcome = decide_self_test(reports)
    if not outcome.ok:
        transport.close()  # every rank does, from the same verdicts
        raise ExtensionError(outcome.reason)
    transport.notes.extend(outcome.notes)
    if outcome.bytes_per_ms is not None:
        transport.bytes_per_ms = outcome.bytes_per_ms
        transport.link_measured = True
    return transport


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _segment_bytes(num_slots: int, slot_bytes: int, with_data: bool) -> int:
    """/dev/shm bytes of one channel's ring (the extension knows its control block's size)."""
    return int(_require_cuda_extension().ring_segment_bytes(num_slots, slot_bytes, with_data))


def try_make_ipc_transport(store: Any, rank: int, world_size: int,
                           device: torch.device | int | str, timeout_s: float,
                           **kwargs: Any) -> tuple[IpcTransport | None, str]:
    """:func:`make_ipc_transport`, or ``(None, reason)`` on every rank when IPC cannot be used or
    its set-up failed (no CUDA, several nodes, /dev/shm too small, a handle import failed, the
    self-test found corrupted data or a stuck channel). The decision is collective, so all ranks
    fall back to torch.distributed together.

    Raises:
        PeerTimeoutError: a peer is truly absent (it never published its part of the set-up
            within the handshake limit): an error, not a fallback, since that rank would not fall
            back either.
    """
    try:
        return make_ipc_transport(store, rank, world_size, device, timeout_s, **kwargs), ""
    except (CudaUnavailableError, ExtensionError) as exc:
        return None, str(exc)
