"""HybridDenoiser: the per-rank step executor, one implementation for custom loops and diffusers.

Per step it asks the SwitchSchedule for the mode and then
  * "cbp": rank 0 runs the uncond branch, rank 1 the cond branch, the two predictions are
    exchanged, the discrepancy statistic of the exchanged pair feeds the schedule (every rank
    computes it from identical tensors, so every rank takes the same decision, no broadcast);
  * "pipeline": the stale-activation stage pipeline (see stage_pipeline.py) produces the cond
    prediction; the uncond prediction is synthesised from the guidance policy;
  * "serial" (world size 1, or a call without CFG): this rank runs everything itself.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import math
import time
import weakref
from typing import Any, Callable, Sequence

import torch

from ..comm import (
    Transport,
    default_store,
    init_distributed,
    make_transport,
    wait_for_keys,
)
from ..config import HybridConfig, fit_to_steps, require_config
from ..errors import (
    HybridError,
    NonFinitePredictionError,
    ShapeError,
    UnsupportedModelError,
)
from ..ops import cfg_combine, discrepancy_stats, rel_mae
from ..schedule import SwitchSchedule
from ..stages import (
    StagedDenoiser,
    UnitProfile,
    has_stage_adapter,
    model_device,
    stage_denoiser,
)
from ..stages.partition import PartitionPlan
from .agreement import check_agreement
from .batch import describe_shapes, guidance_value
from .branch_layout import (
    OutputKind,
    batch_axes,
    denoiser_sample_key,
    first_output,
    frames_per_row,
)
from .compiled import Accelerator
from .link_probe import (
    cached_link_figure,
    probe_bytes,
    round_trip_bytes_per_ms,
    shared_profile,
)
from .rebalance import (
    PhaseStages,
    StageCalibration,
    describe,
    eager_stage_ms,
    gather_medians,
    phase_median_ms,
    publish_median,
)
from .report import RunReport
from .scale_out import ScaleOut
from .stage_pipeline import StagePipeline, plan_fields
from .timing import StepTimer
from .world import RankLayout, check_world_size

_INSTANCES = itertools.count()

Kwargs = dict[str, Any]


def _close_quietly(transport: Transport) -> None:
    with contextlib.suppress(Exception):
        transport.close()


def model_family(model: torch.nn.Module) -> str:
    """"unet" for UNet2DConditionModel, "mmdit" for SD3Transformer2DModel, "generic" for any
    other denoiser whose forward follows the diffusers convention (see branch_layout); else a
    clear UnsupportedModelError."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(model, UNet2DConditionModel):
        return "unet"
    if isinstance(model, SD3Transformer2DModel):
        return "mmdit"
    denoiser_sample_key(model)  # raises for anything that is not a diffusers-style denoiser
    return "generic"


