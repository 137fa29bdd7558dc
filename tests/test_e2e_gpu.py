"""bench/e2e_gpu.py --dry-run: the end-to-end GPU benchmark's plumbing on tiny models on CPU.

One run (the SD3-shaped tiny model, 6 steps, with --profile) must produce every row of the table
with its measured fields, ranks that agree bit for bit, a CBP latent that matches the serial one
to within batch-1 vs batch-2 rounding, a hybrid schedule with k pipelined steps, the profiler
trace, and a JSON naming the device, torch and the commit. The numbers themselves are CPU noise.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import hybridiff_rt as hr

ROOT = Path(__file__).resolve().parents[1]
MODES = ["(a) eager diffusers serial", "(b) hybridiff_rt serial",
         "(b50) hybridiff_rt serial, baseline", "(c) CBP", "(d) hybrid"]


def test_dry_run_writes_every_row_the_trace_and_the_stamps(tmp_path):
    steps = 6
    proc = subprocess.run(
        [sys.executable, "bench/e2e_gpu.py", "--dry-run", "--models", "sd3", "--steps",
         str(steps), "--profile", "--out", str(tmp_path), "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "e2e_gpu.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == MODES, list(rows)
    for row in data["rows"]:
        assert row["model"] == "sd3" and row["total_s"] > 0 and row["step_ms"] > 0, row
        assert row["commit"] and row["command"].startswith("python bench/e2e_gpu.py")
    assert rows["(b) hybridiff_rt serial"]["step_speedup"] > 0
    k = hr.HybridConfig.preset("sd3", num_steps=steps).k
    for mode in ("(c) CBP", "(d) hybrid"):
        row = rows[mode]
        assert row["processes"] == 2 and row["ranks_equal"] is True, row
        assert row["ideal"] > 0 and row["ideal_in_situ"] > 0 and row["mb_per_image"] > 0, row
        assert math.isclose(row["of_ideal"], row["speedup"] / row["ideal"]), row
        assert row["transport"] == "torch-gloo"
    # CBP changes only batch-1 vs batch-2 rounding; the hybrid's stale steps change more
    assert rows["(c) CBP"]["psnr_db"] > 80, rows["(c) CBP"]
    assert rows["(c) CBP"]["tau1"] is None
    hybrid = rows["(d) hybrid"]
    assert hybrid["tau2"] - hybrid["tau1"] == k and hybrid["psnr_db"] < rows["(c) CBP"]["psnr_db"]
    meta = data["meta"]
    assert meta["dry_run"] is True and meta["mps"] is False and meta["errors"] == []
    assert "torch " in meta["device"] and "CUDA" in meta["device"]
    (report,) = meta["parallel_reports"]["sd3"][:1]
    assert report["modes"].count("pipeline") == k and len(report["compute_ms"]) == steps
    trace = json.loads(gzip.decompress((tmp_path / "e2e_gpu_trace.json.gz").read_bytes()))
    assert trace["traceEvents"], "empty profiler trace"
    table = (tmp_path / "e2e_gpu.md").read_text()
    assert table.startswith("# e2e_gpu") and "| sd3 | (d) hybrid | 2 |" in table
    assert "MPS not used (--dry-run" in table
