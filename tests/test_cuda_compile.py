"""Every CUDA source in csrc/ compiles with plain nvcc for sm_80 and sm_90 (object files only).

The .cu files include no torch headers, so this runs on machines without a GPU or CUDA torch
whenever nvcc is on PATH: a CUDA syntax or type error fails CI. Whether the kernels compute the
right thing is checked by tests/test_cuda_backend.py, on a GPU only.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"hmx_cuda_forward.cu", "hmx_cuda_backward.cu"}


def test_cuda_sources_include_no_torch_headers():
    for path in list(CU_FILES) + sorted(CSRC.glob("*.cuh")) + [CSRC / "hmx_cuda.h", CSRC / "hmx_params.h"]:
        text = path.read_text()
        for banned in ("torch/", "ATen/", "c10/", "pybind11"):
            assert f"#include <{banned}" not in text, f"{path.name} includes {banned}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_nvcc_compiles_every_cu_for_sm80_and_sm90(tmp_path):
    procs = []
    for src in CU_FILES:
        cmd = [
            NVCC, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", f"-I{CSRC}",
            "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
            str(src), "-o", str(tmp_path / (src.stem + ".o")),
        ]
        procs.append((src, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures = []
    for src, cmd, proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            failures.append(f"{src.name}: {' '.join(cmd)}\n{out}")
        else:
            assert (tmp_path / (src.stem + ".o")).stat().st_size > 0
    assert not failures, "\n\n".join(failures)
