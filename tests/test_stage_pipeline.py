"""StagePipeline (engine/stage_pipeline.py): stale-activation stage pipelining, driven directly.

Two ranks (gloo, one thread each) run the two stages of the tiny SD1.5-shaped U-Net over four
pipelined steps. The contract: the first (fill) step is the whole model on fresh inputs; on every
later step the last stage runs on the boundary the first stage produced at the previous step, so
the prediction equals, bit for bit, ``finish(run(boundary(s-1), ctx(s), cut, end))`` computed in
one process; both ranks return it; the boundary is shipped only when a pipelined step follows, and
a run cut short mid-pipeline drains without leaving a transfer in flight. In one process: a plan
whose stage count is not the world size is refused, a single stage is the plain model, and a later
stage asked for a non-first step without a boundary refuses.
"""

from __future__ import annotations

import random

import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt import testing
from hybridiff_rt.comm import Transport
from hybridiff_rt.engine.stage_pipeline import StagePipeline
from hybridiff_rt.stages import profile_units
from hybridiff_rt.testing import all_ok, run_ranks

STEPS = 4


def _steps(seed: int, n: int) -> list[dict]:
    """The cond branch's model inputs for n steps (fresh latents and embeddings each step)."""
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(1, 4, 16, 16, generator=g),
             "timestep": torch.tensor(800 - 150 * i),
             "encoder_hidden_states": torch.randn(1, 8, 32, generator=g)} for i in range(n)]


class _RecordingTransport(Transport):
    """One-process stand-in: records every call; a broadcast from this rank keeps its tensor."""

    name = "recording"

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size, timeout_s=1.0)
        self.calls: list[tuple] = []

    def all_gather(self, tensor, *, what):
        raise AssertionError(f"unexpected all_gather '{what}'")

    def broadcast(self, tensor, src, *, what):
        self.calls.append(("broadcast", src, what))
        assert src == self.rank, "a one-process test cannot receive a broadcast"
        return tensor

    def isend(self, tensors, dst, *, what):
        raise AssertionError(f"unexpected isend '{what}' to {dst}")

    def irecv(self, buffers, src, *, what):
        raise AssertionError(f"unexpected irecv '{what}' from {src}")


@pytest.fixture(scope="module")
def unet():
    seed = random.randrange(1 << 16)
    model = testing.sd_pipeline(seed=seed).unet
    staged = hr.stage_denoiser(model)
    with torch.no_grad():
        profile = profile_units(staged, _steps(seed, 1)[0], repeats=1, use_cache=False)
    return seed, model, staged, profile


# ------------------------------------------------------------------------------- one process
def test_a_plan_for_another_number_of_stages_is_refused(unet):
    _, _, staged, profile = unet
    for stages, world in ((3, 2), (1, 2), (2, 1)):
        plan = profile.plan(stages, 1e6)
        with pytest.raises(ValueError, match=f"plan has {stages} stages for {world} ranks"):
            StagePipeline(staged, plan, profile.boundary_layouts,
                          _RecordingTransport(0, world), 0, world)


@torch.no_grad()
def test_a_single_stage_is_the_plain_model_and_only_broadcasts_its_prediction(unet):
    seed, model, staged, profile = unet
    transport = _RecordingTransport(0, 1)
    pipeline = StagePipeline(staged, profile.plan(1, 1e6), profile.boundary_layouts, transport,
                             0, 1)
    assert (pipeline.start, pipeline.stop) == (0, len(staged))
    steps = _steps(seed + 1, 3)
    for i, kw in enumerate(steps):
        prediction = pipeline.step(kw, i, first=i == 0, more_follow=i < len(steps) - 1)
        assert torch.equal(prediction, model(**kw, return_dict=False)[0]), f"seed {seed} step {i}"
    pipeline.drain()
    assert transport.calls == [("broadcast", 0, f"pipeline step {i} prediction")
                               for i in range(len(steps))]
    assert transport.bytes_sent == 0


