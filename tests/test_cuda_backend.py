"""The CUDA kernels ("cuda" backend): tests specific to it, on a GPU.

Skipped (with the reason) where torch has no CUDA device or the kernels cannot be built. The
generic comparison with the reference (every case in fp32 / fp16 / bf16) is in
tests/test_conformance.py; the tolerances and their reasons (including the emulation of the
tensor-core roundings that justifies the fp16 / bf16 ones) are declared with the backend in
hmx_kernels/cpp/backend.py. Here: bitwise determinism, the tensor-core (MMA) path against the FMA
path (the same tolerances: only the rounding of the MMA operands differs), and fp32 ignoring the
MMA switch.
"""
from __future__ import annotations

import pytest
import torch

from hmx_kernels import config
from hmx_kernels.cpp import build
from hmx_kernels.dispatch import get_backend
from utils import assert_close, forward_backward, make_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CUDA kernels are compile-checked only)")


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


def test_deterministic():
    case = make_case(variant="idiap", B=2, M=300, N=900, d=64, H=2, k_h=48, input_scale=0.3,
                     use_layer_norm=False).cast(torch.float32, "cuda")
    out1, g1 = forward_backward(case, "cuda")
    out2, g2 = forward_backward(case, "cuda")
    assert torch.equal(out1, out2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_mma_path_matches_fma_path(dtype, allow_mma):
    """fc2 on tensor cores (default on sm_80+) against the FMA path (HMX_KERNELS_CUDA_NO_MMA=1).

    On sm_80+ the two must differ somewhere (Hd is rounded to the input type only on the MMA path),
    which proves the MMA path ran; both must agree to the fp16/bf16 tolerances.
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
