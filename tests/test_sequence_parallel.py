"""Sequence parallelism over torch.distributed (gloo, CPU): 2 and 4 processes each hold an uneven
contiguous slice of every sequence (with padding masks); the all-reduced state gives each rank its
slice of the single-process result, outputs and input gradients, and the parameter gradients
summed over ranks equal the single-process ones. float64; tolerance 1e-12 of the largest magnitude
(the same arithmetic, the state summed in another order). The reference and the cpu and cuda
backends take the group (cpu and cuda sum their key sums S, sv in the forward and their query sums
T, sdy in the backward over the group; cuda: fp32 on CUDA tensors, gloo on one GPU, SETUPS);
triton declines with a reason."""
from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from envtools import exit_worker_now

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from hmx_kernels.dispatch import get_backend

SPLITS = {2: [9, 14], 4: [3, 7, 5, 8]}  # N = 23


# backend -> (device, dtype, scale-relative tolerance of a slice against the one-process result).
# float64: the same arithmetic, the state summed in another order. cuda (fp32 only: the kernels take
# no float64): both sides run the same fp32 kernels, whose partial sums are grouped differently
# (other chunks per rank, one more addition per rank): a few fp32 ulps, amplified by the GELU and
# the LayerNorm.
SETUPS = {"reference": ("cpu", torch.float64, 1e-12), "cpu": ("cpu", torch.float64, 1e-12),
          "cuda": ("cuda", torch.float32, 2e-5)}


def _worker(rank, world, init_file, variant, backend):
    sys.path.insert(0, os.path.dirname(__file__))
    from utils import assert_close

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        device, dtype, tol = SETUPS[backend]
        torch.manual_seed(0)
        layer = FusedHyperMixing(12, 24, num_heads=2, variant=variant, backend=backend).to(device, dtype)
        B, N = 2, sum(SPLITS[world])
        g = torch.Generator().manual_seed(1)
        x = torch.randn(B, N, 12, generator=g, dtype=torch.float64).to(device, dtype)
        grad = torch.randn(B, N, 12, generator=g, dtype=torch.float64).to(device, dtype)
        pad = torch.zeros(B, N, dtype=torch.bool, device=device)
        pad[1, 17:] = True  # the padding falls on the last ranks' slices

        def run(layer, x, pad, **kw):
            x = x.clone().requires_grad_(True)
            out = layer(x, x, x, key_padding_mask=pad, **kw) if variant == "speechbrain" else \
                layer(x, x, x, None, pad, **kw)
            out = out[0] if isinstance(out, tuple) else out
            return out, x

        full, xf = run(layer, x, pad)
        full_grads = torch.autograd.grad(full, [xf, *layer.parameters()], grad)

        lo = sum(SPLITS[world][:rank])
        hi = lo + SPLITS[world][rank]
        layer.sequence_parallel_group = dist.group.WORLD
        local, xl = run(layer, x[:, lo:hi], pad[:, lo:hi])
        local_grads = list(torch.autograd.grad(local, [xl, *layer.parameters()], grad[:, lo:hi]))
        assert hmx_kernels.sequence_parallel_offset(hi - lo) == lo
        assert_close("out slice", local, full[:, lo:hi], tol)
        assert_close("input grad slice", local_grads[0], full_grads[0][:, lo:hi], tol)
        for i, (lg, fg) in enumerate(zip(local_grads[1:], full_grads[1:])):
            dist.all_reduce(lg)  # data-parallel style: parameter gradients summed over ranks
            assert_close(f"param grad {i}", lg, fg, tol)
    finally:
        dist.destroy_process_group()
    exit_worker_now()


