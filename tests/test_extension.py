"""The compiled extension hybridiff_rt._C: what it was built for, and its device-query errors on a
machine without a usable CUDA driver. The GPU behaviour itself is in test_ipc_gpu.py."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import site
import subprocess
import sys
import textwrap

import pytest
import torch

_C = pytest.importorskip("hybridiff_rt._C", reason="extension not built: pip install -e .")
from hybridiff_rt.comm import ipc  # noqa: E402
from hybridiff_rt.errors import CudaUnavailableError, ExtensionError  # noqa: E402

NO_GPU = not torch.cuda.is_available()


def test_build_info_fields_are_consistent():
    info = _C.build_info()
    assert isinstance(info["cuda_compiled"], bool)
    assert info["pybind11"].count(".") == 2 and info["compiler"]
    if info["cuda_compiled"]:
        major, minor = (int(x) for x in info["cuda_version"].split("."))
        assert major >= 11 and info["version"].endswith(f"+cu{major}{minor}")
        archs = [a.split("-")[0] for a in info["archs"]]
        assert info["cudart"] in ("static", "shared")
        if info["cudart"] == "static":  # nvcc build: device code for these architectures
            assert archs and all(a.isdigit() for a in archs)
        else:  # built without nvcc against a pip CUDA runtime: host code only
            assert archs == []
    else:
        assert info["cuda_version"] is None and info["archs"] == []
        assert info["version"].endswith("+cpu")


def test_installed_version_tag_matches_the_build():
    # Look in site-packages only: a source tree may hold a stale hybridiff_rt.egg-info.
    dists = list(importlib.metadata.distributions(name="hybridiff_rt",
                                                  path=site.getsitepackages()))
    if not dists:
        pytest.skip("package not installed (built with setup.py build_ext --inplace)")
    installed, built = dists[0].version, _C.build_info()["version"]
    if "+" in installed:  # a wheel built from the tree: its local tag names what was compiled
        assert installed == built
    else:  # built from the sdist, which carries no local tag: the module still says what it is
        base, tag = built.split("+")
        assert base == installed and re.fullmatch(r"cpu|cu\d{3}", tag), built


def test_cudart_is_linked_statically():
    """An nvcc build must import where no CUDA runtime library is installed; a build without nvcc
    uses the shared libcudart of the nvidia-cuda-runtime pip package (the one torch loads)."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert _C.__file__ in maps
    own_cudart = [line for line in maps.splitlines() if "libcudart" in line and "torch" not in line
                  and "nvidia" not in line]
    assert own_cudart == []
    if _C.build_info()["cudart"] == "shared":
        major = _C.build_info()["cuda_version"].split(".")[0]
        assert f"libcudart.so.{major}" in maps


@pytest.mark.skipif(not NO_GPU, reason="this machine has a usable CUDA device")
def test_device_queries_raise_cuda_unavailable_without_a_driver():
    for call in (_C.device_count, lambda: _C.device_properties(0), lambda: _C.can_access_peer(0, 1)):
        with pytest.raises(_C.CudaUnavailable) as info:
            call()
        text = str(info.value)
        if _C.build_info()["cuda_compiled"]:
            assert "cudaGetDeviceCount" in text and ("cudaErrorInsufficientDriver" in text
                                                     or "cudaErrorNoDevice" in text)
        else:
            assert "built without CUDA" in text


SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not NO_GPU, reason="this machine has a usable CUDA device")
def test_device_query_errors_name_the_source_file_not_the_build_path():
    """`hybridiff-rt info` shows these texts: no absolute path of the build machine in them."""
    import json

    from hybridiff_rt import cli

    with pytest.raises(_C.CudaUnavailable) as info:
        _C.device_count()
    text = str(info.value)
    report = json.dumps(cli.collect_info(), default=str)
    for shown in (text, report):
        assert SOURCE_ROOT not in shown and "/csrc/" not in shown, shown
        if _C.build_info()["cuda_compiled"]:
            assert "[cuda_query.cpp:" in shown, shown


@pytest.mark.skipif(not NO_GPU, reason="this machine has a usable CUDA device")
def test_python_wrapper_translates_to_cuda_unavailable_error():
    with pytest.raises(CudaUnavailableError, match="driver|built without CUDA") as info:
        ipc.cuda_device_count()
    assert isinstance(info.value, ExtensionError)
    with pytest.raises(CudaUnavailableError):
        ipc.peer_access_matrix()
    ok, reason = ipc.ipc_available()
    assert not ok and ("driver" in reason or "without CUDA" in reason)
    assert ipc.build_info()["available"] is True


def test_ipc_module_imports_cleanly_without_the_extension():
    code = textwrap.dedent("""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hybridiff_rt._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        from hybridiff_rt.comm import ipc
        from hybridiff_rt.errors import CudaUnavailableError
        info = ipc.build_info()
        assert info["available"] is False and "blocked" in info["import_error"], info
        ok, reason = ipc.ipc_available()
        assert not ok and "pip install -e ." in reason, reason
        try:
            ipc.cuda_device_count()
        except CudaUnavailableError as exc:
            assert "not importable" in str(exc)
        else:
            raise AssertionError("no error")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


@pytest.mark.skipif(not NO_GPU, reason="this machine has a usable CUDA device")
def test_ipc_setup_fails_on_every_rank_together_without_cuda():
    """make_ipc_transport is collective: without CUDA both ranks get the same refusal quickly
    (not a timeout), so both can fall back to torch.distributed together."""
    import multiprocessing as mp

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=20),
                     wait_for_workers=False)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()

    def rank1(conn, port):
        try:
            s = TCPStore("127.0.0.1", port, 2, False)
            transport, reason = ipc.try_make_ipc_transport(s, 1, 2, "cuda:0", 5.0)
            conn.send((transport is None, reason))
        except BaseException as exc:
            conn.send((False, f"{type(exc).__name__}: {exc}"))

    proc = ctx.Process(target=rank1, args=(child, store.port), daemon=True)
    proc.start()
    transport, reason0 = ipc.try_make_ipc_transport(store, 0, 2, "cuda:0", 5.0)
    assert parent.poll(20)
    fell_back, reason1 = parent.recv()
    proc.join(5)
    assert transport is None and fell_back, reason1
    for reason in (reason0, reason1):
        assert "rank 0:" in reason and "rank 1:" in reason, reason


def test_extension_exceptions_derive_from_runtime_error():
    for name in ("PeerTimeout", "MessageMismatch", "CudaUnavailable", "CudaCallError",
                 "ProtocolError"):
        assert issubclass(getattr(_C, name), RuntimeError)


def test_pair_staging_uses_device_memory_only_where_both_sides_can_map_it():
    def info(uuid, visible, access):
        return {"uuid": uuid, "visible": visible, "index": visible.index(uuid), "access": access}

    both = [[True, True], [True, True]]
    one_way = [[True, True], [False, True]]
    a, b = info("A", ["A", "B"], both), info("B", ["A", "B"], both)
    assert ipc._pair_staging(a, dict(a)) == "device"  # two processes on one GPU
    assert ipc._pair_staging(a, b) == ipc._pair_staging(b, a) == "device"
    a1, b1 = info("A", ["A", "B"], one_way), info("B", ["A", "B"], one_way)
    assert ipc._pair_staging(a1, b1) == ipc._pair_staging(b1, a1) == "host"
    hidden_a, hidden_b = info("A", ["A"], [[True]]), info("B", ["B"], [[True]])
    assert ipc._pair_staging(hidden_a, hidden_b) == "host"  # CUDA_VISIBLE_DEVICES split
