"""A generic staged adapter for diffusion transformers, configured by a declarative description.

A DiT's forward is a *prologue* (patch and position embedding, timestep and text conditioning),
one or more ordered lists of blocks that carry a few activations from block to block (the *flow*:
``hidden_states``, and ``encoder_hidden_states`` for dual-stream models), and an *epilogue* (final
norm, projection, unpatchify). :class:`DiTFamily` says, for one model class, where the block lists
are and which block arguments flow; no model-specific code is written.

The adapter runs the model's own forward for the prologue and the epilogue, with each block list
temporarily replaced by stand-ins:

* ``prepare``: the model's forward runs with stand-ins that record each block call's arguments
  and pass the flow through unchanged. The first block's flow arguments are the initial state;
  every other argument of block I (time embedding or its per-block slice, rotary tables, masks,
  text context) is block I's step context.
* ``units``: ``<list>.I`` calls the real block I with the recorded context and the flowing
  state; the last unit, ``out``, runs the model's forward again with stand-ins that return the
  final state, so the epilogue runs exactly as in the model (the prologue is recomputed there; it
  is the cheap part of the model). ``finish`` returns its ``"sample"``.
* A block argument that is the output of an earlier block (HunyuanDiT's long skip connections)
  is found in ``prepare``: the stand-ins return fresh views of their flow, so such an argument is
  one of those views. The state then carries that output from its block to the block that takes
  it (the *carried* entries of the state), as a U-Net's state carries its skip tensors.
* Where a list's blocks carry other arguments than the list before returns (AuraFlow joins the
  text and image tokens into one sequence for its single-stream blocks), a unit ``into.<list>``
  runs the model's forward up to that list's first block, with the earlier blocks returning the
  state, and takes that block's flow arguments: the forward's own code between the lists makes
  the next list's state.

* Forward arguments the forward adds to the flow between blocks (ControlNet residuals, the
  family's ``between``): when a call passes one, ``prepare`` records with stand-ins that return
  zeros, so what the next block receives is exactly what the forward added after this block
  (``0 + r == r``); the block's unit adds it to its output (the step context's ``added``). After
  the last block of a list the forward's own code adds it, in ``into.<list>`` or ``out``.

* Tokens the forward appends to a flow before each block and cuts off after it (HiDream-I1 joins
  each block's own Llama 3 layer to a stream: the family's ``appended``): ``prepare`` records
  with stand-ins that return NaN for those flows, so in what the next block receives the
  positions that came from the previous block are NaN and the appended tokens are not. The
  previous block's unit then does what the forward did: keeps that many leading tokens of its
  output and appends the recorded tokens (the step context's ``joined``). A block whose output
  the forward's own code cuts next (the last of a list, before ``into.<list>`` or ``out``)
  returns its output whole.

Running all units therefore equals the model's own forward bit for bit, for model classes whose
forward does nothing else to the flow between the blocks of a list (it may compute each block's
non-flow arguments there, as Chroma slices its modulation table per block), checked for each
family by tests/test_generic_denoisers.py. Forward arguments that would make the forward act on
the flow between blocks in another way are refused per family (``refused``). As a
guard against a description that does not fit (another diffusers version of the class), the
first ``prepare`` for each input layout runs the units once and compares them with the model's
own forward bit for bit; a mismatch raises UnsupportedModelError, which the runtime turns into a
CBP-only run with a note.

State names are the flow argument names of the blocks, e.g. ``"hidden_states"`` (B, N, D) with
N tokens and D the inner dimension, plus ``"<list>.<I>:<name>"`` for a carried output of block I
until the last block that takes it; after ``out`` the state is ``{"sample": prediction}`` (the
shape of the model's output).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch

from ..errors import HybridError, ShapeError, UnsupportedModelError
from .base import (
    StageContext,
    StagedDenoiser,
    State,
    Unit,
    prediction_of,
    require_plain_forward,
)


@dataclasses.dataclass(frozen=True)
class DiTFamily:
    """Declarative description of one DiT class for :class:`StagedDiT`.

    Attributes:
        blocks: attribute names of the block ``ModuleList``s, in the order the forward runs them.
        flow: block arguments carried from one block to the next (the state), by parameter name.
        returns: what a block returns, in order, as names in ``flow`` (one name: a tensor).
        refused: forward arguments the units do not reproduce (the forward would apply them
            between blocks); a call that passes one of them (not None) is refused.
        between: forward arguments whose values the forward adds to the flow between blocks
            (ControlNet residuals, as ``hidden_states = hidden_states + residual``), which the
            units reproduce from what ``prepare`` records (module docstring).
        per_list: ``flow`` and ``returns`` of the lists whose blocks differ from the others,
            by list attribute: ``{attribute: (flow, returns)}``.
        appended: per list attribute, the flow arguments to which the forward appends tokens
            (dim 1) before each block of the list and cuts them off after it, keeping the
            leading ones (module docstring); not with ``between``.
    """

    blocks: tuple[str, ...]
    flow: tuple[str, ...] = ("hidden_states",)
    returns: tuple[str, ...] = ("hidden_states",)
    refused: tuple[str, ...] = ()
    between: tuple[str, ...] = ()
    per_list: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = dataclasses.field(
        default_factory=dict)
    appended: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def flow_of(self, blocks: str) -> tuple[str, ...]:
        """The flow arguments of the blocks of list ``blocks``."""
        return self.per_list.get(blocks, (self.flow, self.returns))[0]

    def returns_of(self, blocks: str) -> tuple[str, ...]:
        """What a block of list ``blocks`` returns, as names."""
        return self.per_list.get(blocks, (self.flow, self.returns))[1]


#: Flux-like block lists whose single-stream blocks take the joined [text; image] sequence alone.
_FLUX_LISTS_JOINED: dict[str, Any] = dict(
    blocks=("transformer_blocks", "single_transformer_blocks"),
    flow=("hidden_states", "encoder_hidden_states"),
    returns=("encoder_hidden_states", "hidden_states"),
    per_list={"single_transformer_blocks": (("hidden_states",), ("hidden_states",))})

#: Dual-stream blocks, then single-stream blocks that take and return both streams too, each
#: returning (hidden, encoder): HunyuanVideo, HunyuanImage, Motif-Video.
_BOTH_STREAMS_THROUGH_BOTH_LISTS = DiTFamily(
    blocks=("transformer_blocks", "single_transformer_blocks"),
    flow=("hidden_states", "encoder_hidden_states"),
    returns=("hidden_states", "encoder_hidden_states"))

#: class name -> description. A new DiT family is one entry here plus a test that its staged
#: forward equals its own forward (tests/test_generic_denoisers.py).
DIT_FAMILIES: dict[str, DiTFamily] = {
    "PixArtTransformer2DModel": DiTFamily(blocks=("transformer_blocks",)),
    # class-conditional; its forward reads the label embedding off block 0 (the stand-ins relay)
    "DiTTransformer2DModel": DiTFamily(blocks=("transformer_blocks",)),
    # the context and noise refiners run before the joint layers: part of the prologue
    "Lumina2Transformer2DModel": DiTFamily(blocks=("layers",)),
    "LuminaNextDiT2DModel": DiTFamily(blocks=("layers",)),
    "SanaTransformer2DModel": DiTFamily(blocks=("transformer_blocks",),
                                        between=("controlnet_block_samples",)),
    "WanTransformer3DModel": DiTFamily(blocks=("blocks",)),
    # Wan-shaped blocks; the diffusion-forcing pipelines' per-frame timesteps are not tested
    "SkyReelsV2Transformer3DModel": DiTFamily(blocks=("blocks",)),
    "ChronoEditTransformer3DModel": DiTFamily(blocks=("blocks",)),
    # the VACE blocks run in the prologue; the hints they make are added after some main blocks
    "WanVACETransformer3DModel": DiTFamily(blocks=("blocks",), between=("control_hidden_states",)),
    # long skip connections: the second half of the blocks takes outputs of the first (carried)
    "HunyuanDiT2DModel": DiTFamily(blocks=("blocks",), refused=("controlnet_block_samples",)),
    # dual-stream (MMDiT) blocks carry the text tokens too and return (encoder, hidden)
    "QwenImageTransformer2DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states"), between=("controlnet_block_samples",)),
    "FluxTransformer2DModel": DiTFamily(
        blocks=("transformer_blocks", "single_transformer_blocks"),
        flow=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states"),
        between=("controlnet_block_samples", "controlnet_single_block_samples")),
    # Flux-like lists whose single-stream blocks also take and return both streams
    "OvisImageTransformer2DModel": DiTFamily(
        blocks=("transformer_blocks", "single_transformer_blocks"),
        flow=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states")),
    # single-stream blocks on the joined [text; image] sequence (the text fusion stage and the
    # join run in the prologue, the slice back to the image tokens in the epilogue)
    "Krea2Transformer2DModel": DiTFamily(blocks=("transformer_blocks",)),
    # image-stream blocks (dense or mixture-of-experts) attending to the text, which stays fixed
    "NucleusMoEImageTransformer2DModel": DiTFamily(blocks=("transformer_blocks",)),
    # dual-stream blocks that return (hidden, encoder), in that order
    "CogView4Transformer2DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states")),
    # dual-stream blocks, then single-stream blocks on the joined [text; image] sequence
    "AuraFlowTransformer2DModel": DiTFamily(
        blocks=("joint_transformer_blocks", "single_transformer_blocks"),
        flow=("hidden_states", "encoder_hidden_states"),
        returns=("encoder_hidden_states", "hidden_states"),
        per_list={"single_transformer_blocks": (("hidden_states",), ("hidden_states",))}),
    # Flux 2: Flux-like lists joined as AuraFlow's; the modulation tables are computed once in
    # the prologue and passed to every block. The reference-KV-cache modes act between blocks
    "Flux2Transformer2DModel": DiTFamily(**_FLUX_LISTS_JOINED,
                                         refused=("kv_cache", "kv_cache_mode")),
    # video DiTs with one block list: dual-stream blocks that return (hidden, encoder) ...
    "CogVideoXTransformer3DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states")),
    "MochiTransformer3DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states")),
    "CogView3PlusTransformer2DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states")),
    # dual-stream, then single-stream blocks that take and return both streams too
    "HunyuanVideoTransformer3DModel": _BOTH_STREAMS_THROUGH_BOTH_LISTS,
    "HunyuanImageTransformer2DModel": _BOTH_STREAMS_THROUGH_BOTH_LISTS,
    "MotifVideoTransformer3DModel": _BOTH_STREAMS_THROUGH_BOTH_LISTS,
    "HunyuanVideo15Transformer3DModel": DiTFamily(
        blocks=("transformer_blocks",), flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states")),
    # the text blocks run in the prologue; the visual blocks carry the visual tokens
    "Kandinsky5Transformer3DModel": DiTFamily(
        blocks=("visual_transformer_blocks",), flow=("visual_embed",), returns=("visual_embed",)),
    # DiT blocks with cross-attention to the fixed text; a ControlNet residual is a block's own
    # argument (the block adds it)
    "CosmosTransformer3DModel": DiTFamily(blocks=("transformer_blocks",)),
    # ... and image-stream blocks with cross-attention to the fixed text
    "LTXVideoTransformer3DModel": DiTFamily(blocks=("transformer_blocks",)),
    "AllegroTransformer3DModel": DiTFamily(blocks=("transformer_blocks",)),
    # dual- then single-stream blocks (mixture-of-experts feed-forward); before each block the
    # forward appends that block's Llama 3 layer to a stream (the text stream of the dual-stream
    # blocks, the joined sequence of the single-stream ones) and cuts it off after the block
    "HiDreamImageTransformer2DModel": DiTFamily(
        blocks=("double_stream_blocks", "single_stream_blocks"),
        flow=("hidden_states", "encoder_hidden_states"),
        returns=("hidden_states", "encoder_hidden_states"),
        per_list={"single_stream_blocks": (("hidden_states",), ("hidden_states",))},
        appended={"double_stream_blocks": ("encoder_hidden_states",),
                  "single_stream_blocks": ("hidden_states",)}),
    # Flux-like lists, joined as AuraFlow's; each block gets its own slice of one modulation table
    "ChromaTransformer2DModel": DiTFamily(
        **_FLUX_LISTS_JOINED,
        refused=("controlnet_block_samples", "controlnet_single_block_samples")),
}


def _layout(value: Any) -> tuple:
    """Shapes and dtypes of the tensors in a nested argument (the key of the first-use check)."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, dict):
        return tuple((k, _layout(value[k])) for k in sorted(value, key=str))
    if isinstance(value, (list, tuple)):
        return tuple(_layout(v) for v in value)
    return (type(value).__name__,)


