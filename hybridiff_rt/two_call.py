"""Two-call CFG: pipelines that call their denoiser once per guidance branch in each step.

Wan, Lumina2, CogView4, Chroma, Cosmos, Qwen-Image, Flux and HunyuanVideo with
``true_cfg_scale > 1``, and HunyuanVideo 1.5 and Motif-Video through their guider, do not stack
``[uncond; cond]`` into one batch; each step calls the denoiser with the cond inputs and then
again with the uncond inputs, and only after the second call combines the two predictions.
The protocol that lets rank 1 compute the cond call while rank 0 computes the uncond call, with
the pipeline unchanged:

1. First call of a step: nothing runs. The inputs are kept and the call returns a *deferred
   buffer*: a :class:`~hybridiff_rt.deferred.DeferredPrediction` of the denoiser's parameter
   dtype, a tensor without a value yet, on which the loop may compute (the operations are
   recorded, and replayed on the prediction when it comes). The containers among
   the inputs (dicts, lists, tuples, nested) are copied: a loop may change a dict it passes to
   both calls in between (Chroma puts the negative IP-Adapter embeddings into its
   ``joint_attention_kwargs`` before the uncond call), and the first call must see it as it was
   when it was made.
2. Second call of the same step (same expert, same sample): the HybridDenoiser runs the step on
   both branches (CBP: one branch per rank, exchanged; or a pipelined step), the buffer returned
   by the first call is filled: re-pointed in place (``Tensor.set_``) at the first call's
   prediction, and what the loop computed from it replayed. The second call returns its own
   prediction.

This is exact only if the pipeline does not read the first call's result before the second call
returns (computing on it is fine: Cosmos 2's loops turn it into an x0 estimate, Motif-Video's
clone it). That cannot be checked at run time in general, so it is a property of each pipeline
class's loop, verified by a test that compares the two-rank output with the plain pipeline bit
for bit (tests/test_dit_pipelines.py): only the classes in :data:`TWO_CALL_PIPELINES` are
accepted, and the other pipelines known to call their denoiser per branch are refused by name
(:data:`UNVERIFIED_TWO_CALL`), as are subclasses of either. As run-time guards, the second call
must have the first call's expert, sample and timestep (else an error); a first call whose second
call never comes is an error at the end of the pipeline call; and reading the deferred buffer's
value or shape before it is filled is an error (:mod:`hybridiff_rt.deferred`; the verification is
what makes the protocol safe, not these guards).

The output shape is never guessed: the buffer takes the shape, strides and storage of the real
prediction when it is filled, and what the loop computed on it before (Kontext-like image edits
slice the reference image's tokens off the cond call's result, ``noise_pred[:, :n]``, before the
uncond call) is replayed on the real prediction then. The buffer's dtype must be fixed when it is
returned, so the prediction must come back in the denoiser's parameter dtype (true of every
verified class; a mismatch is an error at the first step, on every rank).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from .deferred import DeferredPrediction
from .engine.batch import guidance_value
from .engine.branch_layout import OutputKind
from .errors import HybridError, UnsupportedModelError


def _true_cfg(negative_pooled: str) -> Callable[[Any, dict[str, Any]], bool]:
    """Flux / Qwen-Image rule: true CFG when ``true_cfg_scale > 1`` and a negative prompt is
    given (as text, or as embeddings together with ``negative_pooled``)."""
    def guided(pipe: Any, args: dict[str, Any]) -> bool:
        has_negative = args.get("negative_prompt") is not None or (
            args.get("negative_prompt_embeds") is not None
            and args.get(negative_pooled) is not None)
        return float(args.get("true_cfg_scale", 1.0)) > 1 and has_negative
    return guided


def _pipeline_flag(pipe: Any, args: dict[str, Any]) -> bool:
    return bool(pipe.do_classifier_free_guidance)


def _guidance_above_one(pipe: Any, args: dict[str, Any]) -> bool:
    """Ovis-Image's, Nucleus-MoE-Image's and Kandinsky 5's rule (a local variable or a property
    of their loops): guided when ``guidance_scale > 1``."""
    return float(args.get("guidance_scale", 1.0)) > 1


def _lumina2_untruncated(pipe: Any, args: dict[str, Any], step: int) -> bool:
    """Lumina2's CFG truncation: step i makes its uncond call only while
    ``(i + 1) / num_inference_steps <= cfg_trunc_ratio``."""
    return (step + 1) / int(args["num_inference_steps"]) <= float(args["cfg_trunc_ratio"])


#: The diffusers guider classes the guider loops are verified with (exactly these classes):
#: their ``prepare_inputs`` makes the cond batch, then the uncond batch, and their combination
#: reads both predictions only after both calls (the adaptive projected ones with their momentum
#: too: each rank gets both predictions, so each keeps the same momentum).
VERIFIED_GUIDERS: tuple[str, ...] = ("ClassifierFreeGuidance", "AdaptiveProjectedGuidance",
                                     "AdaptiveProjectedMixGuidance")


def _verified(pipe: Any, attribute: str) -> Any:
    """The guider ``pipe.<attribute>`` if it is one of :data:`VERIFIED_GUIDERS`.

    Raises:
        UnsupportedModelError: another guider (perturbed-attention or skip-layer guidance, ...:
            more than two batches per step, or other combinations).
    """
    import diffusers.guiders

    guider = getattr(pipe, attribute, None)
    if not any(type(guider) is getattr(diffusers.guiders, name, None)
               for name in VERIFIED_GUIDERS):
        raise UnsupportedModelError(
            f"{type(pipe).__name__}.{attribute} is {type(guider).__name__}; hybridiff_rt splits "
            f"guider loops only with diffusers' {', '.join(VERIFIED_GUIDERS)} (one cond and one "
            f"uncond call per step, combined after both). Set pipe.{attribute} = "
            "ClassifierFreeGuidance(guidance_scale=...), or run this pipeline without "
            "hybridiff_rt")
    return guider


def verified_guider(pipe: Any, call_kwargs: dict[str, Any] | None = None) -> Any:
    """``pipe.guider`` if it is one of :data:`VERIFIED_GUIDERS`, the guiders the verified guider
    pipelines are tested with (a ``TwoCallLayout.guider_of``; raises UnsupportedModelError
    otherwise)."""
    return _verified(pipe, "guider")


def _hunyuan_image_guider(pipe: Any, call_kwargs: dict[str, Any]) -> Any:
    """The guider HunyuanImage's loops pick, by their own rule: ``ocr_guider`` when the prompt
    has text to render (its ByT5 embeddings, the cond call's ``encoder_hidden_states_2``, are not
    all zero) and the pipeline has one (the refiner has none), else ``guider``; None without
    either (a distilled model: one call per step)."""
    glyphs = call_kwargs.get("encoder_hidden_states_2")
    if (glyphs is not None and not bool(torch.all(glyphs == 0))
            and getattr(pipe, "ocr_guider", None) is not None):
        return _verified(pipe, "ocr_guider")
    if pipe.guider is not None:
        return _verified(pipe, "guider")
    return None


def _hunyuan_image_guiders(pipe: Any) -> None:
    """At ``hr.parallelize``: each guider HunyuanImage's loops may pick is a verified one."""
    for attribute in ("guider", "ocr_guider"):
        if getattr(pipe, attribute, None) is not None:
            _verified(pipe, attribute)


