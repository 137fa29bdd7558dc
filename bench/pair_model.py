"""Expected speed-up of hybridiff_rt on two compute-bound GPUs over PCIe without peer access (the
paper's 2x RTX 3090 rig), from per-unit costs and a link model; nothing runs on a GPU.

Unit costs: the FLOPs of every unit of the staged SDXL U-Net / SD3-medium MMDiT (published
configs) at 1024x1024, batch 1, counted by ``torch.utils.flop_counter`` on the meta device (no
memory, no arithmetic: seconds on a CPU), with the boundary bytes after each unit from the same
pass. On a compute-bound GPU a unit's time is proportional to its FLOPs, so the costs are scaled
to one measured number, the 1-GPU time of a 50-step image (the paper's 16.49 s SDXL, 19.36 s
SD3), minus the non-denoiser time (text encoders, VAE decode: ``--overhead-s``). The ratio of a
batch-2 to a batch-1 call, ``--b2-over-b1``, is the other input (2 = perfectly compute-bound).

Schedule (the model's paper preset, 50 steps): CBP steps 0..tau1 and tau1+k+1..49, pipelined
steps tau1+1..tau1+k, the first of them the fill step. Step costs on the pair:
  serial step   T2 = (b2/b1) x T1
  CBP step      T1 + exchange of one prediction each way
  fill step     stage 0 + boundary transfer + stage 1 + prediction broadcast
  later step    bottleneck stage (compute + its outgoing transfer, hybridiff_rt's own
                partitioner on these costs) + prediction broadcast; the boundary of step s
                travels while step s+1 computes
Transfers: ``bytes / link + latency`` (host-staged copies over PCIe Gen3 x16: about 10 GB/s).
Where the k pipelined steps fall (tau1) does not change the sum, so one row per schedule.

    python bench/pair_model.py                 # writes bench/results/pair_model.{json,md}
    python bench/pair_model.py --b2-over-b1 1.9 --link-gbps 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results
from e2e_gpu_worker import FAMILIES, SD3_MEDIUM, SDXL_UNET

PAPER = {"sdxl": {"serial_s": 16.49, "pair_s": 7.12, "speedup": 2.31, "cbp_speedup": 1.78},
         "sd3": {"serial_s": 19.36, "pair_s": 9.33, "speedup": 2.07, "cbp_speedup": None}}


def unit_costs(family: str, side: int = 1024) -> tuple[list[str], list[float], list[int], int]:
    """(unit names, FLOPs per unit, bytes of the state after each unit, prediction bytes) of the
    staged denoiser at batch 1, fp16, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import hybridiff_rt as hr

    spec = FAMILIES[family]
    latent = side // 8
    half = torch.float16
    with torch.device("meta"):
        if family == "sdxl":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel(**SDXL_UNET).to(half)
            kw = {"sample": torch.randn(1, 4, latent, latent, dtype=half),
                  "timestep": torch.tensor(500.0),
                  "encoder_hidden_states": torch.randn(1, spec["tokens"], spec["text"],
                                                       dtype=half),
                  "added_cond_kwargs": {"text_embeds": torch.randn(1, spec["pooled"], dtype=half),
                                        "time_ids": torch.randn(1, 6, dtype=half)}}
        else:
            from diffusers import SD3Transformer2DModel

            model = SD3Transformer2DModel(**SD3_MEDIUM).to(half)
            kw = {"hidden_states": torch.randn(1, 16, latent, latent, dtype=half),
                  "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(1, spec["tokens"], spec["text"],
                                                       dtype=half),
                  "pooled_projections": torch.randn(1, spec["pooled"], dtype=half)}
        staged = hr.stage_denoiser(model)
        flops, sizes = [], []
        with torch.no_grad():
            ctx = staged.prepare(**kw)
            state = ctx.initial_state
            for unit in staged.units:
                with FlopCounterMode(display=False) as counter:
                    state = unit(state, ctx)
                flops.append(float(counter.get_total_flops()))
                sizes.append(sum(t.numel() * t.element_size() for t in state.values()))
    return staged.unit_names, flops, sizes, sizes[-1]


