"""Causal and chunk-causal mixing (hmx_kernels.causal): every backend that declares the causal
block kinds against the explicit O(N^2) masked formulation (tests/naive.py masked_hyper_mixing) on
outputs and every gradient, speechbrain's masks recognised, and the attn_mask policies of a
converted speechbrain layer.

The mode tests are generated from the capabilities (`_declared_combos`): backend x (device, dtype)
of its declared tolerances x every mode whose kind (token-causal, chunk-causal) it declares x
variant, so a backend that declares a kind is tested in it with no edit here; one that cannot run here is skipped with its reasons. Tolerances: float64 against the
masked formulation in float64 (same generator arithmetic, sums in other orders, the fused backends
also in the reassociated form): the declared float64 tolerance, or 1e-12 of the largest magnitude
for the reference; float32 against the masked formulation in float64 on the same values, and
float16 / bfloat16 against the reference on the same rounded values, at the backend's declared
tolerance for the device and dtype (hmx_kernels/cpp/{cpu,cuda}.py, hmx_kernels/triton/backend.py,
with their reasons). Backend-specific cases follow (the cpu twin's tiles, scan and thread counts;
the Triton backend's pieces and split kernels).
"""
from __future__ import annotations

import pytest
import torch

import hmx_kernels
from hmx_kernels import FusedHyperMixing
from hmx_kernels.blocks import CHUNK_CAUSAL, TOKEN_CAUSAL
from hmx_kernels.causal import MixingMode, allowed_matrix
from hmx_kernels.integrations.speechbrain import mode_from_attn_mask
from hmx_kernels.dispatch import get_backend
from naive import masked_hyper_mixing
from utils import WEIGHT_NAMES, assert_close, forward_backward, import_speechbrain, make_case

RTOL = 1e-12
MODES = {
    "token": dict(causal=True),
    "chunk3": dict(chunk_size=3),  # 3 does not divide N = 11
    "chunk4_L0": dict(chunk_size=4, left_context_chunks=0),
    "chunk2_L1": dict(chunk_size=2, left_context_chunks=1),
    "chunk_ge_N": dict(chunk_size=64),  # one chunk: the non-causal result
}


def _mode(kw):
    return hmx_kernels.causal.resolve_mode(**kw)


def _masked(case, mode):
    t = case.tensors
    N = t["query"].shape[1]
    w1 = [t[k] for k in WEIGHT_NAMES[:4]]
    w2 = w1 if case.tied else [t[k] for k in WEIGHT_NAMES[4:8]]

    def fn(**kw):
        return masked_hyper_mixing(kw["query"], kw.get("key"), kw.get("value"), w1, w2,
                                   (t["ln_weight"], t["ln_bias"]), variant=case.variant,
                                   allowed=allowed_matrix(mode, N), key_padding_mask=case.key_padding_mask,
                                   query_padding_mask=case.query_padding_mask,
                                   use_layer_norm=case.use_layer_norm)
    return fn


def _probe_reasons(name, device, dtype):
    case = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4).cast(dtype, device)
    return hmx_kernels.backend_reasons(hmx_kernels.check_inputs(**case.kwargs(), chunk_size=2))[name]


def _cpu_reasons():
    return _probe_reasons("cpu", "cpu", torch.float32)


needs_cpu = pytest.mark.skipif(bool(_cpu_reasons()), reason=f"cpu backend unavailable: {_cpu_reasons()}")


# ---- generated from the capabilities: backend x device x dtype x mode ---------------------------
def _kind(kw) -> str:
    return TOKEN_CAUSAL if kw.get("causal") else CHUNK_CAUSAL


