"""Installation facts: the declared torch floor, the triton backend's probe of what torch offers,
the licence and typing marker that ship with the package."""
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import hmx_kernels
from hmx_kernels.dispatch import BackendNotSupportedError

ROOT = Path(__file__).resolve().parent.parent


def _small_call():
    g = torch.Generator().manual_seed(0)
    H, d_h, k_h = 2, 4, 6
    x = torch.randn(1, 5, H * d_h, generator=g)
    w = [torch.randn(H, d_h, d_h, generator=g), torch.randn(H, d_h, generator=g),
         torch.randn(H, k_h, d_h, generator=g), torch.randn(H, k_h, generator=g)]
    return (x, None, None, *w, None, None, None, None, torch.ones(H * d_h), torch.zeros(H * d_h))


def test_triton_backend_reports_an_old_torch_and_auto_moves_on(monkeypatch):
    """On a torch without torch.library.wrap_triton / triton_op (before 2.6) the triton backend
    says so, is refused by name with that reason, and `auto` picks another backend."""
    from hmx_kernels.triton import backend as tb

    assert tb.torch_missing_for_triton() == ""  # the torch here has everything
    monkeypatch.delattr(torch.library, "wrap_triton")
    monkeypatch.setattr(tb, "_AVAILABLE", {})
    why = tb.torch_missing_for_triton()
    assert "torch.library.wrap_triton" in why and f"torch >= {tb.TORCH_FOR_TRITON}" in why
    args = _small_call()
    problem = hmx_kernels.check_inputs(*args, variant="speechbrain")
    assert any("torch >= 2.6" in r for r in hmx_kernels.backend_reasons(problem)["triton"])
    with pytest.raises(BackendNotSupportedError, match=r"wrap_triton.*torch >= 2\.6"):
        hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="triton")
    assert hmx_kernels.select_backend("auto", problem).name != "triton"
    out = hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="auto")
    ref = hmx_kernels.hyper_mixing(*args, variant="speechbrain", backend="reference")
    assert torch.allclose(out, ref, atol=1e-5)


def test_torch_probe_names_a_missing_device_property():
    """A CUDA build of torch whose device properties lack shared_memory_per_block_optin (before 2.6)."""
    from types import SimpleNamespace

    from hmx_kernels.triton.backend import torch_missing_for_triton

    fake = SimpleNamespace(__version__="2.5.1", library=SimpleNamespace(wrap_triton=1, triton_op=1),
                           _C=SimpleNamespace(_CudaDeviceProperties=type("Props", (), {})))
    assert "shared_memory_per_block_optin" in torch_missing_for_triton(fake)
    fake.library = SimpleNamespace()
    assert "torch 2.5.1 lacks torch.library.wrap_triton, torch.library.triton_op" in torch_missing_for_triton(fake)


def _setup_torch_floor():
    text = (ROOT / "setup.py").read_text()
    m = re.search(r'"torch>=([0-9.]+),<3"', text)
    assert m, "setup.py declares no torch floor"
    return m.group(1)


def test_declared_torch_floor_has_what_import_needs():
    """setup.py's floor is the release that brought the APIs `import hmx_kernels` calls
    (torch.library.custom_op with register_fake / register_autograd: 2.4), and README's versions
    table states the same floors."""
    floor = _setup_torch_floor()
    assert tuple(int(v) for v in floor.split(".")) >= (2, 4)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"torch >= {floor}" in readme
    from hmx_kernels.triton.backend import TORCH_FOR_TRITON

    assert f"torch >= {TORCH_FOR_TRITON}" in readme


def test_license_and_typing_marker_ship():
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "hmx_kernels contributors" in licence
    assert 'license="MIT"' in (ROOT / "setup.py").read_text()
    assert (ROOT / "hmx_kernels" / "py.typed").is_file()
    assert re.search(r'"hmx_kernels":\s*\[[^\]]*"py\.typed"', (ROOT / "setup.py").read_text())


