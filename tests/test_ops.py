"""The op layer: torch.library ops, torch.compile, torch.export, autocast, the dtype rule, double
backward and the per-call path.

- opcheck of every fused op (schema, fake implementation, autograd registration, aliasing);
- torch.compile(fullgraph=True) of the layer, of the functional op and of a 2-layer speechbrain
  Conformer encoder whose HyperMixing layers were converted: no graph break (torch._dynamo.explain),
  three sequence lengths with at most one recompilation after the first (dynamic shapes), outputs
  and every gradient equal to eager within fp32 tolerance;
- torch.export of the layer, and the exported program runs;
- a meta-device forward gives the right shape;
- autocast bf16 on CPU runs the C++ backend and matches the reference within bf16 tolerance;
- regressions for the issues this layer fixed: dtype mixes raised from inside the binding or went
  silently to the reference, the wrong-width error blamed the weights, double backward gave None.
"""
from __future__ import annotations

import builtins
import os
import re
import threading

import pytest
import torch

import hmx_kernels
from hmx_kernels import FusedHyperMixing, config
from hmx_kernels.cpp import ops as cpp_backend
from hmx_kernels.dispatch import constant_result, select_backend
from hmx_kernels.ops import DOUBLE_BACKWARD_ERROR
from utils import WEIGHT_NAMES, assert_close, forward_backward, import_speechbrain, make_case

INTERPRET = config.SETTINGS.triton_interpret
HAS_CUDA = torch.cuda.is_available()
FUSED_CPU_BACKENDS = ["cpu"] + (["triton"] if INTERPRET else [])
_no_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (runs in .ci/gpu_run.sh)")
# (backend, device) of every fused op this machine can run: CPU in CI, CUDA on a GPU machine
FUSED_ON_DEVICES = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in FUSED_CPU_BACKENDS] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=_no_cuda) for b in ("cuda", "triton")]
# fp32 on both sides; compiled and eager run the same kernels (the graph adds only the LayerNorm,
# which Inductor may fuse and reorder): differences are fp32 rounding of a few ulp
COMPILE_RTOL = 1e-5


def _op_args(case, dtype=torch.float32, device="cpu"):
    """The fused ops' positional arguments for a case (the problem's resolved tensors)."""
    p = hmx_kernels.check_inputs(**case.cast(dtype, device).kwargs())
    return (p.query, p.key, p.value, p.query_keep, p.key_keep, *p.generator_weights(), p.variant.name), p


def _ops(backend):
    if backend in ("cpu", "cuda"):
        return cpp_backend.CPP_OPS
    from hmx_kernels.triton import launch

    return launch.TRITON_OPS


# ---- torch.library ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", FUSED_ON_DEVICES)
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_opcheck(backend, device, variant):
    case = make_case(variant=variant, B=2, M=5, N=7, d=12, H=2, k_h=10, input_scale=0.3)
    if variant == "idiap":  # a partial bias: fc1 bias without fc2 bias
        case.tensors["w1_fc2_bias"] = None
        case.tensors["w2_fc2_bias"] = None
    args, p = _op_args(case, device=device)
    ops = _ops(backend)
    # fresh leaves; the keep vectors (positions 3 and 4) take no gradient
    args = tuple(a.detach().requires_grad_(i not in (3, 4)) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))
    torch.library.opcheck(ops.fwd, args)
    y, state = ops.fwd(*args)
    grad_y = torch.randn_like(y)
    # the backward op's own autograd raises on purpose (no double backward), so the AOT check,
    # which differentiates the op, is left out for it
    torch.library.opcheck(ops.bwd, (grad_y, *args[:-1], state, args[-1]),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_constant_result_marker_is_torchs():
    def f():
        return 1

    def g():
        return 1

    torch.compiler.assume_constant_result(f)
    constant_result(g)
    marked = [k for k in vars(f) if k.startswith("_dynamo")]
    assert marked and all(getattr(g, k, None) == getattr(f, k) for k in marked)


def test_meta_device_forward_gives_shapes():
    layer = FusedHyperMixing(16, 32, num_heads=2).to("meta")
    out, attn = layer(torch.empty(3, 11, 16, device="meta"))
    assert out.shape == (3, 11, 16) and out.device.type == "meta" and attn is None
    idiap = FusedHyperMixing(16, 32, num_heads=2, variant="idiap").to("meta")
    q, kv = torch.empty(2, 5, 16, device="meta"), torch.empty(2, 9, 16, device="meta")
    assert idiap(q, kv, kv).shape == (2, 5, 16)


def test_per_call_path_takes_no_lock_reads_no_environment_and_opens_no_file(monkeypatch):
    case = make_case(variant="idiap", B=2, M=6, N=9, d=8, H=2, k_h=6, input_scale=0.3)
    for backend in FUSED_CPU_BACKENDS:  # warm up: build/load the extension, import triton
        forward_backward(case, backend)

    class Forbidden:
        def __getattr__(self, name):
            raise AssertionError(f"the per-call path used {name!r} of a forbidden object")

        def __enter__(self):
            raise AssertionError("the per-call path took a lock")

        __exit__ = None

    def no_open(*a, **k):
        raise AssertionError(f"the per-call path opened a file: {a[:1]}")

    class NoEnv(dict):
        def __getitem__(self, k):
            raise AssertionError(f"the per-call path read the environment: {k}")

        get = __getitem__

    from hmx_kernels.cpp import build

    monkeypatch.setattr(build, "_lock", Forbidden())
    monkeypatch.setattr(build, "load_extension", no_open)
    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(os, "environ", NoEnv(os.environ))
    monkeypatch.setattr(threading, "Lock", no_open)
    for backend in FUSED_CPU_BACKENDS:
        out, grads = forward_backward(case, backend)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())


