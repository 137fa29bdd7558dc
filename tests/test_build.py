"""Build-time helpers that need no compiler: locating a pip-installed CUDA runtime
(hybridiff_rt/env.py, used by setup.py for builds without nvcc)."""

from __future__ import annotations

import os

from hybridiff_rt import env


def _touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _runtime(home, version, major, crt=True):
    _touch(os.path.join(home, "include", "cuda_runtime_api.h"),
           f"#pragma once\n#define CUDART_VERSION  {version}\n")
    if crt:
        _touch(os.path.join(home, "include", "crt", "host_defines.h"))
    _touch(os.path.join(home, "lib", f"libcudart.so.{major}"))


def test_cuda13_pip_layout(tmp_path):
    root = str(tmp_path)
    _runtime(os.path.join(root, "nvidia", "cu13"), 13050, 13)
    found = env.find_pip_cuda_runtime([str(tmp_path / "empty"), root])
    assert found["version"] == (13, 5)
    assert found["library"] == os.path.join(root, "nvidia", "cu13", "lib", "libcudart.so.13")
    assert found["include_dirs"] == [os.path.join(root, "nvidia", "cu13", "include")]
    assert found["rpath"] == os.path.join("nvidia", "cu13", "lib")


def test_cuda12_pip_layout_takes_crt_from_cuda_nvcc(tmp_path):
    root = str(tmp_path)
    _runtime(os.path.join(root, "nvidia", "cuda_runtime"), 12080, 12, crt=False)
    assert env.find_pip_cuda_runtime([root]) is None  # crt/host_defines.h missing
    _touch(os.path.join(root, "nvidia", "cuda_nvcc", "include", "crt", "host_defines.h"))
    found = env.find_pip_cuda_runtime([root])
    assert found["version"] == (12, 8)
    assert found["include_dirs"] == [os.path.join(root, "nvidia", "cuda_runtime", "include"),
                                     os.path.join(root, "nvidia", "cuda_nvcc", "include")]
    assert found["rpath"] == os.path.join("nvidia", "cuda_runtime", "lib")
    # named directly (HYBRIDIFF_RT_CUDA_HOME), the pip tree gets the same relative RUNPATH
    direct = env.cuda_runtime_at(os.path.join(root, "nvidia", "cuda_runtime"))
    assert direct["rpath"] == found["rpath"]


def test_cuda_home_needs_the_shared_library_of_its_major(tmp_path):
    home = str(tmp_path / "cuda")
    _runtime(home, 12040, 12)
    os.remove(os.path.join(home, "lib", "libcudart.so.12"))
    _touch(os.path.join(home, "lib64", "libcudart.so.11"))
    assert env.cuda_runtime_at(home) is None
    _touch(os.path.join(home, "lib64", "libcudart.so.12"))
    assert env.cuda_runtime_at(home)["version"] == (12, 4)
    assert "rpath" not in env.cuda_runtime_at(home)  # a toolkit, not a pip tree
    assert env.cuda_runtime_at(str(tmp_path / "nowhere")) is None


def test_cuda_fit_verdicts():
    from hybridiff_rt.cli import cuda_fit

    assert cuda_fit(0, None, None).startswith("no CUDA in this build")
    assert cuda_fit(0, "13.0", None).startswith("no CUDA driver: install an NVIDIA driver for CUDA 13")
    assert cuda_fit(12080, "13.0", "13.0").startswith("driver supports CUDA 12.8")
    assert cuda_fit(13020, "13.0", "13.0").startswith("ok")
    assert cuda_fit(13000, "12.8", "12.8").startswith("ok")
    assert "+cu128" in cuda_fit(13000, "13.0", "12.8")
