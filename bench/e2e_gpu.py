"""End-to-end GPU latency: eager diffusers vs hybridiff_rt (compiled / graph-replayed) serial, CBP
and hybrid, two processes under MPS at 50% each on one GPU.

Per model (SDXL-shaped U-Net, SD3-medium-shaped MMDiT; published configs, random init, fp16,
1024x1024, 50 steps, one GPU), the same hand-written CFG sampling loop (bench/e2e_gpu_worker.py)
runs as:

  (a) eager diffusers serial        1 process, whole GPU: ``model(**[uncond; cond])`` at batch 2
  (b) hybridiff_rt serial           1 process, whole GPU: HybridDenoiser, world of one, batch 2,
                                    with --compile / --graphs (default: explicit CUDA graphs)
  (b50) hybridiff_rt serial         1 MPS client at 50% of the SMs: the baseline of (c) and (d)
  (c) CBP                           2 MPS clients at 50% each (k=0)
  (d) hybrid                        2 MPS clients at 50% each (the model's paper preset)

MPS (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50 per client) makes one GPU two half-GPUs. The script
starts a private MPS control daemon (its own pipe and log folders under a temporary directory;
no GPU setting is changed), runs (b50), (c), (d) as its clients and stops it (``quit``) even on
failure. Where MPS cannot start, those rows run without it and a note says so. The parent never
creates a CUDA context; every run is a child process.

Each run is preceded by an untimed warm-up run (compilation, graph capture, stage profiling);
the hybrid run by two: it re-plans its stage cut from the stage times the first one measured
(``HybridConfig(rebalance=True)``), and the second compiles / captures the stages of that cut.
Reported per row: total seconds of the timed run, per-step median ms, speed-up (b vs a; c, d vs
b50), per-step speed-up of (b) over (a), the ideal speed-up and achieved/ideal, bytes sent per
image (both ranks), the final latent's PSNR against (b50), tau1/tau2.

Ideal speed-up of (c)/(d), from measured times of the 50% baseline: T2 = the batch-2 denoiser
call of (b50) (median compute_ms of its RunReport), T1 = one batch-1 call (the batch-1 variant of
(b50)). A CBP step and the pipeline's fill step cost T1; a later pipelined step costs the
partition's bottleneck stage (the RunReport's measured unit costs, rescaled to T1).
ideal = steps x T2 / sum(step costs). "in situ" uses instead, per step, the larger of the two
ranks' own compute_ms in the run (what concurrency left of the ideal); achieved below it is
transfer and host overhead.

    python bench/e2e_gpu.py                      # both models, 50 steps (about 4-6 minutes)
    python bench/e2e_gpu.py --quick              # SDXL, 20 steps
    python bench/e2e_gpu.py --profile            # + one torch profiler trace of a hybrid run
    python bench/e2e_gpu.py --dry-run            # tiny models on CPU: checks the plumbing

Writes e2e_gpu.json and e2e_gpu.md (bench/results/ or --out), naming GPU, torch, CUDA, commit.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_detail, write_results
from e2e_gpu_worker import parallel_worker, psnr, serial_worker

#: the hybrid variant re-plans its stage cut from the stage times its first warm-up run measured
#: (HybridConfig(rebalance=True)): compiled or graph-replayed stages do not keep the eager cost
#: ratios the cut is first planned from
VARIANTS = [("cbp", {"k": 0}), ("hybrid", {"preset": "auto", "rebalance": True})]
MPS_PERCENT = 50


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["sdxl", "sd3"], default=None,
                        help="default: both (--quick: sdxl)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (--quick 20, "
                        "--dry-run 8)")
    parser.add_argument("--side", type=int, default=None, help="image side in pixels "
                        "(default 1024; --dry-run 32)")
    parser.add_argument("--compile", default="off",
                        choices=["off", "default", "reduce-overhead", "max-autotune"],
                        help="HybridConfig.compile of the hybridiff_rt rows")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--graphs", default=None, choices=["auto", "on", "off"],
                        help="HybridConfig.cuda_graphs of the hybridiff_rt rows (default: on, "
                        "explicit CUDA-graph capture; auto with --compile reduce-overhead, "
                        "whose graphs are torch's)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                        help="model and latent dtype on the GPU (--dry-run: float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="SDXL only, 20 steps")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models on CPU, no MPS: checks the script end to end")
    parser.add_argument("--profile", action="store_true",
                        help="rank 0 writes a torch profiler trace of one hybrid run")
    parser.add_argument("--no-mps", action="store_true", help="do not start an MPS daemon")
    parser.add_argument("--timeout", type=float, default=540.0,
                        help="seconds for the whole benchmark (each phase gets what is left)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.models is None:
        args.models = ["sdxl"] if args.quick else ["sdxl", "sd3"]
    if args.steps is None:
        args.steps = 8 if args.dry_run else 20 if args.quick else 50
    if args.side is None:
        args.side = 32 if args.dry_run else 1024
    if args.graphs is None:
        args.graphs = "auto" if args.compile == "reduce-overhead" else "on"
    if args.steps < 4:
        parser.error("--steps must be at least 4 (a hybrid schedule needs CBP, pipelined and "
                     "CBP steps)")
    return args


# ------------------------------------------------------------------------------------- MPS
class Mps:
    """A private MPS control daemon: ``start()`` -> (env for the clients, None) or (None,
    reason); ``stop()`` sends ``quit``. The pipe and log folders live in a temporary directory,
    so a daemon of another user or job is never touched."""

    def __init__(self) -> None:
        self.exe = shutil.which("nvidia-cuda-mps-control")
        self.dir = Path(tempfile.mkdtemp(prefix="hybridiff_mps_"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.dir / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.dir / "log")}
        self.running = False

    def start(self) -> tuple[dict | None, str | None]:
        if self.exe is None:
            return None, "nvidia-cuda-mps-control not found"
        for sub in ("pipe", "log"):
            (self.dir / sub).mkdir(exist_ok=True)
        try:
            proc = subprocess.run([self.exe, "-d"], env={**os.environ, **self.env},
                                  capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"nvidia-cuda-mps-control -d failed: {exc}"
        if proc.returncode != 0:
            return None, (f"nvidia-cuda-mps-control -d exited {proc.returncode}: "
                          f"{(proc.stderr or proc.stdout).strip()[:200]}")
        self.running = True
        return {**self.env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(MPS_PERCENT)}, None

    def clients_seen(self) -> int:
        """How many client connections the daemon logged (evidence the runs were clients)."""
        try:
            return (self.dir / "log" / "control.log").read_text().count("New client")
        except OSError:
            return 0

    def stop(self) -> None:
        if self.running:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([self.exe], input="quit\n", env={**os.environ, **self.env},
                               capture_output=True, text=True, timeout=30, check=False)
            self.running = False


@contextlib.contextmanager
def _environment(extra: dict | None):
    """``extra`` in os.environ for the block (spawned children inherit it at start)."""
    saved = {k: os.environ.get(k) for k in (extra or {})}
    os.environ.update(extra or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -------------------------------------------------------------------------------- phases
def run_phase(name: str, fn, args_: tuple, world: int, env: dict | None, deadline: float,
              errors: list[str]) -> list[Any] | None:
    """``fn`` on ``world`` child processes (torchrun environment); None (and the error noted)
    when a rank failed or the time ran out."""
    from hybridiff_rt.testing import run_ranks

    left = deadline - time.monotonic()
    if left < 20:
        errors.append(f"{name}: skipped, {left:.0f} s of the time budget left")
        return None
    print(f"[e2e_gpu] {name}: {world} process{'es' if world > 1 else ''} ...", flush=True)
    started = time.monotonic()
    with _environment(env):
        outcomes = run_ranks(fn, *args_, world_size=world, timeout_s=left, env=env)
    print(f"[e2e_gpu] {name}: {time.monotonic() - started:.1f} s", flush=True)
    missing = [r for r in range(world) if r not in outcomes]
    failed = [o for o in outcomes.values() if not o.ok]
    if missing or failed:
        for o in failed:
            errors.append(f"{name}: rank {o.rank} failed: {o.error_type}: {o.error}"[:400])
            print(o.traceback, file=sys.stderr)
        if missing:
            errors.append(f"{name}: ranks {missing} never reported (killed or timed out)")
        return None
    return [outcomes[r].value for r in range(world)]


def _median(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(values)) if values else math.nan


def ideal_speedup(reports: list[dict], t2_ms: float, t1_ms: float,
                  in_situ: bool = False) -> float:
    """steps x T2 / sum of ideal step costs for the schedule in ``reports`` (one per rank);
    see the module docstring."""
    report = reports[0]
    pipeline = report["extra"].get("pipeline")
    first = report["tau1"] + 1 if report["tau1"] is not None else None
    total = 0.0
    for i, mode in enumerate(report["modes"]):
        if in_situ:
            total += max(r["compute_ms"][i] or 0.0 for r in reports)
        elif mode == "pipeline" and i != first and pipeline:
            total += pipeline["plan"]["bottleneck_ms"] * t1_ms / pipeline["plan"]["serial_ms"]
        else:
            total += t1_ms
    return len(report["modes"]) * t2_ms / total if total > 0 else math.nan


def build_rows(args, serial100, serial50, parallel, mps_note) -> list[dict]:
    rows = []
    for family in args.models:
        a = serial100[family]["eager"] if serial100 else None
        b = serial100[family]["serial"] if serial100 else None
        s50 = serial50[family]["serial"] if serial50 else None
        s50_b1 = serial50[family]["serial_b1"] if serial50 else None
        step_a = _median(a["step_ms"]) if a else math.nan

        def row(mode, run, procs, share, family=family, **more):
            return {"model": family, "mode": mode, "processes": procs, "sm_share": share,
                    "total_s": run["total_s"] if run else None,
                    "step_ms": _median(run["step_ms"]) if run else None, **more}
        if a:
            rows.append(row("(a) eager diffusers serial", a, 1, "100%", speedup=1.0))
        if b:
            rows.append(row("(b) hybridiff_rt serial", b, 1, "100%",
                            speedup=a["total_s"] / b["total_s"] if a else None,
                            step_speedup=step_a / _median(b["step_ms"]) if a else None))
        if s50:
            rows.append(row("(b50) hybridiff_rt serial, baseline", s50, 1, mps_note,
                            speedup=1.0, psnr_db=math.inf))
        if not parallel:
            continue
        if s50:
            t2 = _median(s50["report"]["compute_ms"])
            t1 = _median(s50_b1["report"]["compute_ms"]) / 2  # two batch-1 calls per step
        for label in ("cbp", "hybrid"):
            runs = [rank[family][label] for rank in parallel]
            reports = [r["report"] for r in runs]
            seconds = max(r["total_s"] for r in runs)
            speed = ideal = in_situ = None
            if s50:  # without the baseline: times, bytes and schedule only
                speed = s50["total_s"] / seconds
                ideal = ideal_speedup(reports, t2, t1)
                in_situ = ideal_speedup(reports, t2, t1, in_situ=True)
            rows.append({
                "model": family, "mode": "(c) CBP" if label == "cbp" else "(d) hybrid",
                "processes": 2, "sm_share": mps_note, "total_s": seconds,
                "step_ms": _median(runs[0]["step_ms"]), "speedup": speed, "ideal": ideal,
                "of_ideal": speed / ideal if s50 else None, "ideal_in_situ": in_situ,
                "of_in_situ": speed / in_situ if s50 else None,
                "mb_per_image": sum(sum(r["bytes_sent"]) for r in reports) / 1e6,
                "psnr_db": psnr(s50["latent"], runs[0]["latent"]) if s50 else None,
                "tau1": reports[0]["tau1"], "tau2": reports[0]["tau2"],
                "transport": reports[0]["transport"],
                "ranks_equal": bool((runs[0]["latent"] == runs[1]["latent"]).all())})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.timeout
    out_dir = Path(args.out) if args.out else None
    trace = None
    if args.profile:
        trace = str((out_dir or Path(__file__).resolve().parent / "results")
                    / "e2e_gpu_trace.json.gz")
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
    plan = {"models": args.models, "size": "tiny" if args.dry_run else "real",
            "side": args.side, "steps": args.steps,
            "dtype": "float32" if args.dry_run else args.dtype,
            "device": "cpu" if args.dry_run else "cuda", "seed": args.seed,
            "compile": args.compile, "compile_backend": args.compile_backend,
            "cuda_graphs": args.graphs, "profile": trace}
    errors: list[str] = []
    notes: list[str] = []
    serial100 = run_phase("(a)+(b) serial, whole GPU", serial_worker, (plan, True), 1, None,
                          deadline, errors)
    mps = Mps()
    env, why = (None, "--dry-run: no MPS on CPU") if args.dry_run else (
        (None, "--no-mps") if args.no_mps else mps.start())
    share = f"{MPS_PERCENT}% (MPS)" if env else "shared, no MPS"
    if env is None:
        notes.append(f"MPS not used ({why}): the (b50), (c) and (d) processes time-share the "
                     "whole device, so their speed-ups do not measure two half-GPUs")
    try:
        before = len(errors)
        serial50 = run_phase(f"(b50) serial, {share}", serial_worker, (plan, False), 1, env,
                             deadline, errors)
        if serial50 is None and env is not None:
            # the daemon started but its client failed (e.g. no MPS server in this container):
            # once more without MPS, so the two-process rows still exist
            clients = mps.clients_seen()
            mps.stop()
            failure = " / ".join(errors[before:])[:300]
            del errors[before:]
            notes.append(f"the MPS client run failed ({failure}; the daemon logged {clients} "
                         "client connections): (b50), (c), (d) ran again without MPS")
            env, share = None, "shared, no MPS"
            serial50 = run_phase(f"(b50) serial, {share}", serial_worker, (plan, False), 1,
                                 env, deadline, errors)
        parallel = run_phase(f"(c)+(d) CBP and hybrid, 2 x {share}", parallel_worker,
                             (plan, VARIANTS), 2, env, deadline, errors)
    finally:
        clients = mps.clients_seen()
        mps.stop()
        shutil.rmtree(mps.dir, ignore_errors=True)
    if env is not None:
        notes.append(f"MPS daemon logged {clients} client connections (3 expected)")
    for phase in (serial100, serial50, parallel):
        for rank_result in phase or []:
            for family in args.models:
                weights = rank_result[family]["weights"]
                if serial100 and weights != serial100[0][family]["weights"]:
                    errors.append(f"{family}: processes built different weights")
    rows = build_rows(args, serial100[0] if serial100 else None,
                      serial50[0] if serial50 else None, parallel, share)
    report = (parallel[0][args.models[0]]["hybrid"]["report"] if parallel else
              serial100[0][args.models[0]]["serial"]["report"] if serial100 else None)
    if report:
        notes += [f"RunReport notes ({args.models[0]}): " + "; ".join(report["notes"])]
        if report["extra"].get("compile"):
            notes.append(f"compiled / graphed calls: {report['extra']['compile']['calls']}")
    if trace and parallel:
        notes.append(f"profiler trace of one hybrid run (rank 0): {trace}")
    notes += [f"ERROR {e}" for e in errors]
    columns = [("model", "model"), ("mode", "mode"), ("processes", "procs"),
               ("sm_share", "SM share"), ("total_s", "s / image"), ("step_ms", "ms / step"),
               ("speedup", "speed-up"), ("step_speedup", "per-step vs (a)"), ("ideal", "ideal"),
               ("of_ideal", "of ideal"), ("ideal_in_situ", "ideal in situ"),
               ("of_in_situ", "of in situ"), ("mb_per_image", "MB / image"),
               ("psnr_db", "latent PSNR dB vs (b50)"), ("tau1", "tau1"), ("tau2", "tau2"),
               ("transport", "transport")]
    detail = machine_detail()
    write_results(
        "e2e_gpu", rows, columns,
        meta={"device": detail, "steps": args.steps, "side": args.side, "dtype": plan["dtype"],
              "models": args.models, "compile": args.compile,
              "compile_backend": args.compile_backend, "cuda_graphs": args.graphs,
              "dry_run": args.dry_run, "mps": env is not None, "errors": errors,
              "parallel_reports": {f: [p[f][v]["report"] for p in parallel]
                                   for f in args.models for v, _ in VARIANTS[1:]}
              if parallel else None},
        out_dir=out_dir,
        notes=[f"device: {detail}", *notes,
               ("Timed run after one untimed warm-up run per row; hand-written CFG loop on "
                "random-init published configs (no text encoders, no VAE)."),
               "speed-up: (b) vs (a); (c), (d) vs (b50). ideal / in situ: see bench/e2e_gpu.py."])
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