# ---- torch.compile ----------------------------------------------------------------------------
def _compare_compiled(fn_eager, fn_compiled, make_inputs, params, lengths=(9, 13, 17)):
    """Run three lengths through the compiled function; compare outputs and every gradient."""
    for n in lengths:
        inputs = make_inputs(n)
        outs = []
        for fn in (fn_eager, fn_compiled):
            xs = [t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
                  for t in inputs]
            out = fn(*xs)
            out = out[0] if isinstance(out, tuple) else out
            leaves = [t for t in xs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
            g = torch.Generator().manual_seed(n)
            grad_out = torch.randn(out.shape, generator=g)
            outs.append((out.detach(), torch.autograd.grad(out, leaves, grad_out)))
        (oe, ge), (oc, gc) = outs
        assert_close(f"out N={n}", oc, oe, COMPILE_RTOL)
        for i, (a, b) in enumerate(zip(gc, ge)):
            assert_close(f"grad {i} N={n}", a, b, COMPILE_RTOL)


def _count_compiles(fn, *args):
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    fn(*args)
    return counters["stats"]["unique_graphs"] - before


def _layer_inputs(d):
    def make(n):
        g = torch.Generator().manual_seed(100 + n)
        x = torch.randn(2, n, d, generator=g)
        mask = torch.zeros(2, n, dtype=torch.bool)
        mask[1, n - 3:] = True
        return x, mask
    return make


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_compile_layer_fullgraph_no_break_dynamic_lengths(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = FusedHyperMixing(16, 32, num_heads=2, backend=backend)
    make = _layer_inputs(16)
    x, mask = make(9)
    explanation = torch._dynamo.explain(lambda x, m: layer(x, x, x, key_padding_mask=m)[0])(x, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    # aot_eager for triton: Inductor's CPU code generator does not run user Triton kernels on CPU
    # tensors (a GPU runs them through Inductor); the graph capture is the same
    compiled = torch.compile(lambda x, m: layer(x, x, x, key_padding_mask=m), fullgraph=True,
                             backend="inductor" if backend == "cpu" else "aot_eager")
    eager = lambda x, m: layer(x, x, x, key_padding_mask=m)  # noqa: E731
    new_graphs = [_count_compiles(compiled, *make(n)) for n in (9, 13, 17, 23)]
    assert new_graphs[0] == 1 and sum(new_graphs[1:]) <= 1, new_graphs  # <= 1 recompilation
    _compare_compiled(eager, compiled, make, list(layer.parameters()))


def test_compile_functional_op_fullgraph():
    torch._dynamo.reset()
    case = make_case(variant="idiap", B=2, M=7, N=11, d=12, H=3, k_h=8, input_scale=0.3)
    t = case.tensors
    weights = [t[k] for k in WEIGHT_NAMES]

    def fn(q, k, v):
        return hmx_kernels.hyper_mixing(q, k, v, *weights, variant="idiap", backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)

    def make(n):
        g = torch.Generator().manual_seed(n)
        return torch.randn(2, 7, 12, generator=g), torch.randn(2, n, 12, generator=g), torch.randn(2, n, 12, generator=g)

    assert torch._dynamo.explain(fn)(*make(11)).graph_break_count == 0
    _compare_compiled(fn, compiled, make, [w for w in weights if w is not None])


def test_compile_speechbrain_conformer_encoder_with_converted_layers():
    conformer = import_speechbrain("speechbrain.lobes.models.transformer.Conformer")
    torch._dynamo.reset()
    torch.manual_seed(0)
    enc = conformer.ConformerEncoder(num_layers=2, d_model=32, d_ffn=64, nhead=4, kernel_size=3,
                                     attention_type="hypermixing", dropout=0.0).eval()
    for layer in enc.layers:
        layer.mha_layer = FusedHyperMixing.from_speechbrain(layer.mha_layer, backend="cpu")

    def run(x, mask):
        return enc(x, src_key_padding_mask=mask)[0]

    make = _layer_inputs(32)
    explanation = torch._dynamo.explain(run)(*make(9))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    # aot_eager: Inductor's lowering of the conv module's conv1d backward specialises on the
    # sequence length (it recompiles for every length with speechbrain's own, unconverted encoder
    # too); the graph capture, dynamic shapes and autograd tracing tested here are the same
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    new_graphs = [_count_compiles(compiled, *make(n)) for n in (9, 13, 17)]
    assert new_graphs[0] == 1 and sum(new_graphs[1:]) <= 1, new_graphs
    _compare_compiled(run, compiled, make, list(enc.parameters()))


# ---- torch.export -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_export_layer_and_run_the_program(variant):
    torch.manual_seed(0)
    layer = FusedHyperMixing(16, 32, num_heads=2, variant=variant, backend="cpu")
    x = torch.randn(2, 9, 16)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    kw = {"key_padding_mask": mask}
    n = torch.export.Dim("n", min=2, max=4096)
    shapes = {"query": {1: n}, "key": {1: n}, "value": {1: n}, "key_padding_mask": {1: n}}
    ep = torch.export.export(layer, (x, x, x), kw, dynamic_shapes=shapes)
    assert "hmx_kernels.cpp_fwd" in str(ep.graph_module.code)
    for length in (9, 21):
        y = torch.randn(2, length, 16)
        m = torch.zeros(2, length, dtype=torch.bool)
        m[0, length - 2:] = True
        got = ep.module()(y, y, y, key_padding_mask=m)
        want = layer(y, y, y, key_padding_mask=m)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        assert_close(f"exported N={length}", got, want, 1e-6)


# ---- autocast and the dtype rule --------------------------------------------------------------
def test_autocast_bf16_on_cpu_runs_the_cpp_backend(monkeypatch):
    case = make_case(variant="speechbrain", B=2, M=23, d=16, H=2, k_h=12)
    calls = []
    original = cpp_backend.cpp_forward

    def spy(p):
        calls.append(p)
        return original(p)

    monkeypatch.setattr(hmx_kernels.dispatch._REGISTRY["cpu"], "forward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        problem = hmx_kernels.check_inputs(**case.kwargs())
        assert select_backend("auto", problem).name == "cpu"
        out, grads = forward_backward(case, "auto")
    assert len(calls) == 1 and calls[0].autocast and calls[0].dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())  # leaves are fp32
    # the reference on the same bf16-rounded operands (LayerNorm parameters stay fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = forward_backward(case, "reference")
    # bf16: the result is rounded once to bf16, and so is every gradient at the autocast cast of
    # its operand (the leaves are fp32, their gradients are bf16 values): fp32 noise between the
    # two sides can move a rounding by one bf16 ulp, 2^-8 relative to the element, <= 2^-7 of the
    # largest element after LayerNorm-scaled sums: 8e-3 scale-relative
    assert_close("out", out, ref_out, 8e-3)
    for name in ref_grads:
        assert_close(name, grads[name], ref_grads[name], 8e-3)


def test_parameters_of_another_dtype_get_a_clear_error_not_a_silent_fallback():
    case = make_case(variant="speechbrain", B=1, M=5, d=8, H=2, k_h=6)
    kw = case.kwargs()
    with pytest.raises(TypeError, match=r"w1_fc1_weight has dtype torch.float64 but the tokens \(query\) have "
                                        r"dtype torch.float32"):
        hmx_kernels.hyper_mixing(**{**kw, "w1_fc1_weight": kw["w1_fc1_weight"].double()})
    with pytest.raises(TypeError, match=r"w1_fc1_weight has dtype torch.float32 but the tokens \(query\) have "
                                        r"dtype torch.bfloat16.*autocast"):
        hmx_kernels.hyper_mixing(**{**kw, "query": kw["query"].bfloat16()})
    with pytest.raises(TypeError, match=r"ln_weight has dtype torch.float16"):
        hmx_kernels.hyper_mixing(**{**kw, "ln_weight": kw["ln_weight"].half()})


def test_layer_converted_to_bf16_runs_fused_on_cpu():
    layer = FusedHyperMixing(16, 32, num_heads=2).to(torch.bfloat16)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    p = hmx_kernels.check_inputs(x, None, None, *layer.hyper.w1_gen.tensors(), *layer.hyper.w2_gen.tensors(),
                                 layer.layer_norm.weight, layer.layer_norm.bias)
    assert select_backend("auto", p).name == "cpu"
    assert layer(x)[0].dtype == torch.bfloat16


# ---- the eager path: the same implementations without the op dispatch ---------------------------
EAGER_MODES = {"plain": {}, "chunk3_L1": dict(chunk_size=3, left_context_chunks=1)}


@pytest.mark.parametrize("mode", list(EAGER_MODES))
@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_eager_path_equals_the_op_path_bitwise(backend, mode, monkeypatch):
    """A plain eager call runs the ops' implementations through a torch.autograd.Function
    (ops.FusedOps.forward), not the torch.library op: same values, bit for bit, on outputs and
    every gradient (same upstream gradient), with masks; the op path is what compile, export and
    dispatch modes see. The eager path is taken (a spy on the Function), and not when switched off."""
    import hmx_kernels.ops as ops_module

    dtype = torch.float64 if backend == "cpu" else torch.float32
    case = make_case(variant="idiap", B=2, M=9, N=9, d=12, H=2, k_h=5, dtype=dtype, all_padded_batch=True)
    grad_out = torch.randn(2, 9, 12, dtype=dtype, generator=torch.Generator().manual_seed(3))
    eager_calls = []
    ops = _ops(backend)
    if backend == "triton":  # plain mixing: the layer ops (LayerNorm fused); the modes: the block ops
        from hmx_kernels.triton import launch

        ops = launch.TRITON_BLOCK_OPS if EAGER_MODES[mode] else launch.TRITON_OPS.layer
    # calls from a validated problem take the eager Function without the ops' own argument check
    real_apply = ops._validated.apply

    def spy(*args):
        eager_calls.append(len(args))
        return real_apply(*args)

    monkeypatch.setattr(ops._validated, "apply", spy)
    results = {}
    for path in ("eager", "op"):
        monkeypatch.setattr(ops_module, "EAGER_PATH", path == "eager")
        results[path] = forward_backward(case, backend, grad_out, fn=lambda **k: hmx_kernels.hyper_mixing(
            **k, backend=backend, **EAGER_MODES[mode]))
        assert len(eager_calls) == 1, path  # the eager run's one call; the op run added none
    (out_e, grads_e), (out_o, grads_o) = results["eager"], results["op"]
    assert torch.equal(out_e, out_o)
    assert set(grads_e) == set(grads_o)
    for name in grads_o:
        assert (grads_e[name] is None and grads_o[name] is None) or torch.equal(grads_e[name], grads_o[name]), name


def test_eager_path_steps_aside_for_dispatch_modes_and_functorch():
    """A dispatch mode (the launch and traffic accounts), functorch transforms and fake tensors
    get the op itself."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from hmx_kernels.ops import eager_path_allowed

    x = torch.randn(2, 3)
    assert eager_path_allowed(x)

    class Seen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Seen():
        assert not eager_path_allowed(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(eager_path_allowed(t)) or t)(x)
    assert seen == [False]
    with torch._subclasses.FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(x)
    assert not eager_path_allowed(fake)


# ---- double backward --------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_double_backward_raises_clearly(backend):
    case = make_case(variant="speechbrain", B=1, M=6, d=8, H=2, k_h=6)
    x = case.tensors["query"]
    out = hmx_kernels.hyper_mixing(**case.kwargs(), backend=backend)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    assert gx.requires_grad  # not a silent constant
    with pytest.raises(RuntimeError, match="do not support double backward.*backend='reference'"):
        torch.autograd.grad(gx.square().sum(), x)
    assert "backend='reference'" in DOUBLE_BACKWARD_ERROR


def test_double_backward_works_on_the_reference():
    case = make_case(variant="speechbrain", B=1, M=6, d=8, H=2, k_h=6, dtype=torch.float64)
    x = case.tensors["query"]
    out = hmx_kernels.hyper_mixing(**case.kwargs(), backend="reference")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    assert torch.isfinite(ggx).all() and ggx.abs().sum() > 0


MODE_ARGS = {  # (chunk_size, left_context, packed)
    "token-causal": (1, -1, False),
    "chunk3-L1": (3, 1, False),
    "packed": (0, -1, True),
    "packed-chunk2": (2, -1, True),
}


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_opcheck_mixing_blocks(mode):
    """The cpp ops with causal, chunked and packed mixing: schema, fake state shape (per-backend
    state slots), autograd registration."""
    chunk, left, packed = MODE_ARGS[mode]
    case = make_case(variant="speechbrain", B=1, M=11, d=12, H=2, k_h=10, masks=False, input_scale=0.3)
    args, p = _op_args(case, device="cpu")
    ops = _ops("cpu")
    args = tuple(a.detach().requires_grad_(i not in (3, 4)) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))
    cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32) if packed else None
    extra = (chunk, left, cu)
    torch.library.opcheck(ops.fwd, (*args, *extra))
    y, state = ops.fwd(*args, *extra)
    torch.library.opcheck(ops.bwd, (torch.randn_like(y), *args[:-1], state, args[-1], *extra),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_honour_policy_packed_sequences_and_groups_break_the_graph_with_a_reason():
    """What the README's compile section says of the two calls that read tensor values on the host:
    attn_mask_policy="honour" (the mode is read from the mask) and packed sequences (cu_seqlens is
    checked and sized on the host), and a sequence-parallel call (its agreement all-gather).
    torch.compile(fullgraph=True) raises the package's own reason (it failed deep in dynamo: a
    skipped WeakIdKeyDictionary, a data-dependent guard); without fullgraph they compile with
    graph breaks and equal eager. backend="eager":
    dynamo's capture, which decides graph breaks, is the same for every compiler backend."""
    from hmx_kernels.integrations.speechbrain import HONOUR_COMPILE_NOTE as HONOUR_NOTE
    from hmx_kernels.varlen import COMPILE_NOTE as PACKED_NOTE, cu_seqlens_from_lengths

    torch.manual_seed(0)
    layer = FusedHyperMixing(8, 16, num_heads=2, attn_mask_policy="honour")
    x = torch.randn(1, 6, 8)
    mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)
    tokens = torch.randn(8, 8)
    cu = cu_seqlens_from_lengths(torch.tensor([3, 5]))
    cases = [(lambda x, m: layer(x, attn_mask=m)[0], (x, mask), HONOUR_NOTE),
             (lambda t, c: layer(t, cu_seqlens=c, max_seqlen=5)[0], (tokens, cu), PACKED_NOTE)]
    for fn, args, note in cases:
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported, match=re.escape(note[:60])):
            torch.compile(fn, fullgraph=True, backend="eager")(*args)
        torch._dynamo.reset()
        assert torch._dynamo.explain(fn)(*args).graph_break_count >= 1
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, backend="eager")(*args), fn(*args))
    # a sequence-parallel call (a stand-in group: the break comes before any collective)
    from hmx_kernels.functional import SEQUENCE_PARALLEL_COMPILE_NOTE

    layer.sequence_parallel_group = object()
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=re.escape(SEQUENCE_PARALLEL_COMPILE_NOTE[:60])):
        torch.compile(lambda x: layer(x)[0], fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()


def test_flat_views_are_the_buffer_in_order_and_refuse_overflow():
    """ops.flat_views: consecutive contiguous views of one 1-D buffer (None: no space; an int: a
    gap), equal to slicing and viewing it, sharing its storage; a layout larger than the buffer
    raises instead of viewing memory past it."""
    from hmx_kernels.ops import flat_views

    buffer = torch.arange(40.0)[3:]  # a buffer that does not start at its storage's first element
    a, none, gap, b = flat_views(buffer, [(2, 3), None, 4, (5,)])
    assert none is None and gap is None
    assert torch.equal(a, buffer[:6].view(2, 3)) and torch.equal(b, buffer[10:15])
    assert a.is_contiguous() and a.data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="do not fit"):
        flat_views(buffer, [(6, 6), (2,)])
