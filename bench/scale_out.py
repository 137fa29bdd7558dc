"""Scale-out on CPU processes: image-pair throughput and layer-wise latency on 1, 2 and 4 ranks.

Each rank is one process with one thread (gloo between them). Per model, with the preset for the
step count (hybrid schedule, k > 0):

* throughput: one call making ``--images`` images (``num_images_per_prompt``), on 1 rank (serial
  baseline, CFG batch 2 x images), 2 ranks (one pair does every image) and 4 ranks (image pairs:
  each pair its share);
* latency: one call making one image, on 1, 2 and 4 ranks (4 ranks: layer-wise, CBP steps on one
  pair while the other pair idles, pipelined steps over 4 stages).

Per row: median seconds per call, images per second, measured speed-up over the serial row of the
same kind, and the modelled speed-up from the unit costs the run measured (the RunReport's
``modelled_speedup`` on 4 ranks; the same model, engine/scale_model.py, from the two-rank report's
stage profile on 2 ranks). Ranks must agree bit for bit (checked).

On a machine with fewer cores than ranks the processes share cores: 4 processes on 2 cores measure
correctness and the modelled figures, not speed.

    python bench/scale_out.py
    python bench/scale_out.py --models sdxl --steps 10 --repeats 1   # quick look
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NEGATIVE, PROMPT, median, write_results


def parse(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=2, help="images per call for throughput")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    return parser.parse_args(argv)


def call(runner, steps: int, side: int, images: int):
    import torch

    return runner(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                  height=side, width=side, guidance_scale=5.0, output_type="latent",
                  num_images_per_prompt=images,
                  generator=torch.Generator().manual_seed(0)).images


def rank_main(rank: int, family: str, size: str, side: int, steps: int, images: int,
              repeats: int, world: int) -> dict:
    """Time ``repeats`` calls making ``images`` images on this rank (plain pipeline on a world
    of one, else hr.parallelize with the preset)."""
    import hybridiff_rt as hr
    from hybridiff_rt import testing

    pipe = testing.build(family, seed=0, size=size)
    runner = pipe
    if world > 1:
        hr.init_distributed()
        runner = hr.parallelize(pipe, hr.HybridConfig.preset(family, num_steps=steps))
    call(runner, steps, side, images)  # warm-up (also profiles the stages once, cached)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = call(runner, steps, side, images)
        times.append(time.perf_counter() - start)
    out = {"times_s": times, "latents": latents.numpy()}
    if world > 1:
        out["report"] = hr.last_report(runner).to_dict()
    return out


def modelled(report: dict, images: int) -> float | None:
    """The run's modelled speed-up: the report's own (4 ranks) or, on 2 ranks, the same model
    (engine/scale_model.py) from the report's stage profile."""
    if report.get("modelled_speedup"):
        return report["modelled_speedup"]["run_speedup"]
    pipeline = report["extra"].get("pipeline")
    if not pipeline:
        return None
    from hybridiff_rt.engine.scale_model import modelled_speedup

    k = report["modes"].count("pipeline")
    whole_ms = sum(pipeline["unit_ms"])
    per_image = pipeline["boundary_bytes"][-1] // images
    return modelled_speedup(
        images_per_branch=images, pairs=1, image_ms=whole_ms / images,
        prediction_bytes_per_image=per_image, bytes_per_ms=pipeline["link_bytes_per_ms"],
        cbp_steps=len(report["modes"]) - k, pipelined_steps=k,
        pipeline_bottleneck_ms=pipeline["plan"]["bottleneck_ms"],
        pipeline_gathers=False)["run_speedup"]


def main(argv: list[str] | None = None) -> int:
    from hybridiff_rt.testing import all_ok, run_ranks

    args = parse(argv)
    rows = []
    for family in args.models:
        for kind, images in (("throughput", args.images), ("latency", 1)):
            serial_s = None
            for world in args.worlds:
                print(f"[{family}] {kind}: {images} image(s), {world} process(es) x 1 thread",
                      flush=True)
                ranks = all_ok(run_ranks(rank_main, family, args.size, args.side, args.steps,
                                         images, args.repeats, world, world_size=world,
                                         timeout_s=3600), world)
                if any(not np.array_equal(ranks[0]["latents"], r["latents"]) for r in ranks):
                    raise RuntimeError(f"{family} {kind} world {world}: ranks differ")
                seconds = median(ranks[0]["times_s"])
                serial_s = seconds if world == 1 else serial_s
                report = ranks[0].get("report", {})
                rows.append({
                    "model": family, "kind": kind, "world": world, "images": images,
                    "layout": (report.get("layout") or {}).get("layout", "serial")
                    if world > 2 else ("pair" if world == 2 else "serial"),
                    "seconds": seconds, "images_per_s": images / seconds,
                    "speedup": serial_s / seconds if serial_s else None,
                    "modelled": modelled(report, images) if world > 1 else 1.0,
                    "modes": "".join(m[0] for m in report.get("modes", [])),
                    "model_detail": report.get("modelled_speedup"),
                    "plan": (report.get("extra", {}).get("pipeline") or {}).get("plan"),
                    "per_link_bytes_per_ms": (report.get("extra", {}).get("pipeline") or {})
                    .get("per_link_bytes_per_ms")})
                print(f"  {seconds:.2f} s, {images / seconds:.2f} images/s, modelled "
                      f"{rows[-1]['modelled']}", flush=True)
    columns = [("model", "model"), ("kind", "kind"), ("world", "ranks"), ("images", "images"),
               ("layout", "layout"), ("seconds", "s / call"), ("images_per_s", "images / s"),
               ("speedup", "measured speed-up"), ("modelled", "modelled speed-up"),
               ("modes", "modes (c=cbp, p=pipeline)")]
    cores = os.cpu_count() or 0
    notes = [(f"{args.size} random-init models, {args.side}x{args.side} px, {args.steps} steps, "
             f"preset schedule; 1 thread per process, gloo; medians of {args.repeats} calls."),
             ("modelled speed-up: from the unit costs and link figures each run measured "
             "(engine/scale_model.py: costs linear in images, transfers not overlapped).")]
    if cores < max(args.worlds):
        notes.append(f"This machine has {cores} cores for {max(args.worlds)} processes: runs "
                     "with more processes than cores measure correctness (ranks agree bit for "
                     "bit), not speed; read the modelled column for the layout's promise.")
    write_results("scale_out", rows, columns,
                  meta={"size": args.size, "side": args.side, "steps": args.steps,
                            "images": args.images, "repeats": args.repeats, "cores": cores},
                  out_dir=args.out, notes=notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
