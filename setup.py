"""Build hybridiff_rt and its extension module hybridiff_rt._C with CMake.

Environment variables (HYBRIDIFF_RT_* are declared with their defaults in hybridiff_rt/env.py):
  HYBRIDIFF_RT_CUDA        auto (default) | on | off. auto compiles CUDA when nvcc is found; on fails
                           without nvcc; off builds the host-only module.
  HYBRIDIFF_RT_CUDA_ARCHS  CMake CUDA architectures, e.g. "90" or "80-real;90" (default: 75 80 86 89
                           90, plus 100 and 120 when the toolkit supports them; PTX for the newest).
  CUDA_HOME / CUDACXX      where to look for nvcc (else PATH, then /usr/local/cuda).
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: number of CPUs).

The wheel's local version says what was compiled in: 0.1.0+cu130 (CUDA 13.0) or 0.1.0+cpu.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_env_module():
    """hybridiff_rt/env.py by path: the package itself (and torch) cannot be imported here."""
    spec = importlib.util.spec_from_file_location("_hybridiff_rt_env", ROOT / "hybridiff_rt" / "env.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


ENV = _load_env_module()
BASE_VERSION = "0.1.0"
DEFAULT_ARCHS = ("75", "80", "86", "89", "90", "100", "120")


def find_nvcc() -> str | None:
    """Path of nvcc, or None when no CUDA toolkit is found."""
    candidates = []
    if os.environ.get("CUDACXX"):
        candidates.append(os.environ["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path) if os.path.basename(path) == "nvcc" else path
    return None


def nvcc_version(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot parse the CUDA version from `{nvcc} --version`:\n{out}")
    return int(match.group(1)), int(match.group(2))


def default_archs(nvcc: str) -> str:
    """The default architecture list restricted to what this nvcc supports; PTX for the newest."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             check=True).stdout
        supported = set(re.findall(r"compute_(\d+)", out))
    except (OSError, subprocess.CalledProcessError):
        supported = {"75", "80", "86", "89", "90"}
    archs = [a for a in DEFAULT_ARCHS if a in supported]
    if not archs:
        raise RuntimeError(f"{nvcc} supports none of the architectures {DEFAULT_ARCHS}; "
                           "set HYBRIDIFF_RT_CUDA_ARCHS")
    return ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])


def cuda_choice() -> tuple[str | None, tuple[int, int] | None]:
    """(nvcc path, (major, minor)) when CUDA is compiled in, else (None, None)."""
    mode = ENV.read("HYBRIDIFF_RT_CUDA").lower()
    if mode not in ("auto", "on", "off"):
        raise RuntimeError(f"HYBRIDIFF_RT_CUDA must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None, None
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "on":
            raise RuntimeError("HYBRIDIFF_RT_CUDA=on but no nvcc was found: install a CUDA "
                               "toolkit, set CUDA_HOME or CUDACXX, or use HYBRIDIFF_RT_CUDA=off")
        return None, None
    return nvcc, nvcc_version(nvcc)


NVCC, CUDA_VERSION = cuda_choice()
LOCAL_TAG = f"cu{CUDA_VERSION[0]}{CUDA_VERSION[1]}" if CUDA_VERSION else "cpu"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; the module lands where setuptools expects it
    (the source tree for editable installs)."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A persistent build folder keeps rebuilds incremental (editable installs use a fresh
        # build_temp every time); one per interpreter and CUDA choice.
        build_dir = ROOT / "build" / f"cmake-{LOCAL_TAG}-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found: `pip install cmake` or install it with your "
                               "system package manager")
        ninja = shutil.which("ninja")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'module'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DHYBRIDIFF_RT_VERSION={BASE_VERSION}+{LOCAL_TAG}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if NVCC:
            archs = ENV.read("HYBRIDIFF_RT_CUDA_ARCHS") or default_archs(NVCC)
            args += ["-DHYBRIDIFF_RT_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={NVCC}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        else:
            args.append("-DHYBRIDIFF_RT_WITH_CUDA=OFF")
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        # Reuse the folder only when the same tools configured it (an isolated build's cmake and
        # ninja live in a temporary environment that is gone afterwards).
        stamp = build_dir / "hybridiff_rt_tools.txt"
        tools = "\n".join([cmake, ninja or "make", sys.executable, *args])
        if not stamp.exists() or stamp.read_text() != tools:
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True,
                       env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C"], check=True, env=env)
        stamp.write_text(tools)
        built = sorted((build_dir / "module").glob("_C*.so"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _C*.so in {build_dir / 'module'}, found {built}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(built[0], tmp)
        os.replace(tmp, target)  # a new inode: processes that loaded the old module keep it


setup(
    version=f"{BASE_VERSION}+{LOCAL_TAG}",
    ext_modules=[CMakeExtension("hybridiff_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
)
