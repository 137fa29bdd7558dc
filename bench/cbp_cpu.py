"""Serial (one process, one thread) vs condition-based partitioning (two processes, one thread
each) on small random-init SDXL-shaped and SD3-shaped diffusers pipelines, CPU only.

For each model: median wall time of a full pipeline call (50 steps, latent output) in both modes,
the speed-up, the ideal speed-up (the serial process's batch-2 / batch-1 denoiser cost ratio: what
splitting the CFG batch can buy at best), the achieved fraction of that ideal, and the fidelity of
the CBP latents against the serial ones.

    python bench/cbp_cpu.py                 # 50 steps, 3 timed runs per mode
    python bench/cbp_cpu.py --steps 10 --repeats 1 --models sdxl   # quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import median, write_results  # noqa: E402

PROMPT = "a watercolor lighthouse at dusk"
NEGATIVE = "blurry, low quality"


def pipeline_call(runner, steps: int, side: int, seed: int = 0):
    import torch

    return runner(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                  height=side, width=side, guidance_scale=5.0, output_type="latent",
                  generator=torch.Generator().manual_seed(seed)).images


def denoiser_call_ms(pipe, side: int, repeats: int = 11) -> tuple[float, float]:
    """Median ms of one denoiser call at the CFG batch (2) and at one branch (1), timed
    alternately (b2, b1, b2, b1, ...) so that drifts of the machine's speed hit both alike."""
    import inspect

    import torch

    from hybridiff_rt.engine.batch import split_cfg_batch

    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("args", args)
        captured.setdefault("kwargs", kwargs)

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    pipeline_call(pipe, 1, side)
    handle.remove()
    names = list(inspect.signature(model.forward).parameters)
    kw = dict(zip(names, captured["args"]), **captured["kwargs"])
    full = kw[names[0]].shape[0]
    inputs = {"b2": kw, "b1": {k: split_cfg_batch(v, full)[1] for k, v in kw.items()}}
    times: dict[str, list[float]] = {"b2": [], "b1": []}
    with torch.no_grad():
        for label in inputs:
            model(**inputs[label])  # warm-up
        for _ in range(repeats):
            for label in ("b2", "b1"):
                start = time.perf_counter()
                model(**inputs[label])
                times[label].append((time.perf_counter() - start) * 1e3)
    return median(times["b2"]), median(times["b1"])


def make_config(fields: dict, steps: int):
    """HybridConfig from bench fields: {"preset": name, **overrides} or plain HybridConfig
    fields."""
    import hybridiff_rt as hr

    fields = dict(fields)
    preset = fields.pop("preset", None)
    if preset:
        return hr.HybridConfig.preset(preset, num_steps=steps, **fields)
    return hr.HybridConfig(**fields)


def rank_main(rank: int, family: str, size: str, side: int, steps: int, repeats: int,
              cfg_fields: dict | None) -> dict:
    """Time ``repeats`` pipeline calls on this rank: the plain pipeline when ``cfg_fields`` is
    None (serial baseline, also measures batch-2 and batch-1 denoiser calls), else
    hr.parallelize with that config."""
    import hybridiff_rt as hr
    from hybridiff_rt import tiny

    pipe = tiny.build(family, seed=0, size=size)
    runner = pipe
    warmup_steps = 3
    if cfg_fields is not None:
        hr.init_distributed()
        cfg = make_config(cfg_fields, steps)
        runner = hr.parallelize(pipe, cfg)
        if cfg.k > 0:
            warmup_steps = steps  # also measures the stage costs once (cached)
    pipeline_call(runner, warmup_steps, side)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        latents = pipeline_call(runner, steps, side)
        times.append(time.perf_counter() - start)
    result = {"times_s": times, "latents": latents.numpy()}
    if cfg_fields is None:
        result["b2_ms"], result["b1_ms"] = denoiser_call_ms(pipe, side)
    else:
        result["report"] = hr.last_report(runner).to_dict()
    return result


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options every CPU benchmark shares (models, sizes, steps, repeats, output folder)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--side", type=int, default=128, help="image side in pixels (latent "
                        "side is half)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    return parser.parse_args(argv)


def run_mode(args: argparse.Namespace, family: str, label: str,
             cfg_fields: dict | None) -> list[dict]:
    """rank_main on one process (``cfg_fields`` None: the serial baseline) or two; per-rank
    results."""
    from hybridiff_rt.launch import all_ok, run_ranks

    world = 1 if cfg_fields is None else 2
    print(f"[{family}] {label}: {world} process{'es' if world > 1 else ''} x 1 thread ...",
          flush=True)
    return all_ok(run_ranks(rank_main, family, args.size, args.side, args.steps, args.repeats,
                            cfg_fields, world_size=world, timeout_s=3600), world)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    rows = []
    for family in args.models:
        serial = run_mode(args, family, "serial", None)[0]
        cbp = run_mode(args, family, "cbp", {"k": 0})
        t_serial, t_cbp = median(serial["times_s"]), median(cbp[0]["times_s"])
        ideal = serial["b2_ms"] / serial["b1_ms"]
        speedup = t_serial / t_cbp
        diff = np.abs(serial["latents"].astype(np.float64) - cbp[0]["latents"]).max()
        rows.append(dict(model=family, steps=args.steps, latent=f"{args.side // 2}x{args.side // 2}",
                         serial_s=t_serial, cbp_s=t_cbp, speedup=speedup,
                         b2_ms=serial["b2_ms"], b1_ms=serial["b1_ms"], ideal=ideal,
                         of_ideal=speedup / ideal, max_abs_diff=float(diff),
                         ranks_identical=bool(np.array_equal(cbp[0]["latents"],
                                                             cbp[1]["latents"]))))
        print(f"[{family}] serial {t_serial:.2f} s, cbp {t_cbp:.2f} s, speed-up {speedup:.2f}x, "
              f"ideal {ideal:.2f}x ({100 * speedup / ideal:.0f}% of ideal)", flush=True)
    columns = [("model", "model"), ("steps", "steps"), ("latent", "latent"),
               ("serial_s", "serial s"), ("cbp_s", "CBP s"), ("speedup", "speed-up"),
               ("b2_ms", "denoiser b2 ms"), ("b1_ms", "denoiser b1 ms"),
               ("ideal", "ideal (b2/b1)"), ("of_ideal", "of ideal"),
               ("max_abs_diff", "max abs diff vs serial"), ("ranks_identical", "ranks identical")]
    write_results(
        "cbp_cpu", rows, columns,
        meta=dict(size=args.size, side=args.side, repeats=args.repeats, threads_per_rank=1),
        out_dir=args.out,
        notes=["Serial: plain diffusers pipeline, CFG batch 2, one process with one thread. "
               "CBP: hr.parallelize with HybridConfig(k=0), two processes with one thread each, "
               "gloo. Times are medians of full pipeline calls (text encoding included, VAE "
               "decode excluded: output_type='latent').",
               "ideal = batch-2 / batch-1 denoiser call time in the serial process; of ideal = "
               "speed-up / ideal."])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
