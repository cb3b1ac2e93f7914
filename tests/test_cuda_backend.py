"""The CUDA kernels ("cuda" backend) against the reference, on a GPU: output and every gradient.

Skipped (with the reason) where torch has no CUDA device or the kernels cannot be built.

Tolerances (scale-relative, tests/utils.assert_close):
- float32: 1e-4. The kernels use plain fp32 FMA (no TF32) and the reference runs with TF32 off
  (tests/conftest.py); only summation orders differ, over up to ~1000 tokens.
- float16 / bfloat16: 2e-2 / 5e-2 for the output, 5e-2 / 1e-1 for gradients. Inputs and outputs
  are rounded to 11 / 8 significant bits; both sides accumulate in fp32, but the reference rounds
  its intermediate W1/W2 differently and the LayerNorm backward amplifies rounding of Y. On sm_80+
  the tensor-core products (fp32 accumulation) also take their operands in fp16 / bf16: the
  generators' hidden activations GELU(U) (forward and backward recompute) and, in the forward,
  W1, W2 and A = GELU(P); each adds a relative error of at most 2^-11 / 2^-8 per element.
  Emulating exactly these roundings on the reference (CPU, the CASES below, bench_shape with
  M=128) gave errors of at most 0.12 (output) and 0.15 (gradients) of these tolerances, against
  0.12 / 0.09 for the rounding of Y alone, so the tolerances stay as they were for the FMA path.
- MMA vs FMA path (HMX_KERNELS_CUDA_NO_MMA=1): the same tolerances; only that rounding differs.
"""
from __future__ import annotations

import pytest
import torch

from hmx_kernels.cpp import build
from utils import assert_close, forward_backward, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CUDA kernels are compile-checked only)")

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 5e-2), torch.bfloat16: (5e-2, 1e-1)}

CASES = {
    "sb_dh18_kh72": dict(variant="speechbrain", B=3, M=37, d=36, H=2, k_h=72, all_padded_batch=True),
    "sb_tied_long": dict(variant="speechbrain", B=2, M=1031, d=32, H=2, k_h=16, tied=True),
    "idiap_cross": dict(variant="idiap", B=3, M=11, N=53, d=36, H=2, k_h=72, input_scale=0.2),
    "idiap_N1_no_ln": dict(variant="idiap", B=2, M=5, N=1, d=16, H=2, k_h=8, bias=True,
                           use_layer_norm=False, input_scale=0.3),
    "bench_shape": dict(variant="speechbrain", B=2, M=300, d=256, H=8, k_h=128),
}


@pytest.fixture(scope="module", autouse=True)
def extension():
    why = build.cuda_build_possible()
    if why:
        pytest.skip("CUDA kernels cannot be built here: " + "; ".join(why))
    return build.load_extension(with_cuda=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtype):
    case = make_case(**CASES[name]).cast(dtype, "cuda")
    out, grads = forward_backward(case, "cuda")
    out_ref, grads_ref = forward_backward(make_case(**CASES[name]).cast(dtype, "cuda"), "reference")
    tol_out, tol_grad = TOL[dtype]
    assert_close("out", out, out_ref, tol_out)
    for n in grads_ref:
        assert_close(n, grads[n], grads_ref[n], tol_grad)


def test_deterministic():
    case = make_case(variant="idiap", B=2, M=300, N=900, d=64, H=2, k_h=48, input_scale=0.3,
                     use_layer_norm=False).cast(torch.float32, "cuda")
    out1, g1 = forward_backward(case, "cuda")
    out2, g2 = forward_backward(case, "cuda")
    assert torch.equal(out1, out2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_path_matches_fma_path(dtype, monkeypatch):
    """fc2 on tensor cores (default on sm_80+) against the FMA path (HMX_KERNELS_CUDA_NO_MMA=1).

    On sm_80+ the two must differ somewhere (Hd is rounded to the input type only on the MMA path),
    which proves the MMA path ran; both must agree to the fp16/bf16 tolerances.
    """
    cfg = dict(variant="idiap", B=2, M=45, N=77, d=36, H=2, k_h=72, input_scale=0.3)
    monkeypatch.delenv("HMX_KERNELS_CUDA_NO_MMA", raising=False)
    out_mma, g_mma = forward_backward(make_case(**cfg).cast(dtype, "cuda"), "cuda")
    monkeypatch.setenv("HMX_KERNELS_CUDA_NO_MMA", "1")
    out_fma, g_fma = forward_backward(make_case(**cfg).cast(dtype, "cuda"), "cuda")
    tol_out, tol_grad = TOL[dtype]
    assert_close("out", out_mma, out_fma, tol_out)
    for n in g_fma:
        assert_close(n, g_mma[n], g_fma[n], tol_grad)
    if torch.cuda.get_device_capability()[0] >= 8:
        same = torch.equal(out_mma, out_fma) and all(torch.equal(g_mma[n], g_fma[n]) for n in g_fma)
        assert not same, "MMA and FMA paths gave bitwise equal results: the MMA path did not run"


def test_fp32_ignores_mma_switch(monkeypatch):
    """fp32 never takes the MMA path: bitwise equal with and without HMX_KERNELS_CUDA_NO_MMA=1."""
    cfg = dict(variant="speechbrain", B=2, M=50, d=36, H=2, k_h=72)
    monkeypatch.delenv("HMX_KERNELS_CUDA_NO_MMA", raising=False)
    out1, g1 = forward_backward(make_case(**cfg).cast(torch.float32, "cuda"), "cuda")
    monkeypatch.setenv("HMX_KERNELS_CUDA_NO_MMA", "1")
    out2, g2 = forward_backward(make_case(**cfg).cast(torch.float32, "cuda"), "cuda")
    assert torch.equal(out1, out2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