def _block_output(values: tuple) -> Any:
    """``values`` as a block returns them: the tensor itself for one name, else the tuple."""
    return values[0] if len(values) == 1 else values


#: the key of a block call's ``*args`` values among its recorded arguments (not an identifier,
#: so no parameter can have it)
VAR_POSITIONAL = "*args"


def _named_before_var_positional(block: torch.nn.Module) -> list[str]:
    """The parameters of ``block.forward`` before its ``*args``, in order (all of them when it
    takes no ``*args``)."""
    names = []
    for name, param in inspect.signature(block.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return names
        names.append(name)
    return names


def dit_family(model: torch.nn.Module) -> DiTFamily | None:
    """The description of ``model``'s class (exact class name match), or None."""
    return DIT_FAMILIES.get(type(model).__name__)


def _appended_tokens(received: torch.Tensor, where: str) -> tuple[int, torch.Tensor] | None:
    """How a flow the previous block's stand-in returned as NaN reached the next block: (number
    of leading tokens kept from it, the tokens appended after them) along dim 1, or None when
    nothing was appended. Anything else (NaN mixed with values within a token, values before
    NaN, no NaN at all) raises UnsupportedModelError: the description does not fit."""
    per_token = received.movedim(1, 0).reshape(received.shape[1], -1).isnan()
    from_previous, appended = per_token.all(dim=1), ~per_token.any(dim=1)
    kept = int(from_previous.sum())
    if not (kept and from_previous[:kept].all() and appended[kept:].all()):
        raise UnsupportedModelError(
            f"{where} does not receive the previous block's output followed by appended tokens "
            "(dim 1); the DiT description's 'appended' does not fit this model")
    if kept == received.shape[1]:
        return None
    return kept, received[:, kept:]


class _Stop(Exception):
    """Raised by a stand-in block to end the forward once the prologue is done."""


class _StandIn(torch.nn.Module):
    """Takes a block's place in its ModuleList for one forward; calls ``action(index, args,
    kwargs)`` and returns what it returns. Other attributes are read from the block it stands in
    for (DiT's forward takes its class-label embedding from ``transformer_blocks[0].norm1``)."""

    def __init__(self, index: int, action: Callable[[int, tuple, dict], Any],
                 block: torch.nn.Module) -> None:
        super().__init__()
        self.index, self.action = index, action
        self.__dict__["_block"] = block  # not a submodule: its parameters stay the model's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.action(self.index, args, kwargs)


@dataclasses.dataclass
class DiTContext(StageContext):
    """Per-step context of a staged DiT.

    Attributes:
        initial_state: the flow arguments of the first block, e.g.
            ``{"hidden_states": (B, N, D)}``.
        block_kwargs: per block list, per block, the non-flow keyword arguments the forward
            calls that block with (carried ones left out).
        forward_kwargs: the model's forward arguments of this step (for the epilogue).
        carried: per block list, per block, ``{argument: (state key, last use)}`` for the
            arguments that are an earlier block's output; the last user drops the key.
        kept: per block list, per block, ``{returned name: state key}`` for the outputs a later
            block takes.
        added: per block list, per block, ``{returned name: tensor}`` that the forward adds to
            that output before the next block of the list (or of the next list, when no
            ``into.`` unit is between them) takes it: ControlNet residuals, each shaped like the
            output; empty dicts when the call passes none (the family's ``between``).
        joined: per block list, per block, ``{returned name: (kept, tokens)}`` for the outputs
            the next block takes as ``cat([output[:, :kept], tokens], dim=1)`` (the family's
            ``appended``); empty dicts elsewhere.
    """

    block_kwargs: list[list[dict[str, Any]]]
    forward_kwargs: dict[str, Any]
    carried: list[list[dict[str, tuple[str, bool]]]]
    kept: list[list[dict[str, str]]]
    added: list[list[dict[str, torch.Tensor]]]
    joined: list[list[dict[str, tuple[int, torch.Tensor]]]]


class DiTBlock(Unit):
    """``<list>[index]`` called with its own recorded context and the flowing state."""

    def __init__(self, block: torch.nn.Module, list_index: int, index: int, name: str,
                 flow: tuple[str, ...], returns: tuple[str, ...]) -> None:
        self.name, self.block, self.list_index, self.index = name, block, list_index, index
        self.flow, self.returns = flow, returns
        self.before_var_positional = _named_before_var_positional(block)

    def __call__(self, state: State, ctx: DiTContext) -> State:
        li, i = self.list_index, self.index
        kwargs = dict(ctx.block_kwargs[li][i])
        kwargs.update({k: state[k] for k in self.flow})
        riding = {k: v for k, v in state.items() if k not in self.flow}  # carried outputs
        for argument, (key, last_use) in ctx.carried[li][i].items():
            kwargs[argument] = riding.pop(key) if last_use else riding[key]
        extra = kwargs.pop(VAR_POSITIONAL, ())
        if extra:  # the named parameters before *args go positionally, then *args
            out = self.block(*(kwargs.pop(k) for k in self.before_var_positional), *extra,
                             **kwargs)
        else:
            out = self.block(**kwargs)
        values = (out,) if len(self.returns) == 1 else tuple(out)
        new = dict(zip(self.returns, values))
        for name, residual in ctx.added[li][i].items():
            new[name] = new[name] + residual
        for name, (kept, tokens) in ctx.joined[li][i].items():
            new[name] = torch.cat([new[name][:, :kept], tokens], dim=1)
        riding.update({key: new[name] for name, key in ctx.kept[li][i].items()})
        return {**new, **riding}


class IntoList(Unit):
    """``into.<list>``: the state after the blocks of list ``list_index - 1`` -> the flow
    arguments of list ``list_index``'s first block, made by the model's own forward (its code
    between the two lists) with the earlier blocks returning that state."""

    def __init__(self, staged: StagedDiT, list_index: int) -> None:
        self.staged, self.list_index = staged, list_index
        self.name = f"into.{staged._lists[list_index][0]}"

    def __call__(self, state: State, ctx: DiTContext) -> State:
        staged, target = self.staged, self.list_index
        before = staged._returns[target - 1]
        if not set(before) <= set(state):
            raise ShapeError(f"{self.name} expects the state after the blocks before it "
                             f"({sorted(before)}), got keys {sorted(state)}")
        riding = {k: v for k, v in state.items() if k not in before}  # carried outputs
        result = _block_output(tuple(state[k] for k in before))
        entered: dict[str, Any] = {}

        def action(li: int, index: int, args: tuple, kw: dict) -> Any:
            if li == target - 1:
                return result
            if li < target - 1:
                return staged._pass_through(li, args, kw)
            entered.update(staged._bind_block_call(li, args, kw))
            raise _Stop

        try:
            staged._run_forward({**ctx.forward_kwargs, "return_dict": False}, action)
        except _Stop:
            pass
        else:
            raise ShapeError(f"{type(staged.model).__name__}'s forward returned without calling "
                             f"{staged._lists[target][0]}; the DiT description is wrong")
        return {**{k: entered[k] for k in staged._flows[target]}, **riding}


class Epilogue(Unit):
    """``out``: the model's own forward with its blocks returning the flowing state, so the
    norm / projection / unpatchify after the blocks run as in the model -> ``{"sample": ...}``."""

    def __init__(self, staged: StagedDiT) -> None:
        self.name, self.staged = "out", staged

    def __call__(self, state: State, ctx: DiTContext) -> State:
        staged = self.staged
        returns, last = staged._returns[-1], len(staged._lists) - 1
        if set(state) != set(returns):
            raise ShapeError(f"the out unit expects the state after the last block "
                             f"({sorted(returns)}), got keys {sorted(state)}")
        result = _block_output(tuple(state[k] for k in returns))
        # earlier lists pass their flow through, so what the forward computes between the lists
        # (token counts, joins) is what it computed in prepare; the last list returns the state
        out = staged._run_forward(
            {**ctx.forward_kwargs, "return_dict": False},
            lambda li, i, a, k: result if li == last else staged._pass_through(li, a, k))
        return {"sample": prediction_of(out)}


class StagedDiT(StagedDenoiser):
    """A DiT described by a :class:`DiTFamily` as prepare / units / finish (module docstring).

    ``prepare`` takes exactly the keyword arguments of the model's forward; ``finish`` returns
    the prediction ``model(**kw, return_dict=False)`` returns (:func:`.base.prediction_of`).
    """

    def __init__(self, model: torch.nn.Module, family: DiTFamily) -> None:
        require_plain_forward(model, type(model))
        self.model, self.family = model, family
        self._forward = type(model).forward
        self._signature = inspect.signature(self._forward)
        self._lists = []
        for attr in family.blocks:
            blocks = getattr(model, attr, None)
            if not isinstance(blocks, torch.nn.ModuleList):
                raise UnsupportedModelError(f"{type(model).__name__}.{attr} is not a ModuleList "
                                            "of blocks; the DiT description is wrong")
            if len(blocks):  # an empty list never runs (a configuration without those blocks)
                self._lists.append((attr, blocks))
        if not self._lists:
            raise UnsupportedModelError(f"{type(model).__name__} has no blocks in "
                                        f"{', '.join(family.blocks)}: nothing to stage")
        if family.appended and family.between:
            raise UnsupportedModelError(f"the description of {type(model).__name__} has both "
                                        "'appended' and 'between', which the staged DiT does not "
                                        "combine")
        #: per list, the flows the forward appends tokens to around each block
        self._appended = [family.appended.get(attr, ()) for attr, _ in self._lists]
        #: the forward signature of each list's block class (bound at every block call)
        self._block_signatures = [inspect.signature(type(blocks[0]).forward)
                                  for _, blocks in self._lists]
        self._flows = [family.flow_of(attr) for attr, _ in self._lists]
        self._returns = [family.returns_of(attr) for attr, _ in self._lists]
        self.units: list[Unit] = []
        for li, (attr, blocks) in enumerate(self._lists):
            if li and set(self._flows[li]) != set(self._returns[li - 1]):
                self.units.append(IntoList(self, li))
            self.units.extend(DiTBlock(block, li, i, f"{attr}.{i}", self._flows[li],
                                       self._returns[li]) for i, block in enumerate(blocks))
        self.units.append(Epilogue(self))
        self._checked: set[tuple] = set()  # input layouts already checked against the forward

    # ------------------------------------------------------------------------- forward runs
    def _run_forward(self, kwargs: dict[str, Any], action: Callable[[int, int, tuple, dict], Any]):
        """The model's own forward on ``kwargs`` with every block replaced by a stand-in that
        calls ``action(list_index, block_index, args, kwargs)``; the real blocks are put back
        afterwards whatever happens."""
        model = self.model
        for li, (attr, blocks) in enumerate(self._lists):
            stand_ins = [_StandIn(i, lambda i, a, k, li=li: action(li, i, a, k), block)
                         for i, block in enumerate(blocks)]
            model._modules[attr] = torch.nn.ModuleList(stand_ins)
        try:
            return self._forward(model, **kwargs)
        finally:
            for attr, blocks in self._lists:
                model._modules[attr] = blocks

    def _bind_block_call(self, li: int, args: tuple, kwargs: dict) -> dict[str, Any]:
        """A block call's arguments by parameter name (``**kwargs`` of the block expanded, the
        values its ``*args`` took, if any, under :data:`VAR_POSITIONAL`)."""
        block = self._lists[li][1][0]
        signature = self._block_signatures[li]
        bound = signature.bind(block, *args, **kwargs).arguments
        bound.pop("self", None)
        params = signature.parameters
        named: dict[str, Any] = {}
        for name, value in bound.items():
            kind = params[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:  # passed positionally after the named ones (HunyuanVideo's blocks)
                    named[VAR_POSITIONAL] = value
            else:
                named[name] = value
        missing = [k for k in self._flows[li] if k not in named]
        if missing:
            raise UnsupportedModelError(f"{type(block).__name__} was called without the flow "
                                        f"arguments {missing}; the DiT description is wrong")
        return named

    def _previous_block(self, li: int, index: int) -> tuple[int, int] | None:
        """The block whose returns block ``index`` of list ``li`` takes as its flow: the one
        before it in its list, or the last of the list before when no ``into.`` unit is between
        the lists; None for the first block and after an ``into.`` unit."""
        if index:
            return li, index - 1
        if li and set(self._flows[li]) == set(self._returns[li - 1]):
            return li - 1, len(self._lists[li - 1][1]) - 1
        return None

    def _carried_key(self, li: int, index: int, name: str) -> str:
        """The state key of output ``name`` of block ``index`` of list ``li`` while carried."""
        return f"{self._lists[li][0]}.{index}:{name}"

    def _pass_through(self, li: int, args: tuple, kwargs: dict) -> Any:
        """What a stand-in of list ``li`` returns to let the forward go on unchanged: its flow
        arguments as the block's returns (the blocks of a list keep their flow's shapes)."""
        named = self._bind_block_call(li, args, kwargs)
        return _block_output(tuple(named[k] for k in self._returns[li]))

    # ----------------------------------------------------------------------------- contract
    def prepare(self, **denoiser_kwargs: Any) -> DiTContext:
        """Run the prologue of the model's forward on these arguments (its own code) and record
        what its blocks are called with. Arguments as in the model's forward; ``return_dict``
        is ignored."""
        try:
            kwargs = dict(self._signature.bind(self.model, **denoiser_kwargs).arguments)
        except TypeError as exc:
            raise UnsupportedModelError(f"{type(self.model).__name__}'s forward does not take "
                                        f"these arguments: {exc}") from exc
        kwargs.pop("self", None)
        kwargs.pop("return_dict", None)
        for name in self.family.refused:
            if kwargs.get(name) is not None:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} with {name}=...: the forward applies it between "
                    "blocks, which the staged DiT does not reproduce; run without it or with k=0")
        recorded: list[list[dict[str, Any] | None]] = [[None] * len(blocks)
                                                        for _, blocks in self._lists]
        producer: dict[int, tuple[int, int, str]] = {}  # id of a returned view -> its block
        views: list[torch.Tensor] = []  # kept alive, so that no id is reused during the forward
        # residuals added between blocks: the stand-ins return zeros, so the next block gets them
        zeros = any(kwargs.get(name) is not None for name in self.family.between)
        returned: dict[tuple[int, int], dict[str, Any]] = {}  # what each stand-in returned
        added: list[list[dict[str, torch.Tensor]]] = [[{} for _ in blocks]
                                                      for _, blocks in self._lists]
        joined: list[list[dict[str, tuple[int, torch.Tensor]]]] = [[{} for _ in blocks]
                                                                   for _, blocks in self._lists]

        def record(li: int, index: int, args: tuple, kw: dict) -> Any:
            recorded[li][index] = named = self._bind_block_call(li, args, kw)
            previous = self._previous_block(li, index)
            if zeros and previous is not None:
                gave = returned[previous]
                for name in self._flows[li]:  # not what the previous stand-in returned: 0 + r
                    if isinstance(gave.get(name), torch.Tensor) and named[name] is not gave[name]:
                        added[previous[0]][previous[1]][name] = named[name]
            if previous is not None:  # the previous stand-in returned NaN for these flows
                for name in self._appended[li]:
                    join = _appended_tokens(named[name], f"{self._lists[li][0]}.{index}")
                    if join is not None:
                        joined[previous[0]][previous[1]][name] = join
            fresh = {}  # the flow passed through (zeros, NaN), as the block's returns
            for name in self._returns[li]:
                value = named[name]
                if isinstance(value, torch.Tensor):
                    # a new object: its users can be told apart
                    if name in self._appended[li]:
                        value = torch.full_like(value, float("nan"))
                    else:
                        value = torch.zeros_like(value) if zeros else value.view_as(value)
                    producer[id(value)] = (li, index, name)
                    views.append(value)
                fresh[name] = value
            returned[(li, index)] = fresh
            return _block_output(tuple(fresh.values()))

        try:
            self._run_forward({**kwargs, "return_dict": False}, record)
        except HybridError:
            raise
        except Exception as exc:  # bad inputs, or stand-ins that do not fit the forward
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s forward failed with its blocks stood in for "
                f"({type(exc).__name__}: {exc}): these inputs or the DiT description do not "
                "fit it") from exc
        missing = [f"{attr}.{i}" for (attr, _), calls in zip(self._lists, recorded)
                   for i, call in enumerate(calls) if call is None]
        if missing:
            raise ShapeError(f"{type(self.model).__name__}'s forward did not call "
                             f"{', '.join(missing)} on these inputs; the DiT description does not "
                             "fit them")
        # non-flow arguments that are an earlier block's output: carried in the state
        sources = [[{k: producer[id(v)] for k, v in call.items()
                     if k not in flow and isinstance(v, torch.Tensor) and id(v) in producer}
                    for call in calls] for calls, flow in zip(recorded, self._flows)]
        last_user = {source: (li, i) for li, calls in enumerate(sources)
                     for i, taken in enumerate(calls) for source in taken.values()}
        kept: list[list[dict[str, str]]] = [[{} for _ in calls] for calls in recorded]
        for li, i, name in last_user:
            kept[li][i][name] = self._carried_key(li, i, name)
        carried = [[{arg: (self._carried_key(*source), last_user[source] == (li, i))
                     for arg, source in taken.items()} for i, taken in enumerate(calls)]
                   for li, calls in enumerate(sources)]
        block_kwargs = [[{k: v for k, v in call.items() if k not in flow and k not in taken}
                         for call, taken in zip(calls, taken_here)]
                        for calls, flow, taken_here in zip(recorded, self._flows, sources)]
        ctx = DiTContext(initial_state={k: recorded[0][0][k] for k in self._flows[0]},
                         block_kwargs=block_kwargs, forward_kwargs=kwargs, carried=carried,
                         kept=kept, added=added, joined=joined)
        layout = _layout(kwargs)
        if layout not in self._checked:
            self._check_against_forward(ctx)
            self._checked.add(layout)
        return ctx

    def _check_against_forward(self, ctx: DiTContext) -> None:
        """Run the units once and compare with the model's own forward on the same inputs (bit
        for bit): a description that does not fit this model (another version of the class, a
        forward that acts between blocks) is refused at its first use, not run inexactly."""
        expected = prediction_of(self._forward(self.model, **ctx.forward_kwargs,
                                               return_dict=False))
        try:
            got = self.finish(self.run(ctx.initial_state, ctx), ctx)
            problem = "" if torch.equal(got, expected) else "a different prediction"
        except Exception as exc:  # noqa: BLE001 - any failure means the description does not fit
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            raise UnsupportedModelError(
                f"the staged {type(self.model).__name__} (stages.dit.DIT_FAMILIES) gave {problem} "
                "where the model's own forward ran: the description does not fit this model or "
                "these inputs; run it with k=0, or correct its DiTFamily")

    def finish(self, state: State, ctx: DiTContext) -> torch.Tensor:
        """The prediction, from the state after the ``out`` unit."""
        if set(state) != {"sample"}:
            raise ShapeError(f"finish expects the state after the last unit ('out'), got keys "
                             f"{sorted(state)}")
        return state["sample"]
