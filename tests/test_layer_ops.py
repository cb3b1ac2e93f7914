"""The Triton layer ops (hmx_kernels::triton_layer_fwd / _bwd): plain mixing with the LayerNorm and
the output / gradient dtypes inside the kernels (hmx_kernels/triton/layer_norm_fused.py), and one
token gradient for self-mixing summed by the key pass.

They are checked against the unfused Triton path (the per-head ops plus torch's LayerNorm and
autograd's sums: the same kernels' arithmetic, so fp32 agrees to reordering) and against the
reference in the half dtypes (the declared tolerances), on outputs and every gradient with the
same upstream gradient, at awkward sizes (d_h 18 padded to 32, k_h 72, prime N, masks, a fully
padded row). CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""
from __future__ import annotations

import os

import pytest
import torch

import hmx_kernels
from hmx_kernels.dispatch import get_backend

from utils import assert_close, forward_backward, make_case

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                reason="runs the Triton kernels on CPU tensors under the interpreter")

from hmx_kernels.triton import launch  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture
def launched(monkeypatch):
    """The names of the Triton kernels launched, in order."""
    names = []
    real = launch._launch

    def spy(kernel, grid, *args, **kwargs):
        fn = kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        names.append(fn.__name__)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch, "_launch", spy)
    return names


def _unfused(monkeypatch, case, grad_out):
    """The same call through the per-head ops and torch's epilogue (the layer ops switched off)."""
    with monkeypatch.context() as m:
        m.setattr(launch.TRITON_OPS, "layer", None)
        return forward_backward(case, "triton", grad_out)


