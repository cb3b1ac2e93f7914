"""Streaming (hmx_kernels.streaming): a sequence fed in consecutive pieces with the carried state
gives the one-pass result, in every causal mode, for outputs and every gradient (float64, 1e-12 of
the largest magnitude: the same sums, grouped by piece); the state's size does not grow with the
number of pieces; misuse is refused."""
from __future__ import annotations

import random

import pytest
import torch

import hmx_kernels
from hmx_kernels.streaming import hyper_mixing_stream
from utils import WEIGHT_NAMES, assert_close, make_case

MODES = {"token": dict(causal=True), "chunk3": dict(chunk_size=3), "chunk2_L1": dict(chunk_size=2, left_context_chunks=1),
         "chunk4_L0": dict(chunk_size=4, left_context_chunks=0), "chunk3_L3": dict(chunk_size=3, left_context_chunks=3)}


@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_pieces_equal_one_pass(variant, mode_name):
    kw = MODES[mode_name]
    C = kw.get("chunk_size", 1)
    N = 29
    case = make_case(variant=variant, B=2, M=N, N=N, d=12, H=2, k_h=5, dtype=torch.float64, input_scale=0.5)
    x = case.tensors["query"]
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    pad = case.key_padding_mask
    q = None if variant == "speechbrain" else x
    full = hmx_kernels.hyper_mixing(x, q, q, *w, variant=variant, key_padding_mask=pad,
                                    query_padding_mask=None if variant == "speechbrain" else pad, **kw)
    rng = random.Random(len(mode_name))
    outs, state, start, sizes = [], None, 0, []
    while start < N:  # pieces of random whole-chunk sizes, the last one ragged
        n = min(N - start, C * rng.randint(1, 4))
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, variant=variant,
                                       key_padding_mask=pad[:, start:start + n], **(kw if state is None else {}))
        outs.append(y)
        sizes.append(0 if state.carry is None else state.carry.numel())
        start += n
    streamed = torch.cat(outs, dim=1)
    assert_close("out", streamed, full, 1e-12)
    assert len(set(sizes[1:])) <= 1  # O(1) state in the number of pieces
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    ga = torch.autograd.grad(full, leaves, g)
    gb = torch.autograd.grad(streamed, leaves, g)
    for i, (a, b) in enumerate(zip(gb, ga)):
        assert_close(f"grad {i}", a, b, 1e-12)


def test_streaming_misuse():
    case = make_case(variant="speechbrain", B=1, M=8, d=8, H=2, k_h=4, masks=False)
    x = case.tensors["query"]
    w = [case.tensors[k] for k in WEIGHT_NAMES]
    with pytest.raises(ValueError, match="needs a causal mode"):
        hyper_mixing_stream(x, *w)
    _, s = hyper_mixing_stream(x[:, :3], *w, chunk_size=2)  # ends inside a chunk
    with pytest.raises(ValueError, match="ended inside a chunk"):
        hyper_mixing_stream(x[:, 3:], *w, state=s)
    _, s = hyper_mixing_stream(x[:, :4], *w, chunk_size=2)
    with pytest.raises(ValueError, match="was started for"):
        hyper_mixing_stream(x[:, 4:], *w, state=s, causal=True)


# ---- the layer streams: FusedHyperMixing.stream() and layer(piece, state=state) ------------------
from hmx_kernels import FusedHyperMixing  # noqa: E402
from hmx_kernels.dispatch import get_backend  # noqa: E402
from hmx_kernels.streaming import StreamingState, StreamingStateMismatch  # noqa: E402

LAYER_MODES = {"token": dict(causal=True), "chunk3": dict(chunk_size=3), "chunk4_L1": dict(chunk_size=4, left_context_chunks=1)}


def _layer(variant, mode_kw, dtype, backend, H=2, d_h=18, k_h=72, seed=0):
    torch.manual_seed(seed)
    layer = FusedHyperMixing(H * d_h, H * k_h, num_heads=H, variant=variant, backend=backend, **mode_kw)
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every gradient is exercised
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.to(dtype)


