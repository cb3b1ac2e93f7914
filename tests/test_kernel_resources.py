"""Compile-level resource checks of the Triton kernels, without a GPU (benchmarks/kernels.py).

- The committed report, benchmarks/results/kernels.csv: the exact columns; a row for every
  kernel x kept autotune candidate x recipe shape x dtype (fp32 in each dot precision the launcher
  picks) x arch, and no other; for every row no register spills, shared memory within the arch's
  per-block limit (163 KB sm_80, 227 KB sm_90), and tensor-core instructions in every kernel whose
  dots take fp16 / bf16 or TF32 operands (IEEE fp32 dots are FFMA only).
- config.smem_bound, by which the autotuner prunes per device, bounds every measured shared-memory
  size on its arch (kernels.csv and the limit shape's kernels-limit.csv).
- Fresh compiles (slow): a representative subset, compiled now for sm_80 and sm_90 at (18, 72)
  and (64, 256), fp32 and bf16, two kept candidates per kernel, holds the same invariants; so do
  the kernels as the causal / chunked / packed modes launch them (BLOCKED, a piece table).
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

from benchmarks import kernels as K  # noqa: E402
from hmx_kernels.triton.config import SMEM_LIMIT, kept_candidates, precision_name, smem_bound  # noqa: E402

CSV = os.path.join(K.RESULTS, "kernels.csv")
LIMIT_CSV = os.path.join(K.RESULTS, "kernels-limit.csv")


def _arch(row) -> int:
    return int(row["arch"].removeprefix("sm_"))


def assert_invariants(row) -> None:
    """No spills, shared memory within the arch's limit, tensor cores unless IEEE fp32 dots."""
    what = f"{row['arch']} {row['shape']} {row['dtype']} {row['kernel']} {row['config']}"
    assert int(row["spill_bytes"]) == 0, f"{what}: spills {row['spill_bytes']} bytes"
    assert 0 < int(row["registers"]) <= 255, what
    assert int(row["smem_bytes"]) <= SMEM_LIMIT[_arch(row)], f"{what}: {row['smem_bytes']} B shared memory"
    if not row["config"].endswith("-ieee"):
        assert int(row["tensor_core_instructions"]) > 0, f"{what}: no HGMMA / HMMA instruction"


def expected_rows():
    """(arch, shape, dtype, kernel, config) of every row kernels.csv must hold."""
    out = set()
    for d_h, k_h in K.SHAPES:
        for dtype in K.DTYPES:
            for mode in (K.FP32_MODES if dtype == "fp32" else ("highest",)):
                for launch in K.capture_launches(d_h, k_h, dtype, mode):
                    kw = dict(launch.kwargs)
                    precision = precision_name(kw["OPERAND"], kw["DOT_PREC"])
                    for arch in K.ARCHS:
                        for config in kept_candidates(launch.kernel, d_h, precision, SMEM_LIMIT[arch], arch):
                            out.add((f"sm_{arch}", f"{d_h},{k_h}", dtype, launch.kernel, K.config_name(config, precision)))
    return out


def test_committed_report_columns_and_invariants():
    rows = K.read_csv(CSV)
    with open(CSV) as f:
        assert f.readline().strip().split(",") == K.COLUMNS
    assert rows
    for row in rows:
        assert row["backend"] == "triton", row
        assert_invariants(row)


