"""The C++ CPU twin ("cpu" backend) against the reference: output and every gradient.

The extension is built once per machine (about a minute on 2 cores) and cached on disk; every test
here shares that build. Cases cover awkward sizes (d_h 18, k_h 72, N 1, prime N, N long enough to
split into many chunks of several tiles), masks, an all-padded batch element, both variants, tied
and untied generators, M != N, biases on/off, LayerNorm on/off and non-contiguous inputs.

Tolerances (scale-relative, see tests/utils.assert_close):
- float64: 1e-12. Both sides compute in float64; the twin computes the reassociated form
  (docs/HYPERMIXING.md), so the order of the operations differs, not only the summation order:
  measured <= 5e-15.
- float32: 1e-5 for the output, 5e-5 for gradients. Both compute in fp32 with different
  summation orders over up to 4500 tokens (the twin's token sums S, T and the weight gradients,
  the reference's P, dA; the gradients pass through two of them), and the twin's fp32 GELU uses a
  polynomial erf (absolute error <= 1.5e-7): measured <= 6.7e-7 (output) and 1.9e-6 (gradients),
  where against float64 the fp32 reference itself is off by up to 1.1e-6 and the twin by 1.8e-6
  (at B=1, N=8192, d=256, k=1024 the worst gradient, w1's fc2 bias, is off by 1.1e-5 in the
  twin and 6.0e-6 in the reference). An indexing or
  masking bug (errors of order 1) still fails by orders of magnitude.
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch

import hmx_kernels
from hmx_kernels.cpp import backend as cpp_backend
from hmx_kernels.cpp import build
from hmx_kernels.dispatch import BackendNotSupportedError, select_backend
from utils import assert_close, forward_backward, make_case

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 5e-5)}  # (output, gradients)


@pytest.fixture(scope="module", autouse=True)
def extension():
    try:
        return build.load_extension(with_cuda=False)
    except build.ExtensionBuildError as e:  # CI has a compiler: a failure here is a real failure
        pytest.fail(f"the CPU twin did not build: {e}")


def compare(case, dtype, noncontig=False):
    c = case.cast(dtype)
    if noncontig:
        c = make_noncontiguous(c)
    out, grads = forward_backward(c, "cpu")
    c_ref = case.cast(dtype)
    out_ref, grads_ref = forward_backward(c_ref, "reference")
    tol_out, tol_grad = TOL[dtype]
    assert_close("out", out, out_ref, tol_out)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_close(name, grads[name], grads_ref[name], tol_grad)
    return out, grads


def make_noncontiguous(case):
    """Same values, but token tensors and weights are strided views (transposed storage)."""
    tensors, seen = {}, {}
    for name, t in case.tensors.items():
        if t is None:
            tensors[name] = None
        elif id(t) in seen:
            tensors[name] = seen[id(t)]
        else:
            if t.dim() >= 2:
                # store with the last two dims swapped, then view back: same values, non-unit channel stride
                v = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
            else:
                v = t.detach().repeat_interleave(2)[::2]
            v.requires_grad_(True)
            assert v.dim() < 2 or not v.is_contiguous()
            seen[id(t)] = v
            tensors[name] = v
    return type(case)(tensors, case.variant, case.key_padding_mask, case.query_padding_mask,
                      case.use_layer_norm, case.tied, dict(case.extra))


CASES = {
    # name: make_case kwargs
    "sb_dh18_kh72_masks": dict(variant="speechbrain", B=3, M=37, d=36, H=2, k_h=72, masks=True,
                               all_padded_batch=True),
    "sb_tied": dict(variant="speechbrain", B=2, M=23, d=16, H=2, k_h=12, tied=True),
    "sb_N1": dict(variant="speechbrain", B=2, M=1, d=8, H=2, k_h=6, masks=False),
    # 4500 tokens: 18 tiles of 256 in 16 chunks, so some chunks accumulate over 2 tiles
    "sb_long_N": dict(variant="speechbrain", B=2, M=4500, d=16, H=2, k_h=8, masks=True),
    "idiap_cross_M_ne_N": dict(variant="idiap", B=3, M=11, N=53, d=36, H=2, k_h=72, bias=False,
                               input_scale=0.2, all_padded_batch=True),
    "idiap_bias_no_ln": dict(variant="idiap", B=2, M=29, N=17, d=16, H=4, k_h=10, bias=True,
                             use_layer_norm=False, input_scale=0.3),
    "idiap_tied_N1": dict(variant="idiap", B=2, M=5, N=1, d=12, H=3, k_h=5, tied=True, input_scale=0.3),
    "idiap_tied_self": dict(variant="idiap", B=2, M=19, N=19, d=18, H=1, k_h=72, tied=True, bias=False,
                            input_scale=0.2, masks=False),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    compare(make_case(**CASES[name], seed=zlib.crc32(name.encode()) % 1000), dtype)


PARTIAL_BIASES = {  # biases left out (None); every combination is a valid call
    "fc1_only": ("w1_fc2_bias", "w2_fc2_bias"),
    "fc2_only": ("w1_fc1_bias", "w2_fc1_bias"),
    "g1_full_g2_fc1_only": ("w2_fc2_bias",),
    "g1_fc2_only_g2_none": ("w1_fc1_bias", "w2_fc1_bias", "w2_fc2_bias"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("drop", list(PARTIAL_BIASES))
def test_partial_biases(drop, dtype):
    """The reassociated form has a term per bias (b2 sv^T, c0, r0, and their gradients)."""
    case = make_case(variant="idiap", B=3, M=29, N=41, d=36, H=2, k_h=72, bias=True, input_scale=0.3,
                     all_padded_batch=True, seed=zlib.crc32(drop.encode()) % 1000)
    for name in PARTIAL_BIASES[drop]:
        case.tensors[name] = None
    compare(case, dtype)


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_non_contiguous_inputs(variant):
    kw = dict(variant=variant, B=2, M=13, N=21, d=36, H=2, k_h=72, masks=True)
    if variant == "idiap":
        kw["input_scale"] = 0.2
    compare(make_case(**kw), torch.float32, noncontig=True)


def test_idiap_self_mixing_same_tensor():
    """idiap with key = value = query (one tensor used three times): gradients add up."""
    case = make_case(variant="idiap", B=2, M=17, N=17, d=16, H=2, k_h=8, input_scale=0.3)
    x = case.tensors["query"]
    case.tensors["key"] = case.tensors["value"] = x
    case.key_padding_mask = case.query_padding_mask
    compare(case, torch.float64)


def test_gradcheck_fp64():
    case = make_case(variant="idiap", B=2, M=4, N=5, d=6, H=2, k_h=4, bias=True, dtype=torch.float64,
                     input_scale=0.5)
    names = [n for n, t in case.tensors.items() if t is not None]
    leaves = [case.tensors[n] for n in names]

    def fn(*args):
        kw = case.kwargs()
        kw.update(dict(zip(names, args)))
        return hmx_kernels.hyper_mixing(**kw, backend="cpu")

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


DETERMINISM_CASES = {
    "B2_M300_N900": dict(variant="idiap", B=2, M=300, N=900, d=32, H=2, k_h=24, input_scale=0.3),
    # one batch element, 4 chunks, 4 heads: 1, 2 and 5 threads group the heads of a tile
    # differently (1, 2 and 4 groups) in both passes
    "B1_N1000_H4": dict(variant="idiap", B=1, M=1000, N=1000, d=32, H=4, k_h=24, input_scale=0.3),
}


@pytest.mark.parametrize("name", list(DETERMINISM_CASES))
def test_deterministic_across_thread_counts(name):
    # LayerNorm off: torch's LayerNorm backward splits its reduction by thread count; the twin's
    # own reductions (token sums, weight gradients) use a split that depends on the length only,
    # and each head's arithmetic does not depend on how the heads of a tile are grouped
    case = make_case(**DETERMINISM_CASES[name], use_layer_norm=False)
    n_threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, max(2, n_threads), 5):
            torch.set_num_threads(nt)
            results.append(forward_backward(case, "cpu"))
    finally:
        torch.set_num_threads(n_threads)
    out1, g1 = results[0]
    for out2, g2 in results[1:]:
        assert torch.equal(out1, out2)
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loop_fallback_without_blas(extension, dtype):
    """The tile products' plain-loop path (torch builds without an exported BLAS) against the reference."""
    extension._set_cpu_blas(False)
    try:
        compare(make_case(**CASES["sb_dh18_kh72_masks"], seed=7), dtype)
        compare(make_case(**CASES["idiap_cross_M_ne_N"], seed=8), dtype)
    finally:
        extension._set_cpu_blas(True)