@dataclasses.dataclass(frozen=True)
class TwoCallLayout:
    """How one verified pipeline class makes its two calls per step.

    Attributes:
        first_branch: which branch the first call of a step carries ("cond" or "uncond").
        guided: ``guided(pipe, call_args)``: whether this pipeline call makes two calls per step
            (evaluated at its first denoiser call, when the pipeline has set its own state).
        scale_argument: the call argument holding the guidance scale (for the agreement check).
        experts: pipeline attributes of the denoisers the loop may call (all are proxied).
        step_guided: ``step_guided(pipe, call_args, step)``: whether step ``step`` of a guided
            call makes both calls (None: every step does), evaluated at the step's first call; a
            step that does not makes one cond call, run whole on every rank.
        guider_of: for loops that guide through a diffusers guider, instead of ``guided``,
            ``step_guided`` and ``scale_argument``: ``guider_of(pipe, call_kwargs)``, the guider
            the loop makes a step's calls through, read at each step's first denoiser call from
            the pipeline and that call's arguments (None: none, one call per step). The call is
            guided while the guider is enabled, a step makes both calls when the guider's
            ``num_conditions`` says two, and its ``guidance_scale`` is the scale.
        check: ``check(pipe)`` at ``hr.parallelize``, raising UnsupportedModelError for a
            pipeline of the class set up in a way the verification does not cover (None: none).
    """

    first_branch: str
    guided: Callable[[Any, dict[str, Any]], bool] | None = None
    scale_argument: str = "guidance_scale"
    experts: tuple[str, ...] = ("transformer",)
    step_guided: Callable[[Any, dict[str, Any], int], bool] | None = None
    guider_of: Callable[[Any, dict[str, Any]], Any] | None = None
    check: Callable[[Any], Any] | None = None


