"""Shared bits of the benchmarks: machine description, commit, medians, JSON + markdown output.

Every result row names the machine, the command and the commit, as the project's reporting rules
ask. Results go to bench/results/<name>.json and bench/results/<name>.md unless --out says
otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """E.g. "CPU: AMD EPYC 7B13, 2 cores" or "GPU: NVIDIA H200"."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
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
    return f"CPU: {model}, {os.cpu_count()} cores"


def commit() -> str:
    """Short git commit of the checkout, with "+dirty" when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def write_results(name: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]],
                  meta: dict[str, Any], out_dir: str | os.PathLike | None = None,
                  notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write ``rows`` as <name>.json (with ``meta``) and <name>.md (a table of ``columns``), and
    print the table and where both went.

    Args:
        columns: (key, header) pairs in table order; floats are printed with 3 significant
            decimals.
    """
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stamp = {"machine": machine(), "command": command(), "commit": commit()}
    rows = [{**r, **stamp} for r in rows]
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps({"meta": {**meta, **stamp}, "rows": rows}, indent=2) + "\n")
    keys = [k for k, _ in columns] + ["machine", "command", "commit"]
    headers = [h for _, h in columns] + ["machine", "command", "commit"]
    lines = [f"# {name}", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|")
