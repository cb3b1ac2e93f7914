"""The CUDA kernels ("cuda" backend): tests specific to it, on a GPU.

Skipped (with the reason) where torch has no CUDA device or the kernels cannot be built. The
generic comparison with the reference (every case in fp32 / fp16 / bf16) is in
tests/test_conformance.py; the tolerances and their reasons (including the emulation of the
kernels' rounding points, tests/test_cuda_math.py) are declared with the backend in
hmx_kernels/cpp/{ops,cpu,cuda}.py. Here: bitwise determinism, every head block (d_h up to 128, k_h up to
512) and many token chunks against the reference, the tensor-core path against the FMA path
(tensor cores off: the fp32 kernels on upcast copies; the same tolerances), fp32 ignoring the
switch, and the shared-memory decline of fp32 kernels at d_h > 64 on GPUs with less than
CUDA_WIDE_FP32_SMEM_BYTES per block.
"""
from __future__ import annotations

import pytest
import torch

import hmx_kernels
from hmx_kernels import config
from hmx_kernels.cpp import build
from hmx_kernels.cpp.cuda import CUDA_WIDE_FP32_SMEM_BYTES
from hmx_kernels.dispatch import get_backend
from utils import assert_close, check_against_reference, forward_backward, fp16_range_case, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CUDA kernels are compile-checked only)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture
def allow_mma():
    """Set the tensor-core switch (hmx_kernels.config.set_allow_mma, what HMX_KERNELS_CUDA_NO_MMA
    sets at import), restored afterwards."""
    old = config.SETTINGS.allow_mma
    yield config.set_allow_mma
    config.set_allow_mma(old)


@pytest.fixture(scope="module", autouse=True)
def extension():
    why = build.cuda_build_possible()
    if why:
        pytest.skip("CUDA kernels cannot be built here: " + "; ".join(why))
    return build.load_extension(with_cuda=True)


@pytest.fixture(autouse=True)
def _poison(poisoned):
    """NaN poisoning on: an output or workspace element a kernel forgets to write fails."""
    yield


def _reasons(case, dtype):
    problem = hmx_kernels.check_inputs(**case.cast(dtype, "cuda").kwargs())
    return hmx_kernels.backend_reasons(problem)["cuda"]