def test_no_grad_forward_and_layer():
    case = make_case(variant="speechbrain", B=2, M=9, d=8, H=2, k_h=6)
    with torch.no_grad():
        out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="cpu")
        ref = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    assert_close("out", out, ref, 2e-5)
    layer = hmx_kernels.FusedHyperMixing(8, 12, num_heads=2, backend="cpu")
    x = torch.randn(2, 7, 8)
    res = layer(x, x, x)
    out = res[0] if isinstance(res, tuple) else res
    layer.backend = "reference"
    res_ref = layer(x, x, x)
    out_ref = res_ref[0] if isinstance(res_ref, tuple) else res_ref
    assert_close("layer out", out, out_ref, 2e-5)


def test_auto_picks_cpu_for_every_float_dtype():
    # float16/bfloat16 are computed in float32 by the cpu backend (as the reference does)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        case = make_case(variant="speechbrain", B=1, M=5, d=8, H=2, k_h=6, dtype=dtype)
        problem = hmx_kernels.check_inputs(**{k: v for k, v in case.kwargs().items()})
        assert select_backend("auto", problem).name == "cpu", dtype


def test_cuda_backend_rejects_cpu_tensors():
    case = make_case(variant="speechbrain", B=1, M=5, d=8, H=2, k_h=6)
    with pytest.raises(BackendNotSupportedError, match="runs on cuda tensors, got cpu"):
        hmx_kernels.hyper_mixing(**case.kwargs(), backend="cuda")


