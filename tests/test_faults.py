"""Launches that go wrong in ordinary ways, on two CPU ranks: each ends in the documented error
on every rank within its limit (or, for a late peer, just works), never in a raw torch error or a
hang, and the next call behaves as documented.

Limits used here: timeout_s (each transfer) and handshake_timeout_s (start-up: joining the job,
the first-call agreement, creating the transport). Timings are not asserted; the tests assert
which error each rank raised and what it says (the run_ranks timeout catches a hang).
"""

from __future__ import annotations

import random

import pytest
import torch

from hybridiff_rt.testing import all_ok, run_ranks

SIZE = 32
STEPS = 3


def _pipe_call(runner, seed: int, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("guidance_scale", 5.0)
    out = runner(prompt="a red fox", height=SIZE, width=SIZE, output_type="latent",
                 generator=torch.Generator().manual_seed(seed), **kw)
    return out.images.numpy().copy()


def _outcome(fn):
    """("ok", value) or (error type name, message) of ``fn()``."""
    try:
        return ("ok", fn())
    except Exception as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return (type(exc).__name__, str(exc))


# ------------------------------------------------------------------------------ late / absent
def _rank_late_peer(rank, seed, delay_s):
    import time

    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build("sd3", seed=seed)
    if rank == 1:
        time.sleep(delay_s)  # e.g. a slow model load: longer than timeout_s, within the handshake
    cfg = hr.HybridConfig(k=0, timeout_s=2, handshake_timeout_s=60)
    runner = hr.parallelize(pipe, cfg)
    first = _pipe_call(runner, seed)
    if rank == 0:
        time.sleep(delay_s)  # and the other way round at the next call
    second = _pipe_call(runner, seed)
    return first, second, hr.last_report(runner).modes


def test_a_late_peer_within_the_handshake_limit_just_works():
    seed = random.randrange(1 << 16)
    (a1, a2, modes0), (b1, b2, modes1) = all_ok(run_ranks(_rank_late_peer, seed, 3.5,
                                                          timeout_s=240))
    assert (a1 == b1).all() and (a1 == a2).all() and (b1 == b2).all()
    assert modes0 == modes1 == ["cbp"] * STEPS


def _rank_absent_peer(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    runner = hr.parallelize(testing.build("sd3", seed=seed),
                            hr.HybridConfig(k=0, timeout_s=2, handshake_timeout_s=4))
    if rank == 1:
        return ("absent", "")  # joined the job, never calls the pipeline
    return _outcome(lambda: _pipe_call(runner, seed))


def test_an_absent_peer_gives_peer_timeout_naming_the_start_up_phase():
    outcomes = run_ranks(_rank_absent_peer, random.randrange(1 << 16), timeout_s=240)
    kind, message = outcomes[0].unwrap()
    assert kind == "PeerTimeoutError", message
    assert "first-call agreement check" in message and "within 4 s" in message
    assert "handshake_timeout_s" in message


# ------------------------------------------------------------------------- dead peer, then next
def _rank_dead_peer(rank, seed, phase):
    import os

    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build("sdxl", seed=seed)
    steps = 8
    if phase == "cbp":
        cfg = hr.HybridConfig(k=0, timeout_s=3, handshake_timeout_s=5)
        die_at = 2
    else:  # tau1 by cap at step 1: steps 2..4 pipelined
        cfg = hr.HybridConfig(window=1, slope_eps=0.0, k=3, tau_cap=1, timeout_s=3,
                              handshake_timeout_s=5)
        die_at = 3
    runner = hr.parallelize(pipe, cfg)

    def callback(p, i, t, tensors):
        if rank == 1 and i == die_at:
            os._exit(3)
        return tensors

    first = _outcome(lambda: _pipe_call(runner, seed, num_inference_steps=steps,
                                        callback_on_step_end=callback))
    modes = list(hr.last_report(runner).modes)
    second = _outcome(lambda: _pipe_call(runner, seed, num_inference_steps=steps))
    return first, modes, second


@pytest.mark.parametrize("phase", ["cbp", "pipeline"])
def test_a_dead_peer_gives_peer_timeout_and_the_next_call_says_so_afresh(phase):
    outcomes = run_ranks(_rank_dead_peer, random.randrange(1 << 16), phase, timeout_s=240)
    assert 1 not in outcomes  # the peer died without reporting
    (kind, message), modes, (kind2, message2) = outcomes[0].unwrap()
    assert kind == "PeerTimeoutError", message
    if phase == "pipeline":
        assert "pipeline" in modes and "pipeline step" in message, (modes, message)
    else:
        assert "cbp step" in message
    # the connection was reset, not timed out: the message says what happened
    assert "connection to a peer failed" in message or "no answer" in message
    # the next call does not replay the dead run's state: it fails at its own start
    assert kind2 == "PeerTimeoutError", message2
    assert "step 3 " not in message2 and "pipeline step" not in message2, message2


# --------------------------------------------------------------------------- disagreements
def _rank_disagree(rank, seed, what):
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build("sdxl", seed=seed)
    runner = hr.parallelize(pipe, hr.HybridConfig(k=0, timeout_s=3, handshake_timeout_s=20))
    kw = {}
    if what == "guidance":
        kw["guidance_scale"] = 1.0 if rank == 0 else 5.0  # guidance off on rank 0 only
    elif what == "latents":
        latents = torch.randn(1, 4, SIZE // 2, SIZE // 2,
                              generator=torch.Generator().manual_seed(seed))
        if rank == 1:
            latents[0, 2, 3, 4] += 1e-4  # one element
        kw["latents"] = latents
    elif what == "guidance_rescale":
        kw["guidance_rescale"] = 0.0 if rank == 0 else 0.7
    elif what == "scheduler":
        if rank == 1:
            from diffusers import DDIMScheduler

            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    first = _outcome(lambda: _pipe_call(runner, seed, **kw))
    second = _outcome(lambda: _pipe_call(runner, seed))  # agreeing call afterwards
    return first, second


@pytest.mark.parametrize("what, field", [
    ("guidance", "guidance ("),
    ("latents", "call.latents ("),
    ("guidance_rescale", "call.guidance_rescale ("),
    ("scheduler", "scheduler ("),
])
def test_ranks_that_disagree_both_raise_naming_the_field_and_recover(what, field):
    outcomes = run_ranks(_rank_disagree, random.randrange(1 << 16), what, timeout_s=240)
    results = all_ok(outcomes)
    for rank, ((kind, message), (kind2, _)) in enumerate(results):
        assert kind == "RankMismatchError", (rank, kind, message)
        assert field in message, message
        if what != "scheduler":  # (the scheduler stays different on rank 1)
            assert kind2 == "ok", (rank, kind2)
    if what != "scheduler":
        assert (results[0][1][1] == results[1][1][1]).all()


# ------------------------------------------------------------------------------- resources
def _rank_parallelize_and_restore(rank, seed, rounds):
    import torch.distributed as dist

    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.comm.torch_backend import live_transports

    hr.init_distributed()
    pipe = testing.build("sd3", seed=seed)
    counts = []
    for _ in range(rounds):
        runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
        _pipe_call(runner, seed, num_inference_steps=2)
        pipe = runner.restore()
        counts.append((live_transports(), len(dist.distributed_c10d._world.pg_map)))
    # a wrapper dropped without restore() is released when collected
    import gc

    runner = hr.parallelize(pipe, hr.HybridConfig(k=0))
    _pipe_call(runner, seed, num_inference_steps=2)
    during = live_transports()
    model = pipe.transformer
    del model.forward, model._hybridiff_rt_pipeline  # what restore() undoes, minus close()
    del runner
    gc.collect()
    return counts, during, live_transports()


def test_parallelize_and_restore_twenty_times_leaves_no_groups_or_transports_behind():
    results = all_ok(run_ranks(_rank_parallelize_and_restore, random.randrange(1 << 16), 20,
                               timeout_s=300))
    for counts, during, after in results:
        assert counts == [counts[0]] * 20, counts
        assert counts[0][0] == 0  # no open transport after restore
        assert during == 1 and after == 0


# ------------------------------------------------------------------- refusals at the first call
def _rank_refusals(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_variant

    results = {}
    # too few denoiser calls for the config's schedule (img2img at strength 0.5: 5 of 10 steps):
    # not refused, the pipelined phase is fitted into the run
    pipe, kw = build_variant("sdxl-img2img", seed=seed)
    runner = hr.parallelize(pipe, hr.HybridConfig.preset("sdxl", timeout_s=3,
                                                         handshake_timeout_s=20))
    results["short"] = _outcome(lambda: _pipe_call(runner, seed, num_inference_steps=10, **kw))
    report = hr.last_report(runner)
    results["short_report"] = (report.num_steps, list(report.modes), list(report.notes))
    runner.restore()
    # PAG on one rank only: a disagreement, not a one-sided refusal that leaves the peer waiting
    pipe, kw = build_variant("sdxl-pag", seed=seed)
    if rank == 0:
        kw["pag_scale"] = 0.0
    runner = hr.parallelize(pipe, hr.HybridConfig(k=0, timeout_s=3, handshake_timeout_s=20))
    results["pag_one_rank"] = _outcome(lambda: _pipe_call(runner, seed, **kw))
    kw["pag_scale"] = 3.0
    results["pag_both"] = _outcome(lambda: _pipe_call(runner, seed, **kw))
    return results


def test_a_short_run_is_fitted_and_refusals_happen_at_the_first_call_on_every_rank():
    every_rank = all_ok(run_ranks(_rank_refusals, random.randrange(1 << 16), timeout_s=240))
    assert every_rank[0]["short"][0] == "ok", every_rank[0]["short"]
    assert (every_rank[0]["short"][1] == every_rank[1]["short"][1]).all()
    for rank, results in enumerate(every_rank):
        steps, modes, notes = results["short_report"]
        assert steps == 5  # the planned count: the calls img2img really makes
        # the preset's tau_cap 15 and k 5 fitted into 5 steps: switch at the cap 1, 2 pipelined
        assert modes == ["cbp", "cbp", "pipeline", "pipeline", "cbp"], (rank, modes)
        assert any("this run has 5 denoiser steps" in n and "fitted to tau_cap=1, k=2" in n
                   for n in notes), (rank, notes)
        kind, message = results["pag_one_rank"]
        assert kind == "RankMismatchError" and "call.pag_scale (" in message, (rank, message)
        kind, message = results["pag_both"]
        assert kind == "UnsupportedModelError" and "perturbed-attention" in message, message
