"""Packed variable-length batches (hmx_kernels.varlen): every sequence of a packed batch gets
exactly what it gets alone (and what the padded batch gives its non-padded rows), on every backend
that runs here; the backends that take packed sequences (cpu, triton, reference) run them without
a padded copy, in every mixing mode, and the cpu and triton backends' gradients equal the
reference's; unpad/pad round-trip; bad cu_seqlens are refused. Tolerance: the same backend on the
same fp32 values through another layout: 1e-5 of the largest magnitude (the state's sums run over
a padded length, so BLAS blocks them differently: measured up to 1.1e-6; triton: the packed call
runs the mixing-block kernels, the per-sequence call the plain ones, sums in other orders);
float64 on a backend that takes it: 1e-12; cpu / triton vs reference: the backend's declared
tolerances (hmx_kernels/cpp/{ops,cpu,cuda}.py, hmx_kernels/triton/backend.py)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hmx_kernels.blocks import MixingBlocks

import hmx_kernels
import hmx_kernels.dispatch as dispatch
from hmx_kernels.blocks import ALL_KINDS, CHUNK_CAUSAL
from hmx_kernels.blocks import PACKED as PACKED_KIND
from hmx_kernels.dispatch import Backend, get_backend
from hmx_kernels.varlen import cu_seqlens_from_lengths, hyper_mixing_varlen, pad, unpad
from utils import WEIGHT_NAMES, assert_close, make_case

BACKENDS = [b for b in hmx_kernels.registered_backends()
            if not hmx_kernels.backend_reasons(hmx_kernels.check_inputs(
                **make_case(variant="speechbrain", B=1, M=2, d=8, H=2, k_h=4).kwargs()))[b]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_packed_sequences_are_independent(backend, variant):
    lengths = [5, 1, 13, 8]
    case = make_case(variant=variant, B=1, M=sum(lengths), N=sum(lengths), d=12, H=2, k_h=6,
                     input_scale=0.5, masks=False)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0]  # [total, d]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, variant=variant, backend=backend)
    assert out.shape == tokens.shape
    for i, n in enumerate(lengths):
        seq = tokens[cu[i]:cu[i + 1]][None]
        alone = hmx_kernels.hyper_mixing(seq, None if variant == "speechbrain" else seq,
                                         None if variant == "speechbrain" else seq, *w,
                                         variant=variant, backend=backend)[0]
        assert_close(f"sequence {i}", out[cu[i]:cu[i + 1]], alone, 1e-5)
    # and the gradient flows to the packed tokens and every parameter
    grads = torch.autograd.grad(out.square().sum(), [tokens] + [t for t in w if t is not None])
    assert all(torch.isfinite(g).all() for g in grads)


PACKED = [b for b in BACKENDS if get_backend(b).capabilities.varlen]
MODES = {"none": {}, "token": dict(causal=True), "chunk4_L1": dict(chunk_size=4, left_context_chunks=1)}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("backend", PACKED)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_packed_backends_never_pad_and_match_per_sequence(variant, backend, mode, monkeypatch):
    """The packed path runs (a padded copy would raise), and each sequence equals its own call,
    in every mode."""
    def no_padding(*a, **k):
        raise AssertionError("the packed path padded the batch")
    monkeypatch.setattr(dispatch, "_run_padded", no_padding)
    kw = MODES[mode]
    lengths = [9, 1, 14, 6]
    dtype = torch.float64 if torch.float64 in get_backend(backend).capabilities.dtypes else torch.float32
    case = make_case(variant=variant, B=1, M=sum(lengths), d=12, H=2, k_h=6, input_scale=0.5, masks=False,
                     dtype=dtype)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    out = hyper_mixing_varlen(tokens, cu, None, *w, variant=variant, backend=backend, **kw)
    for i in range(len(lengths)):
        seq = tokens[cu[i]:cu[i + 1]][None]
        other = None if variant == "speechbrain" else seq
        alone = hmx_kernels.hyper_mixing(seq, other, other, *w, variant=variant, backend=backend, **kw)[0]
        assert_close(f"sequence {i}", out[cu[i]:cu[i + 1]], alone, 1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.skipif("cpu" not in PACKED, reason="cpu backend unavailable")
@pytest.mark.parametrize("mode", list(MODES))
def test_cpu_packed_gradients_equal_the_reference(mode):
    """Long and short sequences across the 256-token tiles, d_h 18, k_h 72, float32."""
    kw = MODES[mode]
    lengths = [300, 1, 37, 257, 11]
    case = make_case(variant="speechbrain", B=1, M=sum(lengths), d=36, H=2, k_h=72, masks=False, seed=2)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    g = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    leaves = [tokens] + [t for t in w if t is not None]
    res = {}
    for backend in ("cpu", "reference"):
        out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, backend=backend, **kw)
        res[backend] = [out] + list(torch.autograd.grad(out, leaves, g))
    tol = get_backend("cpu").tolerances[("cpu", torch.float32)]
    assert_close("out", res["cpu"][0], res["reference"][0], tol.out)
    for i, (a, b) in enumerate(zip(res["cpu"][1:], res["reference"][1:])):
        assert_close(f"grad {i}", a, b, tol.grad)


@pytest.mark.skipif("triton" not in PACKED, reason="triton backend unavailable here (CPU tensors need TRITON_INTERPRET=1)")
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_packed_gradients_equal_the_reference(mode, monkeypatch):
    """Sequences of one to several pieces (plain chunks lowered to 15 tokens at 85 tokens), d_h 18,
    k_h 72, float32, idiap positions (from 1 in every sequence); every buffer the backend allocates
    is poisoned with NaN, so a token no program writes fails the comparison."""
    _triton_packed_vs_reference(mode, monkeypatch)


@pytest.mark.skipif("triton" not in PACKED, reason="triton backend unavailable here (CPU tensors need TRITON_INTERPRET=1)")
@pytest.mark.parametrize("mode", ["none", "chunk4_L1"])
def test_triton_packed_with_the_split_kernels(mode, monkeypatch):
    """The same through the kernels the launcher runs from config.SPLIT_BLOCK_D on (d_h 128 on a
    GPU; the threshold lowered to D 32 here): S and T rows over two programs per piece, T and sdy
    from hmx_bwd_kernel_tsum, the backward's per-block S and sv from the state pass."""
    from hmx_kernels.triton import autotune as tconfig
    from hmx_kernels.triton import launch as tfn

    monkeypatch.setattr(tconfig, "SPLIT_BLOCK_D", 32)
    launched = []
    real_launch = tfn._launch

    def recording_launch(kernel, grid, *args, **kwargs):
        launched.append((kernel.fn.__name__, kwargs.get("BLOCKED"), kwargs.get("ROW_SPLIT")))
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tfn, "_launch", recording_launch)
    _triton_packed_vs_reference(mode, monkeypatch)
    assert ("hmx_bwd_kernel_tsum", True, 2) in launched and ("hmx_fwd_kernel_state", True, 2) in launched, launched
    assert all(blocked for _, blocked, _ in launched), launched


