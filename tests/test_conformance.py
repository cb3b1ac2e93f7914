"""Conformance: every registered fast backend against the reference, on one set of cases.

Parametrised over `hmx_kernels.registered_backends()` (minus "reference", the ground truth) x
CASES x the (device type, dtype) pairs the backend declares in its `Backend.tolerances`. The
tolerances, and the written reason for each number (what both sides compute, what differs, what
was measured), live beside the backend's `register_backend(...)` call:
hmx_kernels/cpp/{ops,cpu,cuda}.py ("cpu", "cuda") and hmx_kernels/triton/backend.py ("triton").

For each (backend, device, dtype, case) the suite asserts, on the same rounded inputs and with
the same upstream gradient on both sides (tests/utils.check_against_reference):
- the output has the inputs' dtype and device, and every gradient its leaf's dtype;
- the backend returns a gradient for exactly the leaves the reference does;
- output and EVERY gradient (tokens, all hypernetwork tensors, LayerNorm) are within the declared
  scale-relative tolerance (max |diff| <= rtol * max |reference|), and finite;
- with NaN poisoning on (every buffer a fused backend allocates starts as NaN), so an element a
  kernel leaves unwritten fails.
The same holds for token tensors given as strided views (test_non_contiguous_inputs). A pair
whose device is not present here, or that the backend reports unsupported for the case
(`hmx_kernels.backend_reasons`, e.g. triton on CPU tensors without the interpreter, the C++
extension not built), is skipped with that reason. To keep the run short on CPU, per-case flags
in CASES leave out fp16 / bf16 for the long cases on CPU tensors and, under the (slow) Triton
interpreter, run fp16 / bf16 on a subset of cases and skip the long ones; on a GPU every case runs
in every declared dtype. test_declared_tolerances checks that every backend declares a tolerance
for each dtype it takes on each device it runs on, and only those.

Backend-specific tests (MMA vs FMA, BLAS loop fallback, gradcheck, determinism, several chunks,
PE on chip, allocation recorder, build and poison switches) stay in test_cpp_cpu.py,
test_triton.py and test_cuda_backend.py.
"""
from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

import hmx_kernels
from hmx_kernels.dispatch import get_backend
from utils import _tolerance_pair, assert_close, check_against_reference, forward_backward, make_case

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# name: make_case keyword arguments, plus these per-case flags:
#   partial_bias=True   drop both generators' fc2 biases (fc1 bias kept): a partial-bias generator
#   same_tensor=True    idiap with key = value = query, one tensor (and one mask) used three times
#   cpu_dtypes=(...)    the dtypes the case runs in on CPU tensors (any backend); default: all.
#                       The long cases leave out fp16 / bf16 there: the cpu backend computes those
#                       exactly as fp32 (upcast), and the reference is the slow side.
#   interpret=(...)     the dtypes the Triton interpreter (triton on CPU tensors, about 0.2-0.7 s
#                       per call) runs the case in; default: INTERPRET_DEFAULT, fp32 only. The fp16
#                       / bf16 loads and stores (upcast, rounding at the end) are exercised there by
#                       the cases marked HALF_TOO; the long cases take 7-10 s per dtype there and
#                       are left out (()). CUDA tensors (a GPU) run every case in every dtype.
INTERPRET_DEFAULT = (torch.float32,)
HALF_TOO = ALL_DTYPES
CPU_FULL_ONLY = (torch.float64, torch.float32)
CASES = {
    # speechbrain (self-mixing, one mask)
    "sb_dh18_kh72_masks_allpad": dict(variant="speechbrain", B=3, M=37, d=36, H=2, k_h=72,
                                      all_padded_batch=True),
    "sb_small": dict(variant="speechbrain", B=2, M=7, d=8, H=2, k_h=6),
    "sb_tied": dict(variant="speechbrain", B=2, M=23, d=16, H=2, k_h=12, tied=True),
    "sb_dh18_kh72_tied_allpad": dict(variant="speechbrain", B=2, M=5, d=36, H=2, k_h=72, tied=True,
                                     all_padded_batch=True, interpret=HALF_TOO),
    "sb_N1": dict(variant="speechbrain", B=2, M=1, d=8, H=2, k_h=6, masks=False),
    "sb_N1_kh72": dict(variant="speechbrain", B=1, M=1, d=36, H=2, k_h=72, masks=False, interpret=HALF_TOO),
    "sb_16_heads": dict(variant="speechbrain", B=1, M=5, d=32, H=16, k_h=3),
    "sb_partial_bias": dict(variant="speechbrain", B=2, M=9, d=12, H=2, k_h=8, partial_bias=True,
                            interpret=HALF_TOO),
    # 1031 tokens: several chunks per (b, h) everywhere
    "sb_tied_long": dict(variant="speechbrain", B=2, M=1031, d=32, H=2, k_h=16, tied=True,
                         cpu_dtypes=CPU_FULL_ONLY, interpret=()),
    # the benchmarks' head shape (d_h 32, k_h 128, 8 heads)
    "sb_bench_shape": dict(variant="speechbrain", B=2, M=300, d=256, H=8, k_h=128,
                           cpu_dtypes=CPU_FULL_ONLY, interpret=()),
    # 4500 tokens: beyond the public implementations' 3000; 18 C++ tiles of 256 in 16 chunks
    "sb_long_N": dict(variant="speechbrain", B=2, M=4500, d=16, H=2, k_h=8,
                      cpu_dtypes=CPU_FULL_ONLY, interpret=()),
    # idiap (M queries, N keys, optional biases and LayerNorm)
    "idiap_cross_M_ne_N_allpad": dict(variant="idiap", B=3, M=11, N=53, d=36, H=2, k_h=72, bias=False,
                                      input_scale=0.2, all_padded_batch=True),
    "idiap_cross_bias": dict(variant="idiap", B=3, M=11, N=53, d=36, H=2, k_h=72, input_scale=0.2),
    "idiap_cross_prime_N": dict(variant="idiap", B=2, M=5, N=13, d=8, H=2, k_h=6, bias=False,
                                input_scale=0.3, interpret=HALF_TOO),
    "idiap_bias_no_ln": dict(variant="idiap", B=2, M=29, N=17, d=16, H=4, k_h=10,
                             use_layer_norm=False, input_scale=0.3),
    "idiap_odd_d_no_ln_allpad": dict(variant="idiap", B=2, M=6, N=2, d=9, H=3, k_h=5,
                                     use_layer_norm=False, all_padded_batch=True, interpret=HALF_TOO),
    "idiap_N1_no_ln": dict(variant="idiap", B=2, M=5, N=1, d=16, H=2, k_h=8, use_layer_norm=False,
                           input_scale=0.3),
    "idiap_tied_N1": dict(variant="idiap", B=2, M=5, N=1, d=12, H=3, k_h=5, tied=True, input_scale=0.3),
    "idiap_tied_cross": dict(variant="idiap", B=3, M=4, N=4, d=8, H=4, k_h=3, tied=True, input_scale=0.3),
    "idiap_tied_self_1_head": dict(variant="idiap", B=2, M=19, N=19, d=18, H=1, k_h=72, tied=True,
                                   bias=False, input_scale=0.2, masks=False),
    "idiap_1_head_no_mask": dict(variant="idiap", B=1, M=3, N=11, d=18, H=1, k_h=72, masks=False,
                                 input_scale=0.3),
    "idiap_same_tensor_qkv": dict(variant="idiap", B=2, M=17, N=17, d=16, H=2, k_h=8, input_scale=0.3,
                                  same_tensor=True),
    "idiap_partial_bias_tied": dict(variant="idiap", B=2, M=7, N=10, d=12, H=3, k_h=6, tied=True,
                                    input_scale=0.3, partial_bias=True, interpret=HALF_TOO),
}