def _pieces(N, C, seed):
    rng, start, out = random.Random(seed), 0, []
    while start < N:
        n = min(N - start, C * rng.randint(1, 3))
        out.append((start, n))
        start += n
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode_name", list(LAYER_MODES))
@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
def test_layer_stream_equals_one_pass(variant, mode_name, dtype):
    """A layer fed a prime-length sequence (d_h 18, k_h 72, padded tails) in random whole-chunk
    pieces, through layer.stream() (speechbrain) or layer(piece, state=...) (idiap), equals the
    layer's one pass, output and every gradient (input and every parameter), with the same upstream
    gradient. float64: one pass on the reference, 1e-12 (the same sums grouped by piece). float32:
    one pass on the default backend (cpu), within its declared float32 tolerance."""
    kw = LAYER_MODES[mode_name]
    C = kw.get("chunk_size", 1)
    B, N = 2, 23
    backend = "reference" if dtype == torch.float64 else "auto"
    layer = _layer(variant, kw, dtype, backend)
    x = (0.5 * torch.randn(B, N, layer.input_output_dim, generator=torch.Generator().manual_seed(1))).to(dtype)
    x.requires_grad_(True)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, 17:] = True
    if variant == "speechbrain":
        full = layer(x, key_padding_mask=pad)[0]
        stream = layer.stream()
        streamed = torch.cat([stream(x[:, s:s + n], key_padding_mask=pad[:, s:s + n]) for s, n in _pieces(N, C, 3)], 1)
        assert stream.state.position == N
    else:
        full = layer(x, x, x, pad, pad)
        state, outs = layer.initial_state(), []
        for s, n in _pieces(N, C, 4):
            y, state = layer(x[:, s:s + n], key_padding_mask=pad[:, s:s + n], state=state)
            outs.append(y)
        streamed = torch.cat(outs, 1)
        assert state.position == N and state.batch == B and state.hidden_per_head == 72
    if dtype == torch.float64:
        tol_out = tol_grad = 1e-12
    else:
        tol = get_backend("cpu").tolerances[("cpu", torch.float32)]
        tol_out, tol_grad = tol.out, tol.grad
    assert_close("out", streamed, full, tol_out)
    g = torch.randn_like(full)
    leaves = [x] + list(layer.parameters())
    ga = torch.autograd.grad(full, leaves, g)
    gb = torch.autograd.grad(streamed, leaves, g)
    for (name, _), a, b in zip([("x", x)] + list(layer.named_parameters()), gb, ga):
        assert_close(f"grad {name}", a, b, tol_grad)


def test_layer_stream_needs_a_mode_and_matches_the_layer():
    plain = FusedHyperMixing(8, 16, num_heads=2)
    with pytest.raises(ValueError, match="streaming needs a causal mode"):
        plain.initial_state()
    s = plain.initial_state(chunk_size=4, left_context_chunks=2)  # a layer without a mode takes one here
    assert s.mode.chunk_size == 4 and (s.heads, s.head_dim, s.hidden_per_head, s.variant) == (2, 4, 8, "speechbrain")
    causal = FusedHyperMixing(8, 16, num_heads=2, causal=True)
    with pytest.raises(ValueError, match="cannot stream chunk-causal"):
        causal.initial_state(chunk_size=4)
    with pytest.raises(StreamingStateMismatch, match="does not fit this layer, which mixes token-causal"):
        causal(torch.randn(1, 4, 8), state=s)
    with pytest.raises(ValueError, match="no attn_mask"):
        causal(torch.randn(1, 4, 8), None, None, None, state=causal.initial_state())
    with pytest.raises(TypeError, match="StreamingState"):
        causal(torch.randn(1, 4, 8), state="start")


