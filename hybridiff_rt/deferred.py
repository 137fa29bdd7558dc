"""A denoiser prediction that is not computed yet, on which a pipeline's loop may already compute.

The two-call protocol (:mod:`hybridiff_rt.two_call`) answers the first denoiser call of a step
before anything has run: the prediction comes with the second call. Some loops compute on the
first call's result before they make the second call: Cosmos 2 turns it into an x0 estimate,
``(c_skip * latents + c_out * noise_pred.float()).to(dtype)``; Motif-Video ``clone()``s it. A
:class:`DeferredPrediction` lets them:

* Until it is filled, each torch operation that takes it (or a tensor derived from it) is
  *recorded*, and returns a new deferred tensor. The operation is first run on shape-only
  ("meta") stand-ins: the first call's own stand-in has the shape of the sample the call was
  given (:meth:`DeferredPrediction.make`), the other tensors their own shapes. The stand-in's
  result gives the new tensor's dtype; an operation the stand-ins cannot run is an error. The
  stand-in's shape is never shown to the loop, so a prediction of another shape than the sample
  (a sample that carries conditioning channels) changes nothing but whether the stand-ins run.
* :meth:`DeferredPrediction.fill` points the first call's tensor at the real prediction
  (``Tensor.set_``: its storage, shape and strides) and replays the recorded operations in their
  order, each on the real values, pointing each derived tensor at its result. So every deferred
  tensor ends as an ordinary tensor holding exactly what the loop would have computed had the
  prediction been there, bit for bit: the same operations on the same values.
* Guards, each an error naming the pipeline rather than a wrong value: reading a deferred
  tensor's value or shape before the fill (``item()``, ``bool()``, ``shape``, ``len()``: the loop
  would branch on something that does not exist yet; its dtype and device are known and may be
  read, and printing it says what it is); writing it into another tensor (``out=``, an in-place
  operation on an ordinary tensor, ``__setitem__``); an ordinary tensor the recorded operations
  read that the loop changed in place before the fill (its version counter moved); a replayed
  result of another dtype or device than the stand-ins gave.

After the fill, operations on these tensors run as on any tensor and return ordinary tensors; a
deep copy or a pickle (``torch.save``) of one is an ordinary tensor (before the fill, an error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from .errors import HybridError

#: Property reads answered before the fill: they depend on neither the value nor the shape.
_KNOWN_BEFORE_FILL = ("dtype", "device", "is_cuda", "is_cpu", "is_meta", "layout",
                      "requires_grad", "is_sparse", "is_quantized")
#: Operations that read a value (not recorded: the loop would use the value at once).
_READS_VALUE = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
                "__complex__", "__array__", "__len__", "__iter__", "__format__", "equal",
                "allclose", "is_nonzero", "data_ptr")


@dataclasses.dataclass
class _Step:
    """One recorded operation: ``out`` (a deferred tensor, of the dtype the stand-ins gave) is
    ``func(*args, **kwargs)``; ``versions`` the version counters of the ordinary tensors among
    the arguments when it was recorded."""

    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    out: DeferredPrediction
    versions: list[tuple[torch.Tensor, int]]


class _Recording:
    """What one deferred first call's loop did with its result before the second call."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.filled = False
        self.steps: list[_Step] = []

    def error(self, what: str) -> HybridError:
        return HybridError(
            f"{self.owner}'s loop {what} before its second denoiser call of the step, when that "
            "prediction does not exist yet (the two-call protocol computes both calls of a step "
            "at the second call). Run this pipeline without hybridiff_rt")


#: The recording of a deferred tensor made another way than by :meth:`DeferredPrediction.make`
#: or a recorded operation (``as_subclass``, say): an ordinary tensor, nothing to replay.
_NONE = _Recording("")
_NONE.filled = True