def _declared_combos(modes):
    """(backend, device, dtype, mode name) for every registered backend and every mode of `modes`
    whose block kind (token-causal, chunk-causal) the backend declares: every (device, dtype) of
    its declared tolerances, and float64 on the CPU for a backend that takes it with none declared
    (the reference: exact up to summation order). A combination that cannot run here (no GPU, no
    compiler, no triton) is collected and skipped with its reasons, so a backend that declares a
    kind is tested in it with no edit here."""
    out = []
    for name in hmx_kernels.registered_backends():
        backend = get_backend(name)
        names = [m for m, kw in modes.items() if _kind(_mode_kwargs(kw)) in backend.capabilities.blocks]
        if not names:
            continue
        for device, dtype in list(backend.tolerances) or [("cpu", torch.float64)]:
            if device == "cuda" and not torch.cuda.is_available():
                reasons = ["no CUDA device"]
            else:
                reasons = _probe_reasons(name, device, dtype)
            for mode_name in names:
                out.append(pytest.param(
                    name, device, dtype, mode_name,
                    id=f"{mode_name}-{name}-{device}-{str(dtype).replace('torch.', '')}",
                    marks=pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "-")))
    return out


def _mode_kwargs(entry):
    return entry[-1] if isinstance(entry, tuple) else entry


# backends declaring the causal kinds that run float64 CPU tensors here (the whole-model tests)
BACKENDS = [name for name in hmx_kernels.registered_backends()
            if get_backend(name).capabilities.causal and torch.float64 in get_backend(name).capabilities.dtypes
            and not _probe_reasons(name, "cpu", torch.float64)]


def _tolerance(backend, device, dtype):
    """(output, gradient) tolerance: the backend's declared one, or RTOL for float64 where it
    declares none (the reference)."""
    tol = get_backend(backend).tolerances.get((device, dtype))
    return (tol.out, tol.grad) if tol is not None else (RTOL, RTOL)


def _expected(case, device, dtype, kw, grad_out):
    """What a backend must give: float64 / float32 against the O(N^2) masked formulation in float64
    on the same values; float16 / bfloat16 against the reference on the same rounded values (their
    declared tolerances are defined against it: both round the result to the half type)."""
    if dtype in (torch.float64, torch.float32):
        exact = case.cast(torch.float64, "cpu")
        return forward_backward(exact, "reference", grad_out.to(torch.float64).cpu(), fn=_masked(exact, _mode(kw)))
    return forward_backward(case, "reference", grad_out,
                            fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend="reference", **kw))


def _check_mode(backend, device, dtype, case, kw, grad_out):
    out, grads = forward_backward(case, backend, grad_out,
                                  fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend=backend, **kw))
    exp, exp_grads = _expected(case, device, dtype, kw, grad_out)
    tol_out, tol_grad = _tolerance(backend, device, dtype)
    assert out.dtype == dtype and out.device.type == device
    assert_close("out", out, exp, tol_out)
    assert set(grads) == set(exp_grads)
    for name in exp_grads:
        assert_close(name, grads[name], exp_grads[name], tol_grad)
    return out