# ---- a state that does not fit the piece is refused, naming the state and the mismatch -------------
def _weights(H, d_h, k_h, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = [torch.randn(H, d_h, d_h, generator=g), torch.randn(H, d_h, generator=g),
         torch.randn(H, k_h, d_h, generator=g), torch.randn(H, k_h, generator=g)]
    w = [t.to(dtype=dtype, device=device) for t in w]
    ln = [torch.ones(H * d_h, dtype=dtype, device=device), torch.zeros(H * d_h, dtype=dtype, device=device)]
    return [*w, None, None, None, None, *ln]


def _started(B=1, H=2, d_h=4, k_h=6, dtype=torch.float32, variant="speechbrain", **mode):
    x = torch.randn(B, 4, H * d_h, dtype=dtype)
    return hyper_mixing_stream(x, *_weights(H, d_h, k_h, dtype), variant=variant, **(mode or dict(causal=True)))[1]


@pytest.mark.parametrize("mode", [dict(causal=True), dict(chunk_size=2, left_context_chunks=1)])
def test_state_from_batch_of_one_is_not_broadcast(mode):
    state = _started(B=1, **mode)
    with pytest.raises(StreamingStateMismatch, match=r"streaming state \(.*batch 1.*batch size: the state has 1, the piece 3"):
        hyper_mixing_stream(torch.randn(3, 4, 8), *_weights(2, 4, 6), state=state)


@pytest.mark.parametrize("mode", [dict(causal=True), dict(chunk_size=2, left_context_chunks=1)])
def test_state_from_one_k_h_is_not_broadcast_onto_another(mode):
    state = _started(k_h=1, **mode)
    with pytest.raises(StreamingStateMismatch, match="k_h: the state has 1, the piece 8"):
        hyper_mixing_stream(torch.randn(1, 4, 8), *_weights(2, 4, 8), state=state)
    # the same through layers: a state of a k_h=1 layer handed to a k_h=8 layer
    narrow = FusedHyperMixing(8, 2, num_heads=2, **mode)
    wide = FusedHyperMixing(8, 16, num_heads=2, **mode)
    _, s = narrow(torch.randn(1, 4, 8), state=narrow.initial_state())
    with pytest.raises(StreamingStateMismatch, match="k_h: the state has 1, the piece 8"):
        wide(torch.randn(1, 4, 8), state=s)
    with pytest.raises(StreamingStateMismatch, match="k_h: the state has 1, the piece 8"):
        wide(torch.randn(1, 4, 8), state=narrow.initial_state())  # before any piece: the layer's shape


def test_mismatched_states_name_the_state_and_the_mismatch():
    state = _started(B=2)
    with pytest.raises(StreamingStateMismatch, match=r"streaming state .*batch size: the state has 2, the piece 3"):
        hyper_mixing_stream(torch.randn(3, 4, 8), *_weights(2, 4, 6), state=state)
    with pytest.raises(StreamingStateMismatch, match="heads: the state has 2, the piece 4; d_h: the state has 4, the piece 2"):
        hyper_mixing_stream(torch.randn(2, 4, 8), *_weights(4, 2, 6), state=state)
    state64 = _started(dtype=torch.float64)
    with pytest.raises(StreamingStateMismatch, match="dtype: the state is torch.float64, the piece torch.float32"):
        hyper_mixing_stream(torch.randn(1, 4, 8), *_weights(2, 4, 6), state=state64)
    meta = torch.empty(1, 4, 8, device="meta")
    with pytest.raises(StreamingStateMismatch, match="device: the state is on cpu, the piece on meta"):
        hyper_mixing_stream(meta, *_weights(2, 4, 6, device="meta"), state=_started())


def test_speechbrain_state_does_not_continue_under_idiap():
    state = _started(variant="speechbrain")
    x = torch.randn(1, 4, 8)
    with pytest.raises(StreamingStateMismatch, match="variant: the state is 'speechbrain', the piece 'idiap'"):
        hyper_mixing_stream(x, *_weights(2, 4, 6), state=state, variant="idiap")
    sb_layer = FusedHyperMixing(8, 12, num_heads=2, causal=True)
    idiap_layer = FusedHyperMixing(8, 12, num_heads=2, causal=True, variant="idiap")
    _, s = sb_layer(x, state=sb_layer.initial_state())
    with pytest.raises(StreamingStateMismatch, match="variant: the state is 'speechbrain', the layer 'idiap'"):
        idiap_layer(x, state=s)


def test_hand_built_state_with_a_wrong_carry_is_refused():
    from hmx_kernels.causal import MixingMode

    bad = StreamingState(MixingMode(1), position=4, carry=torch.zeros(1, 2, 1, 4))  # k_h 1 carry, k_h 6 piece
    with pytest.raises(StreamingStateMismatch, match=r"carry shape: \[1, 2, 1, 4\], the piece needs \[B, H, k_h, d_h\] = \[1, 2, 6, 4\]"):
        hyper_mixing_stream(torch.randn(1, 4, 8), *_weights(2, 4, 6), state=bad)
    bad = StreamingState(MixingMode(2, 1), position=4, carry=torch.zeros(1, 2, 2, 6, 4))  # 2 chunks kept, L = 1
    with pytest.raises(StreamingStateMismatch, match=r"r <= 1"):
        hyper_mixing_stream(torch.randn(1, 4, 8), *_weights(2, 4, 6), state=bad)


def test_state_records_what_it_belongs_to():
    state = _started(B=1, H=2, d_h=4, k_h=6, dtype=torch.float64, chunk_size=2)
    assert (state.variant, state.batch, state.heads, state.head_dim, state.hidden_per_head, state.dtype,
            state.device, state.position) == ("speechbrain", 1, 2, 4, 6, torch.float64, torch.device("cpu"), 4)
    assert state.detach().batch == 1 and not state.detach().carry.requires_grad
    text = state.describe()
    for part in ("chunk-causal (chunk_size 2", "batch 1", "H 2", "d_h 4", "k_h 6", "float64", "on cpu", "next position 4"):
        assert part in text, (part, text)


def test_layer_streams_under_inference_mode_and_autocast():
    """Streaming inference: under torch.inference_mode the pieces equal the one pass; under
    autocast the state records the autocast dtype (its carry stays float32), and a piece outside
    autocast is then refused, naming the dtypes."""
    layer = FusedHyperMixing(16, 32, num_heads=2, chunk_size=4, backend="reference")
    x = torch.randn(2, 12, 16)
    with torch.inference_mode():
        s = layer.stream()
        y = torch.cat([s(x[:, i:i + 4]) for i in range(0, 12, 4)], 1)
        assert_close("inference_mode", y, layer(x)[0], 1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = layer.stream()
        y = torch.cat([s(x[:, i:i + 4]) for i in range(0, 12, 4)], 1)
        full = layer(x)[0]
    assert y.dtype == torch.bfloat16 and s.state.dtype == torch.bfloat16 and s.state.carry.dtype == torch.float32
    assert_close("autocast", y.float(), full.float(), 1e-2)
    with pytest.raises(StreamingStateMismatch, match="dtype: the state is torch.bfloat16, the piece torch.float32"):
        layer(x[:, :4], state=s.state)


# ---- every backend that declares a carried state streams: generated from the capabilities ---------
from hmx_kernels.causal import resolve_mode  # noqa: E402
from hmx_kernels.dispatch import BackendNotSupportedError  # noqa: E402
from hmx_kernels.streaming import select_stream_backend, stream_reasons  # noqa: E402

# token-causal, chunk-causal with unbounded left context (two chunk sizes: different ragged last
# pieces) and with L = 1, 2 chunks of left context
STREAM_MODES = {"token": dict(causal=True), "chunk3": dict(chunk_size=3), "chunk5": dict(chunk_size=5),
                "chunk4_L1": dict(chunk_size=4, left_context_chunks=1),
                "chunk3_L2": dict(chunk_size=3, left_context_chunks=2)}
STREAM_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# The reference declares no tolerances (it is the baseline): its pieces repeat the same sums grouped
# by piece, so float64 1e-12, float32 1e-5 (a few fp32 roundings of the regrouped sums), float16
# 2e-3 (computed in fp32 and rounded to fp16 at the end: one rounding, 2^-11 relative, may differ)
UNDECLARED_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stream_combos():
    """(backend, device, dtype, mode) for every registered backend and every causal mode its
    Capabilities.carried_state accepts, on every device present that it runs on, in every dtype of
    STREAM_DTYPES it computes natively (upcast dtypes are not streamed) and has a tolerance for
    (declared, or UNDECLARED_TOLERANCE: bfloat16 only where declared)."""
    out = []
    for name in hmx_kernels.registered_backends():
        backend = get_backend(name)
        caps = backend.capabilities
        if caps.carried_state is None or backend.stream_forward is None:
            continue
        for device in _devices():
            if "*" not in caps.devices and device not in caps.devices:
                continue
            for dtype in STREAM_DTYPES:
                if dtype not in caps.dtypes or ((device, dtype) not in backend.tolerances
                                                and dtype not in UNDECLARED_TOLERANCE):
                    continue
                for mode_name, kw in STREAM_MODES.items():
                    if caps.carried_state(resolve_mode(**kw)):
                        out.append(pytest.param(name, device, dtype, mode_name,
                                                id=f"{name}-{device}-{str(dtype)[6:]}-{mode_name}"))
    return out


def _stream_tolerance(backend, device, dtype):
    """The backend's declared (out, grad) tolerance for (device, dtype), else UNDECLARED_TOLERANCE."""
    tol = get_backend(backend).tolerances.get((device, dtype))
    if tol is not None:
        return tol.out, tol.grad
    return UNDECLARED_TOLERANCE[dtype], UNDECLARED_TOLERANCE[dtype]


def _cpu_available():
    from hmx_kernels.cpp.ops import extension_reasons

    return not extension_reasons("cpu")


needs_cpu = pytest.mark.skipif(not _cpu_available(), reason="the C++ extension does not build here")


def _stream_case(variant, dtype, N=23, seed=0, device="cpu"):
    case = make_case(variant=variant, B=2, M=N, N=N, d=36, H=2, k_h=72, dtype=dtype, input_scale=0.5, seed=seed,
                     device=device)
    x = case.tensors["query"]
    return x, [case.tensors[k] for k in WEIGHT_NAMES], case.key_padding_mask


def _stream_pieces(N, C, seed):
    """(start, length) of random whole-chunk pieces (1 to 3 chunks), then the N % C tokens left
    (a last piece shorter than a chunk; none token-causal)."""
    rng, start, out = random.Random(seed), 0, []
    whole = N - N % C
    while start < whole:
        n = min(whole - start, C * rng.randint(1, 3))
        out.append((start, n))
        start += n
    if N % C:
        out.append((start, N % C))
    assert len(out) >= 3, out
    return out


@pytest.mark.parametrize("variant", ["speechbrain", "idiap"])
@pytest.mark.parametrize("backend, device, dtype, mode_name", _stream_combos())
def test_backend_stream_equals_one_pass(backend, device, dtype, mode_name, variant):
    """Generated from the capabilities: every backend that declares a carried state for the mode
    (Capabilities.carried_state) streams a prime-length sequence (d_h 18, k_h 72, padded tails; 23
    tokens, 11 token-causal) in random whole-chunk pieces with a ragged last piece, and the pieces
    equal one pass of the same backend over the whole sequence, output and every gradient across
    pieces, same upstream gradient, within the backend's declared tolerance for the device and
    dtype (UNDECLARED_TOLERANCE for the reference). A backend that cannot run here (no compiler,
    no triton interpreter) is skipped with its reasons."""
    kw = STREAM_MODES[mode_name]
    C = kw.get("chunk_size", 1)
    x, w, pad = _stream_case(variant, dtype, N=11 if C == 1 else 23, device=device)
    probe = hmx_kernels.check_inputs(x[:, :C], None if variant == "speechbrain" else x[:, :C],
                                     None if variant == "speechbrain" else x[:, :C], *w, variant=variant, **kw)
    why = stream_reasons(backend, probe)
    if why:
        pytest.skip(f"{backend} does not stream this here: {'; '.join(why)}")
    N = x.shape[1]
    q = None if variant == "speechbrain" else x
    full = hmx_kernels.hyper_mixing(x, q, q, *w, variant=variant, key_padding_mask=pad, backend=backend,
                                    query_padding_mask=None if variant == "speechbrain" else pad, **kw)
    outs, state = [], None
    for start, n in _stream_pieces(N, C, seed=C):
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, variant=variant, backend=backend,
                                       key_padding_mask=pad[:, start:start + n], **(kw if state is None else {}))
        outs.append(y)
    assert state.position == N
    streamed = torch.cat(outs, dim=1)
    tol_out, tol_grad = _stream_tolerance(backend, device, dtype)
    assert streamed.dtype == full.dtype == dtype
    assert_close("out", streamed, full, tol_out)
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    ga = torch.autograd.grad(full, leaves, g)
    gb = torch.autograd.grad(streamed, leaves, g)
    for i, (a, b) in enumerate(zip(gb, ga)):
        assert_close(f"grad {i}", a, b, tol_grad)


def _layer_combos():
    """(backend, device) for every registered fused backend that streams float32 (its carried
    state in chunk-causal mixing), on every device present that it runs on."""
    out = []
    for name in hmx_kernels.registered_backends():
        backend = get_backend(name)
        caps = backend.capabilities
        if name == "reference" or caps.carried_state is None or backend.stream_forward is None:
            continue
        if torch.float32 not in caps.dtypes or not caps.carried_state(resolve_mode(chunk_size=3)):
            continue
        out += [pytest.param(name, device, id=f"{name}-{device}") for device in _devices()
                if "*" in caps.devices or device in caps.devices]
    return out


@pytest.mark.parametrize("variant, mode_name", [("speechbrain", "chunk3"), ("idiap", "chunk3_L2")])
@pytest.mark.parametrize("backend, device", _layer_combos())
def test_layer_streams_on_each_fused_backend(backend, device, variant, mode_name):
    """A FusedHyperMixing layer with backend=<each fused backend that streams> fed a prime-length
    sequence (d_h 18, k_h 72, a padded tail, a last piece shorter than a chunk) through
    layer.stream() (speechbrain) or layer(piece, state=...) (idiap, two chunks of left context)
    equals the layer's one pass on the same backend, output and the gradients of the input and
    every parameter, same upstream gradient, within the backend's declared float32 tolerance."""
    kw = STREAM_MODES[mode_name]
    layer = _layer(variant, kw, torch.float32, backend).to(device)
    B, N = 2, 17
    x = (0.5 * torch.randn(B, N, layer.input_output_dim, generator=torch.Generator().manual_seed(2))).to(device)
    x.requires_grad_(True)
    pad = torch.zeros(B, N, dtype=torch.bool, device=device)
    pad[1, 13:] = True
    pieces = _stream_pieces(N, kw["chunk_size"], seed=6)
    probe = hmx_kernels.check_inputs(x[:, :3], x[:, :3], x[:, :3], *layer._weights(), variant=variant, **kw)
    why = stream_reasons(backend, probe)
    if why:
        pytest.skip(f"{backend} does not stream this here: {'; '.join(why)}")
    if variant == "speechbrain":
        full = layer(x, key_padding_mask=pad)[0]
        stream = layer.stream()
        streamed = torch.cat([stream(x[:, s:s + n], key_padding_mask=pad[:, s:s + n]) for s, n in pieces], 1)
        state = stream.state
    else:
        full = layer(x, x, x, pad, pad)
        state, outs = layer.initial_state(), []
        for s, n in pieces:
            y, state = layer(x[:, s:s + n], key_padding_mask=pad[:, s:s + n], state=state)
            outs.append(y)
        streamed = torch.cat(outs, 1)
    assert state.position == N and state.carry.dtype == torch.float32
    tol_out, tol_grad = _stream_tolerance(backend, device, torch.float32)
    assert_close("out", streamed, full, tol_out)
    g = torch.randn_like(full)
    leaves = [x] + list(layer.parameters())
    ga = torch.autograd.grad(full, leaves, g)
    gb = torch.autograd.grad(streamed, leaves, g)
    for (name, _), a, b in zip([("x", x)] + list(layer.named_parameters()), gb, ga):
        assert_close(f"grad {name}", a, b, tol_grad)


@needs_cpu
def test_stream_backends_share_the_state_and_auto_picks_cpu_where_it_can():
    """A stream may change backend between pieces (both keep P in the compute dtype); "auto" streams
    chunk-causal mixing with unbounded left context on the cpu backend, the rest on the reference;
    a named backend that cannot stream the mode says why."""
    x, w, pad = _stream_case("speechbrain", torch.float64, N=20)
    full = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=pad, chunk_size=4, backend="reference")
    outs, state = [], None
    for i, start in enumerate(range(0, 20, 4)):
        y, state = hyper_mixing_stream(x[:, start:start + 4], *w, state=state, key_padding_mask=pad[:, start:start + 4],
                                       backend=("cpu", "reference")[i % 2], **({} if state else dict(chunk_size=4)))
        outs.append(y)
    streamed = torch.cat(outs, 1)
    assert_close("out", streamed, full, 1e-12)
    g = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad(streamed, [x, w[2]], g), torch.autograd.grad(full, [x, w[2]], g)):
        assert_close("grad", a, b, 1e-12)

    def picked(**mode):
        p = hmx_kernels.check_inputs(x[:, :4], None, None, *w, **mode)
        return select_stream_backend("auto", p).name

    assert picked(chunk_size=4) == picked(causal=True) == picked(chunk_size=4, left_context_chunks=1) == "cpu"
    half = [None if t is None else t.detach().half() for t in w]
    with pytest.raises(BackendNotSupportedError, match="'cpu' cannot stream this piece: streams float32, float64 "
                                                       "only, not torch.float16"):
        hyper_mixing_stream(x[:, :4].detach().half(), *half, chunk_size=4, backend="cpu")
    p16 = hmx_kernels.check_inputs(x[:, :4].detach().half(), None, None, *half, chunk_size=4)
    assert select_stream_backend("auto", p16).name == "reference"
    with pytest.raises(BackendNotSupportedError, match="'triton' cannot stream this piece: streams float32, "
                                                       "float16, bfloat16 only, not torch.float64"):
        hyper_mixing_stream(x[:, :4], *w, chunk_size=4, backend="triton")
    for name in hmx_kernels.registered_backends():
        if get_backend(name).capabilities.carried_state is None:
            with pytest.raises(BackendNotSupportedError, match=f"'{name}' cannot stream this piece: takes no "
                                                               "carried state"):
                hyper_mixing_stream(x[:, :4], *w, chunk_size=4, backend=name)