# ---- ahead-of-time builds for any x86-64 CPU with AVX2 ---------------------------------------
def test_x86_64_flavours_follow_the_cpu_flags(monkeypatch):
    """AVX-512 hosts get v4 then v3, AVX2-only hosts v3, older CPUs none (they compile as usual)."""
    from hmx_kernels.cpp import build

    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    v3, v4 = frozenset(build.X86_64_V3_CPU_FLAGS), frozenset(build.X86_64_V4_CPU_FLAGS)
    assert [f[0] for f in build.x86_64_flavours(v4)] == ["x86-64-v4+openmp", "x86-64-v3+openmp"]
    assert [f[0] for f in build.x86_64_flavours(v3 | {"avx512f"})] == ["x86-64-v3+openmp"]
    assert build.x86_64_flavours(v3 - {"avx2"}) == []
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    assert build.x86_64_flavours(v4) == []


def test_x86_64_flavour_flags_and_keys(monkeypatch):
    """The flavours target a level, not the build machine, and their cache key ignores the CPU
    model and the OS release (so another host finds the build), while the native key does not."""
    from hmx_kernels.cpp import build

    for name, cflags, ldflags, _ in build.X86_64_FLAG_SETS:
        level = name.split("+")[0]
        assert f"-march={level}" in cflags and "-march=native" not in " ".join(cflags)
        assert "-fopenmp" in cflags and "-fopenmp" in ldflags
    cflags = build.X86_64_FLAG_SETS[1][1]
    native = build.FLAG_SETS[0][1]
    keys = (build._build_key(False, "", cflags, host_specific=False), build._build_key(False, "", native))
    monkeypatch.setattr(build, "_cpu_fingerprint", lambda: "another CPU model")
    monkeypatch.setattr(build.platform, "platform", lambda: "Linux-9.9-another-kernel")
    assert build._build_key(False, "", cflags, host_specific=False) == keys[0]
    assert build._build_key(False, "", native) != keys[1]


