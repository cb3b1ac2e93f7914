"""Streaming causal HyperMixing: a sequence processed in consecutive pieces, with a carried state.

In a causal mode (hmx_kernels.causal) the output of a chunk depends only on its own and earlier
chunks, through sums of per-chunk partial states Q_j = sum_{s in chunk j} m_s W1_s^T V_s. The
`StreamingState` carries exactly what the next piece needs: the position of its first token (the
positional encoding continues), and the running sum of every earlier chunk's Q (L = None) or the
last L chunks' Q (L chunks of left context) — O(1) memory in the number of pieces. Feeding a
sequence piece by piece gives the result of one pass over the whole sequence.

A chunk's output depends on its whole chunk, so every piece but the last must hold whole chunks
(a multiple of chunk_size tokens; any length for the token-causal mode). The reference backend
computes the pieces: the fused backends run the causal modes over whole sequences (and packed
ones) but take no carried state yet.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import Tensor

from .causal import MixingMode, resolve_mode
from .reference.hyper_mixing import hyper_mixing_ref
from .validation import check_inputs

__all__ = ["StreamingState", "hyper_mixing_stream"]


@dataclass
class StreamingState:
    mode: MixingMode
    position: int = 0  # tokens consumed so far = position of the next piece's first token
    carry: Optional[Tensor] = None  # [B, H, k_h, d_h] (L None) or [B, H, r <= L, k_h, d_h]
    finished: bool = False  # the last piece ended inside a chunk: nothing may follow

    def detach(self) -> "StreamingState":
        """The same state cut from the autograd graph (truncated backpropagation, inference)."""
        return StreamingState(self.mode, self.position, None if self.carry is None else self.carry.detach(),
                              self.finished)


def hyper_mixing_stream(
    piece: Tensor,  # [B, n, d]: the next n tokens of every sequence
    *weights,
    state: Optional[StreamingState] = None,
    variant: str = "speechbrain",
    causal: bool = False,
    chunk_size: Optional[int] = None,
    left_context_chunks: Optional[int] = None,
    key_padding_mask: Optional[Tensor] = None,  # [B, n] for this piece
    use_layer_norm: bool = True,
    eps: float = 1e-5,
) -> Tuple[Tensor, StreamingState]:
    """Mix the next piece of a sequence causally; returns (output [B, n, d], the new state).

    `weights` are `hyper_mixing`'s ten parameter tensors; self-mixing (both variants). The first
    call takes state=None and the mode arguments; later calls take the returned state (its mode
    wins; passing a different mode is an error).

    Example (token-causal, pieces of any length):
        >>> import torch, hmx_kernels
        >>> from hmx_kernels.streaming import hyper_mixing_stream
        >>> H, d_h, k_h = 2, 4, 6
        >>> w = [torch.randn(H, d_h, d_h), torch.randn(H, d_h), torch.randn(H, k_h, d_h), torch.randn(H, k_h)]
        >>> ln = [torch.ones(8), torch.zeros(8)]
        >>> x = torch.randn(1, 10, 8)
        >>> y1, s = hyper_mixing_stream(x[:, :3], *w, None, None, None, None, *ln, causal=True)
        >>> y2, s = hyper_mixing_stream(x[:, 3:], *w, None, None, None, None, *ln, state=s)
        >>> full = hmx_kernels.hyper_mixing(x, None, None, *w, None, None, None, None, *ln, causal=True)
        >>> torch.allclose(torch.cat([y1, y2], 1), full, atol=1e-5)
        True
    """
    mode = resolve_mode(causal, chunk_size, left_context_chunks)
    if state is None:
        if mode is None:
            raise ValueError("streaming needs a causal mode: causal=True or chunk_size=...")
        state = StreamingState(mode)
    elif mode is not None and mode != state.mode:
        raise ValueError(f"the state was started for {state.mode.describe()} mixing, not {mode.describe()}")
    if state.finished:
        raise ValueError("the previous piece ended inside a chunk, so it was the last one: start a new state")
    mode = state.mode
    n = piece.shape[1]
    p = check_inputs(piece, piece, piece, *weights, variant=variant, key_padding_mask=key_padding_mask,
                     query_padding_mask=key_padding_mask if variant != "speechbrain" else None,
                     use_layer_norm=use_layer_norm, eps=eps, chunk_size=mode.chunk_size,
                     left_context_chunks=mode.left_context_chunks, position_offset=state.position)
    slot = [state.carry, None]
    pad = key_padding_mask if key_padding_mask is None else p.key_keep == 0
    y = hyper_mixing_ref(p.query, p.key, p.value, *p.generator_weights(), p.ln_weight, p.ln_bias,
                         variant=p.variant.name, key_padding_mask=pad, query_padding_mask=pad,
                         use_layer_norm=p.use_layer_norm, eps=p.eps, mode=mode,
                         position_offset=state.position, _stream_past=slot)
    new = StreamingState(mode, state.position + n, slot[1], finished=n % mode.chunk_size != 0)
    return y.to(p.out_dtype), new
