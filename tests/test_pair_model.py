"""bench/pair_model.py: the two-GPU (RTX 3090 pair) model behind docs/gpu-latency.md section 4.

* The FLOP-counted unit costs add up to the FLOPs of the denoiser's own forward (the staged units
  are the model's forward, cut into pieces; only ``prepare``'s small embeddings are outside them).
* With a perfectly compute-bound GPU (batch 2 = twice batch 1) and a free link, CBP is exactly
  2x; the hybrid is above that and below the ceiling of perfectly balanced halves; a slower link
  never makes it faster.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = str(Path(__file__).resolve().parents[1] / "bench")

pytest.importorskip("diffusers")


def _import_bench_module(name: str):
    """Import bench/<name>.py with bench/ on the path only meanwhile: its sibling ``common`` must
    not stay in sys.modules, where it would shadow examples/common.py for test_examples.py."""
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)
        sys.modules.pop("common", None)


pair_model = _import_bench_module("pair_model")


def _args(**over):
    base = {"side": 256, "steps": 50, "b2_over_b1": 2.0, "overhead_s": 0.0, "link_gbps": 1e9,
            "latency_ms": 0.0}
    base.update(over)
    return argparse.Namespace(**base)


def test_unit_flops_add_up_to_the_whole_forward():
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    names, flops, sizes, pred = pair_model.unit_costs("sd3", side=256)
    assert names[0] == "pos_embed" and names[-1] == "out" and len(names) == 26
    assert pred == sizes[-1] == 16 * 32 * 32 * 2  # the fp16 prediction at a 32x32 latent
    with torch.device("meta"):
        model = SD3Transformer2DModel(**pair_model.SD3_MEDIUM).half()
        kw = {"hidden_states": torch.randn(1, 16, 32, 32, dtype=torch.half),
              "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 333, 4096, dtype=torch.half),
              "pooled_projections": torch.randn(1, 2048, dtype=torch.half)}
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**kw)
    whole = counter.get_total_flops()
    assert 0.99 * whole <= sum(flops) <= whole  # all but prepare's embeddings


def test_compute_bound_pair_speed_ups():
    free = {r["schedule"].split(" (")[0]: r for r in pair_model.model_pair("sd3", _args())}
    assert free["CBP only"]["denoiser_speedup"] == pytest.approx(2.0, rel=1e-12)
    k = 5
    ceiling = 50 * 2.0 / (50 - k + 1 + (k - 1) * 0.5)  # fill step = T1, later ones T1/2
    assert 2.0 < free["hybrid"]["denoiser_speedup"] <= ceiling + 1e-9
    slow = {r["schedule"].split(" (")[0]: r
            for r in pair_model.model_pair("sd3", _args(link_gbps=0.5, latency_ms=1.0))}
    for key in ("CBP only", "hybrid"):
        assert slow[key]["denoiser_speedup"] < free[key]["denoiser_speedup"]
