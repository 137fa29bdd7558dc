"""The CBP and hybrid runtime with CUDA tensors: two processes on one GPU (gloo, or the CUDA IPC
transport). Run by bench/device_check.sh; skipped without a GPU.

On a GPU, batch size and launch order may change kernel choices, so these tests compare with the
one-process references within GPU_TOLERANCE instead of bit for bit; the two ranks must still be
identical (they combine the same exchanged tensors).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import all_ok, run_ranks

GPU_TOLERANCE = 1e-3
STEPS = 10


def _rank_gpu(rank, transport, seed):
    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from test_cbp import per_branch_forward
    from test_hybrid import emulate

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hr.init_distributed()
    pipe = testing.build("sdxl", seed=seed).to("cuda")
    call = dict(prompt="a kite over a beach", num_inference_steps=STEPS, height=32, width=32,
                guidance_scale=5.0, output_type="latent")
    results = {}
    for name, fields in {"cbp": dict(k=0),
                         "hybrid": dict(window=1, slope_eps=1e-6, k=3, tau_cap=4)}.items():
        parallel = hr.parallelize(pipe, hr.HybridConfig(transport=transport, **fields))
        out = parallel(generator=torch.Generator().manual_seed(seed), **call).images
        report = hr.last_report(parallel).to_dict()
        pipe = parallel.restore()
        if name == "cbp":
            undo = per_branch_forward(pipe.unet)
            reference = pipe(generator=torch.Generator().manual_seed(seed), **call).images
            undo()
            reference = reference.cpu().numpy()
        else:
            cut = report["extra"]["pipeline"]["plan"]["cuts"][1]
            reference = emulate(pipe, report["tau1"], report["tau2"], cut, "off",
                                generator=torch.Generator().manual_seed(seed), **call)
        results[name] = dict(out=out.cpu().numpy(), reference=reference, report=report)
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["torch", "ipc"])
def test_cbp_and_hybrid_with_cuda_tensors_two_processes_one_gpu(transport):
    seed = random.randrange(1 << 16)
    results = all_ok(run_ranks(_rank_gpu, transport, seed, timeout_s=600))
    for name in ("cbp", "hybrid"):
        r0, r1 = results[0][name], results[1][name]
        assert np.array_equal(r0["out"], r1["out"]), f"{name}: ranks differ"
        assert np.abs(r0["out"] - r0["reference"]).max() <= GPU_TOLERANCE, name
        expected = "ipc" if transport == "ipc" else "torch-gloo"
        assert r0["report"]["transport"] == expected
    assert results[0]["hybrid"]["report"]["modes"].count("pipeline") == 3
