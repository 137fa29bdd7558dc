"""Explicit CUDA-graph capture and replay of a callable with static input layouts.

:class:`GraphedCallable` wraps ``fn(*args)`` whose arguments are nested dicts, lists, tuples and
dataclasses of tensors and plain values. The first call with a new *layout* (the nesting, every
tensor's shape, dtype, device and strides, every plain value) captures ``fn`` into a graph on
static input buffers; later calls with that layout copy their tensors into the buffers and
replay. Plain values are baked into the capture, so a value that changes every call (a Python
float timestep) makes a new layout every call: past ``max_layouts`` layouts the callable gives up
on graphs and runs ``fn`` eagerly, with a reason (:attr:`GraphedCallable.disabled`).

The rule that keeps results alive across replays: a graph's outputs live in memory the graph owns,
and the next replay of the same graph overwrites them. Every tensor a caller may keep past the
next replay (a stale boundary state kept for the next pipelined step, a state still being sent
on a transfer stream, a prediction returned to the sampler) must not alias that memory, so
:class:`GraphedCallable` returns *clones* of the static outputs (one device copy per output;
a U-Net boundary state at 1024x1024 is about 40 MB, tens of microseconds on an H100). The same rule
applies to torch's own CUDA-graph trees (``torch.compile(mode="reduce-overhead")``):
:func:`detach_outputs` clones their outputs (see compiled.py).

CPU tensors among the inputs of a CUDA graph (e.g. a 0-d timestep) are staged into static
*device* buffers, so ``fn`` sees them on the graph's device (the denoisers move a CPU timestep to
the sample's device first thing, so the arithmetic is the same).

Graph back-ends: ``CudaGraphBackend`` (``torch.cuda.CUDAGraph``, warm-up on a side stream, one
memory pool shared by the graphs of one owner: they replay one at a time) and
``EmulatedGraphBackend``, a CPU stand-in for tests (:func:`emulate_on_cpu`): capture
runs ``fn`` once on the static inputs, replay runs it again and writes the results *into* the same
static output tensors, so outputs are overwritten exactly as a real replay overwrites them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

Layout = tuple
"""A hashable description of an argument structure (see :func:`flatten_args`)."""

#: Layouts a GraphedCallable captures before it gives up (input shapes that keep changing).
MAX_LAYOUTS = 4
_EMULATE_ON_CPU = [False]


def emulate_on_cpu(on: bool = True) -> None:
    """Tests only: make ``cuda_graphs="on"`` on a CPU device capture and replay an emulated graph
    (:class:`EmulatedGraphBackend`, the same memory semantics) in this process, instead of
    running without graphs, so the capture / replay / clone path runs without a GPU."""
    _EMULATE_ON_CPU[0] = bool(on)


def emulating_on_cpu() -> bool:
    """Whether :func:`emulate_on_cpu` is on in this process."""
    return _EMULATE_ON_CPU[0]


def describe_error(exc: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line (at most ``limit`` characters), with the wrapped cause of a
    wrapper exception (torch's BackendCompilerFailed holds the compiler's own error)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    inner = getattr(exc, "inner_exception", None) or exc.__cause__
    if inner is not None and str(inner).strip() and str(inner).strip() not in text:
        out += f" <- {describe_error(inner, limit)}"
    return out[:limit]


def flatten_args(obj: Any) -> tuple[list[torch.Tensor], Layout]:
    """``(tensors, layout)``: the tensor leaves of ``obj`` in traversal order and a hashable
    layout holding everything else (structure, tensor metadata, plain values, other objects by
    identity). Two argument sets with equal layouts differ only in tensor contents."""
    tensors: list[torch.Tensor] = []
    return tensors, _layout(obj, tensors)


def _layout(obj: Any, tensors: list[torch.Tensor]) -> Layout:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device, obj.stride())
    if isinstance(obj, dict):  # before dataclasses: diffusers' outputs are both
        return ("dict", type(obj), tuple((k, _layout(v, tensors)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return (type(obj).__name__, tuple(_layout(v, tensors) for v in obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj), tuple((f.name, _layout(getattr(obj, f.name), tensors))
                                              for f in dataclasses.fields(obj)))
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return ("value", type(obj), obj)
    return ("object", type(obj), id(obj))  # baked into the capture: the same object only


def rebuild_args(layout: Layout, tensors: Iterator[torch.Tensor], template: Any) -> Any:
    """The structure ``template`` (whose layout is ``layout``) with its tensor leaves replaced by
    the next tensors of ``tensors``, in :func:`flatten_args` order."""
    kind = layout[0]
    if kind == "tensor":
        return next(tensors)
    if kind == "dict":
        items = {k: rebuild_args(sub, tensors, template[k]) for k, sub in layout[2]}
        return items if layout[1] is dict else layout[1](**items)  # e.g. UNet2DConditionOutput
    if kind in ("list", "tuple"):
        items = [rebuild_args(sub, tensors, t) for sub, t in zip(layout[1], template)]
        return items if kind == "list" else tuple(items)
    if kind == "dataclass":
        out = object.__new__(type(template))
        for name, sub in layout[2]:
            object.__setattr__(out, name, rebuild_args(sub, tensors, getattr(template, name)))
        return out
    return template


class CudaGraphBackend:
    """``torch.cuda.CUDAGraph`` capture on ``device``; graphs of one backend share a pool."""

    name = "cuda-graph"

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        self.device = device
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """(graph, outputs of the captured call) after ``warmup`` eager calls on a side stream."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the transports' worker threads may issue CUDA calls meanwhile; only this
        # thread's calls are checked against the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    @staticmethod
    def replay(graph: Any) -> None:
        graph.replay()