@pytest.mark.parametrize("mode_name", ["token", "chunk3", "chunk3_L2"])
def test_stream_changes_backend_between_pieces(mode_name):
    """Every backend that streams float32 CPU tensors here keeps the carry in one form (P, [k_h,
    d_h] per head, float32): pieces computed in turn by each of them (and the reference) equal the
    reference's one pass, output and every gradient, within the loosest of their declared float32
    tolerances."""
    kw = STREAM_MODES[mode_name]
    C = kw.get("chunk_size", 1)
    x, w, pad = _stream_case("speechbrain", torch.float32, N=11 if C == 1 else 17)
    N = x.shape[1]
    probe = hmx_kernels.check_inputs(x[:, :C], None, None, *w, **kw)
    names = [n for n in hmx_kernels.registered_backends() if not stream_reasons(n, probe)]
    fused = [n for n in names if n != "reference"]
    if not fused:
        pytest.skip("no fused backend streams float32 CPU tensors here")
    order = fused + ["reference"]
    tol = max([_stream_tolerance(n, "cpu", torch.float32) for n in names])
    full = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=pad, backend="reference", **kw)
    outs, state = [], None
    for i, (start, n) in enumerate(_stream_pieces(N, C, seed=5)):
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, key_padding_mask=pad[:, start:start + n],
                                       backend=order[i % len(order)], **({} if state else kw))
        outs.append(y)
    streamed = torch.cat(outs, 1)
    assert_close("out", streamed, full, tol[0])
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    for i, (a, b) in enumerate(zip(torch.autograd.grad(streamed, leaves, g), torch.autograd.grad(full, leaves, g))):
        assert_close(f"grad {i}", a, b, tol[1])


