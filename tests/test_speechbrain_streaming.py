"""Streaming speechbrain encoders (hmx_kernels.integrations.speechbrain_streaming): a small
ConformerEncoder / TransformerEncoder built in speechbrain (2 layers, d 64, 4 heads), its
HyperMixing layers converted with FusedHyperMixing.from_speechbrain(attn_mask_policy="honour"),
fed chunk after chunk, equals the encoder's full pass in the same mode (the Dynamic Chunk Training
mask, and for the Conformer the Dynamic Chunk Convolution; or the causal mask), every chunk's
output, in float64 at 1e-12 of the largest magnitude (the same sums grouped by chunk), with a
padded sequence in the batch and a prime length. Also pins what speechbrain 1.1.2's own streaming
does with HyperMixing, as the module docstring states it."""
from __future__ import annotations

import random

import pytest
import torch

from hmx_kernels import FusedHyperMixing
from hmx_kernels.integrations.speechbrain_streaming import stream
from utils import assert_close, import_speechbrain

RTOL = 1e-12


@pytest.fixture(autouse=True)
def one_thread():
    """These encoders are tiny: on a shared machine torch's default thread count makes its float64
    depthwise convolution (and OpenMP in general) wait on busy cores for most of the test's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sb():
    T = import_speechbrain("speechbrain.lobes.models.transformer.TransformerASR")
    C = import_speechbrain("speechbrain.lobes.models.transformer.Conformer")
    TR = import_speechbrain("speechbrain.lobes.models.transformer.Transformer")
    from speechbrain.utils.dynamic_chunk_training import DynChunkTrainConfig

    return T, C, TR, DynChunkTrainConfig


def _convert(encoder, attr):
    for layer in encoder.layers:
        setattr(layer, attr, FusedHyperMixing.from_speechbrain(getattr(layer, attr), attn_mask_policy="honour"))
    return encoder


def _conformer(kernel_size=7, causal=False, seed=0):
    _, C, _, _ = _sb()
    torch.manual_seed(seed)
    enc = C.ConformerEncoder(2, 64, 128, 4, kernel_size=kernel_size, attention_type="hypermixing", causal=causal,
                             dropout=0.0)
    return _convert(enc.double().eval(), "mha_layer")


def _inputs(B=2, N=37, d=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, N - 8:] = True
    return x, pad


def _stream_in_pieces(s, x, pad, C, seed):
    """Random whole-chunk pieces; returns [(start, n, output)]."""
    rng, start, outs = random.Random(seed), 0, []
    N = x.shape[1]
    while start < N:
        n = min(N - start, C * rng.randint(1, 3))
        outs.append((start, n, s(x[:, start:start + n], key_padding_mask=pad[:, start:start + n])))
        start += n
    return outs


@pytest.mark.parametrize("C,L,kernel_size", [(4, 1, 7), (2, None, 7), (5, 0, 3)])
def test_conformer_stream_equals_dct_full_pass(C, L, kernel_size):
    """Chunks of 4 with a convolution of 7 (3 frames of left context), chunks of 2 (the
    convolution's left context spans two chunks) with unlimited left context, and no left context."""
    T, _, _, DCT = _sb()
    enc = _conformer(kernel_size)
    x, pad = _inputs()
    cfg = DCT(C, L)
    with torch.no_grad():
        full = enc(x, src_mask=T.make_transformer_src_mask(x, dynchunktrain_config=cfg), src_key_padding_mask=pad,
                   dynchunktrain_config=cfg)[0]
        s = stream(enc, dynchunktrain_config=cfg)
        for start, n, out in _stream_in_pieces(s, x, pad, C, seed=C):
            assert_close(f"frames {start}..{start + n}", out, full[:, start:start + n], RTOL)
    assert s.position == x.shape[1] and all(st.position == x.shape[1] for st in s.states)
    # the convolution's DCT context matters: the same stream without it is a different function
    with torch.no_grad():
        plain = enc(x, src_mask=T.make_transformer_src_mask(x, dynchunktrain_config=cfg), src_key_padding_mask=pad)[0]
    assert (plain - full).abs().max() > 1e-6


def test_causal_conformer_stream_equals_causal_full_pass():
    """An encoder built causal (causal convolutions) under the causal mask: pieces of any length."""
    T, _, _, _ = _sb()
    enc = _conformer(kernel_size=5, causal=True)
    x, pad = _inputs(N=23)
    with torch.no_grad():
        full = enc(x, src_mask=T.make_transformer_src_mask(x, causal=True), src_key_padding_mask=pad)[0]
        s = stream(enc, causal=True)
        for start, n, out in _stream_in_pieces(s, x, pad, 1, seed=5):
            assert_close(f"frames {start}..{start + n}", out, full[:, start:start + n], RTOL)


@pytest.mark.parametrize("normalize_before", [True, False])
def test_transformer_stream_equals_dct_full_pass(normalize_before):
    T, _, TR, DCT = _sb()
    torch.manual_seed(0)
    enc = TR.TransformerEncoder(num_layers=2, nhead=4, d_ffn=128, d_model=64, attention_type="hypermixing",
                                normalize_before=normalize_before, dropout=0.0)
    enc = _convert(enc.double().eval(), "self_att")
    x, pad = _inputs()
    cfg = DCT(3, 2)
    with torch.no_grad():
        full = enc(x, src_mask=T.make_transformer_src_mask(x, dynchunktrain_config=cfg), src_key_padding_mask=pad)[0]
        s = stream(enc, 3, 2)
        for start, n, out in _stream_in_pieces(s, x, pad, 3, seed=2):
            assert_close(f"frames {start}..{start + n}", out, full[:, start:start + n], RTOL)


def test_stream_refuses_what_it_cannot_stream():
    _, C, TR, _ = _sb()
    torch.manual_seed(0)
    raw = C.ConformerEncoder(1, 16, 32, 2, kernel_size=3, attention_type="hypermixing").double().eval()
    with pytest.raises(TypeError, match="convert the encoder's HyperMixing layers first"):
        stream(raw, 4)
    enc = _convert(raw, "mha_layer")
    with pytest.raises(ValueError, match="needs chunk_size"):
        stream(enc)
    enc.layers[0].mha_layer = FusedHyperMixing(16, 32, num_heads=2, causal=True).double()
    with pytest.raises(ValueError, match="layer 0's mixer was built for token-causal mixing"):
        stream(enc, 4)
    cnn = TR.TransformerEncoder(num_layers=1, nhead=2, d_ffn=32, d_model=16, attention_type="hypermixing",
                                ffn_type="1dcnn")
    cnn = _convert(cnn, "self_att")
    with pytest.raises(ValueError, match="'1dcnn' feed-forward"):
        stream(cnn, 4)
    s = stream(_conformer(), 4, 1)
    s(torch.randn(1, 6, 64, dtype=torch.float64))  # a ragged piece ends the stream
    with pytest.raises(ValueError, match="ended inside a chunk"):
        s(torch.randn(1, 4, 64, dtype=torch.float64))
    s = stream(_conformer(), 4, 1)
    s(torch.randn(1, 4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch size: the state has 1, the piece 2"):
        s(torch.randn(2, 4, 64, dtype=torch.float64))


def test_speechbrains_own_streaming_with_hypermixing():
    """What the module docstring says speechbrain 1.1.2 does: ConformerEncoder.forward_streaming
    equals the DCT full pass while its window starts at position 0 and then differs (positions
    restart at 0 and the mixer runs non-causally on left context + chunk); unlimited left context
    raises; TransformerASR.encode_streaming fails for hypermixing."""
    T, _, _, DCT = _sb()
    enc = _conformer(kernel_size=3)
    x, _ = _inputs(N=16)
    cfg = DCT(4, 1)
    with torch.no_grad():
        full = enc(x, src_mask=T.make_transformer_src_mask(x, dynchunktrain_config=cfg), dynchunktrain_config=cfg)[0]
        ctx = enc.make_streaming_context(cfg)
        errs = [float((enc.forward_streaming(x[:, i:i + 4], ctx)[0] - full[:, i:i + 4]).abs().max())
                for i in range(0, 16, 4)]
    assert max(errs[:2]) < 1e-12 and min(errs[2:]) > 1e-3, errs
    with pytest.raises(TypeError):
        enc.forward_streaming(x[:, :4], enc.make_streaming_context(DCT(4, None)))
    torch.manual_seed(0)
    asr = T.TransformerASR(tgt_vocab=10, input_size=20, d_model=16, nhead=2, num_encoder_layers=1,
                           num_decoder_layers=0, d_ffn=32, attention_type="hypermixing", encoder_module="conformer",
                           kernel_size=3, normalize_before=True, dropout=0.0, causal=False).eval()
    ctx = asr.make_streaming_context(DCT(4, 1))
    asr.encode_streaming(torch.randn(2, 4, 20), ctx)  # the first chunk runs
    with pytest.raises(RuntimeError, match="must match the size"):
        asr.encode_streaming(torch.randn(2, 4, 20), ctx)  # PE of left context + chunk added to the chunk
    common = dict(tgt_vocab=10, input_size=20, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=0,
                  d_ffn=32, attention_type="hypermixing", normalize_before=True, dropout=0.0, causal=False)
    asr = T.TransformerASR(encoder_module="conformer", kernel_size=3, positional_encoding=None, **common).eval()
    with pytest.raises(UnboundLocalError):
        asr.encode_streaming(torch.randn(2, 4, 20), asr.make_streaming_context(DCT(4, 1)))
    asr = T.TransformerASR(encoder_module="transformer", **common).eval()
    with pytest.raises(AttributeError, match="make_streaming_context"):
        asr.make_streaming_context(DCT(4, 1))
