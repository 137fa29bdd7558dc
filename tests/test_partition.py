"""The stage partitioner (exact DP, checked against brute force) and per-unit cost profiles.

The partitioner tests need torch only; the profiling tests build a tiny SD3 transformer and skip
without diffusers (imported inside them, so the module collects on a machine without it, e.g. the
GPU machine of bench/device_check.sh).
"""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

import hybridiff_rt.stages as st
from hybridiff_rt.errors import ConfigError
from hybridiff_rt.stages import partition, plan_partition, stage_times_ms

torch.set_num_threads(1)
FREE = math.inf  # bytes_per_ms of a free link


# ------------------------------------------------------------------------------- partitioning


def test_balanced_costs_split_evenly():
    costs, sizes = [2.0] * 8, [100] * 8
    assert partition(costs, sizes, 1, FREE) == [0, 8]
    assert partition(costs, sizes, 2, FREE) == [0, 4, 8]
    assert partition(costs, sizes, 4, FREE) == [0, 2, 4, 6, 8]
    assert partition(costs, sizes, 8, 1.0) == list(range(9))
    # equal boundaries: every stage pays the same transfer, still an even split
    plan = plan_partition(costs, sizes, 2, 50.0)
    assert plan.cuts == (0, 4, 8)
    assert plan.compute_ms == (8.0, 8.0) and plan.transfer_ms == (2.0, 2.0) and plan.stage_ms == (10.0, 10.0)
    assert plan.bottleneck_ms == 10.0 and plan.serial_ms == 16.0 and plan.ideal_speedup == 1.6


def test_one_dominant_unit_gets_a_stage_of_its_own():
    costs, sizes = [1.0, 1.0, 10.0, 1.0, 1.0], [0] * 5
    plan = plan_partition(costs, sizes, 3, FREE)
    assert plan.cuts == (0, 2, 3, 5) and plan.bottleneck_ms == 10.0 and plan.ideal_speedup == 1.4
    # two stages: the dominant unit bounds the step at 12 either way; documented tie-break keeps
    # the last stage as long as possible
    plan = plan_partition(costs, sizes, 2, FREE)
    assert plan.bottleneck_ms == 12.0 and plan.cuts == (0, 2, 5)
    assert partition([1.0, 1.0, 1.0, 20.0], [0] * 4, 2, FREE) == [0, 3, 4]
    assert partition([20.0, 1.0, 1.0, 1.0], [0] * 4, 3, FREE) == [0, 1, 2, 4]


def test_transfer_dominated_cut_moves_to_the_small_boundary():
    costs = [1.0] * 6
    sizes = [10, 1000, 1000, 1000, 1000, 0]  # only the state after unit 0 is small
    slow = plan_partition(costs, sizes, 2, 100.0)  # 100 bytes/ms: a 1000-byte cut costs 10 ms
    assert slow.cuts == (0, 1, 6) and slow.stage_ms == (1.1, 5.0) and slow.bottleneck_ms == 5.0
    fast = plan_partition(costs, sizes, 2, 1e6)  # fast link: balance compute instead
    assert fast.cuts == (0, 3, 6)
    # the bottleneck is the big unit either way (12 ms); the cut that ships nothing wins
    assert partition([1.0, 1.0, 10.0, 1.0, 1.0], [0, 300, 0, 0, 0], 2, 100.0) == [0, 3, 5]
    assert partition([1.0, 1.0, 10.0, 1.0, 1.0], [0, 0, 300, 0, 0], 2, 100.0) == [0, 2, 5]


def test_final_transfer_is_counted_unless_disabled():
    costs, sizes = [3.0, 1.0, 1.0, 3.0], [0, 0, 0, 400]  # prediction: 400 bytes = 4 ms at 100 B/ms
    plan = plan_partition(costs, sizes, 2, 100.0)
    assert plan.cuts == (0, 3, 4) and plan.stage_ms == (5.0, 7.0)
    plan = plan_partition(costs, sizes, 2, 100.0, count_final_transfer=False)
    assert plan.cuts == (0, 2, 4) and plan.stage_ms == (4.0, 4.0)
    single = plan_partition(costs, sizes, 1, 100.0)  # one stage ships nothing
    assert single.transfer_ms == (0.0,) and single.ideal_speedup == 1.0


