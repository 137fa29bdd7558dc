"""What the runtime reads from a denoiser itself instead of a list of model classes.

Any ``torch.nn.Module`` whose forward follows the diffusers convention can be partitioned by
guidance branch:

* its first parameter (after ``self``) is the noisy sample (``sample`` for U-Nets,
  ``hidden_states`` for transformers): the *sample key*, whose leading dimension is the batch;
* it takes ``return_dict`` and returns either a tuple whose first entry is the prediction or a
  diffusers ``BaseOutput`` whose first field is the prediction (the *output kind*, learned from
  the model's own first return and used to hand the pipeline the same kind back).

Every batch-shaped argument (leading dimension equal to the call's batch) is split by
:func:`split_branch_kwargs`, except the per-token tables listed in :data:`SHARED_ARGUMENTS`
(rotary tables, position ids), which carry no batch dimension even when their length happens to
equal the batch. Denoisers listed in :data:`PER_FRAME_CONDITIONING` take conditioning repeated
per frame (AnimateDiff's ``UNetMotionModel``: text embeddings of ``batch x frames`` rows); those
arguments are split at the middle too. Denoisers listed in :data:`BATCH_AXES` take arguments whose
batch axis is not the leading one (HiDream's stacked Llama 3 hidden states, (layers, batch,
tokens, dim)); those are split along that axis.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .batch import on_batch_axis, split_cfg_batch

#: Arguments that are per-token tables shared by every row of the batch (shape (N, ...) with N
#: tokens, never (batch, ...)); they go to both branches unchanged whatever their length.
SHARED_ARGUMENTS = frozenset({
    "image_rotary_emb", "rotary_emb", "freqs_cis", "img_ids", "txt_ids", "img_shapes",
    "txt_seq_lens",
    # StableAudioDiTModel's (cos, sin) of (tokens, dim); SanaWM's video rotary table;
    # Kandinsky 5's per-axis position indices
    "rotary_embedding", "video_rotary_emb", "text_rope_pos", "visual_rope_pos",
})


#: Denoiser classes whose pipelines pass conditioning repeated per frame, ``[uncond; cond]`` of
#: ``batch x frames`` rows, mapped to the frame axis of their sample: AnimateDiff's pipelines
#: ``repeat_interleave`` the stacked prompt embeddings by the frame count for UNetMotionModel,
#: whose sample is (batch, channels, frames, height, width).
PER_FRAME_CONDITIONING = {"UNetMotionModel": 2}


#: Denoiser classes with arguments whose batch axis is not the first, by argument name -> axis:
#: HiDream-I1's transformer takes the hidden states of several Llama 3 layers stacked in front,
#: (layers, batch, tokens, dim); its pipeline joins [uncond; cond] along axis 1.
BATCH_AXES: dict[str, dict[str, int]] = {
    "HiDreamImageTransformer2DModel": {"encoder_hidden_states_llama3": 1},
}


def batch_axes(model: Any) -> dict[str, int]:
    """``{argument: batch axis}`` for the arguments of ``model``'s forward whose batch axis is
    not the first (:data:`BATCH_AXES`); empty for most models."""
    return dict(BATCH_AXES.get(type(model).__name__, {}))


def frames_per_row(model: Any, sample: torch.Tensor) -> int:
    """How many conditioning rows each sample row has: the frame count for the denoisers of
    :data:`PER_FRAME_CONDITIONING`, else 1."""
    axis = PER_FRAME_CONDITIONING.get(type(model).__name__)
    if axis is None or sample.dim() <= axis:
        return 1
    return int(sample.shape[axis])


def denoiser_sample_key(model: Any) -> str:
    """The name of the sample argument of ``model``'s forward (its first parameter).

    Raises:
        UnsupportedModelError: ``model`` is not a torch module, or its forward does not follow the
            diffusers convention (a named first parameter and a ``return_dict`` parameter).
    """
    name = type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError(f"hybridiff_rt needs a torch.nn.Module denoiser, got {name}")
    _refuse_wrappers(model)
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not named or "return_dict" not in {p.name for p in params}:
        raise UnsupportedModelError(
            f"hybridiff_rt cannot partition a {name}: a denoiser's forward must take the noisy "
            "sample as its first argument and a return_dict argument, as diffusers denoisers do "
            "(e.g. UNet2DConditionModel, SD3Transformer2DModel, PixArtTransformer2DModel, "
            "WanTransformer3DModel)")
    return named[0].name


def _refuse_wrappers(model: torch.nn.Module) -> None:
    """Raise UnsupportedModelError naming the fix when ``model`` wraps the denoiser: a
    ``torch.compile`` OptimizedModule, or a (Distributed)DataParallel module."""
    name = type(model).__name__
    compiled = getattr(model, "_orig_mod", None)
    if isinstance(compiled, torch.nn.Module):
        raise UnsupportedModelError(
            f"the denoiser is a torch.compile wrapper ({name}) around a "
            f"{type(compiled).__name__}; hybridiff_rt splits the model's own forward. Pass the "
            "model itself (e.g. pipe.unet = pipe.unet._orig_mod) and let hybridiff_rt compile it: "
            "HybridConfig(compile='default'), or 'reduce-overhead' on a GPU")
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        raise UnsupportedModelError(
            f"the denoiser is wrapped in {name}; hybridiff_rt places the branches on the ranks "
            f"itself. Pass the {type(model.module).__name__} inside it (model.module), the same "
            "weights on every rank")


def split_branch_kwargs(kw: dict[str, Any], batch: int, frames: int = 1,
                        axes: dict[str, int] | None = None,
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(uncond_kw, cond_kw)`` of a call on the stacked batch ``[uncond; cond]`` of ``batch``
    rows: batch-shaped arguments split at the middle, :data:`SHARED_ARGUMENTS` and everything
    else passed to both unchanged (see :func:`~hybridiff_rt.engine.batch.split_cfg_batch`).
    With ``frames`` > 1 (:func:`frames_per_row`), arguments of ``batch x frames`` rows (the
    per-frame conditioning) are split at the middle as well. The tensors named in ``axes``
    (:func:`batch_axes`) are split along their given axis instead of the first."""
    axes = axes or {}
    pairs = {k: (v, v) if k in SHARED_ARGUMENTS else
             on_batch_axis(lambda v: split_cfg_batch(v, batch, frames), v, axes.get(k, 0))
             for k, v in kw.items()}
    return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """How a denoiser returned its prediction: ``cls`` None for a tuple, else the BaseOutput
    class and the name of the field that holds the prediction."""

    cls: type | None
    field: str | None = None

    def to_text(self) -> str:
        """``module:qualname:field`` of the output class ("" for a tuple), for the store."""
        if self.cls is None:
            return ""
        return f"{self.cls.__module__}:{self.cls.__qualname__}:{self.field or ''}"

    @classmethod
    def from_text(cls, text: str) -> OutputKind:
        """The OutputKind :meth:`to_text` wrote (the class imported by its module and name)."""
        if not text:
            return cls(None)
        module, qualname, field = text.split(":")
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        return cls(found, field or None)

    @classmethod
    def from_annotation(cls, forward: Any) -> OutputKind | None:
        """The output class ``forward``'s return annotation names, when it names exactly one
        diffusers ``BaseOutput`` (``Transformer2DModelOutput | torch.Tensor``), with its first
        field; None when it names none, several, or cannot be read. For a call that must return
        before the model has run once (the deferred first call of a two-call step)."""
        try:
            annotation = inspect.signature(forward, eval_str=True).return_annotation
        except Exception:  # noqa: BLE001 - an unresolvable annotation names nothing usable
            return None
        found = [t for t in _union_members(annotation)
                 if isinstance(t, type) and dataclasses.is_dataclass(t) and hasattr(t, "to_tuple")
                 and dataclasses.fields(t)]
        if len(found) != 1:
            return None
        return cls(found[0], dataclasses.fields(found[0])[0].name)

    def wrap(self, prediction: torch.Tensor, return_dict: bool) -> Any:
        """The prediction in the form the caller asked for (``return_dict``), as the model would
        return it: a 1-tuple, or the model's own output class."""
        if not return_dict or self.cls is None:
            return (prediction,)
        return self.cls(**{self.field: prediction})


