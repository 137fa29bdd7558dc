"""bench/device_check.sh, the one script run on a lent GPU machine, checked without a GPU.

* The GPU tests collect where diffusers and transformers are missing (the GPU machine has no
  diffusers): a subprocess whose import system hides both must collect every GPU test that a normal
  collection finds, and hiding them must add no collection error.
* ``--quick`` without a GPU ends at once with exit 3, a "NO GPU" summary, and nothing built.
* ``--dry-run`` (a pretended GPU; the pytest steps run for real, their GPU tests skipping) checks the
  plumbing end to end: per-step status, TIMEOUT of hanging steps (the build; pytest steps after
  their first test, one deaf to SIGTERM) while later steps still run, junit merged into $OUT after
  every pytest step (rebuilt from the live per-test record when pytest was SIGKILLed), the summary
  files, $OUT within the device tool's 8 files, and exit 4 when the budget runs out.

That dry run spends most of its 40-odd seconds waiting for its hanging steps' limits, so the suite
starts it in the background as soon as collection ends (``start_early``, called by conftest.py when
its test is selected) and the test collects the result when its turn comes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from hybridiff_rt.testing import hidden_imports_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_check.sh"
OUT_FILES = {"summary.txt", "summary.json", "device_check.log", "junit.xml", "transport.json",
             "cfg_kernel.json", "e2e_gpu.json", "e2e_gpu_trace.json.gz"}
QUICK_STEPS = ["wheels", "env", "build", "build_info", "triton_tests", "ipc_tests",
               "transport_bench", "cfg_kernel_bench", "runtime_tests", "e2e_bench"]

def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEVICE_CHECK_", "PYTEST_"))}
    env.update(extra)
    return env


def _hidden_env(tmp_path: Path) -> dict[str, str]:
    """As on the GPU machine (which has no diffusers): `import diffusers` / `transformers` raise
    ModuleNotFoundError, everything else imports from the same environment."""
    return hidden_imports_env(tmp_path / "hide_diffusers", ["diffusers", "transformers"], _env())


def _collect(env: dict[str, str], *args: str) -> tuple[set[str], set[str], str]:
    """(collected test ids, modules with collection errors, output) of a --collect-only run."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--continue-on-collection-errors", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    ids = set(re.findall(r"^(tests/\S+\.py::\S.*?)\s*$", proc.stdout, re.M))
    errors = set(re.findall(r"^ERROR (tests/\S+\.py)", out, re.M))
    assert proc.returncode in (0, 1, 5), out[-4000:]
    return ids, errors, out


def test_gpu_tests_collect_without_diffusers_and_transformers(tmp_path):
    hidden = _hidden_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; import torch\n"
         "assert u.find_spec('diffusers') is None and u.find_spec('transformers') is None\n"
         "try:\n    import diffusers\nexcept ImportError:\n    print('hidden')"],
        cwd=ROOT, env=hidden, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "hidden", probe.stdout + probe.stderr  # the shim works

    normal_ids, normal_errors, _ = _collect(_env(), "-m", "gpu", "tests")
    ids, errors, out = _collect(hidden, "-m", "gpu", "tests")
    # hiding diffusers/transformers adds no collection error (none at all when the tree is sound)
    assert errors <= normal_errors, f"collection errors without diffusers: {errors}\n{out[-4000:]}"
    # and loses no GPU test: the Triton kernel and IPC engine tests above all
    assert ids == normal_ids, sorted(normal_ids ^ ids)
    for module, at_least in (("tests/test_ipc_gpu.py", 7), ("tests/test_ops.py", 17),
                             ("tests/test_gpu_runtime.py", 2)):
        assert sum(i.startswith(module + "::") for i in ids) >= at_least, (module, sorted(ids))

    # the modules that need diffusers skip or run their other tests; they do not fail collection
    ids, errors, out = _collect(hidden, "tests/test_partition.py", "tests/test_stages.py")
    assert not errors, out[-4000:]
    assert "tests/test_partition.py::test_dp_matches_brute_force_on_random_chains" in ids, out
    assert not any(i.startswith("tests/test_stages.py::") for i in ids), out