@needs_cpu
def test_cpu_op_refuses_a_carried_state_where_it_has_none():
    from hmx_kernels.cpp.ops import CPP_OPS

    x, w, _ = _stream_case("speechbrain", torch.float64, N=8)
    x = x.detach()
    gen = [None if t is None else t.detach() for t in w[:4]] * 2
    init = torch.zeros(2, 2, 18, 72, dtype=torch.float64)
    for chunk_size, left in ((4, 1), (0, -1)):
        with pytest.raises(ValueError, match="carried state"):
            CPP_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", chunk_size, left, None, 0, "", init)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 18, 72\]"):
        CPP_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 4, -1, None, 0, "", init[:1])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 2, 18, 72\]"):  # one per chunk
        CPP_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 4, 1, None, 0, "", init[:, :, None])
    with pytest.raises(ValueError, match="token-causal mixing takes one carried state"):
        CPP_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 1, -1, None, 0, "", init[:, :, None])


@needs_cpu
def test_cpu_token_stream_across_scan_tiles():
    """The token scan's pieces span several tiles of CPU_TILE tokens (checkpoints, the final slot,
    the reverse scan starting from the final state's gradient): 3 pieces of 290, 1 and 310 tokens
    equal one cpu pass, output and every gradient, float64."""
    case = make_case(variant="speechbrain", B=2, M=601, d=8, H=2, k_h=5, dtype=torch.float64, input_scale=0.5)
    x, w, pad = case.tensors["query"], [case.tensors[k] for k in WEIGHT_NAMES], case.key_padding_mask
    full = hmx_kernels.hyper_mixing(x, None, None, *w, key_padding_mask=pad, causal=True, backend="cpu")
    outs, state, start = [], None, 0
    for n in (290, 1, 310):
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, key_padding_mask=pad[:, start:start + n],
                                       backend="cpu", **({} if state else dict(causal=True)))
        outs.append(y)
        start += n
    streamed = torch.cat(outs, 1)
    assert_close("out", streamed, full, 1e-12)
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    for i, (a, b) in enumerate(zip(torch.autograd.grad(streamed, leaves, g), torch.autograd.grad(full, leaves, g))):
        assert_close(f"grad {i}", a, b, 1e-12)


