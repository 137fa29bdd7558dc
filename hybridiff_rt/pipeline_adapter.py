"""parallelize(pipe): run an unchanged diffusers pipeline with its CFG branches on two ranks.

The returned ParallelPipeline is called exactly like the pipeline. Underneath, the pipeline's
denoiser (``pipe.unet`` or ``pipe.transformer``) gets a forward proxy that splits the CFG-doubled
batch ``[uncond; cond]`` into its branches, hands them to one HybridDenoiser (the same engine a
custom sampling loop uses) and returns the doubled prediction, so the pipeline combines the
branches and steps its scheduler itself, identically on every rank. Pipelines that call their
denoiser once per branch (Wan, Qwen-Image, Flux true CFG) go through the two-call protocol of
:mod:`hybridiff_rt.two_call` instead.

Pipelines may share one denoiser, as diffusers' ``from_pipe`` and ``Pipeline(**pipe.components)``
make them do (text-to-image and img2img on the same U-Net): each may be parallelized, and the
denoiser's proxy hands every call to the wrapper whose call is running.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .config import HybridConfig
from .engine import HybridDenoiser, RunReport
from .engine.batch import guidance_value, join_cfg_batch
from .engine.branch_layout import batch_axes, frames_per_row, split_branch_kwargs
from .errors import HybridError, UnsupportedModelError
from .two_call import TwoCallSteps, experts_of, two_call_layout

DENOISER_ATTRIBUTES = ("unet", "transformer")
#: Batched pipelines that stack ``[cond; uncond]`` (cond first; read from their source): on two
#: ranks or more their halves are handed to the runtime in its ``[uncond; cond]`` roles, so that
#: pipelined steps stage the cond branch. A subclass is taken to keep its parent's order.
COND_FIRST_PIPELINES = frozenset({"LuminaPipeline", "DiTPipeline", "AceStepPipeline"})
_PROXY_MARK = "_hybridiff_rt_pipeline"
_NO_FORWARD = object()
_ALREADY = ("this pipeline's denoiser is already parallelized; call the object hr.parallelize "
            "returned the first time")


class SharedForward:
    """The forward proxy installed on one denoiser, shared by every ParallelPipeline that wraps a
    pipeline holding it (a model's ``_hybridiff_rt_pipeline`` attribute).

    Each wrapper registers a handler (its batch-splitting forward, or the two-call protocol's for
    one expert). A call of ``model.forward`` goes to the handler of the one wrapper whose call is
    running; outside any such call it is refused, because every rank must take part in each
    step. The forward the model had before (its class's, or an instance-level one such as an
    offloading hook's) is put back when the last wrapper unregisters.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.previous = model.__dict__.get("forward", _NO_FORWARD)
        self.handlers: dict[int, tuple[Any, Callable[..., Any]]] = {}
        #: what inspect.signature(model.forward) tells a pipeline that asks which inputs it takes
        self.__signature__ = inspect.signature(model.forward)
        model.forward = self
        setattr(model, _PROXY_MARK, self)

    @staticmethod
    def of(model: torch.nn.Module) -> "SharedForward | None":
        mark = getattr(model, _PROXY_MARK, None)
        return mark if isinstance(mark, SharedForward) else None

    @contextlib.contextmanager
    def unpatched(self) -> Iterator[None]:
        """Within the block ``model.forward`` is the forward the model had before the proxy (a
        new wrapper's engine takes that one, never the proxy)."""
        self._put_back()
        try:
            yield
        finally:
            self.model.forward = self

    def register(self, wrapper: Any, handler: Callable[..., Any]) -> None:
        self.handlers[id(wrapper)] = (wrapper, handler)

    def unregister(self, wrapper: Any) -> None:
        """Drop ``wrapper``'s handler; the last one out removes the proxy."""
        self.handlers.pop(id(wrapper), None)
        if not self.handlers and getattr(self.model, _PROXY_MARK, None) is self:
            self._put_back()
            delattr(self.model, _PROXY_MARK)

    def wraps(self, pipe: Any) -> bool:
        return any(wrapper.pipe is pipe for wrapper, _ in self.handlers.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        running = [handler for wrapper, handler in self.handlers.values() if wrapper._in_call]
        if len(running) != 1:
            raise HybridError("the denoiser of a parallelized pipeline was called outside a call "
                              "of the pipeline hr.parallelize returned; call that object (every "
                              "rank must take part in each step)" if not running else
                              "two parallelized pipelines sharing this denoiser are in a call at "
                              "once; call them one after the other")
        return running[0](*args, **kwargs)

    def _put_back(self) -> None:
        if self.previous is _NO_FORWARD:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self.previous


class ParallelPipeline:
    """A diffusers pipeline whose denoiser calls run through a HybridDenoiser.

    Attribute reads and writes go to the wrapped pipeline (``.pipe``), so ``pipe.scheduler``,
    ``pipe.to(...)`` and friends work unchanged. ``report`` is the RunReport of the last call.
    """

    def __init__(self, pipe: Any, cfg: HybridConfig | None = None) -> None:
        name = next((a for a in DENOISER_ATTRIBUTES if getattr(pipe, a, None) is not None), None)
        if name is None and isinstance(pipe, torch.nn.Module):
            raise UnsupportedModelError(
                f"hr.parallelize takes a diffusers pipeline, got the model {type(pipe).__name__}; "
                "for a denoiser in your own sampling loop use hr.HybridDenoiser(model, cfg)")
        if name is None:
            raise UnsupportedModelError(
                f"{type(pipe).__name__} has no .unet or .transformer denoiser; hybridiff_rt "
                "supports diffusers pipelines whose denoiser is pipe.unet or pipe.transformer "
                "(StableDiffusionXLPipeline, StableDiffusion3Pipeline, PixArtSigmaPipeline, "
                "WanPipeline, ...)")
        if isinstance(pipe, ParallelPipeline):
            raise HybridError(_ALREADY)
        layout = two_call_layout(pipe)
        experts = experts_of(pipe, layout) if layout is not None else [(name, getattr(pipe, name))]
        model = experts[0][1]
        proxies = [SharedForward.of(m) for _, m in experts]
        if any(p is not None and p.wraps(pipe) for p in proxies):
            raise HybridError(_ALREADY)
        no_stages = None
        if _image_guided(pipe):
            no_stages = (f"{type(pipe).__name__} guides with an image branch besides text "
                         "(image_guidance_scale): its batch stacks three guidance branches (text, "
                         "image, uncond); CBP splits its rows exactly, but no [uncond; cond] pair "
                         "exists whose discrepancy could time pipelined steps")
        object.__setattr__(self, "pipe", pipe)
        with contextlib.ExitStack() as unpatched:  # the engine takes the model's own forward
            for proxy in proxies:
                if proxy is not None:
                    unpatched.enter_context(proxy.unpatched())
            object.__setattr__(self, "engine",
                               HybridDenoiser(model, cfg, no_stages_reason=no_stages,
                                              experts=[m for _, m in experts[1:]]))
            forwards = [m.forward for _, m in experts]
        object.__setattr__(self, "_in_call", False)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_experts", [m for _, m in experts])
        object.__setattr__(self, "_call_args", {})
        object.__setattr__(self, "_signature", inspect.signature(forwards[0]))
        two_call = None
        if layout is not None:
            two_call = TwoCallSteps(self, layout, forwards)
            handlers = [self._expert_proxy(index) for index in range(len(experts))]
        else:
            handlers = [self._proxy_forward]
        object.__setattr__(self, "_two_call", two_call)
        object.__setattr__(self, "_cond_first", any(
            c.__name__ in COND_FIRST_PIPELINES for c in type(pipe).__mro__))
        for (_, expert), proxy, handler in zip(experts, proxies, handlers):
            (proxy or SharedForward(expert)).register(self, handler)

    @property
    def report(self) -> RunReport:
        return self.engine.report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.engine.reset(context=self._call_context(args, kwargs))
        if hasattr(self.pipe, "_num_timesteps"):
            self.pipe._num_timesteps = None  # the pipeline sets it again before its loop
        object.__setattr__(self, "_call_args", self._bound_call(args, kwargs))
        if self._two_call is not None:
            self._two_call.begin(self._call_args)
        object.__setattr__(self, "_in_call", True)
        try:
            out = self.pipe(*args, **kwargs)
        finally:
            object.__setattr__(self, "_in_call", False)
        if self._two_call is not None:
            self._two_call.end()
        self.engine.end_run()
        return out

    def _bound_call(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """This call's arguments by name, defaults applied ({} if they do not bind)."""
        try:
            bound = inspect.signature(self.pipe.__call__).bind(*args, **kwargs)
        except TypeError:
            return {}
        bound.apply_defaults()
        return dict(bound.arguments)

    def _expert_proxy(self, index: int):
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._two_call.forward(index, args, kwargs)
        return forward

    def _guided(self) -> bool:
        """Whether this call stacks guidance branches: the pipeline's own
        do_classifier_free_guidance where it has one, else its guidance_scale argument > 1 (as
        PixArt's loop decides) and, where the call takes one, image_guidance_scale >= 1 (as
        SDXL InstructPix2Pix's loop decides)."""
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if flag is not None:
            return bool(flag)
        scale = self._call_args.get("guidance_scale")
        image_scale = self._call_args.get("image_guidance_scale")
        if image_scale is not None and float(image_scale) < 1:
            return False
        return scale is None or float(scale) > 1

    def _guidance_scale(self) -> float | torch.Tensor:
        scale = getattr(self.pipe, "guidance_scale", None)
        if scale is None:
            scale = self._call_args.get("guidance_scale")
        return guidance_value(scale)

    def restore(self) -> Any:
        """Remove the forward proxy, release the runtime's transport and process group, and
        return the plain pipeline. This object is unusable afterwards."""
        for model in self._experts:
            proxy = SharedForward.of(model)
            if proxy is not None:
                proxy.unregister(self)
        self.engine.close()
        return self.pipe

    def _call_context(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """What every rank must agree on besides the denoiser inputs: the pipeline class, its
        scheduler (class and config) and every argument of this call (checked exactly at the
        first denoiser call; callbacks by name only)."""
        scheduler = getattr(self.pipe, "scheduler", None)
        context: dict[str, Any] = {
            "pipeline": type(self.pipe).__name__,
            # private config keys ("_use_default_values") are bookkeeping in set order
            "scheduler": [type(scheduler).__name__,
                          {k: v for k, v in dict(getattr(scheduler, "config", {}) or {}).items()
                           if not str(k).startswith("_")}],
        }
        try:
            bound = inspect.signature(self.pipe.__call__).bind(*args, **kwargs).arguments
        except TypeError:  # the pipeline itself will report the bad call
            bound = dict(kwargs, _positional=list(args))
        for name in sorted(bound):
            if name == "kwargs" and isinstance(bound[name], dict):
                for extra in sorted(bound[name]):
                    context[f"call.{extra}"] = bound[name][extra]
            else:
                context[f"call.{name}"] = bound[name]
        return context

    def _planned_calls(self) -> int:
        """Denoiser calls the pipeline will make in this call: what the pipeline records before
        its loop (``_num_timesteps``: after strength / denoising_start / denoising_end, and every
        call of a second-order scheduler), else the scheduler's timesteps from its begin index."""
        recorded = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
            return recorded
        scheduler = self.pipe.scheduler
        begin = getattr(scheduler, "begin_index", None) or 0
        return max(1, len(scheduler.timesteps) - int(begin))

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.pipe, name)
        if inspect.ismethod(value) and value.__self__ is self.pipe:
            return self._returning_self(value)
        return value

    def _returning_self(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """``method`` of the wrapped pipeline, except that where it returns the pipeline itself
        (``to``, ``half``-style methods) it returns this wrapper, so ``pipe = pipe.to(device)``
        keeps the parallelized pipeline."""
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            out = method(*args, **kwargs)
            return self if out is self.pipe else out
        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return f"ParallelPipeline({type(self.pipe).__name__}, rank={self.engine.rank}/" \
               f"{self.engine.world_size})"

    def _proxy_forward(self, *args: Any, **kwargs: Any) -> Any:
        kw = dict(self._signature.bind(*args, **kwargs).arguments)
        engine = self.engine
        step = engine._next_step
        num_steps = self._planned_calls() if step == 0 else None
        if kw.get("skip_layers") is not None:
            # skip-layer guidance: an extra single-branch call besides the CFG call of a step;
            # every rank computes it itself, the step does not advance
            return engine.side_call(kw, "skip-layer guidance: its extra denoiser calls "
                                        "(skip_layers=...) ran whole on every rank")
        if not self._guided():
            return engine.serial_step(kw, step=step, num_steps=num_steps, reason=(
                "no classifier-free guidance in this call (guidance_scale <= 1, or the pipeline's "
                "own rule turned it off): no partitioning; "
                "every rank ran the whole batch"))
        sample = kw[engine.sample_key]
        problem = self._layout_problem(sample.shape[0])
        if problem:
            engine.refuse(problem, step=step, num_steps=num_steps)
        return_dict = kw.pop("return_dict", True)
        first_kw, second_kw = split_branch_kwargs(kw, sample.shape[0],
                                                  frames_per_row(self._model, sample),
                                                  batch_axes(self._model))
        # a world of one runs the joint batch as given, whatever its order
        swap = self._cond_first and engine.world_size > 1
        uncond_kw, cond_kw = (second_kw, first_kw) if swap else (first_kw, second_kw)
        uncond_pred, cond_pred = engine.predict_branches(
            uncond_kw, cond_kw, guidance_scale=self._guidance_scale(), step=step,
            num_steps=num_steps, joint_kw=kw)
        joined = (join_cfg_batch(cond_pred, uncond_pred) if swap
                  else join_cfg_batch(uncond_pred, cond_pred))
        return engine.output_kind.wrap(joined, return_dict)

    def _layout_problem(self, batch: int) -> str:
        """Why this denoiser batch is not the ``[uncond; cond]`` pair CBP splits ("" when it is).

        Perturbed-attention guidance stacks a third branch ``[uncond; cond; perturbed]`` whose
        attention is altered inside the model, so no half of the batch is a plain branch."""
        if getattr(self.pipe, "do_perturbed_attention_guidance", False):
            return (f"{type(self.pipe).__name__} runs perturbed-attention guidance (PAG): its "
                    "denoiser batch is [uncond; cond; perturbed], which hybridiff_rt cannot split "
                    "into two exact branches. Call it with pag_scale=0 (plain CFG), or use the "
                    "pipeline class without PAG")
        if batch % 2 and _image_guided(self.pipe):
            return (f"the denoiser batch has {batch} rows: {type(self.pipe).__name__} stacks "
                    "three guidance branches (text, image, uncond), which two ranks cannot "
                    "split evenly for an odd number of images. Ask for an even number of images "
                    "per call (num_images_per_prompt=2), whose rows CBP splits exactly")
        if batch % 2:
            return (f"the denoiser batch has {batch} rows, not an [uncond; cond] pair: "
                    f"{type(self.pipe).__name__} either stacks its guidance branches in a way "
                    "hybridiff_rt does not support, or calls its denoiser once per guidance "
                    "branch (two calls per step), which hybridiff_rt splits only for the "
                    "pipeline classes verified for it (two_call.TWO_CALL_PIPELINES). Run it "
                    "without hybridiff_rt, or without guidance")
        return ""


def _image_guided(pipe: Any) -> bool:
    """Whether ``pipe`` guides with an image branch besides text (InstructPix2Pix and kin: its
    ``__call__`` takes ``image_guidance_scale``), i.e. may stack ``[text; image; uncond]``."""
    try:
        return "image_guidance_scale" in inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return False


def parallelize(pipe: Any, cfg: HybridConfig | None = None) -> ParallelPipeline:
    """Wrap a diffusers pipeline so its CFG branches run on the ranks of the process group.

    Args:
        pipe: a diffusers pipeline whose denoiser (``pipe.unet`` or ``pipe.transformer``) it calls
            on the stacked batch ``[uncond; cond]``, or a verified two-call pipeline
            (:data:`hybridiff_rt.two_call.TWO_CALL_PIPELINES`); the same on every rank.
        cfg: HybridConfig; default HybridConfig().

    Returns:
        A ParallelPipeline, called exactly like ``pipe`` on every rank with the same arguments.
        With world size 1 it is a serial wrapper that still records a RunReport.
    """
    return ParallelPipeline(pipe, cfg)  # HybridDenoiser validates cfg before anything is wrapped


def last_report(pipe: Any) -> RunReport:
    """The RunReport of the last call of a parallelized pipeline (or of a HybridDenoiser)."""
    if isinstance(pipe, (ParallelPipeline, HybridDenoiser)):
        return pipe.report
    raise TypeError(f"last_report needs the object hr.parallelize returned or a HybridDenoiser, "
                    f"got {type(pipe).__name__}")