@pytest.mark.parametrize("backend, device, dtype, mode_name", _declared_combos(MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_matches_the_masked_formulation(variant, mode_name, backend, device, dtype):
    """Every mode of MODES, masks, a fully padded batch row, tied generators in one case."""
    kw = MODES[mode_name]
    case = make_case(variant=variant, B=3, M=11, N=11, d=12, H=2, k_h=5, dtype=torch.float64,
                     all_padded_batch=True, input_scale=0.5, tied=(mode_name == "chunk3")).cast(dtype, device)
    grad_out = torch.randn(3, 11, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = _check_mode(backend, device, dtype, case, kw, grad_out.to(dtype).to(device))
    if mode_name == "chunk_ge_N":  # one chunk is ordinary mixing
        plain, _ = forward_backward(case, backend, grad_out.to(dtype).to(device),
                                    fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend=backend))
        assert_close("non-causal", out, plain, _tolerance(backend, device, dtype)[0])


AWKWARD_MODES = {
    "token": ("speechbrain", 29, dict(causal=True)),  # one block per token: the interpreter's slowest, short
    "chunk32_L1": ("idiap", 67, dict(chunk_size=32, left_context_chunks=1)),  # 32 does not divide 67
    "chunk20": ("speechbrain", 67, dict(chunk_size=20)),  # every earlier block
    "chunk5_L0": ("idiap", 67, dict(chunk_size=5, left_context_chunks=0)),
}


@pytest.mark.parametrize("backend, device, dtype, mode_name", _declared_combos(AWKWARD_MODES))
def test_modes_at_awkward_sizes(mode_name, backend, device, dtype):
    """d_h 18, k_h 72, a prime N, padding masks, in every declared dtype."""
    variant, n, kw = AWKWARD_MODES[mode_name]
    case = make_case(variant=variant, B=2, M=n, N=n, d=36, H=2, k_h=72, seed=3, dtype=torch.float64).cast(dtype,
                                                                                                         device)
    grad_out = torch.randn(2, n, 36, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _check_mode(backend, device, dtype, case, kw, grad_out.to(dtype).to(device))


def test_causal_output_does_not_depend_on_the_future():
    case = make_case(variant="speechbrain", B=1, M=9, d=8, H=2, k_h=4, masks=False, dtype=torch.float64)
    x = case.tensors["query"].detach().clone()
    kw = {**case.kwargs(), "query": x}
    a = hmx_kernels.hyper_mixing(**kw, causal=True)
    x2 = x.clone()
    x2[:, 6:] += 1.0  # change the future of token 5
    b = hmx_kernels.hyper_mixing(**{**kw, "query": x2}, causal=True)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])


FP32_MODES = {
    "token": dict(causal=True),
    "chunk32_L2": dict(chunk_size=32, left_context_chunks=2),
    "chunk100": dict(chunk_size=100),  # blocks across the 256-token tiles, 100 does not divide N
    "chunk7_L0": dict(chunk_size=7, left_context_chunks=0),
}


@needs_cpu
@pytest.mark.parametrize("mode_name", list(FP32_MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_cpu_backend_modes_float32_awkward_sizes(variant, mode_name):
    """d_h 18, k_h 72, a prime N of several tiles and work chunks, padding masks."""
    kw = FP32_MODES[mode_name]
    case = make_case(variant=variant, B=2, M=521, N=521, d=36, H=2, k_h=72, seed=3)
    g = torch.Generator().manual_seed(9)
    grad_out = torch.randn(2, 521, 36, generator=g)
    tol = get_backend("cpu").tolerances[("cpu", torch.float32)]

    def run(backend):
        return forward_backward(case, backend, grad_out,
                                fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend=backend, **kw))

    out, grads = run("cpu")
    exp, exp_grads = run("reference")
    assert_close("out", out, exp, tol.out)
    for name in exp_grads:
        assert_close(name, grads[name], exp_grads[name], tol.grad)


LONG_MODES = {
    "token": dict(causal=True),  # two tiles, the backward's 16-token sub-tiles, a partial last one
    "chunk7": dict(chunk_size=7),  # 43 blocks: groups of 12 blocks (fp64, d_h 18, k_h 72) and a partial one
    "chunk5_L2": dict(chunk_size=5, left_context_chunks=2),
}


@needs_cpu
@pytest.mark.parametrize("mode_name", list(LONG_MODES))
def test_cpu_backend_long_modes_float64_match_the_masked_formulation(mode_name):
    """The cpu backend's scan and grouped block stages (csrc/hmx_cpu_scan.h) at a length where
    they take more than one step: several tiles and sub-tiles (token-causal), more blocks than one
    group holds (chunked); fp64, padding masks, against the O(N^2) masked formulation."""
    kw = LONG_MODES[mode_name]
    case = make_case(variant="speechbrain", B=2, M=301, d=36, H=2, k_h=72, dtype=torch.float64, input_scale=0.5,
                     seed=11)
    grad_out = torch.randn(2, 301, 36, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out, grads = forward_backward(case, "cpu", grad_out,
                                  fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend="cpu", **kw))
    exp, exp_grads = forward_backward(case, "reference", grad_out, fn=_masked(case, _mode(kw)))
    assert_close("out", out, exp, RTOL)
    for name in exp_grads:
        assert_close(name, grads[name], exp_grads[name], RTOL)


@needs_cpu
def test_cpu_backend_modes_are_deterministic_across_thread_counts():
    # without the LayerNorm epilogue: torch's own layer_norm backward sums its weight gradients in
    # a thread-count dependent order (non-causal mixing alike)
    case = make_case(variant="speechbrain", B=1, M=700, d=16, H=2, k_h=12, seed=4, use_layer_norm=False)
    outs = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(forward_backward(case, "cpu", fn=lambda **k: hmx_kernels.hyper_mixing(
                **k, backend="cpu", chunk_size=5, left_context_chunks=3)))
    finally:
        torch.set_num_threads(old)
    for out, grads in outs[1:]:
        assert torch.equal(out, outs[0][0])
        for name, g in grads.items():
            assert (g is None and outs[0][1][name] is None) or torch.equal(g, outs[0][1][name]), name


def test_backends_without_the_kinds_decline_and_auto_runs_cpu():
    """A backend that does not declare a causal kind declines a call in it with a reason naming
    the mode; one that declares it gives no such reason."""
    case = make_case(variant="speechbrain", B=1, M=6, d=8, H=2, k_h=4)
    for kw, kind, words in ((dict(chunk_size=2), CHUNK_CAUSAL, "chunk-causal"),
                            (dict(causal=True), TOKEN_CAUSAL, "token-causal")):
        p = hmx_kernels.check_inputs(**case.kwargs(), **kw)
        reasons = hmx_kernels.backend_reasons(p)
        assert reasons["reference"] == []
        for name, rs in reasons.items():
            declines = any(words in r and "not implemented" in r for r in rs)
            assert declines != (kind in get_backend(name).capabilities.blocks), (name, kind, rs)
        assert hmx_kernels.select_backend("auto", p).name == ("cpu" if not reasons["cpu"] else "reference")


def test_bad_mode_arguments():
    case = make_case(variant="idiap", B=1, M=4, N=6, d=8, H=2, k_h=4)
    with pytest.raises(ValueError, match="needs as many queries as keys"):
        hmx_kernels.hyper_mixing(**case.kwargs(), causal=True)
    sb = make_case(variant="speechbrain", B=1, M=4, d=8, H=2, k_h=4).kwargs()
    with pytest.raises(ValueError, match="left_context_chunks needs chunk_size"):
        hmx_kernels.hyper_mixing(**sb, left_context_chunks=1)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        hmx_kernels.hyper_mixing(**sb, chunk_size=0)
    with pytest.raises(ValueError, match="causal=True means token-causal"):
        hmx_kernels.hyper_mixing(**sb, causal=True, chunk_size=4)


# ---- speechbrain's masks ----------------------------------------------------------------------
def _sb_masks():
    T = import_speechbrain("speechbrain.lobes.models.transformer.TransformerASR")
    from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

    return T, DynChunkTrainConfig


@pytest.mark.parametrize("N", [1, 7, 16])
def test_speechbrain_masks_are_recognised(N):
    T, DCT = _sb_masks()
    src = torch.zeros(2, N, 4)
    causal = T.make_transformer_src_mask(src, causal=True)
    assert mode_from_attn_mask(causal) == (MixingMode(1) if N > 1 else None)
    for C in (1, 2, 3, 5):
        for L in (None, 0, 1, 2):
            mask = T.make_transformer_src_mask(src, dynchunktrain_config=DCT(chunk_size=C, left_context_size=L))
            mode = mode_from_attn_mask(mask)
            # the recognised mode allows exactly what the mask allows
            assert torch.equal(allowed_matrix(mode, N), ~mask), (C, L, mode)


def test_mask_recognition_lives_in_the_speechbrain_integration():
    """mode_from_attn_mask moved to hmx_kernels.integrations.speechbrain; the old name still
    resolves there, with a DeprecationWarning, and hmx_kernels.causal holds only the modes."""
    import hmx_kernels.causal as causal_module
    from hmx_kernels.integrations import speechbrain as sb

    with pytest.warns(DeprecationWarning, match="moved to hmx_kernels.integrations.speechbrain"):
        assert causal_module.mode_from_attn_mask is sb.mode_from_attn_mask
    assert "mode_from_attn_mask" not in causal_module.__all__
    with pytest.raises(AttributeError):
        causal_module.no_such_name


def test_other_masks_are_refused():
    m = torch.zeros(5, 5)
    m[2, 0] = float("-inf")  # a hole that no chunk pattern has
    with pytest.raises(ValueError, match="not a causal or chunk-causal mask"):
        mode_from_attn_mask(m)
    with pytest.raises(ValueError, match="only 0 \\(allowed\\) and -inf"):
        mode_from_attn_mask(torch.full((3, 3), -1.0))
    future_only = torch.tril(torch.ones(4, 4, dtype=torch.bool), -1)  # anti-causal
    with pytest.raises(ValueError, match="not a causal or chunk-causal mask"):
        mode_from_attn_mask(future_only)


@pytest.mark.parametrize("config", ["causal", "dct"])
def test_converted_speechbrain_layer_attn_mask_policies(config):
    T, DCT = _sb_masks()
    HyperMixing = import_speechbrain("speechbrain.nnet.hypermixing").HyperMixing
    torch.manual_seed(0)
    sb = HyperMixing(16, 32, num_heads=2).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    mask = (T.make_transformer_src_mask(x, causal=True) if config == "causal" else
            T.make_transformer_src_mask(x, dynchunktrain_config=DCT(chunk_size=3, left_context_size=1)))
    # ignore (the default of from_speechbrain): what speechbrain computes, which ignores the mask
    layer = FusedHyperMixing.from_speechbrain(sb, backend="reference")
    with pytest.warns(UserWarning, match="ignores attn_mask"):
        out = layer(x, x, x, attn_mask=mask, key_padding_mask=pad)[0]
    assert torch.equal(out, sb(x, x, x, attn_mask=mask, key_padding_mask=pad)[0])  # bit-compatible
    layer.backend = "auto"  # the fused cpu backend ignores it the same way
    assert_close("ignored, cpu", layer(x, x, x, attn_mask=mask, key_padding_mask=pad)[0], out, RTOL)
    # honour: the masked formulation of the mode the mask describes
    layer.attn_mask_policy = "honour"
    got = layer(x, x, x, attn_mask=mask, key_padding_mask=pad)[0]
    w1 = layer.hyper.w1_gen.tensors()
    w2 = layer.hyper.w2_gen.tensors()
    exp = masked_hyper_mixing(x, None, None, w1, w2, (layer.layer_norm.weight, layer.layer_norm.bias),
                              variant="speechbrain", allowed=~mask if mask.dtype == torch.bool else mask == 0,
                              key_padding_mask=pad)
    assert_close("honoured", got, exp, RTOL)
    # a layer built directly still refuses a mask, pointing at the policies
    direct = FusedHyperMixing(16, 32, num_heads=2)
    with pytest.raises(NotImplementedError, match="attn_mask_policy"):
        direct(x.float(), x.float(), x.float(), attn_mask=mask)


@needs_cpu
def test_cpu_token_causal_runs_as_a_scan_with_tile_checkpoints():
    """Token-causal mixing on the cpu backend is the scan (csrc/hmx_cpu_scan.h): its state holds one
    [k_h, d_h] checkpoint per tile of CPU_TILE tokens, not one per token; chunk-causal mixing keeps
    one per chunk. The Python shape function and the extension agree on the tile."""
    from hmx_kernels.cpp.ops import CPP_OPS, CPU_TILE, extension

    assert extension("cpu").CPU_TILE == CPU_TILE
    case = make_case(variant="speechbrain", B=1, M=600, d=8, H=2, k_h=5, masks=False)
    p = hmx_kernels.check_inputs(**case.kwargs())
    args = (p.query, p.key, p.value, None, None, *p.generator_weights(), "speechbrain")
    _, state = CPP_OPS.fwd(*args, 1, -1)
    assert tuple(state.shape) == (1, 2, 4 * 5, 4)  # ceil(600 / 256) = 3 checkpoints, then the final state
    _, state = CPP_OPS.fwd(*args, 7, 2)
    assert tuple(state.shape) == (1, 2, 86 * 5, 4)  # ceil(600 / 7) = 86 chunks
    with pytest.raises(Exception, match="state slots"):  # the binding checks the slot count itself
        extension("cpu").forward(p.query, p.key, p.value, *[torch.zeros(600, 8)] * 2, None, None,
                                 *p.generator_weights(), 1.0, 1, -1, None, 2)


class _MaskedMixing(torch.nn.Module):
    """A converted layer's weights through the explicit O(N^2) masked formulation, honouring the
    attn_mask the encoder passes (speechbrain's call convention)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, query, key, value, attn_mask=None, key_padding_mask=None, **kw):
        N = query.shape[1]
        allowed = torch.ones(N, N, dtype=torch.bool) if attn_mask is None else (
            ~attn_mask if attn_mask.dtype == torch.bool else attn_mask == 0)
        ly = self.layer
        out = masked_hyper_mixing(query, None, None, ly.hyper.w1_gen.tensors(), ly.hyper.w2_gen.tensors(),
                                  (ly.layer_norm.weight, ly.layer_norm.bias), variant="speechbrain",
                                  allowed=allowed, key_padding_mask=key_padding_mask)
        return out, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", ["causal", "dct"])
def test_converted_speechbrain_transformer_asr(config, backend):
    """A speechbrain TransformerASR with HyperMixing attention, causal (transformer encoder,
    causal=True) or trained with Dynamic Chunk Training (conformer encoder, chunk 3, left context
    1), converted layer by layer: "ignore" reproduces the original model (which ignores the mask),
    "honour" equals the same model with every layer replaced by the masked formulation."""
    import copy

    T, DCT = _sb_masks()
    torch.manual_seed(0)
    dct = None
    if config == "causal":
        model = T.TransformerASR(tgt_vocab=10, input_size=20, d_model=16, nhead=2, num_encoder_layers=2,
                                 num_decoder_layers=0, d_ffn=32, attention_type="hypermixing", causal=True,
                                 dropout=0.0)
        attr = "self_att"
    else:
        model = T.TransformerASR(tgt_vocab=10, input_size=20, d_model=16, nhead=2, num_encoder_layers=2,
                                 num_decoder_layers=0, d_ffn=32, attention_type="hypermixing", causal=False,
                                 encoder_module="conformer", kernel_size=3, normalize_before=True, dropout=0.0)
        attr = "mha_layer"
        dct = DCT(chunk_size=3, left_context_size=1)
    model = model.double().eval()
    x = torch.randn(2, 11, 20, dtype=torch.float64)
    wav_len = torch.tensor([1.0, 0.7], dtype=torch.float64)

    def encode(m):
        return m.encode(x, wav_len, dynchunktrain_config=dct)

    original = encode(model)
    converted = copy.deepcopy(model)
    for enc_layer in converted.encoder.layers:
        setattr(enc_layer, attr, FusedHyperMixing.from_speechbrain(getattr(enc_layer, attr), backend=backend))
    with pytest.warns(UserWarning, match="ignores attn_mask"):
        ignored = encode(converted)
    assert_close("ignore", ignored, original, RTOL)
    masked = copy.deepcopy(converted)
    for enc_layer in converted.encoder.layers:
        getattr(enc_layer, attr).attn_mask_policy = "honour"
    for enc_layer in masked.encoder.layers:
        setattr(enc_layer, attr, _MaskedMixing(getattr(enc_layer, attr)))
    honoured = encode(converted)
    assert_close("honour", honoured, encode(masked), RTOL)
    assert (honoured - ignored).abs().max() > 1e-6  # the mask did restrict the mixing


# ---- the triton backend -----------------------------------------------------------------------
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_reasons():
    return _probe_reasons("triton", TRITON_DEVICE, torch.float32)


needs_triton = pytest.mark.skipif(bool(_triton_reasons()), reason=f"triton backend unavailable: {_triton_reasons()}")


def _triton_tolerance(dtype):
    return get_backend("triton").tolerances[(TRITON_DEVICE, dtype)]


@pytest.fixture
def small_pieces(monkeypatch):
    """Plain chunks (and so the longest piece of a mixing block) of 14 tokens at N = 67: blocks
    longer than that run as several programs whose partials are summed per block; every buffer
    the backend allocates is poisoned with NaN, so an element a kernel forgets to write fails."""
    from hmx_kernels.triton import launch as tfn

    monkeypatch.setattr(tfn, "CHUNK_MIN", 14)
    tfn.set_nan_poison(True)
    yield tfn
    tfn.set_nan_poison(False)


TRITON_MODES = {
    "token": ("speechbrain", dict(causal=True)),
    "chunk32_L1": ("idiap", dict(chunk_size=32, left_context_chunks=1)),  # blocks of 3 pieces, 32 does not divide 67
    "chunk20": ("speechbrain", dict(chunk_size=20)),  # blocks of 2 pieces (14 + 6), every earlier block
    "chunk5_L0": ("idiap", dict(chunk_size=5, left_context_chunks=0)),
}


@needs_triton
@pytest.mark.parametrize("mode_name", ["chunk32_L1", "chunk20"])
def test_triton_blocks_of_several_pieces(mode_name, small_pieces):
    """Mixing blocks longer than one program's piece (14 tokens here): their piece partials are
    summed per block; every buffer NaN-poisoned. float32, d_h 18, k_h 72, N 67, padding masks,
    against the masked formulation in float64 on the same values."""
    variant, kw = TRITON_MODES[mode_name]
    case = make_case(variant=variant, B=2, M=67, N=67, d=36, H=2, k_h=72, seed=3).cast(torch.float32, TRITON_DEVICE)
    grad_out = torch.randn(2, 67, 36, generator=torch.Generator().manual_seed(9))
    _check_mode("triton", TRITON_DEVICE, torch.float32, case, kw, grad_out.to(TRITON_DEVICE))


@pytest.fixture
def split_kernels(small_pieces, monkeypatch):
    """The kernels the launcher runs from config.SPLIT_BLOCK_D on (d_h 128 on a GPU), at d_h 18
    (D 32) here: the state and tsum programs split S's / T's rows over two programs per piece, the
    query and key passes leave their token sums out. Records every launch."""
    from hmx_kernels.triton import autotune as tconfig

    monkeypatch.setattr(tconfig, "SPLIT_BLOCK_D", 32)
    launched = []
    real_launch = small_pieces._launch

    def recording_launch(kernel, grid, *args, **kwargs):
        launched.append((kernel.fn.__name__, tuple(grid), kwargs))
        real_launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(small_pieces, "_launch", recording_launch)
    return launched


def _assert_split_blocked_launches(launched, B, H):
    names = [name for name, _, _ in launched]
    assert names.count("hmx_bwd_kernel_tsum") == 1 and names.count("hmx_fwd_kernel_state") == 2, names
    assert all(kw["BLOCKED"] for _, _, kw in launched), launched
    for name, grid, kw in launched:
        if name in ("hmx_fwd_kernel_state", "hmx_bwd_kernel_tsum"):
            assert kw["ROW_SPLIT"] == 2 and grid[1] == B * H * 2, (name, grid)
        else:
            assert grid[1] == B * H, (name, grid)
    assert [kw["ACC_T"] for name, _, kw in launched if name == "hmx_bwd_kernel_query"] == [False]
    assert [kw["ACC_S"] for name, _, kw in launched if name == "hmx_bwd_kernel_key"] == [False]


@needs_triton
@pytest.mark.parametrize("mode_name", ["token", "chunk32_L1", "chunk20"])
def test_triton_modes_with_the_split_kernels(mode_name, split_kernels):
    """The mixing-block modes through the split kernels (rows of S and T over two programs per
    piece, T and sdy from hmx_bwd_kernel_tsum, the backward's per-block S and sv from the state
    pass over the pieces), float32, d_h 18, blocks of several pieces, padding masks; against the
    masked formulation in float64 on the same values."""
    variant, kw = TRITON_MODES[mode_name]
    case = make_case(variant=variant, B=2, M=67, N=67, d=36, H=2, k_h=72, seed=4).cast(torch.float32, TRITON_DEVICE)
    exact = case.cast(torch.float64, "cpu")
    grad_out = torch.randn(2, 67, 36, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out, grads = forward_backward(case, "triton", grad_out.to(torch.float32).to(TRITON_DEVICE),
                                  fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend="triton", **kw))
    _assert_split_blocked_launches(split_kernels, B=2, H=2)
    exp, exp_grads = forward_backward(exact, "reference", grad_out, fn=_masked(exact, _mode(kw)))
    tol = _triton_tolerance(torch.float32)
    assert_close("out", out, exp, tol.out)
    for name in exp_grads:
        assert_close(name, grads[name], exp_grads[name], tol.grad)


@needs_triton
def test_triton_modes_float16_with_the_split_kernels(split_kernels):
    """The fp16 path of the split kernels in a chunk-causal mode (the tsum pass scales each dY
    tile by a power of two before rounding it to fp16), against the reference on the same fp16
    values."""
    kw = dict(chunk_size=16, left_context_chunks=1)
    case = make_case(variant="speechbrain", B=2, M=43, d=36, H=2, k_h=72, seed=7).cast(torch.float16, TRITON_DEVICE)
    grad_out = torch.randn(2, 43, 36, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(TRITON_DEVICE)

    def run(backend):
        return forward_backward(case, backend, grad_out,
                                fn=lambda **k: hmx_kernels.hyper_mixing(**k, backend=backend, **kw))

    out, grads = run("triton")
    _assert_split_blocked_launches(split_kernels, B=2, H=2)
    exp, exp_grads = run("reference")
    tol = _triton_tolerance(torch.float16)
    assert_close("out", out, exp, tol.out)
    for name in exp_grads:
        assert_close(name, grads[name], exp_grads[name], tol.grad)


# ---- attn_mask_policy: validated on assignment, masks of the wrong size refused, inference mode ----
def test_policy_is_checked_when_assigned():
    """layer.attn_mask_policy = "honor" (as the README shows assigning it) is refused at once; it
    used to be taken, and then honoured the mask as if it were "honour"."""
    layer = FusedHyperMixing(8, 8, num_heads=2)
    for bad in ("honor", "ignroe", "Honour", None, 1):
        with pytest.raises(ValueError, match="attn_mask_policy must be one of"):
            layer.attn_mask_policy = bad
        assert layer.attn_mask_policy == "raise"
        with pytest.raises(ValueError, match="attn_mask_policy must be one of"):
            FusedHyperMixing(8, 8, num_heads=2, attn_mask_policy=bad)
    for good in ("ignore", "honour", "raise"):
        layer.attn_mask_policy = good
        assert layer.attn_mask_policy == good
    state = layer.__dict__.pop("_attn_mask_policy")  # a layer pickled before the property existed
    layer.__dict__["attn_mask_policy"] = "honour"
    assert layer.attn_mask_policy == "honour" and state == "raise"


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_honoured_mask_must_match_the_sequence(variant):
    """A 3 x 3 chunk mask on 23 tokens was read as "blocks nothing" (one chunk of 3 covers the
    whole mask), so the layer mixed non-causally and saw the future; it is refused now, naming
    both sizes. The ignore policy still ignores any mask, as speechbrain does."""
    T, DCT = _sb_masks()
    layer = FusedHyperMixing(8, 8, num_heads=2, variant=variant, attn_mask_policy="honour")
    x = torch.randn(1, 23, 8)
    small = T.make_transformer_src_mask(torch.randn(1, 3, 8), dynchunktrain_config=DCT(chunk_size=3,
                                                                                          left_context_size=1))
    assert mode_from_attn_mask(small) is None  # on its own it blocks nothing
    with pytest.raises(ValueError, match=r"attn_mask is \[3, 3\] but the sequence has N = 23 tokens"):
        layer(x, x, x, attn_mask=small)
    right = T.make_transformer_src_mask(x, dynchunktrain_config=DCT(chunk_size=3, left_context_size=1))
    assert right.shape == (23, 23)
    layer(x, x, x, attn_mask=right)  # speechbrain's own [N, N] mask is taken
    layer.attn_mask_policy = "ignore"
    with pytest.warns(UserWarning, match="ignores attn_mask"):
        layer(x, x, x, attn_mask=small)


def test_honour_runs_under_inference_mode():
    """attn_mask_policy="honour" under torch.inference_mode (the mask then has no version counter):
    it raised "Inference tensors do not track version counter"; now it equals the result outside."""
    torch.manual_seed(0)
    layer = FusedHyperMixing(8, 8, num_heads=2, attn_mask_policy="honour", backend="reference")
    x = torch.randn(2, 9, 8)
    causal = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
    with torch.no_grad():
        expected = layer(x, attn_mask=causal)[0]
    with torch.inference_mode():
        mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)
        got = layer(x, attn_mask=mask)[0]
        mask.fill_(False)  # changed in place: read again, not remembered
        unmasked = layer(x, attn_mask=mask)[0]
    assert torch.equal(got, expected)
    assert torch.equal(unmasked, layer(x)[0])
    assert not torch.equal(unmasked, got)
