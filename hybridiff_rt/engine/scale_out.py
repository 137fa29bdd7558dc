"""Runs on 2N > 2 ranks: image pairs or layer-wise stages (docs/scale-out.md).

One :class:`ScaleOut` per run, owned by the HybridDenoiser, which still asks the schedule for
each step's mode and keeps the report's per-step lists. This module only decides who computes
what on 2N ranks:

* CBP steps (both layouts): the B images of each branch are dealt to the N pairs
  (:func:`~hybridiff_rt.engine.world.deal`); rank r runs its branch on its pair's share, the
  shares (padded to the largest) are all-gathered over the world and put back in image order, so
  every rank holds the whole ``(uncond, cond)`` prediction of a one-device run. A rank whose share
  is empty (fewer images than pairs) idles and sends padding.
* Pipelined steps, "pairs": pair p pipelines its share over its two ranks (rank p stage 0, rank
  N+p stage 1) exactly like a two-rank run; the pairs' cond predictions are all-gathered. On
  several nodes, where pairs (p, N+p) would span nodes, the ranks are placed so that each pair
  lies on one node (``world.place_pairs``), keeping its boundary transfers off the inter-node
  link; pair p's uncond rank then holds slot p, its cond rank slot N+p.
* Pipelined steps, "layers": rank j runs stage j of 2N stages on the whole batch.

Every pipeline is planned from unit costs measured on the chain's first rank and link figures
measured between each pair of consecutive ranks of the chain; the partitioner weighs each stage's
boundary with the link it crosses, so a chain crossing a slow inter-node link is cut for it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..comm import SubsetTransport, Transport, default_store, wait_for_keys
from ..config import HybridConfig
from ..errors import ConfigError
from ..stages import StagedDenoiser, UnitProfile
from .images import assemble, pad_rows, take_branch_rows
from .link_probe import (
    cached_link_figure,
    probe_bytes,
    round_trip_bytes_per_ms,
    shared_profile,
)
from .report import RunReport
from .scale_model import modelled_speedup
from .stage_pipeline import StagePipeline, plan_fields
from .timing import StepTimer
from .world import RankLayout, choose_layout, deal, place_pairs

Kwargs = dict[str, Any]
class _ChainPipeline:
    """The pipelined steps of one rank: its chain's StagePipeline (None when its pair has no
    image) plus, in "pairs" layout, the all-gather that gives every rank the whole batch.
    ``staged``: the staged denoiser (expert) the chain was set up for, on every rank."""

    def __init__(self, owner: ScaleOut, inner: StagePipeline | None,
                 staged: StagedDenoiser) -> None:
        self._owner = owner
        self._inner = inner
        self.staged = staged

    def step(self, cond_kw: Kwargs, step: int, *, first: bool, more_follow: bool) -> torch.Tensor:
        owner = self._owner
        try:
            return self._step(cond_kw, step, first, more_follow)
        finally:
            owner.record_links()

    def _step(self, cond_kw: Kwargs, step: int, first: bool, more_follow: bool) -> torch.Tensor:
        owner = self._owner
        if owner.layout_name == "layers":
            return self._inner.step(cond_kw, step, first=first, more_follow=more_follow)
        start, stop = owner.my_share
        if self._inner is not None:
            mine_kw = owner.rows_of(cond_kw, start, stop)
            mine = self._inner.step(mine_kw, step, first=first, more_follow=more_follow)
        else:
            mine = owner.empty_prediction()
        with owner.timer.section("transfer"):
            parts = owner.world.all_gather(pad_rows(mine, owner.largest_share),
                                           what=f"pipeline step {step} pair predictions")
        return assemble(parts[: owner.layout.pairs], owner.shares)

    def drain(self) -> None:
        if self._inner is not None:
            self._inner.drain()


class ScaleOut:
    """Who computes what on 2N > 2 ranks, for one run (see the module docstring).

    Args:
        layout: this rank's RankLayout.
        transport: the job's transport (all ranks).
        cfg: the run's HybridConfig.
        staged: the staged denoiser (None when the run cannot pipeline).
        expert_stages: the staged denoisers of the other experts (Wan 2.2's second
            transformer), each pipelined over the same chain when a step runs it.
        report: the run's RunReport (layout, link bytes, modelled speed-up and notes go there).
        run_model: ``kw -> prediction`` (the model's forward, first output).
        output_kind: ``() -> text`` of how the model returns its prediction
            (``branch_layout.OutputKind.to_text``; called on rank 0 after its first model call),
            handed with the prediction's layout to the ranks without images, which never call
            the model themselves (:attr:`peer_output_kind`).
        key: a store key prefix unique to this run.
        device: where the model's tensors live (buffers of idle ranks and link probes).
        stage_call: ``(start, stop, last, staged) -> run_stage`` for the StagePipeline: the
            runtime's compiled or graph-replayed stage of ``staged``, or None for the eager one.
        timer: the run's ``engine.timing.StepTimer`` (compute / transfer / wait of each step).
        plan_stages: ``(profile, stages, bytes_per_ms, *, stage, chain) -> (plan, costs)``, the
            runtime's planner (the pinned ``stage_cuts``, the eager profile, or with
            ``rebalance`` the costs corrected by measured stage times).
    """

    def __init__(self, *, layout: RankLayout, transport: Transport, cfg: HybridConfig,
                 staged: StagedDenoiser | None, report: RunReport,
                 expert_stages: Sequence[StagedDenoiser] = (),
                 run_model: Callable[[Kwargs], torch.Tensor], output_kind: Callable[[], str],
                 key: str, device: torch.device,
                 stage_call: Callable[[int, int, bool, StagedDenoiser],
                                      Callable[..., Any] | None],
                 timer: StepTimer,
                 plan_stages: Callable[..., tuple[Any, UnitProfile]]) -> None:
        self.device = device
        self.plan_stages = plan_stages
        self.stage_call = stage_call
        self.timer = timer
        self.output_kind = output_kind
        #: rank 0's output-kind text, learned by a rank without images at the first step
        self.peer_output_kind: str | None = None
        self.layout = layout
        self.cfg = cfg
        self.staged = staged
        self.expert_stages = tuple(expert_stages)
        #: pipelines set up in this run (each expert change sets up another: its store keys)
        self._builds = 0
        self.report = report
        self.run_model = run_model
        self.key = key
        self.parent = transport
        self.ledger: dict[int, int] = {}
        #: the whole world in slot order (rebuilt by :meth:`_place` when the run places ranks)
        self.world = SubsetTransport(transport, range(layout.world_size), ledger=self.ledger)
        self.batch = 0
        #: conditioning rows per image row (``branch_layout.frames_per_row``; 1 for most models)
        self.frames = 1
        #: arguments whose batch axis is not the first (``branch_layout.batch_axes``)
        self.axes: dict[str, int] = {}
        self.shares: list[tuple[int, int]] = []
        self.layout_name = ""
        self._spec: tuple[torch.dtype, tuple[int, ...], torch.device] | None = None

    # ------------------------------------------------------------------------------ the run
    def start(self, batch: int, frames: int = 1, axes: dict[str, int] | None = None) -> str:
        """Decide the layout for ``batch`` images per branch and describe it in the report
        (``frames``: conditioning rows per image, for arguments repeated per frame; ``axes``:
        argument -> batch axis, for arguments whose batch axis is not the first).

        Returns why this run cannot pipeline ("" when it can): a layer-wise chain needs at least
        one unit of the staged denoiser per rank."""
        pairs = self.layout.pairs
        self.batch = int(batch)
        self.frames = int(frames)
        self.axes = dict(axes or {})
        self.shares = deal(self.batch, pairs)
        self.layout_name = choose_layout(self.cfg.scale_out, self.batch, pairs)
        self._place()
        stages = 2 if self.layout_name == "pairs" else self.layout.world_size
        cuts = self.cfg.stage_cuts
        if cuts is not None and self.cfg.k > 0 and len(cuts) - 1 != stages:
            raise ConfigError(
                f"stage_cuts {cuts} has {len(cuts) - 1} stages, but this run pipelines over "
                f"{stages} ranks ({self.layout_name} layout on {self.layout.world_size} ranks); "
                f"give {stages + 1} cut indices or leave stage_cuts=None")
        described = self.layout.describe(self.layout_name, self.batch)
        described["links"] = {f"{self.layout.rank}->{r}": self.parent.link_name(r)
                              for r in range(self.layout.world_size) if r != self.layout.rank}
        self.report.layout = described
        idle = described["idle_on_cbp_steps"]
        if idle:
            self.report.note(
                f"{self.batch} image(s) per branch for {pairs} rank pairs: ranks {idle} had no "
                "image to compute on condition-based steps and only took part in the exchange "
                "(no exact split of one image's branch exists)")
        if self.layout_name == "layers" and self.batch > 1:
            self.report.note("layer-wise layout: condition-based steps split the images within "
                             "each branch group; pipelined steps run the whole batch over "
                             f"{self.layout.world_size} stages")
        self.record_links()
        if self.staged is None or self.layout_name != "layers":
            return ""
        units = min(len(staged.units) for staged in (self.staged, *self.expert_stages))
        if units < stages:
            return (f"the layer-wise layout needs one unit of the staged model per rank, and "
                    f"this model has {units} units for {stages} ranks (use fewer ranks, or "
                    f"scale_out='pairs' with at least {self.layout.pairs} images)")
        return ""

    def _place(self) -> None:
        """Place the ranks for this run's layout (image pairs inside nodes where the default
        pairs would span them) and gather over the world in slot order."""
        nodes = getattr(self.parent, "nodes", None)
        order = (place_pairs(self.layout.pairs, nodes) if self.layout_name == "pairs"
                 else range(self.layout.world_size))
        self.layout = self.layout.placed(order)
        if self.layout.order:
            self.world = SubsetTransport(self.parent, self.layout.ranks, ledger=self.ledger)
            placed = [list(self.layout.pair_ranks(p)) for p in range(self.layout.pairs)]
            self.report.note(
                f"image pairs placed by node: pairs {placed} on nodes {[list(n) for n in nodes]} "
                "(pairs (p, N+p) would span nodes), so each pair's pipelined boundary stays "
                "inside its node where the node has two ranks for it")

    @property
    def my_share(self) -> tuple[int, int]:
        return self.shares[self.layout.pair]

    @property
    def largest_share(self) -> int:
        return max(stop - start for start, stop in self.shares)

    def empty_prediction(self) -> torch.Tensor:
        """A 0-row prediction of the right trailing shape and dtype (a rank without images)."""
        dtype, tail, device = self._spec
        return torch.empty((0, *tail), dtype=dtype, device=device)

    def cbp(self, uncond_kw: Kwargs, cond_kw: Kwargs, step: int,
            run_model: Callable[[Kwargs], torch.Tensor] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """One condition-based step on 2N ranks; returns (uncond, cond) predictions of every
        image, shape ``[B, ...]``, identical on every rank. ``run_model``: this step's model call
        when it is not the default one (another expert of the pipeline, e.g. Wan 2.2's)."""
        start, stop = self.my_share
        mine_kw = uncond_kw if self.layout.branch == "uncond" else cond_kw
        if stop > start:
            started = time.perf_counter()
            mine = (run_model or self.run_model)(self.rows_of(mine_kw, start, stop))
            if self._spec is None:  # the first step: time the call for the modelled speed-up
                if mine.device.type == "cuda":
                    torch.cuda.synchronize(mine.device)
                model_ms = (time.perf_counter() - started) * 1e3
                self._publish_spec(mine, model_ms / (stop - start))
        else:
            if self._spec is None:
                self._learn_spec(step)
            mine = self.empty_prediction()
        with self.timer.section("transfer"):
            parts = self.world.all_gather(pad_rows(mine, self.largest_share),
                                          what=f"cbp step {step} (2N ranks)")
        pairs = self.layout.pairs
        uncond = assemble(parts[:pairs], self.shares)
        cond = assemble(parts[pairs:], self.shares)
        self.record_links()
        return uncond, cond

    def rows_of(self, kw: Kwargs, start: int, stop: int) -> Kwargs:
        """The arguments of images ``start:stop`` of a branch call ``kw`` of this run's batch."""
        return take_branch_rows(kw, self.batch, start, stop, self.frames, self.axes)

    def build_pipeline(self, cond_kw: Kwargs, staged: StagedDenoiser) -> _ChainPipeline:
        """Set up this rank's part of the pipelined steps (collective over each chain) for
        ``staged`` (the model's staged denoiser, or another expert's when a step runs it)."""
        self._builds += 1
        started = time.perf_counter()
        if self.layout_name == "layers":
            chain = tuple(range(self.layout.world_size))
            rows = (0, self.batch)
        else:
            chain = self.layout.pair_ranks()
            rows = self.my_share
        inner = None
        if rows[1] > rows[0]:
            sub = (self.world if self.layout_name == "layers"
                   else SubsetTransport(self.parent, chain, ledger=self.ledger))
            kw = self.rows_of(cond_kw, *rows)
            profile, plan, links = self._plan(sub, chain, kw, staged)
            start, stop = plan.stage_range(sub.rank)
            run_stage = self.stage_call(start, stop, sub.rank == sub.world_size - 1, staged)
            inner = StagePipeline(staged, plan, profile.boundary_layouts, sub, sub.rank,
                                  sub.world_size, run_stage=run_stage, timer=self.timer)
            self._describe_pipeline(chain, rows, profile, plan, links, started)
        self.record_links()
        return _ChainPipeline(self, inner, staged)

    # ------------------------------------------------------------------------------ internals
    def record_links(self) -> None:
        """Copy the per-link byte counts into the report."""
        self.report.link_bytes = {f"{self.layout.rank}->{dst}": n
                                  for dst, n in sorted(self.ledger.items())}

    def _publish_spec(self, prediction: torch.Tensor, image_ms: float) -> None:
        self._spec = (prediction.dtype, tuple(prediction.shape[1:]), prediction.device)
        self._model_cbp(image_ms, prediction[:1].numel() * prediction.element_size(),
                        "this rank's")
        if self.layout.slot == 0:  # pair 0 always has an image
            default_store().set(f"{self.key}/spec", json.dumps(
                [str(prediction.dtype).removeprefix("torch."), list(prediction.shape[1:]),
                 image_ms, self.output_kind()]))

    def _learn_spec(self, step: int) -> None:
        """A rank without images learns the prediction's dtype, shape and output kind (and the
        model's time per image, for the modelled speed-up) from the rank of slot 0 (pair 0's
        uncond rank), once per run."""
        store = default_store()
        first = self.layout.ranks[0]
        wait_for_keys(store, [f"{self.key}/spec"], self.cfg.timeout_s,
                      f"rank {self.layout.rank}: step {step}, the prediction layout from rank "
                      f"{first}")
        dtype, tail, image_ms, self.peer_output_kind = json.loads(store.get(f"{self.key}/spec"))
        self._spec = (getattr(torch, dtype), tuple(tail), self.device)
        per_image = self.empty_prediction().element_size() * math.prod(tail)
        self._model_cbp(image_ms, per_image, f"rank {first}'s")

    def _model_cbp(self, image_ms: float, prediction_bytes_per_image: int, whose: str) -> None:
        """The modelled speed-up of a run without pipelined steps, from the measured whole-model
        time per image at the first step (replaced by the unit-cost model when the run
        pipelines)."""
        steps = self.report.num_steps or 1
        self.report.modelled_speedup = modelled_speedup(
            images_per_branch=self.batch, pairs=self.layout.pairs, image_ms=image_ms,
            prediction_bytes_per_image=prediction_bytes_per_image,
            bytes_per_ms=self.parent.bytes_per_ms, cbp_steps=steps, pipelined_steps=0,
            pipeline_bottleneck_ms=None, pipeline_gathers=False)
        self.report.modelled_speedup["source"] = (
            f"{whose} measured model call at the first step; nominal link figure")

    def _plan(self, sub: Transport, chain: tuple[int, ...], kw: Kwargs, staged: StagedDenoiser):
        """Profile ``staged`` (on the chain's first rank, shared through the store), measure each
        link of the chain, and plan ``len(chain)`` stages; identical on every rank of the chain.
        """
        store = default_store()
        key = f"{self.key}/{self._builds}/chain{chain[0]}-{chain[-1]}"
        profile = shared_profile(
            staged, kw, store=store, key=f"{key}/profile", publish=sub.rank == 0,
            timeout_s=self.cfg.handshake_timeout_s,
            what=f"rank {self.layout.rank}: the stage profile from rank {chain[0]}")
        probe = probe_bytes(profile.boundary_bytes)
        if sub.link_measured:
            links = [sub.bytes_per_ms] * (len(chain) - 1)
        else:
            links = cached_link_figure(
                ("chain", sub.name, chain, probe),
                lambda: self._measure_links(sub, chain, probe, store, key))
        measured = [v for v in links if v is not None]
        bytes_per_ms = min(measured) if measured else sub.bytes_per_ms
        # stage j's boundary crosses link j; the last stage's prediction goes to every rank of
        # the chain, so it is weighed with the slowest link
        per_stage = ([*links, bytes_per_ms] if len(measured) == len(links)
                     else [bytes_per_ms] * len(chain))
        plan, profile = self.plan_stages(profile, len(chain), per_stage, stage=sub.rank,
                                         chain=f"chain{'-'.join(map(str, chain))}")
        return profile, plan, {"per_link_bytes_per_ms": links, "bytes_per_ms": bytes_per_ms,
                               "measured": bool(measured), "probe_bytes": probe}

    def _measure_links(self, sub: Transport, chain: tuple[int, ...], nbytes: int, store: Any,
                       key: str) -> list[float | None]:
        """Bytes per ms of each link (chain[j] -> chain[j+1]): round trips of ``nbytes``
        (``link_probe.round_trip_bytes_per_ms``), measured by the link's first rank, links one
        after another, shared through the store. Probe traffic is not counted in the report's
        bytes."""
        if nbytes <= 0:
            return [None] * (len(chain) - 1)
        sent_before, ledger_before = self.parent.bytes_sent, dict(self.ledger)
        me = sub.rank
        for j in range(len(chain) - 1):
            if me in (j, j + 1):
                figure = round_trip_bytes_per_ms(sub, j + 1 if me == j else j, nbytes,
                                                 self.device, first=me == j)
                if me == j:
                    store.set(f"{key}/link{j}", json.dumps(figure))
        keys = [f"{key}/link{j}" for j in range(len(chain) - 1)]
        wait_for_keys(store, keys, self.cfg.timeout_s,
                      f"rank {self.layout.rank}: the link measurements of ranks {list(chain)}")
        figures = [json.loads(store.get(k)) for k in keys]
        self.parent.bytes_sent = sent_before
        sub.bytes_sent = 0
        self.ledger.clear()
        self.ledger.update(ledger_before)
        return figures

    def _describe_pipeline(self, chain: tuple[int, ...], rows: tuple[int, int],
                           profile: UnitProfile, plan: Any, links: dict[str, Any],
                           started: float) -> None:
        self.report.extra["pipeline"] = {
            **plan_fields(plan, profile),
            "chain": list(chain),
            "rows": list(rows),
            "link_bytes_per_ms": links["bytes_per_ms"],
            "per_link_bytes_per_ms": links["per_link_bytes_per_ms"],
            "link_measured": links["measured"],
            "link_source": "probe" if links["measured"] else "nominal",
            "link_probe_bytes": links["probe_bytes"] if links["measured"] else 0,
            "setup_ms": (time.perf_counter() - started) * 1e3,
        }
        figures = ", ".join(f"{v / 1e6:.3g}" if v else "?" for v in
                            links["per_link_bytes_per_ms"])
        self.report.note(
            f"stage cut over ranks {list(chain)} planned with each link's measured figure "
            f"({figures} GB/s between consecutive ranks, over {self.parent.name})")
        images = rows[1] - rows[0]
        whole_ms = sum(profile.unit_ms) + profile.prepare_ms + profile.finish_ms
        per_image = profile.boundary_bytes[-1] // max(images, 1)
        k = self.cfg.k
        steps = self.report.num_steps or k
        self.report.modelled_speedup = modelled_speedup(
            images_per_branch=self.batch, pairs=self.layout.pairs,
            image_ms=whole_ms / max(images, 1), prediction_bytes_per_image=per_image,
            bytes_per_ms=links["bytes_per_ms"], cbp_steps=max(steps - k, 0),
            pipelined_steps=k, pipeline_bottleneck_ms=plan.bottleneck_ms,
            pipeline_gathers=self.layout_name == "pairs")
        self.report.modelled_speedup["source"] = (
            f"unit costs measured on rank {chain[0]} ({profile.device}) for {images} image(s); "
            "measured link figure" if links["measured"] else "nominal link figure")