def _brute_force(costs, sizes, stages, bpm, final):
    n = len(costs)
    best = None
    for inner in itertools.combinations(range(1, n), stages - 1):
        cuts = [0, *inner, n]
        times = stage_times_ms(costs, sizes, cuts, bpm, count_final_transfer=final)
        transfer = sum(plan_partition(costs, sizes, stages, bpm, cuts=cuts, count_final_transfer=final).transfer_ms)
        key = (max(times), transfer)
        best = key if best is None or key < best else best
    return best


def test_dp_matches_brute_force_on_random_chains():
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    for _ in range(150):
        n = rng.randint(1, 9)
        costs = [rng.choice([0.0, rng.uniform(0, 10), float(rng.randint(0, 5))]) for _ in range(n)]
        sizes = [rng.choice([0, rng.randint(0, 10_000)]) for _ in range(n)]
        stages = rng.randint(1, n)
        bpm = rng.choice([FREE, 1e6, rng.uniform(100, 5000)])
        final = rng.random() < 0.5
        plan = plan_partition(costs, sizes, stages, bpm, count_final_transfer=final)
        assert list(plan.cuts) == partition(costs, sizes, stages, bpm, count_final_transfer=final)
        assert len(plan.cuts) == stages + 1 and plan.cuts[0] == 0 and plan.cuts[-1] == n
        assert all(b > a for a, b in zip(plan.cuts, plan.cuts[1:]))
        bottleneck, transfer = _brute_force(costs, sizes, stages, bpm, final)
        assert plan.bottleneck_ms == bottleneck, f"seed={seed} {costs} {sizes} {stages} {bpm}"
        assert sum(plan.transfer_ms) == pytest.approx(transfer, rel=1e-12, abs=1e-12), f"seed={seed}"
        assert list(plan.stage_ms) == stage_times_ms(costs, sizes, plan.cuts, bpm, count_final_transfer=final)


@pytest.mark.parametrize(
    "args, match",
    [
        (([1.0, 1.0], [0, 0], 3, 1.0), "more than the 2 units"),
        (([1.0, 1.0], [0, 0], 0, 1.0), ">= 1"),
        (([1.0, 1.0], [0, 0], -1, 1.0), ">= 1"),
        (([1.0, 1.0], [0, 0], True, 1.0), "integer"),
        (([1.0, 1.0], [0, 0], 1.5, 1.0), "integer"),
        (([1.0, -0.5], [0, 0], 1, 1.0), r"unit_costs_ms\[1\] = -0.5"),
        (([1.0, math.nan], [0, 0], 1, 1.0), "finite"),
        (([math.inf, 1.0], [0, 0], 1, 1.0), "finite"),
        (([], [], 1, 1.0), "empty"),
        (([1.0, 1.0], [0], 1, 1.0), "one boundary size"),
        (([1.0, 1.0], [0, -3], 1, 1.0), r"boundary_bytes\[1\]"),
        (([1.0, 1.0], [0, 2.5], 1, 1.0), "integers"),
        (([1.0, 1.0], [0, 0], 1, 0.0), "bandwidth"),
        (([1.0, 1.0], [0, 0], 1, -5.0), "bandwidth"),
        (([1.0, 1.0], [0, 0], 1, math.nan), "bandwidth"),
    ],
)
def test_invalid_inputs_are_refused(args, match):
    with pytest.raises(ConfigError, match=match):
        partition(*args)


def test_invalid_cuts_are_refused():
    for cuts in ([0, 2], [1, 2, 3], [0, 2, 2, 3][:3], [0, 3, 2]):
        with pytest.raises(ConfigError, match="not a partition"):
            plan_partition([1.0] * 3, [0] * 3, 2, 1.0, cuts=cuts)


