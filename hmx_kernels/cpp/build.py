"""On-the-fly compilation of the C++/CUDA extension, built once and cached on disk.

`load_extension()` compiles csrc/ with torch.utils.cpp_extension.load + ninja on first use and
caches the result in  $HMX_KERNELS_CACHE  (default ~/.cache/hmx_kernels), in a folder whose name
is a hash of everything the binary depends on: the source contents, torch / Python versions, the
compiler flags, the host CPU (the CPU twin is built with -march=native) and, for CUDA builds, the
CUDA version and the GPU architectures. A later process finds that folder and only imports it.

If the fast build (-O3 -march=native -fopenmp) fails, e.g. a compiler without OpenMP, a portable
build (-O3, serial CPU twin) is tried; the failure is remembered in the cache (a `.failed` file).

Concurrent builders: a lock file (fcntl) serialises builders of one key; the build runs in a
temporary folder that is renamed into place atomically, so a reader never sees a half-written
build and a killed build leaves only a stale temporary folder behind.

Settings (environment variables read once by hmx_kernels.config; README table):
  HMX_KERNELS_CACHE       cache folder (default ~/.cache/hmx_kernels)
  HMX_KERNELS_NO_CUDA=1   build the CPU twin only, even where CUDA and nvcc are available
  HMX_KERNELS_CUDA_ARCH   e.g. "8.0;9.0" (default: the visible GPUs' architectures), passed to
                          nvcc as -gencode flags (the process environment is never modified)
  HMX_KERNELS_VERBOSE=1   show the compiler output
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..config import SETTINGS

__all__ = [
    "ExtensionBuildError",
    "load_extension",
    "source_dir",
    "cache_dir",
    "cuda_build_possible",
    "LOAD_INFO",
]

_NAME = "hmx_kernels_ext"
CPU_SOURCES = ["hmx_binding.cpp", "hmx_cpu.cpp"]
CUDA_SOURCES = ["hmx_cuda_forward.cu", "hmx_cuda_backward.cu"]
HEADERS = ["hmx_params.h", "hmx_cpu.h", "hmx_cuda.h", "hmx_cuda_common.cuh"]
# -fno-trapping-math (as torch itself is built): lets branch-free float code (the twin's GELU)
# vectorise; it assumes no floating-point traps are enabled and changes no results.
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-std=c++17"]
# tried in order: the fast build, then one any C++17 compiler takes (no OpenMP: serial CPU twin)
FLAG_SETS = [
    ("native+openmp", CXX_FLAGS, ["-fopenmp"]),
    ("portable", ["-O3", "-fno-trapping-math", "-std=c++17"], []),
]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]

# how the last load_extension() call got its module: {"key", "path", "built": bool, "seconds"}
LOAD_INFO: dict = {}

_lock = threading.Lock()
_loaded: dict = {}
_failed: dict = {}


class ExtensionBuildError(RuntimeError):
    """The C++/CUDA extension could not be built or loaded; the message says what is missing."""


def source_dir() -> Path:
    """csrc/: the installed package data hmx_kernels/csrc first, else the repository's csrc/."""
    pkg = Path(__file__).resolve().parent.parent
    for candidate in (pkg / "csrc", pkg.parent / "csrc"):
        if (candidate / "hmx_binding.cpp").is_file():
            return candidate
    raise ExtensionBuildError(
        f"hmx_kernels C++ sources not found (looked in {pkg / 'csrc'} and {pkg.parent / 'csrc'}); "
        "reinstall the package (pip install hmx_kernels) so that hmx_kernels/csrc is present"
    )


def cache_dir() -> Path:
    return SETTINGS.cache_dir


def _cpu_fingerprint() -> str:
    """The host CPU's model and feature flags (the build uses -march=native)."""
    info = platform.machine() + platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features", "CPU part")):
                info += line
                if line.startswith(("flags", "Features")):
                    break
    return info


def _nvcc() -> Optional[str]:
    home = SETTINGS.cuda_home
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_build_possible() -> List[str]:
    """Why the CUDA kernels cannot be built here (empty list: they can)."""
    reasons = []
    if SETTINGS.no_cuda:
        reasons.append("HMX_KERNELS_NO_CUDA=1 is set")
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is visible")
    if _nvcc() is None:
        reasons.append("nvcc not found: install the CUDA toolkit and put nvcc on PATH or set CUDA_HOME")
    return reasons


def _cuda_arch_list() -> str:
    if SETTINGS.cuda_arch:
        return SETTINGS.cuda_arch
    archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(archs)


