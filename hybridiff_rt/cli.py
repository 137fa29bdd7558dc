"""The ``hybridiff-rt`` command: ``info`` (what this machine and build can do), ``env`` (the
environment variables it reads), ``demo`` (the bundled end-to-end run: serial vs two devices on
tiny trained models) and ``curve`` (a pipeline's measured discrepancy curve and switch point)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from typing import Any


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def cuda_fit(driver: int, extension_cuda: str | None, torch_cuda: str | None) -> str:
    """One line: whether the driver (cudaDriverGetVersion, e.g. 12080; 0 = no driver), the CUDA the
    extension was built for ("13.0"; None = host-only) and torch's ("12.8"; None = CPU) fit, and
    what to install when they do not. Same major suffices (CUDA minor-version compatibility)."""
    ext_major, torch_major = _major(extension_cuda), _major(torch_cuda)
    if ext_major is not None and torch_major is not None and ext_major != torch_major:
        return (f"mismatch: extension built for CUDA {extension_cuda}, torch for CUDA {torch_cuda}: "
                f"install the hybridiff_rt +cu{torch_cuda.replace('.', '')} wheel (or rebuild "
                f"against nvidia-cuda-runtime for CUDA {torch_major})")
    needed = max((m for m in (ext_major, torch_major) if m is not None), default=None)
    if needed is None:
        return "no CUDA in this build or in torch: nothing to check"
    if driver <= 0:
        return f"no CUDA driver: install an NVIDIA driver for CUDA {needed}.x or newer"
    have = driver // 1000
    if have < needed:
        return (f"driver supports CUDA {have}.{driver % 1000 // 10}, the build needs CUDA {needed}: "
                f"upgrade the NVIDIA driver or install the +cu{have}x wheels of torch and hybridiff_rt")
    return f"ok: driver CUDA {have}.{driver % 1000 // 10} runs CUDA {needed} builds"


def collect_info() -> dict[str, Any]:
    """Versions, the extension's build, NCCL and the GPUs with their peer-access matrix."""
    import torch

    from . import __version__
    from .comm import ipc
    from .errors import CudaUnavailableError

    info: dict[str, Any] = {
        "hybridiff_rt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "extension": ipc.build_info(),
        "nccl": _nccl_version(torch),
        "ipc": dict(zip(("available", "reason"), ipc.ipc_available())),
    }
    try:
        count = ipc.cuda_device_count()
        info["gpus"] = [ipc.device_properties(i) for i in range(count)]
        info["peer_access"] = ipc.peer_access_matrix()
    except CudaUnavailableError as exc:
        info["gpus"] = []
        info["gpu_note"] = str(exc)
    driver = 0
    try:
        driver = int(ipc._C.driver_version()) if ipc._C is not None else 0
    except Exception:  # noqa: BLE001 - reported as "no driver"
        driver = 0
    ext = info["extension"]
    info["cuda_fit"] = cuda_fit(driver, ext.get("cuda_version") if ext.get("cuda_compiled") else None,
                                torch.version.cuda)
    info["ipc_self_test"] = ipc_self_test(info)
    return info


def ipc_self_test(info: dict[str, Any]) -> dict[str, Any]:
    """Set up the CUDA IPC transport between two local processes (on GPUs 0 and 1 when there are
    two, else both on GPU 0), which runs its self-test (a known pattern each way through the real
    slots) and link measurement; returns ``{"status": "passed" | "failed" | "skipped", "detail"}``.
    """
    if not info["gpus"]:
        return {"status": "skipped", "detail": "no GPU"}
    if not info["ipc"]["available"]:
        return {"status": "skipped", "detail": f"IPC not usable: {info['ipc']['reason']}"}
    from .testing import run_ranks

    try:
        outcomes = run_ranks(_ipc_self_test_rank, len(info["gpus"]), timeout_s=180)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal for `info`
        return {"status": "failed", "detail": f"{type(exc).__name__}: {exc}"}
    results = [outcomes.get(rank) for rank in (0, 1)]
    if any(r is None or not r.ok for r in results):
        errors = [f"rank {rank}: " + ("no result (killed or timed out)" if r is None else
                                     f"{r.error_type}: {r.error}")
                  for rank, r in enumerate(results) if r is None or not r.ok]
        return {"status": "failed", "detail": "; ".join(errors)}
    passed, detail = results[0].value
    return {"status": "passed" if passed else "failed", "detail": detail}