def test_compiler_takes_the_x86_64_flavour_flags(tmp_path):
    """The C++ compiler accepts each flavour's flags (OpenMP included) for a small program that uses
    the same constructs as the twin (omp simd, a parallel loop)."""
    import shutil
    import subprocess

    from hmx_kernels.cpp import build

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "probe.cpp"
    src.write_text("#include <omp.h>\nfloat f(float* x, int n) { float s = 0;\n#pragma omp simd reduction(+:s)\n"
                   "for (int i = 0; i < n; ++i) s += x[i] * x[i];\nreturn s; }\n"
                   "int main() { float x[64] = {1}; float t = 0;\n#pragma omp parallel for reduction(+:t)\n"
                   "for (int i = 0; i < 4; ++i) t += f(x, 64);\nreturn t > 0 ? 0 : 1; }\n")
    for name, cflags, ldflags, _ in build.X86_64_FLAG_SETS:
        proc = subprocess.run([cxx, *cflags, str(src), "-o", str(tmp_path / name), *ldflags],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"


@pytest.mark.slow
def test_x86_64_build_loads_on_another_host(tmp_path, repo_copy):
    """`python -m hmx_kernels.build --x86-64` on an AVX2-only CPU builds the x86-64-v3 flavour (and
    says it skips v4); a process that sees another CPU model and OS release and has no compiler
    loads that build, which computes what the reference computes. The v3 module holds no AVX-512
    instruction (no zmm register), so it runs on any AVX2 CPU. One build (about 1 min on 2 cores)."""
    import shutil
    import subprocess

    from envtools import clean_env, run_json

    from hmx_kernels.cpp import build

    if "x86-64-v3+openmp" not in [f[0] for f in build.x86_64_flavours()]:
        pytest.skip("this CPU cannot run the x86-64-v3 flavour (no AVX2)")
    if shutil.which(os.environ.get("CXX", "c++")) is None or build._find_ninja() is None:
        pytest.skip("no C++ compiler or ninja")
    env = clean_env(PYTHONPATH=repo_copy, HMX_KERNELS_NO_CUDA="1", HMX_KERNELS_CACHE=tmp_path / "cache")
    avx2_only = "build.host_cpu_flags = lambda: frozenset(build.X86_64_V3_CPU_FLAGS)\n"
    code = ("import json, sys\nfrom hmx_kernels.cpp import build\n" + avx2_only +
            "from hmx_kernels import build as cli\n"
            "sys.argv = ['python -m hmx_kernels.build', '--x86-64']\n"
            "rc = cli.main(sys.argv[1:])\n"
            "print('RESULT ' + json.dumps(rc))\n")
    rc, proc = run_json(sys.executable, code, env, tmp_path)
    assert rc == 0, proc.stderr
    assert "x86-64-v4+openmp build): not built, this CPU lacks avx512" in proc.stdout, proc.stdout
    line = [ln for ln in proc.stdout.splitlines() if "x86-64-v3+openmp build): compiled in" in ln]
    assert line, proc.stdout
    folder = Path(line[0].split(" in ", 1)[1].strip())
    (so,) = folder.glob(f"{folder.name}*.so")
    if shutil.which("objdump"):
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True,
                             timeout=300).stdout
        assert "ymm" in asm and "zmm" not in asm

    code = ("import json, torch\nfrom hmx_kernels.cpp import build\n" + avx2_only +
            "build._cpu_fingerprint = lambda: 'another CPU model'\n"
            "build.platform.platform = lambda: 'Linux-9.9-another-kernel'\n"
            "build._missing_toolchain = lambda *a: ['no compiler here']\n"
            "import hmx_kernels\n"
            "g = torch.Generator().manual_seed(0)\n"
            "x = torch.randn(2, 7, 8, generator=g)\n"
            "w = [torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, generator=g), "
            "torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, generator=g)]\n"
            "ln = [torch.ones(8), torch.zeros(8)]\n"
            "out = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend='cpu')\n"
            "ref = hmx_kernels.hyper_mixing(x, None, None, *w, *w, *ln, backend='reference')\n"
            "print('RESULT ' + json.dumps(dict(build.LOAD_INFO, err=(out - ref).abs().max().item())))\n")
    info, proc = run_json(sys.executable, code, env, tmp_path)
    assert info["flavour"] == "x86-64-v3+openmp" and info["source"] == "cache" and not info["built"], info
    assert info["err"] < 1e-4, info
    assert "RuntimeWarning" not in proc.stderr, proc.stderr


# ---- developer loop ------------------------------------------------------------------------
def _recipe(target):
    text = (ROOT / "Makefile").read_text()
    body = text.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
    return [ln.strip() for ln in body.splitlines()[1:] if ln.startswith("\t")]


def test_setup_installs_speechbrain_last_so_pip_reports_no_unmet_requirements():
    """pip checks the requirements of every installed package an installation touches: with
    speechbrain installed (--no-deps, so torchaudio & co. are missing) any later `pip install`
    prints an ERROR line listing them. The set-up removes it first and installs it last."""
    lines = [ln for ln in _recipe("$(STAMP)") if "pip " in ln]
    assert "uninstall" in lines[0] and "speechbrain" in lines[0]
    assert "--no-deps" in lines[-1] and "SPEECHBRAIN_SPEC" in lines[-1]
    assert not any("SPEECHBRAIN_SPEC" in ln or "speechbrain=" in ln for ln in lines[:-1])
    assert "$(SPEECHBRAIN_DEPS)" in " ".join(lines[1:-1])


def test_fast_target_uses_registered_markers():
    (line,) = _recipe("test-fast")
    assert '-m "not slow and not compile"' in line
    text = (ROOT / "pyproject.toml").read_text()
    for marker in ("slow", "compile"):
        assert re.search(rf'^\s*"{marker}: ', text, flags=re.M), f"marker {marker} is not registered"
    assert "--update-results" in (ROOT / "benchmarks" / "runinfo.py").read_text()
    assert "HMX_BENCH_UPDATE=$(UPDATE)" in " ".join(_recipe("bench"))