def test_deterministic():
    """Bitwise equal results on one GPU (the token chunks depend on its SM count only)."""
    case = make_case(variant="idiap", B=2, M=300, N=900, d=64, H=2, k_h=48, input_scale=0.3,
                     use_layer_norm=False).cast(torch.float32, "cuda")
    out1, g1 = forward_backward(case, "cuda")
    out2, g2 = forward_backward(case, "cuda")
    assert torch.equal(out1, out2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("d_h,k_h", [(18, 72), (32, 128), (64, 256), (128, 512), (40, 100)],
                         ids=["18x72", "32x128", "64x256", "128x512", "40x100"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_head_blocks_match_reference(d_h, k_h, dtype):
    """Every head block (32, 64, 128; d_h padded up to it, k_h walked in row blocks), with masks
    and biases; fp32 at d_h > 64 runs where the GPU has the shared memory, else it is declined."""
    case = make_case(variant="idiap", B=2, M=130, N=211, d=2 * d_h, H=2, k_h=k_h, input_scale=0.3)
    reasons = _reasons(case, dtype)
    if dtype == torch.float32 and d_h > 64 and reasons:
        assert "shared memory" in " ".join(reasons)
        pytest.skip("declined on this GPU: " + "; ".join(reasons))
    assert not reasons, reasons
    check_against_reference(case, "cuda", "cuda", dtype, get_backend("cuda").tolerances[("cuda", dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_many_chunks_one_batch(dtype):
    """B = 1: the grid splits the tokens into about 2 SMs / H chunks whose partial states are
    summed in order; a padded tail crosses chunk boundaries."""
    case = make_case(variant="speechbrain", B=1, M=5000, d=64, H=2, k_h=64, masks=False)
    case.key_padding_mask = torch.zeros(1, 5000, dtype=torch.bool)
    case.key_padding_mask[0, 4321:] = True
    check_against_reference(case, "cuda", "cuda", dtype, get_backend("cuda").tolerances[("cuda", dtype)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_path_matches_fma_path(dtype, allow_mma):
    """Tensor cores (default on sm_80+) against the FMA path (HMX_KERNELS_CUDA_NO_MMA=1: the fp32
    kernels on fp32 copies, results cast back).

    On sm_80+ the two must differ somewhere (the tensor-core kernels round z, hid, dU and C / R to
    the input type), which proves the tensor-core kernels ran; both must agree to the fp16/bf16
    tolerances.
    """
    cfg = dict(variant="idiap", B=2, M=45, N=77, d=36, H=2, k_h=72, input_scale=0.3)
    allow_mma(True)
    out_mma, g_mma = forward_backward(make_case(**cfg).cast(dtype, "cuda"), "cuda")
    allow_mma(False)
    out_fma, g_fma = forward_backward(make_case(**cfg).cast(dtype, "cuda"), "cuda")
    tol = get_backend("cuda").tolerances[("cuda", dtype)]
    tol_out, tol_grad = tol.out, tol.grad
    assert_close("out", out_mma, out_fma, tol_out)
    for n in g_fma:
        assert_close(n, g_mma[n], g_fma[n], tol_grad)
    if torch.cuda.get_device_capability()[0] >= 8:
        same = torch.equal(out_mma, out_fma) and all(torch.equal(g_mma[n], g_fma[n]) for n in g_fma)
        assert not same, "MMA and FMA paths gave bitwise equal results: the MMA path did not run"


def test_fp32_ignores_mma_switch(allow_mma):
    """fp32 never takes the MMA path: bitwise equal with and without HMX_KERNELS_CUDA_NO_MMA=1."""
    cfg = dict(variant="speechbrain", B=2, M=50, d=36, H=2, k_h=72)
    allow_mma(True)
    out1, g1 = forward_backward(make_case(**cfg).cast(torch.float32, "cuda"), "cuda")
    allow_mma(False)
    out2, g2 = forward_backward(make_case(**cfg).cast(torch.float32, "cuda"), "cuda")
    assert torch.equal(out1, out2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_wide_fp32_decline_matches_the_device():
    """fp32 kernels at d_h > 64 are declined exactly where the GPU's opt-in shared memory per block
    is below CUDA_WIDE_FP32_SMEM_BYTES (A100: 163 KB), with that reason."""
    case = make_case(variant="idiap", B=1, M=20, N=20, d=256, H=2, k_h=16)
    props = torch.cuda.get_device_properties(0)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    reasons = _reasons(case, torch.float32)
    if optin is not None:
        assert bool(reasons) == (optin < CUDA_WIDE_FP32_SMEM_BYTES), (optin, reasons)
    assert not _reasons(case, torch.bfloat16)


@pytest.mark.parametrize("mma", [True, False], ids=["mma", "fma"])
def test_cuda_fp16_range_large_state_and_small_gradients(mma, allow_mma):
    """fp16 range on the GPU (the case tests/test_cuda_math.py emulates): a large state makes
    C = fc2_2^T GELU(P) and the pre-LayerNorm Y exceed 65504 and the LayerNorm scales dY below
    2^-14. The kernels stage C / R divided by a power of two, write Y and read dY in fp32 and scale
    every m dY tile by its power of two: output and every gradient finite and within the fp16
    tolerances. M 150 spans three query tiles; the upstream gradient of the rows from 64 on is 2^-4
    times smaller, so the tiles' powers of two differ (the accumulators' rescale)."""
    allow_mma(mma)
    dtype = torch.float16
    base, g = fp16_range_case(M=150)
    tol = get_backend("cuda").tolerances[("cuda", dtype)]
    out, grads = forward_backward(base.cast(dtype, "cuda"), "cuda", g.to("cuda"))
    ref_out, ref_grads = forward_backward(base.cast(dtype, "cuda"), "reference", g.to("cuda"))
    assert torch.isfinite(out).all()
    assert_close("out", out, ref_out, tol.out)
    for name, rg in ref_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        assert_close(f"grad {name}", grads[name], rg, tol.grad)


def _rel(a, e):
    a, e = a.double(), e.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


BLOCK_MODES = {"chunk64_all": dict(chunk_size=64), "chunk48_L2": dict(chunk_size=48, left_context_chunks=2),
               "chunk1_L3": dict(chunk_size=1, left_context_chunks=3)}


@pytest.mark.parametrize("mode", list(BLOCK_MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_chunked_mixing_matches_reference_and_is_deterministic(dtype, mode):
    """Chunk-causal mixing on the CUDA kernels (piece table, *_blocked kernels, block_window):
    against the reference in the declared tolerances (output and every gradient, masks, d_h 18,
    k_h 72, 700 tokens: blocks longer than a piece at B = 1), and bitwise equal over two runs."""
    kw = BLOCK_MODES[mode]
    case = make_case(variant="speechbrain", B=2, M=700, d=36, H=2, k_h=72, input_scale=0.3).cast(dtype, "cuda")
    run = lambda b: forward_backward(case, b, fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend=b, **kw))  # noqa: E731
    problem = hmx_kernels.check_inputs(**case.kwargs(), **kw)
    assert not hmx_kernels.backend_reasons(problem)["cuda"]
    out, grads = run("cuda")
    out2, grads2 = run("cuda")
    assert torch.equal(out, out2) and all(torch.equal(grads[n], grads2[n]) for n in grads if grads[n] is not None)
    ref_out, ref_grads = run("reference")
    tol = get_backend("cuda").tolerances[("cuda", dtype)]
    assert _rel(out, ref_out) <= tol.out
    for n, g in ref_grads.items():
        if g is not None:
            assert _rel(grads[n], g) <= tol.grad, n


@pytest.mark.parametrize("kw", [{}, dict(chunk_size=32, left_context_chunks=1)], ids=["noncausal", "chunk32_L1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_packed_sequences_match_reference(dtype, kw):
    """Packed sequences (one of them empty) on the CUDA kernels, PE rows from each sequence's
    start, against the reference (which mixes the sequences one by one)."""
    from hmx_kernels.varlen import cu_seqlens_from_lengths, hyper_mixing_varlen
    from utils import WEIGHT_NAMES

    lengths = [300, 0, 457, 1, 242]
    case = make_case(variant="speechbrain", B=1, M=sum(lengths), d=36, H=2, k_h=72, masks=False,
                     input_scale=0.3).cast(dtype, "cuda")
    cu = cu_seqlens_from_lengths(torch.tensor(lengths)).to("cuda")
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    tokens = case.tensors["query"][0]
    leaves = [tokens] + [t for t in w if t is not None]
    g = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3)).to(tokens)
    res = {}
    for b in ("cuda", "reference"):
        out = hyper_mixing_varlen(tokens, cu, max(lengths), *w, backend=b, **kw)
        res[b] = [out] + list(torch.autograd.grad(out, leaves, g))
    tol = get_backend("cuda").tolerances[("cuda", dtype)]
    assert _rel(res["cuda"][0], res["reference"][0]) <= tol.out
    for i, (a, e) in enumerate(zip(res["cuda"][1:], res["reference"][1:])):
        assert _rel(a, e) <= tol.grad, i


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_position_offset_matches_the_reference(variant, dtype):
    """A slice of a longer sequence (position_offset, what a sequence-parallel rank passes): the
    cuda backend takes it (the binding reads the slice's own positional-encoding rows) and matches
    the reference on the output and every gradient at its declared tolerances, with masks; the
    offset counts (without it the output differs). The group itself: tests/test_sequence_parallel.py."""
    case = make_case(variant=variant, B=2, M=11, N=11, d=36, H=2, k_h=72).cast(dtype, "cuda")
    p = hmx_kernels.check_inputs(**case.kwargs(), position_offset=37)
    assert not get_backend("cuda").not_supported_reasons(p)
    grad_out = torch.randn(2, 11, 36, generator=torch.Generator().manual_seed(4)).to("cuda", dtype)
    results = {}
    for backend in ("reference", "cuda"):
        results[backend] = forward_backward(case, backend, grad_out, fn=lambda **k: hmx_kernels.hyper_mixing(
            **k, backend=backend, position_offset=37))
    (out_c, g_c), (out_r, g_r) = results["cuda"], results["reference"]
    tol = get_backend("cuda").tolerances[("cuda", dtype)]
    assert_close("out", out_c, out_r, tol.out)
    for name in g_r:
        assert_close(name, g_c[name], g_r[name], tol.grad)
    assert not torch.allclose(out_c, hmx_kernels.hyper_mixing(**case.kwargs(), backend="cuda"), atol=1e-3)


def test_token_causal_is_declined_with_a_reason():
    case = make_case(variant="speechbrain", B=1, M=20, d=16, H=2, k_h=8).cast(torch.float32, "cuda")
    reasons = hmx_kernels.backend_reasons(hmx_kernels.check_inputs(**case.kwargs(), causal=True))["cuda"]
    assert any("token-causal" in r and "not implemented" in r for r in reasons), reasons


@pytest.mark.parametrize("kw", [dict(chunk_size=4), dict(chunk_size=3, left_context_chunks=2)],
                         ids=["chunk4_all", "chunk3_L2"])
def test_streaming_equals_one_pass(kw):
    """A carried state on the CUDA kernels (p_init, dp_extra, dp_init; cuda_stream_forward): a
    sequence streamed in whole-chunk pieces equals one pass, output and every gradient (fp32,
    d_h 18, k_h 72, padded tails)."""
    from hmx_kernels.streaming import hyper_mixing_stream
    from utils import WEIGHT_NAMES

    case = make_case(variant="speechbrain", B=2, M=41, d=36, H=2, k_h=72, input_scale=0.5).cast(torch.float32, "cuda")
    x = case.tensors["query"].detach().requires_grad_(True)
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    pad = case.key_padding_mask
    leaves = [x] + [t for t in w if t is not None]
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
    full = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=pad, backend="cuda", **kw)
    ref = torch.autograd.grad(full, leaves, g)
    C = kw["chunk_size"]
    outs, state, start = [], None, 0
    for n in (C, 2 * C, C, 3 * C, 41):
        n = min(n, 41 - start)
        if n <= 0:
            break
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, backend="cuda",
                                       key_padding_mask=pad[:, start:start + n], **(kw if state is None else {}))
        outs.append(y)
        start += n
    streamed = torch.cat(outs, dim=1)
    got = torch.autograd.grad(streamed, leaves, g)
    tol = get_backend("cuda").tolerances[("cuda", torch.float32)]
    assert _rel(streamed, full) <= tol.out
    for i, (a, e) in enumerate(zip(got, ref)):
        assert _rel(a, e) <= tol.grad, i
