"""Compiled and graph-replayed denoiser calls: ``HybridConfig(compile=..., cuda_graphs=...)``.

:class:`Accelerator` hands the runtime two kinds of callables, built once per denoiser and kept
across runs (so compiled code and captured graphs are reused):

* :meth:`Accelerator.forward` -> ``forward(**kw)``: the whole denoiser, a drop-in for
  ``model.forward`` with the same outputs (CBP and serial steps);
* :meth:`Accelerator.stage_call` -> ``call(kw, state) -> state | prediction``: one pipeline
  stage, ``prepare(**kw)`` then units ``[start, stop)`` on ``state`` (``None``: the step's own
  initial state) and, for the last stage, ``finish`` (pipelined steps).

Each is the plain function wrapped, from the inside out, by
  1. ``torch.compile(fn, mode=..., backend=compile_backend, dynamic=False)`` when compile is not
     "off" (:class:`CompiledCallable`; one dynamo cache per callable, static shapes);
  2. explicit CUDA-graph capture when cuda_graphs="on" (:class:`~.graphs.GraphedCallable`).
With torch's own CUDA-graph trees (compile "reduce-overhead" / "max-autotune" on CUDA with
cuda_graphs="auto") outputs are cloned out of graph memory (the same rule as
:class:`~.graphs.GraphedCallable`, see graphs.py) and every call starts a new graph-tree step.

Fallbacks, never errors: a compile that raises, more input layouts than a callable keeps
(:data:`MAX_LAYOUTS`), cuda_graphs="on" on a CPU device, a capture that raises: the callable runs
eagerly from then on and the reason is noted (``note``) and listed in :meth:`summary`, which the
runtime stores as ``RunReport.extra["compile"]``. A genuine error of the call itself (bad
inputs) is raised by the eager call, unchanged.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import torch

from ..config import HybridConfig
from ..errors import ConfigError
from ..stages import StagedDenoiser
from . import graphs
from .graphs import (
    MAX_LAYOUTS,
    CudaGraphBackend,
    EmulatedGraphBackend,
    GraphedCallable,
    describe_error,
    flatten_args,
    rebuild_args,
)

#: compile modes whose torch.compile replays CUDA graphs itself (cudagraph trees) on CUDA
TREE_MODES = ("reduce-overhead", "max-autotune")


def _fresh_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of Python function ``fn`` with its own code object: dynamo keeps its compiled
    code and recompile count per code object, so every callable gets its own cache instead of
    sharing one (and its recompile limit) with every other denoiser of the process."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledCallable:
    """``torch.compile`` of ``fn`` with eager fallback (see the module docstring).

    Args:
        fn: a plain Python function (closures are fine).
        name: label for notes.
        mode: torch.compile mode ("default", "reduce-overhead", "max-autotune",
            "max-autotune-no-cudagraphs").
        backend: torch.compile backend name.
        note: called with a remark when the callable falls back to eager.
        clone_outputs: clone every output tensor and mark a new graph-tree step before each
            call (torch's CUDA-graph trees own their outputs).
    """

    def __init__(self, fn: Callable[..., Any], name: str, mode: str, backend: str,
                 note: Callable[[str], None], clone_outputs: bool = False,
                 max_layouts: int = MAX_LAYOUTS) -> None:
        self.fn = fn
        self.name = name
        self._note = note
        self.clone_outputs = clone_outputs
        self.max_layouts = max_layouts
        self._compiled = torch.compile(_fresh_function(fn), mode=None if mode == "default"
                                       else mode, backend=backend, dynamic=False)
        self._seen: dict[Any, float] = {}  # layout -> seconds its first (compiling) call took
        #: why this callable runs eagerly (None while it is compiled)
        self.disabled: str | None = None

    @property
    def compile_s(self) -> float:
        """Seconds the first call of each layout took (tracing + code generation + the call)."""
        return float(sum(self._seen.values()))

    @property
    def layouts(self) -> int:
        return len(self._seen)

    def __call__(self, *args: Any) -> Any:
        if self.disabled is not None:
            return self.fn(*args)
        _, layout = flatten_args(args)
        first = layout not in self._seen
        if first and len(self._seen) >= self.max_layouts:
            self._give_up(f"more than {self.max_layouts} input layouts (dynamic shapes are not "
                          "compiled)")
            return self.fn(*args)
        started = time.perf_counter()
        try:
            if self.clone_outputs:
                torch.compiler.cudagraph_mark_step_begin()
            out = self._compiled(*args)
        except Exception as exc:  # noqa: BLE001 (any compiler failure: run eagerly)
            out = self.fn(*args)  # a genuine error of the call raises here, unchanged
            self._give_up(f"torch.compile failed ({describe_error(exc)})")
            return out
        if first:
            self._seen[layout] = time.perf_counter() - started
        if self.clone_outputs:
            tensors, out_layout = flatten_args(out)
            out = rebuild_args(out_layout, iter([t.clone() for t in tensors]), out)
        return out

    def _give_up(self, reason: str) -> None:
        self.disabled = reason
        self._note(f"{self.name}: torch.compile off from here on, ran eagerly: {reason}")


class Accelerator:
    """Builds and keeps the compiled / graph-replayed callables of one denoiser.

    Args:
        cfg: the run's HybridConfig (fields ``compile``, ``compile_backend``, ``cuda_graphs``).
        device: the device the model runs on.
        note: called with remarks for the current RunReport (late-bound by the runtime).
    """

    def __init__(self, cfg: HybridConfig, device: torch.device,
                 note: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.device = device
        self._note_to_report = note
        self.notes: list[str] = []  # every remark so far (a new run's report gets them again)
        self._calls: dict[Any, Any] = {}
        self._graph_backend = None
        cuda = device.type == "cuda"
        if cfg.compile != "off":
            _check_backend(cfg.compile_backend)
        self.compile_mode = cfg.compile
        self.graphs = "off"
        if cfg.cuda_graphs == "on":
            if cuda:
                self.graphs = "cuda-graph"
            elif graphs.emulating_on_cpu():
                self.graphs = "emulated-graph"
            else:
                self.note(f"cuda_graphs='on' needs a CUDA device; this rank runs on "
                          f"{device.type}, so calls run without graph replay")
        elif cfg.compile in TREE_MODES and cfg.cuda_graphs == "auto" and cuda:
            self.graphs = "torch-cudagraph-trees"
        elif cfg.compile in TREE_MODES and not cuda:
            self.note(f"compile={cfg.compile!r} on {device.type}: compiled without CUDA graphs "
                      "(they exist on CUDA devices only)")
        if cfg.compile == "max-autotune" and self.graphs in ("cuda-graph", "off") and cuda:
            self.compile_mode = "max-autotune-no-cudagraphs"  # graphs are ours, or none

    @property
    def enabled(self) -> bool:
        """Whether any call is compiled or graph-replayed (False: plain eager calls)."""
        return self.cfg.compile != "off" or self.graphs in ("cuda-graph", "emulated-graph")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        self._note_to_report(text)

    def forward(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` (the model's own) accelerated: same keyword arguments, same outputs
        (tuples, or diffusers' output classes), one compiled / captured callable per denoiser
        whatever the arguments' layout."""
        # one callable per forward (bound methods compare equal per model): a pipeline with two
        # experts (Wan 2.2) gets one per expert, never the other's compiled code or graphs
        key = ("model", forward)
        if key not in self._calls:
            def denoiser(kw):
                return forward(**kw)
            earlier = sum(1 for k in self._calls if k[0] == "model")
            self._calls[key] = self._wrap(denoiser, "denoiser" if not earlier
                                          else f"denoiser {earlier + 1}")
        call = self._calls[key]

        def accelerated(**kw):
            return call(kw)
        return accelerated

    def stage_call(self, staged: StagedDenoiser, start: int, stop: int,
                   last: bool) -> Callable[[dict, Any], Any]:
        """``call(kw, state)``: one stage of the pipeline, accelerated (cached per staged
        denoiser and range: two experts of one class have the same ranges, not the same weights)."""
        key = ("stage", id(staged), start, stop, last)
        if key not in self._calls:
            self._calls[key] = self._wrap(stage_function(staged, start, stop, last),
                                          f"stage units {start}..{stop - 1}")
        return self._calls[key]

    def summary(self) -> dict[str, Any]:
        """What ran how, for ``RunReport.extra["compile"]``: settings, and per callable its
        state ("compiled", "graphed", "compiled+graphed", "eager"), layouts, first-call seconds
        (compile time included) and the reason for any fallback."""
        calls = {}
        for wrapper in self._calls.values():
            compiled = wrapper.inner if isinstance(wrapper, _Stack) else wrapper
            graphed = wrapper.graphed if isinstance(wrapper, _Stack) else None
            entry: dict[str, Any] = {}
            states = []
            if isinstance(compiled, CompiledCallable):
                entry["compile_s"] = round(compiled.compile_s, 3)
                entry["compiled_layouts"] = compiled.layouts
                if compiled.disabled:
                    entry["compile_fallback"] = compiled.disabled
                else:
                    states.append("compiled")
            if graphed is not None:
                entry["graph_layouts"] = graphed.layouts
                entry["replays"] = graphed.replays
                if graphed.disabled:
                    entry["graph_fallback"] = graphed.disabled
                else:
                    states.append("graphed")
            entry["state"] = "+".join(states) or "eager"
            calls[getattr(wrapper, "name", "?")] = entry
        return {"compile": self.cfg.compile, "compile_mode": self.compile_mode,
                "backend": self.cfg.compile_backend if self.cfg.compile != "off" else None,
                "cuda_graphs": self.cfg.cuda_graphs, "graphs": self.graphs, "calls": calls}

    # ---------------------------------------------------------------------------------------
    def _wrap(self, fn: Callable[..., Any], name: str) -> Any:
        inner: Any = fn
        if self.cfg.compile != "off":
            inner = CompiledCallable(fn, name, self.compile_mode, self.cfg.compile_backend,
                                     self.note,
                                     clone_outputs=self.graphs == "torch-cudagraph-trees")
        graphed = None
        if self.graphs in ("cuda-graph", "emulated-graph"):
            if self._graph_backend is None:
                self._graph_backend = (CudaGraphBackend(self.device) if self.graphs == "cuda-graph"
                                       else EmulatedGraphBackend(self.device))
            graphed = GraphedCallable(inner, name, self._graph_backend, self.note)
        return _Stack(name, inner, graphed)


def _check_backend(name: str) -> None:
    """ConfigError naming the known backends when torch.compile has no backend ``name``."""
    import torch._dynamo

    try:
        torch._dynamo.lookup_backend(name)
    except Exception as exc:  # noqa: BLE001 (torch's InvalidBackend; its module moves between versions)
        known = ", ".join(repr(b) for b in torch._dynamo.list_backends(exclude_tags=()))
        raise ConfigError(f"compile_backend={name!r} is not a torch.compile backend here "
                          f"({type(exc).__name__}); choose one of {known}") from None


class _Stack:
    """The callable the runtime calls: the graph wrapper if any, else the compiled one."""

    def __init__(self, name: str, inner: Any, graphed: GraphedCallable | None) -> None:
        self.name = name
        self.inner = inner
        self.graphed = graphed
        self._call = graphed if graphed is not None else inner

    def __call__(self, *args: Any) -> Any:
        return self._call(*args)


def stage_function(staged: StagedDenoiser, start: int, stop: int,
                   last: bool) -> Callable[[dict, Any], Any]:
    """The plain (eager) stage: ``prepare(**kw)``, units ``[start, stop)`` on ``state`` (None:
    the step's initial state), then ``finish`` when ``last`` (returns the prediction tensor),
    else the state after unit ``stop - 1``."""
    def stage(kw, state):
        ctx = staged.prepare(**kw)
        out = staged.run(ctx.initial_state if state is None else state, ctx, start, stop)
        return staged.finish(out, ctx) if last else out
    return stage
