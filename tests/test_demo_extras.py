"""The demo's optional dependencies: without them the command stops before computing anything
and prints the exact install command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridiff_rt.demo import extras
from hybridiff_rt.testing import hidden_imports_env

ROOT = Path(__file__).resolve().parents[1]

def _run_hidden(tmp_path: Path, hidden: list[str], *args: str) -> subprocess.CompletedProcess:
    env = hidden_imports_env(tmp_path / "shim", hidden,
                             dict(os.environ, PYTHONPATH=str(ROOT)))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_demo_without_matplotlib_stops_first_with_the_install_command(tmp_path):
    run = _run_hidden(tmp_path, ["matplotlib"], "-m", "hybridiff_rt.cli", "demo",
                      "--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("hybridiff-rt: hybridiff-rt demo needs matplotlib"), run.stderr
    assert "Traceback" not in run.stderr
    assert "pip install 'hybridiff_rt[demo]'" in run.stderr
    # nothing was computed: no run started, no output written
    assert "serial run" not in run.stdout and not (tmp_path / "out" / "demo.json").exists()


def test_training_without_scikit_learn_names_its_extra(tmp_path):
    run = _run_hidden(tmp_path, ["sklearn"], "-m", "hybridiff_rt.demo.bundled.train",
                      "--model", "classifier", "--out", str(tmp_path / "w"))
    assert run.returncode != 0
    assert "needs scikit-learn" in run.stderr and "hybridiff_rt[train]" in run.stderr
    assert not (tmp_path / "w").exists()


def test_require_passes_when_everything_is_there_and_lists_only_what_lacks(monkeypatch):
    assert extras.missing("demo") == []  # the test environment has the demo extra
    extras.require("demo", "x")
    monkeypatch.setitem(extras.FEATURES, "fake", ("demo", {"no_such_module_xyz": "no-such-pkg",
                                                           "json": "json"}))
    assert extras.missing("fake") == ["no-such-pkg"]
    with pytest.raises(extras.MissingDependencyError, match="pip install no-such-pkg"):
        extras.require("fake", "something")
