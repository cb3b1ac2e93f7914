"""Streaming a speechbrain ConformerEncoder / TransformerEncoder whose HyperMixing layers were
converted to FusedHyperMixing: chunk after chunk, equal to the encoder's full pass under the same
Dynamic Chunk Training (DCT) configuration (or under the causal mask).

    s = stream(encoder, chunk_size=16, left_context_chunks=4)   # DynChunkTrainConfig(16, 4)
    outs = [s(chunk) for chunk in features.split(16, dim=1)]     # [B, 16, d] each
    # == encoder(features, src_mask=make_transformer_src_mask(features, dynchunktrain_config=cfg),
    #            dynchunktrain_config=cfg)[0]   (converted layers with attn_mask_policy="honour")

Per layer the stream keeps what the next chunk needs and nothing else:
- each HyperMixing layer its carried `StreamingState` (hmx_kernels.streaming): the running sum of
  the earlier chunks' partial states (or the last L chunks'), and the position of the next token,
  so the positional encoding continues. O(1) in the number of chunks; the mixer runs on the chunk
  only.
- each Conformer convolution module the last `padding` frames of its input (its left context,
  as speechbrain's Dynamic Chunk Convolution defines it): every chunk is convolved with those
  frames on its left and zeros on its right (a causal convolution module: its left frames, with
  no right context at all). Everything else in a layer is per frame.

What speechbrain 1.1.2 itself does with HyperMixing (measured in tests/test_speechbrain_streaming.py):
- `ConformerEncoder.forward_streaming` re-runs each mixer non-causally on the last L chunks of its
  input plus the new chunk, with positions restarting at 0 at the first left-context frame: its
  output equals the DCT full pass while the window starts at position 0 (the first L + 1 chunks)
  and differs after that; with unlimited left context (left_context_size=None) it raises a
  TypeError (it compares the left-context size None with 0).
- `TransformerASR.encode_streaming` fails for attention_type="hypermixing": with the Conformer
  encoder and the default "fixed_abs_sine" encoding, from the second chunk on (the positional
  encoding of left context + chunk is added to the chunk alone); with positional_encoding=None at
  once (UnboundLocalError); with the Transformer encoder, which has no streaming, at once.

Only the encoder streams here: a TransformerASR's `custom_src_module` is per frame and can be run
on each chunk first; its absolute positional encoding ("fixed_abs_sine") must then be added for the
chunk's global positions by the caller. Run the encoder in eval() mode (dropout and layer drop make
any two passes differ). A Transformer encoder layer with the "1dcnn" feed-forward ("same"
padding sees future frames) is refused.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..causal import MixingMode, resolve_mode
from ..layer import FusedHyperMixing
from ..streaming import StreamingState

__all__ = ["stream", "EncoderStream"]


def _layer_kind(layer) -> str:
    """'conformer' or 'transformer' for a speechbrain encoder layer (duck-typed); else TypeError."""
    if hasattr(layer, "mha_layer") and hasattr(layer, "convolution_module") and hasattr(layer, "ffn_module1"):
        return "conformer"
    if hasattr(layer, "self_att") and hasattr(layer, "pos_ffn") and hasattr(layer, "normalize_before"):
        return "transformer"
    raise TypeError(f"not a speechbrain ConformerEncoderLayer or TransformerEncoderLayer: {type(layer).__name__}")


def _mixer(layer, kind: str, index: int) -> FusedHyperMixing:
    m = layer.mha_layer if kind == "conformer" else layer.self_att
    if not isinstance(m, FusedHyperMixing):
        where = "mha_layer" if kind == "conformer" else "self_att"
        raise TypeError(f"layer {index}'s {where} is a {type(m).__name__}, not a FusedHyperMixing: convert the "
                        "encoder's HyperMixing layers first (FusedHyperMixing.from_speechbrain)")
    if m.variant != "speechbrain":
        raise TypeError(f"layer {index}'s mixer is an {m.variant!r}-variant FusedHyperMixing; a speechbrain "
                        "encoder holds speechbrain-variant layers")
    return m


class _LayerCache:
    """One encoder layer's carried state: its mixer's StreamingState and its convolution's left frames."""

    def __init__(self, mixer_state: StreamingState) -> None:
        self.mixer_state = mixer_state
        self.conv_left: Optional[Tensor] = None  # [B, <= padding, d]: the convolution module's input tail
        self.conv_left_padded: Optional[Tensor] = None  # [B, <= padding] bool, True = padded