def test_build_failure_falls_back_to_reference(monkeypatch):
    def broken(with_cuda=None):
        raise build.ExtensionBuildError("cannot build the hmx_kernels C++ extension: no C++ compiler (test)")

    monkeypatch.setattr(build, "load_extension", broken)
    monkeypatch.setattr(cpp_backend, "_EXTENSIONS", {})
    monkeypatch.setattr(cpp_backend, "_REASONS", {})
    case = make_case(variant="speechbrain", B=1, M=5, d=8, H=2, k_h=6)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        problem = hmx_kernels.check_inputs(**case.kwargs())
        assert select_backend("auto", problem).name == "reference"
    assert any("no C++ compiler" in str(w.message) and "falls back" in str(w.message) for w in rec)
    with pytest.raises(BackendNotSupportedError, match=r"no C\+\+ compiler"):
        hmx_kernels.hyper_mixing(**case.kwargs(), backend="cpu")


def test_binding_checks_tensors(extension):
    B, M, d, H, d_h, k_h = 1, 4, 4, 2, 2, 3
    q = torch.randn(B, M, d)
    pe = torch.zeros(M, d)
    w = [torch.randn(H, d_h, d_h), None, torch.randn(H, k_h, d_h), None]
    y, p = extension.forward(q, q, q, pe, pe, None, None, *w, *w, 1.0)
    assert y.shape == (B, M, d) and p.shape == (B, H, k_h, d_h)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        extension.forward(q.half(), q.half(), q.half(), pe, pe, None, None, *w, *w, 1.0)
    with pytest.raises(RuntimeError, match="shape"):
        extension.forward(q, q, q, pe[:-1], pe, None, None, *w, *w, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        bad = [w[0].transpose(1, 2), None, w[2], None]
        extension.forward(q, q, q, pe, pe, None, None, *bad, *w, 1.0)
    with pytest.raises(RuntimeError, match="dtype"):
        extension.forward(q, q, q, pe.double(), pe, None, None, *w, *w, 1.0)
    with pytest.raises(RuntimeError, match="last dimension"):
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)
        extension.forward(qt, qt, qt, pe, pe, None, None, *w, *w, 1.0)


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_every_output_element_is_written(poisoned, variant):
    # poison on (HMX_KERNELS_POISON=1): the binding fills every output and workspace with NaN before the
    # kernels run, so an element left unwritten (e.g. a padded row's gradient) fails assert_close
    case = make_case(variant=variant, B=3, M=37, N=67, d=36, H=2, k_h=72, all_padded_batch=True,
                     input_scale=0.5)
    out, grads = compare(case, torch.float32)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())

