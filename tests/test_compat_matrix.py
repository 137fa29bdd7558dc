"""Compatibility matrix: every pipeline variant of the supported families on two CPU ranks.

For each variant of hybridiff_rt.testing.variants (text-to-image, img2img, inpaint, ControlNet,
T2I-Adapter, PAG, skip-layer guidance, a second-order scheduler, denoising_start/end), with 1 and 2
images per prompt, and with k=0 and with a schedule that pipelines some steps, one cell asserts:

* supported, k=0: the two-rank output equals, bit for bit, the plain pipeline run on one rank with
  its denoiser called once per CFG branch (the exact serial reference); identical on both ranks;
  every denoiser call ran as a CBP step and the report's num_steps equals the calls made;
* supported, k>0: both ranks identical and finite; the modes follow the schedule (CBP up to tau1,
  exactly the pipelined steps tau1+1..tau2, CBP to the end) or, where the stage pipeline cannot
  carry the inputs, CBP throughout with a note saying why; num_steps equals the calls made;
* refused (PAG): UnsupportedModelError naming the feature on both ranks, at the first call.

README.md's support table is the summary of this matrix.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import INFO, VARIANTS, all_ok, run_ranks

REFUSED = {"sdxl-pag": "perturbed-attention guidance"}
STEPS_K0 = 4
STEPS_PIPELINED = 12
PIPELINED = dict(window=1, slope_eps=0.0, k=2, tau_cap=2)  # tau1 = 2 by the cap: steps 3, 4
CELLS = [(name, images, k) for name in VARIANTS for images in (1, 2) for k in (0, 2)]


def _run(pipe, kwargs, name, images, steps, seed):
    output_type = INFO[name].output_type or "latent"
    out = pipe(prompt="a red fox", negative_prompt="blur", num_inference_steps=steps,
               guidance_scale=5.0, num_images_per_prompt=images, output_type=output_type,
               generator=torch.Generator().manual_seed(seed), **kwargs)
    x = out.images
    return x.detach().float().numpy().copy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _rank_matrix(rank, seed, cells):
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_variant, denoiser, per_branch_forward

    hr.init_distributed()
    results = {}
    for name, images, k in cells:
        # some pipelines draw from torch's global generator (SD3 ControlNet samples its control
        # image's latents without a generator): seed it alike on every rank, as users must
        torch.manual_seed(seed)
        pipe, kwargs = build_variant(name, seed=seed)
        steps = STEPS_K0 if k == 0 else STEPS_PIPELINED
        cfg = hr.HybridConfig(k=0) if k == 0 else hr.HybridConfig(**PIPELINED)
        runner = hr.parallelize(pipe, cfg)
        cell = {}
        try:
            cell["out"] = _run(runner, kwargs, name, images, steps, seed)
            cell["error"] = None
        except Exception as exc:  # noqa: BLE001 - the cell records what each rank raised
            cell["error"] = (type(exc).__name__, str(exc))
        report = hr.last_report(runner)
        cell["modes"] = list(report.modes)
        cell["num_steps"] = report.num_steps
        cell["tau"] = (report.tau1, report.tau2)
        cell["notes"] = list(report.notes)
        cell["recorded"] = getattr(pipe, "_num_timesteps", None)
        pipe = runner.restore()
        if k == 0 and cell["error"] is None:
            torch.manual_seed(seed)
            undo = per_branch_forward(denoiser(pipe))
            try:
                cell["reference"] = _run(pipe, kwargs, name, images, steps, seed)
            finally:
                undo()
        results[(name, images, k)] = cell
    return results


@pytest.fixture(scope="module")
def matrix():
    seed = random.randrange(1 << 16)
    ranks = all_ok(run_ranks(_rank_matrix, seed, CELLS, timeout_s=1200))
    return ranks


@pytest.mark.parametrize("name, images, k", CELLS, ids=[f"{n}-{i}img-k{k}" for n, i, k in CELLS])
def test_cell(matrix, name, images, k):
    cells = [ranks[(name, images, k)] for ranks in matrix]
    if name in REFUSED:
        for rank, cell in enumerate(cells):
            assert cell["error"] is not None, f"rank {rank} was not refused"
            kind, message = cell["error"]
            assert kind == "UnsupportedModelError" and REFUSED[name] in message, cell["error"]
            assert cell["modes"] == []  # refused at its first call: no step ran
        return
    for rank, cell in enumerate(cells):
        assert cell["error"] is None, (rank, cell["error"])
        calls = len(cell["modes"])
        assert cell["num_steps"] == calls >= 1, (cell["num_steps"], calls)
        if cell["recorded"] is not None:  # what the pipeline itself planned
            assert calls == cell["recorded"]
        assert cell["modes"][-1] == "cbp"
    a, b = cells
    assert np.array_equal(a["out"], b["out"]), "the two ranks returned different outputs"
    assert np.isfinite(a["out"]).all()
    assert a["modes"] == b["modes"] and a["tau"] == b["tau"]
    if k == 0:
        assert a["modes"] == ["cbp"] * len(a["modes"])
        for cell in cells:
            assert np.array_equal(cell["out"], cell["reference"]), \
                f"max |diff| {np.abs(cell['out'] - cell['reference']).max()}"
        return
    modes = a["modes"]
    if "pipeline" in modes:
        tau1, tau2 = a["tau"]
        assert (tau1, tau2) == (PIPELINED["tau_cap"], PIPELINED["tau_cap"] + PIPELINED["k"])
        expected = ["pipeline" if tau1 < i <= tau2 else "cbp" for i in range(len(modes))]
        assert modes == expected
    else:  # the stage pipeline cannot carry these inputs: CBP throughout, and the report says so
        assert any("no pipelined steps in this run" in note for note in a["notes"]), a["notes"]
