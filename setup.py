"""Build hybridiff_rt and its extension module hybridiff_rt._C with CMake.

Environment variables (HYBRIDIFF_RT_* are declared with their defaults in hybridiff_rt/env.py):
  HYBRIDIFF_RT_CUDA        auto (default) | on | off. auto compiles CUDA when nvcc is found; on fails
                           without nvcc; off builds the host-only module.
  HYBRIDIFF_RT_CUDA_ARCHS  CMake CUDA architectures, e.g. "90" or "80-real;90" (default: 75 80 86 89
                           90, plus 100 and 120 when the toolkit supports them; PTX for the newest).
  HYBRIDIFF_RT_CUDA_HOME   build without nvcc against this CUDA runtime folder (headers + shared
                           libcudart.so.N). Without nvcc (and without this), auto/on use the
                           nvidia-cuda-runtime pip package of this interpreter (nvidia/cu13, or
                           nvidia/cuda_runtime + nvidia/cuda_nvcc for CUDA 12): host C++ only,
                           shared cudart, no device kernels (build with --no-build-isolation).
  CUDA_HOME / CUDACXX      where to look for nvcc (else PATH, then /usr/local/cuda).
  CMAKE_BUILD_PARALLEL_LEVEL  build jobs (default: number of CPUs).

The wheel's local version says what was compiled in: 0.1.0+cu130 (CUDA 13.0) or 0.1.0+cpu. The
sdist, and a wheel built from it, carry the plain 0.1.0 (build_info() tells what was compiled).
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


def site_roots() -> list[str]:
    """Folders where pip installs packages for this interpreter (site-packages first)."""
    import site

    roots = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        roots.append(site.getusersitepackages())
    roots += [p for p in sys.path if p.endswith("-packages")]
    return list(dict.fromkeys(os.path.abspath(r) for r in roots if r and os.path.isdir(r)))


def cuda_choice() -> tuple[str | None, dict | None, tuple[int, int] | None]:
    """(nvcc path, None, version) for an nvcc build, (None, runtime, version) for a build against
    a CUDA runtime without nvcc (see hybridiff_rt/env.py cuda_runtime_at), else (None, None, None)."""
    mode = ENV.read("HYBRIDIFF_RT_CUDA").lower()
    if mode not in ("auto", "on", "off"):
        raise RuntimeError(f"HYBRIDIFF_RT_CUDA must be auto, on or off, got {mode!r}")
    if mode == "off":
        return None, None, None
    home = ENV.read("HYBRIDIFF_RT_CUDA_HOME")
    if home:
        runtime = ENV.cuda_runtime_at(os.path.abspath(home))
        if runtime is None:
            raise RuntimeError(f"HYBRIDIFF_RT_CUDA_HOME={home} holds no usable CUDA runtime: it "
                               "needs include/cuda_runtime_api.h, include/crt/host_defines.h (or "
                               "../cuda_nvcc/include/crt) and lib/libcudart.so.<major>")
        return None, runtime, runtime["version"]
    nvcc = find_nvcc()
    if nvcc is not None:
        return nvcc, None, nvcc_version(nvcc)
    runtime = ENV.find_pip_cuda_runtime(site_roots())
    if runtime is not None:
        return None, runtime, runtime["version"]
    if mode == "on":
        raise RuntimeError("HYBRIDIFF_RT_CUDA=on but neither nvcc nor a pip CUDA runtime was "
                           "found: install a CUDA toolkit (or set CUDA_HOME / CUDACXX), or "
                           "`pip install nvidia-cuda-runtime nvidia-cuda-crt` (CUDA 13) / "
                           "`pip install nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12` (CUDA 12) "
                           "and build with --no-build-isolation, or use HYBRIDIFF_RT_CUDA=off")
    return None, None, None


NVCC, CUDART, CUDA_VERSION = cuda_choice()
LOCAL_TAG = f"cu{CUDA_VERSION[0]}{CUDA_VERSION[1]}" if CUDA_VERSION else "cpu"
# The build folder also says whether cudart is shared (a no-nvcc build) or static (nvcc).
BUILD_TAG = LOCAL_TAG + ("-shared" if CUDART else "")
# An sdist carries no local tag: what it compiles to is decided on the machine that builds it,
# and pip refuses an sdist whose built metadata names another version than its file name. So
# both making the sdist and building from an unpacked one (it has PKG-INFO at its root) use the
# plain version; the extension's build_info() still says what was compiled in.
FROM_SDIST = "sdist" in sys.argv[1:] or (ROOT / "PKG-INFO").is_file()
PACKAGE_VERSION = BASE_VERSION if FROM_SDIST else f"{BASE_VERSION}+{LOCAL_TAG}"


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
        build_dir = ROOT / "build" / f"cmake-{BUILD_TAG}-py{sys.version_info[0]}{sys.version_info[1]}"
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
        elif CUDART:
            # No nvcc: host C++ against the runtime's headers, linked to its shared libcudart.
            rpaths = [f"$ORIGIN/../{CUDART['rpath']}"] if CUDART.get("rpath") else []
            rpaths.append(os.path.dirname(CUDART["library"]))  # editable installs, build tree
            args += ["-DHYBRIDIFF_RT_WITH_CUDA=OFF",
                     f"-DHYBRIDIFF_RT_CUDART_LIBRARY={CUDART['library']}",
                     f"-DHYBRIDIFF_RT_CUDART_INCLUDE_DIRS={';'.join(CUDART['include_dirs'])}",
                     "-DHYBRIDIFF_RT_CUDART_VERSION={}.{}".format(*CUDART["version"]),
                     f"-DHYBRIDIFF_RT_CUDART_RPATH={';'.join(rpaths)}"]
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
    version=PACKAGE_VERSION,
    ext_modules=[CMakeExtension("hybridiff_rt._C")],
    cmdclass={"build_ext": CMakeBuild},
)