@torch.no_grad()
def test_a_later_stage_refuses_a_non_first_step_without_a_boundary(unet):
    seed, _, staged, profile = unet
    n = len(staged)
    plan = profile.plan(2, 1e6, cuts=(0, n // 2, n))
    transport = _RecordingTransport(1, 2)
    pipeline = StagePipeline(staged, plan, profile.boundary_layouts, transport, 1, 2)
    with pytest.raises(RuntimeError, match="pipeline step 5: no boundary state from the previous"):
        pipeline.step(_steps(seed, 1)[0], 5, first=False, more_follow=False)
    assert transport.calls == []  # refused before any exchange


# ------------------------------------------------------------------------------- two ranks
def _rank_pipeline(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.comm import TorchTransport

    hr.init_distributed()
    model = testing.sd_pipeline(seed=seed).unet
    staged = hr.stage_denoiser(model)
    steps = _steps(seed + 1, STEPS)
    transport = TorchTransport(30.0)
    out = {}
    with torch.no_grad():
        profile = profile_units(staged, steps[0], repeats=1)
        n = len(staged)
        cut = n // 2
        plan = profile.plan(2, transport.bytes_per_ms, cuts=(0, cut, n))
        pipeline = StagePipeline(staged, plan, profile.boundary_layouts, transport, rank, 2)
        predictions, sent = [], []
        for i, kw in enumerate(steps):
            before = transport.bytes_sent
            predictions.append(pipeline.step(kw, i, first=i == 0, more_follow=i < STEPS - 1))
            sent.append(transport.bytes_sent - before)
        pipeline.drain()

        # one process: the last stage of step s runs on the first stage's output of step s-1
        reference, previous = [], None
        for i, kw in enumerate(steps):
            ctx = staged.prepare(**kw)
            fresh = staged.run(ctx.initial_state, ctx, 0, cut)
            source = fresh if i == 0 else previous
            reference.append(staged.finish(staged.run(source, ctx, cut, None), ctx))
            previous = fresh
        full = [model(**kw, return_dict=False)[0] for kw in steps]
        out["exact"] = [torch.equal(p, r) for p, r in zip(predictions, reference)]
        out["equals_fresh_model"] = [torch.equal(p, f) for p, f in zip(predictions, full)]
        out["sent"] = sent
        out["boundary_bytes"] = profile.boundary_bytes[cut - 1]
        out["prediction_bytes"] = full[0].nbytes
        out["predictions"] = [p.numpy().copy() for p in predictions]

        # a run that ends while a boundary is in flight: drain() completes both sides
        short = StagePipeline(staged, plan, profile.boundary_layouts, transport, rank, 2)
        short_predictions = [short.step(steps[i], 10 + i, first=i == 0, more_follow=True)
                             for i in range(2)]
        short.drain()
        out["short_exact"] = [torch.equal(p, r) for p, r in zip(short_predictions, reference)]
        out["after_drain"] = [t.tolist() for t in transport.all_gather(
            torch.tensor([float(rank), 7.0 * rank]), what="after drain")]
    return out


def test_two_stages_run_on_the_previous_steps_boundary_on_both_ranks():
    seed = random.randrange(1 << 16)
    ranks = all_ok(run_ranks(_rank_pipeline, seed, timeout_s=180))
    for rank, r in enumerate(ranks):
        assert r["exact"] == [True] * STEPS, f"seed {seed} rank {rank}: {r['exact']}"
        # the fill step is the plain model; later steps differ from it (the boundary is stale)
        assert r["equals_fresh_model"] == [True] + [False] * (STEPS - 1)
        assert r["short_exact"] == [True, True]
        assert r["after_drain"] == [[0.0, 0.0], [1.0, 7.0]]
    for a, b in zip(ranks[0]["predictions"], ranks[1]["predictions"]):
        assert (a == b).all(), "the ranks returned different predictions"
    first, last = ranks
    # rank 0 ships its boundary on every step a pipelined step follows, never the prediction
    assert first["sent"] == [first["boundary_bytes"]] * (STEPS - 1) + [0]
    # the last rank broadcasts the prediction every step and sends nothing else
    assert last["sent"] == [last["prediction_bytes"]] * STEPS