def _start(work: Path, *args: str, **env: str) -> subprocess.Popen:
    """The script with ARGS, started in WORK: $OUT is WORK/out, its output goes to WORK/stdout and
    WORK/stderr (files, not pipes: a run in the background must never block on a full pipe)."""
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the result is the same on every machine
    with open(work / "stdout", "w") as stdout, open(work / "stderr", "w") as stderr:
        return subprocess.Popen(["bash", str(SCRIPT), *args], cwd=work, stdout=stdout,
                                stderr=stderr, stdin=subprocess.DEVNULL,
                                env=_env(OUT=str(work / "out"), PYTHON=sys.executable,
                                         CUDA_VISIBLE_DEVICES="", **env))


def _finish(proc: subprocess.Popen, work: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Wait for a run of _start (10 minutes at most); its exit status, output and $OUT."""
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, (work / "stdout").read_text(),
                                       (work / "stderr").read_text())
    return done, work / "out"


def _run(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    return _finish(_start(tmp_path, *args, **env), tmp_path)


def _steps(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}


def test_script_syntax():
    for script in ("device_check.sh", "prepare_device_wheels.sh"):
        proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr


def test_unknown_option_is_a_usage_error(tmp_path):
    proc, out = _run(tmp_path, "--qiuck")
    assert proc.returncode == 2 and "unknown option '--qiuck'" in proc.stderr, proc.stderr
    assert "Exit status" in proc.stderr  # the usage text from the script's header
    proc, out = _run(tmp_path, "--quick", DEVICE_CHECK_LIMITS="bild=5")
    assert proc.returncode == 2 and "DEVICE_CHECK_LIMITS" in proc.stderr, proc.stderr


def test_quick_without_a_gpu_exits_3_with_a_no_gpu_summary_and_builds_nothing(tmp_path):
    proc, out = _run(tmp_path, "--quick")
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"summary.txt", "summary.json",
                                               "device_check.log"}
    text = (out / "summary.txt").read_text()
    assert text.startswith("hybridiff_rt device check: NO GPU (exit 3) | mode quick"), text
    assert "GPU: none: torch.cuda.is_available() is False" in text, text
    assert "exit codes:" in text and "3 no GPU" in text, text
    assert text in proc.stdout  # the summary is the end of what the run prints
    data = json.loads((out / "summary.json").read_text())
    assert data["result"] == "NO GPU" and data["exit_code"] == 3 and data["mode"] == "quick"
    steps = _steps(out)
    assert list(steps) == QUICK_STEPS
    assert all(s["status"] == "SKIPPED" and s["note"] == "no GPU" for s in steps.values()), steps
    log = (out / "device_check.log").read_text()
    for command in ("setup.py build_ext", "pip install", "-m pytest", "bench/transport.py"):
        assert command not in log, (command, log)  # nothing built, installed, tested or timed


# The build hangs (SIGTERM at 3 s). The IPC step hangs after its first test, deaf to SIGTERM
# (SIGKILL 10 s after its 12 s limit: pytest never writes its junit). The runtime step, last in
# --quick, hangs after its one test (SIGTERM at 12 s: pytest ends and writes its junit).
HANGING_DRY_RUN = (("--quick", "--dry-run"),
                   {"DEVICE_CHECK_DRY_HANG": "build ipc_tests:hard runtime_tests",
                    "DEVICE_CHECK_LIMITS": "build=3 ipc_tests=12 runtime_tests=12"})
_early: dict[str, object] = {}  # the hanging dry run started by start_early: "work", "proc"


def start_early(selected: set[str]) -> None:
    """Start the hanging dry run in the background when its test is among SELECTED (test names);
    conftest.py calls this once collection has ended."""
    if "test_dry_run_reports_timeouts_keeps_going_and_keeps_every_result" in selected and \
            not _early:
        work = Path(tempfile.mkdtemp(prefix="hybridiff_rt_dry_run_"))
        args, env = HANGING_DRY_RUN
        _early.update(work=work, proc=_start(work, *args, **env))


def stop_early() -> None:
    """End the background dry run if its test never collected it (conftest.py, session end)."""
    if _early:
        proc, work = _early.pop("proc"), _early.pop("work")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_dry_run_reports_timeouts_keeps_going_and_keeps_every_result(tmp_path):
    # All three hanging steps are TIMEOUT, every other step still runs, and no finished test's
    # result is lost.
    if _early:  # started in the background at the end of collection
        proc, out = _finish(_early["proc"], _early["work"])
    else:
        args, env = HANGING_DRY_RUN
        proc, out = _run(tmp_path, *args, **env)
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files <= OUT_FILES and len(files) <= 8, files
    assert {"summary.txt", "summary.json", "device_check.log", "junit.xml"} <= files, files

    data = json.loads((out / "summary.json").read_text())
    assert data["result"] == "FAILED" and data["exit_code"] == 1 and data["dry_run"] is True
    steps = _steps(out)
    assert list(steps) == QUICK_STEPS
    status = {name: s["status"] for name, s in steps.items()}
    assert status["wheels"] in ("ok", "SKIPPED"), steps["wheels"]  # SKIPPED: no .whl/ here
    for name in ("env", "build_info", "triton_tests", "transport_bench", "cfg_kernel_bench",
                 "e2e_bench"):
        assert status[name] == "ok", (name, steps[name])
    for name, limit, exit_codes in (("build", 3, (124,)), ("ipc_tests", 12, (137,)),
                                    ("runtime_tests", 12, (124,))):
        step = steps[name]
        assert step["status"] == "TIMEOUT" and step["limit_s"] == limit, step
        assert step["exit"] in exit_codes, step
        assert f"killed at its {limit}s limit" in step["detail"], step
    # the pytest steps' counts: from junit, or from the live record when pytest was SIGKILLed
    triton, ipc, runtime = steps["triton_tests"], steps["ipc_tests"], steps["runtime_tests"]
    assert triton["tests"]["skipped"] >= 17 and not triton["tests"].get("source"), triton
    assert ipc["tests"]["tests"] == 1 and ipc["tests"]["source"].startswith("live record"), ipc
    assert "in tests/test_ipc_gpu.py::" in ipc["detail"], ipc
    assert "(no junit: from the live record)" in ipc["detail"], ipc
    assert runtime["tests"]["skipped"] == 1 and not runtime["tests"].get("source"), runtime
    assert "in tests/test_gpu_runtime.py::" in runtime["detail"], runtime

    suites = ET.parse(out / "junit.xml").getroot().findall("testsuite")
    assert [s.get("name") for s in suites] == ["triton_tests", "ipc_tests", "runtime_tests"]
    assert [len(s.findall("testcase")) for s in suites][1:] == [1, 1]
    assert "rebuilt by bench/device_check.sh" in suites[1].find("system-out").text

    text = (out / "summary.txt").read_text()
    assert text.startswith("hybridiff_rt device check: FAILED (exit 1) | mode quick --dry-run")
    assert re.search(r"^build +TIMEOUT +\d+s +3s  killed at its 3s limit", text, re.M), text
    assert re.search(r"^triton_tests +ok .* 0 passed, \d+ skipped", text, re.M), text
    assert text in proc.stdout  # the summary is the end of what the run prints
    log = (out / "device_check.log").read_text()
    assert "dry run: would run:" in log and "bench/transport.py --out" in log
    assert re.search(r"would run: \S+ bench/e2e_gpu\.py --out \S+ --quick --timeout \d+", log)
    assert "KeyboardInterrupt: device_check: the step reached its time limit" in log, log[-3000:]


def test_budget_exhausted_is_exit_4(tmp_path):
    proc, out = _run(tmp_path, "--quick", "--dry-run", DEVICE_CHECK_BUDGET_S="3")
    assert proc.returncode == 4, proc.stdout[-3000:]
    steps = _steps(out)
    assert all(s["status"] in ("SKIPPED", "ok") for s in steps.values()), steps
    assert steps["build"]["status"] == "SKIPPED"
    assert steps["build"]["note"].startswith("no time left"), steps["build"]
    assert json.loads((out / "summary.json").read_text())["result"] == "INCOMPLETE"


def test_header_documents_exit_codes_and_out_files():
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    for code in range(5):
        assert re.search(rf"^#   {code}  ", head, re.M), code
    for name in OUT_FILES:
        assert name in head, name
