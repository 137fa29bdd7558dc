"""Command line, start-up checks and output of examples/sdxl.py and examples/sd3.py.

Everything here runs before the model is loaded, so a wrong launch fails in seconds with a message
that says what to change: the world size (two ranks through torchrun, or --serial for the
one-device reference), a missing GPU (--device cuda), a checkpoint of another model family (read
from its model_index.json), a schedule that does not fit the step count.
Diffusers itself is imported by the scripts only after these checks pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

import hybridiff_rt as hr

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Family:
    """What one script runs: the diffusers pipeline and denoiser classes it expects."""

    name: str              # also the HybridConfig preset
    script: str            # examples/<name>.py
    pipeline_class: str    # model_index.json "_class_name" must start with this
    denoiser_attr: str     # "unet" | "transformer"
    denoiser_class: str    # diffusers class name of the denoiser
    example_model: str     # a hub id to suggest
    guidance: float        # default guidance scale (the paper's)


SDXL = Family("sdxl", "examples/sdxl.py", "StableDiffusionXL", "unet", "UNet2DConditionModel",
              "stabilityai/stable-diffusion-xl-base-1.0", 5.0)
SD3 = Family("sd3", "examples/sd3.py", "StableDiffusion3", "transformer",
             "SD3Transformer2DModel", "stabilityai/stable-diffusion-3-medium-diffusers", 7.0)
FAMILIES = (SDXL, SD3)


class ExampleError(SystemExit):
    """A launch or input problem; the message says what to change (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


@dataclasses.dataclass
class Run:
    """A checked launch: parsed arguments, this rank, device, dtype and HybridConfig."""

    family: Family
    args: argparse.Namespace
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    cfg: hr.HybridConfig
    out: Path
    load_kwargs: dict[str, Any]  # for Pipeline.from_pretrained(args.model, **load_kwargs)


def parse_args(family: Family, argv: list[str] | None) -> argparse.Namespace:
    """The command line shared by both scripts."""
    p = argparse.ArgumentParser(
        prog=family.script,
        description=f"Generate one image with a {family.name.upper()} checkpoint on two devices "
                    f"(torchrun --nproc_per_node=2 {family.script} ...), or the one-device "
                    f"reference (python {family.script} --serial ...).")
    p.add_argument("--model", default=family.example_model,
                   help="hub id or local diffusers folder (default: %(default)s)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=family.guidance)
    p.add_argument("--preset", default=family.name,
                   help="HybridConfig preset, rescaled to --steps (sdxl, sd3, sd3-paper)")
    p.add_argument("--k", type=int, default=None,
                   help="pipelined steps, overriding the preset (0 = condition-based "
                        "partitioning only)")
    p.add_argument("--out", default=None,
                   help="image path (default out/<family>-seed<seed>-<hybrid|serial>.png); "
                        "the run report goes next to it as .json")
    p.add_argument("--serial", action="store_true",
                   help="one-device reference run of the same seed (plain python, no torchrun)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="print the PSNR between two images and exit (no model needed)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--variant", default=None,
                   help="weights variant to download, e.g. fp16 (halves the download)")
    return p.parse_args(argv)


def prepare(family: Family, argv: list[str] | None = None) -> Run | float:
    """Parse and check the launch before any model work.

    Returns the PSNR in dB for ``--compare`` (after printing it), else a checked :class:`Run`.
    Raises ExampleError (a SystemExit with a message) on a wrong launch.
    """
    args = parse_args(family, argv)
    if args.compare:
        value = psnr(*args.compare)
        print(f"PSNR {args.compare[0]} vs {args.compare[1]}: {value:.2f} dB")
        return value
    device = resolve_device(args.device)
    info = hr.init_distributed(backend="gloo" if device.type == "cpu" else None)
    check_world_size(family, info.world_size, args.serial)
    if device.type == "cuda":
        device = info.device
        if info.rank == 0 and torch.cuda.device_count() < info.world_size:
            print(f"note: {info.world_size} ranks share {torch.cuda.device_count()} GPU(s); "
                  "the result is correct but expect no speed-up")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.float16 if device.type == "cuda" else torch.float32)
    cfg = make_config(args, device)
    index = check_checkpoint(family, args.model)
    out = Path(args.out) if args.out else Path(
        "out", f"{family.name}-seed{args.seed}-{'serial' if args.serial else 'hybrid'}.png")
    # components saved as absent ([null, null], e.g. SD3 without T5) must be passed as None
    load_kwargs = {name: None for name, entry in index.items()
                   if isinstance(entry, list) and entry and all(e is None for e in entry)}
    load_kwargs["torch_dtype"] = dtype
    if args.variant:
        load_kwargs["variant"] = args.variant
    return Run(family, args, info.rank, info.world_size, device, dtype, cfg, out, load_kwargs)


def resolve_device(choice: str) -> torch.device:
    """"auto": CUDA when present, else CPU; "cuda" without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ExampleError(
            "--device cuda was asked but this machine has no usable CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Install a "
            "CUDA build of torch / check the driver (nvidia-smi), or pass --device cpu.")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def check_world_size(family: Family, world_size: int, serial: bool) -> None:
    """An even number of ranks (2, 4, ...: one per device) for the hybrid run, one for --serial."""
    launch = f"torchrun --nproc_per_node=2 {family.script} ..."
    if serial and world_size != 1:
        raise ExampleError(f"--serial is the one-device reference: run it with plain python "
                           f"(python {family.script} --serial ...), not under torchrun with "
                           f"{world_size} ranks.")
    if not serial and (world_size < 2 or world_size % 2):
        how = "without torchrun (one process)" if world_size == 1 else f"with {world_size} ranks"
        raise ExampleError(f"the hybrid run needs an even number of ranks (2, 4, ...), one per "
                           f"device; this was started {how}. Launch it as `{launch}` (or with "
                           "--nproc_per_node=4 on four devices), or add --serial for the "
                           "one-device reference.")


def make_config(args: argparse.Namespace, device: torch.device) -> hr.HybridConfig:
    """The preset rescaled to --steps, --k applied; checked against the step count now."""
    overrides: dict[str, Any] = {} if args.k is None else {"k": args.k}
    if device.type == "cpu":
        overrides["transport"] = "torch"  # CUDA IPC is for GPU tensors
    try:
        cfg = hr.HybridConfig.preset(args.preset, num_steps=args.steps, **overrides)
        hr.SwitchSchedule(cfg, args.steps)  # refuses schedules that do not fit the steps
    except hr.ConfigError as exc:
        raise ExampleError(f"{exc} (from --preset {args.preset}, --steps {args.steps}"
                           f"{'' if args.k is None else f', --k {args.k}'})") from None
    return cfg


def read_model_index(model: str) -> dict[str, Any]:
    """model_index.json of a local folder or a hub id (only that small file is fetched)."""
    folder = Path(model)
    if folder.is_dir():
        path = folder / "model_index.json"
        if not path.is_file():
            raise ExampleError(f"{model} has no model_index.json: it is not a diffusers pipeline "
                               "folder (save one with pipe.save_pretrained(folder)).")
    elif os.path.exists(model) or model.startswith((".", "/", "~")):
        raise ExampleError(f"--model {model}: no such folder.")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "model_index.json"))
        except Exception as exc:
            raise ExampleError(
                f"{model!r} is not a local folder, and fetching its model_index.json from the "
                f"Hugging Face hub failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Check the path, or the id and "
                "the network (gated models need `huggingface-cli login`).") from None
    return json.loads(path.read_text())


def check_checkpoint(family: Family, model: str) -> dict[str, Any]:
    """The checkpoint's model_index.json; refuses a pipeline or denoiser not of ``family``."""
    index = read_model_index(model)
    name = index.get("_class_name", "?")
    entry = index.get(family.denoiser_attr) or [None, None]
    if name.startswith(family.pipeline_class) and entry[-1] == family.denoiser_class:
        return index
    other = next((f for f in FAMILIES if f is not family and name.startswith(f.pipeline_class)),
                 None)
    hint = f" Use {other.script} for it." if other else ""
    raise ExampleError(
        f"{model} is a {name} checkpoint (model_index.json), not of the {family.name.upper()} "
        "family: "
        f"{family.script} needs a {family.pipeline_class}* pipeline whose "
        f"{family.denoiser_attr} is a {family.denoiser_class} (e.g. {family.example_model})."
        + hint)


def check_denoiser(family: Family, pipe: Any) -> None:
    """After loading: the denoiser really is the class hybridiff_rt partitions for ``family``."""
    model = getattr(pipe, family.denoiser_attr, None)
    if type(model).__name__ != family.denoiser_class:
        raise ExampleError(f"the loaded pipeline's {family.denoiser_attr} is a "
                           f"{type(model).__name__}, not a {family.denoiser_class}.")


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the initial noise is the same on every device and every rank."""
    return torch.Generator("cpu").manual_seed(seed)


def finish(run: Run, image: Any, report: hr.RunReport, call_s: float) -> dict[str, Any]:
    """Rank 0 saves the image and the report (JSON next to it) and prints a summary.

    Returns ``{"image": path, "report": path, "summary": dict}``; paths are None on other ranks.
    """
    summary = report.to_dict()
    a = run.args
    summary["run"] = dict(model=a.model, prompt=a.prompt, negative_prompt=a.negative_prompt,
                          seed=a.seed, steps=a.steps, height=a.height, width=a.width,
                          guidance=a.guidance, device=str(run.device),
                          dtype=str(run.dtype).replace("torch.", ""), world_size=run.world_size,
                          serial=a.serial, call_s=call_s)
    if run.rank != 0:
        return {"image": None, "report": None, "summary": summary}
    run.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(run.out)
    report_path = run.out.with_suffix(".json")
    report_path.write_text(json.dumps(summary, indent=1))
    counts = ", ".join(f"{report.modes.count(m)} {m}" for m in ("cbp", "pipeline", "serial")
                       if m in report.modes)
    switch = (f"tau1={report.tau1} tau2={report.tau2}" if "serial" not in report.modes
              else "no switching (one device)")
    print(f"image:  {run.out}\nreport: {report_path}\n"
          f"{run.world_size} rank(s) on {run.device}: steps {counts}; {switch}; "
          f"denoiser {report.total_ms / 1e3:.2f} s, whole call {call_s:.2f} s")
    if not a.serial:
        print(f"reference: python {run.family.script} --serial --seed {a.seed} ... then "
              f"python {run.family.script} --compare {run.out} <serial image>")
    return {"image": run.out, "report": report_path, "summary": summary}


def timed_call(fn, **kwargs) -> tuple[Any, float]:
    """``fn(**kwargs)`` and its wall time in seconds."""
    started = time.perf_counter()
    result = fn(**kwargs)
    return result, time.perf_counter() - started


def psnr(a: str | Path, b: str | Path) -> float:
    """PSNR in dB between two 8-bit images of the same size (inf when identical)."""
    import numpy as np
    from PIL import Image

    x, y = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    if x.shape != y.shape:
        raise ExampleError(f"--compare: {a} is {x.shape[1]}x{x.shape[0]} but {b} is "
                           f"{y.shape[1]}x{y.shape[0]}; compare images of the same size.")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