_FLAGS = ("partial_bias", "same_tensor", "cpu_dtypes", "interpret")


def build_case(name: str):
    kw = {k: v for k, v in CASES[name].items() if k not in _FLAGS}
    case = make_case(**kw, seed=zlib.crc32(name.encode()) % 1000)
    flags = CASES[name]
    if flags.get("partial_bias"):
        assert case.tensors["w1_fc2_bias"] is not None, "partial_bias needs a biased case"
        case.tensors["w1_fc2_bias"] = None
        case.tensors["w2_fc2_bias"] = None
    if flags.get("same_tensor"):
        x = case.tensors["query"]
        case.tensors["key"] = case.tensors["value"] = x
        case.key_padding_mask = case.query_padding_mask
    return case


def _device_present(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    return device == "cpu"


def _fast_backends():
    return [name for name in hmx_kernels.registered_backends() if name != "reference"]


def _pairs(dtypes=None):
    """(backend, device, dtype) for every declared tolerance, skipped where the device is absent."""
    out = []
    for name in _fast_backends():
        for device, dtype in get_backend(name).tolerances:
            if dtypes is not None and dtype not in dtypes:
                continue
            marks = () if _device_present(device) else pytest.mark.skip(reason=f"no {device} device here")
            out.append(pytest.param(name, device, dtype, marks=marks, id=f"{name}-{device}-{SHORT[dtype]}"))
    return out


def _skip_unsupported(case, backend: str, device: str, dtype: torch.dtype) -> None:
    problem = hmx_kernels.check_inputs(**case.cast(dtype, device).kwargs())
    reasons = hmx_kernels.backend_reasons(problem)[backend]
    if reasons:
        pytest.skip(f"{backend} cannot run this call here: " + "; ".join(reasons))


@pytest.fixture(autouse=True)
def _poison(poisoned):
    """NaN poisoning on for every test here (tests/conftest.py)."""
    yield


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend,device,dtype", _pairs())
def test_matches_reference(backend, device, dtype, name):
    flags = CASES[name]
    if device == "cpu" and dtype not in flags.get("cpu_dtypes", ALL_DTYPES):
        pytest.skip(f"{SHORT[dtype]} on CPU tensors left out for this long case (see CASES)")
    if backend == "triton" and device == "cpu" and dtype not in flags.get("interpret", INTERPRET_DEFAULT):
        pytest.skip(f"{SHORT[dtype]} left out under the Triton interpreter for this case (slow; see CASES)")
    case = build_case(name)
    _skip_unsupported(case, backend, device, dtype)
    check_against_reference(case, backend, device, dtype, get_backend(backend).tolerances[(device, dtype)])


@pytest.mark.parametrize("layout", ["channels", "rows"])
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
@pytest.mark.parametrize("backend,device,dtype", _pairs(dtypes=(torch.float32,)))
def test_non_contiguous_inputs(backend, device, dtype, variant, layout):
    """Tokens as strided views (every other channel of a batch-last tensor, or rows of a tensor
    twice as wide), weights as transposed views: same results as contiguous inputs."""
    case = make_case(variant=variant, B=2, M=6, N=7, d=12, H=2, k_h=10, seed=6,
                     input_scale=0.3 if variant == "idiap" else 1.0)
    _skip_unsupported(case, backend, device, dtype)
    check_against_reference(case, backend, device, dtype, get_backend(backend).tolerances[(device, dtype)],
                            layout=layout)


@pytest.mark.parametrize("backend", _fast_backends())
def test_declared_tolerances(backend):
    """Each (device, dtype) the backend takes has a tolerance with a reason, and it declares none
    for what it does not take."""
    b = get_backend(backend)
    caps = b.capabilities
    taken = caps.dtypes + caps.upcast_dtypes
    devices = [dv for dv in caps.devices if dv not in ("*", "meta")]
    expected = {(dv, dt) for dv in devices for dt in taken}
    assert set(b.tolerances) == expected, f"{backend}: tolerances for {set(b.tolerances) ^ expected} differ"
    for key, tol in b.tolerances.items():
        assert 0 < tol.out < 1 and 0 < tol.grad < 1 and len(tol.why) > 40, (backend, key, tol)


NONFINITE_CASES = ("sb_dh18_kh72_masks_allpad", "idiap_cross_bias")


def _poison_padding(case):
    """A copy of the case with NaN / +inf / -inf in every padded position of its token tensors."""
    bad = torch.tensor([float("nan"), float("inf"), float("-inf")])
    tensors, seen = dict(case.tensors), {}
    for name, pad in (("query", case.query_padding_mask if case.variant != "speechbrain" else case.key_padding_mask),
                      ("key", case.key_padding_mask), ("value", case.key_padding_mask)):
        t = tensors[name]
        if t is None or pad is None:
            continue
        if id(t) not in seen:
            fill = bad.repeat(t.numel() // 3 + 1)[:t.numel()].reshape(t.shape).to(t.dtype)
            seen[id(t)] = torch.where(pad.unsqueeze(-1), fill.to(t.device), t.detach()).requires_grad_(True)
        tensors[name] = seen[id(t)]
    return dataclasses.replace(case, tensors=tensors)


@pytest.mark.parametrize("name", NONFINITE_CASES)
@pytest.mark.parametrize("backend,device,dtype", _pairs())
def test_nonfinite_padding_matches_the_reference(backend, device, dtype, name):
    """NaN / inf in the padded positions: the backend's outputs at kept positions and its gradients
    w.r.t. kept tokens and every weight match the reference run with zeros there (declared
    tolerances); gradients at padded positions are zero, everything is finite. Every mode and
    backend, exactly against the backend itself, is tests/test_padding_nonfinite.py."""
    if backend == "triton" and device == "cpu" and dtype not in INTERPRET_DEFAULT:
        pytest.skip(f"{SHORT[dtype]} left out under the Triton interpreter (slow; see CASES)")
    case = build_case(name).cast(dtype, device)
    _skip_unsupported(case, backend, device, dtype)
    tol_out, tol_grad = _tolerance_pair(get_backend(backend).tolerances[(device, dtype)])
    poisoned = _poison_padding(case)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(case.tensors["query"].shape, generator=g).to(dtype=dtype, device=device)
    out, grads = forward_backward(poisoned, backend, grad_out)
    ref_out, ref_grads = forward_backward(case, "reference", grad_out)
    qpad = case.key_padding_mask if case.variant == "speechbrain" else case.query_padding_mask
    assert torch.isfinite(out).all()
    assert_close("out (kept positions)", out[~qpad], ref_out[~qpad], tol_out)
    pads = {"query": qpad, "key": case.key_padding_mask, "value": case.key_padding_mask}
    for leaf, ref_grad in ref_grads.items():
        grad = grads[leaf]
        if leaf in pads:
            assert torch.isfinite(grad).all() and not grad[pads[leaf]].any(), f"grad {leaf} at padded positions"
            assert_close(f"grad {leaf} (kept positions)", grad[~pads[leaf]], ref_grad[~pads[leaf]], tol_grad)
        else:
            assert_close(f"grad {leaf}", grad, ref_grad, tol_grad)