class EncoderStream:
    """A speechbrain encoder streaming one batch of sequences: `out = s(chunk)` per chunk.

    Each call takes the next frames of every sequence, [B, n, d] with n a multiple of the chunk
    size (any n for the token-causal mode; a shorter last piece ends the stream), and an optional
    key_padding_mask [B, n] (True = padded), and returns the encoder output for those frames.
    Built by `stream()`."""

    def __init__(self, encoder, mode: MixingMode) -> None:
        layers = list(encoder.layers)
        if not layers:
            raise ValueError("the encoder has no layers")
        self.encoder = encoder
        self.mode = mode
        self.kinds = [_layer_kind(layer) for layer in layers]
        self.caches: List[_LayerCache] = []
        for i, (layer, kind) in enumerate(zip(layers, self.kinds)):
            mixer = _mixer(layer, kind, i)
            if mixer.mode is not None and mixer.mode != mode:
                raise ValueError(f"layer {i}'s mixer was built for {mixer.mode.describe()} mixing, not "
                                 f"{mode.describe()}")
            if kind == "transformer" and getattr(layer, "pos_ffn_type", "regularFFN") != "regularFFN":
                raise ValueError(f"layer {i} has the {layer.pos_ffn_type!r} feed-forward, whose convolutions see "
                                 "future frames: it cannot stream")
            if kind == "conformer" and getattr(layer.convolution_module, "dilation", 1) != 1:
                raise ValueError(f"layer {i}'s convolution module is dilated; speechbrain's Dynamic Chunk "
                                 "Convolution (and this stream) needs dilation 1")
            self.caches.append(_LayerCache(mixer.initial_state(**_mode_kwargs(mode))))
        self.position = 0
        # a non-causal convolution module sees its chunk's right end as zeros: chunks go one by one
        self._chunked_convolution = any(k == "conformer" and not layer.convolution_module.causal
                                        for layer, k in zip(layers, self.kinds))

    @property
    def states(self) -> List[StreamingState]:
        """Every HyperMixing layer's current carried state, bottom to top."""
        return [c.mixer_state for c in self.caches]

    def __call__(self, chunk: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(chunk, Tensor) or chunk.dim() != 3:
            raise ValueError(f"a chunk must be a [B, n, d] tensor, got {getattr(chunk, 'shape', type(chunk).__name__)}")
        n = chunk.shape[1]
        C = self.mode.chunk_size
        if self._chunked_convolution and n > C:  # Dynamic Chunk Convolution: one chunk at a time
            pieces = [(s, min(C, n - s)) for s in range(0, n, C)]
        else:
            pieces = [(0, n)]
        if len(pieces) == 1:
            out = self._chunk(chunk, key_padding_mask)
        else:
            out = torch.cat([self._chunk(chunk[:, s:s + m], None if key_padding_mask is None else
                                         key_padding_mask[:, s:s + m]) for s, m in pieces], dim=1)
        self.position += n
        return out

    def _chunk(self, x: Tensor, pad: Optional[Tensor]) -> Tensor:
        for layer, kind, cache in zip(self.encoder.layers, self.kinds, self.caches):
            x = self._conformer(layer, cache, x, pad) if kind == "conformer" else self._transformer(layer, cache, x, pad)
        return self.encoder.norm(x)

    @staticmethod
    def _conformer(layer, cache: _LayerCache, x: Tensor, pad: Optional[Tensor]) -> Tensor:
        # ConformerEncoderLayer.forward, with the mixer streamed and the convolution given its left frames
        n = x.shape[1]
        x = x + 0.5 * layer.ffn_module1(x)
        skip = x
        h = layer.norm1(x)
        h, cache.mixer_state = layer.mha_layer(h, key_padding_mask=pad, state=cache.mixer_state)
        x = h + skip
        conv = layer.convolution_module
        padded = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device) if pad is None else pad
        xc, padded_c = x, padded
        if cache.conv_left is not None:
            xc = torch.cat((cache.conv_left, x), dim=1)
            padded_c = torch.cat((cache.conv_left_padded, padded), dim=1)
        if conv.padding > 0:
            cache.conv_left, cache.conv_left_padded = xc[:, -conv.padding:], padded_c[:, -conv.padding:]
        conv_mask = None if pad is None else padded_c.unsqueeze(-1)  # as speechbrain: zero padded frames' output
        x = x + conv(xc, conv_mask)[:, -n:]
        return layer.norm2(x + 0.5 * layer.ffn_module2(x))

    @staticmethod
    def _transformer(layer, cache: _LayerCache, src: Tensor, pad: Optional[Tensor]) -> Tensor:
        # TransformerEncoderLayer.forward, with the mixer streamed (every other part is per frame)
        src1 = layer.norm1(src) if layer.normalize_before else src
        out, cache.mixer_state = layer.self_att(src1, key_padding_mask=pad, state=cache.mixer_state)
        src = src + layer.dropout1(out)
        if not layer.normalize_before:
            src = layer.norm1(src)
        src1 = layer.norm2(src) if layer.normalize_before else src
        out = src + layer.dropout2(layer.pos_ffn(src1))
        return out if layer.normalize_before else layer.norm2(out)


def _mode_kwargs(mode: MixingMode) -> dict:
    if mode.token_causal:
        return {"causal": True}
    return {"chunk_size": mode.chunk_size, "left_context_chunks": mode.left_context_chunks}


def stream(encoder, chunk_size: Optional[int] = None, left_context_chunks: Optional[int] = None, *,
           causal: bool = False, dynchunktrain_config=None) -> EncoderStream:
    """An `EncoderStream` over a speechbrain ConformerEncoder / TransformerEncoder with converted
    (FusedHyperMixing) HyperMixing layers.

    The mode: chunk_size / left_context_chunks (speechbrain's DynChunkTrainConfig(chunk_size,
    left_context_size): left context in chunks, None = unlimited), or a DynChunkTrainConfig as
    dynchunktrain_config=, or causal=True (the causal mask get_lookahead_mask; for an encoder built
    with causal=True). The stream's output equals the encoder's full pass in that mode: src_mask =
    make_transformer_src_mask(src, causal, dynchunktrain_config) with the layers' attn_mask_policy
    "honour", and dynchunktrain_config passed to a ConformerEncoder for its convolutions."""
    if dynchunktrain_config is not None:
        if chunk_size is not None or left_context_chunks is not None or causal:
            raise ValueError("pass dynchunktrain_config or chunk_size / left_context_chunks / causal, not both")
        chunk_size, left_context_chunks = dynchunktrain_config.chunk_size, dynchunktrain_config.left_context_size
    mode = resolve_mode(causal, chunk_size, left_context_chunks)
    if mode is None:
        raise ValueError("streaming needs chunk_size=... (Dynamic Chunk Training) or causal=True")
    return EncoderStream(encoder, mode)
