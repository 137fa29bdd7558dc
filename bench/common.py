"""Shared bits of the benchmarks.

Reporting, for every script: machine description, commit, command line, medians, CUDA-event
timing, and writing JSON + markdown results. Every result row names the machine, the command and
the commit, as the project's reporting rules ask. Results go to bench/results/<name>.json and
bench/results/<name>.md unless --out says otherwise.

CPU pipeline runs, for cbp_cpu.py and hybrid_cpu.py: the shared options (:func:`parse_args`) and
one mode's run on one or two local processes (:func:`run_mode`, which runs :func:`rank_main` on
each rank).

Only the standard library is imported here at module level (the GPU machine has no diffusers);
torch and hybridiff_rt are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # hybridiff_rt from this checkout

# ------------------------------------------------------------------------------------------------
# reporting


def _device_name() -> tuple[str, int]:
    """(GPU name, GPU count) when torch sees a GPU, else (CPU model, 0)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), torch.cuda.device_count()
    except Exception:
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model, 0


def machine() -> str:
    """E.g. "CPU: AMD EPYC 7B13, 2 cores" or "GPU: NVIDIA H200 x1"."""
    name, gpus = _device_name()
    return f"GPU: {name} x{gpus}" if gpus else f"CPU: {name}, {os.cpu_count()} cores"


def machine_detail() -> str:
    """Device, host and software versions, " | "-separated, device first, e.g.
    "NVIDIA H200 | host | torch 2.11.0 | CUDA 12.8 | triton 3.6.0" (triton left out when it
    does not import)."""
    import torch

    parts = [_device_name()[0], platform.node(), f"torch {torch.__version__}",
             f"CUDA {torch.version.cuda}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception:
        pass
    return " | ".join(parts)


def commit() -> str:
    """Short git commit of the checkout, with "+dirty" when tracked files differ from it;
    "unknown" without git or a repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command() -> str:
    """This run's command line, e.g. "python bench/cbp_cpu.py --steps 10" (the script relative
    to the repository root when it lies inside it)."""
    argv = list(sys.argv)
    if argv and argv[0]:
        script = Path(argv[0]).resolve()
        if script.is_relative_to(ROOT):
            argv[0] = str(script.relative_to(ROOT))
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def cuda_event_ms(fn: Callable[[], Any], reps: int, warmup: int = 0,
                  before: Callable[[], Any] | None = None) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``, timed with CUDA events on the current
    stream after ``warmup`` untimed calls and a synchronize; ``before()`` (e.g. an L2 flush) is
    queued ahead of each timed call, outside its events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def save_results(name: str, data: dict[str, Any], markdown: str,
                 out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``data`` to <out_dir>/<name>.json and ``markdown`` to <out_dir>/<name>.md (out_dir
    defaults to bench/results), print the markdown and where both went."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def write_results(name: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]],
                  meta: dict[str, Any], out_dir: str | os.PathLike | None = None,
                  notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``rows`` as <name>.json (with ``meta``) and <name>.md (a table of ``columns``), and
    print the table and where both went.

    Args:
        columns: (key, header) pairs in table order; floats are printed with 3 significant
            decimals.
    """
    stamp = {"machine": machine(), "command": command(), "commit": commit()}
    rows = [{**r, **stamp} for r in rows]
    keys = [k for k, _ in columns] + ["machine", "command", "commit"]
    headers = [h for _, h in columns] + ["machine", "command", "commit"]
    lines = [f"# {name}", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return save_results(name, {"meta": {**meta, **stamp}, "rows": rows}, "\n".join(lines) + "\n",
                        out_dir)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------
# CPU pipeline runs (cbp_cpu.py, hybrid_cpu.py)

PROMPT = "a watercolor lighthouse at dusk"
NEGATIVE = "blurry, low quality"


def parse_args(doc: str, argv: list[str] | None) -> argparse.Namespace:
    """The options every CPU benchmark shares (models, sizes, steps, repeats, output folder);
    ``doc``'s first paragraph is the description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["sdxl", "sd3"], choices=["sdxl", "sd3"])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--side", type=int, default=128, help="image side in pixels (latent "
                        "side is half)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    return parser.parse_args(argv)


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
    from hybridiff_rt import testing

    pipe = testing.build(family, seed=0, size=size)
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


def run_mode(args: argparse.Namespace, family: str, label: str,
             cfg_fields: dict | None) -> list[dict]:
    """rank_main on one process (``cfg_fields`` None: the serial baseline) or two; per-rank
    results."""
    from hybridiff_rt.testing import all_ok, run_ranks

    world = 1 if cfg_fields is None else 2
    print(f"[{family}] {label}: {world} process{'es' if world > 1 else ''} x 1 thread ...",
          flush=True)
    return all_ok(run_ranks(rank_main, family, args.size, args.side, args.steps, args.repeats,
                            cfg_fields, world_size=world, timeout_s=3600), world)
