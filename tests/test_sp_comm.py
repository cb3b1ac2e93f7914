"""Sequence parallelism communicates the same bytes per layer whatever the sequence length.

Two gloo processes (spawned here) each hold one slice of every sequence and run one forward and
backward of a sequence-parallel FusedHyperMixing layer at two lengths N. Every collective that
reaches PyTorch's dispatcher is counted (`benchmarks.sequence_parallel.CollectiveCounter`, which
also serves the scaling benchmark): the bytes handed to collectives must be equal at both lengths
and equal the documented volume in the compute dtype: two all-reduces, one in the forward and one
in the backward, of 2 x B x H x k_h x d_h values on the reference (the state P and its gradient)
and of B x H x (d_h^2 + d_h) values on the cpu backend (the reassociated key sums S, sv and query
sums T, sdy), plus one all-gather of 12 int64 values per call (the slice lengths and the call's
signature, hmx_kernels.parallel.agree_on_slices), with or without an explicit position offset."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from envtools import exit_worker_now

from hmx_kernels.parallel import SIGNATURE_FIELDS

B, D, K, H = 2, 16, 48, 4  # d_h = 4, k_h = 12
LENGTHS = (10, 37)


def _worker(rank, world, init_file, out_dir, backend):
    from benchmarks.sequence_parallel import CollectiveCounter
    from hmx_kernels import FusedHyperMixing

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            layer = FusedHyperMixing(D, K, num_heads=H, sequence_parallel_group=dist.group.WORLD,
                                     backend=backend).to(dtype)
            for N in LENGTHS:
                lo, hi = (0, N // 3) if rank == 0 else (N // 3, N)  # uneven slices
                x = torch.randn(B, hi - lo, D, dtype=dtype, requires_grad=True)
                for explicit_offset in (True, False):
                    with CollectiveCounter() as cc:
                        out = layer(x, position_offset=lo if explicit_offset else None)[0]
                        out.square().sum().backward()
                    assert torch.isfinite(x.grad).all()
                    results[f"{dtype}-{N}-{explicit_offset}"] = cc.ops
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()
    exit_worker_now()


def _cpu_ok():
    import hmx_kernels

    x = torch.randn(1, 3, D)
    layer = hmx_kernels.FusedHyperMixing(D, K, num_heads=H)
    p = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                                 layer.layer_norm.weight, layer.layer_norm.bias)
    return not hmx_kernels.backend_reasons(p)["cpu"]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not _cpu_ok(), reason="cpu backend unavailable"))])
def test_sequence_parallel_bytes_per_layer_do_not_depend_on_length(tmp_path, backend):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from benchmarks.sequence_parallel import state_bytes_per_layer_step, state_values_per_all_reduce

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), backend), nprocs=2, join=True)
    for rank in range(2):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for dtype, size in (("torch.float32", 4), ("torch.float64", 8)):
            state = state_values_per_all_reduce(B, D, K, H, backend)
            assert state == (B * H * (K // H) * (D // H) if backend == "reference"  # P [B, H, k_h, d_h]
                             else B * H * ((D // H) ** 2 + D // H))  # S [d_h, d_h], sv [d_h] per (b, h)
            documented = state_bytes_per_layer_step(B, D, K, H, size, backend=backend)
            assert documented == 2 * state * size + 8 * (2 + len(SIGNATURE_FIELDS))  # + the agreement gather
            for explicit_offset in (True, False):
                per_n = [res[f"{dtype}-{N}-{explicit_offset}"] for N in LENGTHS]
                total = [sum(op["bytes"] for op in ops) for ops in per_n]
                assert total[0] == total[1], (dtype, explicit_offset, per_n)  # independent of N
                ops = per_n[0]
                reduces = [op for op in ops if "allreduce" in op["op"] or "all_reduce" in op["op"]]
                assert [op["numel"] for op in reduces] == [state, state], ops  # one forward, one backward
                assert all(op["dtypes"] == [dtype.split(".")[1]] for op in reduces), ops
                gathers = [op for op in ops if "allgather" in op["op"] or "all_gather" in op["op"]]
                assert [op["numel"] for op in gathers] == [2 + len(SIGNATURE_FIELDS)], ops  # lengths, signature
                assert total[0] == documented, (total, documented, ops)
                assert len(ops) == 3, ops
    assert 2 + len(SIGNATURE_FIELDS) == 12  # README, "Sequence parallelism": "12 int64 values per process"
