"""Compile-level resource checks of the fused GPU kernels, Triton and CUDA C++, without a GPU
(tools/kernels.py, tools/cuda_resources.py).

- The committed report, benchmarks/results/kernels.csv: the exact columns; a row for every kernel x
  config x shape x dtype x arch a backend may run, and no other: for Triton every kept autotune
  candidate at the recipe shapes (every dtype; fp32 in each dot precision the launcher picks) and
  at the limit shape d_h 128 (fp16 / bf16), for CUDA C++ every kernel at those shapes and every
  dtype except what the CUDA backend declines. For every row: no register spills, shared memory
  within the arch's per-block limit (163 KB sm_80, 227 KB sm_90), and tensor-core instructions in
  every fp16 / bf16 row of a kernel that multiplies matrices (and in Triton's TF32 / 3xTF32 rows).
- benchmarks/results/kernels-limit.csv: the rows compiled but never run, each with its reason,
  exactly the declined combinations, and the reason is true of the measurements (shared memory
  over the limit).
- config.smem_bound, by which the Triton autotuner prunes per device, bounds every measured
  shared-memory size on its arch.
- Per triton version: the report of every version the config has tables for (kernels.csv for the
  dev environment's triton 3.9, kernels-triton3.6.csv ... for the others, Triton rows only) is
  checked against that version's tables (config.SPILLING_BY_TRITON, the shared-memory model), so
  the tables of the triton on the GPU machines are checked here without that triton; the fresh
  compiles check the installed triton's.
- Fresh compiles (slow): a representative subset of the Triton kernels, compiled now for sm_80
  and sm_90 at (18, 72), (64, 256) (fp32 and bf16) and (128, 512) (bf16), two kept candidates per
  kernel, holds the same invariants; so do the Triton kernels as the causal / chunked / packed
  modes launch them (BLOCKED, a piece table), at (18, 72), (64, 256) and (128, 512). The CUDA
  kernels' fresh compile is tests/test_cuda_compile.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmarks/ is a folder of the repository, not an installed package

from tools import cuda_resources as cr  # noqa: E402
from tools import kernels as K  # noqa: E402
from hmx_kernels.triton.backend import MAX_FP32_HEAD_DIM  # noqa: E402
from hmx_kernels.triton.autotune import (SMEM_LIMIT, TRITON_REPORTS, dot_precision,  # noqa: E402
                                       kept_candidates, launched_kernels, precision_name, smem_bound,
                                       unfit_reason)

CSV = os.path.join(K.RESULTS, "kernels.csv")
LIMIT_CSV = os.path.join(K.RESULTS, "kernels-limit.csv")
VERSIONS = sorted(TRITON_REPORTS)  # every triton version with tables (and a committed report)


def _csv(version, base="kernels.csv"):
    return os.path.join(K.RESULTS, K.report_name(base, version))


def _vid(version):
    return "triton%d.%d" % version
TRITON_KERNELS = {"hmx_fwd_kernel_state", "hmx_fwd_kernel_mix", "hmx_bwd_kernel_tsum", "hmx_bwd_kernel_query",
                  "hmx_bwd_kernel_key", "hmx_fwd_kernel_mix_ln", "hmx_bwd_kernel_query_ln"}


def _arch(row) -> int:
    return int(row["arch"].removeprefix("sm_"))


def _d_h(row) -> int:
    return int(row["shape"].split(",")[0])


def multiplies_matrices(row) -> bool:
    """Every Triton kernel; every CUDA kernel but sum_parts, block_window and row_sums (which only add partials)."""
    return row["backend"] == "triton" or row["kernel"] in cr.MATMUL_KERNELS


def assert_invariants(row) -> None:
    """No spills, shared memory within the arch's limit; tensor cores in every fp16 / bf16 kernel
    that multiplies matrices and in Triton's TF32 / 3xTF32 ones; none in CUDA fp32 kernels (FMA)."""
    what = f"{row['backend']} {row['arch']} {row['shape']} {row['dtype']} {row['kernel']} {row['config']}"
    assert int(row["spill_bytes"]) == 0, f"{what}: spills {row['spill_bytes']} bytes"
    assert 0 < int(row["registers"]) <= 255, what
    assert int(row["smem_bytes"]) <= SMEM_LIMIT[_arch(row)], f"{what}: {row['smem_bytes']} B shared memory"
    tc = int(row["tensor_core_instructions"])
    if row["dtype"] in ("fp16", "bf16") and multiplies_matrices(row):
        assert tc > 0, f"{what}: no HGMMA / HMMA instruction"
    if row["backend"] == "triton" and row["dtype"] == "fp32" and not row["config"].endswith("-ieee"):
        assert tc > 0, f"{what}: TF32 dots without HGMMA / HMMA"
    if row["backend"] == "cuda" and row["dtype"] == "fp32":
        assert tc == 0, f"{what}: {tc} tensor-core instructions (the CUDA fp32 kernels stay on FMA)"


