"""Stale-activation stage pipelining (the AsyncDiff scheme) across the ranks, one step at a time.

The denoiser's units are cut into as many stages as ranks; rank j runs stage j. On pipelined step
s, rank 0 runs stage 0 on the fresh latent, and rank j > 0 runs stage j on the boundary state that
rank j-1 produced at step s-1 (stale by one step), while the boundary of step s travels to rank
j+1 in the background for step s+1. The last rank's output is the prediction of step s, sent to
every rank so that each can step its scheduler.

The first pipelined step has no stale state: it runs the stages one after another on fresh inputs
(the whole model once, as the reference code does) and its time is counted like any other step.
No boundary is sent on the last pipelined step, since no pipelined step follows to consume it, so
sends and receives always pair up and a run that ends mid-pipeline leaves nothing in flight that
``drain()`` cannot finish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ..comm import PendingTransfer, Transport
from ..stages import (
    StagedDenoiser,
    empty_state_like,
    flatten_state,
    model_device,
    unflatten_state,
)
from ..stages.partition import PartitionPlan
from .compiled import stage_function


class StagePipeline:
    """Per-rank executor of pipelined steps for one run.

    Args:
        staged: the staged denoiser (same weights on every rank).
        plan: the partition; stage j = ``plan.stage_range(j)`` runs on rank j.
        layouts: ``layouts[u]`` = tensor specs of the state leaving unit u (from the profile), used
            to allocate receive buffers.
        transport: moves boundary states and the prediction.
        rank, world_size: this rank and the number of stages.
        run_stage: ``run_stage(cond_kw, state) -> state`` (the last stage: -> prediction), this
            rank's stage with ``prepare`` (``state`` None: the step's initial state); default the
            eager ``engine.compiled.stage_function`` (the runtime passes a compiled or
            graph-replayed one).
        timer: an ``engine.timing.StepTimer`` for the compute / transfer / wait sections.
    """

    def __init__(self, staged: StagedDenoiser, plan: PartitionPlan, layouts: Any,
                 transport: Transport, rank: int, world_size: int,
                 run_stage: Callable[[dict[str, Any], Any], Any] | None = None,
                 timer: Any = None) -> None:
        if plan.num_stages != world_size:
            raise ValueError(f"plan has {plan.num_stages} stages for {world_size} ranks")
        self.staged = staged
        self.plan = plan
        self.transport = transport
        self.rank = rank
        self.world_size = world_size
        self.start, self.stop = plan.stage_range(rank)
        self._run_stage = run_stage or stage_function(staged, self.start, self.stop,
                                                      last=rank == world_size - 1)
        self._section = timer.section if timer is not None else _untimed
        self._in_layout = layouts[self.start - 1] if rank > 0 else None
        (self._out_spec,) = layouts[-1]  # the state after the last unit holds the prediction
        self._stale: dict[str, torch.Tensor] | None = None  # boundary of step s-1 (rank > 0)
        self._incoming: tuple[dict[str, torch.Tensor], PendingTransfer] | None = None
        self._outgoing: PendingTransfer | None = None

    def step(self, cond_kw: dict[str, Any], step: int, *, first: bool,
             more_follow: bool) -> torch.Tensor:
        """Run this rank's stage for pipelined step ``step``; return the prediction (all ranks).

        Args:
            cond_kw: the model's keyword inputs of the cond branch for this step (every stage
                runs with the cond conditioning).
            first: the first pipelined step of the run (fill: stages run in sequence, fresh).
            more_follow: another pipelined step follows this one (so boundaries are shipped).
        """
        last_rank = self.world_size - 1
        state_in = None  # rank 0: this step's own initial state (built by prepare)
        if self.rank > 0 and first:
            with self._section("transfer"):
                state_in = self._receive_now(step)
        elif self.rank > 0:
            with self._section("wait"):
                state_in = self._take_stale(step)
        if self.rank > 0 and more_follow and not first:
            self._post_receive(step)  # boundary of this step, consumed by the next one
        with self._section("compute"):
            out = self._run_stage(cond_kw, state_in)
        if self.rank < last_rank and (first or more_follow):
            self._send(out, step)
        if self.rank == last_rank:
            prediction = out.contiguous()
        else:
            prediction = self._prediction_buffer()
        with self._section("transfer"):
            self.transport.broadcast(prediction, src=last_rank,
                                     what=f"pipeline step {step} prediction")
        if self.rank > 0 and first:
            self._stale = state_in
        return prediction

    def drain(self) -> None:
        """Complete every transfer still in flight (called when the pipelined phase ends)."""
        if self._outgoing is not None:
            self._outgoing.wait()
            self._outgoing = None
        if self._incoming is not None:
            self._incoming[1].wait()
            self._incoming = None
        self._stale = None

    # ------------------------------------------------------------------------------ transfers
    def _prediction_buffer(self) -> torch.Tensor:
        spec = self._out_spec
        return torch.empty(spec.shape, dtype=spec.torch_dtype,
                           device=model_device(self.staged.model))

    def _send(self, state: dict[str, torch.Tensor], step: int) -> None:
        if self._outgoing is not None:
            with self._section("wait"):
                self._outgoing.wait()  # the previous boundary must be out before the next
        _, tensors = flatten_state(state)
        self._outgoing = self.transport.isend(tensors, self.rank + 1,
                                              what=f"pipeline step {step} boundary")

    def _post_receive(self, step: int) -> None:
        buffers = empty_state_like(self._in_layout, model_device(self.staged.model))
        names, tensors = flatten_state(buffers)
        pending = self.transport.irecv(tensors, self.rank - 1,
                                       what=f"pipeline step {step} boundary")
        self._incoming = (unflatten_state(names, tensors), pending)

    def _receive_now(self, step: int) -> dict[str, torch.Tensor]:
        self._post_receive(step)
        return self._take_incoming()

    def _take_incoming(self) -> dict[str, torch.Tensor]:
        state, pending = self._incoming
        pending.wait()
        self._incoming = None
        return state

    def _take_stale(self, step: int) -> dict[str, torch.Tensor]:
        """The boundary rank-1 produced at step-1: received during the previous step (or, right
        after the fill step, the same fresh boundary the fill step used)."""
        if self._incoming is not None:
            self._stale = self._take_incoming()
        if self._stale is None:
            raise RuntimeError(f"pipeline step {step}: no boundary state from the previous step")
        return self._stale


@contextlib.contextmanager
def _untimed(kind: str):
    yield


def plan_fields(plan: PartitionPlan, profile: Any) -> dict[str, Any]:
    """The report fields (``RunReport.extra["pipeline"]``) that describe a stage cut and the unit
    profile it was planned from: the plan, each stage's unit names, every unit's cost (ms) and the
    bytes of the state leaving it, and the device the costs were measured on."""
    return {
        "plan": plan.to_dict(),
        "stage_units": [list(profile.unit_names[a:b])
                        for a, b in zip(plan.cuts[:-1], plan.cuts[1:])],
        "unit_names": list(profile.unit_names),
        "unit_ms": list(profile.unit_ms),
        "boundary_bytes": list(profile.boundary_bytes),
        "profile_device": profile.device,
    }
