"""The C++ CPU twin ("cpu" backend): tests specific to it.

The generic comparison with the reference (every case, every dtype, non-contiguous inputs) is in
tests/test_conformance.py; the tolerances and their reasons are declared with the backend in
hmx_kernels/cpp/{ops,cpu,cuda}.py. Here: the extension builds (once per machine, about a minute on 2
cores, cached on disk; every test shares that build), gradcheck in float64, bitwise determinism
across thread counts, the BLAS-free loop fallback, no-grad and layer use, dispatch, the fallback
to the reference when the build fails, the binding's own argument checks, and that every output
element is written (NaN poisoning).
"""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch

import hmx_kernels
from hmx_kernels.cpp import ops as cpp_backend
from hmx_kernels.cpp import build
from hmx_kernels.dispatch import BackendNotSupportedError, get_backend, select_backend
from utils import assert_close, check_against_reference, forward_backward, make_case


def tolerance(dtype):
    return get_backend("cpu").tolerances[("cpu", dtype)]


def compare(case, dtype):
    return check_against_reference(case, "cpu", "cpu", dtype, tolerance(dtype))


@pytest.fixture(scope="module", autouse=True)
def extension():
    try:
        return build.load_extension(with_cuda=False)
    except build.ExtensionBuildError as e:  # CI has a compiler: a failure here is a real failure
        pytest.fail(f"the CPU twin did not build: {e}")


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
    check_against_reference(case, "cpu", "cpu", dtype, tolerance(dtype))


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
        compare(make_case(variant="speechbrain", B=3, M=37, d=36, H=2, k_h=72, all_padded_batch=True,
                          seed=7), dtype)
        compare(make_case(variant="idiap", B=3, M=11, N=53, d=36, H=2, k_h=72, bias=False, input_scale=0.2,
                          all_padded_batch=True, seed=8), dtype)
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



def test_clear_caches_releases_the_pooled_buffers(extension):
    """The twin keeps its working buffers between calls (hmx_cpu.cpp BufferPool): a chunk-causal
    call leaves the calling thread's pool holding memory, `hmx_kernels.clear_caches()` gives it
    back (the pool then holds nothing), and a later call computes the same values from fresh
    buffers."""
    case = make_case(variant="speechbrain", B=1, M=300, d=32, H=2, k_h=24, seed=5)
    x = case.tensors["query"].detach()
    w = [None if case.tensors[k] is None else case.tensors[k].detach() for k in (
        "w1_fc1_weight", "w1_fc1_bias", "w1_fc2_weight", "w1_fc2_bias", "w2_fc1_weight", "w2_fc1_bias",
        "w2_fc2_weight", "w2_fc2_bias", "ln_weight", "ln_bias")]
    first = hmx_kernels.hyper_mixing(x, None, None, *w, backend="cpu", chunk_size=4)
    assert extension.pooled_bytes() > 0
    hmx_kernels.clear_caches()
    assert extension.pooled_bytes() == 0
    again = hmx_kernels.hyper_mixing(x, None, None, *w, backend="cpu", chunk_size=4)
    assert torch.equal(first, again)
