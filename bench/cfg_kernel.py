"""Microbenchmark: fused CFG combine + discrepancy stats vs the reference code's eager sequence.

    python bench/cfg_kernel.py [--reps 200] [--quick] [--blocks 1024,2048,4096] [--out-dir out/bench]

Needs a CUDA GPU (exits with status 2 and a message otherwise). For every shape x dtype
(fp16, bf16), per branch:
    sdxl-1024 1x4x128x128, sdxl-2048 1x4x256x256, sd3-1024 1x16x128x128, sd3-2048 1x16x256x256,
    video 16x32x128x128
it times, with CUDA events, after a warm-up, median over ``--reps`` single calls, the L2 cache
flushed (a 256 MiB write) before each call:
    fused_us      hr.ops.cfg_combine(u, c, w, out=g): guided + stats on device (2 launches)
    eager_us      the reference code's sequence on device: g = u + w*(c - u);
                  m = (c - u).abs().mean() / (u.abs().mean() + 1e-12)   (no .item())
    fused_e2e_us  cfg_combine + hr.ops.rel_mae(stats) (one host sync), what a step pays
    eager_e2e_us  the eager sequence + .item() (one host sync)
    *_graph_us    the same device work replayed from a CUDA graph (no launch overhead)
    copy_us       dst.copy_(src) moving the same bytes (src has 1.5x the branch elements)
Bandwidth = bytes moved (read u and c, write g: 3 x elements x itemsize) / time; ``bw_frac`` =
fused bandwidth / copy bandwidth for the same bytes. A correctness check per row compares the
guided output with the torch reference bit for bit and the stats within rtol 1e-5, and checks
the stats are bit-identical over all timed calls.

Writes ``cfg_kernel.json`` and ``cfg_kernel.md`` into ``--out-dir``; every row names the machine,
the command and the git commit. Targets: fused >= 3x faster than eager on every shape (per-call
time) and >= 70% of copy bandwidth on large shapes (>= 16 MiB moved).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (ROOT, command, commit, cuda_event_ms, machine_detail, median,  # noqa: E402
                    save_results)

SHAPES = {
    "sdxl-1024": (1, 4, 128, 128),
    "sdxl-2048": (1, 4, 256, 256),
    "sd3-1024": (1, 16, 128, 128),
    "sd3-2048": (1, 16, 256, 256),
    "video": (16, 32, 128, 128),
}
DTYPES = ("fp16", "bf16")
GUIDANCE = 5.0
LARGE_BYTES = 16 << 20
TARGET_SPEEDUP = 3.0
TARGET_BW_FRAC = 0.70


def die(msg: str, code: int = 2) -> None:
    print(f"bench/cfg_kernel.py: {msg}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=200, help="timed single calls per measurement")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="30 reps, 5 warm-up (smoke run)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--blocks", default="", help="also time the kernel with these BLOCK sizes "
                    "(comma list, e.g. 1024,2048,4096); rows marked with the block")
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 between calls")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--out-dir", default=str(ROOT / "out" / "bench"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.warmup = 30, 5

    try:
        import torch
    except Exception as exc:  # pragma: no cover
        die(f"cannot import torch ({exc})")
    if not torch.cuda.is_available():
        die("needs a CUDA GPU, and torch.cuda.is_available() is False on this machine. Run it on a "
            "GPU machine (python bench/cfg_kernel.py); for CPU checks of the kernel run "
            "`TRITON_INTERPRET=1 pytest tests/test_ops.py -k interp_`.")
    try:
        import triton  # noqa: F401  (a check only: machine_detail() names its version)
    except Exception as exc:
        die(f"needs triton for the fused kernel ({exc}); install the triton matching your torch")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        die("TRITON_INTERPRET is set: unset it, the benchmark times compiled kernels")

    from hybridiff_rt import ops
    from hybridiff_rt.ops import cfg_triton, reference

    dev = torch.device("cuda")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            die(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    blocks = [int(b) for b in args.blocks.split(",") if b]

    stamp = {"machine": machine_detail(), "command": command(), "commit": commit()}
    flush_buf = None if args.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def flush() -> None:
        if flush_buf is not None:
            flush_buf.fill_(1)

    def time_calls(fn, reps: int = args.reps, warmup: int = args.warmup) -> float:
        """Median microseconds of single calls of fn, CUDA events, L2 flushed before each."""
        return median(cuda_event_ms(fn, reps, warmup, before=flush)) * 1e3

    def graph_of(fn):
        """A replay function for fn captured in a CUDA graph, or None if capture fails."""
        if args.no_graph:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return graph.replay
        except Exception as exc:
            print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
            return None

    # Peak copy bandwidth for the header (1 GiB read + 1 GiB write).
    big_src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    big_dst = torch.empty_like(big_src)
    peak_copy_us = time_calls(functools.partial(big_dst.copy_, big_src), reps=20, warmup=3)
    peak_copy_gbps = 2 * big_src.numel() / (peak_copy_us * 1e3)
    del big_src, big_dst

    rows = []
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        for dt_name in [d for d in args.dtypes.split(",") if d]:
            if dt_name not in dtypes:
                die(f"unknown dtype {dt_name!r}; choose from fp16, bf16, fp32")
            dtype = dtypes[dt_name]
            gen = torch.Generator(device=dev).manual_seed(1234)
            u = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)
            c = (u.float() + 0.3 * torch.randn(shape, generator=gen, device=dev)).to(dtype)
            g = torch.empty_like(u)
            n = u.numel()
            moved = 3 * n * u.element_size()
            src = torch.empty(n + n // 2, dtype=dtype, device=dev)
            dst = torch.empty_like(src)

            collected = []

            def fused():
                collected.append(ops.cfg_combine(u, c, GUIDANCE, out=g)[1])

            def fused_dev():
                ops.cfg_combine(u, c, GUIDANCE, out=g)

            def fused_e2e():
                return ops.rel_mae(ops.cfg_combine(u, c, GUIDANCE, out=g)[1])

            def eager_dev():
                guided = u + GUIDANCE * (c - u)
                m = (c - u).abs().mean() / (u.abs().mean() + 1e-12)
                return guided, m

            def eager_e2e():
                return reference.eager_rel_mae(u, c, GUIDANCE)[1]

            def copy():
                dst.copy_(src)

            row = {
                **stamp,
                "shape_name": shape_name, "shape": list(shape), "dtype": dt_name,
                "elements": n, "bytes_moved": moved,
                "block": cfg_triton.launch_config(n)[0], "num_warps": cfg_triton.launch_config(n)[1],
            }
            row["fused_us"] = time_calls(fused)
            row["eager_us"] = time_calls(eager_dev)
            row["fused_e2e_us"] = time_calls(fused_e2e)
            row["eager_e2e_us"] = time_calls(eager_e2e)
            row["copy_us"] = time_calls(copy)
            fg, eg = graph_of(fused_dev), graph_of(eager_dev)
            row["fused_graph_us"] = time_calls(fg) if fg else None
            row["eager_graph_us"] = time_calls(eg) if eg else None

            row["speedup"] = row["eager_us"] / row["fused_us"]
            row["speedup_e2e"] = row["eager_e2e_us"] / row["fused_e2e_us"]
            row["speedup_graph"] = (row["eager_graph_us"] / row["fused_graph_us"]
                                    if fg and eg else None)
            row["fused_gbps"] = moved / (row["fused_us"] * 1e3)
            row["eager_gbps"] = moved / (row["eager_us"] * 1e3)
            row["copy_gbps"] = moved / (row["copy_us"] * 1e3)
            row["bw_frac"] = row["fused_gbps"] / row["copy_gbps"]
            row["large"] = moved >= LARGE_BYTES

            # correctness and determinism
            g_ref, s_ref = reference.cfg_combine_reference(u, c, GUIDANCE)
            g_k, s_k = ops.cfg_combine(u, c, GUIDANCE)
            row["guided_bit_exact"] = bool(torch.equal(g_k, g_ref))
            row["stats_rel_err"] = float(((s_k.double() - s_ref.double()).abs()
                                          / s_ref.double().abs()).max())
            row["stats_deterministic"] = all(torch.equal(collected[0], s) for s in collected)
            row["stats_only_equal"] = bool(torch.equal(ops.discrepancy_stats(u, c), s_k))
            row["meets_speedup"] = row["speedup"] >= TARGET_SPEEDUP
            row["meets_bw"] = (row["bw_frac"] >= TARGET_BW_FRAC) if row["large"] else None
            rows.append(row)
            print(f"{shape_name:10s} {dt_name} fused {row['fused_us']:8.1f} us  eager "
                  f"{row['eager_us']:8.1f} us  x{row['speedup']:.2f}  e2e x{row['speedup_e2e']:.2f}  "
                  f"{row['fused_gbps']:7.0f} GB/s ({100 * row['bw_frac']:.0f}% of copy)  "
                  f"exact={row['guided_bit_exact']} det={row['stats_deterministic']}", flush=True)

            for block in blocks:
                nw = 8 if block >= 4096 else 4

                def fused_block():
                    cfg_triton.cfg_combine_triton(u, c, GUIDANCE, out=g, block=block, num_warps=nw)

                brow = {k: row[k] for k in ("machine", "command", "commit", "shape_name", "shape",
                                            "dtype", "elements", "bytes_moved", "copy_us",
                                            "copy_gbps")}
                brow.update(block=block, num_warps=nw, sweep=True)
                brow["fused_us"] = time_calls(fused_block)
                brow["fused_gbps"] = moved / (brow["fused_us"] * 1e3)
                brow["bw_frac"] = brow["fused_gbps"] / row["copy_gbps"]
                rows.append(brow)
                print(f"  block {block:5d} warps {nw}: {brow['fused_us']:8.1f} us "
                      f"{100 * brow['bw_frac']:.0f}% of copy", flush=True)

    main_rows = [r for r in rows if not r.get("sweep")]
    summary = {
        "all_speedup_ge_3x": all(r["meets_speedup"] for r in main_rows),
        "large_bw_ge_70pct": (all(r["meets_bw"] for r in main_rows if r["large"])
                              if any(r["large"] for r in main_rows) else None),
        "all_guided_bit_exact": all(r["guided_bit_exact"] for r in main_rows),
        "all_stats_deterministic": all(r["stats_deterministic"] and r["stats_only_equal"]
                                       for r in main_rows),
        "max_stats_rel_err": max(r["stats_rel_err"] for r in main_rows) if main_rows else None,
    }
    result = {
        "benchmark": "cfg_kernel",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **stamp,
        "reps": args.reps, "warmup": args.warmup, "l2_flush": flush_buf is not None,
        "peak_copy_gbps": peak_copy_gbps, "guidance_scale": GUIDANCE,
        "targets": {"speedup": TARGET_SPEEDUP, "bw_frac_large": TARGET_BW_FRAC,
                    "large_bytes": LARGE_BYTES},
        "summary": summary, "rows": rows,
    }
    save_results("cfg_kernel", result, markdown(result), args.out_dir)


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    lines = [
        f"# cfg_kernel benchmark ({result['date']})",
        "",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- commit: {result['commit']}",
        f"- median of {result['reps']} single calls after {result['warmup']} warm-up, CUDA events, "
        f"L2 flushed before each call: {result['l2_flush']}; peak copy "
        f"{result['peak_copy_gbps']:.0f} GB/s (1 GiB)",
        f"- summary: {json.dumps(result['summary'])}",
        "",
        "| machine | command | commit | shape | dtype | block | fused us | eager us | speed-up | "
        "fused e2e us | eager e2e us | e2e speed-up | fused graph us | eager graph us | "
        "fused GB/s | copy GB/s | % of copy | exact | deterministic |",
        "|" + "---|" * 19,
    ]
    for r in result["rows"]:
        sweep = r.get("sweep", False)
        lines.append(" | ".join([
            "", r["machine"].split(" | ")[0], f"`{r['command']}`", r["commit"],
            f"{r['shape_name']} {'x'.join(map(str, r['shape']))}", r["dtype"],
            f"{r['block']}" + (" (sweep)" if sweep else ""),
            _f(r["fused_us"]), _f(r.get("eager_us")), _f(r.get("speedup"), "{:.2f}x"),
            _f(r.get("fused_e2e_us")), _f(r.get("eager_e2e_us")), _f(r.get("speedup_e2e"), "{:.2f}x"),
            _f(r.get("fused_graph_us")), _f(r.get("eager_graph_us")),
            _f(r["fused_gbps"], "{:.0f}"), _f(r.get("copy_gbps"), "{:.0f}"),
            _f(100 * r["bw_frac"], "{:.0f}%"),
            "-" if sweep else str(r["guided_bit_exact"]),
            "-" if sweep else str(r["stats_deterministic"] and r["stats_only_equal"]), "",
        ]).strip())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