def _triton_cpu_reasons():
    from hmx_kernels.triton.backend import triton_available

    return triton_available("cpu")


@pytest.mark.skipif(bool(_triton_cpu_reasons()), reason="the Triton interpreter is off (TRITON_INTERPRET=1)")
def test_triton_ops_refuse_a_carried_state_where_they_have_none():
    """The Triton ops take initial_state / grad_state only in their mixing-block ops, causal or
    chunk-causal without packed sequences, in the ops' shared P^T layout, and take a piece's
    position offset but no sequence-parallel group; each refusal names the problem."""
    from hmx_kernels.triton.launch import TRITON_BLOCK_OPS, TRITON_OPS

    x, w, _ = _stream_case("speechbrain", torch.float32, N=8)
    x = x.detach()
    gen = [None if t is None else t.detach() for t in w[:4]] * 2
    init = torch.zeros(2, 2, 18, 72)
    with pytest.raises(ValueError, match="the triton ops do not take a carried state"):
        TRITON_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 0, -1, None, 0, "", init)
    with pytest.raises(ValueError, match="take a carried state .* only in causal and chunk-causal mixing"):
        TRITON_BLOCK_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 0, -1, None, 0, "", init)
    with pytest.raises(ValueError, match="only in causal and chunk-causal mixing, without packed sequences"):
        TRITON_BLOCK_OPS.fwd(x[:1], x[:1], x[:1], None, None, *gen, "speechbrain", 4, -1,
                             torch.tensor([0, 3, 8]), 0, "", init[:1])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 18, 72\], got \[2, 2, 72, 18\]"):
        TRITON_BLOCK_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 4, -1, None, 0, "", init.transpose(-1, -2))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2, 2, 2, 18, 72\]"):  # one per chunk
        TRITON_BLOCK_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 4, 1, None, 0, "", init[:, :, None])
    with pytest.raises(ValueError, match="no sequence-parallel group"):
        TRITON_BLOCK_OPS.fwd(x, x, x, None, None, *gen, "speechbrain", 4, -1, None, 0, "some_group")