def gencode_flags(arch: str) -> List[str]:
    """nvcc -gencode flags for an arch list like "8.0;9.0" (or "9.0a", "8.6+PTX")."""
    flags = []
    for item in arch.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _build_key(with_cuda: bool, arch: str, cflags: List[str]) -> str:
    src = source_dir()
    h = hashlib.sha256()
    for name in CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else []):
        path = src / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    parts = [
        torch.__version__, sys.version, platform.platform(), str(cflags), _cpu_fingerprint(),
        f"cuda={with_cuda}", str(torch.version.cuda), arch, str(NVCC_FLAGS) if with_cuda else "",
    ]
    h.update("\0".join(parts).encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _import_from(folder: Path, module_name: str):
    so = None
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        candidate = folder / (module_name + suffix)
        if candidate.is_file():
            so = candidate
            break
    if so is None:
        raise ExtensionBuildError(f"no compiled module {module_name} in {folder}")
    spec = importlib.util.spec_from_file_location(module_name, str(so))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(tmp: Path, module_name: str, with_cuda: bool, arch: str, cxx_flags: List[str],
             ldflags: List[str]):
    from torch.utils import cpp_extension

    src = source_dir()
    sources = [str(src / s) for s in CPU_SOURCES]
    cflags = list(cxx_flags)
    kwargs = {}
    if with_cuda:
        sources += [str(src / s) for s in CUDA_SOURCES]
        cflags.append("-DHMX_WITH_CUDA")
        # explicit -gencode flags: cpp_extension then adds no arch flags of its own (it would read
        # TORCH_CUDA_ARCH_LIST from the environment, which this package never sets)
        kwargs["extra_cuda_cflags"] = list(NVCC_FLAGS) + gencode_flags(arch)
    return cpp_extension.load(
        name=module_name,
        sources=sources,
        extra_cflags=cflags,
        extra_ldflags=list(ldflags),
        extra_include_paths=[str(src)],
        build_directory=str(tmp),
        verbose=SETTINGS.verbose,
        with_cuda=with_cuda,
        **kwargs,
    )


def _missing_toolchain() -> List[str]:
    missing = []
    cxx = SETTINGS.cxx
    if shutil.which(cxx) is None:
        missing.append(f"no C++ compiler ({cxx!r} not on PATH): install g++ (e.g. apt-get install g++) or set CXX")
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
    except Exception:  # noqa: BLE001 - any failure means ninja is unusable
        missing.append("ninja not found: pip install ninja")
    return missing


def load_extension(with_cuda: Optional[bool] = None):
    """The compiled extension module (built on first use, then cached on disk and in memory).

    with_cuda=None: include the CUDA kernels when they can be built here. Raises
    ExtensionBuildError (with what is missing and how to fix it) when the build fails; the
    failure is remembered for the rest of the process.
    """
    if with_cuda is None:
        with_cuda = not cuda_build_possible()
    with _lock:
        if with_cuda in _loaded:
            return _loaded[with_cuda]
        if with_cuda in _failed:
            raise ExtensionBuildError(_failed[with_cuda])
        try:
            module = _load_or_build(with_cuda)
        except ExtensionBuildError as e:
            _failed[with_cuda] = str(e)
            raise
        _loaded[with_cuda] = module
        return module


def _load_or_build(with_cuda: bool):
    missing = _missing_toolchain()
    if missing:
        raise ExtensionBuildError(
            "cannot build the hmx_kernels C++ extension: " + "; ".join(missing)
        )
    if with_cuda and cuda_build_possible():
        raise ExtensionBuildError("cannot build the CUDA kernels: " + "; ".join(cuda_build_possible()))
    arch = _cuda_arch_list() if with_cuda else ""
    root = cache_dir()
    errors = []
    for flavour, cflags, ldflags in FLAG_SETS:
        key = _build_key(with_cuda, arch, cflags)
        failed_marker = root / f"{_NAME}_{key}.failed"
        if failed_marker.is_file():  # this flavour failed to build on this machine before
            errors.append(f"{flavour}: {failed_marker.read_text().strip()[:500]}")
            continue
        try:
            return _load_or_build_key(with_cuda, arch, key, cflags, ldflags, flavour)
        except ExtensionBuildError as e:
            errors.append(f"{flavour}: {e}")
            if flavour != FLAG_SETS[-1][0]:
                with contextlib.suppress(OSError):
                    failed_marker.write_text(str(e))
                print(f"hmx_kernels: the {flavour} build failed, trying a more portable one "
                      "(HMX_KERNELS_VERBOSE=1 shows the compiler output)", file=sys.stderr, flush=True)
    raise ExtensionBuildError(
        "building the hmx_kernels C++ extension failed. Needs a C++17 compiler, ninja and torch's "
        "headers; set HMX_KERNELS_VERBOSE=1 to see the compiler output, HMX_KERNELS_CACHE to change "
        f"the cache folder (now {root}). Attempts:\n  " + "\n  ".join(errors)
    )


def _load_or_build_key(with_cuda: bool, arch: str, key: str, cflags: List[str], ldflags: List[str],
                       flavour: str):
    module_name = f"{_NAME}_{key}"
    root = cache_dir()
    final = root / module_name
    t0 = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not final.is_dir():
            with _file_lock(root / f"{module_name}.lock"):
                if not final.is_dir():  # nobody built it while we waited for the lock
                    print("compiling hmx_kernels C++ extension, first use only "
                          f"({'CPU + CUDA' if with_cuda else 'CPU'}, {flavour}; cache {final})",
                          file=sys.stderr, flush=True)
                    tmp = Path(tempfile.mkdtemp(prefix=f".{module_name}.", dir=root))
                    try:
                        module = _compile(tmp, module_name, with_cuda, arch, cflags, ldflags)
                        (tmp / "BUILD_INFO").write_text(
                            f"torch {torch.__version__}\ncuda {with_cuda} {arch}\nflags {cflags}\nkey {key}\n"
                            f"seconds {time.perf_counter() - t0:.1f}\n"
                        )
                        os.rename(tmp, final)  # atomic: the folder appears complete or not at all
                    except BaseException:
                        shutil.rmtree(tmp, ignore_errors=True)
                        raise
                    LOAD_INFO.clear()
                    LOAD_INFO.update(key=key, path=str(final), built=True, flavour=flavour,
                                     seconds=time.perf_counter() - t0)
                    return module
        module = _import_from(final, module_name)
    except ExtensionBuildError:
        raise
    except Exception as e:  # noqa: BLE001 - compiler errors arrive as RuntimeError/OSError/ImportError
        raise ExtensionBuildError(f"{type(e).__name__}: {e}") from e
    LOAD_INFO.clear()
    LOAD_INFO.update(key=key, path=str(final), built=False, flavour=flavour, seconds=time.perf_counter() - t0)
    return module
