"""The staged-denoiser interface shared by every model adapter, and state (de)serialisation helpers.

A *staged denoiser* exposes one denoiser call ``model(**kw)`` as three parts:

* ``ctx = staged.prepare(**kw)``: everything a step needs that is not the flowing activation
  (time embedding, projected text context, masks, ControlNet residuals, ...). Cheap: no large
  convolution or transformer block runs here. ``ctx.initial_state`` is the state fed to unit 0.
* ``staged.units``: an ordered list of :class:`Unit`; ``unit(state, ctx) -> state``. Each unit is
  a real slice of the model's own submodules, run with the same arguments and in the same order as
  the model's own ``forward``, so running all of them is bit-identical to it.
* ``staged.finish(state, ctx) -> Tensor``: the prediction ``model(**kw, return_dict=False)``
  returns (its first item, or the tensor itself: :func:`prediction_of`).

A *state* is a ``dict[str, torch.Tensor]`` holding exactly the live tensors at one point of the
forward pass. Its keys, shapes and dtypes after each unit depend only on the model config and on
the input shapes/dtypes, never on input values, so a state can cross devices as a flat list of
tensors in a fixed key order (:func:`flatten_state` / :func:`unflatten_state`). Units never modify
the tensors of the state they receive nor the dict itself; they return a new dict.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterable, Sequence

import torch

from ..errors import ShapeError, UnsupportedModelError

State = dict[str, torch.Tensor]
"""Live activations at a cut: name -> tensor. See the adapters for the names they use."""


def flatten_state(state: State) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """Split a state into ``(names, tensors)`` in canonical (sorted-name) order.

    The order depends only on the key set, so sender and receiver agree on it without talking.
    """
    names = tuple(sorted(state))
    return names, [state[n] for n in names]


def unflatten_state(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> State:
    """Inverse of :func:`flatten_state`: rebuild the state dict (in canonical order).

    Raises:
        ShapeError: the two sequences differ in length or names repeat.
    """
    names = tuple(names)
    if len(names) != len(tensors):
        raise ShapeError(
            f"unflatten_state got {len(names)} names but {len(tensors)} tensors; pass the names "
            "returned by flatten_state together with the tensors received for them"
        )
    if len(set(names)) != len(names):
        raise ShapeError(f"unflatten_state got repeated names {names}")
    order = sorted(range(len(names)), key=lambda i: names[i])
    return {names[i]: tensors[i] for i in order}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one state tensor (JSON-friendly: dtype as its torch name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # e.g. "float32", as in str(torch.float32) without the "torch." prefix

    @property
    def nbytes(self) -> int:
        """Bytes of a contiguous tensor of this spec."""
        numel = 1
        for d in self.shape:
            numel *= int(d)
        return numel * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(name=str(d["name"]), shape=tuple(int(x) for x in d["shape"]), dtype=str(d["dtype"]))


def state_layout(state: State) -> tuple[TensorSpec, ...]:
    """The state's tensors as :class:`TensorSpec` in canonical (flatten) order."""
    names, tensors = flatten_state(state)
    return tuple(
        TensorSpec(n, tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))
        for n, t in zip(names, tensors)
    )


def state_nbytes(state: State) -> int:
    """Payload bytes of the state (sum over its tensors of numel * element size)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def model_device(model: torch.nn.Module,
                 default: torch.device = torch.device("cpu")) -> torch.device:
    """The device of ``model``'s first parameter (``default`` for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else default


def empty_state_like(layout: Iterable[TensorSpec], device: torch.device | str) -> State:
    """Allocate receive buffers for a state of the given layout (uninitialised memory)."""
    specs = sorted(layout, key=lambda s: s.name)
    return {s.name: torch.empty(s.shape, dtype=s.torch_dtype, device=device) for s in specs}


@dataclasses.dataclass
class StageContext:
    """Per-step inputs of a staged denoiser that are not the flowing state.

    Adapters subclass this with their own fields. ``initial_state`` is the state fed to unit 0.
    """

    initial_state: State