def model_pair(family: str, args: argparse.Namespace) -> list[dict]:
    from hybridiff_rt import HybridConfig
    from hybridiff_rt.stages.partition import plan_partition

    names, flops, sizes, pred_bytes = unit_costs(family, args.side)
    steps = args.steps
    cfg = HybridConfig.preset(family, num_steps=steps)
    paper = PAPER[family]
    denoise_s = paper["serial_s"] - args.overhead_s
    t2 = denoise_s * 1e3 / steps
    t1 = t2 / args.b2_over_b1
    total_flops = sum(flops)
    costs = [t1 * f / total_flops for f in flops]
    bytes_per_ms = args.link_gbps * 1e6

    def xfer(nbytes: float) -> float:
        return nbytes / bytes_per_ms + args.latency_ms

    plan = plan_partition(costs, sizes, 2, bytes_per_ms)
    cut = plan.cuts[1]
    stage0, stage1 = plan.compute_ms
    boundary = sizes[cut - 1]
    cbp_step = t1 + xfer(pred_bytes)
    fill_step = stage0 + xfer(boundary) + stage1 + xfer(pred_bytes)
    later_step = max(stage0 + max(0.0, xfer(boundary) - stage0), stage1) + xfer(pred_bytes)
    rows = []
    for name, k in (("CBP only (k=0)", 0), (f"hybrid (k={cfg.k})", cfg.k)):
        # where the k pipelined steps fall (tau1) does not change the sum
        tau1 = cfg.tau_cap
        pipelined = range(tau1 + 1, tau1 + 1 + k)
        total = sum(fill_step if i == tau1 + 1 and k else later_step if i in pipelined
                    else cbp_step for i in range(steps))
        sent = ((steps - k) * 2 * pred_bytes + k * boundary + k * pred_bytes
                - (boundary if k else 0))  # no boundary leaves the last pipelined step
        serial = steps * t2
        rows.append({
            "model": family, "schedule": name, "T2_ms": t2, "T1_ms": t1,
            "stages_ms": f"{stage0:.0f} + {stage1:.0f}", "cut_after": names[cut - 1],
            "boundary_mb": boundary / 1e6, "denoiser_speedup": serial / total,
            "image_speedup": (serial + args.overhead_s * 1e3) / (total + args.overhead_s * 1e3),
            "paper_speedup": paper["speedup"] if k else paper["cbp_speedup"],
            "gb_per_image": sent / 1e9, "tflop_b1": total_flops / 1e12})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--side", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--b2-over-b1", type=float, default=1.95,
                        help="batch-2 / batch-1 denoiser time on one GPU (2: fully compute-bound)")
    parser.add_argument("--overhead-s", type=float, default=0.5,
                        help="seconds per image outside the denoiser (text encoders, VAE decode)")
    parser.add_argument("--link-gbps", type=float, default=10.0,
                        help="GB/s of a host-staged GPU-to-GPU copy (PCIe Gen3 x16, no P2P)")
    parser.add_argument("--latency-ms", type=float, default=0.1, help="fixed cost per transfer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = [row for family in args.models for row in model_pair(family, args)]
    columns = [("model", "model"), ("schedule", "schedule"), ("T2_ms", "T2 ms"),
               ("T1_ms", "T1 ms"), ("stages_ms", "stage ms"), ("cut_after", "cut after"),
               ("boundary_mb", "boundary MB"), ("gb_per_image", "GB / image"),
               ("denoiser_speedup", "denoiser speed-up"), ("image_speedup", "image speed-up"),
               ("paper_speedup", "paper")]
    write_results("pair_model", rows, columns, meta=vars(args), out_dir=args.out,
                  notes=[(f"inputs: b2/b1 = {args.b2_over_b1}, non-denoiser {args.overhead_s} s "
                          f"per image, link {args.link_gbps} GB/s + {args.latency_ms} ms per "
                          "transfer; unit costs = FLOPs (meta-device count) scaled to the "
                          "paper's 1-GPU time. See docs/gpu-latency.md.")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
