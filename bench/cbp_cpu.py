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

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, parse_args, run_mode, write_results  # noqa: E402


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
