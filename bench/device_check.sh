#!/usr/bin/env bash
# GPU device check: the one prepared run on a lent H100/H200 (the device tool copies the working
# tree, runs this with $OUT set, and brings back at most 8 files from $OUT).
#
#   bash bench/device_check.sh [--quick] [--dry-run]
#   device tool: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=600)
#                run(command="bash bench/device_check.sh --quick", carry=[".whl"], timeout_s=380)
#
# The GPU machine has no diffusers and no network: run bench/prepare_device_wheels.sh here first
# and carry .whl (its wheels are installed into /tmp/site).
#
# Exit status:
#   0  every step ok (a step skipped for a documented reason, e.g. no .whl carried, is ok)
#   1  at least one step FAILED or hit its TIMEOUT
#   2  usage error (unknown option, bad DEVICE_CHECK_LIMITS)
#   3  no usable GPU (torch sees no CUDA device): nothing was built or run; the summary says why
#   4  the time budget ran out before every step ran (nothing failed in what ran)
#
# Steps, in order, with time limits in seconds (full | --quick). Every step runs even if an earlier
# one failed; a step never runs past its limit nor past the whole run's budget (full 570 s,
# --quick 330 s: DEVICE_CHECK_BUDGET_S); a step with too little budget left is SKIPPED.
#   wheels            30 |  30  pip install --no-index .whl/*.whl into /tmp/site (SKIPPED: none)
#   env               30 |  20  versions of python, torch, triton, diffusers, nvcc, cmake, ...
#   build            150 | 100  setup.py build_ext --inplace with CUDA, for the GPU's arch (sm_90)
#   build_info        50 |  45  print build_info(), then `hybridiff-rt info` (IPC self-test)
#   triton_tests      90 |  45  pytest -m gpu tests/test_ops.py (Triton kernels); per test 60 | 30
#   ipc_tests        150 |  60  pytest -m gpu tests/test_ipc_gpu.py (IPC engine); per test 75 | 40
#                                 --quick: zero-copy views + collectives, killed peer, slow consumer
#   runtime_tests    180 |  75  pytest -m gpu tests/test_gpu_runtime.py; per test 150 | 70
#                                 (full: also world size 4, CUDA IPC on one node and inside two
#                                 torchrun nodes; --quick: the ipc case only, after the two
#                                 benchmarks)
#   other_gpu_tests  120 |   -  pytest -m gpu over the rest of tests/ (tests/test_compiled.py:
#                                 graph replay, compiled and graphed serial and two-rank runs)
#   transport_bench   75 |  35  bench/transport.py --out $OUT (--quick --sizes-mb 1 40)
#   cfg_kernel_bench  60 |  30  bench/cfg_kernel.py --out-dir $OUT (--quick: 2 shapes)
#   e2e_bench        300 | 150  bench/e2e_gpu.py --out $OUT: eager vs graphed serial, CBP and
#                                 hybrid under MPS at 50% (full: SDXL + SD3, 50 steps, --profile;
#                                 --quick: SDXL, 20 steps; last in both modes; SKIPPED without
#                                 diffusers)
# Per-test limits need pytest-timeout (used when importable; else faulthandler stack dumps only).
# A step at its limit gets SIGTERM (pytest then ends the session and writes its junit), SIGKILL
# 10 s later; pytest steps also keep a live per-test record, so even a SIGKILLed step reports the
# tests that finished (and the one it was killed in).
# Estimated (not yet measured) on one H200: full about 9 minutes, --quick about 5 minutes; the
# pytest steps print per-test durations (>= 2 s) into the log to calibrate these limits.
#
# Files in $OUT (default ./out), each written as soon as it exists, so a run killed at any point
# keeps what finished (8 files, the tool's limit):
#   summary.txt        one screen: result, GPU, each step's status/time/limit/detail, failures
#   summary.json       the same as data (rewritten after every step: "running" until the end)
#   device_check.log   everything every step printed, as it printed it
#   junit.xml          every finished pytest step's junit (one <testsuite> per step), merged
#                      after each step (a step killed at its limit still writes its own junit)
#   transport.json     bench/transport.py's results
#   cfg_kernel.json    bench/cfg_kernel.py's results
#   e2e_gpu.json       bench/e2e_gpu.py's results (its table is in the log)
#   e2e_gpu_trace.json.gz  full mode: a torch profiler trace of one hybrid run (rank 0)
# (the benchmarks' .md tables are printed into the log and kept out of $OUT.)
#
# --quick    under 6 minutes: build for the GPU's arch only, the most important tests, short
#            benchmarks (budget 330 s).
# --dry-run  checks this script's plumbing without a GPU: pretends one, runs the pytest steps for
#            real (their GPU tests skip without CUDA), and stands in for wheels, build, build_info
#            and the benchmarks with a line saying what would run.
#
# Environment: OUT; PYTHON (default python3); HYBRIDIFF_RT_CUDA_ARCHS (full mode; default: the
# GPU's own arch); DEVICE_CHECK_BUDGET_S (whole-run budget); DEVICE_CHECK_LIMITS="build=200
# ipc_tests=90" (per-step limits); DEVICE_CHECK_DRY_HANG="build ipc_tests runtime_tests:hard"
# (--dry-run only: those steps hang until their limit, a pytest step after its first test; ":hard"
# ignores SIGTERM, so only the SIGKILL 10 s later ends it: checks the TIMEOUT paths).
set -uo pipefail