def run_modes(d_h, dtype, version):
    """The float32 matmul modes (one for half dtypes) the triton backend runs at d_h under triton
    `version`: not declined for spills (config.unfit_reason)."""
    import torch

    modes = K.FP32_MODES if dtype == "fp32" else ("highest",)
    return [m for m in modes if unfit_reason(getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                             "bf16": "bfloat16"}[dtype]), d_h, m, None,
                                             version=version) is None]


def expected_triton_rows(version=None):
    """(arch, shape, dtype, kernel, config) of every Triton row the report of triton `version`
    (default: the installed one) must hold: the candidates its tables keep, in every precision the
    launcher picks (config.dot_precision) under a float32 matmul mode the backend does not decline."""
    import torch

    out = set()
    for d_h, k_h in K.SHAPES + K.LIMIT_SHAPES:
        for dtype in K.DTYPES:
            if dtype == "fp32" and d_h > MAX_FP32_HEAD_DIM:
                continue  # refused by the backend: kernels-limit.csv
            tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            for mode in run_modes(d_h, dtype, version):
                for kernel in launched_kernels(d_h):
                    operand, dot_prec = dot_precision(tdtype, d_h, mode, kernel, version)
                    precision = "half" if dtype != "fp32" else precision_name(operand, dot_prec)
                    for arch in K.ARCHS:
                        for config in kept_candidates(kernel, d_h, precision, SMEM_LIMIT[arch], arch, version=version):
                            out.add((f"sm_{arch}", f"{d_h},{k_h}", dtype, kernel, K.config_name(config, precision)))
    return out


def test_expected_rows_follow_the_launcher():
    """expected_triton_rows (from config.dot_precision per kernel) agrees with the launches the
    report compiles (captured from the launcher) under the installed triton."""
    from hmx_kernels.triton.autotune import INSTALLED_TRITON

    captured = set()
    for d_h, k_h in K.SHAPES + K.LIMIT_SHAPES:
        for dtype in K.DTYPES:
            if dtype == "fp32" and d_h > MAX_FP32_HEAD_DIM:
                continue
            for mode in run_modes(d_h, dtype, None):
                for launch in K.capture_launches(d_h, k_h, dtype, mode):
                    kw = dict(launch.kwargs)
                    precision = precision_name(kw["OPERAND"], kw["DOT_PREC"])
                    for arch in K.ARCHS:
                        for config in kept_candidates(launch.kernel, d_h, precision, SMEM_LIMIT[arch], arch):
                            captured.add((f"sm_{arch}", f"{d_h},{k_h}", dtype, launch.kernel,
                                          K.config_name(config, precision)))
    assert captured == expected_triton_rows() == expected_triton_rows(INSTALLED_TRITON)


def all_cuda_rows():
    """(arch, shape, dtype, kernel) of every CUDA kernel compiled for the report."""
    return {(f"sm_{a}", f"{d},{k}", t, kn) for a in K.ARCHS for d, k in K.SHAPES + K.LIMIT_SHAPES
            for t in K.DTYPES for kn in cr.KERNELS}


