"""The hybridiff-rt command: info runs on a machine without a GPU and says so."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hybridiff_rt.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_info_reports_versions_extension_and_gpus():
    done = _run("info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["torch"] == torch.__version__
    assert info["extension"]["available"], info["extension"]
    assert isinstance(info["extension"]["cuda_compiled"], bool)
    if info["extension"]["cuda_compiled"]:
        assert info["extension"]["cuda_version"]
        # device code (archs) exists in an nvcc build; a build against the pip CUDA runtime
        # (shared cudart) has none
        assert info["extension"]["archs"] or info["extension"]["cudart"] == "shared"
    if not torch.cuda.is_available():
        assert info["gpus"] == [] and info["gpu_note"]
        assert info["ipc"]["available"] is False and info["ipc"]["reason"]
        assert info["ipc_self_test"] == {"status": "skipped", "detail": "no GPU"}
    else:
        # with GPUs, info sets the IPC transport up between two local processes (self-test)
        assert info["ipc_self_test"]["status"] in ("passed", "failed", "skipped"), info
        if info["ipc"]["available"]:
            assert info["ipc_self_test"]["status"] == "passed", info["ipc_self_test"]
        n = len(info["gpus"])
        assert n == torch.cuda.device_count()
        assert len(info["peer_access"]) == n and all(len(row) == n for row in info["peer_access"])
    text = _run("info")
    assert text.returncode == 0, text.stderr
    for label in ("torch", "triton", "diffusers", "extension _C", "NCCL", "GPU", "IPC self-test"):
        assert label in text.stdout


def test_unknown_command_fails_with_usage():
    done = _run("frobnicate")
    assert done.returncode != 0 and "usage" in done.stderr