class DeferredPrediction(torch.Tensor):
    """The result of a deferred denoiser call, or a tensor computed from one (module docstring).

    Do not construct directly: :meth:`make` makes the first call's tensor, operations on it the
    others.
    """

    _recording: _Recording = _NONE
    _stand_in: torch.Tensor

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        """A copy (an ordinary tensor) once filled; before, an error like any read."""
        if not self._recording.filled:
            raise self._recording.error("copies the first call's prediction (`deepcopy`)")
        with torch._C.DisableTorchFunctionSubclass():
            return self.clone()

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled (``torch.save``) as the ordinary tensor it holds once filled."""
        if not self._recording.filled:
            raise self._recording.error("saves the first call's prediction (`pickle`)")
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    @staticmethod
    def make(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device,
             owner: str) -> DeferredPrediction:
        """An unfilled prediction, ``shape`` for its stand-in (the sample's: never shown to the
        loop), holding ``dtype`` on ``device`` once filled. ``owner`` names the pipeline in
        errors."""
        return DeferredPrediction._derived(_Recording(owner),
                                           torch.empty(shape, dtype=dtype, device="meta"),
                                           device)

    @staticmethod
    def _derived(recording: _Recording, stand_in: torch.Tensor,
                 device: torch.device) -> DeferredPrediction:
        tensor = torch.Tensor._make_subclass(
            DeferredPrediction, torch.empty(0, dtype=stand_in.dtype, device=device))
        tensor._recording, tensor._stand_in = recording, stand_in
        return tensor

    @property
    def is_filled(self) -> bool:
        """Whether :meth:`fill` has run (the tensor holds its value)."""
        return self._recording.filled

    def fill(self, value: torch.Tensor) -> list[str]:
        """Point this (the first call's) tensor at ``value`` and replay what was computed from it.

        Returns:
            the names of the replayed operations, in their order (empty: the loop computed
            nothing on the prediction before the fill).

        Raises:
            HybridError: ``value``'s dtype or device is not this tensor's, or a replayed
                operation meets a changed input or gives another dtype or device than the
                stand-ins did.
        """
        recording = self._recording
        if recording.filled:
            raise HybridError("this deferred prediction is already filled")
        with torch._C.DisableTorchFunctionSubclass():
            if value.dtype != self.dtype or value.device != self.device:
                raise HybridError(f"a {value.dtype} prediction on {value.device} cannot fill a "
                                  f"deferred {self.dtype} one on {self.device}")
            self.set_(value)
            try:
                for step in recording.steps:
                    _replay(recording, step)
                return [_name(step.func) for step in recording.steps]
            finally:
                recording.filled = True
                recording.steps = []

    @classmethod
    def __torch_function__(cls, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        pending = [t for t in _tensors((args, kwargs))
                   if isinstance(t, DeferredPrediction) and not t._recording.filled]
        if not pending:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        recording = pending[0]._recording
        if any(t._recording is not recording for t in pending):
            raise HybridError("two unfilled deferred predictions meet in one operation")
        return _record(recording, pending[0], func, args, kwargs)


def _record(recording: _Recording, pending: DeferredPrediction, func: Callable[..., Any],
            args: tuple, kwargs: dict) -> Any:
    """Record ``func(*args, **kwargs)`` on unfilled deferred tensors, ``pending`` one of them
    (module docstring)."""
    name = _name(func)
    if name in _KNOWN_BEFORE_FILL:  # a property read: the placeholder has the right ones
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args)
    if name in ("__repr__", "__str__"):  # printed (a debugger, an error message): say what
        return (f"<deferred prediction of {recording.owner}: computed at the step's second "
                "denoiser call>")
    if name in _READS_VALUE:
        raise recording.error(f"reads the value or shape of the first call's prediction "
                              f"(`{name}`)")
    if "out" in kwargs or name == "__setitem__":
        raise recording.error(f"writes the first call's prediction into a tensor (`{name}`)")
    versions: list[tuple[torch.Tensor, int]] = []
    stand_in_args, stand_in_kwargs = _map((args, kwargs), lambda t: _stand_in(t, versions))
    try:
        with torch._C.DisableTorchFunctionSubclass():
            expected = func(*stand_in_args, **stand_in_kwargs)
    except Exception as exc:
        raise recording.error(
            f"computes `{name}` on the first call's prediction, which cannot be recorded "
            f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(expected, torch.Tensor):
        raise recording.error(f"reads the value or shape of the first call's prediction "
                              f"(`{name}`)")
    target = args[0] if args else None
    in_place = expected is (stand_in_args[0] if stand_in_args else None)
    if in_place and not isinstance(target, DeferredPrediction):
        raise recording.error(f"writes the first call's prediction into a tensor (`{name}`)")
    if in_place:
        out = target
        target._stand_in = expected
    else:
        with torch._C.DisableTorchFunctionSubclass():
            device = pending.device
        out = DeferredPrediction._derived(recording, expected, device)
    recording.steps.append(_Step(func, args, kwargs, out, versions))
    return out


def _replay(recording: _Recording, step: _Step) -> None:
    """Run one recorded operation on the real values (torch functions of subclasses off)."""
    name = _name(step.func)
    for tensor, version in step.versions:
        if tensor._version != version:
            raise recording.error(
                f"changed in place a tensor that `{name}` on the first call's prediction reads")
    result = step.func(*step.args, **step.kwargs)
    if result is step.out:  # in place on a deferred tensor
        return
    if result.dtype != step.out.dtype or result.device != step.out.device:
        raise recording.error(
            f"computes `{name}` on the first call's prediction, which gave {result.dtype} on "
            f"{result.device} where {step.out.dtype} on {step.out.device} was expected")
    step.out.set_(result)


def _stand_in(value: torch.Tensor, versions: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """The shape-only stand-in of a tensor argument; notes an ordinary tensor's version."""
    if isinstance(value, DeferredPrediction) and not value._recording.filled:
        return value._stand_in
    try:
        versions.append((value, value._version))
    except RuntimeError:  # an inference tensor keeps no version counter
        pass
    with torch._C.DisableTorchFunctionSubclass():
        return value.to("meta")


def _name(func: Callable[..., Any]) -> str:
    """``func``'s name; a property read (``Tensor.shape.__get__``) by the property's name."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and owner is not None:
        return getattr(owner, "__name__", "__get__")
    return getattr(func, "__name__", repr(func))


def _tensors(tree: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    _map(tree, lambda t: found.append(t) or t)
    return found


def _map(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``tree`` (nested tuples, lists, dicts) with ``fn`` applied to each tensor."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, tuple):
        items = [_map(v, fn) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return tree