def _ipc_self_test_rank(rank: int, gpus: int) -> tuple[bool, str]:
    import torch

    from .comm import default_store, init_distributed, ipc

    init_distributed(backend="gloo", timeout_s=60)
    device = torch.device("cuda", rank if gpus > 1 else 0)
    transport, reason = ipc.try_make_ipc_transport(default_store(), rank, 2, device, 30.0,
                                                   handshake_timeout_s=60.0)
    if transport is None:
        return False, reason
    notes = "; ".join(transport.notes)
    transport.close()
    return True, notes


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl_version(torch: Any) -> str | None:
    try:
        if torch.cuda.is_available():
            return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    wheel = _version("nvidia-nccl-cu12")
    return f"nvidia-nccl-cu12 {wheel}" if wheel else None


def print_info(info: dict[str, Any]) -> None:
    ext = info["extension"]
    rows = [
        ("hybridiff_rt", info["hybridiff_rt"]),
        ("python", info["python"]),
        ("torch", f"{info['torch']} (CUDA {info['torch_cuda'] or 'none'})"),
        ("triton", info["triton"] or "not installed"),
        ("diffusers", info["diffusers"] or "not installed"),
        ("transformers", info["transformers"] or "not installed"),
        ("extension _C", "not importable: " + str(ext.get("import_error"))
         if not ext.get("available") else
         f"CUDA {ext.get('cuda_version')} ({ext.get('cudart')} cudart) archs "
         f"{','.join(map(str, ext.get('archs', []))) or 'none (no device code)'}"
         if ext.get("cuda_compiled") else "host-only build (no CUDA compiled in)"),
        ("CUDA fit", info.get("cuda_fit", "")),
        ("NCCL", info["nccl"] or "not found"),
        ("CUDA IPC transport", "usable" if info["ipc"]["available"]
         else f"not usable: {info['ipc']['reason']}"),
        ("IPC self-test", f"{info['ipc_self_test']['status']} "
                          f"({info['ipc_self_test']['detail']})"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if not info["gpus"]:
        print(f"{'GPUs':<{width}}  none ({info.get('gpu_note', '')})")
        return
    for i, gpu in enumerate(info["gpus"]):
        print(f"{'GPU ' + str(i):<{width}}  {gpu.get('name')}  "
              f"{gpu.get('total_memory', 0) / 2**30:.1f} GiB  sm_{gpu.get('major')}{gpu.get('minor')}")
    matrix = info["peer_access"]
    print("peer access (row can read column):")
    print("      " + " ".join(f"{j:>4}" for j in range(len(matrix))))
    for i, row in enumerate(matrix):
        print(f"{i:>4}  " + " ".join(f"{'yes' if v else ('-' if i == j else 'no'):>4}"
                                      for j, v in enumerate(row)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybridiff-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="versions, extension build, NCCL, GPUs, peer access")
    info_parser.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("env", help="the environment variables hybridiff_rt reads, with defaults")
    demo_parser = sub.add_parser("demo", help="serial vs two-device run on the bundled models")
    from .demo.command import add_arguments

    add_arguments(demo_parser)
    curve_parser = sub.add_parser("curve", help="a pipeline's measured discrepancy curve M_i and "
                                                "where the switching rule fires on it")
    from .demo.curve import add_arguments as add_curve_arguments

    add_curve_arguments(curve_parser)
    args = parser.parse_args(argv)
    if args.command == "info":
        info = collect_info()
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            print_info(info)
        return 0
    if args.command == "env":
        from .env import markdown_table

        print(markdown_table())
        return 0
    if args.command == "curve":
        from .demo.curve import run_curve

        return run_curve(args)
    from .demo.command import run_demo
    from .demo.extras import MissingDependencyError

    try:
        return run_demo(args)
    except MissingDependencyError as exc:
        print(f"hybridiff-rt: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