def _skip_unless_runs(backend):
    """Skip when `backend` cannot run here (checked in the test, not at import: the workers import
    this module)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if backend == "cpu" and not _cpu_ok():
        pytest.skip("cpu backend unavailable")
    if backend == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        x = torch.randn(1, 5, 8, device="cuda")
        layer = FusedHyperMixing(8, 8, num_heads=2).cuda()
        p = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                                     layer.layer_norm.weight, layer.layer_norm.bias)
        why = hmx_kernels.backend_reasons(p)["cuda"]
        if why:
            pytest.skip(f"cuda backend unavailable: {why}")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only


def _cpu_ok():
    x = torch.randn(1, 5, 8)
    layer = FusedHyperMixing(8, 8, num_heads=2)
    p = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                                 layer.layer_norm.weight, layer.layer_norm.bias)
    return not hmx_kernels.backend_reasons(p)["cpu"]


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_sequence_parallel_matches_single_process(tmp_path, world, variant, backend):
    _skip_unless_runs(backend)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), variant, backend), nprocs=world, join=True)


def test_fused_backends_decline_sequence_parallel_arguments():
    """triton takes a position offset (Capabilities.position_offset) but no sequence-parallel
    group; cuda takes both (a group implies offsets)."""
    x = torch.randn(1, 5, 8)
    layer = FusedHyperMixing(8, 8, num_heads=2)
    p = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                                 layer.layer_norm.weight, layer.layer_norm.bias, position_offset=7)
    reasons = hmx_kernels.backend_reasons(p)
    assert reasons["reference"] == [] and (reasons["cpu"] == [] or not _cpu_ok())
    cuda_caps = get_backend("cuda").capabilities
    grouped = dataclasses.replace(p, sequence_parallel_group=object())
    for q in (p, grouped):
        assert not any("position offsets" in r or "sequence parallelism" in r for r in cuda_caps.reasons(q))
    if "triton" in reasons:
        assert not any("position offsets" in r for r in reasons["triton"]), reasons["triton"]
        grouped = dataclasses.replace(p, sequence_parallel_group=object())
        assert any("sequence parallelism" in r for r in get_backend("triton").capabilities.reasons(grouped))
    # the reference continues the positional encoding from the offset
    layer.backend = "reference"
    tail = long = torch.randn(1, 5, 8)
    with_offset = layer(tail, position_offset=7)[0]
    assert torch.equal(layer(long, position_offset=0)[0], layer(long)[0])
    assert not torch.allclose(with_offset, layer(tail)[0])
    if _cpu_ok():  # the cpu backend shifts its positional encoding the same way
        layer.backend = "cpu"
        assert torch.allclose(layer(tail, position_offset=7)[0], with_offset, atol=1e-5, rtol=0)


def _data_parallel_worker(rank, world, init_file, wrapper):
    sys.path.insert(0, os.path.dirname(__file__))
    from utils import assert_close

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def model():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(8, 16), _Mixer(), torch.nn.Linear(16, 4))

        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(2 * world, 11, 8, generator=g), torch.randn(2 * world, 11, 4, generator=g))
                   for _ in range(3)]
        single = model()
        opt = torch.optim.SGD(single.parameters(), lr=0.1)
        for x, t in batches:  # one process, the concatenated batch
            opt.zero_grad()
            torch.nn.functional.mse_loss(single(x), t).backward()
            opt.step()

        local = model()
        if wrapper == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(local)
        else:
            from torch.distributed.fsdp import fully_shard

            for m in local:
                if any(True for _ in m.parameters()):
                    fully_shard(m)
            wrapped = fully_shard(local)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        for x, t in batches:  # each rank its share of the batch
            opt.zero_grad()
            sl = slice(2 * rank, 2 * rank + 2)
            torch.nn.functional.mse_loss(wrapped(x[sl]), t[sl]).backward()
            opt.step()
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in wrapped.state_dict().items()}
        for k, v in single.state_dict().items():
            key = k if k in state else "module." + k
            assert_close(k, state[key], v, 1e-5)
    finally:
        dist.destroy_process_group()
    exit_worker_now()


class _Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = FusedHyperMixing(16, 32, num_heads=2, backend="cpu")

    def forward(self, x):
        return self.mix(x)[0]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_training_matches_one_process(tmp_path, wrapper):
    """DistributedDataParallel and FSDP (fully_shard) over a model with a FusedHyperMixing layer
    (cpu backend): after 3 SGD steps the parameters equal one process's on the whole batch (fp32,
    1e-5: the gradient is averaged over ranks instead of over the batch in one sum)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_data_parallel_worker, args=(2, str(tmp_path / "init"), wrapper), nprocs=2, join=True)


# ---- ranks that disagree, empty slices and cross-mixing: every rank raises together or all are right ----
def _init_group(rank, world, init_file):
    import datetime

    # a short timeout: a rank left waiting fails this test in a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _raises_on_this_rank(fn, error, *fragments):
    try:
        fn()
    except error as e:
        for fragment in fragments:
            assert fragment in str(e), (fragment, str(e))
        return str(e)
    raise AssertionError(f"no {error.__name__} raised")


