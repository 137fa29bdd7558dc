"""Compiled and graph-replayed denoiser calls (engine/compiled.py, engine/graphs.py) and the
per-step compute / transfer / wait timings (engine/timing.py), on CPU.

What each test proves:

* Graph wrapper, with the CPU stand-in whose replay overwrites its static outputs as a CUDA graph
  does: results equal the plain call bit for bit, results kept from an earlier call survive later
  replays (the clone rule), and changing layouts / a failing capture fall back eagerly with a
  note.
* torch.compile wrapper, with small custom dynamo backends (cheap, no code generation): a backend
  that raises falls back eagerly with a note while a genuine input error still raises; more input
  layouts than a callable keeps falls back with a note; every callable has its own dynamo cache.
* Inductor (the real code generation), one small serial run of the tiny SD3 transformer: equal to
  eager within atol = rtol = 1e-4 (measured: about 1e-6), each step.
* Two ranks (gloo), tiny SDXL-shaped U-Net and SD3-shaped transformer, a hybrid schedule
  (CBP, CBP, three pipelined steps, CBP, CBP): emulated graphs equal eager bit for bit; torch.compile
  with the "aot_eager" backend (dynamo + AOT tracing, no inductor code generation, which the
  serial test covers) equals eager within 1e-5 relative; the report says which callables ran
  compiled / graphed; the per-step timings are filled in and add up.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt.engine import compiled, graphs
from hybridiff_rt.engine.compiled import CompiledCallable
from hybridiff_rt.engine.graphs import EmulatedGraphBackend, GraphedCallable
from hybridiff_rt.engine.timing import KINDS, StepTimer
from hybridiff_rt.testing import all_ok, run_ranks

#: window 1 makes every slope 0: the switch fires at the end of step 1, k = 3 pipelined steps follow
HYBRID = {"window": 1, "slope_eps": 1e-6, "k": 3, "tau_cap": 2}
HYBRID_MODES = ["cbp", "cbp", "pipeline", "pipeline", "pipeline", "cbp", "cbp"]


@dataclasses.dataclass
class _Ctx:
    scale: torch.Tensor
    shift: float


def _fn(state, ctx):
    h = torch.tanh(state["x"] * ctx.scale + ctx.shift)
    return {"h": h, "pair": (h.sum(dim=0), state["x"] - 1)}


def _args(g, shift=0.5):
    return {"x": torch.randn(3, 5, generator=g)}, _Ctx(torch.randn(5, generator=g), shift)


# ------------------------------------------------------------------------------ graph wrapper
def test_replayed_outputs_equal_the_call_and_survive_later_replays():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    notes = []
    graphed = GraphedCallable(_fn, "f", EmulatedGraphBackend(torch.device("cpu")), notes.append)
    calls = [_args(g) for _ in range(4)]
    outs = [graphed(*a) for a in calls]
    assert graphed.layouts == 1 and graphed.replays == 4 and notes == []
    # the stand-in really overwrites its static outputs: they hold the latest call's values
    static = graphed._graphs[next(iter(graphed._graphs))].outputs
    assert torch.equal(static[0], _fn(*calls[-1])["h"])
    for args, out in zip(calls, outs):  # ... while every returned result kept its own
        expected = _fn(*args)
        assert torch.equal(out["h"], expected["h"])
        assert all(torch.equal(a, b) for a, b in zip(out["pair"], expected["pair"]))
        assert out["h"].data_ptr() not in {t.data_ptr() for t in static}


def test_graphed_forward_keeps_diffusers_output_classes_and_calls_outside_steps_are_untimed():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from hybridiff_rt import testing

    seed = random.randrange(1 << 16)
    model = testing.sd_pipeline(seed=seed).unet
    g = torch.Generator().manual_seed(seed)
    kw = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(700),
          "encoder_hidden_states": torch.randn(1, 8, 32, generator=g)}
    graphs.emulate_on_cpu(True)
    try:
        den = hr.HybridDenoiser(model, hr.HybridConfig(k=0, cuda_graphs="on"))
        out = den.serial_step(dict(kw), step=0, num_steps=1, reason="no guidance in this call")
        side = den.side_call(dict(kw), "an extra call between steps")
    finally:
        graphs.emulate_on_cpu(False)
    with torch.no_grad():
        expected = model(**kw)
    for result in (out, side):  # the model's own output class, rebuilt around cloned tensors
        assert type(result) is UNet2DConditionOutput
        assert torch.equal(result.sample, expected.sample) and torch.equal(result[0], result.sample)
    # the report's summary is taken at the end of each step (the side call came after it)
    assert den.report.extra["compile"]["calls"]["denoiser"] == {
        "graph_layouts": 1, "replays": 1, "state": "graphed"}
    assert den.report.compute_ms[0] > 0 and len(den.report.compute_ms) == 1


def test_a_second_expert_gets_its_own_graphed_callable_never_the_first_ones():
    """A pipeline with two experts of one shape (Wan 2.2) passes the second one's forward per
    step: it must replay its own graph, not the one captured for the first expert."""
    from hybridiff_rt import testing

    seed = random.randrange(1 << 16)
    first, second = testing.sd_pipeline(seed=seed).unet, testing.sd_pipeline(seed=seed + 1).unet
    g = torch.Generator().manual_seed(seed)
    kw = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(700),
          "encoder_hidden_states": torch.randn(1, 8, 32, generator=g)}
    graphs.emulate_on_cpu(True)
    try:
        den = hr.HybridDenoiser(first, hr.HybridConfig(k=0, cuda_graphs="on"))
        outs = [den.serial_step(dict(kw), step=i, num_steps=4, reason="no guidance",
                                forward=fwd)
                for i, fwd in enumerate([None, second.forward, first.forward, second.forward])]
    finally:
        graphs.emulate_on_cpu(False)
    with torch.no_grad():
        expected_first, expected_second = first(**kw).sample, second(**kw).sample
    assert not torch.equal(expected_first, expected_second)
    for out, expected in zip(outs, [expected_first, expected_second] * 2):
        assert torch.equal(out.sample, expected)
    calls = den.report.extra["compile"]["calls"]
    assert calls["denoiser"]["replays"] == 2 and calls["denoiser 2"]["replays"] == 2


def test_each_experts_stage_replays_its_own_graph():
    """Two experts of one class have the same unit ranges (Wan 2.2's pipelined steps run the
    stages of the expert the pipeline called): a stage of the second expert must replay its own
    graph, never the one captured for the same range of the first expert."""
    from hybridiff_rt import testing
    from hybridiff_rt.engine.compiled import Accelerator, stage_function

    seed = random.randrange(1 << 16)
    models = testing.sd_pipeline(seed=seed).unet, testing.sd_pipeline(seed=seed + 1).unet
    staged = [hr.stage_denoiser(m) for m in models]
    g = torch.Generator().manual_seed(seed)
    kw = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(700),
          "encoder_hidden_states": torch.randn(1, 8, 32, generator=g)}
    stop = len(staged[0].units)
    notes = []
    graphs.emulate_on_cpu(True)
    try:
        accel = Accelerator(hr.HybridConfig(cuda_graphs="on"), torch.device("cpu"), notes.append)
        calls = [accel.stage_call(s, 0, stop, last=True) for s in staged]
        with torch.no_grad():
            outs = [call(dict(kw), None) for call in calls + calls]
    finally:
        graphs.emulate_on_cpu(False)
    with torch.no_grad():
        expected = [stage_function(s, 0, stop, True)(dict(kw), None) for s in staged]
    assert calls[0] is not calls[1] and notes == []  # replayed, no eager fallback
    assert not torch.equal(expected[0], expected[1])
    for out, want in zip(outs, expected + expected):
        assert torch.equal(out, want)


def test_graphs_fall_back_eagerly_with_a_note_on_changing_layouts_and_failed_captures():
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    notes = []
    graphed = GraphedCallable(_fn, "stage units 0..3", EmulatedGraphBackend(torch.device("cpu")),
                              notes.append, max_layouts=2)
    for shift in (0.1, 0.2, 0.3, 0.4):  # a plain float is baked into a capture: a new layout
        args = _args(g, shift)
        assert torch.equal(graphed(*args)["h"], _fn(*args)["h"])
    assert graphed.disabled and "more than 2 input layouts" in graphed.disabled
    assert len(notes) == 1 and notes[0].startswith("stage units 0..3: CUDA graphs off")

    class Refusing(EmulatedGraphBackend):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    notes.clear()
    graphed = GraphedCallable(_fn, "denoiser", Refusing(torch.device("cpu")), notes.append)
    args = _args(g)
    assert torch.equal(graphed(*args)["h"], _fn(*args)["h"])
    assert "capture failed (RuntimeError: operation not permitted" in notes[0]


# ---------------------------------------------------------------------- torch.compile wrapper
_COMPILED_GRAPHS = []


def _counting(gm, example_inputs):
    _COMPILED_GRAPHS.append(gm)
    return gm.forward


def _failing(gm, example_inputs):
    raise RuntimeError("no code generator for this graph")


torch._dynamo.register_backend(_counting, name="hybridiff_test_counting")
torch._dynamo.register_backend(_failing, name="hybridiff_test_failing")


def _affine(x, w):
    return torch.relu(x @ w) * 2.0


def test_a_failing_compile_falls_back_eagerly_and_genuine_errors_still_raise():
    notes = []
    call = CompiledCallable(_affine, "denoiser", "default", "hybridiff_test_failing",
                            notes.append)
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    assert torch.equal(call(x, w), _affine(x, w))
    assert call.disabled.startswith("torch.compile failed (")
    assert "no code generator for this graph" in call.disabled
    assert notes == [f"denoiser: torch.compile off from here on, ran eagerly: {call.disabled}"]
    good = CompiledCallable(_affine, "denoiser", "default", "hybridiff_test_counting", [].append)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        good(x, torch.randn(5, 2))  # the eager call's own error, unchanged
    assert good.disabled is None  # a caller's error is not a compiler failure: still compiled
    assert torch.equal(good(x, w), _affine(x, w)) and good.layouts == 1


def test_changing_shapes_fall_back_after_the_layout_limit_and_caches_are_per_callable():
    notes = []
    before = len(_COMPILED_GRAPHS)
    call = CompiledCallable(_affine, "stage units 2..5", "default", "hybridiff_test_counting",
                            notes.append, max_layouts=3)
    w = torch.randn(3, 2)
    for rows in (1, 2, 3, 4, 5):
        x = torch.randn(rows, 3)
        assert torch.equal(call(x, w), _affine(x, w))
    assert len(_COMPILED_GRAPHS) - before == 3 and call.layouts == 3
    assert "more than 3 input layouts (dynamic shapes are not compiled)" in notes[0]
    # twelve callables over one source function: each compiles its own code (a shared dynamo
    # cache would stop compiling at torch's recompile limit of 8 and run eagerly unnoticed)
    before = len(_COMPILED_GRAPHS)
    scales = [float(i) for i in range(12)]
    for s in scales:
        def scaled(x, s=s):
            return x * s
        assert torch.equal(CompiledCallable(scaled, "d", "default", "hybridiff_test_counting",
                                            notes.append)(w), w * s)
    assert len(_COMPILED_GRAPHS) - before == 12


def test_timer_sections_add_up_per_step_and_refuse_unknown_kinds():
    timer = StepTimer(torch.device("cpu"))
    assert timer.clock == "perf_counter"
    for step in range(2):
        timer.begin_step(step)
        for kind in KINDS:
            with timer.section(kind):
                torch.randn(200, 200) @ torch.randn(200, 200)
    with pytest.raises(ValueError, match="section kind must be one of"), timer.section("idle"):
        pass
    done = timer.collect()
    assert sorted(done) == [0, 1] and all(v > 0 for t in done.values() for v in t)
    assert timer.collect() == {}


# ------------------------------------------------------------------ inductor, one serial run
def _sd3_inputs(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    def branch():
        return {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
                "pooled_projections": torch.randn(1, 32, generator=g)}
    return [{"sample": torch.randn(1, 16, 16, 16, generator=g),
             "timestep": torch.tensor([900.0 - 100 * i]), "cond": branch(), "uncond": branch()}
            for i in range(steps)]


def _sdxl_inputs(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)

    def branch():
        return {"encoder_hidden_states": torch.randn(1, 8, 64, generator=g),
                "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                      "time_ids": torch.randn(1, 6, generator=g)}}
    return [{"sample": torch.randn(1, 4, 16, 16, generator=g),
             "timestep": torch.tensor(900.0 - 100 * i), "cond": branch(), "uncond": branch()}
            for i in range(steps)]


INPUTS = {"sdxl": _sdxl_inputs, "sd3": _sd3_inputs}


def _model(family: str, seed: int):
    from hybridiff_rt import testing

    pipe = testing.build(family, seed=seed)
    return pipe.unet if family == "sdxl" else pipe.transformer


def _run(model, cfg, steps, w=4.0):
    den = hr.HybridDenoiser(model, cfg)
    out = [den(s["sample"], s["timestep"], s["cond"], s["uncond"], w, step=i,
               num_steps=len(steps)) for i, s in enumerate(steps)]
    return out, den.report


def test_inductor_compiled_serial_run_equals_eager_within_tolerance():
    seed = random.randrange(1 << 16)
    model, steps = _model("sd3", seed), _sd3_inputs(seed + 1, 3)
    eager, _ = _run(model, hr.HybridConfig(k=0), steps)
    fast, report = _run(model, hr.HybridConfig(k=0, compile="default"), steps)
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    summary = report.extra["compile"]
    assert summary["backend"] == "inductor" and summary["graphs"] == "off"
    assert summary["calls"]["denoiser"]["state"] == "compiled", summary
    assert summary["calls"]["denoiser"]["compile_s"] > 0
    assert report.modes == ["serial"] * 3
    assert all(c > 0 for c in report.compute_ms)
    assert report.transfer_ms == report.wait_ms == [0.0] * 3  # nothing crosses a link


# ------------------------------------------------------------------------------- two ranks
def _rank_accelerated(rank, seed):
    import hybridiff_rt as hr
    from hybridiff_rt.engine import graphs

    graphs.emulate_on_cpu(True)
    hr.init_distributed()
    results = {}
    for family in ("sdxl", "sd3"):
        model = _model(family, seed)
        steps = INPUTS[family](seed + 1, len(HYBRID_MODES))
        eager, _ = _run(model, hr.HybridConfig(**HYBRID), steps)
        graphed, graph_report = _run(model, hr.HybridConfig(**HYBRID, cuda_graphs="on"), steps)
        fast, report = _run(model, hr.HybridConfig(**HYBRID, compile="default",
                                                   compile_backend="aot_eager"), steps)
        results[family] = {
            "graphs_exact": [torch.equal(a, b) for a, b in zip(graphed, eager)],
            "compiled_err": [float((a - b).abs().max() / b.abs().max())
                             for a, b in zip(fast, eager)],
            "graph_report": graph_report.to_dict(), "report": report.to_dict(),
            "guided": [g.numpy().copy() for g in fast]}
    return results


@pytest.fixture(scope="module")
def two_ranks():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_accelerated, seed, timeout_s=400))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_two_rank_hybrid_runs_compiled_and_graphed_equal_eager(two_ranks, family):
    seed, ranks = two_ranks
    for rank, results in enumerate(ranks):
        r = results[family]
        where = f"seed {seed} rank {rank} {family}"
        assert r["graphs_exact"] == [True] * len(HYBRID_MODES), where
        assert max(r["compiled_err"]) <= 1e-5, (where, r["compiled_err"])
        for key in ("graph_report", "report"):
            assert r[key]["modes"] == HYBRID_MODES, where
        calls = r["report"]["extra"]["compile"]["calls"]
        assert calls["denoiser"]["state"] == "compiled", (where, calls)
        (stage,) = [v for k, v in calls.items() if k.startswith("stage units")]
        assert stage["state"] == "compiled" and stage["compiled_layouts"] == 1, (where, calls)
        calls = r["graph_report"]["extra"]["compile"]["calls"]
        # 4 CBP steps x one branch each; the stage replays once per pipelined step
        assert calls["denoiser"] == {"graph_layouts": 1, "replays": 4, "state": "graphed"}, where
        (stage,) = [v for k, v in calls.items() if k.startswith("stage units")]
        assert stage == {"graph_layouts": 1, "replays": 3, "state": "graphed"}, (where, calls)
    assert all((a == b).all() for a, b in zip(ranks[0][family]["guided"],
                                              ranks[1][family]["guided"]))


def test_two_rank_timings_are_filled_in_and_add_up(two_ranks):
    _, ranks = two_ranks
    for rank, results in enumerate(ranks):
        report = results["sdxl"]["report"]
        assert report["timing_clock"] == "perf_counter"
        for i, mode in enumerate(report["modes"]):
            compute, transfer, wait = (report[f"{k}_ms"][i] for k in KINDS)
            assert compute > 0 and transfer > 0 and wait >= 0, (rank, i, report)
            assert compute + transfer + wait <= report["step_ms"][i] + 0.5, (rank, i, report)
            if mode == "cbp":
                assert wait == 0.0  # nothing posted earlier is completed in a CBP step
        # a pipelined step after the fill completes transfers posted one step earlier: rank 1
        # takes the stale boundary (steps 3, 4); rank 0 finishes its previous boundary send
        # before sending the next (step 3; step 4, the last, sends nothing)
        waited = [2 + i for i, v in enumerate(report["wait_ms"][2:5]) if v > 0]
        assert waited == ([3, 4] if rank == 1 else [3]), (rank, report["wait_ms"])
        assert report["wait_ms"][2] == 0.0  # the fill step receives on the critical path


def test_an_unknown_compile_backend_is_refused_naming_the_known_ones():
    from hybridiff_rt import testing

    with pytest.raises(hr.ConfigError, match="compile_backend='inductr' is not a torch.compile "
                                             "backend") as info:
        hr.HybridDenoiser(testing.sd_pipeline().unet,
                          hr.HybridConfig(k=0, compile="default", compile_backend="inductr"))
    assert "'inductor'" in str(info.value) and "'aot_eager'" in str(info.value)
    # compile="off" never looks the backend up
    hr.HybridDenoiser(testing.sd_pipeline().unet, hr.HybridConfig(k=0, compile_backend="inductr"))


def test_compile_mode_without_cuda_notes_that_no_graphs_are_replayed():
    notes = []
    accel = compiled.Accelerator(hr.HybridConfig(compile="reduce-overhead"),
                                 torch.device("cpu"), notes.append)
    assert accel.graphs == "off" and accel.enabled
    assert notes == [("compile='reduce-overhead' on cpu: compiled without CUDA graphs (they "
                      "exist on CUDA devices only)")]
    notes.clear()
    graphs.emulate_on_cpu(False)
    accel = compiled.Accelerator(hr.HybridConfig(cuda_graphs="on"), torch.device("cpu"),
                                 notes.append)
    assert accel.graphs == "off" and not accel.enabled and "needs a CUDA device" in notes[0]


# ------------------------------------------------------------------------------ on a GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replays_equal_the_call_and_keep_earlier_results():
    from hybridiff_rt.engine.graphs import CudaGraphBackend

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    notes = []
    graphed = GraphedCallable(_fn, "f", CudaGraphBackend(device), notes.append)
    calls = []
    for _ in range(3):
        state, ctx = _args(g)
        calls.append(({"x": state["x"].to(device)}, _Ctx(ctx.scale.to(device), ctx.shift)))
    outs = [graphed(*a) for a in calls]  # the first call captures, every call replays
    assert notes == [] and graphed.layouts == 1 and graphed.replays == 3
    for args, out in zip(calls, outs):
        expected = _fn(*args)
        torch.testing.assert_close(out["h"], expected["h"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["pair"][1], expected["pair"][1], rtol=0, atol=0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fields", [{"cuda_graphs": "on"},
                                    {"compile": "default", "compile_backend": "aot_eager",
                                     "cuda_graphs": "on"},
                                    {"compile": "reduce-overhead"}])
def test_gpu_serial_run_graphed_or_compiled_equals_eager(fields):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed = random.randrange(1 << 16)
    model = _model("sd3", seed).cuda()
    steps = [{k: _to_cuda(v) for k, v in step.items()} for step in _sd3_inputs(seed + 1, 3)]
    eager, _ = _run(model, hr.HybridConfig(k=0), steps)
    fast, report = _run(model, hr.HybridConfig(k=0, **fields), steps)
    for a, b in zip(fast, eager):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    entry = report.extra["compile"]["calls"]["denoiser"]
    assert "fallback" not in str(entry), (entry, report.notes)
    expected = {"cuda-graph": "graphed", "torch-cudagraph-trees": "compiled"}
    assert entry["state"].endswith(expected[report.extra["compile"]["graphs"]]), entry


def _to_cuda(value):
    if isinstance(value, dict):
        return {k: _to_cuda(v) for k, v in value.items()}
    return value.cuda() if isinstance(value, torch.Tensor) else value


def _rank_gpu_graphed(rank, seed):
    import hybridiff_rt as hr

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = hr.init_distributed()
    model = _model("sdxl", seed).to(info.device)
    steps = [{k: _to_cuda(v) for k, v in step.items()}
             for step in _sdxl_inputs(seed + 1, len(HYBRID_MODES))]
    eager, eager_report = _run(model, hr.HybridConfig(**HYBRID), steps)
    graphed, report = _run(model, hr.HybridConfig(**HYBRID, cuda_graphs="on"), steps)
    return {"err": [float((a - b).abs().max() / b.abs().max()) for a, b in zip(graphed, eager)],
            "report": report.to_dict(), "eager_modes": eager_report.modes,
            "guided": [g.cpu().numpy() for g in graphed]}


@pytest.mark.gpu
@needs_gpu
def test_gpu_two_rank_hybrid_with_cuda_graphs_equals_eager():
    """Two processes on the GPU(s), the default transport (IPC where it works): CBP steps replay
    the whole-denoiser graph, pipelined steps this rank's stage graph, while the transports move
    boundaries and predictions; the guided predictions equal the eager run's within 1e-3."""
    seed = random.randrange(1 << 16)
    ranks = all_ok(run_ranks(_rank_gpu_graphed, seed, timeout_s=80))
    for rank, r in enumerate(ranks):
        assert r["report"]["modes"] == r["eager_modes"] == HYBRID_MODES, (rank, r["report"])
        assert max(r["err"]) <= 1e-3, (rank, r["err"], r["report"]["notes"])
        calls = r["report"]["extra"]["compile"]["calls"]
        assert r["report"]["extra"]["compile"]["graphs"] == "cuda-graph"
        assert all(c["state"] == "graphed" for c in calls.values()), (rank, calls)
        assert r["report"]["timing_clock"] == "cuda-events"
        assert all(v is not None for v in r["report"]["compute_ms"]), r["report"]
    for a, b in zip(ranks[0]["guided"], ranks[1]["guided"]):
        assert (a == b).all()