class Unit(abc.ABC):
    """One slice of a denoiser: ``unit(state, ctx) -> state``. ``name`` is unique within a model."""

    name: str

    @abc.abstractmethod
    def __call__(self, state: State, ctx: Any) -> State: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class StagedDenoiser(abc.ABC):
    """A denoiser cut into an ordered list of units (see the module docstring for the contract).

    Subclasses set ``self.model`` and ``self.units`` and implement :meth:`prepare` and
    :meth:`finish`. Everything runs under the caller's grad mode; wrap calls in
    ``torch.inference_mode()`` for inference.

    Pipelined use: on every step each rank calls ``prepare`` with that step's inputs, then
    ``run(state, ctx, start, stop)`` on its own slice, where ``state`` may be a (stale) state
    another rank produced at the previous step and shipped with :func:`flatten_state` /
    :func:`unflatten_state`. Units read only ``state`` and ``ctx``; nothing is cached between
    calls.
    """

    model: torch.nn.Module
    units: list[Unit]

    @abc.abstractmethod
    def prepare(self, **denoiser_kwargs: Any) -> StageContext:
        """Build the per-step context from the keyword arguments of the model's own forward."""

    @abc.abstractmethod
    def finish(self, state: State, ctx: StageContext) -> torch.Tensor:
        """Turn the state after the last unit into the prediction tensor."""

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def __len__(self) -> int:
        return len(self.units)

    def run(self, state: State, ctx: StageContext, start: int = 0, stop: int | None = None) -> State:
        """Run ``units[start:stop]`` on ``state`` and return the resulting state."""
        n = len(self.units)
        stop = n if stop is None else stop
        if not (0 <= start <= stop <= n):
            raise ShapeError(f"run(start={start}, stop={stop}) is outside 0 <= start <= stop <= {n} units")
        for unit in self.units[start:stop]:
            state = unit(state, ctx)
        return state

    def forward(self, **denoiser_kwargs: Any) -> torch.Tensor:
        """prepare -> all units -> finish. Equal, bit for bit, to the model's own output tensor."""
        ctx = self.prepare(**denoiser_kwargs)
        return self.finish(self.run(ctx.initial_state, ctx), ctx)

    __call__ = forward

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {type(self.model).__name__}: {len(self.units)} units>"


def prediction_of(out: Any) -> torch.Tensor:
    """The prediction in what a denoiser's forward returned with ``return_dict=False``: the
    first item of a tuple, or the tensor itself (Kandinsky 5's forward returns it bare, where
    ``[0]`` would take its first sample and drop the batch axis)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def require_plain_forward(model: torch.nn.Module, base: type) -> None:
    """Raise UnsupportedModelError if ``model``'s top-level forward is not ``base.forward`` as is.

    The units call the model's submodules directly, so anything wrapped around the top-level
    forward would be skipped: a subclass overriding ``forward``, an instance-level ``forward``
    (accelerate/diffusers offload or caching hooks), or registered torch forward hooks.
    """
    name = type(model).__name__
    if type(model).forward is not base.forward:
        raise UnsupportedModelError(
            f"{name} subclasses {base.__name__} but overrides forward(); staging mirrors "
            f"{base.__name__}.forward exactly and would ignore the override. Use a plain "
            f"{base.__name__}."
        )
    if "forward" in vars(model) or getattr(model, "_hf_hook", None) is not None:
        raise UnsupportedModelError(
            f"{name} has a hook wrapped around its forward (accelerate offloading or a diffusers "
            "hook registry, e.g. enable_model_cpu_offload / caching). Staging would bypass it; "
            "remove the hook (keep the model on one device) before staging."
        )
    if model._forward_hooks or model._forward_pre_hooks:
        raise UnsupportedModelError(
            f"{name} has torch forward (pre-)hooks registered on the top-level module; staging "
            "would bypass them. Remove them (or register them on submodules) before staging."
        )


def strip_lora_scale(
    model: torch.nn.Module, attention_kwargs: dict[str, Any] | None, arg_name: str
) -> dict[str, Any] | None:
    """Mirror diffusers' ``apply_lora_scale``: copy the kwargs dict and drop its ``"scale"``.

    In the model's own forward the decorator scales the PEFT LoRA layers for the duration of one
    call. Staged units run in separate calls (possibly on stale states), so a LoRA scale other
    than 1.0 on a model that has PEFT LoRA layers is refused; without LoRA layers (or without the
    PEFT backend) the scale is a no-op there and is dropped here too.
    """
    if attention_kwargs is None:
        return None
    attention_kwargs = dict(attention_kwargs)
    scale = attention_kwargs.pop("scale", 1.0)
    if scale != 1.0:
        from diffusers.utils import USE_PEFT_BACKEND

        if USE_PEFT_BACKEND and any(hasattr(m, "scale_layer") and hasattr(m, "lora_A") for m in model.modules()):
            raise UnsupportedModelError(
                f"{arg_name}['scale']={scale} asks for a per-call LoRA scale, which staging cannot "
                "apply across separately run units. Fuse the LoRA at the scale you want "
                "(pipe.fuse_lora(lora_scale=...)) or call set_adapters(..., adapter_weights=...) "
                "and pass no 'scale'."
            )
    return attention_kwargs
