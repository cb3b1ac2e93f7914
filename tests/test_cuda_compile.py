"""The CUDA kernels at compile level: every csrc/*.cu compiles with plain nvcc for sm_80 and sm_90
(object files, -Werror), and every kernel meets the resource invariants csrc/README.md states.

The .cu files include no torch headers, so this runs on machines without a GPU or CUDA torch
whenever nvcc is on PATH: a CUDA syntax or type error fails CI. Whether the kernels compute the
right thing is checked by tests/test_cuda_backend.py, on a GPU only (tests/test_cuda_math.py checks
the algebra they implement, on the CPU).

Invariants, per kernel and for (d_h, k_h) in tools.cuda_resources.SHAPES (18,72, 32,128,
64,256, 128,512), fp32 / fp16 / bf16, sm_80 / sm_90:
- 0 spill bytes and at most 255 registers (ptxas -v);
- dynamic (the kernels' own size function, run on the host) + static shared memory within the
  arch's opt-in limit (sm_80 163 KB, sm_90 227 KB), except where the backend declines the shape
  (fp32 kernels at d_h > 64 on sm_80: tools.cuda_resources.unsupported, the backend's
  CUDA_WIDE_FP32_SMEM_BYTES and hmx::cuda::not_supported say the same);
- fp16 / bf16: tensor-core instructions (HMMA) in the SASS of every kernel that multiplies
  matrices, and `mma.sync` in its compute_80 PTX; fp32: none (plain FMA, no TF32);
- the grid rule: token chunks = clamp(ceil(2 SMs / (B H)), 1, ceil(L / tile)).
Checked fresh on one compile of both archs (`compiled` below, one nvcc at a time under `nice`) and
on every committed CUDA row (backend "cuda" of benchmarks/results/kernels.csv, and of
kernels-limit.csv for the rows the backend declines), which must agree with the fresh compile in everything the compiler version does not change (rows, tiles, shared memory).
Code for sm_75 must compile too, without MMA (the SIMT path below sm_80). cuobjdump (SASS) comes
from PATH, the CUDA toolkit or triton's bundled copy; without it the SASS checks skip.
"""
from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from tools import cuda_resources as cr  # noqa: E402

CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
CUOBJDUMP = cr.find_cuobjdump()
NEEDS_NVCC = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
NEEDS_CUOBJDUMP = pytest.mark.skipif(CUOBJDUMP is None, reason="cuobjdump not found (PATH, toolkit, triton)")
WERROR = ["-Werror", "all-warnings"]
ARCHS = ("80", "90")


def _build_flags():
    return cr.build_flags()


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"hmx_cuda_forward.cu", "hmx_cuda_backward.cu"}


