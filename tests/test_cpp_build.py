"""Build and cache behaviour of the C++ extension, in fresh processes and a fresh cache folder.

Two processes start building into an empty cache at the same time: exactly one compiles, the other
waits on the lock and reuses its result; a third process and a copy of the package laid out like
an installed (non-editable) one reuse the cache without compiling. This costs one build (about a
minute on 2 cores).
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
def test_fresh_cache_concurrent_builders_then_reuse(tmp_path):
    cache = tmp_path / "cache"
    # two builders racing on an empty cache
    procs = [_spawn(cache, REPO, tmp_path) for _ in range(2)]
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
    info, err = _result(_spawn(cache, REPO, tmp_path))
    assert info["built"] is False and "compiling" not in err
    assert info["seconds"] < 10, info  # importing a cached module, not compiling (a build takes ~1 min)
    assert time.perf_counter() - t0 < 120

    # a copy laid out like an installed package (sources in hmx_kernels/csrc, no repository around)
    site = tmp_path / "site"
    shutil.copytree(REPO / "hmx_kernels", site / "hmx_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "csrc", site / "hmx_kernels" / "csrc")
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


def test_import_compiles_nothing_and_missing_compiler_falls_back(tmp_path):
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
    env = dict(os.environ, HMX_KERNELS_CACHE=str(cache), CXX="no-such-compiler-hmx", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no C++ compiler ('no-such-compiler-hmx' not on PATH)" in out.stdout
    assert "falls back" in out.stdout
    assert "ERR backend 'cpu' cannot run this call" in out.stdout
    assert "compiling" not in out.stderr


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
def test_failed_fast_build_falls_back_to_portable_build(tmp_path):
    """When the fast flavour does not compile (here: a flag the compiler rejects), the portable
    flavour is built and used, and the failure is remembered so later processes skip it."""
    cache = tmp_path / "cache"
    code = SCRIPT.replace(
        "from hmx_kernels.cpp import build\n",
        "from hmx_kernels.cpp import build\n"
        "build.FLAG_SETS[0] = ('native+openmp', build.CXX_FLAGS + ['-fno-such-flag-hmx'], ['-fopenmp'])\n",
    )
    env = dict(os.environ, HMX_KERNELS_CACHE=str(cache), HMX_KERNELS_NO_CUDA="1", PYTHONPATH=str(REPO))
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        assert info["flavour"] == "portable" and info["max_err"] < 1e-4
        assert len(list(cache.glob("*.failed"))) == 1
        if attempt == 0:
            assert info["built"] and "trying a more portable one" in proc.stderr
        else:  # remembered: neither flavour is compiled again
            assert not info["built"] and "compiling" not in proc.stderr