def _triton_packed_vs_reference(mode, monkeypatch):
    from hmx_kernels.triton import launch as tfn

    monkeypatch.setattr(tfn, "CHUNK_MIN", 15)
    tfn.set_nan_poison(True)
    try:
        kw = MODES[mode]
        lengths = [45, 1, 23, 16]
        case = make_case(variant="idiap", B=1, M=sum(lengths), d=36, H=2, k_h=72, masks=False, seed=2)
        w = [case.tensors[k] for k in WEIGHT_NAMES]
        tokens = case.tensors["query"][0]
        cu = cu_seqlens_from_lengths(torch.tensor(lengths))
        g = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
        leaves = [tokens] + [t for t in w if t is not None]
        res = {}
        for backend in ("triton", "reference"):
            out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, variant="idiap", backend=backend, **kw)
            res[backend] = [out] + list(torch.autograd.grad(out, leaves, g))
    finally:
        tfn.set_nan_poison(False)
    tol = get_backend("triton").tolerances[("cpu", torch.float32)]
    assert_close("out", res["triton"][0], res["reference"][0], tol.out)
    for i, (a, b) in enumerate(zip(res["triton"][1:], res["reference"][1:])):
        assert_close(f"grad {i}", a, b, tol.grad)


def test_backends_without_packing_run_a_padded_batch():
    """A backend that takes no packed sequences is refused for the packed problem with a reason,
    and hyper_mixing_varlen still runs it (padded); the fused backends that declare packed
    sequences (triton, cuda) are not refused."""
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4)
    p = hmx_kernels.check_inputs(**case.kwargs())
    import dataclasses
    packed = dataclasses.replace(p, blocks=MixingBlocks(p.mode, torch.tensor([0, 1, 4])))
    if "cuda" in hmx_kernels.registered_backends():  # takes packed sequences (CUDA tensors only)
        assert get_backend("cuda").capabilities.varlen
        assert not any("packed sequences" in r for r in hmx_kernels.backend_reasons(packed)["cuda"])
    if "triton" in hmx_kernels.registered_backends():
        assert get_backend("triton").capabilities.varlen
        assert not any("packed sequences" in r for r in hmx_kernels.backend_reasons(packed)["triton"])
    assert not hmx_kernels.backend_reasons(packed)["reference"]


