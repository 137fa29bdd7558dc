"""The CBP and hybrid runtime with CUDA tensors on two processes. Run by bench/device_check.sh;
the GPU test is skipped without a GPU (and without diffusers/transformers, which build the tiny
pipeline).

The process-group backend follows the machine, as hybridiff_rt.init_distributed chooses it: one GPU
shared by both ranks -> gloo (NCCL refuses two ranks on one GPU); a GPU per rank (two or more
GPUs) -> NCCL. transport="torch" therefore reports "torch-gloo" or "torch-nccl"; transport="ipc"
reports "ipc" either way. ``expected_backend`` states that rule, and a CPU test checks it against
init_distributed itself.

On a GPU, batch size and launch order may change kernel choices, so these tests compare with the
one-process references within GPU_TOLERANCE instead of bit for bit; the two ranks must still be
identical (they combine the same exchanged tensors). A third run pair re-plans its stage cut
from the stage times CUDA events measured (``rebalance=True``): both ranks learn the same.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hybridiff_rt.testing import all_ok, run_ranks

GPU_TOLERANCE = 1e-3
STEPS = 10
#: the ranks are killed after this many seconds (below device_check.sh's per-test limit of 150 s,
#: so a hang ends here, with the ranks cleaned up, rather than in pytest-timeout)
RANK_TIMEOUT_S = 120
WORLD_SIZE = 2


def expected_backend(gpus: int | None = None, local_ranks: int = WORLD_SIZE) -> str:
    """The backend init_distributed picks for ``local_ranks`` ranks on a node with ``gpus`` GPUs
    (default: this machine's): NCCL when every rank gets a GPU of its own, else gloo."""
    if gpus is None:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "nccl" if gpus >= local_ranks else "gloo"


def _rank_gpu(rank, transport, seed):
    from test_hybrid import emulate

    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.testing import per_branch_forward

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = hr.init_distributed()
    pipe = testing.build("sdxl", seed=seed).to(info.device)
    call = dict(prompt="a kite over a beach", num_inference_steps=STEPS, height=32, width=32,
                guidance_scale=5.0, output_type="latent")
    results = {"backend": info.backend, "device": str(info.device),
               "gpus": torch.cuda.device_count()}
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
    # stage cuts re-planned from the stage times CUDA events measured: the second run plans
    # from the first one's medians, exchanged between the ranks
    parallel = hr.parallelize(pipe, hr.HybridConfig(transport=transport, rebalance=True,
                                                    window=1, slope_eps=1e-6, k=3, tau_cap=4))
    for _ in range(2):
        out = parallel(generator=torch.Generator().manual_seed(seed), **call).images
    results["rebalanced"] = dict(out=out.cpu().numpy(),
                                 report=hr.last_report(parallel).to_dict())
    parallel.restore()
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["torch", "ipc"])
def test_cbp_and_hybrid_with_cuda_tensors_two_processes(transport):
    # the ranks build a tiny diffusers pipeline: skip (in the parent, before spawning) without it
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    seed = random.randrange(1 << 16)
    backend = expected_backend()
    print(f"seed={seed} gpus={torch.cuda.device_count()} expected backend={backend}")
    results = all_ok(run_ranks(_rank_gpu, transport, seed, world_size=WORLD_SIZE,
                               timeout_s=RANK_TIMEOUT_S))
    assert [r["backend"] for r in results] == [backend] * WORLD_SIZE, (seed, results[0]["gpus"])
    devices = [r["device"] for r in results]
    assert devices == (["cuda:0", "cuda:1"] if backend == "nccl" else ["cuda:0", "cuda:0"]), devices
    for name in ("cbp", "hybrid"):
        r0, r1 = results[0][name], results[1][name]
        assert np.array_equal(r0["out"], r1["out"]), f"seed={seed} {name}: ranks differ"
        err = np.abs(r0["out"] - r0["reference"]).max()
        assert err <= GPU_TOLERANCE, f"seed={seed} {name}: max error {err}"
        expected = "ipc" if transport == "ipc" else f"torch-{backend}"
        assert r0["report"]["transport"] == expected, (seed, name, r0["report"]["transport"])
    assert results[0]["hybrid"]["report"]["modes"].count("pipeline") == 3
    r0, r1 = results[0]["rebalanced"], results[1]["rebalanced"]
    assert np.array_equal(r0["out"], r1["out"]) and np.isfinite(r0["out"]).all()
    info = r0["report"]["extra"]["rebalance"]
    assert info == r1["report"]["extra"]["rebalance"], "the ranks re-planned differently"
    assert len(info["measured_stage_ms"]) == 2
    assert all(0 < ms < 1e4 for ms in info["measured_stage_ms"]), info
    assert (r0["report"]["extra"]["pipeline"]["plan"]["cuts"]
            == r1["report"]["extra"]["pipeline"]["plan"]["cuts"])


