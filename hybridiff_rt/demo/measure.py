"""Measure the bundled models: guidance strength, discrepancy curve, CPU timings.

    python -m hybridiff_rt.demo.measure                       # both models, w = 1, 3, 5
    python -m hybridiff_rt.demo.measure --models unet --seeds 0 --scales 5 --steps 20

For each model and guidance scale w, it samples the ten :data:`PROMPTS` with several seeds using
the stock pipeline (serially, one process) and reports the share of images the bundled classifier
reads as the prompted digit. w = 1 means no guidance (the pipelines then run the cond branch
only). For w > 1 a forward hook on the denoiser splits each CFG-doubled batch into its uncond and
cond halves and records, per image and step, the discrepancy
``M_i = mean|eps_c - eps_u| / mean|eps_u|`` (docs/method.md; for SD3, velocities), and where
the runtime's switching rule (``SwitchSchedule`` with the model's preset) fires on the mean curve.
Results: a JSON file and sample grids in ``--out``, a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..config import HybridConfig
from ..schedule import SwitchSchedule
from .bundled import DEFAULTS, LABELS, PROMPTS, load_classifier, load_pipeline

#: The runtime preset each bundled model's switch points are read with (HybridConfig.preset).
PRESET_OF = {"unet": "sdxl", "sd3": "sd3"}


class DiscrepancyRecorder:
    """Context manager: record per-image M_i from every CFG-doubled call of ``pipe``'s denoiser.

    ``values`` is a list (one entry per denoiser call = per step) of float64 arrays ``[B]`` with
    ``mean|c - u| / mean|u|`` over each image's latent (C x H x W); the pipelines put the uncond
    half first. ``batch_values`` holds the same ratio over the whole batch's latent. Calls whose
    batch is not doubled (w <= 1) are not recorded.
    """

    def __init__(self, pipe, num_images: int):
        self.denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
        self.num_images = num_images
        self.values: list[np.ndarray] = []
        self.batch_values: list[float] = []
        self._handle = None

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if out.shape[0] != 2 * self.num_images:
            return
        u, c = out.detach().double().chunk(2)
        d = (c - u).abs().flatten(1).mean(1) / u.abs().flatten(1).mean(1)
        self.values.append(d.numpy())
        self.batch_values.append(float((c - u).abs().mean() / u.abs().mean()))

    def __enter__(self):
        self._handle = self.denoiser.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def switch_points(curve: list[float], preset: str) -> dict:
    """Where the runtime's switching rule fires on a measured discrepancy curve.

    Feeds ``curve`` (M_i per step) to :class:`~hybridiff_rt.SwitchSchedule` built from
    ``HybridConfig.preset(preset, num_steps=len(curve))``, the same rule and config a hybrid run
    of that many steps uses. Returns the config fields of the rule, ``tau1``, ``tau2`` and
    ``tau1_source`` ("detected" or "cap"; None when the run ends first).
    """
    cfg = HybridConfig.preset(preset, num_steps=len(curve))
    schedule = SwitchSchedule(cfg, len(curve))
    for i, m in enumerate(curve):
        schedule.observe(i, m)
    schedule.finish()
    return {"rule": {"preset": preset, "window": cfg.window, "slope_eps": cfg.slope_eps,
                     "k": cfg.k, "tau_cap": cfg.tau_cap},
            "tau1": schedule.tau1, "tau2": schedule.tau2, "tau1_source": schedule.tau1_source}


def describe_curve(m: list[float]) -> str:
    """One-sentence shape description of a discrepancy curve (from the numbers, no judgement)."""
    a = np.asarray(m)
    i_min = int(a.argmin())
    first, last, lo = a[0], a[-1], a[i_min]
    mid = a[len(a) // 4: 3 * len(a) // 4]
    return (f"starts at {first:.3f}, minimum {lo:.3f} at step {i_min}, ends at {last:.3f} "
            f"(max {a.max():.3f} at step {int(a.argmax())}); middle half spans "
            f"{mid.min():.3f}..{mid.max():.3f}; "
            + ("U-shaped (high-low-high)" if first > 1.2 * lo and last > 1.2 * lo and 0 < i_min < len(a) - 1
               else "monotone rising" if i_min == 0 and last > first else
               "monotone falling" if i_min == len(a) - 1 else "not clearly U-shaped"))


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """images ``[N, C, H, W]`` in [0, 1] -> one PNG grid (rows of ``nrow``)."""
    from PIL import Image

    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2), nrow * (w + 2), dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, k * (w + 2) + 1: k * (w + 2) + 1 + w] = x[i]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def run(models, seeds, scales, steps, out: Path, threads: int, timing: bool) -> dict:
    from .quality import classifier_accuracy

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    clf = load_classifier()
    labels = torch.tensor(LABELS)
    result: dict = {"seeds": list(seeds), "scales": list(scales), "steps": steps, "models": {}}
    for name in models:
        pipe = load_pipeline(name)
        kw = dict(DEFAULTS[name], num_inference_steps=steps)
        res = {"accuracy": {}, "defaults": DEFAULTS[name]}
        for w in scales:
            kw["guidance_scale"] = float(w)
            accs, per_image, batch_curves, grids = [], [], [], []
            for seed in seeds:
                gens = [torch.Generator().manual_seed(1000 * seed + d) for d in range(len(PROMPTS))]
                with DiscrepancyRecorder(pipe, len(PROMPTS)) as rec:
                    imgs = pipe(prompt=list(PROMPTS), generator=gens, output_type="pt", **kw).images
                accs.append(classifier_accuracy(imgs, labels, clf))
                grids.append(imgs)
                if rec.values:
                    per_image.append(np.stack(rec.values))  # [steps, 10]
                    batch_curves.append(rec.batch_values)
            res["accuracy"][str(w)] = {"mean": float(np.mean(accs)), "per_seed": accs,
                                       "n_images": len(seeds) * len(PROMPTS)}
            save_grid(torch.cat(grids), out / f"{name}_w{w}.png")
            if per_image:
                pi = np.concatenate(per_image, axis=1)  # [steps, seeds*10]
                curve = pi.mean(1).tolist()
                points = switch_points(curve, PRESET_OF[name])
                res.setdefault("discrepancy", {})[str(w)] = {
                    "mean_curve": curve, "std_over_images": pi.std(1).tolist(),
                    "per_prompt_curve": [pi[:, d::len(PROMPTS)].mean(1).tolist() for d in range(len(PROMPTS))],
                    "batch_curve_mean": np.mean(batch_curves, 0).tolist(),
                    "description": describe_curve(curve), **points}
        if timing:
            torch.set_num_threads(1)
            kw["guidance_scale"] = float(DEFAULTS[name]["guidance_scale"])
            gens = [torch.Generator().manual_seed(d) for d in range(len(PROMPTS))]
            pipe(prompt=list(PROMPTS), generator=gens, output_type="pt", **dict(kw, num_inference_steps=2))
            t0 = time.perf_counter()
            pipe(prompt=list(PROMPTS), generator=gens, output_type="pt", **kw)
            res["seconds_10_images_1_thread"] = time.perf_counter() - t0
            torch.set_num_threads(threads)
        result["models"][name] = res
    (out / "measurements.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def markdown(result: dict) -> str:
    lines = ["| model | " + " | ".join(f"acc w={w}" for w in result["scales"]) + " | 10 imgs, 1 thread |",
             "|---|" + "---|" * (len(result["scales"]) + 1)]
    for name, res in result["models"].items():
        accs = " | ".join(f"{res['accuracy'][str(w)]['mean']:.3f}" for w in result["scales"])
        t = res.get("seconds_10_images_1_thread")
        lines.append(f"| {name} | {accs} | {'' if t is None else f'{t:.1f} s'} |")
    for name, res in result["models"].items():
        for w, d in res.get("discrepancy", {}).items():
            c = d["mean_curve"]
            lines.append(f"\n{name}, w={w}: {d['description']}; the runtime's rule "
                         f"{d['rule']} gives tau1 {d['tau1']} ({d['tau1_source']}), "
                         f"tau2 {d['tau2']}")
            lines.append("M_i every 5th step: " + ", ".join(f"{i}:{c[i]:.3f}" for i in range(0, len(c), 5))
                         + f", {len(c) - 1}:{c[-1]:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="measure the bundled digit models")
    ap.add_argument("--models", nargs="+", default=["unet", "sd3"], choices=["unet", "sd3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scales", nargs="+", type=float, default=[1.0, 3.0, 5.0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("out/bundled_measure"))
    a = ap.parse_args(argv)
    res = run(a.models, a.seeds, a.scales, a.steps, a.out, a.threads, not a.no_timing)
    print(markdown(res))
    print(f"\n(wrote {a.out / 'measurements.json'} and sample grids)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
