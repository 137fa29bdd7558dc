"""Serial (one process, one thread) vs condition-based partitioning and hybrid runs (two
processes, one thread each) on small random-init PixArt-Sigma (batched CFG), Wan 2.1 and Wan 2.2
(two experts) text-to-video (two-call CFG) diffusers pipelines, CPU only.

For each pipeline: median wall time of a full pipeline call (latent output) in each mode, the
speed-up, and the ideal speed-up of CBP: for a batched pipeline the serial process's batch-2 /
batch-1 denoiser cost ratio; for a two-call pipeline the cost of its two batch-1 calls per step
over one (measured, so about 2). Also the fidelity of the CBP latents against the serial ones
(two-call pipelines: exactly equal, since the serial pipeline already calls once per branch), and
of the hybrid latents (HYBRID: a fixed schedule, tau1 = 8 and k = 5 pipelined steps, guidance
reused) as a PSNR over the serial latents' range. Wan 2.2 switches experts at step 2 of 20, so its
pipelined steps run the low-noise expert's stages.

    python bench/dit_cpu.py                     # 20 steps, 3 timed runs per mode
    python bench/dit_cpu.py --steps 8 --repeats 1 --models wan2.1   # quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_results  # noqa: E402
from hybrid_cpu import fidelity  # noqa: E402

MODELS = ("pixart-sigma", "wan2.1", "wan2.2")
#: the hybrid runs' schedule: slope_eps 0 never fires, so tau1 = tau_cap = 8 and steps 9..13 are
#: pipelined (random models give no meaningful discrepancy curve to detect a flat part in)
HYBRID = {"window": 1, "slope_eps": 0.0, "tau_cap": 8, "k": 5, "pipeline_guidance": "reuse"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    return parser.parse_args(argv)


def _call(runner, name: str, kwargs: dict, steps: int):
    import torch

    from hybridiff_rt.testing import DIT_INFO

    out = runner(num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **DIT_INFO[name].guidance_kwargs,
                 **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def call_costs_ms(pipe, name: str, kwargs: dict, repeats: int = 11) -> tuple[float, float]:
    """(serial step cost, one-branch cost) in ms of denoiser calls, timed alternately: batched
    pipelines: one batch-2 call vs one batch-1 call; two-call pipelines: the step's two batch-1
    calls vs one of them."""
    import inspect

    import torch

    from hybridiff_rt.engine.branch_layout import split_branch_kwargs
    from hybridiff_rt.testing import DIT_INFO

    model = pipe.transformer
    captured: list[dict] = []
    names = list(inspect.signature(model.forward).parameters)

    def grab(module, args, kw):
        if len(captured) < 2:
            captured.append(dict(zip(names, args), **kw))

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    _call(pipe, name, kwargs, 1)
    handle.remove()
    if DIT_INFO[name].guidance == "batched":
        full = captured[0]
        serial = [full]
        one = [split_branch_kwargs(full, full[names[0]].shape[0])[1]]
    else:
        serial, one = captured, captured[:1]
    times: dict[str, list[float]] = {"serial": [], "one": []}
    with torch.no_grad():
        for calls in (serial, one):
            for kw in calls:
                model(**kw)  # warm-up
        for _ in range(repeats):
            for label, calls in (("serial", serial), ("one", one)):
                start = time.perf_counter()
                for kw in calls:
                    model(**kw)
                times[label].append((time.perf_counter() - start) * 1e3)
    return median(times["serial"]), median(times["one"])


def rank_main(rank: int, name: str, size: str, steps: int, repeats: int,
              config: dict | None) -> dict:
    """One rank's run: ``config`` None is the plain pipeline (serial, one process), else the
    HybridConfig fields of a parallel run."""
    import hybridiff_rt as hr
    from hybridiff_rt.testing import build_dit

    pipe, kwargs = build_dit(name, seed=0, size=size)
    runner = pipe
    if config is not None:
        hr.init_distributed()
        runner = hr.parallelize(pipe, hr.HybridConfig(**config))
    # warm-up; a pipelined schedule needs the full length (tau_cap + k <= steps - 2), and its
    # first run also profiles the units and measures the link (cached for the timed runs)
    _call(runner, name, kwargs, steps if config and config.get("k") else 3)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = _call(runner, name, kwargs, steps)
        times.append(time.perf_counter() - start)
    result = {"times_s": times, "latents": latents.numpy()}
    if config is None:
        result["serial_ms"], result["one_ms"] = call_costs_ms(pipe, name, kwargs)
    else:
        result["modes"] = list(hr.last_report(runner).modes)
    return result


def main(argv: list[str] | None = None) -> int:
    from hybridiff_rt.testing import DIT_INFO, all_ok, run_ranks

    args = parse_args(argv)
    rows = []
    for name in args.models:
        print(f"[{name}] serial: 1 process x 1 thread ...", flush=True)
        serial = all_ok(run_ranks(rank_main, name, args.size, args.steps, args.repeats, None,
                                  world_size=1, timeout_s=3600), 1)[0]
        print(f"[{name}] cbp: 2 processes x 1 thread ...", flush=True)
        cbp = all_ok(run_ranks(rank_main, name, args.size, args.steps, args.repeats, {"k": 0},
                               world_size=2, timeout_s=3600), 2)
        print(f"[{name}] hybrid: 2 processes x 1 thread ...", flush=True)
        hybrid = all_ok(run_ranks(rank_main, name, args.size, args.steps, args.repeats, HYBRID,
                                  world_size=2, timeout_s=3600), 2)
        t_serial, t_cbp = median(serial["times_s"]), median(cbp[0]["times_s"])
        t_hybrid = median(hybrid[0]["times_s"])
        ideal = serial["serial_ms"] / serial["one_ms"]
        speedup = t_serial / t_cbp
        diff = np.abs(serial["latents"].astype(np.float64) - cbp[0]["latents"]).max()
        psnr, _ = fidelity(serial["latents"], hybrid[0]["latents"])
        pipelined = hybrid[0]["modes"].count("pipeline")
        identical = all(np.array_equal(run[0]["latents"], run[1]["latents"])
                        for run in (cbp, hybrid))
        rows.append({"model": name, "cfg": DIT_INFO[name].guidance, "steps": args.steps,
                     "latent": "x".join(str(d) for d in serial["latents"].shape[1:]),
                     "serial_s": t_serial, "cbp_s": t_cbp, "speedup": speedup,
                     "serial_step_ms": serial["serial_ms"], "branch_ms": serial["one_ms"],
                     "ideal": ideal, "of_ideal": speedup / ideal, "max_abs_diff": float(diff),
                     "hybrid_s": t_hybrid, "hybrid_speedup": t_serial / t_hybrid,
                     "pipelined_steps": pipelined,
                     "hybrid_psnr_db": psnr, "ranks_identical": identical})
        print(f"[{name}] serial {t_serial:.2f} s, cbp {t_cbp:.2f} s, speed-up {speedup:.2f}x, "
              f"ideal {ideal:.2f}x ({100 * speedup / ideal:.0f}% of ideal); hybrid "
              f"{t_hybrid:.2f} s ({t_serial / t_hybrid:.2f}x, "
              f"{pipelined} pipelined steps, {psnr:.1f} dB)",
              flush=True)
    columns = [("model", "model"), ("cfg", "CFG calls"), ("steps", "steps"),
               ("latent", "latent"), ("serial_s", "serial s"), ("cbp_s", "CBP s"),
               ("speedup", "speed-up"), ("serial_step_ms", "denoiser ms per serial step"),
               ("branch_ms", "denoiser ms per branch"), ("ideal", "ideal"),
               ("of_ideal", "of ideal"), ("max_abs_diff", "CBP max abs diff vs serial"),
               ("hybrid_s", "hybrid s"), ("hybrid_speedup", "hybrid speed-up"),
               ("pipelined_steps", "pipelined steps"), ("hybrid_psnr_db", "hybrid PSNR dB"),
               ("ranks_identical", "ranks identical")]
    write_results(
        "dit_cpu", rows, columns,
        meta={"size": args.size, "repeats": args.repeats, "threads_per_rank": 1},
        out_dir=args.out,
        notes=[("Serial: the plain diffusers pipeline in one process with one thread (PixArt-Sigma:"
                " one batch-2 denoiser call per step; Wan: two batch-1 calls per step). CBP: "
                "hr.parallelize with HybridConfig(k=0), two processes with one thread each, gloo "
                "(Wan: the two-call protocol). Medians of full pipeline calls with precomputed "
                "prompt embeddings and latent output."),
               (f"Hybrid: HybridConfig({', '.join(f'{k}={v!r}' for k, v in HYBRID.items())}): "
                "steps 0..8 CBP, 9..13 pipelined (step 9 the fill step), then CBP; hybrid PSNR: "
                "final latents against the serial ones, over the serial latents' range."),
               ("ideal = denoiser time of a serial step / of one branch, measured in the serial "
                "process (batched: batch-2 / batch-1 call; two-call: two calls / one call); "
                "of ideal = speed-up / ideal."),
               ("Timings on a shared 2-core machine vary between runs (for the 1-s PixArt calls "
                "by up to 2x); the diff, PSNR and identity columns do not vary.")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