usage() { sed -n '2,/^set -uo pipefail/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

MODE=full
DRY=0
for arg in "$@"; do
  case $arg in
    --quick) MODE=quick ;;
    --dry-run) DRY=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "device_check.sh: unknown option '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done

T0=$SECONDS
STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
OUT="${OUT:-./out}"
mkdir -p "$OUT" || { echo "device_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
PY="${PYTHON:-python3}"
LOG="$OUT/device_check.log"
OUT_FILES=(summary.txt summary.json device_check.log junit.xml transport.json cfg_kernel.json
  e2e_gpu.json e2e_gpu_trace.json.gz)
rm -f "$OUT"/{summary.txt,summary.json,device_check.log,junit.xml,transport.json,transport.md} \
  "$OUT"/{cfg_kernel.json,cfg_kernel.md,e2e_gpu.json,e2e_gpu.md,e2e_gpu_trace.json.gz}
: >"$LOG"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX") || exit 2
mkdir -p "$WORK/junit" "$WORK/results" "$WORK/logs" "$WORK/plugins" "$WORK/moved" "$WORK/running"
touch "$WORK/start_marker"
: >"$WORK/steps.tsv"
trap 'rm -rf "$WORK"' EXIT

export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$ROOT:$WORK/plugins${PYTHONPATH:+:$PYTHONPATH}"
STDBUF=()  # Python steps are unbuffered (PYTHONUNBUFFERED); the build's C tools get stdbuf
command -v stdbuf >/dev/null 2>&1 && STDBUF=(stdbuf -oL -eL)

log() { echo "[device_check +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }

# ----------------------------------------------------------------------------------------------
# helpers (stdlib Python): GPU probe, junit merge, summary

# pytest plugin loaded into every pytest step: SIGTERM (the step's limit) becomes a
# KeyboardInterrupt, so pytest ends the session and writes its junit; --dry-run's hang switch.
cat >"$WORK/plugins/device_check_plugin.py" <<'PY'
"""Loaded by bench/device_check.sh into its pytest steps (-p device_check_plugin)."""
import json
import os
import signal
import time

import pytest


def _interrupt(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second TERM kills
    raise KeyboardInterrupt("device_check: the step reached its time limit (SIGTERM)")


def pytest_configure(config):
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_RUNNING = os.environ.get("DEVICE_CHECK_RUNNING_FILE")


def _running(nodeid):
    if _RUNNING:
        with open(_RUNNING, "w") as f:
            f.write(nodeid)


def pytest_runtest_logstart(nodeid, location):
    _running(nodeid)  # the test a step limit interrupts is named in the summary


def pytest_runtest_logfinish(nodeid, location):
    _running("")


_RESULTS = os.environ.get("DEVICE_CHECK_RESULTS_FILE")
_HANG = os.environ.get("DEVICE_CHECK_PLUGIN_HANG", "")
_hung = []


def _message(report):
    if report.passed:
        return ""
    if isinstance(report.longrepr, tuple):  # a skip: (path, line, reason)
        return str(report.longrepr[-1])
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    lines = str(report.longrepr).strip().splitlines()
    return lines[-1] if lines else report.outcome


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    # a live record of every outcome, flushed as it comes: the summary falls back on it when
    # pytest is killed (SIGKILL) before it writes its junit
    if _RESULTS and (report.when == "call" or not report.passed):
        line = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "duration": round(report.duration, 3), "message": _message(report)[:300]}
        with open(_RESULTS, "a") as f:
            f.write(json.dumps(line) + "\n")
    if _HANG and not _hung and report.when == "teardown":  # --dry-run's DEVICE_CHECK_DRY_HANG
        _hung.append(report.nodeid)
        if _HANG == "hard":  # deaf to SIGTERM: only the step's SIGKILL ends it
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"\ndevice_check --dry-run: hanging ({_HANG}) after {report.nodeid}", flush=True)
        time.sleep(3600)
PY

HELPER="$WORK/device_check_helper.py"
cat >"$HELPER" <<'PY'
"""bench/device_check.sh's helper: probe | junit | summary (stdlib only, except the probe)."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET


def probe(path):
    """Python/torch/GPU facts into ``path`` (JSON); KEY=VALUE lines for the shell."""
    info = {"python": sys.version.split()[0], "executable": sys.executable, "gpus": []}
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["nvidia_smi"] = (out.stdout.strip() or out.stderr.strip())[:500]
        except Exception as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    else:
        info["nvidia_smi"] = "not found"
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = bool(torch.cuda.is_available())
        count = torch.cuda.device_count() if info["cuda_available"] else 0
        for i in range(count):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                 "memory_gib": round(props.total_memory / 2**30, 1)})
    except Exception as exc:
        info["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from importlib import metadata

        info["triton"] = metadata.version("triton")
    except Exception:
        info["triton"] = None
    if not info["gpus"]:
        if "torch_error" in info:
            reason = f"torch cannot be imported by {sys.executable} ({info['torch_error']})"
        else:
            reason = (f"torch.cuda.is_available() is False (torch {info['torch']}, CUDA "
                      f"{info['torch_cuda'] or 'none'}, CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
        info["no_gpu_reason"] = f"{reason}; nvidia-smi: {info['nvidia_smi'][:120]}"
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    arch = info["gpus"][0]["capability"].replace(".", "") if info["gpus"] else ""
    print(f"GPU_COUNT={len(info['gpus'])}")
    print(f"GPU_ARCH={arch}")
    print(f"NO_GPU_REASON={info.get('no_gpu_reason', '')}")


def versions(path):
    """Package versions and importability (without importing them: fast), and the tools."""
    import importlib.util
    from importlib import metadata

    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    for tool, flag in (("nvcc", "--version"), ("cmake", "--version"), ("ninja", "--version")):
        exe = shutil.which(tool)
        try:
            text = subprocess.run([exe, flag], capture_output=True, text=True,
                                  timeout=20).stdout.strip() if exe else "not found"
        except Exception as exc:
            text = f"failed: {exc}"
        lines = text.splitlines() or [""]
        print(f"{tool}: {exe or ''} {lines[-2] if tool == 'nvcc' and len(lines) > 1 else lines[0]}")
    info = {}
    for name in ("torch", "triton", "diffusers", "transformers", "pytest", "pytest-timeout",
                 "pybind11", "cmake", "ninja", "numpy"):
        try:
            info[name] = metadata.version(name)
        except Exception:
            info[name] = None
    for mod in ("diffusers", "transformers", "pytest_timeout"):
        try:
            info[f"import {mod}"] = importlib.util.find_spec(mod) is not None
        except Exception:
            info[f"import {mod}"] = False
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    for k, v in info.items():
        print(f"{k}: {v}")
    print(", ".join(f"{k} {info[k] or 'missing'}"
                    for k in ("diffusers", "transformers", "pytest-timeout", "cmake", "ninja")))


def _suites(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    return [root] if root.tag == "testsuite" else list(root.iter("testsuite"))


def junit_counts(path):
    """{'tests', 'passed', 'failed', 'errors', 'skipped', 'failures': [...]} or None."""
    suites = _suites(path)
    if suites is None:
        return None
    c = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            c["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                c["failed" if bad.tag == "failure" else "errors"] += 1
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                c["failures"].append(f"{name} - {msg[0][:160] if msg else bad.tag}")
            elif case.find("skipped") is not None:
                c["skipped"] += 1
            else:
                c["passed"] += 1
    return c


def live_results(path):
    """{nodeid: (outcome, message)} from the plugin's live record, or None without one."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return None
    tests = {}
    for ln in lines:
        try:
            r = json.loads(ln)
        except ValueError:
            continue  # a line cut by the kill
        outcome, message = tests.get(r["nodeid"], ("passed", ""))
        if r["outcome"] == "failed":
            if outcome != "failed":
                outcome = "failed" if r["when"] == "call" else "error"
                message = r["message"]
        elif r["outcome"] == "skipped" and outcome == "passed":
            outcome, message = "skipped", r["message"]
        tests[r["nodeid"]] = (outcome, message)
    return tests


def live_counts(path):
    tests = live_results(path)
    if tests is None:
        return None
    c = {"tests": len(tests), "passed": 0, "failed": 0, "errors": 0, "skipped": 0,
         "failures": [], "source": "live record (pytest was killed before writing its junit)"}
    for nodeid, (outcome, message) in tests.items():
        c[{"passed": "passed", "failed": "failed", "error": "errors",
           "skipped": "skipped"}[outcome]] += 1
        if outcome in ("failed", "error"):
            c["failures"].append(f"{nodeid} - {message.splitlines()[0][:160] if message else outcome}")
    return c


def step_counts(work, name):
    """A pytest step's counts: from its junit, else from the plugin's live record."""
    c = junit_counts(os.path.join(work, "junit", f"{name}.xml"))
    if c is None:
        c = live_counts(os.path.join(work, "results", f"{name}.jsonl"))
    return c


def _live_suite(name, tests):
    """A junit <testsuite> made from the live record (for a step whose pytest was killed)."""
    suite = ET.Element("testsuite", name=name)
    counts = {"failed": 0, "error": 0, "skipped": 0}
    for nodeid, (outcome, message) in tests.items():
        path, _, test = nodeid.partition("::")
        case = ET.SubElement(suite, "testcase", name=test,
                             classname=path.removesuffix(".py").replace("/", "."))
        tag = {"failed": "failure", "error": "error", "skipped": "skipped"}.get(outcome)
        if tag:
            counts[outcome] += 1
            ET.SubElement(case, tag, message=message[:300])
    suite.set("tests", str(len(tests)))
    suite.set("failures", str(counts["failed"]))
    suite.set("errors", str(counts["error"]))
    suite.set("skipped", str(counts["skipped"]))
    ET.SubElement(suite, "system-out").text = ("rebuilt by bench/device_check.sh from the live "
                                               "record: pytest was killed before writing junit")
    return suite


def merge_junit(work, out, plan):
    root = ET.Element("testsuites")
    for name in plan:
        suites = _suites(os.path.join(work, "junit", f"{name}.xml"))
        if suites is None:
            tests = live_results(os.path.join(work, "results", f"{name}.jsonl"))
            suites = [_live_suite(name, tests)] if tests else []
        for suite in suites:
            suite.set("name", name)
            root.append(suite)
    tmp = os.path.join(out, ".junit.xml.tmp")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, os.path.join(out, "junit.xml"))


