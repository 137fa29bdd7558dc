"""Same-node CUDA IPC transport: the Python face of the C++ transfer engine ``hybridiff_rt._C``.

This module is the only importer of ``_C``. It imports cleanly when the extension is missing or
was built without CUDA; the functions below then report why IPC is unavailable.

How a transport is set up (``make_ipc_transport``), once per job, through the
``torch.distributed`` store:

1. every rank publishes what it is (pid, host, boot id, device UUID, the devices it sees and their
   peer access) and whether IPC can work here;
2. every rank computes the same per-pair staging from that: ``device`` (the receiver's slots are
   mapped into the sender with CUDA IPC: same GPU, or two GPUs with peer access both ways) or
   ``host`` (pinned shared host memory, chunked, when the GPUs cannot map each other);
3. each rank allocates its receive rings and publishes its handle blob; each rank imports its
   peers' blobs; only when all ranks succeeded is the transport returned, on all ranks. Any failure
   raises :class:`ExtensionError` (or :class:`CudaUnavailableError`) on *every* rank, so callers can
   fall back to torch.distributed together (see :func:`try_make_ipc_transport`).

Shapes and units: tensors are moved as-is (same dtype and shape on both sides); sizes are in bytes,
timeouts in seconds on the Python side (milliseconds in ``_C``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import socket
import sys
from collections import deque
from typing import Any, Iterator, Sequence

import torch

from .. import env
from ..errors import CudaUnavailableError, ExtensionError, PeerTimeoutError, ShapeError
from .base import PendingTransfer, Transport
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
STAGING_CHOICES = ("auto", "device", "host")
STAGING_ENV = "HYBRIDIFF_RT_IPC_STAGING"

_BUILD_HINT = ("build it with `pip install -e .` (a CUDA toolkit must be found at build time: "
               "nvcc on PATH or CUDA_HOME; HYBRIDIFF_RT_CUDA=on makes that mandatory)")


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


class _SendPending:
    """An enqueued send; ``wait()`` makes the current stream wait until the copy has read the
    source tensors (so they may be modified afterwards). The host does not block on the GPU."""

    def __init__(self, transport: "IpcTransport", dst: int, ticket: int, what: str,
                 keep: list[torch.Tensor]) -> None:
        self._t, self._dst, self._ticket, self._what, self._keep = transport, dst, ticket, what, keep
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        stream = torch.cuda.current_stream(self._t.device).cuda_stream
        with _native(self._what):
            self._t._engine.wait_sent(self._dst, self._ticket, stream)
        self._done = True
        self._keep = []


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
        for target, buf in zip(self._targets, self._buffers):
            if target is not buf:
                target.copy_(buf)
        self._done = True


class IpcTransport(Transport):
    """Moves tensors between ranks on one node through the C++ CUDA IPC engine.

    Build it with :func:`make_ipc_transport` (collectively, on every rank). Tensors must be CUDA
    tensors on ``device``. ``isend`` never blocks the host; ``irecv(...).wait()`` blocks the host
    only until the sender has *enqueued* the message, never on GPU work.
    """

    name = "ipc"

    def __init__(self, engine: Any, rank: int, world_size: int, device: torch.device,
                 timeout_s: float, store: Any, key: str, staging: dict[int, str],
                 slot_bytes: int, num_slots: int) -> None:
        super().__init__(rank, world_size, timeout_s)
        self._engine = engine
        self.device = device
        self._store = store
        self._key = key
        #: per peer rank: "device" or "host" staging.
        self.staging = dict(staging)
        self.slot_bytes = int(slot_bytes)
        self.num_slots = int(num_slots)
        self._recv_queues: dict[int, deque[_RecvPending]] = {
            p: deque() for p in range(world_size) if p != rank}
        self._copy_streams = {
            p: torch.cuda.ExternalStream(engine.copy_stream(p), device=device)
            for p in range(world_size) if p != rank}
        self._views: dict[int, bool] = {}
        self._closed = False

    # -- point to point -------------------------------------------------------------------------

    def _check_peer(self, peer: int, role: str, what: str) -> None:
        if self._closed:
            raise ExtensionError(f"{what}: the IPC transport is closed")
        if not isinstance(peer, int) or not 0 <= peer < self.world_size or peer == self.rank:
            raise ShapeError(f"{what}: {role} must be another rank in [0, {self.world_size}), "
                             f"got {peer!r} on rank {self.rank}")

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, *, what: str) -> PendingTransfer:
        """Enqueue ``tensors`` (each any shape/dtype, CUDA on ``device``) for rank ``dst``."""
        self._check_peer(dst, "dst", what)
        keep = []
        for t in tensors:
            _check_device_tensor(t, self.device, "sent tensors", what)
            keep.append(t if t.is_contiguous() else t.contiguous())
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with _native(what):
            ticket = self._engine.send(dst, [_ref(t) for t in keep], what, stream)
        copy_stream = self._copy_streams[dst]
        for t in keep:  # the caching allocator must not reuse them before the copy ran
            if t.numel():
                t.record_stream(copy_stream)
        self.bytes_sent += self.payload_bytes(keep)
        return _SendPending(self, dst, ticket, what, keep)

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
        """Drain this rank's copies, meet the other ranks (up to ``timeout_s``; a dead peer is
        skipped), then free the rings. The transport is unusable afterwards."""
        if self._closed:
            return
        self._closed = True
        timeout_ms = int(self.timeout_s * 1000)
        try:
            with _native("close"):
                self._engine.quiesce(timeout_ms)
            barrier(self._store, f"{self._key}/closed", self.world_size,
                           min(self.timeout_s, 10.0))
        except (PeerTimeoutError, ExtensionError, RuntimeError):
            pass  # a dead or stuck peer must not make close() hang
        finally:
            with _native("close"):
                self._engine.close()

    def __del__(self) -> None:  # best effort; close() is the documented way
        engine = getattr(self, "_engine", None)
        if engine is not None and not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                engine.close()


# ------------------------------------------------------------------------------------------------
# Collective construction through the torch.distributed store


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_visible(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_info(rank: int, device: torch.device) -> dict[str, Any]:
    ok, reason = ipc_available()
    info: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "host": socket.gethostname(),
                            "boot_id": _boot_id(), "ok": ok, "reason": reason}
    if ok:
        try:
            n = cuda_device_count()
            index = device.index if device.index is not None else torch.cuda.current_device()
            if not 0 <= index < n:
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


def make_ipc_transport(store: Any, rank: int, world_size: int, device: torch.device | int | str,
                       timeout_s: float, *, num_slots: int = DEFAULT_NUM_SLOTS,
                       slot_bytes: int | None = None, staging: str | None = None,
                       handshake_timeout_s: float | None = None) -> IpcTransport:
    """Build the IPC transport on every rank (collective; call it on all ranks in the same order).

    Args:
        store: the job's ``torch.distributed`` store (handles are exchanged through it once).
        rank, world_size: this rank and the number of ranks (all on this node).
        device: this rank's CUDA device.
        timeout_s: seconds a transfer waits for a peer before PeerTimeoutError.
        num_slots: receive slots per incoming channel (>= 2).
        slot_bytes: bytes per slot (multiple of 256); messages larger than a slot are chunked.
            Default 32 MiB with device staging, 4 MiB with host staging.
        staging: "auto" | "device" | "host" (default: env HYBRIDIFF_RT_IPC_STAGING, else auto).
            "host" forces pinned host staging even where device memory could be mapped.
        handshake_timeout_s: seconds to wait for slow ranks during set-up (default timeout_s).

    Raises:
        CudaUnavailableError / ExtensionError: on every rank, naming the rank and the reason, when
            any rank cannot use IPC; fall back to torch.distributed then.
        PeerTimeoutError: a rank did not take part in the set-up in time.
    """
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise CudaUnavailableError(f"the IPC transport needs a CUDA device, got {dev}")
    hs_timeout = float(handshake_timeout_s or timeout_s)
    staging = (staging or env.read(STAGING_ENV)).strip().lower()
    generation = (int(store.add("hybridiff_rt/ipc/generation", 1)) - 1) // world_size
    key = f"hybridiff_rt/ipc/{generation}"
    what = f"IPC transport set-up (rank {rank} of {world_size})"

    # 1. who is where, and can everyone use IPC?
    try:
        if staging not in STAGING_CHOICES:
            raise ExtensionError(f"staging must be one of {STAGING_CHOICES}, got {staging!r} "
                                 f"(argument or {STAGING_ENV})")
        info = _local_info(rank, dev)
    except Exception as exc:  # still publish, so the other ranks fail fast, not by timeout
        info = {"rank": rank, "ok": False, "reason": str(exc)}
    infos = [json.loads(b) for b in gather_bytes(store, f"{key}/info", rank, world_size,
                                            json.dumps(info).encode(), hs_timeout, what)]
    problems = [f"rank {i['rank']}: {i['reason']}" for i in infos if not i["ok"]]
    if not problems:
        if len({(i["host"], i["boot_id"]) for i in infos}) > 1:
            problems.append("ranks run on different nodes: " +
                            ", ".join(f"rank {i['rank']} on {i['host']}" for i in infos))
        if len({i["pid"] for i in infos}) < world_size:
            problems.append("several ranks share one process; CUDA IPC needs one process per rank")
    if problems:
        raise CudaUnavailableError("CUDA IPC transport unavailable; " + "; ".join(problems))
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
    my_staging = {p: pair[rank][p] for p in range(world_size) if p != rank}
    if slot_bytes is None:
        slot_bytes = (DEFAULT_HOST_SLOT_BYTES if "host" in my_staging.values() or
                      any("host" in row for row in pair) else DEFAULT_DEVICE_SLOT_BYTES)

    # 2. allocate the rings and exchange handles
    engine = None
    try:
        c = _require_cuda_extension()
        with _native(what):
            engine = c.Engine(rank, world_size, dev.index, int(num_slots), int(slot_bytes),
                              int(timeout_s * 1000), f"/hdrt{os.getpid()}_{secrets.token_hex(4)}",
                              [1 if pair[rank][p] == "host" else 0 for p in range(world_size)])
            status = b"OK" + engine.export_handles()
    except Exception as exc:
        status = b"ER" + f"rank {rank}: {exc}".encode()
    blobs = gather_bytes(store, f"{key}/handles", rank, world_size, status, hs_timeout, what)
    errors = [b[2:].decode(errors="replace") for b in blobs if not b.startswith(b"OK")]
    if errors:
        if engine is not None:
            engine.close()
        raise ExtensionError("CUDA IPC transport set-up failed; " + "; ".join(errors))

    # 3. import the peers' handles; all ranks must succeed before anyone proceeds
    try:
        with _native(what):
            for p in range(world_size):
                if p != rank:
                    engine.connect(p, blobs[p][2:], _pid_visible(infos[p]["pid"]))
        status = b"OK"
    except Exception as exc:
        status = b"ER" + f"rank {rank}: {exc}".encode()
    results = gather_bytes(store, f"{key}/connected", rank, world_size, status, hs_timeout, what)
    errors = [b[2:].decode(errors="replace") for b in results if not b.startswith(b"OK")]
    if errors:
        engine.close()
        raise ExtensionError("CUDA IPC transport set-up failed while importing handles; " +
                             "; ".join(errors))
    engine.unlink_shm()  # every peer has mapped the segments: no name can leak from here on
    return IpcTransport(engine, rank, world_size, dev, timeout_s, store, key, my_staging,
                        int(slot_bytes), int(num_slots))


def try_make_ipc_transport(store: Any, rank: int, world_size: int,
                           device: torch.device | int | str, timeout_s: float,
                           **kwargs: Any) -> tuple[IpcTransport | None, str]:
    """:func:`make_ipc_transport`, or ``(None, reason)`` on every rank when IPC cannot be used
    (the decision is collective, so all ranks fall back to torch.distributed together).
    PeerTimeoutError is not swallowed: a rank that never shows up is an error, not a fallback."""
    try:
        return make_ipc_transport(store, rank, world_size, device, timeout_s, **kwargs), ""
    except (CudaUnavailableError, ExtensionError) as exc:
        return None, str(exc)