def test_cuda_sources_include_no_torch_headers():
    for path in list(CU_FILES) + sorted(CSRC.glob("*.cuh")) + [CSRC / "hmx_cuda.h", CSRC / "hmx_params.h"]:
        text = path.read_text()
        for banned in ("torch/", "ATen/", "c10/", "pybind11"):
            assert f"#include <{banned}" not in text, f"{path.name} includes {banned}"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every .cu compiled once for sm_80 + sm_90 (-Werror, -Xptxas -v, compute_80 PTX embedded)
    and the host size / grid tables: (objects, tables)."""
    if NVCC is None:
        pytest.skip("nvcc not on PATH")
    out = tmp_path_factory.mktemp("cuda_objects")
    objects = cr.compile_objects(ARCHS, out, WERROR)
    tables = cr.host_tables(sorted({d for d, _ in cr.SHAPES}), out)
    return objects, tables


@pytest.fixture(scope="module")
def fresh_rows(compiled):
    if CUOBJDUMP is None:
        pytest.skip("cuobjdump not found (PATH, toolkit, triton)")
    objects, tables = compiled
    return cr.rows_from(objects, tables, ARCHS)


@NEEDS_NVCC
def test_nvcc_compiles_every_cu_for_sm80_and_sm90(compiled):
    objects, _ = compiled
    assert set(objects) == {p.name for p in CU_FILES}
    for name, (obj, _log) in objects.items():
        assert obj.stat().st_size > 0, name


def _check_rows(rows, where):
    """The invariants on report rows; returns the rows checked."""
    from hmx_kernels.cpp.cuda import CUDA_WIDE_FP32_SMEM_BYTES

    assert rows, f"{where}: no rows"
    keys = {(r["arch"], r["shape"], r["dtype"], r["kernel"]) for r in rows}
    assert len(keys) == len(rows), f"{where}: duplicate rows"
    expected = {(f"sm_{a}", f"{d},{k}", t, kn) for a in ARCHS for d, k in cr.SHAPES for t in cr.DTYPES
                for kn in cr.KERNELS}
    assert keys == expected, f"{where}: missing {sorted(expected - keys)[:5]}, extra {sorted(keys - expected)[:5]}"
    for r in rows:
        what = f"{where}: {r['arch']} {r['shape']} {r['dtype']} {r['kernel']}"
        assert list(r) == cr.FIELDS, what
        assert r["backend"] == "cuda", what
        assert re.fullmatch(r"T\d+-w8", r["config"]), what
        assert r["spill_bytes"] == 0, f"{what}: {r['spill_bytes']} spill bytes"
        assert 0 < r["registers"] <= cr.MAX_REGISTERS, f"{what}: {r['registers']} registers"
        limit = cr.SMEM_LIMITS[r["arch"]]
        if cr.unsupported(r):
            assert r["kernel"] not in ("query", "key") or r["smem_bytes"] > limit, f"{what}: declined but fits"
        else:
            assert r["smem_bytes"] <= limit, f"{what}: {r['smem_bytes']} B shared memory > {limit}"
        tc = r["tensor_core_instructions"]
        if r["dtype"] == "fp32" or r["kernel"] not in cr.MATMUL_KERNELS:
            assert tc == 0, f"{what}: {tc} tensor-core instructions (fp32 stays on FMA, no TF32)"
        else:
            assert tc > 0, f"{what}: no HMMA / HGMMA: the tensor-core path was dropped"
    # the backend's decline threshold is the largest fp32 kernel at d_h > 64
    wide = [r["smem_bytes"] for r in rows if r["dtype"] == "fp32" and int(r["shape"].split(",")[0]) > 64]
    assert max(wide) == CUDA_WIDE_FP32_SMEM_BYTES, "hmx_kernels/cpp/cuda.py CUDA_WIDE_FP32_SMEM_BYTES is stale"
    assert cr.SMEM_LIMITS["sm_80"] < CUDA_WIDE_FP32_SMEM_BYTES <= cr.SMEM_LIMITS["sm_90"]
    return rows


@NEEDS_NVCC
@NEEDS_CUOBJDUMP
def test_fresh_compile_meets_the_invariants(fresh_rows):
    """Every kernel of this compile; the brief's representative subset (both archs, fp32 and
    bf16, (18, 72) and (64, 256)) is part of it."""
    rows = _check_rows(fresh_rows, "fresh compile")
    subset = [r for r in rows if r["dtype"] in ("fp32", "bf16") and r["shape"] in ("18,72", "64,256")]
    assert len(subset) == 2 * 2 * 2 * len(cr.KERNELS)


def test_committed_csv_meets_the_invariants():
    _check_rows(cr.read_csv(), "benchmarks/results/kernels.csv + kernels-limit.csv (backend cuda)")


@NEEDS_NVCC
@NEEDS_CUOBJDUMP
def test_committed_csv_matches_a_fresh_compile(fresh_rows):
    """Rows, tiles and shared memory do not depend on the nvcc version; registers and instruction
    counts may, so only their invariants are compared (above). Regenerate the CSVs with
    `python -m tools.kernels` after changing the kernels."""
    stable = lambda r: (r["arch"], r["shape"], r["dtype"], r["kernel"], r["config"], r["smem_bytes"])  # noqa: E731
    assert sorted(map(stable, cr.read_csv())) == sorted(map(stable, fresh_rows))


@NEEDS_NVCC
def test_token_chunks_follow_the_grid_rule(compiled):
    """hmx::cuda::token_chunks, run on the host: about two blocks per SM over all (b, h), at least
    one tile per chunk; at B = 1, H = 8 and N = 4096 the grid covers every SM."""
    _, tables = compiled
    plans = [t for t in tables if t["kind"] == "chunks"]
    assert plans
    for t in plans:
        bh = t["B"] * t["H"]
        want = min(max(math.ceil(2 * t["sms"] / bh), 1), math.ceil(t["L"] / t["tile"]))
        assert t["chunks"] == want, t
        if t["B"] == 1 and t["L"] >= 4096:
            assert bh * t["chunks"] >= t["sms"], t


@NEEDS_NVCC
def test_fp16_bf16_kernels_use_tensor_cores_in_ptx(compiled, tmp_path):
    """`mma.sync` in the compute_80 PTX of every fp16 / bf16 kernel that multiplies matrices, none
    in the fp32 ones (the PTX embedded by the compile, or a separate -ptx compile without cuobjdump)."""
    objects, _ = compiled
    seen = set()
    for name, (obj, _log) in objects.items():
        if CUOBJDUMP is not None:
            text = cr.ptx_text(obj)
        else:
            ptx = tmp_path / (Path(name).stem + ".ptx")
            cr.nvcc(["-ptx", "-arch=compute_80", str(CSRC / name), "-o", str(ptx)], name, WERROR)
            text = ptx.read_text()
        # ".entry NAME(" starts each kernel; every device function is inlined into its kernel
        parts = re.split(r"^\s*(?:\.visible\s+)?\.entry\s+(\S+?)\(", text, flags=re.M)
        for kname, body in zip(parts[1::2], parts[2::2]):
            kid = cr.kernel_id(kname)
            if kid is None or kid[0] not in cr.MATMUL_KERNELS:
                continue
            kernel, dtype, block = kid
            seen.add((kernel, dtype, block))
            has = "mma.sync" in body
            assert has == (dtype != "fp32"), f"{name}: {kernel}<{dtype}, {block}> mma.sync in PTX: {has}"
    assert seen == {(k, t, b) for k in cr.MATMUL_KERNELS for t in cr.DTYPES for b in (32, 64, 128)}


@NEEDS_NVCC
def test_below_sm80_compiles_without_mma(tmp_path):
    for src in CU_FILES:
        ptx = tmp_path / (src.stem + ".ptx")
        cr.nvcc(["-ptx", "-arch=compute_75", str(src), "-o", str(ptx)], src.name, WERROR)
        assert "mma.sync" not in ptx.read_text(), f"{src.name}: MMA code in compute_75 PTX (no bf16 MMA there)"


def test_build_flags_are_the_real_build_flags():
    from hmx_kernels.cpp.build import NVCC_FLAGS

    flags = _build_flags()
    assert all(f in flags for f in NVCC_FLAGS)
    assert "-D__CUDA_NO_HALF_CONVERSIONS__" in flags
