"""World size 2N: image pairs and layer-wise stages on four CPU ranks (gloo, one thread each).

What is checked, bit for bit in fp32 (docs/scale-out.md):
  * image pairs: per image, the output of a two-rank run of that image alone, and with k=0 the
    per-branch serial run of that image (a diffusers pipeline through hr.parallelize);
  * every layout: the one-process emulation of the same 2N-rank schedule (shares of images per
    pair on CBP steps, 2- or 4-stage chains with stale boundaries on pipelined steps), with the
    same output on every rank;
  * graph-replayed calls (the CPU stand-in for CUDA graphs) reach every rank's stage of both
    layouts and equal the eager runs;
  * a run split over two torchrun launches (two "nodes"; static and c10d rendezvous; one
    transport for every link, or per-link routes) equals the single-node run;
  * errors: ranks that disagree and a killed rank raise the documented errors on every
    surviving rank.
Inputs and weights are fresh random draws per test session.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scale_out_cases as cases  # tests/ is on sys.path under pytest
import torch

import hybridiff_rt as hr
from hybridiff_rt import testing
from hybridiff_rt.engine.images import assemble, pad_rows, take_rows
from hybridiff_rt.engine.scale_model import modelled_speedup
from hybridiff_rt.engine.world import (
    RankLayout,
    check_world_size,
    choose_layout,
    deal,
    place_pairs,
)
from hybridiff_rt.testing import all_ok, free_port, run_ranks

ROOT = Path(__file__).resolve().parents[1]
WORLD = 4
PAIRS = WORLD // 2


# ------------------------------------------------------------------------------- pure layout
@pytest.mark.parametrize("world", [3, 5, 7])
def test_an_odd_world_is_refused_saying_what_to_launch(world):
    with pytest.raises(hr.WorldSizeError) as info:
        check_world_size(world)
    text = str(info.value)
    assert f"{world} ranks" in text and "torchrun" in text
    assert f"{world - 1} or {world + 1} ranks" in text


def test_even_worlds_give_pairs_groups_and_shares():
    assert check_world_size(1) == 0 and check_world_size(2) == 1
    n = random.randrange(2, 6)
    assert check_world_size(2 * n) == n
    for rank in range(2 * n):
        layout = RankLayout(rank, n)
        assert layout.branch == ("uncond" if rank < n else "cond")
        assert rank in layout.pair_ranks() and layout.pair_ranks() == (rank % n, rank % n + n)
        assert layout.group() == tuple(r for r in range(2 * n) if (r < n) == (rank < n))
    images = random.randrange(0, 3 * n)
    shares = deal(images, n)
    assert shares[0][0] == 0 and shares[-1][1] == images
    assert all(a[1] == b[0] for a, b in itertools.pairwise(shares))
    sizes = [b - a for a, b in shares]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1
    described = RankLayout(0, n).describe("layers", 1)
    assert described["idle_on_cbp_steps"] == [r for r in range(2 * n) if r % n != 0]
    assert described["stage_chains"] == [list(range(2 * n))]
    assert RankLayout(0, n).describe("pairs", n)["idle_on_cbp_steps"] == []


def _random_nodes(world: int) -> list[tuple[int, ...]]:
    """A random split of ranks 0 .. world-1 into nodes, numbered node by node like torchrun."""
    cuts = sorted(random.sample(range(1, world), random.randrange(0, world - 1)))
    bounds = [0, *cuts, world]
    return [tuple(range(a, b)) for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("draw", range(4))
def test_image_pairs_are_placed_inside_nodes(draw):
    """place_pairs: a permutation whose pairs span nodes only where a node has an odd number of
    ranks (and then the fewest), the identity where the default pairs already fit; RankLayout
    under a placement gives branches, pairs, groups and the report in placed ranks."""
    n = random.randrange(1, 7)
    world = 2 * n
    nodes = _random_nodes(world)
    order = place_pairs(n, nodes)
    assert sorted(order) == list(range(world))
    node_of = {r: i for i, ranks in enumerate(nodes) for r in ranks}
    pairs = [(order[p], order[n + p]) for p in range(n)]
    default_fits = all(node_of[p] == node_of[n + p] for p in range(n))
    if default_fits:
        assert order == tuple(range(world))
    else:
        assert all(u < c for u, c in pairs) and [u for u, _ in pairs] == sorted(u for u, _ in pairs)
        spanning = sum(node_of[u] != node_of[c] for u, c in pairs)
        assert spanning == sum(len(ranks) % 2 for ranks in nodes) // 2
    assert place_pairs(n, None) == place_pairs(n, [tuple(range(world))]) == tuple(range(world))
    for rank in range(world):
        layout = RankLayout(rank, n).placed(order)
        slot = order.index(rank)
        assert layout.slot == slot and layout.ranks == order
        assert layout.branch == ("uncond" if slot < n else "cond")
        assert layout.pair_ranks() == pairs[slot % n] and rank in layout.pair_ranks()
        assert layout.group("uncond") == order[:n] and layout.group("cond") == order[n:]
        described = layout.describe("pairs", 1)
        assert described["pairs"] == [list(p) for p in pairs]
        assert described["stage_chains"] == [list(p) for p in pairs]
        assert described["slot_ranks"] == list(order)
        assert described["idle_on_cbp_steps"] == sorted(set(range(world)) - set(pairs[0]))
    # two nodes of two ranks, as torchrun numbers them: pairs (0, 1) and (2, 3)
    assert place_pairs(2, [(0, 1), (2, 3)]) == (0, 2, 1, 3)
    assert place_pairs(2, [(0, 2), (1, 3)]) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="not a partition"):
        place_pairs(2, [(0, 1), (1, 2, 3)])
    with pytest.raises(ValueError, match="leave ranks"):
        place_pairs(2, [(0, 1), (2,)])
    with pytest.raises(ValueError, match="not a permutation"):
        RankLayout(0, 2, (0, 1, 1, 3))


def test_layout_choice_and_the_config_knob():
    n = random.randrange(2, 5)
    assert choose_layout("auto", n, n) == "pairs" and choose_layout("auto", n - 1, n) == "layers"
    assert choose_layout("layers", 4 * n, n) == "layers"
    assert choose_layout("pairs", 1, n) == "pairs"
    with pytest.raises(hr.ConfigError, match="scale_out must be one of"):
        hr.HybridConfig(scale_out="rows")
    preset = hr.HybridConfig.preset("sdxl", num_steps=25, scale_out="layers")
    assert preset.scale_out == "layers" and preset.k == hr.HybridConfig.preset("sdxl", 25).k
    assert preset.digest() != preset.replace(scale_out="pairs").digest()


def test_rows_are_cut_padded_and_put_back_exactly():
    batch, parts = random.randrange(1, 7), random.randrange(1, 4)
    x = torch.randn(batch, 3, 5)
    value = {"x": x, "scalar": torch.tensor(2.0), "nested": [x * 2, None]}
    shares = deal(batch, parts)
    largest = max(b - a for a, b in shares)
    padded = [pad_rows(take_rows(value, batch, a, b)["x"], largest) for a, b in shares]
    assert all(p.shape[0] == largest for p in padded)
    assert torch.equal(assemble(padded, shares), x)
    assert take_rows(value, batch, 0, 1)["scalar"] is value["scalar"]
    assert torch.equal(take_rows(value, batch, 0, 1)["nested"][0], x[:1] * 2)


def test_modelled_speedup_follows_its_formula():
    b, n = random.randrange(1, 9), random.randrange(1, 5)
    c, p, link = random.uniform(1, 50), random.randrange(1, 1 << 20), random.uniform(1e5, 1e7)
    bottleneck, cbp_steps, pipe_steps = random.uniform(1, 50), 20, 5
    m = modelled_speedup(images_per_branch=b, pairs=n, image_ms=c, prediction_bytes_per_image=p,
                         bytes_per_ms=link, cbp_steps=cbp_steps, pipelined_steps=pipe_steps,
                         pipeline_bottleneck_ms=bottleneck, pipeline_gathers=False)
    share = -(-b // n)
    cbp = share * c + (2 * n - 1) * share * p / link
    assert math.isclose(m["cbp_step_ms"], cbp)
    total = cbp_steps * cbp + pipe_steps * bottleneck
    assert math.isclose(m["run_speedup"], 25 * 2 * b * c / total)


# --------------------------------------------------------------------------- four-rank runs
def _rank_four(rank, seed):
    results = {name: cases.run_case(seed, name) for name in cases.CASES}
    pipe = hr.parallelize(testing.build("sdxl", seed=seed), hr.HybridConfig(k=0))
    out = pipe(**cases.pipeline_call(pipe, seed, (0, 1))).images
    results["pipeline"] = {"out": out.numpy().copy(), "report": hr.last_report(pipe).to_dict()}
    pipe.restore()
    # one image on four ranks, the first call of a fresh pipeline: layer-wise, the ranks of the
    # second pair never call the model, yet hand their pipeline the model's kind of output
    pipe = hr.parallelize(testing.build("sdxl", seed=seed), hr.HybridConfig(k=0))
    out = pipe(**cases.pipeline_call(pipe, seed, (1,))).images
    results["pipeline_one"] = {"out": out.numpy().copy(),
                               "report": hr.last_report(pipe).to_dict()}
    pipe.restore()
    return results


def _rank_alone(rank, seed):
    """Two ranks: each image of the pair cases on its own."""
    return {(name, i): cases.run_case(seed, name, image=i)
            for name in ("pairs_k0", "pairs_hybrid") for i in range(cases.CASES[name][0])}


@pytest.fixture(scope="module")
def four():
    seed = random.randrange(1 << 16)
    return seed, all_ok(run_ranks(_rank_four, seed, world_size=WORLD, timeout_s=400), WORLD)


def test_every_rank_returns_the_same_output_and_schedule(four):
    _, ranks = four
    for name in [*cases.CASES, "pipeline", "pipeline_one"]:
        first = ranks[0][name]
        for other in ranks[1:]:
            assert np.array_equal(first["out"], other[name]["out"]), name
            assert other[name]["report"]["modes"] == first["report"]["modes"], name
            assert other[name]["report"]["rel_mae"] == first["report"]["rel_mae"], name


def test_image_pairs_equal_two_rank_runs_of_each_image_alone(four):
    seed, ranks = four
    alone = all_ok(run_ranks(_rank_alone, seed, timeout_s=300))
    for name in ("pairs_k0", "pairs_hybrid"):
        report = ranks[0][name]["report"]
        assert report["layout"]["layout"] == "pairs"
        expected_modes = ["cbp"] * cases.STEPS if name == "pairs_k0" else \
            ["cbp", "cbp", "pipeline", "pipeline", "cbp", "cbp"]
        assert report["modes"] == expected_modes
        for i in range(cases.CASES[name][0]):
            for r in range(2):
                assert alone[r][(name, i)]["report"]["modes"] == expected_modes
                np.testing.assert_array_equal(ranks[0][name]["out"][i:i + 1],
                                              alone[r][(name, i)]["out"], err_msg=f"{name} {i}")


def test_image_pairs_with_k0_equal_per_branch_serial_runs_of_each_image(four):
    seed, ranks = four
    from hybridiff_rt.testing.reference import per_branch_forward

    pipe = testing.build("sdxl", seed=seed)
    undo = per_branch_forward(pipe.unet)
    try:
        for i in range(2):
            serial = pipe(**cases.pipeline_call(pipe, seed, (i,))).images.numpy()
            np.testing.assert_array_equal(ranks[0]["pipeline"]["out"][i:i + 1], serial)
        serial = pipe(**cases.pipeline_call(pipe, seed, (1,))).images.numpy()
        np.testing.assert_array_equal(ranks[0]["pipeline_one"]["out"], serial)
    finally:
        undo()
    assert ranks[0]["pipeline"]["report"]["layout"]["shares"] == [[0, 1], [1, 2]]
    one = ranks[0]["pipeline_one"]["report"]["layout"]
    assert one["layout"] == "layers" and one["shares"] == [[0, 1], [1, 1]], one


def test_every_layout_equals_a_one_process_emulation_of_its_schedule(four):
    seed, ranks = four
    for name, (batch, fields) in cases.CASES.items():
        report = ranks[0][name]["report"]
        layout = report["layout"]
        assert layout["layout"] == ("pairs" if "pairs" in name else "layers"), name
        tau1, chains = report["tau1"], []
        if fields.get("k", 5) > 0:
            assert tau1 == 1 and report["tau2"] == 1 + fields["k"]
            if layout["layout"] == "pairs":
                for pair, (a, b) in enumerate(deal(batch, PAIRS)):
                    if b == a:  # a pair without an image does not pipeline
                        assert "pipeline" not in ranks[pair][name]["report"]["extra"]
                        continue
                    pipe_report = ranks[pair][name]["report"]
                    plan = pipe_report["extra"]["pipeline"]
                    assert plan["chain"] == [pair, PAIRS + pair] and plan["rows"] == [a, b]
                    chains.append(((a, b), plan["plan"]["cuts"]))
            else:
                plan = report["extra"]["pipeline"]
                assert plan["chain"] == list(range(WORLD)) and len(plan["plan"]["cuts"]) == 5
                assert len(plan["per_link_bytes_per_ms"]) == WORLD - 1
                for other in ranks[1:]:
                    assert other[name]["report"]["extra"]["pipeline"]["plan"] == plan["plan"]
                chains.append(((0, batch), plan["plan"]["cuts"]))
        emulated = cases.emulate(seed, name, PAIRS, chains, tau1)
        np.testing.assert_array_equal(ranks[0][name]["out"], emulated, err_msg=name)


def test_reports_give_layout_bytes_per_link_and_a_modelled_speedup(four):
    _, ranks = four
    per_image = ranks[0]["pairs_k0"]["out"][:1].nbytes  # one image's prediction, fp32
    for rank, results in enumerate(ranks):
        report = results["pairs_k0"]["report"]
        layout = report["layout"]
        assert layout["pairs"] == [[0, 2], [1, 3]]
        assert layout["groups"] == {"uncond": [0, 1], "cond": [2, 3]}
        assert layout["branch"] == ("uncond" if rank < PAIRS else "cond")
        peers = [r for r in range(WORLD) if r != rank]
        assert layout["links"] == {f"{rank}->{p}": "torch-gloo" for p in peers}
        # every CBP step all-gathers one image's prediction per rank to every other rank
        assert report["link_bytes"] == {f"{rank}->{p}": cases.STEPS * per_image for p in peers}
        assert sum(report["bytes_sent"]) == cases.STEPS * per_image * len(peers)
        speed = results["pairs_hybrid"]["report"]["modelled_speedup"]
        assert speed["run_speedup"] > 0 and speed["pipelined_step_ms"] > 0
        assert "unit costs measured" in speed["source"]
        for name in cases.CASES:  # every rank, idle or not, models its layout
            assert results[name]["report"]["modelled_speedup"]["run_speedup"] > 0, (rank, name)
        layers = results["layers_hybrid"]["report"]
        assert layers["layout"]["idle_on_cbp_steps"] == [1, 3]
        assert any("ranks [1, 3] had no image" in n for n in layers["notes"])


def _rank_graphed(rank, seed, layer_cuts):
    """Both pipelining layouts with graph-replayed calls (the CPU stand-in for CUDA graphs, whose
    replay overwrites its static outputs as a CUDA graph does)."""
    from hybridiff_rt.engine import graphs

    graphs.emulate_on_cpu(True)
    return {"pairs_hybrid": cases.run_case(seed, "pairs_hybrid", cuda_graphs="on"),
            "layers_hybrid": cases.run_case(seed, "layers_hybrid", cuda_graphs="on",
                                            stage_cuts=tuple(layer_cuts))}


def test_graph_replayed_stages_on_four_ranks_equal_eager_and_are_timed(four):
    """cuda_graphs="on" reaches every rank's stage of both layouts (and the CBP calls): outputs
    bit for bit the eager runs', the report lists each stage as graphed, and every step's compute
    and transfer sections are timed."""
    seed, ranks = four
    cuts = ranks[0]["layers_hybrid"]["report"]["extra"]["pipeline"]["plan"]["cuts"]
    graphed = all_ok(run_ranks(_rank_graphed, seed, cuts, world_size=WORLD, timeout_s=300),
                     WORLD)
    for rank, results in enumerate(graphed):
        for name, r in results.items():
            where = (seed, rank, name)
            np.testing.assert_array_equal(r["out"], ranks[rank][name]["out"], err_msg=str(where))
            report = r["report"]
            assert report["modes"] == ranks[rank][name]["report"]["modes"], where
            # this rank's stage of its chain, graph-replayed
            pipeline = report["extra"]["pipeline"]
            j, stage_cuts = pipeline["chain"].index(rank), pipeline["plan"]["cuts"]
            calls = report["extra"]["compile"]["calls"]
            stages = {k: v for k, v in calls.items() if k.startswith("stage units")}
            mine = f"stage units {stage_cuts[j]}..{stage_cuts[j + 1] - 1}"
            assert list(stages) == [mine], (where, calls)
            assert stages[mine]["state"] == "graphed" and stages[mine]["replays"] >= 1, \
                (where, calls)
            for i, mode in enumerate(report["modes"]):
                assert report["transfer_ms"][i] > 0, (where, i, report["transfer_ms"])
                if mode == "pipeline":
                    assert report["compute_ms"][i] > 0, (where, i, report["compute_ms"])


# ------------------------------------------------------------------------------------- faults
def _sd3_too_few_units(seed):
    """An SD3-shaped transformer of 3 units on 4 ranks, one image, k > 0: the layer-wise chain
    cannot have a stage per rank, so the run is condition-based throughout (noted). Returns the
    output, the report and the per-branch serial reference computed in this process."""
    with testing.seeded(seed):
        model = testing.sd3_transformer(num_layers=1).eval()
    g = torch.Generator().manual_seed(seed + 1)
    sample = torch.randn(1, 16, 16, 16, generator=g)
    cond, uncond = ({"encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
                     "pooled_projections": torch.randn(1, 32, generator=g)} for _ in range(2))
    den = hr.HybridDenoiser(model, hr.HybridConfig(**cases.HYBRID))
    x, ref = sample, sample
    with torch.no_grad():
        for i in range(cases.STEPS):
            t = torch.full((1,), 900.0 - 150.0 * i)
            x = x - 0.1 * den(x, t, cond=cond, uncond=uncond, guidance_scale=cases.GUIDANCE,
                              step=i, num_steps=cases.STEPS)
            u = model(hidden_states=ref, timestep=t, **uncond, return_dict=False)[0]
            c = model(hidden_states=ref, timestep=t, **cond, return_dict=False)[0]
            ref = ref - 0.1 * hr.ops.cfg_combine(u, c, cases.GUIDANCE)[0]
    den.close()
    return {"out": x.numpy().copy(), "ref": ref.numpy().copy(), "report": den.report.to_dict()}


def _rank_faults(rank, seed):
    import os as _os

    out = {"sd3": _sd3_too_few_units(seed)}
    model = cases.unet(seed)
    sample, cond, uncond = cases.inputs(seed + 1, 2)
    # a pinned 2-stage cut cannot serve a 4-stage layer-wise chain: refused at the first call
    den = hr.HybridDenoiser(model, hr.HybridConfig(**cases.HYBRID, stage_cuts=cases.PAIR_CUTS,
                                                   scale_out="layers"))
    try:
        cases.loop(den, sample, cond, uncond)
        out["cuts"] = None
    except hr.ConfigError as exc:
        out["cuts"] = str(exc)
    den.close()
    den = hr.HybridDenoiser(model, hr.HybridConfig(k=0, timeout_s=3.0))
    try:  # rank 2 passes another guidance scale
        den(sample, cases.timestep(0), cond=cond, uncond=uncond,
            guidance_scale=cases.GUIDANCE + (rank == 2), step=0, num_steps=cases.STEPS)
        out["mismatch"] = None
    except hr.RankMismatchError as exc:
        out["mismatch"] = str(exc)
    den.close()
    den = hr.HybridDenoiser(model, hr.HybridConfig(**cases.HYBRID, timeout_s=3.0))
    try:
        for i in range(cases.STEPS):
            if rank == 3 and i == 3:  # inside the pipelined steps 2..3
                _os._exit(7)
            den(sample, cases.timestep(i), cond=cond, uncond=uncond,
                guidance_scale=cases.GUIDANCE, step=i, num_steps=cases.STEPS)
        out["death"] = None
    except hr.PeerTimeoutError as exc:
        out["death"] = str(exc)
    return out


def test_edge_cases_bad_cuts_disagreement_and_a_killed_rank_on_every_surviving_rank():
    outcomes = run_ranks(_rank_faults, random.randrange(1 << 16), world_size=WORLD,
                         timeout_s=240)
    assert 3 not in outcomes or not outcomes[3].ok
    for rank in range(3):
        assert rank in outcomes, f"rank {rank} hung"
        result = outcomes[rank].unwrap()
        sd3 = result["sd3"]
        assert sd3["report"]["modes"] == ["cbp"] * cases.STEPS
        assert any("3 units for 4 ranks" in n for n in sd3["report"]["notes"])
        np.testing.assert_array_equal(sd3["out"], sd3["ref"])
        assert result["cuts"] and "4 ranks (layers layout" in result["cuts"], result
        assert result["mismatch"] and "guidance_scale" in result["mismatch"], result
        assert result["death"] and "step 3" in result["death"], result


# ---------------------------------------------------------------------------------- two nodes
@pytest.mark.parametrize("rendezvous, node_links", [("static", "config"), ("c10d", "stand-in")])
def test_two_nodes_of_two_ranks_equal_the_single_node_run(four, tmp_path, rendezvous, node_links):
    """Two torchrun launches (--nnodes=2) make one world of 4: through a static rendezvous on
    127.0.0.1 with the config's transport, and through a c10d rendezvous with per-link routes
    (links inside a node through a stand-in for IPC, links between the nodes through gloo)."""
    seed, ranks = four
    cuts = ranks[0]["layers_hybrid"]["report"]["extra"]["pipeline"]["plan"]["cuts"]
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    meet = ([f"--node_rank={{node}}", "--master_addr=127.0.0.1", f"--master_port={port}"]
            if rendezvous == "static" else
            ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
             f"--rdzv_id=hybridiff-rt-test-{port}"])
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
         *(arg.format(node=node) for arg in meet),
         str(ROOT / "tests" / "scale_out_node.py"), "--seed", str(seed),
         "--layers-cuts", ",".join(map(str, cuts)), "--out", str(tmp_path),
         "--node-links", node_links],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)]
    logs = []
    try:
        for launch in launches:
            logs.append(launch.communicate(timeout=300)[0])
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
    assert all(launch.returncode == 0 for launch in launches), "\n".join(logs)[-4000:]
    for rank in range(WORLD):
        saved = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(saved["pairs"], ranks[0]["pairs_hybrid"]["out"])
        np.testing.assert_array_equal(saved["layers"], ranks[0]["layers_hybrid"]["out"])
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        layers = report["layers"]
        assert layers["layout"]["layout"] == "layers"
        assert layers["extra"]["pipeline"]["plan"]["cuts"] == cuts
        node = [r for r in ((0, 1), (2, 3)) if rank in r][0]
        peers = [p for p in range(WORLD) if p != rank]
        # image pairs are placed by node: pairs (0, 1) and (2, 3) instead of (0, 2) and (1, 3),
        # so each pair's pipelined boundary stays inside its node
        pairs = report["pairs"]
        assert pairs["layout"]["pairs"] == [[0, 1], [2, 3]], pairs["layout"]
        assert pairs["layout"]["slot_ranks"] == [0, 2, 1, 3]
        assert pairs["extra"]["pipeline"]["chain"] == list(node)
        assert any(n.startswith("image pairs placed by node: pairs [[0, 1], [2, 3]] on nodes "
                                "[[0, 1], [2, 3]]") for n in pairs["notes"]), pairs["notes"]
        partner = [p for p in node if p != rank][0]
        sent = pairs["link_bytes"]
        assert all(sent[f"{rank}->{partner}"] > sent[f"{rank}->{p}"]
                   for p in peers if p != partner), sent
        if node_links == "config":
            assert layers["transport"] == "torch-gloo"
            assert layers["layout"]["links"] == {f"{rank}->{p}": "torch-gloo" for p in peers}
            continue
        # each link says its route; bytes are counted per link; the chain's three links were
        # measured over their own routes
        expected = {f"{rank}->{p}": "node-stand-in" if p in node else "torch-gloo"
                    for p in peers}
        for run in ("pairs", "layers"):
            assert report[run]["transport"] == "node-stand-in+torch-gloo", report[run]
            assert report[run]["layout"]["links"] == expected, (rank, run)
            assert set(report[run]["link_bytes"]) == set(expected)
        note = [n for n in layers["notes"] if n.startswith(f"links of rank {rank} ")]
        assert note and (f"node ranks {list(node)}, 2 nodes [[0, 1], [2, 3]]" in note[0]
                         and "collectives over torch-gloo" in note[0]), layers["notes"]
        figures = layers["extra"]["pipeline"]["per_link_bytes_per_ms"]
        assert len(figures) == WORLD - 1 and all(f > 0 for f in figures), figures
        assert layers["extra"]["pipeline"]["link_source"] == "probe"


def test_the_partitioner_weighs_each_boundary_with_the_link_it_crosses():
    """Per-stage link figures (one slow link, as between two nodes): the optimum equals a brute
    force over every cut with the per-link model written out here."""
    import itertools

    from hybridiff_rt.stages.partition import plan_partition

    n, stages = random.randrange(6, 10), 4
    costs = [random.uniform(0.5, 5.0) for _ in range(n)]
    sizes = [random.randrange(1, 1 << 20) for _ in range(n)]
    links = [random.uniform(5e4, 5e5) for _ in range(stages)]
    links[random.randrange(stages - 1)] /= 50  # the slow link

    def bottleneck(cuts):
        return max(sum(costs[a:b]) + sizes[b - 1] / links[j]
                   for j, (a, b) in enumerate(itertools.pairwise(cuts)))

    best = min(bottleneck((0, *inner, n))
               for inner in itertools.combinations(range(1, n), stages - 1))
    plan = plan_partition(costs, sizes, stages, links)
    assert math.isclose(plan.bottleneck_ms, best, rel_tol=1e-12)
    assert math.isclose(bottleneck(plan.cuts), best, rel_tol=1e-12)
    with pytest.raises(hr.ConfigError, match="one per stage"):
        plan_partition(costs, sizes, stages, links[:-1])