CALLS = {  # name: make_case arguments
    "speechbrain-self": dict(variant="speechbrain", M=13),
    "speechbrain-tied-nobias": dict(variant="speechbrain", M=11, tied=True, bias=False),
    "idiap-cross": dict(variant="idiap", M=7, N=11),
    "speechbrain-no-layer-norm": dict(variant="speechbrain", M=13, use_layer_norm=False),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_layer_ops_equal_the_unfused_path(call, monkeypatch, launched):
    """fp32: outputs and every gradient (tokens, both generators, LayerNorm weight and bias) agree
    with the unfused path to fp32 reordering, with masks and a fully padded row; the fused kernels
    ran (mix_ln / query_ln with the LayerNorm, the key pass's one token gradient for self-mixing)."""
    case = make_case(B=3, d=54, H=3, k_h=72, all_padded_batch=True, **CALLS[call])  # d_h 18, k_h 72
    grad_out = torch.randn(3, case.tensors["query"].shape[1], 54, generator=torch.Generator().manual_seed(5))
    out, grads = forward_backward(case, "triton", grad_out)
    fused_names = list(launched)
    launched.clear()
    out_ref, grads_ref = _unfused(monkeypatch, case, grad_out)
    assert ("hmx_fwd_kernel_mix_ln" in fused_names) == case.use_layer_norm, fused_names
    assert ("hmx_bwd_kernel_query_ln" in fused_names) == case.use_layer_norm, fused_names
    assert "hmx_fwd_kernel_mix_ln" not in launched  # the unfused run
    assert_close("out", out, out_ref, 2e-6)
    assert set(grads) == set(grads_ref)
    for name in grads_ref:
        assert_close(name, grads[name], grads_ref[name], 2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_layer_ops_in_half_dtypes_match_the_reference(dtype):
    """fp16 / bf16 tokens and parameters: the output and every gradient come back in the inputs'
    dtype and match the fp64 reference within the backend's declared tolerances (the LayerNorm
    statistics and dY are fp32 on chip; d(out) is read in the dtype)."""
    case = make_case(B=2, M=17, d=36, H=2, k_h=72, dtype=torch.float64, seed=3)
    out_ref, grads_ref = forward_backward(case, "reference")
    half = case.cast(dtype)
    grad_out = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    out_ref, grads_ref = forward_backward(case, "reference", grad_out)
    out, grads = forward_backward(half, "triton", grad_out.to(dtype))
    tol = get_backend("triton").tolerances[("cpu", dtype)]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads.values())
    assert_close("out", out, out_ref, tol.out)
    for name in grads_ref:
        assert_close(name, grads[name], grads_ref[name], tol.grad)


def test_layer_ops_under_autocast_return_each_gradient_in_its_parameter_dtype():
    """Under torch.autocast the tokens and generator weights run in bf16 while the LayerNorm
    parameters stay fp32: the one fp32 gradient buffer is cast for the generators only, and the
    LayerNorm gradients equal those of an fp32 LayerNorm on the same bf16 mixing (the unfused path)."""
    layer = hmx_kernels.FusedHyperMixing(36, 72, num_heads=2, backend="triton")
    x = torch.randn(2, 9, 36, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.layer_norm.weight.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_layer_ops_are_deterministic():
    """Two runs give bitwise equal outputs and gradients (fixed-order partial sums, no atomics)."""
    case = make_case(B=2, M=19, d=36, H=2, k_h=72)
    out1, g1 = forward_backward(case, "triton")
    out2, g2 = forward_backward(case, "triton")
    assert torch.equal(out1, out2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_layer_ops_refuse_bad_layer_norm_arguments():
    """The public ops name the bad argument."""
    case = make_case(B=1, M=5, d=8, H=2, k_h=6)
    t = case.tensors
    gen = [t[f"{g}_{p}"] for g in ("w1", "w2") for p in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    q = t["query"].detach()
    gen = [w.detach() for w in gen]
    ops = launch.TRITON_OPS.layer
    lw, lb = t["ln_weight"].detach(), t["ln_bias"].detach()
    with pytest.raises(ValueError, match="ln_weight must have shape"):
        ops.fwd(q, q, q, None, None, *gen, lw[:4], lb, "speechbrain")
    with pytest.raises(ValueError, match="both ln_weight and ln_bias"):
        ops.fwd(q, q, q, None, None, *gen, lw, None, "speechbrain")
    with pytest.raises(TypeError, match="ln_bias must have the tokens' dtype"):
        ops.fwd(q, q, q, None, None, *gen, lw, lb.double(), "speechbrain")
    out, state, stats, saved = ops.fwd(q, q, q, None, None, *gen, lw, lb, "speechbrain")
    assert stats.shape == (1, 5, 2) and stats.dtype == torch.float32
    with pytest.raises(ValueError, match="one_tensor=True needs query, key and value to be one tensor"):
        ops.bwd(out, q, q.clone(), q, None, None, *gen, lw, lb, state, stats, saved, "speechbrain", 1e-5, True)
    with pytest.raises(TypeError, match="grad_out must have the output's dtype"):
        ops.bwd(out.double(), q, q, q, None, None, *gen, lw, lb, state, stats, saved, "speechbrain", 1e-5, True)
    with pytest.raises(ValueError, match="saved must be the forward's fp32"):
        ops.bwd(out, q, q, q, None, None, *gen, lw, lb, state, stats, saved[1:], "speechbrain", 1e-5, True)


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_opcheck_layer_ops(variant):
    """torch.library.opcheck: schema, fake implementations (the saved buffer's size), autograd
    registration. one_tensor=False: opcheck passes copies of the arguments, which are no longer
    one tensor (the one-tensor backward is what test_compiled_layer_equals_eager traces)."""
    case = make_case(variant=variant, B=2, M=5, N=7, d=12, H=2, k_h=10, input_scale=0.3)
    p = hmx_kernels.check_inputs(**case.kwargs())
    tensors = [p.query, p.key, p.value, p.query_keep, p.key_keep, *p.generator_weights(), p.ln_weight, p.ln_bias]
    args = [t.detach().requires_grad_(i not in (3, 4)) if t is not None else None for i, t in enumerate(tensors)]
    one = False
    ops = launch.TRITON_OPS.layer
    torch.library.opcheck(ops.fwd, (*args, p.variant.name, 1e-5, one))
    out, state, stats, kept = ops.fwd(*args, p.variant.name, 1e-5, one)
    torch.library.opcheck(ops.bwd, (torch.randn_like(out), *args, state, stats, kept, p.variant.name, 1e-5, one),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compiled_layer_equals_eager():
    """torch.compile (fullgraph, aot_eager: dynamo's capture and autograd tracing through the
    layer ops' fake implementations) gives the eager layer's output and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = hmx_kernels.FusedHyperMixing(36, 72, num_heads=2, backend="triton")
    x = torch.randn(2, 9, 36)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True

    def run(t, m):
        out = layer(t, key_padding_mask=m)
        return out[0] if isinstance(out, tuple) else out

    results = []
    for fn in (run, torch.compile(run, fullgraph=True, backend="aot_eager")):
        xi = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = fn(xi, mask)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), xi.grad, [q.grad.clone() for q in layer.parameters()]))
    (o1, g1, w1), (o2, g2, w2) = results
    assert_close("out", o2, o1, 1e-6)
    assert_close("x", g2, g1, 1e-5)
    for a, b in zip(w2, w1):
        assert_close("weight", a, b, 1e-5)