def test_committed_report_covers_every_kernel_config_shape_dtype_arch():
    rows = K.read_csv(CSV)
    got = [(r["arch"], r["shape"], r["dtype"], r["kernel"], r["config"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate rows"
    expected = expected_rows()
    assert set(got) == expected, (f"missing {sorted(expected - set(got))[:5]}, "
                                  f"unexpected {sorted(set(got) - expected)[:5]}: rerun python -m benchmarks.kernels")
    assert {r["dtype"] for r in rows} == set(K.DTYPES)
    assert {r["kernel"] for r in rows} == {"hmx_fwd_kernel_state", "hmx_fwd_kernel_mix",
                                           "hmx_bwd_kernel_query", "hmx_bwd_kernel_key"}


def _parse_config(name: str):
    parts = name.split("-")
    precision = parts[3] if len(parts) > 3 else "half"
    return int(parts[0][2:]), int(parts[1][1:]), int(parts[2][1:]), precision


@pytest.mark.parametrize("path", [CSV, LIMIT_CSV], ids=["kernels", "limit"])
def test_smem_bound_covers_every_measurement(path):
    """The autotuner prunes candidates by config.smem_bound against the device's limit: it must
    never be below what the compiler actually allocates."""
    from hmx_kernels.triton.config import block_d

    for row in K.read_csv(path):
        block_n, _, stages, precision = _parse_config(row["config"])
        d_h = int(row["shape"].split(",")[0])
        bound = smem_bound(row["kernel"], block_n, block_d(d_h), stages, precision, _arch(row))
        assert bound >= int(row["smem_bytes"]), (row, bound)


_FRESH = r"""
import json, sys
from benchmarks import kernels as K

specs = json.loads(sys.argv[1])  # [arch, [d_h, k_h], dtype, kernel, precision, [BN, warps, stages]]
jobs = [K.Job(a, tuple(shape), dt, kernel, prec, tuple(cfg)) for a, shape, dt, kernel, prec, cfg in specs]
rows = K.run_jobs(jobs, n_jobs=2, progress=False)
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_fresh_compiles_hold_the_invariants():
    """Compile a representative subset now (no cache): (18, 72) and (64, 256), fp32 (in the
    default "highest" precision the launcher picks per kernel: IEEE, or 3xTF32 where IEEE spills)
    and bf16, sm_80 and sm_90, the first two kept candidates of each kernel there. About one to
    two minutes on 2 cores."""
    import torch

    from hmx_kernels.triton.config import KERNEL_CANDIDATES, dot_precision

    specs = []
    for d_h, k_h in ((18, 72), (64, 256)):
        for dtype in ("fp32", "bf16"):
            for kernel in KERNEL_CANDIDATES:
                prec = precision_name(*dot_precision(torch.float32, d_h, "highest", kernel)) if dtype == "fp32" else "half"
                keep = [c for c in KERNEL_CANDIDATES[kernel]
                        if all(c in kept_candidates(kernel, d_h, prec, SMEM_LIMIT[a], a) for a in K.ARCHS)]
                assert keep, f"{kernel}: no candidate kept at d_h {d_h}, {dtype}"
                specs += [[a, [d_h, k_h], dtype, kernel, prec, list(c)] for c in keep[:2] for a in K.ARCHS]
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


_FRESH_BLOCKED = r"""
import json, sys
import torch
from benchmarks import kernels as K
from hmx_kernels.triton import function as fn

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
    launch = next(lc for lc in capture(d_h, k_h, dtype) if lc.kernel == kernel)
    assert dict(launch.kwargs)["BLOCKED"] is True, launch.kwargs
    res = K.compile_launch(launch, tuple(cfg), arch)
    rows.append(dict(arch=f"sm_{arch}", shape=f"{d_h},{k_h}", dtype=dtype, kernel=kernel, config=str(cfg), **res))
print("ROWS" + json.dumps(rows))
"""


@pytest.mark.slow
def test_fresh_compiles_of_the_blocked_kernels_hold_the_invariants():
    """The kernels as the mixing-block modes launch them (BLOCKED: piece table, per-block
    operands), compiled now for sm_80 and sm_90 at (64, 256), the largest recipe head size, fp32
    (the precision the launcher picks) and bf16, the first kept candidate of each kernel: no
    spills, shared memory within the limit, tensor cores unless IEEE fp32. About a minute."""
    import torch

    from hmx_kernels.triton.config import KERNEL_CANDIDATES, dot_precision

    specs = []
    for dtype in ("fp32", "bf16"):
        for kernel in KERNEL_CANDIDATES:
            prec = precision_name(*dot_precision(torch.float32, 64, "highest", kernel)) if dtype == "fp32" else "half"
            keep = [c for c in KERNEL_CANDIDATES[kernel]
                    if all(c in kept_candidates(kernel, 64, prec, SMEM_LIMIT[a], a) for a in K.ARCHS)]
            specs += [[a, [64, 256], dtype, kernel, list(keep[0])] for a in K.ARCHS]
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
        prec = "half" if row["dtype"] == "bf16" else precision_name(*dot_precision(torch.float32, 64, "highest",
                                                                                   row["kernel"]))
        assert_invariants({**{k: str(v) for k, v in row.items()}, "config": K.config_name(tuple(cfg), prec)})
