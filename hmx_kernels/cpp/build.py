"""Compilation of the C++/CUDA extension: on first use (JIT) or ahead of time, cached on disk.

`load_extension()` looks for a finished build, in this order, and only imports it (no compiler or
ninja needed for that):
  1. the package's own `hmx_kernels/_prebuilt/` folder (filled by `python -m hmx_kernels.build
     --into-package` or by `HMX_KERNELS_BUILD_EXT=1 pip install --no-build-isolation .`),
  2. the cache  $HMX_KERNELS_CACHE  (default ~/.cache/hmx_kernels).
Each build lives in a folder named by a hash of everything the binary depends on: the source
contents, torch / Python versions, the compiler flags, the host CPU (the CPU twin is built with
-march=native) and, for CUDA builds, the CUDA version and the GPU architectures. Only when no
finished build matches is the extension compiled (torch.utils.cpp_extension.load + ninja) into the
cache; a cached build that does not import (e.g. a truncated .so) is discarded and rebuilt.

Flavours: the fast build (-O3 -march=native -fopenmp) is tried first; when the compiler rejects it
(or its fresh build does not import), a portable build (-O3, no OpenMP: serial CPU twin) is tried.
Only if that one builds is the fast flavour's failure remembered, in a `<build>.failed` file in the
cache folder that starts with the compiler's first error lines (a failure both flavours share is
not the fast flags' fault and is not recorded; a cached build that fails to load never is).
Whenever a slower flavour is used, a RuntimeWarning (once per process) says why and how to retry:
fix the cause, then delete the `.failed` file, call `clear_failed()` or run
`python -m hmx_kernels.build --clear-failed`.

Ahead-of-time builds for other CPUs (`python -m hmx_kernels.build --x86-64`,
`HMX_KERNELS_BUILD_EXT=x86-64 pip install --no-build-isolation .`): the fast build is made for the
build machine's CPU, so an image built on one CPU model would compile again on another. The
x86-64 flavours target the x86-64 micro-architecture levels instead: x86-64-v4 (AVX-512 F, BW, CD,
DQ, VL) and x86-64-v3 (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE), both with OpenMP, keyed without the
CPU model (only the machine type and C library). At load time the best x86-64 build the host CPU
runs (by /proc/cpuinfo flags) is used, ahead of a native one; a CPU without AVX2 compiles as usual.
A flavour is built only where the build machine's CPU runs it (the build imports what it compiles):
build on an AVX-512 machine to ship both.

Concurrent builders: a lock file (fcntl) serialises builders of one key; the build runs in a
temporary folder that is renamed into place atomically, so a reader never sees a half-written
build and a killed build leaves only a stale temporary folder behind.

ninja is looked up on PATH, then next to the running interpreter (where `pip install ninja` puts it
in a virtual environment, whose bin/ is not on PATH in a Jupyter kernel or a script started by the
interpreter's path).

Settings (environment variables read once by hmx_kernels.config; README table):
  HMX_KERNELS_CACHE       cache folder (default ~/.cache/hmx_kernels)
  HMX_KERNELS_NO_CUDA=1   build the CPU twin only, even where CUDA and nvcc are available
  HMX_KERNELS_CUDA_ARCH   e.g. "8.0;9.0" (default: the visible GPUs' architectures), passed to
                          nvcc as -gencode flags
  HMX_KERNELS_VERBOSE=1   show the compiler output
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from ..config import SETTINGS

__all__ = [
    "ExtensionBuildError",
    "load_extension",
    "build_ahead",
    "clear_failed",
    "source_dir",
    "cache_dir",
    "prebuilt_dir",
    "cuda_build_possible",
    "cuda_run_possible",
    "LOAD_INFO",
]

_NAME = "hmx_kernels_ext"
CPU_SOURCES = ["hmx_binding.cpp", "hmx_cpu.cpp"]
CUDA_SOURCES = ["hmx_cuda_forward.cu", "hmx_cuda_backward.cu", "hmx_cuda_blocks.cu"]
HEADERS = ["hmx_params.h", "hmx_cpu.h", "hmx_cpu_scan.h", "hmx_cuda.h", "hmx_cuda_tiles.cuh",
           "hmx_cuda_layout.cuh", "hmx_cuda_passes.cuh", "hmx_cuda_plan.cuh", "hmx_cuda_blocks.cuh",
           "hmx_pieces.h"]
# -fno-trapping-math (as torch itself is built): lets branch-free float code (the twin's GELU)
# vectorise; it assumes no floating-point traps are enabled and changes no results.
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-std=c++17"]
# tried in order: the fast build, then one any C++17 compiler takes (no OpenMP: serial CPU twin)
FLAG_SETS = [
    ("native+openmp", CXX_FLAGS, ["-fopenmp"]),
    ("portable", ["-O3", "-fno-trapping-math", "-std=c++17"], []),
]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]

# x86-64 psABI micro-architecture levels, as /proc/cpuinfo names their features (lzcnt is "abm")
X86_64_V3_CPU_FLAGS = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3",  # v2
                       "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
X86_64_V4_CPU_FLAGS = X86_64_V3_CPU_FLAGS + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
# ahead-of-time flavours for any x86-64 CPU of a level, best first:
# (name, compiler flags, linker flags, the CPU flags a host needs to run it)
X86_64_FLAG_SETS = [
    ("x86-64-v4+openmp", ["-O3", "-march=x86-64-v4", "-mtune=generic", "-fopenmp", "-fno-trapping-math",
                          "-std=c++17"], ["-fopenmp"], X86_64_V4_CPU_FLAGS),
    ("x86-64-v3+openmp", ["-O3", "-march=x86-64-v3", "-mtune=generic", "-fopenmp", "-fno-trapping-math",
                          "-std=c++17"], ["-fopenmp"], X86_64_V3_CPU_FLAGS),
]

# how the last load_extension() call that loaded a module got it: {"key", "path", "built": bool,
# "source": "prebuilt" | "cache" | "compiled", "flavour", "seconds"}
LOAD_INFO: dict = {}

_lock = threading.RLock()
_loaded: dict = {}
_infos: dict = {}  # with_cuda -> the LOAD_INFO of that module
_failed: dict = {}
_warned_slower = False
# the first line of a `.failed` marker starts with this; markers without it (written by older
# versions, which also marked builds that merely failed to load from the cache) are retried
_MARKER_HEAD = "hmx_kernels: the {flavour} build failed: "
_CLEAR_HINT = "python -m hmx_kernels.build --clear-failed"


class ExtensionBuildError(RuntimeError):
    """The C++/CUDA extension could not be built or loaded; the first line says why."""


class _CompileFailed(Exception):
    """The compiler rejected a flavour (or its fresh build did not import): the only failure that
    marks a flavour as failed on this machine."""

    def __init__(self, exc: BaseException):
        text = str(exc)
        self.output = f"{type(exc).__name__}: {text}"
        self.summary = _error_summary(text) or [f"{type(exc).__name__}: {_first_line(text)}"]
        super().__init__(self.summary[0])


_ERROR_LINE = re.compile(r"(?i)\berror\b\s*:|undefined (reference|symbol)|cannot find -l|no such file")


def _first_line(text, limit: int = 300) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line[:limit]


def _error_summary(text: str, lines: int = 5) -> List[str]:
    """The compiler's first error lines out of cpp_extension's message (which also holds the long
    command lines); with HMX_KERNELS_VERBOSE=1 the output went to the terminal instead."""
    found = [ln.strip()[:300] for ln in text.splitlines() if _ERROR_LINE.search(ln)]
    if not found and SETTINGS.verbose:
        return [f"{_first_line(text)} (the compiler output is shown above)"]
    return found[:lines]


def prebuilt_dir() -> Path:
    """hmx_kernels/_prebuilt: builds made ahead of time into the package, looked at first."""
    return Path(__file__).resolve().parent.parent / "_prebuilt"


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
    """The cache folder ($HMX_KERNELS_CACHE, default ~/.cache/hmx_kernels), resolved on first use:
    ExtensionBuildError (suggesting HMX_KERNELS_CACHE) where there is no home directory."""
    try:
        return SETTINGS.cache_dir
    except RuntimeError as e:
        raise ExtensionBuildError(str(e)) from None


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


def host_cpu_flags() -> frozenset:
    """The host CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def x86_64_flavours(cpu_flags: Optional[frozenset] = None) -> List[Tuple[str, List[str], List[str]]]:
    """The x86-64 ahead-of-time flavours a CPU with `cpu_flags` (default: this host's) runs, best first."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = host_cpu_flags() if cpu_flags is None else cpu_flags
    return [(name, cflags, ldflags) for name, cflags, ldflags, needs in X86_64_FLAG_SETS
            if flags.issuperset(needs)]


def _nvcc() -> Optional[str]:
    home = SETTINGS.cuda_home
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_run_possible() -> List[str]:
    """Why CUDA kernels, built already or not, cannot run here (empty list: they can)."""
    reasons = []
    if SETTINGS.no_cuda:
        reasons.append("HMX_KERNELS_NO_CUDA=1 is set")
    if torch.version.cuda is None:
        reasons.append(f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device is visible")
    return reasons


def _nvcc_missing() -> List[str]:
    if _nvcc() is None:
        return ["nvcc not found: install the CUDA toolkit and put nvcc on PATH or set CUDA_HOME"]
    return []


def cuda_build_possible() -> List[str]:
    """Why the CUDA kernels cannot be built here (empty list: they can)."""
    return cuda_run_possible() + _nvcc_missing()


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


def _build_key(with_cuda: bool, arch: str, cflags: List[str], host_specific: bool = True) -> str:
    """A hash of everything the binary depends on. host_specific=False (the x86-64 flavours):
    without the CPU model and the OS release, so that a build made on one machine is found on another."""
    src = source_dir()
    h = hashlib.sha256()
    for name in CPU_SOURCES + HEADERS + (CUDA_SOURCES if with_cuda else []):
        path = src / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    # host_specific=False: the machine type and C library only ("portable" marks such keys)
    host = ([platform.platform(), _cpu_fingerprint()] if host_specific
            else [platform.machine(), "-".join(platform.libc_ver()), "portable"])
    parts = [
        torch.__version__, sys.version, *host[:1], str(cflags), *host[1:],
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


def _module_file(folder: Path, module_name: str) -> Optional[Path]:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES + [".so"]:
        candidate = folder / (module_name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _module_record(so: Path) -> str:
    """The BUILD_INFO line that identifies a finished module file: name, size, sha256."""
    data = so.read_bytes()
    return f"module {so.name} {len(data)} {hashlib.sha256(data).hexdigest()}"


def _elf_problem(data: bytes) -> Optional[str]:
    """Why an ELF file is cut short (its headers point past its end), else None. dlopen of such a
    file does not fail cleanly: touching the missing pages kills the process (SIGBUS)."""
    if not data.startswith(b"\x7fELF"):
        return None  # another format (not checked), or too short for dlopen to take
    if len(data) < 0x40:
        return "truncated ELF header"
    end = "<" if data[5] == 1 else ">"
    if data[4] == 2:  # 64-bit
        phoff, shoff = struct.unpack_from(end + "QQ", data, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, 0x36)
        ph_fields = end + "I4xQ16xQ"  # p_type, p_offset, p_filesz
    else:
        phoff, shoff = struct.unpack_from(end + "II", data, 0x1C)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, 0x2A)
        ph_fields = end + "II8xI"
    size = len(data)
    if shoff + shentsize * shnum > size or phoff + phentsize * phnum > size:
        return f"its headers point past its end ({size} bytes): truncated"
    for i in range(phnum):
        _, offset, filesz = struct.unpack_from(ph_fields, data, phoff + i * phentsize)
        if offset + filesz > size:
            return f"a segment ends at byte {offset + filesz}, past its end ({size} bytes): truncated"
    return None


def _check_module_file(folder: Path, so: Path) -> None:
    """Raises ExtensionBuildError when the module file is damaged: not the size and sha256 its
    BUILD_INFO recorded (builds made by older versions have no record), or a cut-short ELF file."""
    data = so.read_bytes()
    info = folder / "BUILD_INFO"
    records = [ln for ln in info.read_text(errors="replace").splitlines()
               if ln.startswith(f"module {so.name} ")] if info.is_file() else []
    if records:
        _, _, size, digest = records[-1].split()
        if int(size) != len(data) or hashlib.sha256(data).hexdigest() != digest:
            raise ExtensionBuildError(f"{so} is damaged: {len(data)} bytes that do not match the size "
                                      f"({size} bytes) and sha256 recorded in {info}")
    problem = _elf_problem(data)
    if problem:
        raise ExtensionBuildError(f"{so} is damaged: {problem}")


def _import_from(folder: Path, module_name: str):
    so = _module_file(folder, module_name)
    if so is None:
        raise ExtensionBuildError(f"no compiled module {module_name} in {folder}")
    _check_module_file(folder, so)
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


def _find_ninja() -> Optional[str]:
    """ninja on PATH, else next to the running interpreter (a virtual environment's bin/, where
    `pip install ninja` puts it, is not on PATH in a Jupyter kernel or a script started by path)."""
    found = shutil.which("ninja")
    if found:
        return found
    beside = Path(sys.executable).parent / "ninja"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return None


@contextlib.contextmanager
def _ninja_on_path():
    """Makes a ninja found only next to the interpreter visible to torch.utils.cpp_extension.

    cpp_extension runs `ninja` by name, with a copy of os.environ, and takes neither a path to
    ninja nor an environment, so the only way to hand it that ninja is PATH: its folder is
    prepended to os.environ["PATH"] for the duration of the build (under the module lock) and
    PATH is restored afterwards. This is the one place the package writes os.environ.
    """
    ninja = _find_ninja()
    if ninja is None or shutil.which("ninja"):
        yield
        return
    old = os.environ.get("PATH")
    os.environ["PATH"] = str(Path(ninja).parent) + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old


def _missing_toolchain(with_cuda: bool = False) -> List[str]:
    """What a build needs and this machine lacks (empty list: a build can be tried)."""
    missing = []
    cxx = SETTINGS.cxx
    if shutil.which(cxx) is None:
        missing.append(f"no C++ compiler ({cxx!r} not on PATH): install g++ (e.g. apt-get install g++) or set CXX")
    if _find_ninja() is None:
        missing.append(f"ninja not found (not on PATH, not next to the interpreter in {Path(sys.executable).parent}): "
                       f"{sys.executable} -m pip install ninja")
    if with_cuda:
        missing += _nvcc_missing()
    return missing


def load_extension(with_cuda: Optional[bool] = None):
    """The compiled extension module (found prebuilt or in the cache, else built; then kept).

    with_cuda=None: include the CUDA kernels when they can be built here. Raises
    ExtensionBuildError (first line: the cause; then how to fix it) when there is no usable build
    and none can be made; the failure is remembered for the rest of the process.
    """
    if with_cuda is None:
        with_cuda = not cuda_build_possible()
    with _lock:
        if with_cuda in _loaded:
            return _loaded[with_cuda]
        if with_cuda in _failed:
            raise ExtensionBuildError(_failed[with_cuda])
        try:
            module, info = _load_or_build(with_cuda)
        except ExtensionBuildError as e:
            _failed[with_cuda] = str(e)
            raise
        _loaded[with_cuda] = module
        _infos[with_cuda] = info
        return module


def clear_failed() -> List[Path]:
    """Forgets every failed build (deletes the `.failed` markers in the cache folder), so that the
    next process tries the fast build again; returns the deleted files. Run it after fixing what
    made the fast build fail (`python -m hmx_kernels.build --clear-failed` does the same)."""
    removed = []
    root = cache_dir()
    if root.is_dir():
        for marker in sorted(root.glob(f"{_NAME}_*.failed")):
            with contextlib.suppress(FileNotFoundError):
                marker.unlink()
                removed.append(marker)
    with _lock:
        _failed.clear()
    return removed


def _marker_reason(marker: Path, flavour: str) -> Optional[str]:
    """The recorded reason of a `.failed` marker; None for markers this version did not write."""
    try:
        first = _first_line(marker.read_text(errors="replace"), limit=1000)
    except OSError:
        return None
    head = _MARKER_HEAD.format(flavour=flavour)
    return first[len(head):] if first.startswith(head) else None


def _write_marker(marker: Path, flavour: str, cflags: List[str], failure: _CompileFailed) -> None:
    text = (
        _MARKER_HEAD.format(flavour=flavour) + failure.summary[0] + "\n"
        + "".join(f"  {line}\n" for line in failure.summary[1:])
        + f"when: {datetime.datetime.now().isoformat(timespec='seconds')}; compiler: CXX={SETTINGS.cxx}; "
        f"torch {torch.__version__}; flags {cflags}\n"
        f"While this file exists, the portable build is used instead. To retry after fixing the cause: delete "
        f"this file, or run `{_CLEAR_HINT}` (or call hmx_kernels.cpp.build.clear_failed()).\n\n"
        f"compiler output:\n{failure.output[:20000]}\n"
    )
    with contextlib.suppress(OSError):
        marker.write_text(text)


def _load_finished(name: str) -> Tuple[object, Optional[Path], str, List[str]]:
    """A finished build of `name` that imports: (module, folder, "prebuilt" | "cache", problems of
    finished builds that did not import); (None, None, "", problems) when there is none."""
    problems = []
    for where, source in ((prebuilt_dir, "prebuilt"), (cache_dir, "cache")):
        folder = where() / name  # the cache folder only when the package holds no build
        if not folder.is_dir():
            continue
        try:
            return _import_from(folder, name), folder, source, problems
        except Exception as e:  # noqa: BLE001 - a damaged or foreign .so raises ImportError/OSError
            problems.append(f"the build in {folder} does not load ({type(e).__name__}: {_first_line(e)})")
            if source == "prebuilt":  # the installation is damaged; the cache stands in for it
                warnings.warn(f"hmx_kernels: {problems[-1]}; the cache is used instead. Reinstall hmx_kernels or "
                              "run `python -m hmx_kernels.build --into-package` to repair the installation.",
                              RuntimeWarning, stacklevel=2)
    return None, None, "", problems


def _load_or_build(with_cuda: bool):
    t0 = time.perf_counter()
    if with_cuda:
        why = cuda_run_possible()
        if why:
            raise ExtensionBuildError("cannot use the CUDA kernels: " + "; ".join(why))
    arch = _cuda_arch_list() if with_cuda else ""
    skipped: List[Tuple[str, str]] = []  # (flavour, why it is not used), fastest first
    compile_failures: List[Tuple[str, _CompileFailed]] = []
    # a flavour's compile failure is recorded only once a more portable flavour has built: a
    # failure every flavour shares (no Python headers, a broken compiler) is not the fast flags'
    to_mark: List[Tuple[Path, str, List[str], _CompileFailed]] = []
    missing: Optional[List[str]] = None
    # 0. an x86-64 ahead-of-time build this CPU runs (made on another machine, e.g. in an image)
    for flavour, cflags, _ in x86_64_flavours():
        key = _build_key(with_cuda, arch, cflags, host_specific=False)
        module, folder, source, _ = _load_finished(f"{_NAME}_{key}")
        if module is not None:
            return module, _record(key, folder, False, source, flavour, t0, skipped)
    for index, (flavour, cflags, ldflags) in enumerate(FLAG_SETS):
        key = _build_key(with_cuda, arch, cflags)
        name = f"{_NAME}_{key}"
        # 1. a finished build: only imported, no toolchain needed
        module, folder, source, problems = _load_finished(name)
        if module is not None:
            return module, _record(key, folder, False, source, flavour, t0, skipped)
        # 2. a flavour the compiler rejected on this machine before
        root = cache_dir()
        marker = root / f"{name}.failed"
        reason = _marker_reason(marker, flavour) if marker.is_file() else None
        if reason is not None:
            skipped.append((flavour, f"its build failed on this machine before ({reason}; recorded in {marker})"))
            continue
        if marker.is_file():  # written by an older version (no reason, maybe a mere load failure): retry
            with contextlib.suppress(OSError):
                marker.unlink()
        # 3. build it
        if missing is None:
            missing = _missing_toolchain(with_cuda)
        if missing:
            what = "; ".join(problems + ["it is not built"])
            skipped.append((flavour, f"{what}, and it cannot be built here: " + "; ".join(missing)))
            continue
        try:
            module, built = _build(with_cuda, arch, key, cflags, ldflags, flavour, problems)
        except _CompileFailed as e:
            compile_failures.append((flavour, e))
            if index < len(FLAG_SETS) - 1:
                to_mark.append((marker, flavour, cflags, e))
                skipped.append((flavour, f"its build failed ({e.summary[0]}; recorded in {marker})"))
                print(f"hmx_kernels: the {flavour} build failed ({e.summary[0]}), trying a more portable one "
                      "(HMX_KERNELS_VERBOSE=1 shows the compiler output)", file=sys.stderr, flush=True)
            else:
                skipped.append((flavour, f"its build failed ({e.summary[0]})"))
            continue
        for args in to_mark:
            _write_marker(*args)
        return module, _record(key, root / name, built, "compiled" if built else "cache", flavour, t0, skipped)
    raise _no_build_error(root, skipped, compile_failures, missing)


def _no_build_error(root: Path, skipped, compile_failures, missing) -> ExtensionBuildError:
    attempts = "\n  ".join(f"{flavour}: {why}" for flavour, why in skipped)
    where = f"the cache {root} (HMX_KERNELS_CACHE)"
    others = sorted(p.name for p in prebuilt_dir().glob(f"{_NAME}_*")) if prebuilt_dir().is_dir() else []
    if others:
        where += (f" or {prebuilt_dir()} (which holds {len(others)} build(s) made for another CPU, torch, Python "
                  "or set of sources)")
    if compile_failures:
        first = "building the hmx_kernels C++ extension failed: " + "; ".join(
            f"{flavour}: {failure.summary[0]}" for flavour, failure in compile_failures)
        help_ = ("Needs a C++17 compiler, ninja and torch's headers; HMX_KERNELS_VERBOSE=1 shows the compiler "
                 f"output; the build folders are in {where}.")
    elif missing:
        first = "cannot build the hmx_kernels C++ extension: " + "; ".join(missing)
        help_ = (f"No finished build for this machine, torch and Python was found in {where}; "
                 "`python -m hmx_kernels.build` makes one ahead of time where a compiler and ninja exist.")
    else:  # every flavour was marked failed earlier
        first = "the hmx_kernels C++ extension failed to build on this machine before: " + "; ".join(
            why for _, why in skipped)
        help_ = f"After fixing the cause, run `{_CLEAR_HINT}` (or delete the .failed files in {root}) to retry."
    return ExtensionBuildError(f"{first}\n{help_}\nAttempts:\n  {attempts}")


def _record(key: str, path: Path, built: bool, source: str, flavour: str, t0: float, skipped) -> dict:
    info = dict(key=key, path=str(path), built=built, source=source, flavour=flavour,
                seconds=time.perf_counter() - t0)
    LOAD_INFO.clear()
    LOAD_INFO.update(info)
    if skipped:
        _warn_slower(flavour, skipped)
    return info


def _warn_slower(flavour: str, skipped: List[Tuple[str, str]]) -> None:
    """Once per process: a slower flavour than the fast one is in use; why, and how to undo it."""
    global _warned_slower
    if _warned_slower:
        return
    _warned_slower = True
    why = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    if any("failed" in reason for _, reason in skipped):
        how = (f"After fixing the cause, run `{_CLEAR_HINT}` (or delete the .failed file named above) and the "
               "next process builds the fast flavour again.")
    else:
        how = "Once a C++ compiler and ninja are available, the next process builds the fast flavour."
    warnings.warn(
        f"hmx_kernels uses the {flavour} build of its C++ extension (no -march=native, no OpenMP: the CPU twin "
        f"runs on one thread), slower than the {FLAG_SETS[0][0]} build, because {why}. {how}",
        RuntimeWarning, stacklevel=5,  # the caller of load_extension
    )


def _discard(folder: Path) -> None:
    """Moves a broken build folder out of the way (atomically), then deletes it."""
    aside = folder.parent / f".{folder.name}.broken.{os.getpid()}.{time.time_ns()}"
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _build(with_cuda: bool, arch: str, key: str, cflags: List[str], ldflags: List[str], flavour: str,
           problems: List[str]) -> Tuple[object, bool]:
    """Compiles one flavour into the cache: (module, True), or (module, False) when another process
    finished it while this one waited for the lock. Raises _CompileFailed when the compiler rejects
    it, ExtensionBuildError when the cache folder cannot be written."""
    module_name = f"{_NAME}_{key}"
    root = cache_dir()
    final = root / module_name
    t0 = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"{module_name}.lock"):
            if final.is_dir():  # another process built it while we waited, or it is the broken build
                with contextlib.suppress(Exception):
                    return _import_from(final, module_name), False
                _discard(final)
            why = f"; rebuilding because {'; '.join(problems)}" if problems else ""
            print("compiling hmx_kernels C++ extension, first use only "
                  f"({'CPU + CUDA' if with_cuda else 'CPU'}, {flavour}; cache {final}{why})",
                  file=sys.stderr, flush=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{module_name}.", dir=root))
            try:
                try:
                    with _ninja_on_path():
                        module = _compile(tmp, module_name, with_cuda, arch, cflags, ldflags)
                except Exception as e:  # noqa: BLE001 - the compiler's errors arrive as RuntimeError,
                    raise _CompileFailed(e) from e  # a fresh build that does not load as ImportError
                so = _module_file(tmp, module_name)
                (tmp / "BUILD_INFO").write_text(
                    f"torch {torch.__version__}\ncuda {with_cuda} {arch}\nflavour {flavour}\nflags {cflags}\n"
                    f"key {key}\nseconds {time.perf_counter() - t0:.1f}\n"
                    + (_module_record(so) + "\n" if so is not None else "")
                )
                os.rename(tmp, final)  # atomic: the folder appears complete or not at all
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return module, True
    except OSError as e:
        raise ExtensionBuildError(
            f"cannot write the hmx_kernels build cache {root} ({type(e).__name__}: {e}); "
            "set HMX_KERNELS_CACHE to a writable folder"
        ) from e


def build_ahead(into: Optional[Path] = None, with_cuda: Optional[bool] = None,
                log: Callable[[str], None] = print, x86_64: bool = False) -> List[Path]:
    """Builds the extension now, exactly as first use would (same flavours, same cache folder), and
    returns where each build is. `into`: also copy each build's module there (a `_prebuilt`
    folder, which `load_extension` reads first), replacing the builds that folder held.

    with_cuda=None: the CPU-only build, plus the CPU + CUDA build where that can be built (the
    "cpu" backend loads the former and the "cuda" backend the latter). A build already in the
    cache (or the package's prebuilt folder) is reused, not compiled again.
    """
    variants = [with_cuda] if with_cuda is not None else [False] + ([True] if not cuda_build_possible() else [])
    places = []
    with _lock:
        for wc in variants:
            if x86_64:
                places += [_copy_build(p, Path(into)) if into is not None else p
                           for p in _build_x86_64(wc, log)]
                continue
            load_extension(with_cuda=wc)
            info = _infos[wc]
            what = "CPU + CUDA" if wc else "CPU"
            verb = "compiled" if info["built"] else f"found already built ({info['source']})"
            log(f"hmx_kernels C++ extension ({what}, {info['flavour']} build): {verb} in {info['path']}")
            place = Path(info["path"])
            if into is not None:
                place = _copy_build(place, Path(into))
                log(f"hmx_kernels C++ extension ({what}): copied to {place}")
            places.append(place)
        if into is not None:  # the prebuilt folder holds exactly this run's builds
            for stale in Path(into).glob(f"{_NAME}_*"):
                if stale.is_dir() and stale.resolve() not in {p.resolve() for p in places}:
                    shutil.rmtree(stale, ignore_errors=True)
    return places


def _build_x86_64(with_cuda: bool, log: Callable[[str], None]) -> List[Path]:
    """Builds (or finds built) each x86-64 flavour the host CPU runs; returns the build folders."""
    if with_cuda:
        why = cuda_run_possible()
        if why:
            raise ExtensionBuildError("cannot build the CUDA kernels: " + "; ".join(why))
    arch = _cuda_arch_list() if with_cuda else ""
    runnable = {name for name, _, _ in x86_64_flavours()}
    if not runnable:
        raise ExtensionBuildError(f"no x86-64 flavour runs on this CPU ({platform.machine()}; they need "
                                  "x86-64 with AVX2): build the default flavour instead")
    what = "CPU + CUDA" if with_cuda else "CPU"
    folders = []
    for flavour, cflags, ldflags, needs in X86_64_FLAG_SETS:
        if flavour not in runnable:
            lacks = sorted(set(needs) - host_cpu_flags())
            log(f"hmx_kernels C++ extension ({what}, {flavour} build): not built, this CPU lacks {', '.join(lacks)} "
                "(a build is imported once to check it); build on a CPU that has them to ship this flavour too")
            continue
        key = _build_key(with_cuda, arch, cflags, host_specific=False)
        name = f"{_NAME}_{key}"
        module, folder, source, problems = _load_finished(name)
        if module is None:
            missing = _missing_toolchain(with_cuda)
            if missing:
                raise ExtensionBuildError(f"cannot build the {flavour} flavour here: " + "; ".join(missing))
            try:
                _build(with_cuda, arch, key, cflags, ldflags, flavour, problems)
            except _CompileFailed as e:
                raise ExtensionBuildError(f"the {flavour} build failed: {e.summary[0]}") from e
            folder, verb = cache_dir() / name, "compiled"
        else:
            verb = f"found already built ({source})"
        log(f"hmx_kernels C++ extension ({what}, {flavour} build): {verb} in {folder}")
        folders.append(folder)
    return folders


def _copy_build(folder: Path, into: Path) -> Path:
    """Copies the compiled module (and BUILD_INFO) of a build folder into `into`/<same name>."""
    dest = into / folder.name
    if dest.resolve() == folder.resolve():
        return dest
    into.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=into))
    try:
        for item in folder.iterdir():
            if item.name == "BUILD_INFO" or (item.name.startswith(folder.name) and item.suffix in (".so", ".pyd")):
                shutil.copy2(item, tmp / item.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(dest, 0o755)  # mkdtemp made it private
    return dest
