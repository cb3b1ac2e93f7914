"""The Triton backend: tests specific to it.

The generic comparison with the reference (every case, fp32 / fp16 / bf16, CPU tensors under
TRITON_INTERPRET=1, set by conftest.py, and CUDA tensors on a GPU; non-contiguous inputs) is in
tests/test_conformance.py; the tolerances and their reasons are declared with the backend in
hmx_kernels/triton/backend.py. Here: several chunks and tiles per sequence (CHUNK_MIN lowered),
the positional encoding computed on chip, a long sequence, bitwise-deterministic backward, no
[N, k]-sized allocation, the layer, dispatch and refusals, the lazy triton import, compiling the
kernels for sm_90 without a GPU, and the poison switch. Every buffer the backend allocates is
poisoned with NaN here too, so an element a kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from hmx_kernels.dispatch import BackendNotSupportedError, get_backend
from hmx_kernels.positional import cached_positional_encoding
from utils import assert_close, check_against_reference, forward_backward, fp16_range_case, make_case

triton = pytest.importorskip("triton", reason="triton is not installed")
from hmx_kernels.triton import launch as tfn  # noqa: E402  (after TRITON_INTERPRET is set)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()

_skip_cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)")
_skip_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
FP32_ONLY = [
    pytest.param("cpu", torch.float32, marks=_skip_cpu, id="cpu-fp32"),
    pytest.param("cuda", torch.float32, marks=_skip_cuda, id="cuda-fp32"),
]
ANY_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_device = pytest.mark.skipif(not (HAS_CUDA or INTERPRET), reason="no CUDA device and no Triton interpreter")


@pytest.fixture(autouse=True)
def nan_poison():
    tfn.set_nan_poison(True)
    yield
    tfn.set_nan_poison(False)


def check(case, device, dtype, tol=None):
    """Triton against the reference (tests/utils.check_against_reference) with the backend's
    declared tolerance for (device, dtype) unless `tol` is given."""
    tol = tol if tol is not None else get_backend("triton").tolerances[(device, dtype)]
    return check_against_reference(case, "triton", device, dtype, tol)


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_several_chunks_and_tiles(variant, device, dtype, monkeypatch):
    """Chunks of 20 tokens, tiles of 16: partial sums over chunks, loops over tiles, ragged ends."""
    monkeypatch.setattr(tfn, "CHUNK_MIN", 20)
    case = make_case(variant=variant, B=2, M=37, N=53, d=12, H=2, k_h=10, seed=2,
                     input_scale=0.3 if variant == "idiap" else 1.0)
    check(case, device, dtype)


@needs_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_split_kernels_at_large_head_sizes(variant, dtype, monkeypatch):
    """The kernels the launcher runs from config.SPLIT_BLOCK_D on (d_h 128 on a GPU): S rows over
    two programs, T and sdy from hmx_bwd_kernel_tsum, S and sv of the backward from the state pass.
    The threshold is lowered so that d_h 18 (D 32) takes that path here; several chunks; fp16
    exercises the tsum pass's per-tile scaling of dY. Checked against the reference, and the split
    launches are recorded to show they ran."""
    from hmx_kernels.triton import autotune as tconfig

    monkeypatch.setattr(tconfig, "SPLIT_BLOCK_D", 32)
    monkeypatch.setattr(tfn, "CHUNK_MIN", 20)
    launched = []
    real_launch = tfn._launch

    def recording_launch(kernel, grid, *args, **kwargs):
        launched.append((kernel.fn.__name__, grid, kwargs.get("ROW_SPLIT"), kwargs.get("ACC_T"), kwargs.get("ACC_S")))
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(tfn, "_launch", recording_launch)
    case = make_case(variant=variant, B=2, M=37, N=45, d=36, H=2, k_h=20, seed=11,
                     input_scale=0.3 if variant == "idiap" else 1.0)
    device = ANY_DEVICE
    check(case, device, dtype)
    names = [x[0] for x in launched]
    assert names.count("hmx_bwd_kernel_tsum") == 1 and names.count("hmx_fwd_kernel_state") == 2, names
    assert all(x[2] == 2 and x[1][0] == 2 * 2 * 2 for x in launched if x[0] in ("hmx_fwd_kernel_state",
                                                                               "hmx_bwd_kernel_tsum")), launched
    assert [x[3] for x in launched if x[0] == "hmx_bwd_kernel_query"] == [False]
    assert [x[4] for x in launched if x[0] == "hmx_bwd_kernel_key"] == [False]


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
def test_positional_encoding_on_chip(device, dtype, monkeypatch):
    """speechbrain's sinusoid computed in the kernels from position x frequency."""
    monkeypatch.setattr(tfn, "PE_ON_CHIP", True)
    check(make_case(variant="speechbrain", B=2, M=9, d=12, H=3, k_h=5, seed=4), device, dtype)


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
def test_long_sequence(device, dtype):
    """N = 3001 (beyond the public implementations' 3000-row PE table), 24 chunks, tiny widths.
    The state P sums 3001 tokens: fp32 sums in a different order, hence 1e-4."""
    case = make_case(variant="speechbrain", B=1, M=3001, d=4, H=1, k_h=4, seed=5, input_scale=0.5)
    check(case, device, dtype, tol=1e-4)