def _disagreeing_worker(rank, world, init_file, cpu_ok):
    from hmx_kernels.parallel import RankMismatchError

    _init_group(rank, world, init_file)
    try:
        group = dist.group.WORLD
        x = torch.randn(2, 5 + rank, 12, dtype=torch.float64)

        def layer(**kw):
            torch.manual_seed(0)
            return FusedHyperMixing(12, kw.pop("k", 24), num_heads=2, sequence_parallel_group=group,
                                    **kw).double()

        # different backends (as when backend="auto" falls back on one rank): named on every rank
        if cpu_ok:
            mixed = layer(backend="reference" if rank == 0 else "cpu")
            _raises_on_this_rank(lambda: mixed(x), RankMismatchError, "backend: rank 0 reference, rank 1 cpu")
        # k_h = d_h + 1 on one rank: the reference's all-reduce sizes would agree and return garbage
        odd = layer(backend="reference", k=24 if rank == 0 else 14)  # k_h 12 vs 7 = d_h + 1
        _raises_on_this_rank(lambda: odd(x), RankMismatchError, "k_h: rank 0 12, rank 1 7")
        # a different batch size, and a different dtype
        same = layer(backend="reference")
        xb = torch.randn(2 + rank, 5, 12, dtype=torch.float64)
        _raises_on_this_rank(lambda: same(xb), RankMismatchError, "B: rank 0 2, rank 1 3")
        _raises_on_this_rank(lambda: same.to(torch.float32 if rank else torch.float64)(x.to(same.layer_norm.weight.dtype)),
                             RankMismatchError, "dtype: rank 0 torch.float64, rank 1 torch.float32")
        same.double()
        # a rank whose own inputs are refused: it raises its error, the others stop with it
        bad_mask = torch.zeros(2, x.shape[1], dtype=torch.float64 if rank == 1 else torch.bool)
        if rank == 1:
            _raises_on_this_rank(lambda: same(x, key_padding_mask=bad_mask), TypeError, "key_padding_mask")
        else:
            _raises_on_this_rank(lambda: same(x, key_padding_mask=bad_mask), RankMismatchError, "rank(s) [1]")
        # a slice whose global positions leave the encoding's exact range (the limit lowered here to
        # 15; really 2**24 for speechbrain): rank 1's offset 5 is known only after the gather
        from hmx_kernels import problem

        limit = problem.MAX_POSITION["speechbrain"]
        problem.MAX_POSITION["speechbrain"] = 15
        try:
            xl = torch.randn(2, 5 if rank == 0 else 14, 12, dtype=torch.float64)
            _raises_on_this_rank(lambda: same(xl), RankMismatchError, "rank 1 of the sequence-parallel group",
                                 "reaches position 18, beyond 15")
        finally:
            problem.MAX_POSITION["speechbrain"] = limit
        # after all that, the group still works: the same call on both ranks runs
        out = same(x)[0]
        assert out.shape == x.shape and torch.isfinite(out).all()
    finally:
        dist.destroy_process_group()
    exit_worker_now()