def _union_members(annotation: Any) -> list[Any]:
    """The members of a union annotation (``A | B``, ``Union[A, B]``, ``Optional[A]``), nested
    unions flattened; the annotation itself when it is not a union."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else ()
    if not members:
        return [annotation]
    return [m for member in members for m in _union_members(member)]


def first_output(out: Any, model_name: str) -> tuple[torch.Tensor, OutputKind]:
    """The prediction in a model's return value, and the kind of that return value.

    Raises:
        UnsupportedModelError: the model returned more than one output (CBP would drop the rest)
            or no tensor first.
    """
    if isinstance(out, torch.Tensor):
        return out, OutputKind(None)
    if isinstance(out, tuple) and not hasattr(out, "keys"):
        values, kind = list(out), OutputKind(None)
    elif hasattr(out, "keys") and hasattr(out, "to_tuple"):  # a diffusers BaseOutput
        keys = list(out.keys())
        values, kind = [out[k] for k in keys], OutputKind(type(out), keys[0] if keys else None)
    else:
        raise UnsupportedModelError(f"{model_name} returned a {type(out).__name__}; hybridiff_rt "
                                    "needs a tuple or a diffusers BaseOutput from a denoiser")
    if not values or not isinstance(values[0], torch.Tensor):
        raise UnsupportedModelError(f"{model_name} returned no prediction tensor first")
    extra = [v for v in values[1:] if v is not None]
    if extra:
        raise UnsupportedModelError(
            f"{model_name} returned {1 + len(extra)} outputs; hybridiff_rt exchanges only the "
            "prediction between ranks and cannot return the others (call it without the option "
            "that produces them)")
    return values[0], kind
