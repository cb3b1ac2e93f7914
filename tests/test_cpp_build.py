"""Build and cache behaviour of the C++ extension, in fresh processes and fresh cache folders.

Two processes start building into an empty cache at the same time: exactly one compiles, the other
waits on the lock and reuses its result; a third process and a copy of the package laid out like
an installed (non-editable) one reuse the cache without compiling. A finished build (in the cache
or in the package's _prebuilt folder) loads where there is no compiler and no ninja; a truncated
cached build is rebuilt, not taken for a failed fast build; a fast build the compiler rejects is
recorded with the compiler's error, warned about, and can be cleared.

Compiles (about 30-60 s each on 2 cores): the concurrent builders (one build), the portable
fallback (one portable build), the truncated cache (one rebuild) and the session fixture
`prebuilt_cache` (one build by `python -m hmx_kernels.build`, shared with tests/test_layer.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envtools import clean_env, make_venv, package_copy, path_without, run_json

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from hmx_kernels.cpp import build
ext = build.load_extension(with_cuda=False)
import hmx_kernels
x = torch.randn(2, 5, 8)
w = [torch.randn(2, 4, 4), torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 6)]
ln = [torch.ones(8), torch.zeros(8)]
out = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="cpu")
ref = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="reference")
info = dict(build.LOAD_INFO, source=str(build.source_dir()), total=time.perf_counter() - t0,
            max_err=(out - ref).abs().max().item())
print("RESULT " + json.dumps(info))
"""


def _spawn(cache: Path, pythonpath: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, HMX_KERNELS_CACHE=str(cache), HMX_KERNELS_NO_CUDA="1", PYTHONPATH=str(pythonpath))
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, cwd=str(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"process failed:\n{out}\n{err}"
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), err


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_fresh_cache_concurrent_builders_then_reuse(tmp_path, repo_copy):
    cache = tmp_path / "cache"
    # two builders racing on an empty cache
    procs = [_spawn(cache, repo_copy, tmp_path) for _ in range(2)]
    results = [_result(p) for p in procs]
    infos = [r[0] for r in results]
    built = [i["built"] for i in infos]
    assert sorted(built) == [False, True], infos
    for info, err in results:
        assert info["max_err"] < 1e-4
        assert ("compiling hmx_kernels C++ extension, first use only" in err) == info["built"], err
    assert len({i["key"] for i in infos}) == 1
    entries = sorted(p.name for p in cache.iterdir())
    # one finished build folder plus its lock file; no temporary folder left behind
    assert [e for e in entries if not e.endswith(".lock")] == [Path(infos[0]["path"]).name], entries
    assert (Path(infos[0]["path"]) / "BUILD_INFO").is_file()

    # a later process reuses the build: no compile message, loads quickly
    t0 = time.perf_counter()
    info, err = _result(_spawn(cache, repo_copy, tmp_path))
    assert info["built"] is False and "compiling" not in err
    assert info["seconds"] < 10, info  # importing a cached module, not compiling (a build takes ~1 min)
    assert time.perf_counter() - t0 < 120

    # a copy laid out like an installed package (sources in hmx_kernels/csrc, no repository around)
    site = package_copy(tmp_path / "site", installed=True)
    info, err = _result(_spawn(cache, site, tmp_path))
    assert Path(info["source"]) == site / "hmx_kernels" / "csrc"
    assert info["built"] is False and "compiling" not in err  # same sources: same key, cache reused