def test_ranks_that_disagree_raise_together(tmp_path):
    """Ranks with different backends, k_h, batch sizes or dtypes, one rank with refused inputs, or
    a slice beyond the encoding's exact positions (known only from the gathered offsets): every
    rank raises (RankMismatchError naming the field and every rank's value, or the refused
    rank's own error) instead of aborting in gloo, returning garbage or waiting for the timeout."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_disagreeing_worker, args=(2, str(tmp_path / "init"), _cpu_ok()), nprocs=2, join=True)


def _slices_worker(rank, world, init_file, backend):
    sys.path.insert(0, os.path.dirname(__file__))
    from utils import assert_close
    from hmx_kernels.parallel import RankMismatchError

    _init_group(rank, world, init_file)
    try:
        device, dtype, tol = SETUPS[backend]
        g = torch.Generator().manual_seed(1)
        B, M, N = 2, 10, 23
        q = torch.randn(B, M, 12, generator=g, dtype=torch.float64).to(device, dtype)
        kv = torch.randn(B, N, 12, generator=g, dtype=torch.float64).to(device, dtype)
        grad_q = torch.randn(B, M, 12, generator=g, dtype=torch.float64).to(device, dtype)
        for variant in ("speechbrain", "idiap"):
            torch.manual_seed(0)
            layer = FusedHyperMixing(12, 24, num_heads=2, variant=variant, backend=backend).to(device, dtype)

            def run(x, k=None, **kw):
                x = x.clone().requires_grad_(True)
                out = layer(x, **kw) if k is None else layer(x, k, k, **kw)
                out = out[0] if isinstance(out, tuple) else out
                return out, x

            def check(local, xl, full_grads, lo, hi, grad, what):
                assert local.shape == (B, hi - lo, 12), (what, local.shape)
                params = list(layer.parameters())
                local_grads = list(torch.autograd.grad(local, [xl, *params], grad[:, lo:hi], allow_unused=True))
                if hi > lo:
                    assert_close(f"{what} out", local, full[:, lo:hi], tol)
                    assert_close(f"{what} input grad", local_grads[0], full_grads[0][:, lo:hi], tol)
                for i, (lg, fg) in enumerate(zip(local_grads[1:], full_grads[1:])):
                    lg = torch.zeros_like(fg) if lg is None else lg.clone()
                    dist.all_reduce(lg)
                    assert_close(f"{what} param grad {i}", lg, fg, tol)

            # an empty slice: rank 1 holds every token, rank 0 none (self-mixing)
            layer.sequence_parallel_group = None
            x = kv
            full, xf = run(x)
            full_grads = torch.autograd.grad(full, [xf, *layer.parameters()], torch.ones_like(full))
            layer.sequence_parallel_group = dist.group.WORLD
            lo, hi = (0, 0) if rank == 0 else (0, N)
            local, xl = run(x[:, lo:hi])
            check(local, xl, full_grads, lo, hi, torch.ones_like(full), f"{variant} empty slice")
            if variant == "speechbrain":
                continue
            # cross-mixing, M queries and N keys: the slices line up (rank 0 holds queries and keys
            # 0..5, rank 1 the rest of both): each rank gets its slice of the single-process result
            layer.sequence_parallel_group = None
            full, xf = run(q, kv)
            full_grads = torch.autograd.grad(full, [xf, *layer.parameters()], grad_q)
            layer.sequence_parallel_group = dist.group.WORLD
            (qlo, qhi), (klo, khi) = ((0, 6), (0, 6)) if rank == 0 else ((6, M), (6, N))
            local, xl = run(q[:, qlo:qhi], kv[:, klo:khi])
            check(local, xl, full_grads, qlo, qhi, grad_q, "cross-mixing")
            # slices that do not line up (queries 0..4 with keys 0..9): one offset cannot serve
            # both, which every rank says
            (qlo, qhi), (klo, khi) = ((0, 4), (0, 9)) if rank == 0 else ((4, M), (9, N))
            _raises_on_this_rank(lambda: run(q[:, qlo:qhi], kv[:, klo:khi]), RankMismatchError,
                                 "start at the same global position", "[0, 4]", "[0, 9]")
    finally:
        dist.destroy_process_group()
    exit_worker_now()


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda"])
def test_empty_slice_and_cross_mixing_slices(tmp_path, backend):
    """A rank with no tokens takes part (zero sums, as many as the backend's all-reduce: cuda's are
    padded to its head block) and every rank gets its slice of the single-process result, outputs
    and gradients; idiap cross-mixing (M = 10 queries, N = 23 keys) over the group is exact when
    the query and key slices start at the same global positions, and refused on every rank when
    they do not (the key slice's offset was applied to the queries). Tolerances: SETUPS."""
    _skip_unless_runs(backend)
    mp.spawn(_slices_worker, args=(2, str(tmp_path / "init"), backend), nprocs=2, join=True)


def test_modes_and_packed_sequences_refuse_a_group():
    """The README's "does not take a group": causal and chunk-causal mixing and packed sequences
    raise ValueError before any collective (checked here with a stand-in group object)."""
    group = object()
    layer = FusedHyperMixing(8, 8, num_heads=2)
    w = (*layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(), layer.layer_norm.weight, layer.layer_norm.bias)
    x = torch.randn(1, 5, 8)
    for mode in (dict(causal=True), dict(chunk_size=2)):
        with pytest.raises(ValueError, match="non-causal mixing only"):
            hmx_kernels.check_inputs(x, None, None, *w, sequence_parallel_group=group, **mode)
    from hmx_kernels.varlen import hyper_mixing_varlen

    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="does not take sequence_parallel_group"):
        hyper_mixing_varlen(x[0], cu, None, *w, sequence_parallel_group=group)
    layer.sequence_parallel_group = group
    with pytest.raises(ValueError, match="do not combine with position offsets or sequence parallelism"):
        layer(x[0], cu_seqlens=cu, max_seqlen=3)