_WAN = TwoCallLayout("cond", _pipeline_flag, experts=("transformer", "transformer_2"))
_QWEN = TwoCallLayout("cond", _true_cfg("negative_prompt_embeds_mask"),
                      scale_argument="true_cfg_scale")
_FLUX = TwoCallLayout("cond", _true_cfg("negative_pooled_prompt_embeds"),
                      scale_argument="true_cfg_scale")
# a diffusers guider's loop: one call per batch its prepare_inputs makes, combined by the guider
_GUIDER = TwoCallLayout("cond", guider_of=verified_guider, check=verified_guider)
# ... the guider the loop picks per call
_HUNYUAN_IMAGE = TwoCallLayout("cond", guider_of=_hunyuan_image_guider,
                               check=_hunyuan_image_guiders)

#: Pipeline classes whose loops were verified (tests/test_dit_pipelines.py): the first call's
#: result is not read before the second call returns (computing on it is recorded and replayed:
#: the editing loops slice each call's result to the noisy tokens, the cond one's early).
TWO_CALL_PIPELINES: dict[str, TwoCallLayout] = {
    "WanPipeline": _WAN,
    "WanImageToVideoPipeline": _WAN,
    "WanVideoToVideoPipeline": TwoCallLayout("cond", _pipeline_flag),
    "LucyEditPipeline": _WAN,
    "WanVACEPipeline": _WAN,
    "ChronoEditPipeline": TwoCallLayout("cond", _pipeline_flag),
    "QwenImagePipeline": _QWEN,
    "QwenImageImg2ImgPipeline": _QWEN,
    "QwenImageInpaintPipeline": _QWEN,
    "QwenImageControlNetPipeline": _QWEN,
    "QwenImageControlNetInpaintPipeline": _QWEN,
    "QwenImageEditPipeline": _QWEN,
    "QwenImageEditPlusPipeline": _QWEN,
    "QwenImageEditInpaintPipeline": _QWEN,
    "FluxPipeline": _FLUX,
    "FluxImg2ImgPipeline": _FLUX,
    "FluxInpaintPipeline": _FLUX,
    "FluxControlNetPipeline": _FLUX,
    "HunyuanVideoPipeline": _FLUX,
    "HunyuanVideoImageToVideoPipeline": _FLUX,
    "HunyuanSkyreelsImageToVideoPipeline": _FLUX,
    "HunyuanVideo15Pipeline": _GUIDER,
    "HunyuanVideo15ImageToVideoPipeline": _GUIDER,
    "Kandinsky5T2VPipeline": TwoCallLayout("cond", _guidance_above_one),
    "Kandinsky5T2IPipeline": TwoCallLayout("cond", _guidance_above_one),
    "Kandinsky5I2IPipeline": TwoCallLayout("cond", _guidance_above_one),
    "Kandinsky5I2VPipeline": TwoCallLayout("cond", _guidance_above_one),
    "FluxKontextPipeline": _FLUX,
    "FluxKontextInpaintPipeline": _FLUX,
    "Flux2KleinPipeline": TwoCallLayout("cond", _pipeline_flag),
    "Flux2KleinInpaintPipeline": TwoCallLayout("cond", _pipeline_flag),
    "Lumina2Pipeline": TwoCallLayout("cond", _pipeline_flag, step_guided=_lumina2_untruncated),
    "CogView4Pipeline": TwoCallLayout("cond", _pipeline_flag),
    "CogView4ControlPipeline": TwoCallLayout("cond", _pipeline_flag),
    "ChromaPipeline": TwoCallLayout("cond", _pipeline_flag),
    "ChromaImg2ImgPipeline": TwoCallLayout("cond", _pipeline_flag),
    "SkyReelsV2Pipeline": TwoCallLayout("cond", _pipeline_flag),
    "SkyReelsV2ImageToVideoPipeline": TwoCallLayout("cond", _pipeline_flag),
    "OvisImagePipeline": TwoCallLayout("cond", _guidance_above_one),
    "Krea2Pipeline": TwoCallLayout("cond", _pipeline_flag),
    "NucleusMoEImagePipeline": TwoCallLayout("cond", _guidance_above_one),
    "CosmosTextToWorldPipeline": TwoCallLayout("cond", _pipeline_flag),
    # these compute on the first call's result before the second call (a deferred prediction)
    "Cosmos2TextToImagePipeline": TwoCallLayout("cond", _pipeline_flag),
    "Cosmos2VideoToWorldPipeline": TwoCallLayout("cond", _pipeline_flag),
    "Cosmos2_5_PredictBasePipeline": TwoCallLayout("cond", _pipeline_flag),
    "MotifVideoPipeline": _GUIDER,
    "MotifVideoImage2VideoPipeline": _GUIDER,
    "HunyuanImagePipeline": _HUNYUAN_IMAGE,
    "HunyuanImageRefinerPipeline": _HUNYUAN_IMAGE,
}

