"""``hybridiff-rt demo``: the bundled end-to-end run, on CPUs by default, nothing downloaded.

For each bundled model (a tiny SDXL-style U-Net and a tiny SD3-style MMDiT trained on handwritten
digits) it generates the ten prompts "a handwritten digit 0..9", ``--per-prompt`` images each
(default 4, so 40 images in one pipeline call), twice with the same seeds:
  1. serial: one process (one CPU thread) running the plain pipeline through the world-size-1
     wrapper, which also records the discrepancy M_i of every step;
  2. hybrid: two processes (one thread each) under hr.parallelize with the model's preset,
     rescaled to the step count: CBP, stale-activation pipelining between tau1 and tau2, CBP.
It writes a PNG grid (serial and hybrid rows per model), a PNG plot of M_i per step with tau1 and
tau2 marked, demo.json and demo.md, and prints the table: wall times, speed-up, PSNR and SSIM of
hybrid vs serial images, and the digit classifier's accuracy on both sets.

``--random-init`` runs the same comparison on a small random-init SDXL-shaped pipeline instead
(no quality metrics: random weights draw no digits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("unet", "sd3")
PRESET_OF = {"unet": "sdxl", "sd3": "sd3", "random-sdxl": "sdxl"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS),
                        help="bundled models to run (default: both)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; image j uses seed+j")
    parser.add_argument("--per-prompt", type=int, default=4,
                        help="images per prompt (default 4: 40 images per model in one call)")
    parser.add_argument("--k", type=int, default=None, help="pipelined steps (default: preset)")
    parser.add_argument("--guidance", choices=["off", "reuse"], default="off",
                        help="guidance during pipelined steps (default off, the paper's)")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--random-init", action="store_true",
                        help="use a small random-init SDXL-shaped pipeline instead")


def _load(model: str):
    if model == "random-sdxl":
        from ..testing import sdxl_pipeline

        pipe = sdxl_pipeline(seed=0, size="small")
        prompts = ("a watercolor lighthouse at dusk", "a red bicycle in the rain")
        return pipe, prompts, dict(height=64, width=64, guidance_scale=5.0)
    from .bundled import DEFAULTS, PROMPTS, load_pipeline

    call = {k: v for k, v in DEFAULTS[model].items() if k != "num_inference_steps"}
    return load_pipeline(model), PROMPTS, call


def rank_main(rank: int, mode: str, model: str, steps: int, seed: int, k: int | None,
              guidance: str, per_prompt: int) -> dict[str, Any]:
    """One demo run on this rank; returns images (uint8 NHWC), wall seconds and the report."""
    import torch

    import hybridiff_rt as hr

    pipe, prompts, call = _load(model)
    if mode == "serial":
        cfg = hr.HybridConfig(k=0)
    else:
        cfg = hr.HybridConfig.preset(PRESET_OF[model], num_steps=steps, pipeline_guidance=guidance)
        if k is not None:
            cfg = cfg.replace(k=k)
        hr.init_distributed()
    runner = hr.parallelize(pipe, cfg)

    def generate(num_steps: int):
        batch = [p for p in prompts for _ in range(per_prompt)]
        generators = [torch.Generator().manual_seed(seed + j) for j in range(len(batch))]
        return runner(prompt=batch, num_inference_steps=num_steps, generator=generators,
                      output_type="np", **call).images

    # warm-up out of the timed run: first-call allocations and, for the hybrid run, the one-off
    # measurement of the stage costs (cached per model, shape and device)
    generate(steps if mode != "serial" and cfg.k > 0 else 2)
    pipe.set_progress_bar_config(disable=rank != 0, desc=f"{model} {mode}", leave=False)
    started = time.perf_counter()
    images = generate(steps)
    seconds = time.perf_counter() - started
    return {"images": (np.clip(images, 0, 1) * 255).round().astype(np.uint8),
            "seconds": seconds, "report": hr.last_report(runner).to_dict()}


def run_demo(args: argparse.Namespace) -> int:
    from ..testing import all_ok, run_ranks
    from .extras import require

    require("demo", "hybridiff-rt demo")  # before minutes of computing, not after

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = ["random-sdxl"] if args.random_init else list(args.models)
    results: dict[str, dict[str, Any]] = {}
    for number, model in enumerate(models, 1):
        runs = {}
        for mode, world in (("serial", 1), ("hybrid", 2)):
            print(f"[{number}/{len(models)}] {model}: {mode} run on {world} process"
                  f"{'es' if world > 1 else ''} x 1 CPU thread, {args.steps} steps ...", flush=True)
            outcomes = run_ranks(rank_main, mode, model, args.steps, args.seed, args.k,
                                 args.guidance, args.per_prompt, world_size=world,
                                 timeout_s=1800)
            ranks = all_ok(outcomes, world)
            if world > 1 and not np.array_equal(ranks[0]["images"], ranks[1]["images"]):
                raise RuntimeError(f"{model}: the two ranks produced different images")
            runs[mode] = ranks[0]
        results[model] = _summarise(model, runs, args.per_prompt)
    _write_outputs(out, models, results)
    table = _table(models, results)
    print(table)
    print(f"wrote {out / 'grid.png'}, {out / 'discrepancy.png'}, {out / 'demo.json'}, "
          f"{out / 'demo.md'}")
    return 0


def _summarise(model: str, runs: dict[str, dict[str, Any]], per_prompt: int) -> dict[str, Any]:
    serial, hybrid = runs["serial"], runs["hybrid"]
    summary = {"per_prompt": per_prompt, "serial_s": serial["seconds"], "hybrid_s": hybrid["seconds"],
               "speedup": serial["seconds"] / hybrid["seconds"],
               "tau1": hybrid["report"]["tau1"], "tau2": hybrid["report"]["tau2"],
               "modes": hybrid["report"]["modes"], "serial_rel_mae": serial["report"]["rel_mae"],
               "hybrid_rel_mae": hybrid["report"]["rel_mae"],
               "images": {"serial": serial["images"], "hybrid": hybrid["images"]},
               "identical": bool(np.array_equal(serial["images"], hybrid["images"]))}
    pipeline = hybrid["report"]["extra"].get("pipeline")
    if pipeline:
        summary["stage_cut"] = pipeline["plan"]["cuts"]
    from .quality import compare, psnr, ssim

    if model == "random-sdxl":  # random weights draw no digits: paired metrics only
        per_pair = psnr(serial["images"], hybrid["images"], reduction="none")
        finite = per_pair[per_pair.isfinite()]
        summary["quality"] = {"psnr_db_finite_mean": float(finite.mean()) if finite.numel()
                              else None, "ssim": ssim(serial["images"], hybrid["images"])}
    else:
        labels = [digit for digit in range(10) for _ in range(per_prompt)]
        summary["quality"] = compare(serial["images"], hybrid["images"], labels=labels)
    return summary


def _table(models: list[str], results: dict[str, dict[str, Any]]) -> str:
    header = ("| model | serial s | hybrid s | speed-up | tau1 | tau2 | PSNR dB | SSIM | "
              "accuracy serial | accuracy hybrid |")
    lines = [header, "|" + "---|" * 10]
    for model in models:
        r = results[model]
        q = r["quality"]
        psnr = "identical" if q["psnr_db_finite_mean"] is None else f"{q['psnr_db_finite_mean']:.2f}"
        ssim = "-" if q.get("ssim") is None else f"{q['ssim']:.4f}"
        acc_a = "-" if "accuracy_a" not in q else f"{q['accuracy_a']:.2f}"
        acc_b = "-" if "accuracy_b" not in q else f"{q['accuracy_b']:.2f}"
        lines.append(f"| {model} | {r['serial_s']:.2f} | {r['hybrid_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['tau1']} | {r['tau2']} | {psnr} | {ssim} | "
                     f"{acc_a} | {acc_b} |")
    return "\n".join(lines)


def _write_outputs(out: Path, models: list[str], results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{m} {mode}", results[m]["images"][mode][::results[m]["per_prompt"]])
            for m in models for mode in ("serial", "hybrid")]  # first image of each prompt
    columns = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns * 0.9 + 1.2, len(rows) * 1.0),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                img = images[c]
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray",
                          vmin=0, vmax=255)
        axes[r][0].set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):  # one panel per model: their scales differ 10x
        r = results[model]
        m = [np.nan if v is None else v for v in r["serial_rel_mae"]]
        ax.plot(range(len(m)), m, color="C0", label="M_i (serial run)")
        if r["tau1"] is not None:
            ax.axvline(r["tau1"], color="C1", linestyle="--", linewidth=1, label=f"tau1 = {r['tau1']}")
        if r["tau2"] is not None:
            ax.axvline(r["tau2"], color="C2", linestyle=":", linewidth=1.2,
                       label=f"tau2 = {r['tau2']}")
            ax.axvspan(r["tau1"] + 0.5, r["tau2"] + 0.5, color="C1", alpha=0.15,
                       label="pipelined steps")
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("step i")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("M_i = mean|eps_c - eps_u| / mean|eps_u|", fontsize=8)
    fig.suptitle("CFG branch discrepancy per step and the switch points of the hybrid run",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "discrepancy.png", dpi=110)
    plt.close(fig)

    serialisable = {m: {k: v for k, v in r.items() if k != "images"} for m, r in results.items()}
    (out / "demo.json").write_text(json.dumps(serialisable, indent=2, default=str) + "\n")
    (out / "demo.md").write_text(_table(models, results) + "\n")