def test_plan_to_dict_is_json():
    plan = plan_partition([1.0, 2.0, 3.0], [10, 20, 30], 2, 10.0)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["cuts"] == list(plan.cuts) and d["bottleneck_ms"] == plan.bottleneck_ms
    assert plan.num_stages == 2 and plan.stage_range(1) == (plan.cuts[1], 3)


# ---------------------------------------------------------------------------- cost profiling


def _tiny_sd3(layers=2):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=8,
    ).eval()


def _sd3_kw(hw=(8, 8)):
    return dict(
        hidden_states=torch.randn(1, 4, *hw),
        encoder_hidden_states=torch.randn(1, 3, 16),
        pooled_projections=torch.randn(1, 8),
        timestep=torch.tensor([500.0]),
        return_dict=False,
    )


@torch.no_grad()
def test_profile_measures_every_unit_and_boundary():
    st.clear_profile_cache()
    staged = st.stage_denoiser(_tiny_sd3())
    kw = _sd3_kw()
    prof = st.profile_units(staged, kw, repeats=2)
    assert prof.unit_names == tuple(staged.unit_names) and prof.repeats == 2
    assert all(math.isfinite(t) and t > 0 for t in prof.unit_ms)
    assert prof.prepare_ms > 0 and prof.finish_ms >= 0
    assert prof.device == f"cpu/threads={torch.get_num_threads()}"
    ctx = staged.prepare(**kw)
    state = ctx.initial_state
    for unit, size, layout in zip(staged.units, prof.boundary_bytes, prof.boundary_layouts):
        state = unit(state, ctx)
        assert size == st.state_nbytes(state) and layout == st.state_layout(state), unit.name
    assert [s.name for s in prof.boundary_layouts[0]] == ["encoder", "hidden"]
    assert [s.name for s in prof.boundary_layouts[-1]] == ["sample"]
    assert prof.boundary_bytes[-1] == 1 * 4 * 8 * 8 * 4
    plan = prof.plan(2, 1e6)
    assert plan.num_stages == 2 and plan.serial_ms == pytest.approx(sum(prof.unit_ms))


@torch.no_grad()
def test_profile_cache_is_keyed_on_config_shape_and_device():
    st.clear_profile_cache()
    model = _tiny_sd3()
    staged = st.stage_denoiser(model)
    first = st.profile_units(staged, _sd3_kw(), repeats=1)
    # same config + shapes (other values, another staging of an identically configured model)
    again = st.profile_units(st.stage_denoiser(_tiny_sd3()), _sd3_kw(), repeats=1)
    assert again is first
    other_shape = st.profile_units(staged, _sd3_kw(hw=(8, 4)), repeats=1)
    assert other_shape is not first and other_shape.key != first.key
    other_config = st.profile_units(st.stage_denoiser(_tiny_sd3(layers=3)), _sd3_kw(), repeats=1)
    assert other_config.key != first.key and len(other_config.unit_names) == 5
    assert st.profile_cache_key(staged, _sd3_kw()) == first.key
    fresh = st.profile_units(staged, _sd3_kw(), repeats=1, use_cache=False)
    assert fresh is not first and fresh.key == first.key
    st.clear_profile_cache()
    assert st.profile_units(staged, _sd3_kw(), repeats=1) is not first
    with pytest.raises(ConfigError, match="repeats"):
        st.profile_units(staged, _sd3_kw(), repeats=0)


@torch.no_grad()
def test_profile_roundtrips_through_json():
    st.clear_profile_cache()
    prof = st.profile_units(st.stage_denoiser(_tiny_sd3()), _sd3_kw(), repeats=1)
    back = st.UnitProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back == prof


def test_given_costs_profile():
    prof = st.UnitProfile.from_costs(["a", "b", "c"], [1.0, 5.0, 1.0], [8, 8, 8])
    assert prof.plan(3, FREE).cuts == (0, 1, 2, 3)
    assert st.UnitProfile.from_dict(prof.to_dict()) == prof
    with pytest.raises(ConfigError, match="one cost and one boundary size per unit"):
        st.UnitProfile.from_costs(["a", "b"], [1.0], [8, 8])
