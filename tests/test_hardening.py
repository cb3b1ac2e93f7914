"""Inputs and situations that used to give silently wrong answers or unbounded memory.

- any memory layout of the tokens (stride 0, strides smaller than the row, overlapping rows,
  storage offsets, transposed and time-major views) gives the `.contiguous()` result on every
  backend: the cpu backend used to pass a row stride < d to BLAS as a leading dimension, which BLAS
  rejects without computing (output = LayerNorm bias, gradients = uninitialised memory);
- the positional-encoding cache is bounded per device and can be cleared;
- duplicated or malformed arguments are rejected.
"""
from __future__ import annotations

import pytest
import torch

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from hmx_kernels.positional import (
    cached_positional_encoding,
    positional_encoding,
    positional_encoding_cache,
)
from utils import assert_close, forward_backward, make_case

RUNNABLE = [b for b in hmx_kernels.registered_backends()
            if not hmx_kernels.backend_reasons(hmx_kernels.check_inputs(
                **make_case(variant="speechbrain", B=1, M=2, d=8, H=2, k_h=4).kwargs()))[b]]


def _layouts(t: torch.Tensor):
    """Views with the values of the [B, L, d] tensor t (or of its first row / batch element)."""
    B, L, d = t.shape
    x = t.detach()
    yield "contiguous", x.clone()
    yield "time-major", x.transpose(0, 1).contiguous().transpose(0, 1)  # [L, B, d] storage
    yield "channels-first", x.transpose(1, 2).contiguous().transpose(1, 2)  # [B, d, L] storage (conv front-end)
    big = torch.zeros(B * L * d + 7)
    off = big[7:].view(B, L, d)
    off.copy_(x)
    yield "storage-offset", off
    # one frame from a conv front-end after .transpose(1, 2): strides (C, 1, 1)
    one = x[:, :1].transpose(1, 2).contiguous().transpose(1, 2)
    yield "one-frame-transposed", one
    yield "expand-row", x[:, :1].expand(B, L, d)  # stride 0 over tokens
    yield "expand-batch", x[:1].expand(B, L, d)  # stride 0 over the batch
    # overlapping rows: unfold windows of a longer signal, row stride d/2 < d
    sig = torch.randn(B, (L + 1) * d // 2 + d, generator=torch.Generator().manual_seed(3))
    yield "overlapping-rows", sig.unfold(1, d, d // 2)[:, :L]


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_every_layout_gives_the_contiguous_result(backend, variant):
    case = make_case(variant=variant, B=2, M=6, N=6, d=8, H=2, k_h=6, input_scale=0.5)
    names = ["query"] if variant == "speechbrain" else ["query", "key", "value"]
    for layout, view in _layouts(case.tensors["query"]):
        c = case.cast(torch.float32)
        L = view.shape[1]
        if L != case.tensors["query"].shape[1]:
            c = make_case(variant=variant, B=2, M=L, N=L, d=8, H=2, k_h=6, input_scale=0.5, masks=False)
        for name in names:
            c.tensors[name] = view.detach().requires_grad_(True) if name == "query" else \
                view.detach().clone().requires_grad_(True)
        dense = c.cast(torch.float32)
        for name in names:  # same values in fresh, densely strided storage
            dense.tensors[name] = torch.empty(view.shape).copy_(view).requires_grad_(True)
        out, grads = forward_backward(c, backend)
        ref_out, ref_grads = forward_backward(dense, backend)
        assert_close(f"{layout} out", out, ref_out, 1e-6)
        for k in ref_grads:
            assert_close(f"{layout} grad {k}", grads[k], ref_grads[k], 1e-6)


def test_positional_encoding_cache_is_bounded_and_clearable():
    cache = positional_encoding_cache()
    try:
        cache.set_max_bytes(1 << 20)
        hmx_kernels.clear_caches()
        a = cached_positional_encoding("speechbrain", 100, 16, "cpu")
        assert torch.equal(a, positional_encoding("speechbrain", 100, 16))
        assert 0 < cache.bytes_used("cpu") <= 1 << 20
        # a table larger than the bound is computed for the call and not kept
        big = cached_positional_encoding("speechbrain", 100_000, 16, "cpu")
        assert torch.equal(big, positional_encoding("speechbrain", 100_000, 16))
        assert cache.bytes_used("cpu") <= 1 << 20
        for d in (16, 32, 64, 128):  # several tables: least recently used ones go
            cached_positional_encoding("idiap", 1500, d, "cpu")
            assert cache.bytes_used("cpu") <= 1 << 20
        hmx_kernels.clear_caches()
        assert cache.bytes_used() == 0
        cache.set_max_bytes(0)  # no caching at all
        assert torch.equal(cached_positional_encoding("idiap", 10, 8, "cpu"), positional_encoding("idiap", 10, 8))
        assert cache.bytes_used() == 0
    finally:
        cache.set_max_bytes(None)


def test_duplicated_and_malformed_arguments_are_rejected():
    x = torch.randn(2, 5, 8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    layer = FusedHyperMixing(8, 8, num_heads=2)
    with pytest.raises(TypeError, match="key_padding_mask.*both"):
        layer(x, x, x, None, pad, key_padding_mask=pad)
    idiap = FusedHyperMixing(8, 8, num_heads=2, variant="idiap")
    with pytest.raises(TypeError, match="query_padding_mask.*both"):
        idiap(x, x, x, pad, query_padding_mask=pad)
    for bad in (16.9, "16", True):
        with pytest.raises(TypeError, match="input_output_dim must be an int"):
            FusedHyperMixing(bad, 8)
    with pytest.raises(TypeError, match="hypernet_size must be an int"):
        FusedHyperMixing(8, 8.5)
    with pytest.raises(ValueError, match="unknown backend 'cpuu'"):
        FusedHyperMixing(8, 8, backend="cpuu")


def test_binding_refuses_rows_closer_than_d():
    from hmx_kernels.cpp.ops import extension

    ext = extension("cpu")
    B, L, d, H, d_h, k_h = 1, 4, 4, 2, 2, 3
    w = [torch.randn(H, d_h, d_h), None, torch.randn(H, k_h, d_h), None]
    pe = torch.zeros(L, d)
    overlapping = torch.randn(B, 64).unfold(1, d, 2)[:, :L]  # row stride 2 < d
    with pytest.raises(RuntimeError, match="rows must be at least d = 4 elements apart"):
        ext.forward(overlapping, overlapping, overlapping, pe, pe, None, None, *w, *w, 1.0)
    one = torch.randn(B, d, 1).transpose(1, 2)  # one row with stride 1: allowed, stride fixed to d
    y, _ = ext.forward(one, one, one, pe[:1], pe[:1], None, None, *w, *w, 1.0)
    y2, _ = ext.forward(one.contiguous().clone(), one.clone(), one.clone(), pe[:1], pe[:1], None, None, *w, *w, 1.0)
    assert torch.equal(y, y2)


def test_what_is_bitwise_reproducible_across_thread_counts():
    """The README's determinism statement: with the LayerNorm on, every gradient but the
    LayerNorm's own parameters is bitwise equal between 1 and 2 threads on the cpu backend."""
    case = make_case(variant="idiap", B=2, M=300, N=900, d=32, H=2, k_h=24, input_scale=0.3)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, g1 = forward_backward(case, "cpu")
        torch.set_num_threads(2)
        out2, g2 = forward_backward(case, "cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(out1, out2)
    for name in g1:
        if not name.startswith("ln_"):
            assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in RUNNABLE])
def test_ops_check_their_own_inputs(backend):
    """Calling an op directly with sizes larger than the tensors is an error, never an
    out-of-bounds read (it used to be garbage or a segfault for the Triton Function)."""
    from hmx_kernels.cpp.ops import CPP_OPS

    if backend == "cpu":
        ops = CPP_OPS
    else:
        from hmx_kernels.triton.launch import TRITON_OPS as ops
    H, d_h, k_h = 2, 4, 6
    q = torch.randn(2, 5, H * d_h)
    gen = [torch.randn(H, d_h, d_h), torch.randn(H, d_h), torch.randn(H, k_h, d_h), torch.randn(H, k_h)] * 2
    y, state = ops.fwd(q, q, q, None, None, *gen, "speechbrain")
    bad_cases = [
        ((q, q[:, :3], q, None, None, *gen), "key and value must be"),
        ((q, q, q, torch.ones(2, 9), None, *gen), r"query_keep must have shape \[2, 5\]"),
        ((q, q, q, None, torch.ones(2, 5, dtype=torch.float64), *gen), "key_keep must have dtype"),
        ((q, q, q, None, None, gen[0], gen[1], torch.randn(H, k_h + 5, d_h), *gen[3:]), "w1_fc2_bias must have shape"),
        ((q, q, q, None, None, torch.randn(H, 3, 3), *gen[1:]), "H \\* d_h"),
    ]
    for args, match in bad_cases:
        with pytest.raises((ValueError, TypeError), match=match):
            ops.fwd(*args, "speechbrain")
    with pytest.raises(ValueError, match="state must have shape"):
        ops.bwd(torch.randn_like(y), q, q, q, None, None, *gen, state[:, :, :3], "speechbrain")
    with pytest.raises(ValueError, match="grad_y must have shape"):
        ops.bwd(torch.randn(2, 4, H * d_h), q, q, q, None, None, *gen, state, "speechbrain")