def _register_narrow_cpu(monkeypatch, name, without):
    """The cpu backend registered as `name` for the test only, declaring every block kind but
    `without`; returns the list of problems its forward is given."""
    cpu = get_backend("cpu")
    seen = []

    def forward(p):
        seen.append(p)
        return cpu.forward(p)

    caps = dataclasses.replace(cpu.capabilities, blocks=ALL_KINDS - set(without))
    monkeypatch.setitem(dispatch._REGISTRY, name, Backend(name, f"cpu without {sorted(without)}", forward, caps))
    return seen


@pytest.fixture
def unpacked_backend(monkeypatch):
    """A backend "cpu-nopack": the cpu backend declaring every block kind but `packed`, recording
    the problems it is given; registered for the test only, and first in the CPU auto order."""
    seen = _register_narrow_cpu(monkeypatch, "cpu-nopack", without={PACKED_KIND})
    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", ["cpu-nopack"] + dispatch.AUTO_ORDER["cpu"])
    return seen


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_the_dispatcher_pads_for_backends_without_packing(unpacked_backend, variant, mode):
    """A backend that declares no `packed` kind gets a padded batch (one row per sequence, empty
    sequences fully padded, a keep mask, the call's mode) from the dispatcher, by name and under
    auto, from hyper_mixing_varlen and the layer alike; outputs and every gradient (same upstream
    gradient) equal the packed run of the cpu backend in float64 (1e-12: the same twin on the same
    values, rows laid out differently)."""
    lengths = [9, 0, 14, 1, 6]
    cu = cu_seqlens_from_lengths(torch.tensor(lengths))
    case = make_case(variant=variant, B=1, M=sum(lengths), d=12, H=2, k_h=6, input_scale=0.5, masks=False,
                     dtype=torch.float64)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0].detach().requires_grad_()
    leaves = [tokens] + [t for t in w if t is not None]
    grad_out = torch.randn(tokens.shape, dtype=torch.float64)
    results = {}
    for backend in ("cpu", "cpu-nopack", "auto"):
        del unpacked_backend[:]
        out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, variant=variant, backend=backend, **MODES[mode])
        results[backend] = [out] + list(torch.autograd.grad(out, leaves, grad_out))
        if backend == "cpu":
            assert not unpacked_backend
        else:  # padded: [num_seqs, longest, d], a keep row per sequence, no cu_seqlens, the call's mode
            (p,) = unpacked_backend
            assert (p.B, p.M, p.N) == (len(lengths), max(lengths), max(lengths)) and p.cu_seqlens is None
            assert p.mode == hmx_kernels.check_inputs(**case.kwargs(), **MODES[mode]).mode
            assert p.key_keep.sum(1).tolist() == lengths
    for backend in ("cpu-nopack", "auto"):
        for i, (a, b) in enumerate(zip(results[backend], results["cpu"])):
            assert_close(f"{backend} {'out' if i == 0 else f'grad {i}'}", a, b, 1e-12)

    layer = hmx_kernels.FusedHyperMixing(12, 12, num_heads=2, variant=variant, backend="cpu-nopack").double()
    layer(tokens.detach(), cu_seqlens=cu, max_seqlen=max(lengths))
    assert layer.last_backend == "cpu-nopack" and unpacked_backend[-1].B == len(lengths)


def test_a_backend_without_packing_or_the_mode_is_refused_with_both_reasons(monkeypatch):
    _register_narrow_cpu(monkeypatch, "cpu-narrow", without={PACKED_KIND, CHUNK_CAUSAL})
    case = make_case(variant="speechbrain", B=1, M=6, d=8, H=2, k_h=4, masks=False)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(hmx_kernels.BackendNotSupportedError) as err:
        hyper_mixing_varlen(case.tensors["query"][0], cu, 4, *w, backend="cpu-narrow", chunk_size=2)
    assert "packed sequences" in str(err.value) and "chunk-causal" in str(err.value)


def test_unpad_pad_round_trip_and_padded_batch_rows():
    case = make_case(variant="speechbrain", B=3, M=9, d=8, H=2, k_h=4)  # tail-padded masks
    x, mask = case.tensors["query"], case.key_padding_mask
    packed, cu, max_len, idx = unpad(x, mask)
    assert cu.dtype == torch.int32 and int(cu[-1]) == packed.shape[0] == int((~mask).sum())
    back = pad(packed, idx, 3, 9)
    assert torch.equal(back[~mask], x[~mask]) and (back[mask] == 0).all()
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    padded_out = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=mask)
    packed_out = hyper_mixing_varlen(packed, cu, max_len, *w)
    assert_close("rows", packed_out, padded_out[~mask], 1e-5)