@pytest.mark.parametrize("version", VERSIONS, ids=_vid)
def test_committed_report_columns_and_invariants(version):
    path = _csv(version)
    with open(path) as f:
        assert f.readline().strip().split(",") == K.COLUMNS
    rows = K.read_csv(path)
    # the dev environment's report carries the CUDA rows too (they do not depend on triton)
    assert {r["backend"] for r in rows} == ({"triton", "cuda"} if version == K.PRIMARY_TRITON else {"triton"})
    for row in rows:
        assert_invariants(row)
    # the report's own spelling of shapes, shared by both backends
    assert {r["shape"] for r in rows} == {f"{d},{k}" for d, k in K.SHAPES + K.LIMIT_SHAPES}


@pytest.mark.parametrize("version", VERSIONS, ids=_vid)
def test_committed_report_covers_every_kernel_config_shape_dtype_arch(version):
    rows = K.read_csv(_csv(version))
    triton = [(r["arch"], r["shape"], r["dtype"], r["kernel"], r["config"]) for r in rows if r["backend"] == "triton"]
    assert len(triton) == len(set(triton)), "duplicate Triton rows"
    expected = expected_triton_rows(version)
    assert set(triton) == expected, (f"missing {sorted(expected - set(triton))[:5]}, "
                                     f"unexpected {sorted(set(triton) - expected)[:5]}: rerun python -m tools.kernels "
                                     f"under triton {version}")
    assert {r[3] for r in triton} == TRITON_KERNELS
    # every Triton kernel the launcher runs, at every shape, dtype and arch the backend does not
    # decline, has a kept candidate
    for d_h, k_h in K.SHAPES + K.LIMIT_SHAPES:
        for dtype in K.DTYPES:
            if dtype == "fp32" and d_h > MAX_FP32_HEAD_DIM:
                continue
            for arch in K.ARCHS:
                got = {r[3] for r in triton if r[:3] == (f"sm_{arch}", f"{d_h},{k_h}", dtype)}
                want = set(launched_kernels(d_h)) if run_modes(d_h, dtype, version) else set()
                assert got == want, (arch, d_h, dtype, got)
    if version != K.PRIMARY_TRITON:
        return
    cuda = [(r["arch"], r["shape"], r["dtype"], r["kernel"]) for r in rows if r["backend"] == "cuda"]
    assert len(cuda) == len(set(cuda)), "duplicate CUDA rows"
    declined = {key for key in all_cuda_rows()
                if cr.unsupported(dict(arch=key[0], shape=key[1], dtype=key[2]))}
    assert declined, "the CUDA backend declines fp32 at d_h 128 on sm_80: those rows belong to kernels-limit.csv"
    assert set(cuda) == all_cuda_rows() - declined


@pytest.mark.parametrize("version", VERSIONS, ids=_vid)
def test_limit_file_lists_exactly_the_declined_rows_with_true_reasons(version):
    path = _csv(version, "kernels-limit.csv")
    with open(path) as f:
        assert f.readline().strip().split(",") == K.COLUMNS + ["reason"]
    rows = K.read_csv(path)
    assert rows and all(r["reason"] for r in rows)
    triton = [r for r in rows if r["backend"] == "triton"]
    assert {(r["dtype"], _d_h(r)) for r in triton} == {("fp32", d) for d, _ in K.LIMIT_SHAPES}
    assert all(d > MAX_FP32_HEAD_DIM for d, _ in K.LIMIT_SHAPES)
    # the refusal's reason: every candidate of the backward kernels needs more shared memory than
    # a block gets, on both archs
    for arch in K.ARCHS:
        for kernel in ("hmx_bwd_kernel_query", "hmx_bwd_kernel_key"):
            sel = [int(r["smem_bytes"]) for r in triton if r["arch"] == f"sm_{arch}" and r["kernel"] == kernel]
            assert sel and min(sel) > SMEM_LIMIT[arch], (arch, kernel, sel)
    if version != K.PRIMARY_TRITON:
        assert {r["backend"] for r in rows} == {"triton"}
        return
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert {(r["arch"], r["shape"], r["dtype"], r["kernel"]) for r in cuda} == {
        key for key in all_cuda_rows() if cr.unsupported(dict(arch=key[0], shape=key[1], dtype=key[2]))}
    big = [int(r["smem_bytes"]) for r in cuda if r["kernel"] in ("query", "key")]
    assert big and min(big) > cr.SMEM_LIMITS["sm_80"]


