"""Every CUDA source in csrc/ compiles with plain nvcc for sm_80 and sm_90 (object files only), and
the fp16/bf16 kernels contain the tensor-core (MMA) path.

The .cu files include no torch headers, so this runs on machines without a GPU or CUDA torch
whenever nvcc is on PATH: a CUDA syntax or type error fails CI. Whether the kernels compute the
right thing is checked by tests/test_cuda_backend.py, on a GPU only.

MMA check: the generator kernels instantiated for __half / __nv_bfloat16 must contain
`wmma.mma.sync` / `mma.sync` in their compute_80 PTX and, where cuobjdump (with nvdisasm) is on
PATH, HMMA instructions in their sm_80 and sm_90 SASS; the fp32 instantiations must contain none.
So a build that silently drops the MMA path (a wrong `#if`, a dead branch) fails here. Code for
sm_75 must compile too, without MMA (the FMA fallback below sm_80).
Every compile uses the flags of the real build: hmx_kernels/cpp/build.py's NVCC_FLAGS plus the
defines torch.utils.cpp_extension adds for nvcc (no implicit half / bfloat16 conversions).
Compiles run one at a time under `nice` (the CI machines are small and shared).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")


def _build_flags():
    from hmx_kernels.cpp.build import NVCC_FLAGS

    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:  # pragma: no cover - older / newer torch: the defines it has used so far
        COMMON_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    return list(dict.fromkeys(list(NVCC_FLAGS) + list(COMMON_NVCC_FLAGS)))


CUOBJDUMP = shutil.which("cuobjdump")
NEEDS_NVCC = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

# kernels that run a generator MLP per token tile (fc2 on tensor cores for 2-byte types)
MLP_KERNELS = ("p_partial_kernel", "y_kernel", "query_kernel", "key_kernel")
# Itanium mangling of the template argument T in kernel<T>
TYPE_TAGS = {"half": "I6__halfE", "bf16": "I13__nv_bfloat16E", "fp32": "IfE"}
KERNEL_RE = re.compile(r"\d+(" + "|".join(MLP_KERNELS) + r")(I6__halfE|I13__nv_bfloat16E|IfE)")


def _nvcc(args, what):
    cmd = ["nice", "-n", "19", NVCC, *_build_flags(), "-Werror", "all-warnings", f"-I{CSRC}", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, f"{what}: {' '.join(cmd)}\n{proc.stdout}"
    return proc.stdout


def _kernels(sections):
    """{(kernel, type tag): body} for the generator kernels among (mangled name, body) pairs."""
    found = {}
    for name, body in sections:
        m = KERNEL_RE.search(name)
        if m:
            found[(m.group(1), m.group(2))] = found.get((m.group(1), m.group(2)), "") + body
    return found


def _check_mma(found, marker, where):
    tag_of = {v: k for k, v in TYPE_TAGS.items()}
    kernels = {k for k, _ in found}
    assert kernels, f"{where}: no generator kernels found"
    for (kernel, tag), body in sorted(found.items()):
        has = marker in body
        if tag_of[tag] == "fp32":
            assert not has, f"{where}: {kernel}<float> contains {marker} (fp32 must stay on the FMA path)"
        else:
            assert has, f"{where}: {kernel}<{tag_of[tag]}> has no {marker}: the tensor-core path was dropped"
    return kernels


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"hmx_cuda_forward.cu", "hmx_cuda_backward.cu"}


def test_cuda_sources_include_no_torch_headers():
    for path in list(CU_FILES) + sorted(CSRC.glob("*.cuh")) + [CSRC / "hmx_cuda.h", CSRC / "hmx_params.h"]:
        text = path.read_text()
        for banned in ("torch/", "ATen/", "c10/", "pybind11"):
            assert f"#include <{banned}" not in text, f"{path.name} includes {banned}"


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Object files for sm_80 + sm_90, compiled once (one nvcc at a time)."""
    out = tmp_path_factory.mktemp("cuda_objects")
    objs = {}
    for src in CU_FILES:
        obj = out / (src.stem + ".o")
        _nvcc(["-c", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               str(src), "-o", str(obj)], src.name)
        objs[src.name] = obj
    return objs


@NEEDS_NVCC
def test_nvcc_compiles_every_cu_for_sm80_and_sm90(objects):
    for name, obj in objects.items():
        assert obj.stat().st_size > 0, name


@NEEDS_NVCC
def test_fp16_bf16_kernels_use_tensor_cores_in_ptx(tmp_path):
    seen = set()
    for src in CU_FILES:
        ptx = tmp_path / (src.stem + ".ptx")
        _nvcc(["-ptx", "-arch=compute_80", str(src), "-o", str(ptx)], src.name)
        text = ptx.read_text()
        # ".entry NAME(" starts each kernel; every device function is inlined into its kernel
        parts = re.split(r"^\s*(?:\.visible\s+)?\.entry\s+(\S+?)\(", text, flags=re.M)
        sections = list(zip(parts[1::2], parts[2::2]))
        seen |= _check_mma(_kernels(sections), "mma.sync", f"{src.name} compute_80 PTX")
    assert seen == set(MLP_KERNELS)


@NEEDS_NVCC
@pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not on PATH (the PTX check above still runs)")
def test_fp16_bf16_kernels_contain_hmma_in_sass(objects):
    for name, obj in objects.items():
        proc = subprocess.run([CUOBJDUMP, "-sass", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=300)
        if proc.returncode != 0 and "nvdisasm" in proc.stdout:
            pytest.skip("cuobjdump needs nvdisasm, not on PATH")
        assert proc.returncode == 0, proc.stdout
        # "arch = sm_XX" opens each architecture's cubin, "Function : NAME" each kernel in it
        for arch_part in re.split(r"^\s*arch = ", proc.stdout, flags=re.M)[1:]:
            arch = arch_part.split(None, 1)[0]
            parts = re.split(r"^\s*Function : (\S+)", arch_part, flags=re.M)
            _check_mma(_kernels(zip(parts[1::2], parts[2::2])), "HMMA", f"{name} {arch} SASS")


@NEEDS_NVCC
def test_below_sm80_compiles_without_mma(tmp_path):
    for src in CU_FILES:
        ptx = tmp_path / (src.stem + ".ptx")
        _nvcc(["-ptx", "-arch=compute_75", str(src), "-o", str(ptx)], src.name)
        assert "mma.sync" not in ptx.read_text(), f"{src.name}: MMA code in compute_75 PTX (no bf16 MMA there)"
