"""The traffic and launch account (benchmarks/traffic.py) on a small case: it counts the layer's
launches, measures bytes from tensor arguments, finds host synchronisations, and today's dense
Triton path has none. Meta tensors: nothing is computed, a case takes well under a second."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import traffic  # noqa: E402
from benchmarks.config import Shape  # noqa: E402

SMALL = Shape("d16k32h2", 16, 32, 2)  # d_h 8, k_h 16
B, N = 2, 64

pytestmark = pytest.mark.filterwarnings("ignore:speechbrain-variant HyperMixing ignores key")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_account_counts_launches_bytes_and_syncs(dtype):
    acc = traffic.account_layer(SMALL, dtype, N, B, "triton")
    row = traffic.summarize(acc, SMALL, dtype, N, B, "triton", False)
    names = [e.name for e in acc.select(kind="triton")]
    # the four token passes and the finalize kernels between them, in order (d_h < 128: no split
    # T pass; the backward reuses the forward's C, c0); the mix and query passes carry the
    # LayerNorm (the layer ops)
    assert names == ["hmx_fwd_kernel_state", "hmx_fwd_finalize", "hmx_fwd_kernel_mix_ln",
                     "hmx_bwd_kernel_query_ln", "hmx_bwd_finalize_mid", "hmx_bwd_kernel_key",
                     "hmx_bwd_finalize_weights"]
    assert [e.phase for e in acc.select(kind="triton")] == ["fwd"] * 3 + ["bwd"] * 4
    assert all(e.scope in ("triton_layer_fwd", "triton_layer_bwd") for e in acc.select(kind="triton"))
    assert all(e.write_bytes > 0 for e in acc.select(kind="triton"))
    # bytes from the arguments: the mix pass writes the output [B, N, d] in its dtype and the
    # LayerNorm statistics [B, N, 2] fp32; the state pass reads x (key = value: once) and the fp32
    # PE table [N, d]
    es = torch.empty(0, dtype=dtype).element_size()
    mix = acc.select(kind="triton")[2]
    assert mix.write_bytes == B * N * SMALL.d * es + B * N * 2 * 4
    state = acc.select(kind="triton")[0]
    fc1 = SMALL.H * (SMALL.d_h ** 2 + SMALL.d_h) * es
    assert state.read_bytes == B * N * SMALL.d * es + N * SMALL.d * 4 + fc1
    # the key pass writes the one token gradient dx [B, N, d] in its dtype (self-mixing) and reads
    # the query pass's fp32 dq
    key = acc.select(kind="triton")[5]
    assert key.read_bytes >= B * N * SMALL.d * (es + 4)
    # the finalize runs in its kernels and the LayerNorm in the passes: no torch op inside the
    # ops; outside them only the one cast of the weight gradients for half parameters
    assert row["fwd_aten_in_op_launches"] == 0 and row["bwd_aten_in_op_launches"] == 0
    layer_ops = [e.name for e in acc.select(kind="aten", inside_ops=False)]
    assert layer_ops == ([] if dtype == torch.float32 else ["_to_copy"]), layer_ops
    assert row["launches"] == (7 if dtype == torch.float32 else 8)
    assert row["launches"] == sum(e.launches for e in acc.events if e.kind in ("triton", "aten"))
    assert row["bytes"] >= row["min_bytes"] > 0 and row["two_pass_bytes"] > row["min_bytes"]
    # today's dense path: no host synchronisation, no host-to-device copy
    assert row["host_syncs"] == 0, row["sync_ops"]
    assert row["h2d_copies"] == 0


def test_account_finds_a_host_sync():
    def step(layer, x, kpm, account):
        out, _ = layer(x, x, x)
        if out.abs().max().item() > 0:  # a deliberate host synchronisation
            pass
        torch.nonzero(out[0, :, 0])  # a data-dependent shape
        account.phase = "bwd"
        out.sum().backward()

    acc = traffic.account_layer(SMALL, torch.float32, N, B, "triton", step=step)
    assert [(e.phase, e.name) for e in acc.syncs()] == [("fwd", "_local_scalar_dense"), ("fwd", "nonzero")]
    row = traffic.summarize(acc, SMALL, torch.float32, N, B, "triton", False)
    assert row["host_syncs"] == 2 and row["sync_ops"] == "_local_scalar_dense nonzero"


def test_chunked_path_has_no_sync_and_copies_its_piece_table():
    """Chunk-causal mixing builds its piece table from the block arguments (Python ints, cached per
    length, chunk size, left context and device): no host synchronisation and no host-to-device
    copy per step (on a GPU the table is copied once, when a shape is first seen; on the meta
    device its creation is no copy), and the host-side ops that build it are neither launches nor
    syncs."""
    acc = traffic.account_layer(SMALL, torch.float32, N, B, "triton", mode="chunk32")
    row = traffic.summarize(acc, SMALL, torch.float32, N, B, "triton", False, "chunk32")
    assert row["mode"] == "chunk32" and row["host_syncs"] == 0
    assert row["h2d_copies"] == 0
    assert [e.name for e in acc.select(kind="triton")] == [
        "hmx_fwd_kernel_state", "hmx_fwd_kernel_mix", "hmx_bwd_kernel_query", "hmx_bwd_kernel_key"]


def test_cpu_backend_is_one_call_per_direction():
    acc = traffic.account_layer(SMALL, torch.float32, N, B, "cpu")
    calls = [(e.phase, e.name) for e in acc.select(kind="extension")]
    assert calls == [("fwd", "cpp_fwd"), ("bwd", "cpp_bwd")]
    assert not acc.select(kind="triton") and not acc.syncs()


def test_footprint_counts_broadcast_elements_once():
    t = torch.empty(3, 1, 5, device="meta").expand(3, 7, 5)
    assert traffic.footprint(t) == 3 * 5 * 4
    assert traffic.footprint(torch.empty(4, 6, dtype=torch.bfloat16, device="meta").t()) == 48


def test_host_time_counts_launches():
    us, launches = traffic.host_time_us(SMALL, B=1, N=16, repeats=2)
    assert launches == 7 and us > 0  # 4 token passes, 3 finalize kernels (the backward reuses C)


def test_gpu_estimate_crossover_is_where_the_times_meet():
    e = traffic.gpu_estimate({4096: 10 ** 8, 16384: 4 * 10 ** 8}, 100, SMALL, 4, "H100")
    g = traffic.GPU_MODEL
    slope = (4 * 10 ** 8 - 10 ** 8) / (16384 - 4096)
    const = 10 ** 8 - slope * 4096
    Nx = e["crossover"]
    hmx = (slope * Nx + const) / (g["H100"]["hbm_tb_s"] * 1e12 * g["bandwidth_share"]) + 100 * g["launch_gap_us"] * 1e-6
    fa = g["fa_fwd_bwd_factor"] * 4 * 64 * 4 * SMALL.H * Nx ** 2 / (g["H100"]["fa3_tflop_s"] * 1e12)
    assert math.isclose(hmx, fa, rel_tol=1e-3)


def test_readme_gpu_estimates_come_from_the_committed_account():
    """README's "GPU estimates" table is the traffic tool's model applied to the committed
    benchmarks/results/traffic.csv (rerun `python -m benchmarks.traffic` and paste its table when
    either changes)."""
    import csv

    with open(os.path.join(ROOT, "benchmarks", "results", "traffic.csv"), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] == "triton" and not r["mode"]]
    assert {r["shape"] for r in rows} == {"sb144", "sb256", "tf512"} and {int(r["N"]) for r in rows} == {4096, 16384}
    table = traffic.estimates_table(traffic.layer_estimates(rows))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    missing = [line for line in table.splitlines() if line not in readme]
    assert not missing, "README's GPU estimates differ from the model on traffic.csv:\n" + "\n".join(missing[:4])