def _parse_config(name: str):
    parts = name.split("-")
    precision = parts[3] if len(parts) > 3 else "half"
    return int(parts[0][2:]), int(parts[1][1:]), int(parts[2][1:]), precision


@pytest.mark.parametrize("version", VERSIONS, ids=_vid)
@pytest.mark.parametrize("base", ["kernels.csv", "kernels-limit.csv"], ids=["kernels", "limit"])
def test_smem_bound_covers_every_measurement(base, version):
    """The autotuner prunes candidates by config.smem_bound against the device's limit: it must
    never be below what the compiler actually allocates, under each triton version's model."""
    from hmx_kernels.triton.autotune import block_d

    rows = [r for r in K.read_csv(_csv(version, base)) if r["backend"] == "triton"]
    assert rows
    for row in rows:
        block_n, _, stages, precision = _parse_config(row["config"])
        bound = smem_bound(row["kernel"], block_n, block_d(_d_h(row)), stages, precision, _arch(row), version)
        assert bound >= int(row["smem_bytes"]), (row, bound)


_FRESH = r"""
import json, sys
from tools import kernels as K

specs = json.loads(sys.argv[1])  # [arch, [d_h, k_h], dtype, kernel, precision, [BN, warps, stages]]
jobs = [K.Job(a, tuple(shape), dt, kernel, prec, tuple(cfg)) for a, shape, dt, kernel, prec, cfg in specs]
rows = K.run_jobs(jobs, n_jobs=2, progress=False)
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_fresh_compiles_hold_the_invariants():
    """Compile a representative subset now (no cache): (18, 72) and (64, 256) in fp32 (in the
    default "highest" precision the launcher picks per kernel: IEEE, or 3xTF32 where IEEE spills)
    and bf16, and (128, 512) in bf16 (the split kernels), sm_80 and sm_90, the first two kept
    candidates of each kernel the launcher runs there (one of the LayerNorm-fused passes, whose
    register-heavy compiles take longest). A few minutes on 2 cores."""
    import torch

    from hmx_kernels.triton.autotune import KERNEL_CANDIDATES, LAYER_NORM_KERNELS, dot_precision

    specs = []
    for (d_h, k_h), dtypes in (((18, 72), ("fp32", "bf16")), ((64, 256), ("fp32", "bf16")), ((128, 512), ("bf16",))):
        for dtype in dtypes:
            if "highest" not in run_modes(d_h, dtype, None):
                continue  # declined by the backend under the installed triton (every candidate spills)
            for kernel in launched_kernels(d_h):
                prec = precision_name(*dot_precision(torch.float32, d_h, "highest", kernel)) if dtype == "fp32" else "half"
                keep = [c for c in KERNEL_CANDIDATES[kernel]
                        if all(c in kept_candidates(kernel, d_h, prec, SMEM_LIMIT[a], a) for a in K.ARCHS)]
                assert keep, f"{kernel}: no candidate kept at d_h {d_h}, {dtype}"
                n = 1 if kernel in LAYER_NORM_KERNELS else 2
                specs += [[a, [d_h, k_h], dtype, kernel, prec, list(c)] for c in keep[:n] for a in K.ARCHS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + sys.path)
    res = subprocess.run([sys.executable, "-c", _FRESH, json.dumps(specs)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's ptxas is not available: " + res.stderr[-300:])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.split("ROWS", 1)[1])
    assert len(rows) == len(specs)
    for row in rows:
        assert row["kept"], row
        assert_invariants({k: str(v) for k, v in row.items()})


def test_readme_gpu_estimates_follow_the_roofline():
    """README's table of GPU estimates states, per recipe shape, what tools.kernels.roofline
    (the figures of kernels.md) gives: bound and time on H100 and H200."""
    import re

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    pattern = (r"^\| \((\d+), (\d+)\) \| [^|]+ \| (bf16 / fp16|fp32, TF32 dots) \| (memory|compute) \| (\d+) us \| "
               r"(memory|compute) \| (\d+) us \|$")
    rows = re.findall(pattern, text, flags=re.M)
    assert {(int(d), int(k)) for d, k, *_ in rows} == set(K.SHAPES)
    assert len(rows) == 2 * len(K.SHAPES)
    for d, k, what, lim100, t100, lim200, t200 in rows:
        dtype, prec = ("bf16", "half") if what == "bf16 / fp16" else ("fp32", "tf32")
        for gpu, lim, t in (("H100", lim100, t100), ("H200", lim200, t200)):
            rf = K.roofline(int(d), int(k), dtype, prec, gpu)
            assert (lim, int(t)) == (rf["limit"], round(rf["bound_us"])), (d, k, what, gpu, rf)


def test_positional_encoding_stays_a_table_while_on_chip_spills():
    """hmx_kernels.triton.launch.PE_ON_CHIP may be on only if every kept candidate compiles
    without spills with the sinusoid computed on chip (benchmarks/results/kernels-pe-on-chip.csv:
    the Triton rows of kernels.csv compiled again that way, `python -m tools.kernels
    --pe-on-chip`)."""
    from hmx_kernels.triton import launch as fn

    path = os.path.join(K.RESULTS, "kernels-pe-on-chip.csv")
    with open(path) as f:
        assert f.readline().strip().split(",") == K.COLUMNS + ["stack_bytes"]
    rows = K.read_csv(path)
    key = lambda r: (r["arch"], r["shape"], r["dtype"], r["kernel"], r["config"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(key(r) for r in K.read_csv(CSV) if r["backend"] == "triton"), \
        "kernels-pe-on-chip.csv is stale: rerun python -m tools.kernels --pe-on-chip"
    spilling = [key(r) for r in rows if int(r["spill_bytes"])]
    assert fn.PE_ON_CHIP == (not spilling), spilling[:5]


_FRESH_BLOCKED = r"""
import json, sys
import torch
from tools import kernels as K
from hmx_kernels.triton import launch as fn