#: Pipelines of diffusers 0.42 whose loops call the denoiser once per guidance branch (found by
#: reading their source) but are not verified by a test, and why they are refused. Any other
#: pipeline taking ``true_cfg_scale`` is refused likewise.
UNVERIFIED_TWO_CALL: dict[str, str] = {
    name: "its two-call loop is not verified by a test" for name in (
        "BriaFibo2Pipeline", "ChromaInpaintPipeline",
        "Cosmos2_5_TransferPipeline", "Cosmos3OmniPipeline",
        "CosmosVideoToWorldPipeline", "GlmImagePipeline", "HeliosPipeline",
        "HeliosPyramidPipeline", "JoyImageEditPipeline",
        "Kandinsky6TI2VAPipeline", "LongCatAudioDiTPipeline", "LongCatImageEditPipeline",
        "LongCatImagePipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
        "SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
        "WanAnimatePipeline")
}


def two_call_layout(pipe: Any) -> TwoCallLayout | None:
    """The layout of ``pipe``'s class if it is a verified two-call pipeline, None if it is not a
    two-call pipeline.

    Raises:
        UnsupportedModelError: a pipeline known (or, from a ``true_cfg_scale`` argument or a
            guider among its components, seen) to call its denoiser once per branch whose loop
            is not verified.
    """
    name = type(pipe).__name__
    if name in TWO_CALL_PIPELINES:
        layout = TWO_CALL_PIPELINES[name]
        if layout.check is not None:
            layout.check(pipe)
        return layout
    why = UNVERIFIED_TWO_CALL.get(name)
    base = next((c.__name__ for c in type(pipe).__mro__[1:]
                 if c.__name__ in TWO_CALL_PIPELINES or c.__name__ in UNVERIFIED_TWO_CALL), None)
    if why is None and base is not None:
        why = f"it subclasses {base}, and a subclass's loop is not the verified one"
    if why is None and "true_cfg_scale" in _call_parameters(pipe):
        why = "it takes true_cfg_scale (one denoiser call per guidance branch)"
    guiders = guider_components(pipe)
    if why is None and guiders:
        why = (f"it guides through a diffusers guider ({', '.join(guiders)}: one denoiser call "
               "per guidance batch, combined by the guider), a loop not verified")
    if why is not None:
        raise UnsupportedModelError(
            f"{name} calls its denoiser once per guidance branch and {why}; hybridiff_rt splits "
            f"such pipelines only where their loop is verified ({', '.join(TWO_CALL_PIPELINES)}). "
            "Run it without hybridiff_rt, or without guidance")
    return None