@pytest.mark.skipif(bool(_triton_cpu_reasons()), reason="the Triton interpreter is off (TRITON_INTERPRET=1)")
def test_triton_op_carried_state_equals_the_reference_window_terms():
    """At the op level: the Triton mixing-block op with a carried state in every window equals the
    cpu-independent definition, the reference fed the same state as its initial P (P form, the
    transpose of the op's), chunk-causal, d_h 18, k_h 72, 11 tokens at position offset 7; output
    and the state's gradient (the op's 12th) against torch.autograd through the reference."""
    from hmx_kernels.ops import layer_norm_epilogue
    from hmx_kernels.reference.hyper_mixing import hyper_mixing_ref
    from hmx_kernels.triton.launch import TRITON_BLOCK_OPS

    x, w, pad = _stream_case("speechbrain", torch.float32, N=11)
    carry = (0.3 * torch.randn(2, 2, 72, 18, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    p = hmx_kernels.check_inputs(x, x, x, *w, key_padding_mask=pad, chunk_size=4, position_offset=7)
    y, state = TRITON_BLOCK_OPS.fwd(p.query, p.key, p.value, p.query_keep, p.key_keep, *p.generator_weights(),
                                    "speechbrain", 4, -1, None, 7, "", carry.transpose(-1, -2))
    y = layer_norm_epilogue(y, p)
    ref, final = hyper_mixing_ref(x, x, x, *w, key_padding_mask=pad, query_padding_mask=pad,
                                  mode=p.mode, position_offset=7, initial_state=carry, output_final_state=True)
    tol = get_backend("triton").tolerances[("cpu", torch.float32)]
    assert_close("out", y, ref, tol.out)
    assert_close("final state", state.view(2, 2, 3, 72, 18)[:, :, -1], final, tol.out)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad(y, [carry, x], g)
    gb = torch.autograd.grad(ref, [carry, x], g)
    assert_close("grad carry", ga[0], gb[0], tol.grad)
    assert_close("grad x", ga[1], gb[1], tol.grad)


@pytest.mark.skipif(bool(_triton_cpu_reasons()), reason="the Triton interpreter is off (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("mode_name", ["chunk4", "chunk4_L1"])
def test_triton_streams_with_the_split_kernels(mode_name):
    """d_h 128 (config.SPLIT_BLOCK_D: the state pass split over row groups, S, sv and T, sdy from
    passes of their own, the finalize in torch): three pieces (4, 4, 2 tokens) equal the
    reference's one pass, output and every gradient, within the Triton float32 tolerance."""
    from hmx_kernels.triton import autotune

    assert autotune.split_state(128)
    kw = dict(chunk_size=4) if mode_name == "chunk4" else dict(chunk_size=4, left_context_chunks=1)
    case = make_case(variant="speechbrain", B=1, M=10, d=128, H=1, k_h=8, input_scale=0.5, masks=False)
    x, w = case.tensors["query"], [case.tensors[k] for k in WEIGHT_NAMES]
    full = hmx_kernels.hyper_mixing(x, None, None, *w, backend="reference", **kw)
    outs, state = [], None
    for start, n in ((0, 4), (4, 4), (8, 2)):
        y, state = hyper_mixing_stream(x[:, start:start + n], *w, state=state, backend="triton",
                                       **(kw if state is None else {}))
        outs.append(y)
    streamed = torch.cat(outs, 1)
    tol = get_backend("triton").tolerances[("cpu", torch.float32)]
    assert_close("out", streamed, full, tol.out)
    g = torch.randn_like(full)
    leaves = [x] + [t for t in w if t is not None]
    for i, (a, b) in enumerate(zip(torch.autograd.grad(streamed, leaves, g), torch.autograd.grad(full, leaves, g))):
        assert_close(f"grad {i}", a, b, tol.grad)


@needs_cpu
def test_cpu_op_with_one_term_per_chunk_returns_each_chunks_own_state():
    """The cpu op with one carried term per chunk (limited left context, one pass per piece): its
    state is each chunk's own partial state Q_j (that of block-local windows, L = 0), and output and
    every gradient (inputs, weights, the terms; through the state as well) equal the two-pass form
    P_j = Q_j + (Q_{j-1} + E_j) with Q from a block-local pass. float64, d_h 18, k_h 72, N 11 in
    chunks of 3 (the last one short), padded tails, non-zero terms."""
    from hmx_kernels.cpp.ops import CPP_OPS

    x, w, pad = _stream_case("speechbrain", torch.float64, N=11, seed=3)
    keep = (~pad).to(torch.float64)
    gen = w[:8]  # both generators (fc1_w, fc1_b, fc2_w, fc2_b each)
    B, H, nb, d_h, k_h = 2, 2, 4, 18, 72
    init = (0.3 * torch.randn(B, H, nb, d_h, k_h, dtype=torch.float64)).requires_grad_(True)
    args = (x, x, x, keep, keep, *gen, "speechbrain")
    y1, s1 = CPP_OPS.fwd(*args, 3, 1, None, 0, "", init)
    _, s0 = CPP_OPS.fwd(*args, 3, 0, None, 0, "")
    q = s0.view(B, H, nb, d_h, k_h)
    terms = torch.cat([init[:, :, :1], init[:, :, 1:] + q[:, :, :-1]], dim=2).contiguous()
    y2, _ = CPP_OPS.fwd(*args, 3, 0, None, 0, "", terms)
    assert_close("state", s1, s0, 1e-12)
    assert_close("out", y1, y2, 1e-12)
    g, gs = torch.randn_like(y1), torch.randn_like(s1)
    leaves = [x, init] + [t for t in gen if t is not None]
    ga = torch.autograd.grad((y1 * g).sum() + (s1 * gs).sum(), leaves)
    gb = torch.autograd.grad((y2 * g).sum() + (s0 * gs).sum(), leaves)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert_close(f"grad {i}", a, b, 1e-12)
