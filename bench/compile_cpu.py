"""Compiled vs eager denoiser calls on CPU: compile time, per-step time and the difference.

One process, one thread: a world-of-one HybridDenoiser runs ``--steps`` serial steps of the tiny
random-init SDXL-shaped U-Net and SD3-shaped MMDiT (hybridiff_rt.testing) per setting, twice: the
first run includes compilation / capture, the second is timed. Settings: eager; compile="default"
with inductor; compile="default" with aot_eager (tracing only); cuda_graphs="on" with the CPU
stand-in of graph replay (engine/graphs.py: it recomputes on replay, so it measures the wrapper's
overhead, not a GPU graph's gain).

Per row: first-run seconds, the compiled callable's compile seconds (first call of its layout,
from RunReport.extra["compile"]), the second run's median step ms and compute ms, and the largest
absolute difference from eager over all steps. Inductor's FX-graph cache (on disk) makes a
repeated run compile faster; the first run on a machine is the cold figure.

    python bench/compile_cpu.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results

SETTINGS = [("eager", {}), ("inductor", {"compile": "default"}),
            ("aot_eager", {"compile": "default", "compile_backend": "aot_eager"}),
            ("graphs (CPU stand-in)", {"cuda_graphs": "on"})]


def inputs(family: str, seed: int, steps: int) -> list[dict]:
    """Per step: latent, timestep tensor and both branches' conditioning for the tiny models."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def branch():
        if family == "sdxl":
            return {"encoder_hidden_states": torch.randn(1, 8, 64, generator=g),
                    "added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                          "time_ids": torch.randn(1, 6, generator=g)}}
        return {"encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
                "pooled_projections": torch.randn(1, 32, generator=g)}
    channels = 4 if family == "sdxl" else 16
    return [{"sample": torch.randn(1, channels, 16, 16, generator=g),
             "timestep": torch.tensor(900.0 - 50 * i) if family == "sdxl"
             else torch.tensor([900.0 - 50 * i]), "cond": branch(), "uncond": branch()}
            for i in range(steps)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    import hybridiff_rt as hr
    from hybridiff_rt import testing
    from hybridiff_rt.engine import graphs

    torch.set_num_threads(1)
    graphs.emulate_on_cpu(True)
    rows = []
    for family in args.models:
        pipe = testing.build(family, seed=0)
        model = pipe.unet if family == "sdxl" else pipe.transformer
        steps = inputs(family, 1, args.steps)
        eager = None
        for label, fields in SETTINGS:
            den = hr.HybridDenoiser(model, hr.HybridConfig(k=0, **fields))
            walls = []
            for _ in range(2):
                started = time.perf_counter()
                out = [den(s["sample"], s["timestep"], s["cond"], s["uncond"], 5.0, step=i,
                           num_steps=len(steps)) for i, s in enumerate(steps)]
                walls.append(time.perf_counter() - started)
            report = den.report
            eager = out if eager is None else eager
            call = report.extra.get("compile", {}).get("calls", {}).get("denoiser", {})
            rows.append({"model": family, "setting": label, "first_run_s": walls[0],
                         "compile_s": call.get("compile_s"), "state": call.get("state", "eager"),
                         "step_ms": statistics.median(report.step_ms),
                         "compute_ms": statistics.median(report.compute_ms),
                         "max_abs_diff": max(float((a - b).abs().max())
                                             for a, b in zip(out, eager))})
            print(rows[-1], flush=True)
    columns = [("model", "model"), ("setting", "setting"), ("state", "state"),
               ("first_run_s", "first run s"), ("compile_s", "compile s"),
               ("step_ms", "ms / step"), ("compute_ms", "compute ms / step"),
               ("max_abs_diff", "max abs diff vs eager")]
    write_results("compile_cpu", rows, columns, meta={"steps": args.steps, "threads": 1},
                  out_dir=args.out,
                  notes=[("World of one, two batch-1 denoiser calls per step (no joint batch). "
                          "compile s: first call of the layout (tracing, code generation, "
                          "call).")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