class _EmulatedGraph:
    def __init__(self, fn: Callable[[], Any], out: Any) -> None:
        self.fn = fn
        self.outputs, _ = flatten_args(out)

    def replay(self) -> None:
        fresh, _ = flatten_args(self.fn())
        for static, value in zip(self.outputs, fresh):
            static.copy_(value)  # the static output memory is overwritten, as on a GPU


class EmulatedGraphBackend:
    """CPU stand-in with a real graph's memory semantics (tests only): see the module docstring."""

    name = "emulated-graph"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        out = fn()
        return _EmulatedGraph(fn, out), out

    @staticmethod
    def replay(graph: Any) -> None:
        graph.replay()


@dataclasses.dataclass
class _Captured:
    inputs: list[torch.Tensor]      # static input buffers (device)
    graph: Any
    outputs: list[torch.Tensor]     # static outputs, owned by the graph
    out_layout: Layout
    out_template: Any


class GraphedCallable:
    """``fn`` replayed from a graph per input layout; see the module docstring.

    Args:
        fn: the callable; must be capturable (no host synchronisation, no CPU tensors created
            from device values, no data-dependent shapes) for its layouts.
        name: label for notes ("denoiser", "stage 0", ...).
        backend: :class:`CudaGraphBackend` or :class:`EmulatedGraphBackend`.
        note: called with a human-readable remark when graphs are given up on.
        max_layouts: layouts captured before giving up.
    """

    def __init__(self, fn: Callable[..., Any], name: str, backend: Any,
                 note: Callable[[str], None], max_layouts: int = MAX_LAYOUTS) -> None:
        self.fn = fn
        self.name = name
        self.backend = backend
        self._note = note
        self.max_layouts = max_layouts
        self._graphs: dict[Layout, _Captured] = {}
        #: why graphs are off for this callable (None while they are on)
        self.disabled: str | None = None
        self.replays = 0

    @property
    def layouts(self) -> int:
        """Layouts captured so far."""
        return len(self._graphs)

    def __call__(self, *args: Any) -> Any:
        if self.disabled is not None:
            return self.fn(*args)
        tensors, layout = flatten_args(args)
        captured = self._graphs.get(layout)
        if captured is None:
            if len(self._graphs) >= self.max_layouts:
                self._give_up(f"more than {self.max_layouts} input layouts (shapes or plain "
                              "values that change from call to call, e.g. a Python-number "
                              "timestep: pass it as a tensor)")
                return self.fn(*args)
            try:
                captured = self._capture(args, tensors, layout)
            except Exception as exc:  # noqa: BLE001 (graphs are an optimisation: eager is always correct)
                self._give_up(f"capture failed ({describe_error(exc)})")
                return self.fn(*args)
            self._graphs[layout] = captured
        for static, value in zip(captured.inputs, tensors):
            static.copy_(value, non_blocking=True)
        self.backend.replay(captured.graph)
        self.replays += 1
        # the clone rule: nothing returned aliases memory the next replay overwrites
        clones = iter([t.clone() for t in captured.outputs])
        return rebuild_args(captured.out_layout, clones, captured.out_template)

    def _capture(self, args: tuple, tensors: list[torch.Tensor], layout: Layout) -> _Captured:
        device = self.backend.device
        inputs = [t.detach().to(device=device, copy=True) for t in tensors]
        static_args = rebuild_args(layout, iter(inputs), args)
        graph, out = self.backend.capture(lambda: self.fn(*static_args))
        outputs, out_layout = flatten_args(out)
        return _Captured(inputs, graph, outputs, out_layout, out)

    def _give_up(self, reason: str) -> None:
        self._graphs.clear()
        self.disabled = reason
        self._note(f"{self.name}: CUDA graphs off from here on, ran eagerly: {reason}")