def _rank_four_gpu(rank, transport, nodes, seed):
    """Four ranks on the GPU(s): the layer-wise and image-pair cases of tests/scale_out_cases.py.
    ``nodes=2`` makes ranks (0, 1) and (2, 3) two torchrun nodes (GROUP_RANK, LOCAL_WORLD_SIZE),
    so transport="auto" routes each link: CUDA IPC inside a node, torch.distributed between."""
    import os

    import scale_out_cases as cases

    import hybridiff_rt as hr

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if nodes == 2:
        os.environ.update(GROUP_RANK=str(rank // 2), LOCAL_RANK=str(rank % 2),
                          LOCAL_WORLD_SIZE="2")
    info = hr.init_distributed()
    out = {"device": str(info.device), "backend": info.backend}
    # the layer-wise cut pinned: link figures differ between transports, and so would a planned cut
    pinned = {"layers_hybrid": {"stage_cuts": (0, 4, 8, 12, 16)}, "pairs_hybrid": {}}
    for name, fields in pinned.items():
        out[name] = cases.run_case(seed, name, device=info.device, transport=transport, **fields)
    return out


@pytest.mark.gpu
def test_four_ranks_on_one_node_and_on_two_nodes_route_links_and_agree():
    """World size 4 on the GPU(s): transport="torch"; transport="auto" on one node (CUDA IPC on
    every link, four ranks); transport="auto" over two torchrun nodes (IPC inside each node,
    torch.distributed between them). Same output on every rank; the three runs agree within
    GPU_TOLERANCE; the report names each link's backend; over two nodes the image pairs are
    placed by node."""
    pytest.importorskip("diffusers")
    seed = random.randrange(1 << 16)
    runs = {}
    for key, (transport, nodes) in {"torch": ("torch", 1), "ipc": ("auto", 1),
                                    "mixed": ("auto", 2)}.items():
        runs[key] = all_ok(run_ranks(_rank_four_gpu, transport, nodes, seed, world_size=4,
                                     timeout_s=RANK_TIMEOUT_S), 4)
    backend = expected_backend(local_ranks=4)
    for name in ("layers_hybrid", "pairs_hybrid"):
        reference = runs["torch"][0][name]["out"]
        for key, ranks in runs.items():
            for rank, result in enumerate(ranks):
                r = result[name]
                assert np.array_equal(r["out"], ranks[0][name]["out"]), (seed, key, name, rank)
                err = np.abs(r["out"] - reference).max()
                assert err <= GPU_TOLERANCE, f"seed={seed} {key} {name}: max error {err}"
                assert r["report"]["modes"].count("pipeline") == 2, (key, name)
                links = r["report"]["layout"]["links"]
                if key == "torch":
                    assert set(links.values()) == {f"torch-{backend}"}, links
                elif key == "ipc":
                    assert r["report"]["transport"] == "ipc" and set(links.values()) == {"ipc"}
                else:
                    node = (0, 1) if rank < 2 else (2, 3)
                    between = f"torch-{result['backend']}"
                    assert links == {f"{rank}->{p}": "ipc" if p in node else between
                                     for p in range(4) if p != rank}, (rank, links)
                    if name == "pairs_hybrid":  # image pairs placed by node
                        assert r["report"]["layout"]["pairs"] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("gpus, backend", [(0, "gloo"), (1, "gloo"), (2, "nccl"), (4, "nccl")])
def test_expected_backend_follows_init_distributed(monkeypatch, gpus, backend):
    """CPU check of the rule the GPU test expects: init_distributed's own automatic choice for two
    local ranks (process-group creation stubbed out) equals expected_backend(gpus)."""
    from hybridiff_rt.comm import distributed

    chosen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.setdefault("device", device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: chosen.setdefault("backend", backend))
    monkeypatch.setattr(distributed, "current_dist_info", lambda: None)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": str(WORLD_SIZE),
                       "LOCAL_WORLD_SIZE": str(WORLD_SIZE)}.items():
        monkeypatch.setenv(key, value)
    distributed.init_distributed()
    assert chosen["backend"] == backend == expected_backend(gpus)
    if gpus:  # rank 1 sits on GPU 1 with a GPU per rank, else shares GPU 0
        assert chosen["device"] == torch.device("cuda", 1 if backend == "nccl" else 0)