class HybridDenoiser:
    """Classifier-free-guided denoiser spread over the ranks of the default process group.

    Args:
        model: a diffusers-style denoiser (sample first, ``return_dict``; see branch_layout),
            the same weights on every rank. Pipelining (``k > 0``) needs a stage adapter
            (``stages.has_stage_adapter``) that accepts this instance; without one (or when it
            refuses, e.g. a U-Net of other block types or a hooked forward) the run is CBP
            only, with a note.
        cfg: HybridConfig (default: HybridConfig()).
        transport: a Transport to use instead of the one ``cfg.transport`` selects.
        no_stages_reason: run CBP only (no stage pipeline) for this reason, noted in the report
            when ``k > 0``.
        experts: other denoisers of the same class the caller may run on some steps (Wan 2.2's
            low-noise transformer), each passed per step as ``forward=expert.forward``; each
            gets its own staged denoiser, and a pipelined phase that meets another expert than
            the one its stale boundary came from starts over with a fill step (on 2N > 2 ranks
            the pair's or the world's stage chain is planned again for that expert).

    Call once per step, on every rank, with identical arguments::

        eps = den(sample, timestep, cond={...}, uncond={...}, guidance_scale=w, step=i,
                  num_steps=T)

    ``cond`` / ``uncond`` hold the model's keyword inputs for each branch (encoder_hidden_states,
    added_cond_kwargs, pooled_projections, ...). The result is the guided prediction
    ``u + w (c - u)``, shape of ``sample``, identical on every rank.
    """

    def __init__(self, model: torch.nn.Module, cfg: HybridConfig | None = None, *,
                 transport: Transport | None = None, no_stages_reason: str | None = None,
                 experts: Sequence[torch.nn.Module] = ()) -> None:
        self.family = model_family(model)
        self.model = model
        self.cfg = require_config(cfg)
        # joining the job waits for ranks still loading their models: the handshake limit
        self.dist = init_distributed(timeout_s=self.cfg.handshake_timeout_s)
        self._pairs = check_world_size(self.dist.world_size)  # WorldSizeError when odd
        self._scale: ScaleOut | None = None  # runs on 2N > 2 ranks (engine/scale_out.py)
        self.sample_key = denoiser_sample_key(model)
        #: how the model returns its prediction (learned from its first return; None until then)
        self.output_kind: OutputKind | None = None
        # staged before anyone (parallelize) wraps model.forward: units call the submodules.
        # A denoiser without a stage adapter (or a caller's reason) runs CBP only, with a note.
        self._no_stages_reason = no_stages_reason
        if no_stages_reason is None and not has_stage_adapter(model):
            self._no_stages_reason = (f"{type(model).__name__} has no stage adapter "
                                      "(hybridiff_rt.stages)")
        wants_stages = self.world_size > 1 and self.cfg.k > 0 and self._no_stages_reason is None
        self._staged = self._stage_or_note(model) if wants_stages else None
        #: the staged denoiser of each other expert, by the forward the caller passes for it
        self._expert_stages: dict[Callable[..., Any], StagedDenoiser] = {}
        for expert in experts if self._staged is not None else ():
            staged = self._stage_or_note(expert)
            if staged is None:
                self._staged = None
                break
            self._expert_stages[expert.forward] = staged
        self._pipeline: StagePipeline | None = None
        # cuts re-planned from measured stage times (engine/rebalance.py), kept across runs:
        # the open phase, the closed one whose medians the next phase gathers, and per chain
        # the number of phases planned (the store keys of their exchanges)
        # (a pinned stage_cuts is never re-planned, so nothing is measured for it)
        self._calibration = (StageCalibration()
                             if self.cfg.rebalance and self.cfg.stage_cuts is None else None)
        self._phase: PhaseStages | None = None
        self._closed_phase: PhaseStages | None = None
        self._phases_planned: dict[str, int] = {}
        # compiled / graph-replayed calls (engine/compiled.py) and per-step timings (timing.py)
        device = model_device(model, self.dist.device)
        self._accel = Accelerator(self.cfg, device, self._note)
        self._timer = StepTimer(device)
        forward = self._accel.forward(model.forward) if self._accel.enabled else model.forward
        self._model_forward: Callable[..., Any] = self._timer.timed(forward)
        self._raw_forward = model.forward
        #: other forwards a caller passes per step (another expert), accelerated and timed alike
        self._other_forwards: dict[Callable[..., Any], Callable[..., Any]] = {}
        self._transport = transport
        self._owns_transport = transport is None
        self._instance = next(_INSTANCES)
        self._run_index = -1
        self._context: Kwargs = {}
        self._closed = False
        self.reset()

    # ----------------------------------------------------------------------------- public API
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def report(self) -> RunReport:
        """The RunReport of the current (or last finished) run."""
        self._collect_timings(block=True)
        return self._report

    def reset(self, context: Kwargs | None = None) -> None:
        """Start a new run: the next call is step 0 and gets a fresh schedule and report.

        Args:
            context: extra fields every rank must agree on, checked with the inputs at the first
                call of the run (the diffusers adapter passes the pipeline call's arguments and
                the scheduler); name -> value, values digested exactly.
        """
        self._run_index += 1
        self._discard_pipeline()
        self._phase = None  # a phase of an abandoned run is not measured
        if getattr(self, "_report", None) is not None:
            self._collect_timings(block=True)
        self._report = RunReport(rank=self.rank, world_size=self.world_size,
                                 config=self.cfg.to_dict(), timing_clock=self._timer.clock)
        self._schedule: SwitchSchedule | None = None
        self._scale = None
        self._next_step = 0
        self._pipeline_builds = 0  # stage pipelines set up in this run (their store keys)
        self._agreed = False
        self._agreements = 0  # agreement rounds in this run (their store keys)
        self._sample_shape: tuple[int, ...] | None = None  # the last guided step's sample
        self._last_difference: torch.Tensor | None = None
        self._context = dict(context or {})

    def end_run(self) -> None:
        """Close the current run after its last call: drain the stage pipeline if a run stopped
        inside the pipelined phase, and make the report's ``num_steps`` the calls really made
        (with a note when that differs from the planned count)."""
        self._discard_pipeline(wait=True)
        self._collect_timings(block=True)
        made = len(self._report.modes)
        if self._phase is not None:  # the run ended inside a pipelined phase
            self._close_phase(made - 1)
        planned = self._report.num_steps
        if planned is not None and made != planned:
            self._report.note(f"the run made {made} denoiser calls, {planned} were planned")
            self._report.num_steps = made

    def close(self) -> None:
        """Release what the runtime holds between runs: the stage pipeline and the transport
        it created (its process group or IPC rings). Idempotent; the object is unusable after."""
        if self._closed:
            return
        self._closed = True
        self._discard_pipeline()
        if self._transport is not None and self._owns_transport:
            with contextlib.suppress(Exception):
                self._transport.close()
        self._transport = None

    def refuse(self, reason: str, *, step: int | None = None,
               num_steps: int | None = None) -> None:
        """Refuse this run at its first call with UnsupportedModelError(``reason``) on every rank
        together: the ranks first agree on the call (so a rank that would not refuse is told of
        the disagreement instead of waiting for a peer that left)."""
        step = self._begin_step(step, num_steps)
        if self.world_size > 1 and not self._agreed:
            self._check_agreement({"guidance": "refused", **self._run_fields(),
                                   "refusal": reason})
        raise UnsupportedModelError(reason)

    def side_call(self, kw: Kwargs, reason: str) -> Any:
        """Run the model on ``kw`` unchanged on this rank without advancing the step (an extra
        call a pipeline makes besides its CFG calls, e.g. skip-layer guidance); returns the
        model's own output and notes ``reason`` in the report."""
        self._check_open()
        with torch.no_grad():
            out = self._model_forward(**kw)
        self._report.note(reason)
        return out

    def __call__(self, sample: torch.Tensor, timestep: Any, cond: Kwargs, uncond: Kwargs,
                 guidance_scale: float, step: int | None = None,
                 num_steps: int | None = None) -> torch.Tensor:
        scale = guidance_value(guidance_scale)
        if isinstance(scale, torch.Tensor):  # refused before the step runs: nothing recorded
            raise ShapeError(
                f"guidance_scale must be a number or a one-element tensor here, got a tensor of "
                f"shape {tuple(scale.shape)}; for a per-sample or per-frame scale call "
                "predict_branches(...) and combine u + w (c - u) yourself")
        uncond_kw = {self.sample_key: sample, "timestep": timestep, **uncond}
        cond_kw = {self.sample_key: sample, "timestep": timestep, **cond}
        uncond_pred, cond_pred = self.predict_branches(uncond_kw, cond_kw,
                                                       guidance_scale=scale, step=step,
                                                       num_steps=num_steps)
        guided, _ = cfg_combine(uncond_pred, cond_pred, scale)
        return guided

    def predict_branches(self, uncond_kw: Kwargs, cond_kw: Kwargs, *,
                         guidance_scale: float | torch.Tensor,
                         step: int | None = None, num_steps: int | None = None,
                         joint_kw: Kwargs | None = None,
                         forward: Callable[..., Any] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one step and return ``(uncond_pred, cond_pred)``, identical on every rank.

        Args:
            uncond_kw / cond_kw: complete keyword inputs of the model for each branch.
            guidance_scale: w, a number or a tensor (a per-frame scale); every rank must pass
                the same (checked at step 0).
            step: step index (default: the next one); steps of a run must come in order.
            num_steps: steps planned for the run (required at step 0).
            joint_kw: the CFG-doubled inputs, if the caller has them; a world of one then runs
                the ordinary batch-2 call (the serial baseline) instead of two branch calls.
            forward: the forward to run on CBP and serial steps instead of the model's own
                (another expert of the same shape, e.g. Wan 2.2's low-noise transformer).

        During pipelined steps ``uncond_pred`` is synthesised so that the usual combination
        ``u + w (c - u)`` gives the configured policy: ``c`` for "off", ``c + (w-1) d`` for
        "reuse" (d = the last measured cond - uncond).
        """
        step = self._begin_step(step, num_steps)
        started = time.perf_counter()
        sent_before = self._bytes_sent()
        self._timer.begin_step(step)
        try:
            with torch.no_grad():
                if self._schedule is None:
                    self._start_run(uncond_kw, cond_kw, guidance_scale)
                mode = "serial" if self.world_size == 1 else self._schedule.mode(step)
                if mode == "pipeline" and self._sample_shape_changed(cond_kw, step):
                    mode = "cbp"
                if mode == "pipeline":
                    uncond_pred, cond_pred = self._pipeline_step(cond_kw, step, forward)
                    measured = math.nan
                else:
                    if mode == "serial":
                        uncond_pred, cond_pred = self._serial_branches(uncond_kw, cond_kw,
                                                                       joint_kw, forward)
                    else:
                        uncond_pred, cond_pred = self._cbp_branches(uncond_kw, cond_kw, step,
                                                                    forward)
                    measured = self._observe(step, uncond_pred, cond_pred)
        except BaseException:
            self._discard_pipeline()  # a failed run leaves nothing the next run would wait on
            self._phase = self._closed_phase = None
            raise
        self._sample_shape = tuple(cond_kw[self.sample_key].shape)
        self._finish_step(step, mode, measured, started, sent_before)
        return uncond_pred, cond_pred

    def serial_step(self, kw: Kwargs, *, step: int | None = None, num_steps: int | None = None,
                    reason: str, forward: Callable[..., Any] | None = None) -> Any:
        """Run the model on ``kw`` unchanged on this rank (a call without CFG); returns the
        model's own output. Recorded as a "serial" step with ``reason`` in the report notes."""
        step = self._begin_step(step, num_steps)
        started = time.perf_counter()
        self._timer.begin_step(step)
        if not self._agreed and self.world_size > 1:
            self._check_agreement({"guidance": "off", **self._run_fields(),
                                   "shapes": describe_shapes(kw), "inputs": kw})
        if self._schedule is not None and self._schedule.mode(step) == "pipeline":
            self._end_phase_early(step, "makes one (unguided) denoiser call, which runs whole "
                                        "on every rank")
        with torch.no_grad():
            out = self._resolve_forward(forward)(**kw)
        self._report.note(reason)
        self._finish_step(step, "serial", math.nan, started, self._bytes_sent())
        return out

    # ------------------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise HybridError("this HybridDenoiser was closed (the parallelized pipeline was "
                              "restored); wrap the pipeline again with hr.parallelize")

    def _note(self, text: str) -> None:
        report = getattr(self, "_report", None)
        if report is not None:
            report.note(text)

    def _collect_timings(self, block: bool) -> None:
        """Move finished steps' compute / transfer / wait ms from the timer into the report."""
        for step, (compute, transfer, wait) in self._timer.collect(block=block).items():
            if step < len(self._report.modes):
                self._report.set_timing(step, compute, transfer, wait)

    def _discard_pipeline(self, wait: bool = False) -> None:
        """Drop the stage pipeline of the current run. ``wait``: complete its transfers first
        (a run that ended normally); otherwise a failed run's transfers are abandoned, since a
        dead peer would make waiting on them fail again."""
        pipeline, self._pipeline = getattr(self, "_pipeline", None), None
        if pipeline is not None and wait:
            pipeline.drain()

    def _begin_step(self, step: int | None, num_steps: int | None) -> int:
        self._check_open()
        if step is None:
            step = self._next_step
        if step == 0 and self._next_step != 0:
            self.reset()
        if step != self._next_step:
            raise ValueError(f"step {step} called out of order: this run expects step "
                             f"{self._next_step} next (call reset() to start a new run)")
        if step == 0:
            if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
                raise ValueError("num_steps (the number of denoiser calls in the run, >= 1) "
                                 "must be given at step 0")
            self._report.num_steps = int(num_steps)
        elif self._report.num_steps is not None and step >= self._report.num_steps:
            raise ValueError(f"step {step} is past the planned {self._report.num_steps} steps; "
                             "call reset() (or pass step=0) to start a new run")
        return step

    def _finish_step(self, step: int, mode: str, measured: float, started: float,
                     sent_before: int) -> None:
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self._report.record_step(mode, measured, elapsed_ms, self._bytes_sent() - sent_before)
        self._next_step = step + 1
        self._timer.end_step()
        self._collect_timings(block=False)
        if mode == "pipeline" and self._pipeline is None and self._phase is not None:
            self._close_phase(step)
        if self._accel.enabled:
            self._report.extra["compile"] = self._accel.summary()
        if self._schedule is not None:
            self._report.nonfinite_steps = list(self._schedule.nonfinite_steps)
            if self.world_size > 1 and self.cfg.k > 0:  # serial and CBP-only runs never switch
                self._report.tau1 = self._schedule.tau1
                self._report.tau2 = self._schedule.tau2

    def _start_run(self, uncond_kw: Kwargs, cond_kw: Kwargs,
                   guidance_scale: float | torch.Tensor) -> None:
        num_steps = self._report.num_steps
        for text in self._accel.notes:  # fallbacks of earlier runs still hold
            self._report.note(text)
        if self.world_size == 1:
            # a world of one never pipelines, so pipelining limits do not apply to it
            self._schedule = SwitchSchedule(self.cfg.replace(k=0), num_steps)
            self._report.note("world size 1: serial run (both branches on this rank)")
            return
        sample = cond_kw[self.sample_key]
        # every rank agrees on the whole call before anything collective is created, all within
        # the handshake limit (a rank may still be loading its model)
        self._check_agreement({
            "guidance": "on",
            **self._run_fields(),
            "guidance_scale": guidance_value(guidance_scale),
            "shapes": describe_shapes(uncond_kw) + "|" + describe_shapes(cond_kw),
            "timestep": cond_kw.get("timestep"),
            "sample": sample,
            "cond": {k: v for k, v in cond_kw.items() if k not in (self.sample_key, "timestep")},
            "uncond": {k: v for k, v in uncond_kw.items()
                       if k not in (self.sample_key, "timestep")},
        })
        schedule_cfg = self.cfg
        if self.cfg.k > 0 and self._no_stages_reason is not None:
            schedule_cfg = self.cfg.replace(k=0)
            self._report.note(f"no pipelined steps in this run (k=0 instead of {self.cfg.k}): "
                              f"{self._no_stages_reason}; condition-based partitioning only")
        if self._staged is not None:
            problem = self._staging_problem(cond_kw)
            if problem:  # identical inputs on every rank (just checked): the same decision
                schedule_cfg = self.cfg.replace(k=0)
                self._report.note(f"no pipelined steps in this run (k=0 instead of "
                                  f"{self.cfg.k}): {problem}")
        schedule_cfg, fitted = fit_to_steps(schedule_cfg, num_steps)
        if fitted:  # the same step count on every rank (just checked): the same schedule
            self._report.note(fitted)
        self._schedule = SwitchSchedule(schedule_cfg, num_steps)
        transport = self._get_transport()
        self._report.transport = transport.name
        for text in transport.notes:
            self._report.note(text)
        self._start_layout(transport, sample.shape[0], frames_per_row(self.model, sample))

    def _run_fields(self) -> Kwargs:
        """Fields every rank must agree on in any mode: config, model, planned steps and the
        caller's context (pipeline call arguments, scheduler)."""
        param = next(self.model.parameters(), None)
        return {
            "config": self.cfg.digest(),
            **self._context,
            "num_steps": self._report.num_steps,
            "model": [type(self.model).__name__, str(param.dtype) if param is not None else "",
                      sum(p.numel() for p in self.model.parameters())],
        }

    def _check_agreement(self, fields: Kwargs) -> None:
        """Every rank's ``fields`` compared. A run may hold more than one round: its first
        (serial) steps agree without guidance, and its first guided step agrees again before
        anything collective is set up; each round has its own store key."""
        check_agreement(default_store(), self.rank, self.world_size,
                        f"hybridiff_rt/agree/{self._instance}/{self._run_index}/"
                        f"{self._agreements}", fields, self.cfg.handshake_timeout_s)
        self._agreements += 1
        self._agreed = True

    def _stage_or_note(self, model: torch.nn.Module) -> StagedDenoiser | None:
        """The staged denoiser, or None with the reason kept for the report when the adapter
        refuses this instance (a U-Net built from other block types, a subclassed or hooked
        forward, offloading): the whole forward still runs every CBP step exactly, only the
        stage pipeline cannot mirror it. The model is the same on every rank, so is the
        decision."""
        try:
            return stage_denoiser(model)
        except UnsupportedModelError as exc:
            self._no_stages_reason = f"the stage adapter cannot stage this model ({exc})"
            return None

    def _staging_problem(self, cond_kw: Kwargs) -> str:
        """Why the staged denoiser cannot run these inputs ("" when it can): checked at the first
        call on every rank, so an unsupported input never surfaces in the middle of a run."""
        try:  # an argument the adapter does not take: a TypeError from the binding alone
            inspect.signature(self._staged.prepare).bind(**cond_kw)
        except TypeError as exc:
            return f"the stage pipeline cannot carry these inputs (its prepare: {exc})"
        try:  # any other error escapes: a bug must not pass for a note
            self._staged.prepare(**cond_kw)
        except (UnsupportedModelError, ShapeError) as exc:
            return f"the stage pipeline cannot carry these inputs ({exc})"
        return ""

    def _get_transport(self) -> Transport:
        if self._transport is None:
            device = model_device(self.model, self.dist.device)
            self._transport = make_transport(self.cfg.transport, self.cfg.timeout_s, device,
                                             handshake_timeout_s=self.cfg.handshake_timeout_s)
            # a denoiser dropped without close() still releases the group / IPC rings
            weakref.finalize(self, _close_quietly, self._transport)
        return self._transport

    def _bytes_sent(self) -> int:
        return self._transport.bytes_sent if self._transport is not None else 0

    def _resolve_forward(self, forward: Callable[..., Any] | None) -> Callable[..., Any]:
        """The callable that runs ``forward`` (None: the model's own): compiled / graph-replayed
        and timed like the model's forward, built once per forward (another expert of the
        pipeline, e.g. Wan 2.2's low-noise transformer)."""
        if forward is None or forward == self._raw_forward:
            return self._model_forward
        if forward not in self._other_forwards:
            wrapped = self._accel.forward(forward) if self._accel.enabled else forward
            self._other_forwards[forward] = self._timer.timed(wrapped)
        return self._other_forwards[forward]

    def _run_model(self, kw: Kwargs, forward: Callable[..., Any] | None = None) -> torch.Tensor:
        """The prediction of one model call; the first call of the model also learns how the
        model returns it (``output_kind``) and refuses a model with more than one output."""
        kw = dict(kw)
        kw["return_dict"] = self.output_kind is None or self.output_kind.cls is not None
        prediction, kind = first_output(self._resolve_forward(forward)(**kw),
                                        type(self.model).__name__)
        self.output_kind = self.output_kind or kind
        return prediction

    def _serial_branches(self, uncond_kw: Kwargs, cond_kw: Kwargs, joint_kw: Kwargs | None,
                         forward: Callable[..., Any] | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        if joint_kw is not None:
            uncond_pred, cond_pred = self._run_model(joint_kw, forward).chunk(2)
            return uncond_pred, cond_pred
        return self._run_model(uncond_kw, forward), self._run_model(cond_kw, forward)

    def _start_layout(self, transport: Transport, batch: int, frames: int) -> None:
        """Describe the rank layout in the report; on 2N > 2 ranks hand the run to ScaleOut
        (``frames``: conditioning rows per image row, ``branch_layout.frames_per_row``)."""
        layout = RankLayout(self.rank, self._pairs)
        if self.world_size == 2:
            self._report.layout = layout.describe("pairs", batch)
            self._report.layout["links"] = {f"{self.rank}->{1 - self.rank}":
                                           transport.link_name(1 - self.rank)}
            return
        # the run's schedule may have fitted k and tau_cap to its step count (fit_to_steps)
        run_cfg = self.cfg.replace(k=self._schedule.k, tau_cap=self._schedule.tau_cap)
        self._scale = ScaleOut(layout=layout, transport=transport, cfg=run_cfg,
                               staged=self._staged,
                               expert_stages=tuple(self._expert_stages.values()),
                               report=self._report, run_model=self._run_model,
                               output_kind=lambda: self.output_kind.to_text(),
                               key=f"hybridiff_rt/scale/{self._instance}/{self._run_index}",
                               device=model_device(self.model, self.dist.device),
                               stage_call=self._stage_call, timer=self._timer,
                               plan_stages=self._plan_stages)
        problem = self._scale.start(batch, frames, batch_axes(self.model))
        if problem and self._schedule.k > 0:  # the same on every rank: the same inputs
            self._schedule = SwitchSchedule(self.cfg.replace(k=0), self._report.num_steps)
            self._report.note(f"no pipelined steps in this run (k=0 instead of {self.cfg.k}): "
                              f"{problem}")

    def _cbp_branches(self, uncond_kw: Kwargs, cond_kw: Kwargs, step: int,
                      forward: Callable[..., Any] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scale is not None:
            pair = self._scale.cbp(uncond_kw, cond_kw, step,
                                   run_model=lambda kw: self._run_model(kw, forward))
            if self.output_kind is None and self._scale.peer_output_kind is not None:
                # a rank without images never calls the model, yet returns its kind of output
                self.output_kind = OutputKind.from_text(self._scale.peer_output_kind)
            return pair
        mine = self._run_model(uncond_kw if self.rank == 0 else cond_kw, forward)
        with self._timer.section("transfer"):
            uncond_pred, cond_pred = self._transport.all_gather(mine, what=f"cbp step {step}")
        return uncond_pred, cond_pred

    def _observe(self, step: int, uncond_pred: torch.Tensor, cond_pred: torch.Tensor) -> float:
        """Discrepancy M_i of the pair, fed to the schedule; raises on non-finite predictions."""
        measured = rel_mae(discrepancy_stats(uncond_pred, cond_pred))
        if not math.isfinite(measured):
            for name, pred in (("uncond", uncond_pred), ("cond", cond_pred)):
                if not bool(torch.isfinite(pred).all()):
                    raise NonFinitePredictionError(
                        f"step {step}: the {name} prediction contains NaN or infinite values "
                        f"(dtype {pred.dtype}). The model overflowed or got bad inputs: try "
                        "torch_dtype=torch.bfloat16 or float32, or check the conditioning.")
            self._report.note("some steps had a non-finite discrepancy (all-zero uncond "
                              "prediction); they never trigger a switch")
        self._schedule.observe(step, measured)
        if self.cfg.pipeline_guidance == "reuse" and self._schedule.k > 0:
            self._last_difference = cond_pred - uncond_pred
        return measured

    def _sample_shape_changed(self, cond_kw: Kwargs, step: int) -> bool:
        """Whether this pipelined step's sample has another shape than the last guided step's
        (ChronoEdit's temporal reasoning keeps two of its frames from some step on). The stale
        boundary and the last measured cond - uncond difference no longer fit it, so the phase
        ends here (:meth:`_end_phase_early`): this step and the rest of the run are CBP. Every
        rank has the same shapes (its inputs were agreed), so every rank decides alike."""
        shape = tuple(cond_kw[self.sample_key].shape)
        if self._sample_shape is None or shape == self._sample_shape:
            return False
        self._end_phase_early(step, f"has a sample of shape {shape}, not "
                                    f"{self._sample_shape} (the pipeline's loop reshaped its "
                                    "latents), which the stale activations no longer fit")
        return True

    def _end_phase_early(self, step: int, why: str) -> None:
        """End the pipelined phase before ``step`` (a step it cannot pipeline): its transfers
        complete, its stage times are published, and no later step of the run is pipelined."""
        self._discard_pipeline(wait=True)
        if self._phase is not None:
            self._close_phase(step - 1)
        self._schedule.end_pipelining(step)
        self._report.note(f"step {step} {why}: the pipelined phase ended before it, and the "
                          "later guided steps of the run are CBP")

    def _pipeline_step(self, cond_kw: Kwargs, step: int,
                       forward: Callable[..., Any] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """One stale-activation pipelined step; returns (synthesised uncond, cond prediction).

        ``forward``: the expert the caller runs at this step (None: the model). A phase whose
        stale boundary came from another expert starts over here with a fill step."""
        staged = self._staged_for(forward)
        first = step == self._schedule.tau1 + 1
        more_follow = step < self._schedule.tau2
        if (not first and self._pipeline is not None
                and self._pipeline.staged is not staged):
            self._pipeline.drain()  # the boundaries in flight belong to the other expert
            self._pipeline = None
            if self._phase is not None:
                self._close_phase(step - 1)
            first = True
            self._report.note(f"pipelined step {step} ran another expert denoiser than step "
                              f"{step - 1}: its stale boundary could not be used, so the "
                              "pipelined phase started over with a fill step")
        if first:
            self._pipeline = self._build_pipeline(cond_kw, staged)
        cond_pred = self._pipeline.step(cond_kw, step, first=first, more_follow=more_follow)
        if not more_follow:
            self._pipeline.drain()
            self._pipeline = None
        if not bool(torch.isfinite(cond_pred).all()):
            raise NonFinitePredictionError(
                f"step {step} (pipelined): the prediction contains NaN or infinite values (dtype "
                f"{cond_pred.dtype}). Try torch_dtype=torch.bfloat16 or float32.")
        if self.cfg.pipeline_guidance == "reuse" and self._last_difference is not None:
            # u' = c - d makes the pipeline's u' + w (c - u') equal c + (w - 1) d
            return cond_pred - self._last_difference, cond_pred
        return cond_pred, cond_pred

    def _staged_for(self, forward: Callable[..., Any] | None) -> StagedDenoiser:
        """The staged denoiser of the expert whose forward the caller passed (None: the model)."""
        if forward is None or forward == self._raw_forward:
            return self._staged
        if forward not in self._expert_stages:
            raise HybridError(
                "a pipelined step was asked to run a forward that is neither the model's nor one "
                "of the experts given to HybridDenoiser(experts=...); pass the other denoisers "
                "there to pipeline them")
        return self._expert_stages[forward]

    def _build_pipeline(self, cond_kw: Kwargs, staged: StagedDenoiser) -> StagePipeline:
        """Profile the units (rank 0, cached per model/shape/device), share the profile through
        the store, measure the link with a boundary-sized transfer, and set up this rank's stage.
        Every rank plans from rank 0's profile and link figure, so every rank cuts identically.
        On 2N > 2 ranks ScaleOut sets up the pairs' or the world's stage chain instead."""
        self._learn_from_closed_phase()
        if self._scale is not None:
            return self._scale.build_pipeline(cond_kw, staged)
        store = default_store()
        self._pipeline_builds += 1
        key = f"hybridiff_rt/profile/{self._instance}/{self._run_index}/{self._pipeline_builds}"
        started = time.perf_counter()
        profile = shared_profile(staged, cond_kw, store=store, key=key,
                                 publish=self.rank == 0, timeout_s=self.cfg.handshake_timeout_s,
                                 what=f"rank {self.rank}: the stage profile from rank 0")
        transport = self._get_transport()
        probe = probe_bytes(profile.boundary_bytes)
        bytes_per_ms, link_source = self._link_figure(transport, probe, store, key)
        plan, costs = self._plan_stages(profile, self.world_size, bytes_per_ms,
                                       stage=self.rank, chain="pair")
        self._report.extra["pipeline"] = {
            **plan_fields(plan, costs),
            "link_bytes_per_ms": bytes_per_ms,
            "link_measured": link_source != "nominal",
            "link_source": link_source,
            "link_probe_bytes": probe if link_source == "probe" else 0,
            "setup_ms": (time.perf_counter() - started) * 1e3,
        }
        self._report.note(
            f"stage cut planned with a link of {bytes_per_ms / 1e6:.3g} GB/s " + {
                "transport set-up": f"(measured when the {transport.name} transport was set up)",
                "probe": f"(measured: {probe} B there and back over {transport.name})",
                "nominal": f"({transport.name}'s nominal figure; nothing to measure)",
            }[link_source])
        start, stop = plan.stage_range(self.rank)
        run_stage = self._stage_call(start, stop, self.rank == self.world_size - 1, staged)
        return StagePipeline(staged, plan, profile.boundary_layouts, transport, self.rank,
                             self.world_size, run_stage=run_stage, timer=self._timer)

    def _plan_stages(self, profile: UnitProfile, stages: int, bytes_per_ms: float | list[float],
                    *, stage: int, chain: str) -> tuple[PartitionPlan, UnitProfile]:
        """The stage cut of the phase being set up: ``(plan, unit costs it was planned from)``.

        Planned from the eager ``profile`` (or the pinned ``stage_cuts``); with ``rebalance``
        and no pinned cut, from the costs corrected by earlier phases' measured stage times, and
        this rank's part of the phase (``stage``, its index in the chain; ``chain``, a label the
        chain's ranks share) is kept to be measured."""
        if self._calibration is None:
            return profile.plan(stages, bytes_per_ms, cuts=self.cfg.stage_cuts), profile
        plan, costs, info = self._calibration.plan(profile, stages, bytes_per_ms)
        if info is not None:
            self._report.extra["rebalance"] = info
            self._report.note(describe(info, plan.cuts))
        count = self._phases_planned[chain] = self._phases_planned.get(chain, 0) + 1
        self._phase = PhaseStages(
            key=(profile.key, stages), cuts=plan.cuts, stage=stage,
            eager_ms=eager_stage_ms(profile, plan.cuts), first_step=self._next_step,
            exchange=f"hybridiff_rt/rebalance/{self._instance}/{chain}/{count}")
        return plan, costs

    def _close_phase(self, last_step: int) -> None:
        """The pipelined phase ended at ``last_step``: publish this rank's median stage time
        for the chain (gathered when the next phase is set up)."""
        phase, self._phase = self._phase, None
        self._collect_timings(block=True)
        median = phase_median_ms(self._report.compute_ms, phase.first_step, last_step)
        publish_median(default_store(), phase, median)
        self._closed_phase = phase

    def _learn_from_closed_phase(self) -> None:
        """Gather the chain's medians of the last closed phase and correct the unit costs."""
        phase, self._closed_phase = self._closed_phase, None
        if phase is None or self._calibration is None:
            return
        medians = gather_medians(default_store(), phase, self.cfg.timeout_s,
                                 f"rank {self.rank}: the stage times the other ranks of its "
                                 "chain measured in the last pipelined phase")
        self._calibration.learn(phase, medians)

    def _stage_call(self, start: int, stop: int, last: bool,
                    staged: StagedDenoiser) -> Callable[..., Any] | None:
        """The compiled or graph-replayed stage of units ``start .. stop-1`` of ``staged`` (the
        model's or an expert's) (None when nothing is compiled or replayed: the StagePipeline
        then runs the eager stage)."""
        if not self._accel.enabled:
            return None
        return self._accel.stage_call(staged, start, stop, last=last)

    def _link_figure(self, transport: Transport, nbytes: int, store: Any,
                     key: str) -> tuple[float, str]:
        """``(bytes per ms, source)`` for the partitioner, the same on every rank.

        Source "transport set-up": the transport measured its link when it was set up (the IPC
        self-test), so nothing is measured again; "probe": round trips of ``nbytes`` bytes, rank 0's
        figure shared through the store and cached per process (repeated runs cut alike; every
        rank runs the same calls, so every rank's cache holds the same entries and they skip or
        take part in the probe together); "nominal": nothing to measure."""
        if transport.link_measured:
            return transport.bytes_per_ms, "transport set-up"

        def measure() -> float | None:
            measured = self._measure_link(transport, nbytes)
            if self.rank == 0:
                store.set(f"{key}/link", json.dumps(measured))
                return measured
            wait_for_keys(store, [f"{key}/link"], self.cfg.timeout_s,
                          f"rank {self.rank}: the link measurement from rank 0")
            return json.loads(store.get(f"{key}/link"))

        measured = cached_link_figure(("pair", transport.name, self.world_size, nbytes),
                                      measure)
        if measured is None:
            return transport.bytes_per_ms, "nominal"
        return measured, "probe"

    def _measure_link(self, transport: Transport, nbytes: int) -> float | None:
        """Payload bytes per millisecond between rank 0 and rank 1, from the median of
        LINK_PROBE_ROUNDS round trips of an ``nbytes`` message (rank 0's figure; None on the
        other ranks, and when there is nothing to measure). Set-up traffic: not counted in the
        report's bytes."""
        if nbytes <= 0 or self.rank > 1:
            return None
        sent_before = transport.bytes_sent
        figure = round_trip_bytes_per_ms(transport, 1 - self.rank, nbytes,
                                         model_device(self.model, self.dist.device),
                                         first=self.rank == 0)
        transport.bytes_sent = sent_before
        return figure if self.rank == 0 else None