@needs_device
def test_backward_is_deterministic():
    """Two backward passes give bitwise equal gradients (partials summed in a fixed order)."""
    case = make_case(variant="idiap", B=2, M=21, N=45, d=12, H=2, k_h=10, seed=8, input_scale=0.3)
    case = case.cast(torch.float32, ANY_DEVICE)
    old = tfn.CHUNK_MIN
    tfn.CHUNK_MIN = 16  # several chunks per (b, h)
    try:
        out1, g1 = forward_backward(case, "triton")
        out2, g2 = forward_backward(case, "triton")
    finally:
        tfn.CHUNK_MIN = old
    assert torch.equal(out1, out2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


class _RecordAllocations(TorchDispatchMode):
    """Sizes of the tensors that torch ops create. In-place and aliasing ops are left out (they
    create no memory; the interpreter's host copies of whole storages are such ops)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.sizes.append((t.numel(), str(func)))
        return out


@pytest.mark.skipif(not INTERPRET, reason="records allocations of CPU tensors under the interpreter")
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_no_n_by_k_tensor_is_allocated(variant):
    """Nothing of N * k_h elements (one W1 or W2 of one (b, h)) or larger than the inputs is
    created by the forward or the backward: the hidden activations stay on chip, W1 / W2 are never
    formed (k_h appears only in the [B, H, k_h, d_h] finalize products), and the chunk partials
    are [B*H, n_chunks, d_h, d_h]."""
    B, N, d, H, k_h = 1, 200, 8, 2, 40  # two chunks per (b, h)
    case = make_case(variant=variant, B=B, M=N, N=N, d=d, H=H, k_h=k_h, seed=9)
    leaves = case.leaves()
    cached_positional_encoding(variant, N, d, "cpu")  # the process-wide PE table, outside the recording
    largest_input = max(t.numel() for t in leaves.values())
    g = torch.randn(B, N, d)
    with _RecordAllocations() as rec:
        out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="triton")
        torch.autograd.grad(out, list(leaves.values()), g)
    assert rec.sizes, "nothing recorded"
    biggest = max(rec.sizes)
    assert biggest[0] < N * k_h, f"an [N, k_h]-sized tensor was created: {biggest}"
    assert biggest[0] <= largest_input, f"a tensor larger than the inputs was created: {biggest}"


def test_fp32_matmul_precision_picks_the_dot_precision():
    """fp32 inputs follow torch.get_float32_matmul_precision() (highest: IEEE, high: 3xTF32,
    medium: TF32) except where every autotune candidate of that precision spills at the head size
    (config.SPILLING): then the fallback (IEEE's query pass at d_h 64 -> 3xTF32, the 3xTF32 state
    pass at d_h 64 -> IEEE); half inputs take half operands (bf16 held in fp32 under the
    interpreter)."""
    from hmx_kernels.triton.autotune import KERNEL_CANDIDATES, SPILLING, block_d, dot_precision, unfit_reason

    for d_h in (8, 18, 32, 64, 128):
        for mode, asked in (("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")):
            for kernel, candidates in KERNEL_CANDIDATES.items():
                operand, prec = dot_precision(torch.float32, d_h, mode, kernel)
                assert operand == "fp32"
                spills_all = set(candidates) <= SPILLING.get((kernel, block_d(d_h), asked), frozenset())
                if not set(candidates) - SPILLING.get((kernel, block_d(d_h), prec), frozenset()):
                    # every fallback spills too (under some triton versions): asked kept, and the
                    # backend declines the configuration on a GPU (config.unfit_reason)
                    assert prec == asked and unfit_reason(torch.float32, d_h, mode, None), (d_h, mode, kernel)
                    continue
                assert (prec == asked) != spills_all, (d_h, mode, kernel, prec)
    # triton 3.9's tables (the other versions' fallbacks: tests/test_kernel_resources.py)
    assert dot_precision(torch.float32, 18, "highest", "hmx_bwd_kernel_key", (3, 9)) == ("fp32", "ieee")
    assert dot_precision(torch.float32, 64, "highest", "hmx_bwd_kernel_query", (3, 9)) == ("fp32", "tf32x3")
    assert dot_precision(torch.float16, 64, "medium", "hmx_bwd_kernel_key")[0] == "half"
    expected = "bf16-as-fp32" if INTERPRET else "half"
    assert dot_precision(torch.bfloat16, 64, "highest", "hmx_fwd_kernel_mix")[0] == expected


@pytest.mark.parametrize("device,dtype", FP32_ONLY)
@pytest.mark.parametrize("mode", ["high", "medium"])
def test_fp32_matmul_precision_modes(mode, device, dtype, monkeypatch):
    """The kernels in 3xTF32 / TF32 mode against the reference in full fp32. On a GPU through
    torch.set_float32_matmul_precision, with the mode's tolerance (backend.FP32_MODE_TOLERANCES).
    On CPU tensors the interpreter computes every dot exactly, so the fp32 tolerance applies; there
    "medium" is given to the kernels alone (torch's CPU matmuls, which the launcher's per-(b, h)
    products follow, take bf16 in "medium")."""
    from hmx_kernels.triton.backend import FP32_MODE_TOLERANCES
    from hmx_kernels.triton.autotune import dot_precision

    case = make_case(variant="idiap", B=2, M=9, N=21, d=24, H=2, k_h=20, seed=11, input_scale=0.3).cast(dtype, device)
    ref_out, ref_grads = forward_backward(case, "reference")
    old = torch.get_float32_matmul_precision()
    if device == "cpu":
        tol = get_backend("triton").tolerances[(device, dtype)]
        monkeypatch.setattr(tfn, "_precision", lambda dt, d_h, kernel: dot_precision(dt, d_h, mode, kernel))
    else:
        tol = FP32_MODE_TOLERANCES[mode]
        torch.set_float32_matmul_precision(mode)
    try:
        out, grads = forward_backward(case, "triton")
    finally:
        torch.set_float32_matmul_precision(old)
    assert_close("out", out, ref_out, tol.out)
    for name, g in ref_grads.items():
        assert_close(f"grad {name}", grads[name], g, tol.grad)


@needs_device
def test_fp16_range_large_state_and_small_gradients():
    """fp16 dot operands stay in range: with large values and fc2 weights, C = fc2_2^T GELU(P)
    and the pre-LayerNorm output exceed fp16's 65504 (C is passed divided by a power of two), and
    the LayerNorm then scales the gradient of Y below fp16's normal range (each dY tile is divided
    by a power of two before it is rounded). Output and every gradient within the fp16 tolerance."""
    dtype = torch.float16
    base, g = fp16_range_case(M=9)
    tol = get_backend("triton").tolerances[(ANY_DEVICE, dtype)]
    out, grads = forward_backward(base.cast(dtype, ANY_DEVICE), "triton", g.to(ANY_DEVICE))
    ref_out, ref_grads = forward_backward(base.cast(dtype, ANY_DEVICE), "reference", g.to(ANY_DEVICE))
    assert_close("out", out, ref_out, tol.out)
    for name, rg in ref_grads.items():
        assert_close(f"grad {name}", grads[name], rg, tol.grad)


@needs_device
def test_layer_uses_triton_backend():
    torch.manual_seed(0)
    layer = FusedHyperMixing(36, 144, num_heads=2, backend="triton").to(ANY_DEVICE)
    ref = FusedHyperMixing(36, 144, num_heads=2, backend="reference").to(ANY_DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 9, 36, device=ANY_DEVICE, requires_grad=True)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=ANY_DEVICE)
    mask[1, 6:] = True
    out, _ = layer(x, x, x, key_padding_mask=mask)
    ref_out, _ = ref(x, x, x, key_padding_mask=mask)
    assert_close("layer out", out, ref_out, 1e-4)
    r = torch.randn(out.shape, device=ANY_DEVICE)  # not out.square(): LayerNorm makes that ~constant
    (gx,) = torch.autograd.grad((out * r).sum(), x)
    (rgx,) = torch.autograd.grad((ref_out * r).sum(), x)
    assert_close("layer grad x", gx, rgx, 1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="auto picks triton only for CUDA tensors")
def test_auto_picks_triton_for_cuda():
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4).cast(torch.float16, "cuda")
    problem = hmx_kernels.check_inputs(**{k: v for k, v in case.kwargs().items()})
    assert hmx_kernels.select_backend("auto", problem).name == "triton"


def test_cpu_without_interpreter_is_refused_clearly(monkeypatch):
    from hmx_kernels import config
    from hmx_kernels.triton import backend as tb

    case = make_case(variant="speechbrain", B=1, M=3, d=8, H=2, k_h=4)
    monkeypatch.setattr(config.SETTINGS, "triton_interpret", False)  # as if TRITON_INTERPRET were unset
    monkeypatch.setattr(tb, "_AVAILABLE", {})
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1.*'cpu' or 'reference'"):
        hmx_kernels.hyper_mixing(**case.kwargs(), backend="triton")
    problem = hmx_kernels.check_inputs(**case.kwargs())
    assert hmx_kernels.select_backend("auto", problem).name != "triton"


def test_unsupported_dtype_and_sizes_are_refused_clearly():
    case = make_case(variant="speechbrain", B=1, M=3, d=8, H=2, k_h=4, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match=r"(?s)triton.*not torch.float64.*reference: supported"):
        hmx_kernels.hyper_mixing(**case.kwargs(), backend="triton")
    case = make_case(variant="speechbrain", B=1, M=2, d=130, H=1, k_h=600, masks=False)
    problem = hmx_kernels.check_inputs(**case.kwargs())
    reasons = " ".join(hmx_kernels.backend_reasons(problem)["triton"])
    assert "d_h = d/H = 130" in reasons and "k_h = 600" in reasons


def test_shapes_that_cannot_fit_are_refused_with_a_reason():
    """No call fails inside the autotuner: fp32 at d_h > 64 on a GPU, and shapes whose every
    candidate of some kernel needs more shared memory than the device gives (here a 99 KB sm_89
    and the 163 KB sm_80), are refused before launch with a reason naming the kernel and sizes."""
    from types import SimpleNamespace

    from hmx_kernels.triton.backend import fit_reasons
    from hmx_kernels.triton.autotune import unfit_reason

    (why,) = fit_reasons(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, d_h=96))
    assert "d_h = 96 > 64" in why and "bfloat16" in why
    assert fit_reasons(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, d_h=128)) == []
    consumer, a100 = (101376, 89), (166912, 80)
    assert unfit_reason(torch.bfloat16, 64, "highest", *consumer) is None
    assert unfit_reason(torch.bfloat16, 128, "highest", *a100) is None
    why = unfit_reason(torch.bfloat16, 128, "highest", *consumer)
    assert "d_h = 128" in why and "this GPU gives 99 KB" in why, why
    # triton 3.9's tables (under 3.6 fp32 d_h 64 "highest" is declined for spills first)
    assert "needs about" in unfit_reason(torch.float32, 64, "highest", *consumer, version=(3, 9))


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, hmx_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


_COMPILE_CHECK = r'''
from tools.kernels import capture_launches, compile_launch

# the launches of a small forward + backward (d_h 12, k_h 20), one candidate each, for sm_90
for dtype, mode in (("bf16", "highest"), ("fp16", "highest"), ("fp32", "highest"), ("fp32", "medium")):
    for launch in capture_launches(12, 20, dtype, mode):
        res = compile_launch(launch, (16, 4, 2), 90)
        assert res["spill_bytes"] == 0, (launch.kernel, dtype, res)
        assert dtype == "fp32" and mode == "highest" or res["tensor_core_instructions"] > 0, (launch.kernel, dtype, res)
    # the per-(b, h) finalize kernels: their own config, fp32 IEEE dots in every dtype
    finalize = capture_launches(12, 20, dtype, mode, finalize=True)
    # the layer ops' fwd, bwd mid, bwd weights (with the LayerNorm gradients); the per-head ops' fwd,
    # bwd (from P), bwd mid, bwd weights
    assert len(finalize) == 7, finalize
    for launch in finalize:
        res = compile_launch(launch, (0, 4, 1), 90)
        assert res["spill_bytes"] == 0, (launch.kernel, dtype, res)
print("compiled")
'''


@pytest.mark.skipif(HAS_CUDA, reason="the CUDA tests run the kernels themselves")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Lower every kernel, as the launcher launches it at d_h 12, to a cubin for sm_90 (bf16,
    fp16, fp32 IEEE and TF32): catches what the interpreter does not check (layouts, dot shapes,
    types) on machines without a GPU. The full resource check is tests/test_kernel_resources.py."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + sys.path)
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], capture_output=True, text=True, env=env)
    if res.returncode != 0 and ("ptxas" in res.stderr and "not found" in res.stderr.lower()):
        pytest.skip("triton's ptxas is not available: " + res.stderr[-300:])
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


def test_poison_environment_switch():
    # HMX_KERNELS_POISON=1, read once at import by hmx_kernels.config (the switch the C++ binding
    # receives too), NaN-fills every buffer; nothing reads the environment on a call
    import subprocess
    import sys

    code = ("import torch; from hmx_kernels.triton import launch as f; "
            "print(bool(torch.isnan(f._empty((3, 5), torch.float32, 'cpu')).all()))")
    for flag, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "HMX_KERNELS_POISON": flag, "PYTHONPATH": os.pathsep.join(sys.path)}
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert res.returncode == 0 and res.stdout.strip().endswith(expected), res.stderr[-2000:]


@_skip_cpu
@pytest.mark.parametrize("variant,mode", [("speechbrain", {}), ("idiap", {}), ("speechbrain", dict(chunk_size=4))])
def test_position_offset_matches_the_reference(variant, mode):
    """A slice of a longer sequence (position_offset): the triton backend takes it (plain mixing
    through the mixing-block ops, which carry the offset into the positional encoding) and matches
    the reference on the output and every gradient, with masks; it is no longer refused."""
    case = make_case(variant=variant, B=2, M=11, N=11, d=12, H=2, k_h=10)
    p = hmx_kernels.check_inputs(**case.kwargs(), position_offset=37, **mode)
    assert not get_backend("triton").not_supported_reasons(p)
    grad_out = torch.randn(2, 11, 12, generator=torch.Generator().manual_seed(4))
    results = {}
    for backend in ("reference", "triton"):
        results[backend] = forward_backward(case, backend, grad_out, fn=lambda **k: hmx_kernels.hyper_mixing(
            **k, backend=backend, position_offset=37, **mode))
    (out_t, g_t), (out_r, g_r) = results["triton"], results["reference"]
    assert_close("out", out_t, out_r, 2e-5)
    for name in g_r:
        assert_close(name, g_t[name], g_r[name], 2e-5)
    # the offset counts: without it the output differs
    assert not torch.allclose(out_t, hmx_kernels.hyper_mixing(**case.kwargs(), backend="triton", **mode), atol=1e-4)