def capture(d_h, k_h, dtype):
    # the launches of a chunk-causal forward + backward (chunks of 32, 2 chunks of left context) at
    # the report's B = 4, N = 16384, H = 8, recorded instead of made (as K.capture_launches does)
    rec = []
    def record(kernel, grid, *args, **kwargs):
        args = tuple(("tensor", str(a.dtype).replace("torch.", "")) if isinstance(a, torch.Tensor) else a
                     for a in args)
        rec.append(K.Launch(kernel.fn.__name__, args, tuple(sorted(kwargs.items()))))
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    meta = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype, device="meta")
    B, N, H = K.ROOFLINE["B"], K.ROOFLINE["N"], K.ROOFLINE["H"]
    q, keep = meta(B, N, H * d_h), meta(B, N, dtype=torch.float32)
    gen = [meta(H, d_h, d_h), meta(H, d_h), meta(H, k_h, d_h), meta(H, k_h)] * 2
    fn._launch, fn._is_fake = record, (lambda t: True)
    _, state = fn._triton_fwd_impl(q, q, q, keep, keep, *gen, "speechbrain", 32, 2, None)
    fn._triton_bwd_impl(meta(B, N, H * d_h, dtype=torch.float32), q, q, q, keep, keep, *gen, state,
                        "speechbrain", 32, 2, None)
    return rec