def test_missing_sources_give_a_clear_error(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(REPO / "hmx_kernels", site / "hmx_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "from hmx_kernels.cpp import build\n"
        "try:\n    build.source_dir()\nexcept build.ExtensionBuildError as e:\n    print('ERR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert "ERR hmx_kernels C++ sources not found" in out.stdout, out.stdout + out.stderr


def test_import_compiles_nothing_and_missing_compiler_falls_back(tmp_path, repo_copy):
    """`import hmx_kernels` builds nothing; with no C++ compiler, backend="auto" warns and uses the
    reference, and backend="cpu" raises an error that says what is missing."""
    cache = tmp_path / "cache"
    code = r"""
import warnings, torch
import hmx_kernels
from hmx_kernels.cpp import build
from pathlib import Path
import os
assert not Path(os.environ["HMX_KERNELS_CACHE"]).exists(), "import created the cache"
x = torch.randn(2, 5, 8)
w = [torch.randn(2, 4, 4), torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 6)]
ln = [torch.ones(8), torch.zeros(8)]
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    out = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln)
ref = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="reference")
assert torch.equal(out, ref)
print("WARN", [str(r.message) for r in rec])
try:
    hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="cpu")
except hmx_kernels.BackendNotSupportedError as e:
    print("ERR", e)
"""
    env = dict(os.environ, HMX_KERNELS_CACHE=str(cache), CXX="no-such-compiler-hmx", PYTHONPATH=str(repo_copy))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no C++ compiler ('no-such-compiler-hmx' not on PATH)" in out.stdout
    assert "falls back" in out.stdout
    assert "ERR backend 'cpu' cannot run this call" in out.stdout
    assert "compiling" not in out.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_fast_build_falls_back_to_portable_build(tmp_path, repo_copy):
    """When the fast flavour does not compile (here: a flag the compiler rejects), the portable
    flavour is built and used, and the failure is remembered so later processes skip it: the
    record names the compiler's error, each process warns once that it uses the slower build and
    how to retry, and `python -m hmx_kernels.build --clear-failed` clears the record."""
    cache = tmp_path / "cache"
    code = SCRIPT.replace(
        "from hmx_kernels.cpp import build\n",
        "from hmx_kernels.cpp import build\n"
        "build.FLAG_SETS[0] = ('native+openmp', build.CXX_FLAGS + ['-fno-such-flag-hmx'], ['-fopenmp'])\n",
    ) + "build._loaded.clear()\nbuild.load_extension(with_cuda=False)  # a second load warns no more\n"
    env = dict(os.environ, HMX_KERNELS_CACHE=str(cache), HMX_KERNELS_NO_CUDA="1", PYTHONPATH=str(repo_copy))
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        assert info["flavour"] == "portable" and info["max_err"] < 1e-4
        markers = list(cache.glob("*.failed"))
        assert len(markers) == 1
        first = markers[0].read_text().splitlines()[0]
        assert first.startswith("hmx_kernels: the native+openmp build failed: ") and "-fno-such-flag-hmx" in first
        assert proc.stderr.count("RuntimeWarning") == 1, proc.stderr
        warning = proc.stderr[proc.stderr.index("RuntimeWarning"):]
        assert "uses the portable build" in warning and "-fno-such-flag-hmx" in warning
        assert "python -m hmx_kernels.build --clear-failed" in warning and str(markers[0]) in warning
        if attempt == 0:
            assert info["built"] and "trying a more portable one" in proc.stderr
        else:  # remembered: neither flavour is compiled again
            assert not info["built"] and "compiling" not in proc.stderr
    clear = subprocess.run([sys.executable, "-m", "hmx_kernels.build", "--clear-failed"], env=env,
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert clear.returncode == 0, clear.stdout + clear.stderr
    assert f"removed {markers[0]}" in clear.stdout and not list(cache.glob("*.failed"))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_build_errors_start_with_their_cause(tmp_path, repo_copy):
    """When every flavour fails to compile, the error's first line carries the compiler's error for
    each, and nothing is recorded as failed (a failure all flavours share is not the fast flags'; a
    record an older version wrote, without a reason, is retried and dropped). A cache that cannot
    be written is named as the cause. Costs two compiler runs that fail at once."""
    from hmx_kernels.cpp import build

    cache = tmp_path / "cache"
    cache.mkdir()
    bad = ["-fno-such-flag-hmx"]
    old_marker = cache / f"hmx_kernels_ext_{build._build_key(False, '', build.CXX_FLAGS + bad)}.failed"
    old_marker.write_text("ImportError: written by an older version\n")
    code = r"""
import json
from hmx_kernels.cpp import build
build.FLAG_SETS[:] = [(name, flags + ['-fno-such-flag-hmx'], ld) for name, flags, ld in build.FLAG_SETS]
try:
    build.load_extension(with_cuda=False)
except build.ExtensionBuildError as e:
    print("RESULT " + json.dumps(str(e)))
"""
    env = clean_env(HMX_KERNELS_CACHE=cache, HMX_KERNELS_NO_CUDA="1", PYTHONPATH=repo_copy)
    error, _ = run_json(sys.executable, code, env, tmp_path)
    first = error.splitlines()[0]
    assert first.startswith("building the hmx_kernels C++ extension failed: native+openmp: "), error
    assert "portable: " in first and first.count("-fno-such-flag-hmx") == 2, error
    assert not list(cache.glob("*.failed"))
    assert not [p for p in cache.iterdir() if p.is_dir()], "a failed build left a folder behind"

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    env = clean_env(HMX_KERNELS_CACHE=blocker / "cache", HMX_KERNELS_NO_CUDA="1", PYTHONPATH=repo_copy)
    real_flags = "\n".join(ln for ln in code.splitlines() if not ln.startswith("build.FLAG_SETS"))
    error, _ = run_json(sys.executable, real_flags, env, tmp_path)
    assert error.startswith(f"cannot write the hmx_kernels build cache {blocker / 'cache'}"), error


NO_TOOLS = r"""
import json, os, warnings
from pathlib import Path
import torch
import hmx_kernels
from hmx_kernels.cpp import build
x = torch.randn(2, 5, 8)
w = [torch.randn(2, 4, 4), torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 6)]
ln = [torch.ones(8), torch.zeros(8)]
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    auto = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln)
    out = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="cpu")
ref = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend="reference")
print("RESULT " + json.dumps(dict(
    build.LOAD_INFO, missing=build._missing_toolchain(), warnings=[str(r.message) for r in rec],
    auto_err=(auto - ref).abs().max().item(), max_err=(out - ref).abs().max().item(),
    cache_created=Path(os.environ["HMX_KERNELS_CACHE"]).exists())))
"""


def _check_loaded_without_tools(info, source, folder):
    assert len(info["missing"]) == 2, info  # really no compiler and no ninja here
    assert info["missing"][0].startswith("no C++ compiler") and info["missing"][1].startswith("ninja not found")
    assert info["source"] == source and info["path"] == str(folder) and not info["built"], info
    assert info["flavour"] == "native+openmp" and not info["warnings"], info
    assert info["max_err"] < 1e-4 and info["auto_err"] < 1e-4


@pytest.mark.slow
def test_finished_build_loads_without_compiler_or_ninja(prebuilt_cache, tmp_path, repo_copy):
    """A build made ahead of time, in the package (`python -m hmx_kernels.build --into-package`) or
    in the cache, is used by a process that has no compiler and no ninja: PATH is an empty folder
    and the interpreter is a venv's without ninja. backend="cpu" and "auto" run the extension."""
    folder = prebuilt_cache["folder"]
    site = package_copy(tmp_path / "site", installed=True)
    proc = subprocess.run([sys.executable, "-m", "hmx_kernels.build", "--into-package"], cwd=str(tmp_path),
                          env=clean_env(HMX_KERNELS_CACHE=prebuilt_cache["cache"], HMX_KERNELS_NO_CUDA="1",
                                        PYTHONPATH=site),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    prebuilt = site / "hmx_kernels" / "_prebuilt" / folder.name
    assert f"found already built (cache) in {folder}" in proc.stdout, proc.stdout
    assert f"copied to {prebuilt}" in proc.stdout and "compiling" not in proc.stderr
    assert [p.name for p in prebuilt.iterdir() if p.suffix == ".so"] == [p.name for p in folder.glob("*.so")]

    py = make_venv(tmp_path / "venv")
    empty = tmp_path / "empty_path"
    empty.mkdir()
    no_cache = tmp_path / "no_cache"
    # the package's prebuilt folder, with an empty cache
    info, _ = run_json(py, NO_TOOLS, clean_env(PATH=empty, HMX_KERNELS_CACHE=no_cache, PYTHONPATH=site), tmp_path)
    _check_loaded_without_tools(info, "prebuilt", prebuilt)
    assert not info["cache_created"]
    # the cache (a copy of the one `python -m hmx_kernels.build` filled), no prebuilt folder
    cache = tmp_path / "cache"
    shutil.copytree(prebuilt_cache["cache"], cache)
    info, _ = run_json(py, NO_TOOLS, clean_env(PATH=empty, HMX_KERNELS_CACHE=cache, PYTHONPATH=repo_copy), tmp_path)
    _check_loaded_without_tools(info, "cache", cache / folder.name)


def test_build_command_compiled_with_ninja_next_to_the_interpreter_only(prebuilt_cache):
    """The session fixture ran `python -m hmx_kernels.build` with ninja only in its venv's bin/:
    it compiled into the cache and said where."""
    folder = prebuilt_cache["folder"]
    assert f"native+openmp build): compiled in {folder}" in prebuilt_cache["stdout"]
    assert folder.parent == prebuilt_cache["cache"] and list(folder.glob("hmx_kernels_ext_*.so"))
    assert "flavour native+openmp" in (folder / "BUILD_INFO").read_text()
    assert not list(prebuilt_cache["cache"].glob("*.failed"))


def test_ninja_next_to_the_interpreter_is_found(tmp_path, repo_copy):
    """ninja in the venv's bin/ but not on PATH (a Jupyter kernel, a script started by the venv's
    interpreter path) counts as present, and the build sees it (PATH restored afterwards); without
    it, the hint names this interpreter's pip."""
    code = r"""
import json, os, sys
from torch.utils.cpp_extension import is_ninja_available
from hmx_kernels.cpp import build
before = os.environ.get("PATH")
outside = is_ninja_available()
with build._ninja_on_path():
    inside = is_ninja_available()
print("RESULT " + json.dumps(dict(missing=build._missing_toolchain(), found=build._find_ninja(), outside=outside,
                                  inside=inside, restored=os.environ.get("PATH") == before, exe=sys.executable)))
"""
    path = path_without(tmp_path / "path", {"ninja"})
    with_ninja = make_venv(tmp_path / "with", ninja=True)
    info, _ = run_json(with_ninja, code, clean_env(PATH=path, PYTHONPATH=repo_copy), tmp_path)
    assert info["missing"] == [] and info["found"] == str(with_ninja.parent / "ninja"), info
    assert not info["outside"] and info["inside"] and info["restored"], info

    without = make_venv(tmp_path / "without")
    info, _ = run_json(without, code, clean_env(PATH=path, PYTHONPATH=repo_copy), tmp_path)
    assert info["found"] is None and len(info["missing"]) == 1, info
    assert info["missing"][0].startswith("ninja not found")
    assert info["missing"][0].endswith(f"{info['exe']} -m pip install ninja")


@pytest.mark.slow
def test_damaged_builds_are_rebuilt_not_marked_failed(prebuilt_cache, tmp_path):
    """Finished builds that do not load are skipped, and the fast flavour is rebuilt into the cache:
    nothing is recorded as failed and no slower build is used. Here the package's prebuilt module is
    truncated (which dlopen would not refuse but crash on: SIGBUS; found from the size and sha256
    in BUILD_INFO, or without them from the ELF headers) and the cached one is not a shared object
    at all and has no record (dlopen refuses it: ImportError). One compile."""
    from hmx_kernels.cpp import build

    folder = prebuilt_cache["folder"]
    name = folder.name
    site = package_copy(tmp_path / "site", installed=True)  # laid out like an installed package
    prebuilt = site / "hmx_kernels" / "_prebuilt" / name
    build._copy_build(folder, prebuilt.parent)
    so = next(prebuilt.glob(name + "*.so"))
    data = so.read_bytes()
    assert build._elf_problem(data) is None
    assert all(build._elf_problem(data[:n]) for n in (10, 1000, len(data) // 3, len(data) - 1))
    so.write_bytes(data[: len(data) // 3])
    with pytest.raises(build.ExtensionBuildError, match="is damaged: .* do not match the size"):
        build._check_module_file(prebuilt, so)
    info_text = (prebuilt / "BUILD_INFO").read_text()
    (prebuilt / "BUILD_INFO").write_text("written by an older version, without a module record\n")
    with pytest.raises(build.ExtensionBuildError, match="is damaged: its headers point past its end"):
        build._check_module_file(prebuilt, so)
    (prebuilt / "BUILD_INFO").write_text(info_text)

    cache = tmp_path / "cache"
    shutil.copytree(prebuilt_cache["cache"], cache)
    next((cache / name).glob(name + "*.so")).write_bytes(b"not a shared object\n" * 100)
    record = cache / name / "BUILD_INFO"  # as an older version wrote it: no record, so dlopen refuses it
    record.write_text("".join(ln for ln in record.read_text().splitlines(True) if not ln.startswith("module ")))

    info, proc = run_json(sys.executable, SCRIPT, clean_env(HMX_KERNELS_CACHE=cache, HMX_KERNELS_NO_CUDA="1",
                                                         PYTHONPATH=site), tmp_path)
    assert info["built"] and info["flavour"] == "native+openmp" and info["path"] == str(cache / name), info
    assert info["max_err"] < 1e-4
    compiling = [ln for ln in proc.stderr.splitlines() if ln.startswith("compiling")]
    assert len(compiling) == 1 and "rebuilding because" in compiling[0], proc.stderr
    assert f"the build in {prebuilt} does not load (ExtensionBuildError: {so} is damaged" in compiling[0]
    assert f"the build in {cache / name} does not load (ImportError" in compiling[0]
    assert f"the build in {prebuilt} does not load" in proc.stderr.split("RuntimeWarning: ", 1)[1]
    assert "portable" not in proc.stderr and "uses the" not in proc.stderr, proc.stderr
    assert not list(cache.glob("*.failed"))
    assert sorted(p.name for p in cache.iterdir()) == [name, name + ".lock"]  # the broken copy is gone


def test_every_csrc_file_is_in_the_build_key():
    """Every C++/CUDA source and header in csrc/ is listed in hmx_kernels.cpp.build (sources or
    headers), so an edit to any of them (hmx_cpu_scan.h is included by hmx_cpu.cpp) changes the
    build key and rebuilds, never reusing a stale cached binary."""
    from hmx_kernels.cpp import build

    listed = set(build.CPU_SOURCES + build.CUDA_SOURCES + build.HEADERS)
    present = {p.name for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh")}
    assert present - listed == set(), sorted(present - listed)
    assert listed - present == set(), sorted(listed - present)