def test_bad_cu_seqlens():
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="end at the token count 10"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 9], dtype=torch.int32), None, *w)
    with pytest.raises(ValueError, match="never decrease"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 3, 10], dtype=torch.int32), None, *w)
    with pytest.raises(TypeError, match="int32"):
        hyper_mixing_varlen(x, torch.tensor([0.0, 10.0]), None, *w)
    with pytest.raises(ValueError, match="max_seqlen 3 is smaller"):
        hyper_mixing_varlen(x, torch.tensor([0, 4, 10], dtype=torch.int32), 3, *w)


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_layer_takes_packed_sequences(variant):
    """FusedHyperMixing(tokens, cu_seqlens=...) equals the padded batch's kept rows, in the
    layer's chunk-causal mode too."""
    torch.manual_seed(0)
    for kw in ({}, dict(chunk_size=3, left_context_chunks=1)):
        layer = hmx_kernels.FusedHyperMixing(16, 32, num_heads=2, variant=variant, **kw).double()
        lengths = torch.tensor([7, 2, 11])
        x = torch.randn(3, 11, 16, dtype=torch.float64)
        mask = torch.arange(11)[None, :] >= lengths[:, None]
        packed, cu, max_len, idx = unpad(x, mask)
        if variant == "speechbrain":
            out = layer(packed, cu_seqlens=cu, max_seqlen=max_len)[0]
            ref = layer(x, key_padding_mask=mask)[0]
        else:
            out = layer(packed, cu_seqlens=cu, max_seqlen=max_len)
            ref = layer(x, x, x, query_padding_mask=mask, key_padding_mask=mask)
        assert out.shape == packed.shape
        assert_close("packed rows", out, ref[~mask], 1e-12)
    with pytest.raises(ValueError, match="no attn_mask and no padding masks"):
        layer(packed, key_padding_mask=mask[:1], cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_unpad_output_with_fully_padded_rows_runs(backend, variant):
    """`unpad` of a batch with fully padded rows gives empty sequences (equal neighbours in
    cu_seqlens); hyper_mixing_varlen and the layer take them (they were refused): the other
    sequences' outputs and every gradient equal the padded batch's kept rows (1e-5, as above),
    and a batch with no kept token at all gives [0, d]."""
    torch.manual_seed(0)
    layer = hmx_kernels.FusedHyperMixing(12, 24, num_heads=2, variant=variant, backend=backend)
    x = torch.randn(4, 7, 12)
    grad = torch.randn(4, 7, 12)
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[0, :] = True  # fully padded rows: first, in the middle, and the last
    mask[2, :] = True
    mask[1, 5:] = True
    mask[3, :] = True
    packed, cu, max_len, idx = unpad(x, mask)
    assert cu.tolist() == [0, 0, 5, 5, 5] and max_len == 5
    params = list(layer.parameters())

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    xp = packed.clone().requires_grad_(True)
    out = first(layer(xp, cu_seqlens=cu, max_seqlen=max_len))
    got = torch.autograd.grad(out, [xp, *params], grad[~mask], allow_unused=True)
    row = x[1:2, :5].clone().requires_grad_(True)  # the one kept sequence, alone
    alone = first(layer(row))
    want = torch.autograd.grad(alone, [row, *params], grad[1:2, :5], allow_unused=True)
    assert_close("out", out, alone[0], 1e-5)
    assert_close("tokens grad", got[0], want[0][0], 1e-5)
    for (name, _), g, r in zip(layer.named_parameters(), got[1:], want[1:]):
        assert_close(name, g, r, 1e-5)

    nothing = torch.ones(2, 7, dtype=torch.bool)
    packed, cu, max_len, _ = unpad(x[:2], nothing)
    assert cu.tolist() == [0, 0, 0] and packed.shape == (0, 12)
    assert first(layer(packed, cu_seqlens=cu, max_seqlen=max_len)).shape == (0, 12)


def test_varlen_names_the_padding_mask_it_does_not_take():
    """A padding-mask tensor passed to hyper_mixing_varlen: a ValueError naming the argument (it
    was "Boolean value of Tensor with more than one value is ambiguous")."""
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    x = torch.randn(10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for name in ("key_padding_mask", "query_padding_mask"):
        with pytest.raises(ValueError, match=f"does not take {name}.*packed sequences have no padding"):
            hyper_mixing_varlen(x, cu, None, *w, **{name: torch.zeros(1, 10, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not take position_offset"):
        hyper_mixing_varlen(x, cu, None, *w, position_offset=torch.tensor(3))
    assert hyper_mixing_varlen(x, cu, None, *w, key_padding_mask=None, position_offset=0).shape == x.shape
