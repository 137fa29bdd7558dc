"""The package's layering and its environment variables, checked as part of the test suite.

The layers are import-linter contracts in pyproject.toml; `lint-imports` reads the real import
graph of the source tree, so a new upward import (the engine importing the diffusers adapter, the
core importing the demo, ...) fails here with the offending chain printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hybridiff_rt import env

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` run on the package tree in ``tree`` (its pyproject.toml's contracts)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("import-linter is not installed: pip install -e '.[test]'")
    return subprocess.run([exe, "--no-cache"], cwd=tree, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(tree)))


def test_import_linter_contracts_are_kept():
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", out)
    assert kept, out
    assert int(kept.group(2)) == 0 and int(kept.group(1)) >= 5, out


def test_an_upward_import_breaks_a_contract(tmp_path):
    """The contracts bite: a copy of the package whose schedule imports the engine is refused."""
    copy = tmp_path / "hybridiff_rt"
    shutil.copytree(ROOT / "hybridiff_rt", copy,
                    ignore=shutil.ignore_patterns("weights", "*.so", "__pycache__"))
    schedule = copy / "schedule.py"
    schedule.write_text(schedule.read_text() + "\nfrom .engine import runtime  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    run = _lint_imports(tmp_path)
    assert run.returncode != 0
    assert "hybridiff_rt.schedule is not allowed to import hybridiff_rt.engine" in run.stdout


def test_environment_variables_are_read_only_through_hybridiff_rt_env():
    """No Python source reads a HYBRIDIFF_RT_* variable from os.environ itself: they go through
    ``env.read``, which refuses undeclared names; and the README lists every declared variable
    with its default."""
    direct = re.compile(r"(environ(\.get)?\s*[\[(]|getenv\s*\()\s*[\"']HYBRIDIFF_RT_")
    offenders = []
    for folder in ("hybridiff_rt", "tests", "bench", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            if path != ROOT / "hybridiff_rt" / "env.py" and direct.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    if direct.search((ROOT / "setup.py").read_text()):
        offenders.append("setup.py")
    assert offenders == [], "read these through hybridiff_rt.env.read"
    readme = (ROOT / "README.md").read_text()
    for row in env.markdown_table().splitlines():
        assert row in readme, f"README's environment table lacks: {row}"


def test_env_read_returns_value_or_default(monkeypatch):
    monkeypatch.setenv("HYBRIDIFF_RT_IPC_STAGING", " host ")
    assert env.read("HYBRIDIFF_RT_IPC_STAGING") == "host"
    monkeypatch.setenv("HYBRIDIFF_RT_IPC_STAGING", "")
    assert env.read("HYBRIDIFF_RT_IPC_STAGING") == "auto"
    monkeypatch.delenv("HYBRIDIFF_RT_TIMEOUT_S", raising=False)
    assert float(env.read("HYBRIDIFF_RT_TIMEOUT_S")) == 30.0
    with pytest.raises(KeyError):
        env.read("HYBRIDIFF_RT_NOT_DECLARED")


def test_cli_env_prints_the_declared_table():
    run = subprocess.run([sys.executable, "-m", "hybridiff_rt.cli", "env"], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == env.markdown_table()
    assert run.stderr.strip() == ""