def _fmt_counts(c):
    if c is None:
        return "no result (killed before any test finished)"
    parts = [f"{c['passed']} passed"]
    parts += [f"{c[k]} {k}" for k in ("failed", "errors", "skipped") if c[k]]
    parts = [p.replace("1 errors", "1 error") if p == "1 errors" else p for p in parts]
    return ", ".join(parts)


def _tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip()]
    except OSError:
        return []
    return [ln[:300] for ln in lines[-n:]]


def summary(args):
    work, out = args["work"], args["out"]
    plan = [ln.split("\t") for ln in open(os.path.join(work, "plan.tsv")).read().splitlines()]
    done = {}
    for ln in open(os.path.join(work, "steps.tsv")).read().splitlines():
        name, status, rc, secs, limit, kind, note = (ln.split("\t") + [""] * 7)[:7]
        done[name] = dict(status=status, exit=int(rc) if rc else None, seconds=int(secs),
                          limit_s=int(limit), kind=kind, note=note)
    current = None
    cur_path = os.path.join(work, "current")
    if os.path.exists(cur_path):
        cname, climit, cstart = open(cur_path).read().split()
        current = (cname, int(climit), int(cstart) - int(args["t0"]))

    def load(name):
        try:
            return json.load(open(os.path.join(work, name)))
        except (OSError, ValueError):
            return {}

    probe_info, vers = load("probe.json"), load("versions.json")
    steps, warnings = [], []
    for name, limit, kind, what in plan:
        step = {"name": name, "what": what, "kind": kind, "limit_s": int(limit)}
        if name in done:
            step.update(done[name])
        elif current and current[0] == name:
            step.update(status="RUNNING", seconds=None, limit_s=current[1],
                        note=f"started at +{current[2]}s; not finished when this summary was "
                             "written (see device_check.log)")
        else:
            step.update(status="pending", seconds=None, note="")
        if kind == "pytest" and step["status"] not in ("pending", "SKIPPED", "RUNNING"):
            c = step_counts(work, name)
            step["tests"] = c
            detail = _fmt_counts(c)
            if c and c.get("source"):
                detail = f"{detail} (no junit: from the live record)"
            if c and c["tests"] and c["passed"] == 0 and not args["dry"] and not (
                    name == "other_gpu_tests"):
                warnings.append(f"{name}: no test passed ({detail})")
            if step.get("note"):
                detail = f"{step['note']}; {detail}"
            step["detail"] = detail
        else:
            tail = _tail(os.path.join(work, "logs", f"{name}.log"))
            step["log_tail"] = tail
            if step["status"] in ("ok", "FAILED", "TIMEOUT") and tail and not step.get("note"):
                step["detail"] = tail[-1][:70]
            else:
                step["detail"] = step.get("note", "")
        steps.append(step)

    final = args["state"] == "final"
    code = int(args["exit_code"]) if final else None
    result = {0: "ok", 1: "FAILED", 2: "usage error", 3: "NO GPU", 4: "INCOMPLETE"}.get(
        code, "RUNNING" if not final else f"exit {code}")
    gpus = probe_info.get("gpus") or []
    if gpus:
        g = gpus[0]
        gpu_line = (f"{len(gpus)} x {g['name']} (sm_{g['capability'].replace('.', '')}, "
                    f"{g['memory_gib']} GiB)")
    elif args["dry"]:
        gpu_line = "none (--dry-run pretends one)"
    else:
        gpu_line = "none: " + probe_info.get("no_gpu_reason", "not probed")
    smi = probe_info.get("nvidia_smi", "")
    files = sorted({f for f in os.listdir(out) if not f.startswith(".")}
                   | {"summary.json", "summary.txt"})
    data = {
        "result": result, "exit_code": code, "mode": args["mode"], "dry_run": bool(args["dry"]),
        "started_utc": args["started"], "elapsed_s": int(args["elapsed"]),
        "budget_s": int(args["budget"]), "gpu": gpu_line, "nvidia_smi": smi,
        "probe": probe_info, "versions": vers, "steps": steps, "warnings": warnings,
        "out": out, "files": files,
        "exit_codes": {"0": "every step ok", "1": "a step FAILED or hit its TIMEOUT",
                       "2": "usage error", "3": "no usable GPU (nothing built or run)",
                       "4": "the time budget ran out before every step ran"},
    }
    unchecked = "not checked" if not vers else None
    w = {"torch": vers.get("torch") or probe_info.get("torch"),
         "triton": vers.get("triton") or probe_info.get("triton"),
         "diffusers": vers.get("diffusers") or unchecked,
         "pytest-timeout": vers.get("pytest-timeout") or unchecked}
    lines = [
        f"hybridiff_rt device check: {result}"
        + (f" (exit {code})" if final else "") + f" | mode {args['mode']}"
        + (" --dry-run" if args["dry"] else "")
        + f" | {args['elapsed']} s of {args['budget']} s budget | started {args['started']}",
        f"GPU: {gpu_line}",
    ]
    if smi and smi != "not found":
        lines.append(f"nvidia-smi: {smi.splitlines()[0][:100]}")
    lines.append("versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in w.items())
                 + f", torch CUDA {probe_info.get('torch_cuda') or '-'}")
    lines.append(f"{'step':<17} {'status':<24} {'time':>5} {'limit':>6}  detail")
    for s in steps:
        status = s["status"]
        if status == "FAILED":
            status = f"FAILED (exit {s['exit']})"
        elif status == "SKIPPED":
            status = "SKIPPED"
        t = "-" if s.get("seconds") is None or s["status"] == "SKIPPED" else f"{s['seconds']}s"
        detail = s.get("detail") or ""
        if s["status"] == "SKIPPED":
            detail = s.get("note", "")
        head = f"{s['name']:<17} {status:<24} {t:>5} {s['limit_s']:>5}s  "
        parts = textwrap.wrap(detail, width=max(40, 140 - len(head)), max_lines=3) or [""]
        lines.append(head + parts[0])
        lines += [" " * len(head) + part for part in parts[1:]]
    fails = [(s["name"], f) for s in steps for f in ((s.get("tests") or {}).get("failures") or [])]
    if fails:
        lines.append("failed tests:")
        lines += [f"  {n}: {f}"[:200] for n, f in fails[:12]]
        if len(fails) > 12:
            lines.append(f"  ... {len(fails) - 12} more in junit.xml / device_check.log")
    lines += [f"warning: {x}" for x in warnings]
    lines.append(f"files in OUT={out}: {' '.join(files) or '(none)'}")
    if final:
        lines.append("exit codes: 0 ok, 1 a step failed/timed out, 2 usage, 3 no GPU, "
                     "4 budget ran out")
    text = "\n".join(lines) + "\n"
    for name, content in (("summary.json", json.dumps(data, indent=1) + "\n"),
                          ("summary.txt", text)):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(content)
        os.replace(tmp, os.path.join(out, name))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "probe":
        probe(sys.argv[2])
    elif cmd == "versions":
        versions(sys.argv[2])
    elif cmd == "junit":
        merge_junit(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif cmd == "summary":
        args = dict(a.split("=", 1) for a in sys.argv[2:])
        args["dry"] = args.get("dry") == "1"
        summary(args)
    else:
        sys.exit(f"unknown helper command {cmd}")
PY

# ----------------------------------------------------------------------------------------------
# the plan: NAME LIMIT_S MIN_S KIND WHAT (MIN_S: skip the step when less budget is left)

declare -a PLAN=()
declare -A LIMIT=() MINT=() KIND=()
: >"$WORK/plan.tsv"
plan() {
  PLAN+=("$1")
  LIMIT[$1]=$2
  MINT[$1]=$3
  KIND[$1]=$4
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$4" "$5" >>"$WORK/plan.tsv"
}

if [[ $MODE == quick ]]; then
  BUDGET=${DEVICE_CHECK_BUDGET_S:-330}
  plan wheels 30 5 cmd "pip install carried .whl/*.whl into /tmp/site"
  plan env 20 5 cmd "versions: python, torch, triton, diffusers, nvcc, cmake"
  plan build 100 30 cmd "setup.py build_ext --inplace, CUDA, the GPU's arch"
  plan build_info 45 5 cmd "build_info(); hybridiff-rt info (IPC self-test)"
  plan triton_tests 45 20 pytest "pytest -m gpu tests/test_ops.py"
  plan ipc_tests 60 20 pytest "pytest -m gpu tests/test_ipc_gpu.py (3 scenarios)"
  plan transport_bench 35 20 cmd "bench/transport.py --quick --sizes-mb 1 40"
  plan cfg_kernel_bench 30 15 cmd "bench/cfg_kernel.py --quick (2 shapes)"
  plan runtime_tests 75 40 pytest "pytest -m gpu tests/test_gpu_runtime.py -k ipc"
  plan e2e_bench 150 60 cmd "bench/e2e_gpu.py --quick (SDXL, 20 steps, MPS 50%)"
else
  BUDGET=${DEVICE_CHECK_BUDGET_S:-570}
  plan wheels 30 5 cmd "pip install carried .whl/*.whl into /tmp/site"
  plan env 30 5 cmd "versions: python, torch, triton, diffusers, nvcc, cmake"
  plan build 150 30 cmd "setup.py build_ext --inplace, CUDA"
  plan build_info 50 5 cmd "build_info(); hybridiff-rt info (IPC self-test)"
  plan triton_tests 90 20 pytest "pytest -m gpu tests/test_ops.py"
  plan ipc_tests 150 20 pytest "pytest -m gpu tests/test_ipc_gpu.py"
  plan runtime_tests 180 40 pytest "pytest -m gpu tests/test_gpu_runtime.py"
  plan other_gpu_tests 120 20 pytest "pytest -m gpu: the rest of tests/"
  plan transport_bench 75 20 cmd "bench/transport.py"
  plan cfg_kernel_bench 60 15 cmd "bench/cfg_kernel.py"
  plan e2e_bench 300 90 cmd "bench/e2e_gpu.py --profile (SDXL + SD3, 50 steps, MPS 50%)"
fi
if [[ ! $BUDGET =~ ^[0-9]+$ ]]; then
  echo "device_check.sh: DEVICE_CHECK_BUDGET_S must be whole seconds, got '$BUDGET'" >&2
  exit 2
fi
for item in ${DEVICE_CHECK_LIMITS:-}; do
  name=${item%%=*} value=${item#*=}
  if [[ -z ${LIMIT[$name]+x} || ! $value =~ ^[0-9]+$ || $value -lt 1 ]]; then
    echo "device_check.sh: DEVICE_CHECK_LIMITS: '$item' is not STEP=SECONDS for a step of" \
      "this mode (${PLAN[*]})" >&2
    exit 2
  fi
  LIMIT[$name]=$value
done
DRY_HANG=" ${DEVICE_CHECK_DRY_HANG:-} "
DEADLINE=$((T0 + BUDGET))

# ----------------------------------------------------------------------------------------------
# step machinery

write_summary() {  # write_summary STATE [EXIT_CODE]
  "$PY" "$HELPER" summary work="$WORK" out="$OUT" state="$1" exit_code="${2:-}" mode="$MODE" \
    dry="$DRY" budget="$BUDGET" elapsed=$((SECONDS - T0)) t0=$T0 \
    started="$STARTED_UTC" >>"$LOG" 2>&1 && return 0
  # the helper itself failed (no python?): a plain summary from the step table
  {
    echo "hybridiff_rt device check: state $1 exit ${2:-?} (the summary helper failed; see the log)"
    cat "$WORK/steps.tsv"
  } >"$OUT/summary.txt"
  printf '{"result": "unknown", "exit_code": %s, "note": "summary helper failed"}\n' \
    "${2:-null}" >"$OUT/summary.json"
}

record() {  # record NAME STATUS RC SECONDS LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${KIND[$1]}" "${6//$'\t'/ }" \
    >>"$WORK/steps.tsv"
}

skip_step() {  # skip_step NAME WHY
  record "$1" SKIPPED "" 0 "${LIMIT[$1]}" "$2"
  log "SKIPPED $1: $2"
}

# Keep $OUT within the device tool's 8 files: files this run made there beyond OUT_FILES (the
# benchmarks' .md tables, printed into the log anyway) move out.
tidy_out() {
  local f base keep
  while IFS= read -r f; do
    base=${f##*/}
    keep=0
    for k in "${OUT_FILES[@]}"; do [[ $base == "$k" ]] && keep=1; done
    [[ $base == .*.tmp ]] && keep=1
    if [[ $keep == 0 ]]; then
      mv -f "$f" "$WORK/moved/" 2>/dev/null && log "moved ${f#"$OUT"/} out of OUT (8-file limit;" \
        "its content is in this log)"
    fi
  done < <(find "$OUT" -mindepth 1 -type f -newer "$WORK/start_marker" 2>/dev/null)
}

# begin_step NAME: 0 and LIM set when the step may run; 1 (recorded SKIPPED) when no time is left
begin_step() {
  local name=$1 remaining=$((DEADLINE - SECONDS))
  LIM=${LIMIT[$name]}
  if ((remaining < MINT[$name])); then
    skip_step "$name" "no time left: ${remaining}s of the ${BUDGET}s budget remained"
    write_summary running
    return 1
  fi
  ((LIM > remaining)) && LIM=$remaining
  echo "$name $LIM $SECONDS" >"$WORK/current"
  write_summary running
  return 0
}

# run_step NAME CMD...: run CMD under the step's limit (TERM, then KILL 10 s later), its output
# into the log as it comes, and record ok / FAILED / TIMEOUT.
run_step() {
  local name=$1
  shift
  local t0=$SECONDS rc status note=""
  log "===== $name: start, limit ${LIM}s ====="
  { printf '$'; printf ' %q' "$@"; echo; } | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$LIM" "$@" </dev/null 2>&1 |
    tee -a "$LOG" "$WORK/logs/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [[ $rc == 0 ]]; then
    status=ok
  elif [[ ($rc == 124 || $rc == 137) && $dt -ge $((LIM - 1)) ]]; then
    status=TIMEOUT
    note="killed at its ${LIM}s limit"
    if [[ -s $WORK/running/$name.txt ]]; then
      note+=" in $(head -c 200 "$WORK/running/$name.txt")"
    fi
  elif [[ $rc == 5 && ${KIND[$name]} == pytest && $name == other_gpu_tests ]]; then
    status=ok
    note="no other GPU tests"
  elif [[ $rc == 5 && ${KIND[$name]} == pytest ]]; then
    status=FAILED
    note="no tests collected"
  else
    status=FAILED
  fi
  rm -f "$WORK/current"
  record "$name" "$status" "$rc" "$dt" "$LIM" "$note"
  log "===== $name: $status (exit $rc) in ${dt}s ====="
  if [[ ${KIND[$name]} == pytest ]]; then
    "$PY" "$HELPER" junit "$WORK" "$OUT" "${PLAN[@]}" >>"$LOG" 2>&1 || log "junit merge failed"
  fi
  tidy_out
  write_summary running
  [[ $status == ok ]]
}

# dry_or CMD...: the command itself, or under --dry-run a stand-in that says what would run (and
# hangs for the steps named in DEVICE_CHECK_DRY_HANG)
CMD=()
dry_or() {
  local name=$1
  shift
  if [[ $DRY == 1 && ($DRY_HANG == *" $name "* || $DRY_HANG == *" $name:hard "*) ]]; then
    log "dry run: $name hangs (DEVICE_CHECK_DRY_HANG) instead of: $*"
    CMD=(sleep 3600)
  elif [[ $DRY == 1 ]]; then
    CMD=(echo "dry run: would run: $*")
  else
    CMD=("$@")
  fi
}

finish() {  # finish EXIT_CODE: final summary, print it, exit
  write_summary final "$1"
  log "done in $((SECONDS - T0))s, exit $1"
  echo
  cat "$OUT/summary.txt" | tee -a "$LOG"
  exit "$1"
}

# ----------------------------------------------------------------------------------------------
# 0. is there a GPU? (seconds: no build, nothing installed when there is none)

log "hybridiff_rt device check, mode $MODE$([[ $DRY == 1 ]] && echo ' --dry-run'), budget ${BUDGET}s, OUT=$OUT"
write_summary running
{
  echo "--- nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then timeout 20 nvidia-smi 2>&1; else echo "nvidia-smi: not found"; fi
  echo "--- probe ($PY)"
} >>"$LOG" 2>&1
PROBE=$(timeout 90 "$PY" "$HELPER" probe "$WORK/probe.json" 2>&1)
echo "$PROBE" >>"$LOG"
GPU_COUNT=$(sed -n 's/^GPU_COUNT=//p' <<<"$PROBE")
GPU_ARCH=$(sed -n 's/^GPU_ARCH=//p' <<<"$PROBE")
NO_GPU_REASON=$(sed -n 's/^NO_GPU_REASON=//p' <<<"$PROBE")
if [[ -z $GPU_COUNT ]]; then
  GPU_COUNT=0
  NO_GPU_REASON="the probe failed ($PY): $(tail -n 1 <<<"$PROBE")"
fi
if [[ $GPU_COUNT == 0 && $DRY == 0 ]]; then
  log "no GPU: $NO_GPU_REASON"
  for name in "${PLAN[@]}"; do
    record "$name" SKIPPED "" 0 "${LIMIT[$name]}" "no GPU"
  done
  finish 3
fi
log "GPU: count ${GPU_COUNT}, arch ${GPU_ARCH:-?}$([[ $DRY == 1 ]] && echo ' (--dry-run: a GPU is pretended)')"

# ----------------------------------------------------------------------------------------------
# 1. carried wheels (diffusers, ...) for a machine without network

WHEELS=()
compgen -G ".whl/*.whl" >/dev/null && WHEELS=(.whl/*.whl)
if ((${#WHEELS[@]} == 0)); then
  skip_step wheels "no .whl/ carried: tests needing diffusers skip (bench/prepare_device_wheels.sh)"
elif begin_step wheels; then
  dry_or wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "${WHEELS[@]}"
  if run_step wheels "${CMD[@]}" && [[ $DRY == 0 ]]; then
    export PYTHONPATH="$ROOT:/tmp/site:$WORK/plugins${PYTHONPATH#"$ROOT:$WORK/plugins"}"
    export PATH="/tmp/site/bin:$PATH"
  fi
fi

# ----------------------------------------------------------------------------------------------
# 2. environment

if begin_step env; then
  run_step env "$PY" "$HELPER" versions "$WORK/versions.json"
fi
TIMEOUT_PLUGIN=0
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_PLUGIN=1
log "pytest-timeout: $([[ $TIMEOUT_PLUGIN == 1 ]] && echo "yes: per-test limits" || echo "not importable: step limits only")"

# ----------------------------------------------------------------------------------------------
# 3. build the extension with CUDA

export HYBRIDIFF_RT_CUDA=on
ARCH=${GPU_ARCH:-90}
if [[ $MODE == quick ]]; then
  export HYBRIDIFF_RT_CUDA_ARCHS=$ARCH
else
  export HYBRIDIFF_RT_CUDA_ARCHS="${HYBRIDIFF_RT_CUDA_ARCHS:-$ARCH}"
fi
if begin_step build; then
  dry_or build "$PY" setup.py build_ext --inplace
  log "HYBRIDIFF_RT_CUDA_ARCHS=$HYBRIDIFF_RT_CUDA_ARCHS"
  run_step build "${STDBUF[@]}" "${CMD[@]}"  # line-buffered compiler output
fi
if begin_step build_info; then
  # build_info, then `hybridiff-rt info`: versions, GPUs, peer access, and the CUDA IPC set-up
  # self-test between two local processes (passed / failed with the reason)
  dry_or build_info bash -c '"$0" -c "import json, hybridiff_rt._C as c; print(json.dumps(c.build_info()))" && "$0" -m hybridiff_rt.cli info' "$PY"
  run_step build_info "${CMD[@]}"
fi

# ----------------------------------------------------------------------------------------------
# 4. GPU tests, one pytest per group, each with its own junit

# pytest_step NAME PER_TEST_TIMEOUT PYTEST_ARGS...
pytest_step() {
  local name=$1 per_test=$2
  shift 2
  begin_step "$name" || return 0
  local args=(-m pytest -q -p no:cacheprovider -p device_check_plugin -rfEs --tb=short
    --durations=0 --durations-min=2 -o junit_family=xunit2 -o "junit_suite_name=$name"
    "--junitxml=$WORK/junit/$name.xml")
  if ((per_test > LIM - 5)); then per_test=$((LIM > 15 ? LIM - 5 : LIM)); fi
  if [[ $TIMEOUT_PLUGIN == 1 ]]; then
    args+=("--timeout=$per_test")
  else
    args+=(-o "faulthandler_timeout=$per_test")
  fi
  local envs=("DEVICE_CHECK_RUNNING_FILE=$WORK/running/$name.txt"
    "DEVICE_CHECK_RESULTS_FILE=$WORK/results/$name.jsonl")
  if [[ $DRY == 1 && $DRY_HANG == *" $name:hard "* ]]; then
    envs+=(DEVICE_CHECK_PLUGIN_HANG=hard)
  elif [[ $DRY == 1 && $DRY_HANG == *" $name "* ]]; then
    envs+=(DEVICE_CHECK_PLUGIN_HANG=soft)
  fi
  run_step "$name" env "${envs[@]}" "$PY" "${args[@]}" "$@"
}

GPU_FILES=(tests/test_ops.py tests/test_ipc_gpu.py tests/test_gpu_runtime.py)
if [[ $MODE == quick ]]; then
  pytest_step triton_tests 30 -m gpu tests/test_ops.py
  pytest_step ipc_tests 40 -m gpu tests/test_ipc_gpu.py \
    -k "views_and_collectives or killed_peer or slow_consumer"
else
  pytest_step triton_tests 60 -m gpu tests/test_ops.py
  pytest_step ipc_tests 75 -m gpu tests/test_ipc_gpu.py
  pytest_step runtime_tests 150 -m gpu tests/test_gpu_runtime.py
  pytest_step other_gpu_tests 90 -m gpu --continue-on-collection-errors tests/ \
    "${GPU_FILES[@]/#/--ignore=}"
fi

# ----------------------------------------------------------------------------------------------
# 5. benchmarks (each writes its JSON into $OUT itself)

if [[ $MODE == quick ]]; then
  if begin_step transport_bench; then
    dry_or transport_bench "$PY" bench/transport.py --out "$OUT" --quick --sizes-mb 1 40 \
      --timeout $((LIM > 15 ? LIM - 5 : LIM))
    run_step transport_bench "${CMD[@]}"
  fi
  if begin_step cfg_kernel_bench; then
    dry_or cfg_kernel_bench "$PY" bench/cfg_kernel.py --out-dir "$OUT" --quick \
      --shapes sdxl-1024,video
    run_step cfg_kernel_bench "${CMD[@]}"
  fi
  pytest_step runtime_tests 70 -m gpu tests/test_gpu_runtime.py -k ipc
else
  if begin_step transport_bench; then
    dry_or transport_bench "$PY" bench/transport.py --out "$OUT" --timeout $((LIM > 15 ? LIM - 5 : LIM))
    run_step transport_bench "${CMD[@]}"
  fi
  if begin_step cfg_kernel_bench; then
    dry_or cfg_kernel_bench "$PY" bench/cfg_kernel.py --out-dir "$OUT"
    run_step cfg_kernel_bench "${CMD[@]}"
  fi
fi

# the end-to-end benchmark (bench/e2e_gpu.py), last in both modes
E2E_ARGS=(--profile)
[[ $MODE == quick ]] && E2E_ARGS=(--quick)
if ! "$PY" -c "import diffusers" >/dev/null 2>&1; then
  skip_step e2e_bench "diffusers is not importable (carry .whl: bench/prepare_device_wheels.sh)"
elif begin_step e2e_bench; then
  # the benchmark splits what is left of its limit among its phases and keeps 10 s spare
  dry_or e2e_bench "$PY" bench/e2e_gpu.py --out "$OUT" "${E2E_ARGS[@]}" \
    --timeout $((LIM > 30 ? LIM - 10 : LIM))
  run_step e2e_bench "${CMD[@]}"
fi

# ----------------------------------------------------------------------------------------------
# 6. result

if awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT" { f = 1 } END { exit !f }' "$WORK/steps.tsv"; then
  finish 1
elif awk -F'\t' '$2 == "SKIPPED" && $7 ~ /^no time left/ { f = 1 } END { exit !f }' "$WORK/steps.tsv"; then
  finish 4
fi
finish 0