rows = []
for arch, (d_h, k_h), dtype, kernel, cfg in json.loads(sys.argv[1]):
    launches = [lc for lc in capture(d_h, k_h, dtype) if lc.kernel == kernel]
    assert launches and all(lc == launches[0] for lc in launches), launches  # the state pass: fwd = bwd
    launch = launches[0]
    assert dict(launch.kwargs)["BLOCKED"] is True, launch.kwargs
    res = K.compile_launch(launch, tuple(cfg), arch)
    rows.append(dict(arch=f"sm_{arch}", shape=f"{d_h},{k_h}", dtype=dtype, kernel=kernel, config=str(cfg), **res))
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_fresh_compiles_of_the_blocked_kernels_hold_the_invariants():
    """The kernels as the mixing-block modes launch them (BLOCKED: piece table, per-block
    operands), compiled now for sm_80 and sm_90 at (18, 72) and (64, 256) in fp32 (the precision
    the launcher picks) and bf16, and at (128, 512) in bf16 (the split kernels: state and tsum
    with ROW_SPLIT over pieces, query and key without their token sums), the first kept candidate
    of each kernel the launcher runs there: no spills, shared memory within the limit, tensor
    cores unless IEEE fp32. A few minutes on 2 cores."""
    import torch

    from hmx_kernels.triton.autotune import KERNEL_CANDIDATES, LAYER_NORM_KERNELS, dot_precision

    def precision(dtype, d_h, kernel):
        return precision_name(*dot_precision(torch.float32, d_h, "highest", kernel)) if dtype == "fp32" else "half"

    specs = []
    for (d_h, k_h), dtypes in (((18, 72), ("fp32", "bf16")), ((64, 256), ("fp32", "bf16")), ((128, 512), ("bf16",))):
        for dtype in dtypes:
            if "highest" not in run_modes(d_h, dtype, None):
                continue  # declined by the backend under the installed triton (every candidate spills)
            for kernel in launched_kernels(d_h):
                if kernel in LAYER_NORM_KERNELS:  # plain mixing only: never launched with BLOCKED
                    continue
                prec = precision(dtype, d_h, kernel)
                keep = [c for c in KERNEL_CANDIDATES[kernel] if all(
                    c in kept_candidates(kernel, d_h, prec, SMEM_LIMIT[a], a, blocked=True) for a in K.ARCHS)]
                assert keep, f"{kernel}: no candidate kept at d_h {d_h}, {dtype}"
                specs += [[a, [d_h, k_h], dtype, kernel, list(keep[0])] for a in K.ARCHS]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + sys.path)
    res = subprocess.run([sys.executable, "-c", _FRESH_BLOCKED, json.dumps(specs)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=900)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's ptxas is not available: " + res.stderr[-300:])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.split("ROWS", 1)[1])
    assert len(rows) == len(specs)
    for row in rows:
        cfg = json.loads(row["config"])
        prec = precision(row["dtype"], int(row["shape"].split(",")[0]), row["kernel"])
        assert_invariants({**{k: str(v) for k, v in row.items()}, "backend": "triton",
                           "config": K.config_name(tuple(cfg), prec)})


def test_tables_follow_the_installed_triton_and_fall_back_to_the_nearest():
    import triton

    from hmx_kernels.triton import autotune as tc

    assert tc.INSTALLED_TRITON == tc.triton_version(triton.__version__)
    assert tc.SPILLING is tc.SPILLING_BY_TRITON[tc.tables_version()]
    assert tc.triton_version("3.6.0+git1a2b3c") == (3, 6) and tc.triton_version("3.10.1") == (3, 10)
    assert set(tc.SPILLING_BY_TRITON) == set(tc._SMEM_MODEL_BY_TRITON) == set(tc.BLOCKED_SPILLING_BY_TRITON) == set(VERSIONS)
    assert tc.BLOCKED_SPILLING is tc.BLOCKED_SPILLING_BY_TRITON[tc.tables_version()]
    for version in VERSIONS:
        assert tc.tables_version(version) == version
        assert os.path.exists(os.path.join(K.RESULTS, TRITON_REPORTS[version])), TRITON_REPORTS[version]
        # a shared-memory model for every kernel and precision of every version
        assert set(tc._SMEM_MODEL_BY_TRITON[version]) == set(tc._SMEM_MODEL_BY_TRITON[K.PRIMARY_TRITON])
    # an unmeasured release takes the nearest measured one (a newer major: the newest), with a warning
    assert tc.tables_version((3, 7)) == (3, 6) and tc.tables_version((3, 3)) == (3, 6)
    assert tc.tables_version((3, 8)) == (3, 9) and tc.tables_version((3, 11)) == (3, 9)
    assert tc.tables_version((4, 0)) == (3, 9)
    with pytest.warns(UserWarning, match=r"triton 3\.7 uses 3\.6's"):
        tc.warn_if_unmeasured((3, 7))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tc.warn_if_unmeasured((3, 9))


def test_configurations_that_spill_in_every_candidate_are_declined_per_version(monkeypatch):
    """Under triton 3.6 every candidate of the fp32 backward key pass spills at D 64 in IEEE and in
    3xTF32 (its fallback; kernels-triton3.6.md): fp32 at d_h 33..64 is declined in the "highest"
    and "high" float32 matmul modes with a reason naming the kernel and the spills, and runs with
    TF32 dots ("medium"). Triton 3.9 declines none of them; fp16 / bf16 are never declined."""
    from types import SimpleNamespace

    import torch

    from hmx_kernels.triton import autotune as tc
    from hmx_kernels.triton.backend import fit_reasons

    for d_h in (18, 32, 64):
        for mode in K.FP32_MODES:
            assert unfit_reason(torch.float32, d_h, mode, None, version=(3, 9)) is None, (d_h, mode)
    for d_h in (18, 32, 64, 128):
        for dtype in (torch.float16, torch.bfloat16):
            for version in VERSIONS:
                assert unfit_reason(dtype, d_h, "highest", None, version=version) is None
    for d_h in (33, 64):
        for mode in ("highest", "high"):
            why = unfit_reason(torch.float32, d_h, mode, None, version=(3, 6))
            assert why and "hmx_bwd_kernel_key" in why and "spills registers in every" in why, why
            assert "triton 3.6" in why and "kernels-triton3.6.md" in why and "'cuda'" in why, why
            assert "'medium'" in why, why  # TF32 dots have spill-free candidates there
        assert unfit_reason(torch.float32, d_h, "medium", None, version=(3, 6)) is None
    assert unfit_reason(torch.float32, 32, "highest", None, version=(3, 6)) is None
    # the backend refuses it on a GPU when 3.6 is the installed triton (so `auto` moves on)
    monkeypatch.setattr(tc, "SPILLING", tc.SPILLING_BY_TRITON[(3, 6)])
    monkeypatch.setattr(tc, "INSTALLED_TRITON", (3, 6))
    monkeypatch.setattr(tc, "device_limits", lambda index: (SMEM_LIMIT[90], 90))
    # dot_precision is memoised for the installed tables (fixed in a process): forget the choices
    # made under the real tables first, and those made under the swapped ones at the end
    tc.dot_precision.cache_clear()
    gpu = dict(device=torch.device("cuda"), B=2, H=4)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        (why,) = fit_reasons(SimpleNamespace(dtype=torch.float32, d_h=64, **gpu))
        assert "hmx_bwd_kernel_key" in why and "triton 3.6" in why, why
        assert fit_reasons(SimpleNamespace(dtype=torch.bfloat16, d_h=64, **gpu)) == []
        assert fit_reasons(SimpleNamespace(dtype=torch.float32, d_h=32, **gpu)) == []
        torch.set_float32_matmul_precision("medium")
        assert fit_reasons(SimpleNamespace(dtype=torch.float32, d_h=64, **gpu)) == []
    finally:
        torch.set_float32_matmul_precision(old)
        tc.dot_precision.cache_clear()