def guider_components(pipe: Any) -> list[str]:
    """The constructor parameters of ``pipe``'s class that take a diffusers guider (named
    ``guider`` or ``*_guider``: HunyuanImage, HunyuanVideo 1.5, Motif-Video), in order."""
    try:
        params = inspect.signature(type(pipe).__init__).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in params if name == "guider" or name.endswith("_guider")]


def _call_parameters(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(type(pipe).__call__).parameters)
    except (TypeError, ValueError, AttributeError):
        return set()


def experts_of(pipe: Any, layout: TwoCallLayout) -> list[tuple[str, torch.nn.Module]]:
    """``(attribute, model)`` of every expert the pipeline holds (at least the first)."""
    found = [(a, getattr(pipe, a, None)) for a in layout.experts]
    found = [(a, m) for a, m in found if m is not None]
    if not found or found[0][0] != layout.experts[0]:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no .{layout.experts[0]} denoiser")
    first = type(found[0][1])
    for attr, model in found[1:]:
        if type(model) is not first:
            raise UnsupportedModelError(f"{type(pipe).__name__}.{attr} is a {type(model).__name__}"
                                        f", not a {first.__name__} like the first expert")
    return found


class TwoCallSteps:
    """Per pipeline call state of the protocol (module docstring) for one ParallelPipeline.

    Args:
        adapter: the ParallelPipeline (its ``engine``, ``pipe``, ``_planned_calls``).
        layout: the pipeline class's TwoCallLayout.
        forwards: the original forward of each expert, in ``layout.experts`` order.
    """

    def __init__(self, adapter: Any, layout: TwoCallLayout,
                 forwards: list[Callable[..., Any]]) -> None:
        self.adapter, self.layout, self.forwards = adapter, layout, forwards
        self.signature = inspect.signature(forwards[0])
        self.begin({})

    def begin(self, call_args: dict[str, Any]) -> None:
        """A new pipeline call with these arguments (defaults applied)."""
        self.call_args = call_args
        self.guided: bool | None = None
        self.pending: tuple[int, dict[str, Any], torch.Tensor] | None = None
        self.step_guider: Any = None  # the guider of the step in progress (``guider_of``)

    def end(self) -> None:
        """The pipeline call returned: a first call without its second is an error."""
        if self.pending is not None:
            self.pending = None
            raise HybridError(
                f"{type(self.adapter.pipe).__name__} made a guided denoiser call without its "
                "partner call in the same step, so the deferred prediction was never filled: the "
                "two-call protocol does not hold for this call of the pipeline")

    def forward(self, expert: int, args: tuple, kwargs: dict) -> Any:
        """One denoiser call of expert ``expert`` (index into ``layout.experts``)."""
        engine = self.adapter.engine
        kw = dict(self.signature.bind(*args, **kwargs).arguments)
        pipe, layout = self.adapter.pipe, self.layout
        if layout.guider_of is not None and self.pending is None:
            self.step_guider = layout.guider_of(pipe, kw)
        if self.guided is None:
            self.guided = (bool(getattr(self.step_guider, "_enabled", False))
                           if layout.guider_of is not None
                           else bool(layout.guided(pipe, self.call_args)))
        step = engine._next_step
        truncated = self.guided and self.pending is None and not self._both_calls(step)
        if not self.guided or truncated:
            return engine.serial_step(
                kw, step=step, num_steps=self.adapter._planned_calls() if step == 0 else None,
                forward=self.forwards[expert],
                reason="no classifier-free guidance in this call: one denoiser call per step, "
                       "run whole on every rank" if not self.guided else
                       "classifier-free guidance truncated: the steps with one (cond) denoiser "
                       "call ran whole on every rank")
        return_dict = kw.pop("return_dict", True)
        if self.pending is None:
            return self._defer(expert, kw, return_dict)
        return self._complete(expert, kw, return_dict, step)

    def _both_calls(self, step: int) -> bool:
        """Whether step ``step`` of a guided pipeline call makes both calls (at its first)."""
        if self.layout.guider_of is not None:
            return self.step_guider is not None and self.step_guider.num_conditions > 1
        return (self.layout.step_guided is None
                or self.layout.step_guided(self.adapter.pipe, self.call_args, step))

    def _wrap(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        """``prediction`` as the model would return it. Before the model has run once (the
        deferred first call of the first step), the output class is read off the forward's
        return annotation."""
        kind = (self.adapter.engine.output_kind or OutputKind.from_annotation(self.forwards[0])
                or OutputKind(None))
        if return_dict and kind.cls is None:
            raise HybridError(f"{type(self.adapter.pipe).__name__} asked its denoiser for "
                              "return_dict=True before any step ran, and its forward's return "
                              "annotation names no single diffusers output class; the two-call "
                              "protocol then needs return_dict=False")
        return kind.wrap(prediction, return_dict)

    def _defer(self, expert: int, kw: dict[str, Any], return_dict: bool) -> Any:
        sample = kw[self.adapter.engine.sample_key]
        param = next(self.adapter.engine.model.parameters(), None)
        dtype = param.dtype if param is not None else sample.dtype
        buffer = DeferredPrediction.make(sample.shape, dtype, sample.device,
                                         owner=type(self.adapter.pipe).__name__)
        self.pending = (expert, {key: _as_called(value) for key, value in kw.items()}, buffer)
        return self._wrap(buffer, return_dict)

    def _complete(self, expert: int, kw: dict[str, Any], return_dict: bool, step: int) -> Any:
        engine = self.adapter.engine
        first_expert, first_kw, buffer = self.pending
        self.pending = None
        same = all(_same(first_kw.get(key), kw.get(key)) for key in (engine.sample_key, "timestep"))
        if expert != first_expert or not same:
            raise HybridError(
                f"step {step}: the second guided denoiser call of "
                f"{type(self.adapter.pipe).__name__} is not the partner of the first (another "
                "expert, sample or timestep); the two-call protocol does not hold")
        cond_kw, uncond_kw = ((first_kw, kw) if self.layout.first_branch == "cond"
                              else (kw, first_kw))
        scale = (self.step_guider.guidance_scale if self.layout.guider_of is not None
                 else self.call_args.get(self.layout.scale_argument))
        uncond, cond = engine.predict_branches(
            uncond_kw, cond_kw, guidance_scale=guidance_value(scale),
            step=step, num_steps=self.adapter._planned_calls() if step == 0 else None,
            forward=self.forwards[expert])
        first, second = (cond, uncond) if self.layout.first_branch == "cond" else (uncond, cond)
        if first.dtype != buffer.dtype or first.device != buffer.device:
            raise HybridError(
                f"{type(engine.model).__name__} returned {first.dtype} on {first.device}, but the "
                f"deferred buffer of the first call was {buffer.dtype} on {buffer.device} (the "
                "parameters' dtype); cast the denoiser and its inputs to one dtype")
        replayed = buffer.fill(first)
        if replayed:
            engine.report.note(
                f"two-call CFG: {type(self.adapter.pipe).__name__}'s loop computes on the first "
                f"call's result before its second call ({', '.join(dict.fromkeys(replayed))}); "
                "those operations were recorded and replayed on the prediction at the second call")
        engine.report.note(
            f"two-call CFG: {type(self.adapter.pipe).__name__} calls its denoiser once per branch "
            f"({self.layout.first_branch} first); each step's first call returned a deferred "
            "buffer, filled in place when the second call ran the step")
        return self._wrap(second, return_dict)


def _as_called(value: Any) -> Any:
    """``value`` with its containers copied (dict, list, tuple, nested; tensors and other
    objects shared): what a deferred call was given, whatever the loop changes in them later."""
    if isinstance(value, dict):
        return {k: _as_called(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_called(v) for v in value]
    if type(value) is tuple:
        return tuple(_as_called(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are the same value (tensors: identical or equal)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))
    return a == b
